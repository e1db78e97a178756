"""Component dedupe (``devlake.dedupe: component``): the same change made by several Applications of one
component reaches each connection once.

What is compared is the *change*, counted per Application: the n-th time one Application makes a change matches
only another Application's n-th, so a rollback or a roll-forward of commits the component once had goes out again,
while a twin Application repeating it does not. A change is known by what it deploys (``change_fingerprint``) and
by the commits its payload ships (``shipped_fingerprint``, its alias): two deployments are the same change when
either matches, so a twin catching up several syncs (no images known for the superseded ones) matches by its
GitOps revisions, and one image reaching two Applications through two GitOps commits matches by the image commits
the payloads carry. Within a tick, the first Application in listing order that makes a shared change sends it, so
who sends never depends on timing; a deployment that is a duplicate by one of its fingerprints makes its other
ones the same change too (they are given the same sender).

Pure: ``markers_to_read`` names the store markers the decisions depend on, the caller reads them (one batched
read) and ``assign`` turns them into ``Claims``. The markers are the store's record of what happened to each
deployment at each connection (sent, deduplicated, rejected for good, waiting in the connection's backlog) and of
each change sent. Who sends a change is then settled by the store: the caller claims each change ``assign`` gave
to one of its deployments (``intended_claims``, ``claim_key``: an atomic first-claimer-wins write) and
``settle_claims`` turns every claim another deployment holds into a duplicate, so parallel shards never both send.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Literal

from reconciler.model import AppKey, DeploymentKind, EnrichedDeployment, SourceRef

OCCURRENCES_PROBED = 8
"""How many earlier occurrences of one change by one Application are looked up; past that the change is sent
anyway (a possible duplicate beats a lost deployment)."""

Mode = Literal["component", "application"]


def change_fingerprint(enriched: EnrichedDeployment, *, environment: str) -> str:
    """A stable hash of the change a deployment makes, for component-level dedupe, the same whatever path an
    Application took to it.

    What a deployment deploys is what decides: for a history entry or a sync operation, its GitOps revisions per
    source (repository and chart, not the path: twin Applications deploy one revision from their own paths);
    for an image-only change, the commits its images name. Its environment and result too, so a staging
    deployment never hides the production one and a success after a failure of the same revisions still goes
    out. Neither where the commits came from nor the images a history entry ran are part of it: Argo CD keeps no
    images for an entry that is no longer the newest, so an Application that catches up several syncs in one
    run (or after its cluster could not be listed) knows them for its last entry only, and the change must
    still match the one its twin made sync by sync. Repeating a change (a rollback, a roll-forward, a redeploy)
    is told apart by counting occurrences per Application (``change_marker``).
    """
    deployment = enriched.deployment
    revisions = [
        [_source_identity(deployment.sources[index]) if index < len(deployment.sources) else "", revision]
        for index, revision in enumerate(deployment.revisions)
    ]
    material: dict[str, object] = {
        "revisions": revisions,
        "environment": str(environment),
        "result": deployment.result.devlake,
    }
    if deployment.kind is DeploymentKind.IMAGE:
        material["images"] = sorted({(commit.repo_url, commit.sha.lower()) for commit in enriched.heads})
    text = json.dumps(material, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def shipped_fingerprint(enriched: EnrichedDeployment, *, environment: str) -> str | None:
    """A stable hash of the head commits a deployment's payload ships, its environment and its result: the
    change's alias for component dedupe. ``None`` when it ships no commit.

    With ``devlake.include_gitops_commit: fallback`` (the default) a deployment that changed an image commit ships
    that commit and not the GitOps one, so one image rolled out to two Applications through two GitOps commits (one
    per overlay) ships the same commits while their revisions differ; the alias makes them one change. Where the
    GitOps commit is shipped, the alias adds nothing the revisions do not say.
    """
    commits = sorted({(commit.repo_url, commit.sha.lower()) for commit in enriched.heads})
    if not commits:
        return None
    material = {"shipped": commits, "environment": str(environment), "result": enriched.deployment.result.devlake}
    text = json.dumps(material, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _source_identity(source: SourceRef) -> str:
    """The repository (and chart) a revision belongs to, spelled alike whichever Application names it."""
    repo = source.repo_url.strip().lower().rstrip("/").removesuffix(".git")
    return f"{repo}#{source.chart}" if source.chart else repo


# -- markers -----------------------------------------------------------------------------------------------


def component_marker(connection_id: int, component: str, fingerprint: str, occurrence: int) -> str:
    """The n-th time this component made this change, as delivered to a connection (the first keeps the
    short form)."""
    base = f"component:{connection_id}:{component}:{fingerprint}"
    return base if occurrence == 1 else f"{base}:{occurrence}"


def claim_key(component: str) -> str:
    """The store's claim on a component change (``component_marker``): which deployment sends it. Written once,
    atomically, by the first claimer; the component marker is written when DevLake accepted it."""
    return "claim:" + component.removeprefix("component:")


def change_marker(key: AppKey, uid: str, fingerprint: str, occurrence: int) -> str:
    """An Application made this change for the n-th time. Counting lets a roll-forward after a rollback (the
    same change again) go out, while a second Application making a change already sent is deduplicated."""
    return f"change:{key.cluster}:{key.namespace}:{key.name}:{uid[:8]}:{fingerprint}:{occurrence}"


@dataclass(frozen=True)
class Target:
    """One deployment to one connection, and the markers that record what happened to it."""

    connection_id: int
    deployment_id: str

    @property
    def sent(self) -> str:
        """Written once DevLake accepted it."""
        return f"sent:{self.connection_id}:{self.deployment_id}"

    @property
    def deduped(self) -> str:
        """Written instead of ``sent`` when another Application of the component sends this change."""
        return f"deduped:{self.connection_id}:{self.deployment_id}"

    @property
    def rejected(self) -> str:
        """Written instead of ``sent`` when DevLake refused it for good (dead-lettered): a run moves on, a
        backfill tries it again once the operator has fixed the cause."""
        return f"rejected:{self.connection_id}:{self.deployment_id}"

    @property
    def queued(self) -> str:
        """Written with the deployment's payload in the connection's backlog (the connection refused its key, id
        or URL, or this deployment claimed a shared change): the backlog delivers it, nothing else sends it."""
        return f"queued:{self.connection_id}:{self.deployment_id}"

    def handled(self, existing: Set[str]) -> bool:
        return any(marker in existing for marker in (self.sent, self.deduped, self.rejected, self.queued))

    @classmethod
    def delivered_by(cls, marker: str) -> Target | None:
        """The target a ``sent`` marker records as delivered; ``None`` for any other marker."""
        kind, _, rest = marker.partition(":")
        connection, _, deployment_id = rest.partition(":")
        if kind != "sent" or not connection.isdigit() or not deployment_id:
            return None
        return cls(int(connection), deployment_id)


# -- the decision ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One deployment of an Application that has a payload: its change and the connections it goes to."""

    deployment_id: str
    fingerprint: str | None
    connections: tuple[int, ...]
    aliases: tuple[str, ...] = ()
    """Other fingerprints the same change is known by (``shipped_fingerprint``); only with a ``fingerprint``."""

    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(Target(connection, self.deployment_id) for connection in self.connections)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        """The fingerprint first, then each alias once."""
        if self.fingerprint is None:
            return ()
        return tuple(dict.fromkeys((self.fingerprint, *self.aliases)))


