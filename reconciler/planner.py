"""The pure decision: what did one Application deploy since its last snapshot, and was it a success?

``plan(observation, snapshot, now, policy)`` applies ``docs/design.md`` §3 in order and returns the deployments to
deliver, oldest first, each carrying the snapshot to store once it has been delivered. No I/O and no clock:
the only time is ``now``.

This module holds the order of the rules and the ``Plan`` they make; each rule lives in ``reconciler.planning``:
rules 1 (deleting) and 2 (stale status) here; rule 7 and the other scopes of a plan (first sight, backfill, a new
uid, a history restart, the regular tick) in ``planning.scope``; rule 3 in ``planning.history`` with the health
verdict in ``planning.health``; rules 4 and 5 in ``planning.operations``; rule 6 in ``planning.image_change``. The
snapshot invariants the reconciler relies on are listed in ``planning.draft``, the state every rule extends.

Choices ``docs/design.md`` §3 leaves open are documented in the module of their rule; this one makes one: the
explicit ``backfill`` command emits history even on a cluster never run before, whatever ``first_run`` says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from reconciler.config import ImagesConfig
from reconciler.images import commit_images
from reconciler.model import AppObservation, Deployment, PendingVerdict, Snapshot, format_time
from reconciler.planning import scope
from reconciler.planning.draft import Draft, Step
from reconciler.planning.history import emit_history
from reconciler.planning.image_change import image_only_change
from reconciler.planning.operations import failed_operation, note_in_flight, out_of_sync_missing, record_before_cutoff

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "Plan",
    "PlannerPolicy",
    "default_commit_images",
    "initialization_cutoff",
    "newest_argocd_time",
    "plan",
]

CLOCK_SKEW_ALLOWANCE = timedelta(minutes=15)
"""How far the reconciler's clock may be ahead of Argo CD's when a cluster is initialised with no Application
to read Argo CD's time from."""


def default_commit_images(refs: Sequence[str]) -> Mapping[str, str]:
    """``reconciler.images.commit_images`` with the default images configuration."""
    return commit_images(refs, ImagesConfig())


@dataclass(frozen=True)
class PlannerPolicy:
    initialized_at: datetime | None
    """The cluster's ``initialized_at`` (see ``initialization_cutoff``); ``None`` = the first run for the cluster."""
    first_run: Literal["baseline", "backfill"] = "baseline"
    verdict_timeout: timedelta = timedelta(hours=1)
    failure_on_out_of_sync_missing: bool = True
    detect_image_only_changes: bool = True
    commit_images: Callable[[Sequence[str]], Mapping[str, str]] = field(default=default_commit_images)
    """Raw image references -> ``{image repository: commit tag}``, for the images that take part in image-only
    comparisons (the reconciler leaves out images no ``images.repositories`` rule maps)."""
    backfill: bool = False
    """The ``backfill`` command: emit every history entry present, ignoring the snapshot's high-water mark."""
    since: datetime | None = None
    """With a backfill: only entries deployed (operations finished) at or after this."""


@dataclass(frozen=True)
class Plan:
    deployments: tuple[Deployment, ...]
    """Oldest first; each carries ``snapshot_after``."""
    snapshot: Snapshot
    """The snapshot once every deployment is delivered. For a ``deferred`` plan: the input snapshot (or an
    empty placeholder when there was none), which must not be stored."""
    deferred: bool = False
    notes: tuple[str, ...] = ()
    decided_snapshot: Snapshot | None = None
    """What to store before delivering (at the latest when delivery stops before the first deployment is
    recorded): the snapshot the plan starts from plus the verdicts it decided, nothing marked delivered.
    ``None`` when the plan decides no history verdict."""


