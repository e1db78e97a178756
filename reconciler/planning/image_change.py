"""Rule 6 (``docs/design.md`` §3): an image-only change, a commit-tagged image of a settled app changing its tag
without a new history entry, is a SUCCESS deployment keyed by a hash (``img-<hash>``).

Choices ``docs/design.md`` §3 leaves open: it needs a tag change of an image repository already in the baseline
(``Snapshot.images``); images that only appear or disappear (init containers, sidecars, hook Jobs, scale to zero)
move the baseline silently, and a repository showing two tags is a rollout in flight, left out of the comparison.
Its ref hashes the new image set with the previous set, the last history id, the settling health transition and
the previous image-only ref, so every occurrence of a change has its own id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from reconciler.model import DeploymentClass, DeploymentKind, Result, format_time
from reconciler.planning.draft import Draft, Step


def image_only_change(draft: Draft) -> None:
    """Rule 6, on a tick without a new history entry."""
    if not draft.settled():
        return
    live = draft.live.tags()
    before = dict(draft.state.images)
    rolling = sorted(repo for repo, tags in live.items() if len(tags) > 1)
    current = {repo: next(iter(tags)) for repo, tags in live.items() if len(tags) == 1}
    # A repository showing two tags is a rollout in flight (old pods still terminating): not a change yet, and
    # its baseline stays where it was until one tag is left.
    current.update({repo: before[repo] for repo in rolling if repo in before})
    if current == before:
        return
    changed = sorted(repo for repo in current.keys() & before.keys() if current[repo] != before[repo])
    if not changed:
        # Only images appearing or disappearing (init containers, sidecars, hook Jobs, a scale to zero,
        # a baseline cleared by a deployment without known images): the baseline moves, nothing deployed.
        draft.record(images=current)
        return
    at, from_health = _change_time(draft)
    ref = _image_ref(draft, current, before, at if from_health else None)
    last_entry = draft.obs.history[-1] if draft.obs.history else None
    changes = ", ".join(f"{repo} {before[repo]} -> {current[repo]}" for repo in changed)
    draft.begin()
    draft.state = draft.state.evolve(
        images=current, last_deployment_started_at=at, last_image_change=ref, rollout_since=None
    )
    draft.notes.append(f"image-only change without a new history entry: {changes}")
    if rolling:
        draft.notes.append(f"rollout in flight (two tags live), left out: {', '.join(rolling)}")
    draft.steps.append(
        Step(
            kind=DeploymentKind.IMAGE,
            ref=ref,
            result=Result.SUCCESS,
            deployment_class=DeploymentClass.IMAGE_CHANGE,
            started_at=at,
            finished_at=at,
            revisions=last_entry.revisions if last_entry else (),
            sources=last_entry.sources if last_entry else draft.obs.sources,
            state=draft.state,
            uid=draft.obs.uid,
            images=draft.live.refs(before, leave_out=set(rolling)),
            message=f"images changed: {changes}",
        )
    )


def _image_ref(draft: Draft, current: Mapping[str, str], before: Mapping[str, str], transition: datetime | None) -> str:
    """``img-<hash>`` of the change from ``before`` to ``current`` (``transition``: the health transition that
    settled it, when usable)."""
    material: dict[str, Any] = {
        "images": _pairs(current),
        "previous": _pairs(before),
        "history": draft.state.last_history_id,
        "at": format_time(transition) if transition is not None else None,
    }
    if draft.state.last_image_change is not None:
        # Chains each image-only change to the one before it: A -> B, B -> A, A -> B again get three ids even
        # without a health transition time to tell them apart. Left out of the very first one, so that ids
        # planned before the chain existed stay what they were.
        material["after"] = draft.state.last_image_change
    digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
    return f"img-{digest}"


def _pairs(images: Mapping[str, str]) -> Sequence[str]:
    return sorted(f"{repo}={tag}" for repo, tag in images.items())


def _change_time(draft: Draft) -> tuple[datetime, bool]:
    """When the new images went live: the health transition that settled them, when it happened after
    everything the stored snapshot already knows (its ``last_seen``, which is at or after the last
    deployment) and not in the future; else ``now``, at most one tick late. The flag says which."""
    transition = draft.obs.health_transition_at
    known = [draft.state.last_deployment_started_at, draft.snapshot.last_seen if draft.snapshot else None]
    if transition is not None and transition <= draft.now and all(t is None or transition > t for t in known):
        return transition, True
    return draft.now, False