@dataclass(frozen=True)
class AppSteps:
    """An Application's deployments of this tick, in delivery order."""

    key: AppKey
    uid: str
    component: str
    steps: Sequence[Step]


@dataclass(frozen=True)
class Decision:
    """What dedupe decided for one deployment."""

    change: str | None = None
    """This Application's marker for its n-th occurrence of the change, written once the deployment is
    recorded; ``None`` when it is not deduplicated."""
    components: Mapping[int, str] = field(default_factory=dict)
    """Connection id -> the component-change marker, written when that connection accepts the deployment."""
    duplicates: Mapping[int, str] = field(default_factory=dict)
    """Connection id -> why it is not sent there: another Application sends (or sent) the same change."""
    alias_changes: tuple[str, ...] = ()
    """This Application's markers for its occurrence of the change under each alias, written with ``change``."""
    alias_components: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    """Connection id -> the component-change markers of the aliases, written with ``components``."""

    @property
    def changes(self) -> tuple[str, ...]:
        """Every change marker to write once the deployment is recorded."""
        return (self.change, *self.alias_changes) if self.change is not None else ()

    def markers(self, connection: int) -> tuple[str, ...]:
        """Every component-change marker of this change at ``connection`` (the fingerprint's first); empty when
        it is not decided there."""
        component = self.components.get(connection)
        return (component, *self.alias_components.get(connection, ())) if component is not None else ()


_UNDECIDED = Decision()


@dataclass
class Claims:
    decisions: dict[str, Decision] = field(default_factory=dict)
    """Deployment id -> its decision (absent: sent as it is)."""
    holders: dict[str, str] = field(default_factory=dict)
    """Component-change marker -> the deployment that sends it: the first in listing order this tick."""

    def of(self, deployment_id: str) -> Decision:
        return self.decisions.get(deployment_id, _UNDECIDED)


def markers_to_read(apps: Sequence[AppSteps], mode: Mode) -> list[str]:
    """The markers ``assign`` needs to know about: for each delivery, whether it happened; for each change,
    the Application's earlier occurrences and every component marker this tick could give it."""
    markers: list[str] = []
    for app in apps:
        counts = _fingerprint_counts(app)
        for step in app.steps:
            for target in step.targets:
                markers += [target.sent, target.deduped, target.rejected, target.queued]
            if mode != "component" or not step.connections:
                continue
            for fingerprint in step.fingerprints:
                markers += [change_marker(app.key, app.uid, fingerprint, n) for n in range(1, OCCURRENCES_PROBED + 1)]
                for n in range(1, OCCURRENCES_PROBED + counts[fingerprint]):
                    markers += [component_marker(c, app.component, fingerprint, n) for c in step.connections]
    return list(dict.fromkeys(markers))