def plan(observation: AppObservation, snapshot: Snapshot | None, now: datetime, policy: PlannerPolicy) -> Plan:
    """Decide the deployments of one Application since ``snapshot`` (``docs/design.md`` §3, rules applied in order)."""
    draft = Draft(
        observation, snapshot, now, commit_images=policy.commit_images, verdict_timeout=policy.verdict_timeout
    )
    # Rule 1: deleting.
    if observation.deleting:
        same_app = snapshot is not None and snapshot.uid == observation.uid
        base = snapshot if snapshot is not None and same_app else scope.baseline(draft, snapshot)
        deleting_since = base.deleting_since or now
        draft.notes.append(f"being deleted since {format_time(deleting_since)}: no deployment recorded")
        return _quiet(draft, base.evolve(deleting_since=deleting_since, last_seen=now))
    # Rule 2: stale status.
    op = observation.operation
    if op is not None and op.completed and op.finished_at is not None and _stale(op.finished_at, observation):
        reconciled = "never" if observation.reconciled_at is None else format_time(observation.reconciled_at)
        draft.notes.append(
            f"stale status: the operation finished {format_time(op.finished_at)} but the app was last "
            f"reconciled {reconciled}: deferred to the next tick"
        )
        placeholder = snapshot if snapshot is not None else Snapshot(uid=observation.uid, last_seen=now)
        return Plan(deployments=(), snapshot=placeholder, deferred=True, notes=tuple(draft.notes))
    # Rule 7: the first run for the cluster records a baseline (unless it backfills).
    if policy.initialized_at is None and policy.first_run == "baseline" and not policy.backfill:
        draft.notes.append("first run for the cluster: current state recorded as the baseline")
        return _quiet(draft, scope.baseline(draft, snapshot))
    return _apply_rules(draft, _scope(draft, policy), policy)


def _scope(draft: Draft, policy: PlannerPolicy) -> scope.Scope:
    """Rule 7 and what it leaves to rule 3: a first-run backfill, a first sight, a backfill, a new uid, a history
    restart, or the regular tick."""
    obs, snapshot = draft.obs, draft.snapshot
    if policy.initialized_at is None:
        draft.notes.append("first run for the cluster: backfilling the history present")
        return scope.full(draft, scope.fresh(draft, snapshot), scope.since_filter(draft, policy.since))
    if snapshot is None:
        if policy.backfill:
            draft.notes.append("backfill: emitting every history entry present")
            return scope.full(draft, scope.fresh(draft, None), scope.since_filter(draft, policy.since))
        initialized_at = policy.initialized_at
        draft.notes.append(
            f"first seen: emitting what was deployed after the cluster was initialised ({format_time(initialized_at)})"
        )
        return scope.full(draft, scope.fresh(draft, None), lambda at: at > initialized_at)
    draft.records = scope.undelivered(snapshot)
    if snapshot.uid != obs.uid:
        return scope.new_uid(draft, snapshot, backfill=policy.backfill, since=policy.since)
    draft.prior_pending = snapshot.pending
    if policy.backfill:
        draft.notes.append("backfill: emitting every history entry present again")
        emit = scope.since_filter(draft, policy.since)
        return scope.full(draft, scope.carried(draft, snapshot), emit, monotonic=True, records_advance=True)
    restart = scope.restart(draft, snapshot)
    if restart is not None:
        draft.notes.append(restart)
        draft.prior_pending = None
        return scope.restarted(draft, snapshot)
    return scope.incremental(draft, snapshot)


def _apply_rules(draft: Draft, walk: scope.Scope, policy: PlannerPolicy) -> Plan:
    """Rules 3 to 6 in order over what ``walk`` selected. A rule added later (a decision taken on the verdict of
    rule 3 or on the live health) is one more call here, at its place in the order."""
    pending = emit_history(draft, walk.candidates, walk.chain, monotonic=walk.monotonic)
    failed_operation(draft, walk.emit, ignore_high_water=walk.monotonic)
    if policy.failure_on_out_of_sync_missing:
        out_of_sync_missing(draft, walk.emit)
    if walk.regular and not walk.candidates and policy.detect_image_only_changes:
        image_only_change(draft)
    record_before_cutoff(draft, walk.emit)
    note_in_flight(draft)
    return _finish(draft, pending)


def newest_argocd_time(observation: AppObservation) -> datetime | None:
    """The newest time Argo CD wrote in an Application: a reading of Argo CD's clock (at most a refresh old)."""
    times = [observation.reconciled_at, observation.health_transition_at]
    times += [entry.deployed_at for entry in observation.history]
    op = observation.operation
    if op is not None:
        times += [op.started_at, op.finished_at]
    return max((t for t in times if t is not None), default=None)


def initialization_cutoff(now: datetime, newest_argocd: datetime | None) -> datetime:
    """The ``initialized_at`` to record for a cluster initialised at ``now`` (the reconciler's clock).

    It is compared with Argo CD times (``deployedAt``), so it is read off Argo CD's clock: the newest time seen in
    the cluster's Applications, unless the reconciler's clock is behind it. With no Application to read, the
    reconciler's clock less ``CLOCK_SKEW_ALLOWANCE``. An entry deployed after it is new to the reconciler."""
    if newest_argocd is None:
        return now - CLOCK_SKEW_ALLOWANCE
    return min(now, newest_argocd)


def _stale(finished_at: datetime, obs: AppObservation) -> bool:
    """The notifications controller's gate: health and sync predate the operation's end."""
    return obs.reconciled_at is None or finished_at > obs.reconciled_at


def _finish(draft: Draft, pending: PendingVerdict | None) -> Plan:
    """The plan of the steps emitted: each deployment's ``snapshot_after`` gets the plan's pending verdict, the
    facts recorded without a deployment and the verdicts of the deployments after it."""
    pending_entry = draft.pending_entry if pending is not None else None
    decided = [(index, step.decided) for index, step in enumerate(draft.steps) if step.decided is not None]

    def after(index: int, step: Step) -> Snapshot:
        later = tuple(verdict for position, verdict in decided if position > index)
        return step.state.evolve(pending=pending, pending_entry=pending_entry, decided=later, **draft.recorded)

    deployments = tuple(_deployment(draft, step, after(index, step)) for index, step in enumerate(draft.steps))
    final = draft.state.evolve(pending=pending, pending_entry=pending_entry, decided=())
    if not deployments:
        return _quiet(draft, final)
    decided_snapshot = None
    if decided and draft.start is not None:
        start = draft.start
        if draft.snapshot is not None and start.uid == draft.snapshot.uid:
            # Nothing was learnt of the live state yet: the stored ``last_seen`` still says what it knew when.
            start = start.evolve(last_seen=draft.snapshot.last_seen)
        decided_snapshot = start.evolve(
            pending=pending,
            pending_entry=pending_entry,
            decided=tuple(verdict for _, verdict in decided),
            **draft.recorded,
        )
    return Plan(deployments=deployments, snapshot=final, notes=tuple(draft.notes), decided_snapshot=decided_snapshot)


def _deployment(draft: Draft, step: Step, snapshot_after: Snapshot) -> Deployment:
    return Deployment(
        key=draft.obs.key,
        uid=step.uid,
        kind=step.kind,
        ref=step.ref,
        result=step.result,
        deployment_class=step.deployment_class,
        started_at=step.started_at,
        finished_at=step.finished_at,
        revisions=step.revisions,
        sources=step.sources,
        snapshot_after=snapshot_after,
        images=step.images,
        history_id=step.history_id,
        message=step.message,
    )


def _quiet(draft: Draft, final: Snapshot) -> Plan:
    """A plan without deployments. When only ``last_seen`` would change, the stored snapshot is returned
    as it is, so that a quiet tick writes nothing."""
    previous = draft.snapshot
    if previous is not None and final.evolve(last_seen=previous.last_seen) == previous:
        final = previous
    return Plan(deployments=(), snapshot=final, notes=tuple(draft.notes))