def assign(
    apps: Sequence[AppSteps], existing: Set[str], mode: Mode, claimed: Mapping[str, str] | None = None
) -> Claims:
    """Decide which deliveries are duplicates of a change another Application sends.

    ``existing``: the markers of ``markers_to_read`` found in the store. ``claimed``: the holders of the
    changes claimed earlier in this tick (earlier pages), which keep them.
    """
    claims = Claims(holders=dict(claimed or {}))
    if mode != "component":
        return claims
    pending: list[tuple[Step, list[str], dict[int, list[str]]]] = []
    for app in apps:
        in_this_tick: dict[str, int] = {}
        for step in app.steps:
            targets = step.targets
            if step.fingerprint is None or not targets:
                continue
            if all(target.handled(existing) for target in targets):
                continue  # recorded before (a backfill sees it again): its occurrences are already counted
            occurrences: list[tuple[str, int]] = []
            for fingerprint in step.fingerprints:
                earlier = 0
                while (
                    earlier < OCCURRENCES_PROBED
                    and change_marker(app.key, app.uid, fingerprint, earlier + 1) in existing
                ):
                    earlier += 1
                occurrence = earlier + in_this_tick.get(fingerprint, 0) + 1
                in_this_tick[fingerprint] = in_this_tick.get(fingerprint, 0) + 1
                if earlier < OCCURRENCES_PROBED:
                    occurrences.append((fingerprint, occurrence))
            if not occurrences or occurrences[0][0] != step.fingerprint:
                continue  # past the occurrences looked up: sent anyway (a possible duplicate beats a loss)
            components = {
                target.connection_id: [
                    component_marker(target.connection_id, app.component, fingerprint, occurrence)
                    for fingerprint, occurrence in occurrences
                ]
                for target in targets
            }
            for target in targets:
                markers = components[target.connection_id]
                if target.handled(existing) or any(marker in existing for marker in markers):
                    continue
                holder = next((claims.holders[m] for m in markers if m in claims.holders), step.deployment_id)
                for marker in markers:
                    claims.holders.setdefault(marker, holder)
            changes = [change_marker(app.key, app.uid, fingerprint, n) for fingerprint, n in occurrences]
            pending.append((step, changes, components))
    for step, changes, components in pending:
        duplicates: dict[int, str] = {}
        for connection, markers in components.items():
            if any(marker in existing for marker in markers):
                duplicates[connection] = "already in DevLake"
                continue
            holders = [claims.holders.get(marker) for marker in markers]
            other = next((holder for holder in holders if holder != step.deployment_id), step.deployment_id)
            if other != step.deployment_id:
                duplicates[connection] = f"sent as {other}" if other else "already in DevLake"
        claims.decisions[step.deployment_id] = Decision(
            changes[0],
            {connection: markers[0] for connection, markers in components.items()},
            duplicates,
            tuple(changes[1:]),
            {connection: tuple(markers[1:]) for connection, markers in components.items() if len(markers) > 1},
        )
    return claims


def intended_claims(claims: Claims) -> list[tuple[str, int, tuple[str, ...]]]:
    """``(deployment id, connection, component markers)`` of every delivery ``assign`` decided to send itself
    (the fingerprint's marker first, then its aliases'): what the caller claims in the store, all at once, before
    sending."""
    return [
        (deployment_id, connection, decision.markers(connection))
        for deployment_id, decision in claims.decisions.items()
        for connection in decision.components
        if connection not in decision.duplicates
    ]


def settle_claims(claims: Claims, holders: Mapping[str, str]) -> Claims:
    """``claims`` once the store said who holds each change claimed (``claim_key`` -> deployment id): a deployment
    whose claim another one holds, under its fingerprint or an alias (a parallel shard, an earlier run), does not
    send the change."""
    settled = Claims(holders=dict(claims.holders))
    for deployment_id, decision in claims.decisions.items():
        duplicates = dict(decision.duplicates)
        for connection in decision.components:
            if connection in duplicates:
                continue
            for marker in decision.markers(connection):
                holder = holders.get(claim_key(marker))
                if holder is None:
                    continue
                settled.holders[marker] = holder
                if holder != deployment_id:
                    duplicates.setdefault(connection, f"sent as {holder}")
        settled.decisions[deployment_id] = replace(decision, duplicates=duplicates)
    return settled


def _fingerprint_counts(app: AppSteps) -> dict[str, int]:
    counts: dict[str, int] = {}
    for step in app.steps:
        for fingerprint in step.fingerprints:
            counts[fingerprint] = counts.get(fingerprint, 0) + 1
    return counts
