"""The pure decision: what did one Application deploy since its last snapshot, and was it a success?

``plan(observation, snapshot, now, policy)`` applies ``docs/design.md`` §3 in order and returns the deployments to
deliver, oldest first, each carrying the snapshot to store once it has been delivered. No I/O and no clock:
the only time is ``now``.

Snapshot invariants the reconciler relies on (so that a crash or a failed delivery never loses a deployment
and never sends one twice):

* ``last_history_id`` only moves past an entry once that entry's deployment is delivered. A history entry
  whose health verdict is still open (``pending``) is *not* emitted and ``last_history_id`` stays below it, so
  the entry is "new" again on every tick until it is decided. Every ``snapshot_after`` of a plan carries the
  plan's pending verdict, and the last one equals ``Plan.snapshot``.
* ``last_failed_operation`` is the key space of operation deployments (``op-<startedAt>``): rules 4 and 5
  both check and advance it, so one operation is never counted twice. A baseline, a failed dry run and a
  failed partial sync also record their operation there, so they are never reconsidered.
* ``images`` is the planner's own baseline for image-only changes: the commit-tagged images (repository ->
  tag) of the live state when the app was last settled, else of what the last deployment applied, else
  empty (unknown: re-read at the next settled tick without emitting anything).
* ``commits`` belongs to the reconciler: carried forward untouched.
* ``last_seen`` is when the snapshot last changed: when nothing else would change, the input snapshot is
  returned as is, so a quiet tick writes nothing to the store.

Choices ``docs/design.md`` §3 leaves open:

* Health verdicts need a fresh status (``reconciledAt`` at or after ``deployedAt``, 1 s tolerance). Once fresh,
  ``Healthy`` is accepted whatever ``lastTransitionTime`` says: freshness is what the catalog's time clauses
  approximate. ``Degraded`` that began before the sync started is not this deployment's failure (SUCCESS).
  ``Missing`` after a sync is FAILED whatever its transition time.
* A later full sync (not partial, not a dry run) owns the live health: while it runs the newest entry stays
  pending; when it failed, the entry is settled (FAILED if it went Degraded before that sync started, else
  SUCCESS), like an entry superseded by a newer entry.
* The verdict timeout counts from the first tick that saw the entry pending (``PendingVerdict.since``).
* Failed dry runs and failed partial (selective, self-heal) syncs are not deployments (rule 4 and 5 skip them).
* Image-only changes (rule 6) need a tag change of an image repository already in the baseline; images that
  only appear or disappear (init containers, sidecars, hook Jobs, scale to zero) move the baseline silently.
  Its ref hashes the new image set with the previous set, the last history id and the settling health
  transition, so going back to an earlier image set is a new deployment, not an overwrite of the old one.
* Backfills and first sights also emit the failed operation present in the status (same cut-off rule:
  its ``finishedAt``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from reconciler.config import ImagesConfig
from reconciler.images import commit_images
from reconciler.model import (
    RECENT_ENTRIES_KEPT,
    AppObservation,
    Deployment,
    DeploymentClass,
    DeploymentKind,
    HistoryEntry,
    OperationState,
    PendingVerdict,
    Result,
    Snapshot,
    SourceRef,
    format_time,
)

__all__ = ["Plan", "PlannerPolicy", "plan"]

FRESHNESS_TOLERANCE = timedelta(seconds=1)
"""``deployedAt`` and ``finishedAt`` differ by up to a second; both have one-second precision."""

_Fingerprint = tuple[tuple[str, ...], str]


def default_commit_images(refs: Sequence[str]) -> Mapping[str, str]:
    """``reconciler.images.commit_images`` with the default images configuration."""
    return commit_images(refs, ImagesConfig())


@dataclass(frozen=True)
class PlannerPolicy:
    initialized_at: datetime | None
    """The cluster's ``initialized_at``; ``None`` = this is the first run for the cluster."""
    first_run: Literal["baseline", "backfill"] = "baseline"
    verdict_timeout: timedelta = timedelta(hours=1)
    failure_on_out_of_sync_missing: bool = True
    detect_image_only_changes: bool = True
    commit_images: Callable[[Sequence[str]], Mapping[str, str]] = field(default=default_commit_images)
    """Raw image references -> ``{image repository: commit tag}``."""
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


def plan(observation: AppObservation, snapshot: Snapshot | None, now: datetime, policy: PlannerPolicy) -> Plan:
    """Decide the deployments of one Application since ``snapshot`` (``docs/design.md`` §3, rules applied in order)."""
    return _Planner(observation, snapshot, now, policy).run()


@dataclass(frozen=True)
class _Verdict:
    result: Result | None
    """``None``: not decided yet (pending)."""
    reason: str


@dataclass(frozen=True)
class _Step:
    """A deployment before its ``snapshot_after`` gets the plan's final pending verdict."""

    kind: DeploymentKind
    ref: str
    result: Result
    deployment_class: DeploymentClass
    started_at: datetime
    finished_at: datetime
    revisions: tuple[str, ...]
    sources: tuple[SourceRef, ...]
    state: Snapshot
    images: tuple[str, ...] = ()
    history_id: int | None = None
    message: str = ""


def _always(at: datetime) -> bool:
    return True


class _Planner:
    """One ``plan()`` call. ``state`` is the snapshot as it would be after the steps emitted so far."""

    def __init__(
        self, observation: AppObservation, snapshot: Snapshot | None, now: datetime, policy: PlannerPolicy
    ) -> None:
        self.obs = observation
        self.snapshot = snapshot
        self.now = now
        self.policy = policy
        self.notes: list[str] = []
        self.steps: list[_Step] = []
        self.state = Snapshot(uid=observation.uid, last_seen=now)
        self.recorded: dict[str, Any] = {}
        """Facts learnt without a deployment; true whatever gets delivered, so every snapshot gets them."""
        self.prior_pending: PendingVerdict | None = None

    # -- entry point ---------------------------------------------------------------------------------------

    def run(self) -> Plan:
        obs, snapshot, policy = self.obs, self.snapshot, self.policy
        same_app = snapshot is not None and snapshot.uid == obs.uid

        # Rule 1: deleting.
        if obs.deleting:
            base = snapshot if snapshot is not None and same_app else self._baseline(snapshot)
            deleting_since = base.deleting_since or self.now
            self.notes.append(f"being deleted since {format_time(deleting_since)}: no deployment recorded")
            return self._quiet(base.evolve(deleting_since=deleting_since, last_seen=self.now))

        # Rule 2: stale status.
        op = obs.operation
        if op is not None and op.completed and op.finished_at is not None and _stale(op.finished_at, obs):
            reconciled = "never" if obs.reconciled_at is None else format_time(obs.reconciled_at)
            self.notes.append(
                f"stale status: the operation finished {format_time(op.finished_at)} but the app was last "
                f"reconciled {reconciled}: deferred to the next tick"
            )
            placeholder = snapshot if snapshot is not None else Snapshot(uid=obs.uid, last_seen=self.now)
            return Plan(deployments=(), snapshot=placeholder, deferred=True, notes=tuple(self.notes))

        # Rule 7: first run for the cluster, first sight of an app, a new uid, a backfill.
        if policy.initialized_at is None:
            if policy.first_run == "baseline" and not policy.backfill:
                self.notes.append("first run for the cluster: current state recorded as the baseline")
                return self._quiet(self._baseline(snapshot))
            self.notes.append("first run for the cluster: backfilling the history present")
            return self._full(self._fresh(snapshot), self._since_filter())
        if snapshot is None:
            if policy.backfill:
                self.notes.append("backfill: emitting every history entry present")
                return self._full(self._fresh(None), self._since_filter())
            initialized_at = policy.initialized_at
            self.notes.append(
                f"first seen: emitting what was deployed after the cluster was initialised "
                f"({format_time(initialized_at)})"
            )
            return self._full(self._fresh(None), lambda at: at > initialized_at)
        if not same_app:
            self.notes.append(f"new uid {obs.uid} (was {snapshot.uid}): a new Application, all its history is new")
            return self._full(self._fresh(snapshot), self._since_filter() if policy.backfill else _always)
        self.prior_pending = snapshot.pending
        if policy.backfill:
            self.notes.append("backfill: emitting every history entry present again")
            return self._full(self._carried(snapshot), self._since_filter(), monotonic=True)
        last = snapshot.last_history_id
        if obs.history and last is not None and obs.history[-1].id < last:
            self.notes.append(
                f"history ids restarted (newest id {obs.history[-1].id} < last recorded {last}): all entries are new"
            )
            self.prior_pending = None
            return self._full(self._fresh(snapshot), _always)
        return self._incremental(snapshot)

    # -- the regular tick ----------------------------------------------------------------------------------

    def _incremental(self, snapshot: Snapshot) -> Plan:
        history = self.obs.history
        last = snapshot.last_history_id
        new = [entry for entry in history if last is None or entry.id > last]
        if new and last is not None and new[0].id > last + 1:
            lost = _id_range(last + 1, new[0].id - 1)
            self.notes.append(f"history {lost} lost to revisionHistoryLimit between ticks (unrecoverable)")
        chain = list(snapshot.recent) or [_fingerprint(e) for e in history if last is not None and e.id <= last]
        self.state = self._carried(snapshot)
        pending = self._history(new, chain)
        self._failed_operation(_always)
        self._out_of_sync_missing(_always)
        if not new:
            self._image_only_change()
        self._note_operation()
        return self._finish(self.state, pending)

    # -- first seen, first-run backfill, backfill, new uid -------------------------------------------------

    def _full(self, base: Snapshot, emit: Callable[[datetime], bool], *, monotonic: bool = False) -> Plan:
        """Walk every entry present. The oldest ones ``emit`` rejects are folded into the baseline silently;
        from the first accepted one on, every entry is emitted."""
        history = self.obs.history
        start = next((i for i, entry in enumerate(history) if emit(entry.deployed_at)), len(history))
        chain: list[_Fingerprint] = []
        self.state = base
        for entry in history[:start]:
            self.state = _after_entry(self.state, entry, {}, monotonic=monotonic)
            chain.append(_fingerprint(entry))
        if start == len(history) and not monotonic:
            self.state = self.state.evolve(images=self._live_images())
        pending = self._history(history[start:], chain, monotonic=monotonic)
        self._failed_operation(emit, ignore_high_water=monotonic)
        self._out_of_sync_missing(emit)
        op = self.obs.operation
        if op is not None and op.completed and not self._produced_entry(op) and not emit(_finished(op)):
            # An operation from before the cut-off: part of the baseline, never to be counted later.
            self._record(last_failed_operation=format_time(op.started_at))
        self._note_operation()
        return self._finish(self.state, pending)

    # -- rule 3: history entries ---------------------------------------------------------------------------

    def _history(
        self, candidates: Sequence[HistoryEntry], chain: list[_Fingerprint], *, monotonic: bool = False
    ) -> PendingVerdict | None:
        """Emit ``candidates`` (oldest first); returns the pending verdict of the newest one if undecided."""
        if not candidates:
            return None
        newest = candidates[-1]
        prior = self.prior_pending
        verdict = self._verdict(newest)
        pending: PendingVerdict | None = None
        recorded = self.snapshot.last_history_id if self.snapshot is not None else None
        if verdict.result is None:
            if monotonic and recorded is not None and newest.id <= recorded:
                self.notes.append(f"h{newest.id}: recorded before and still undecided ({verdict.reason}): not resent")
            else:
                since = prior.since if prior is not None and prior.history_id == newest.id else self.now
                pending = PendingVerdict(history_id=newest.id, since=since)
                self.notes.append(f"pending verdict for h{newest.id}: {verdict.reason}")
        if prior is not None and prior.history_id != newest.id and any(e.id == prior.history_id for e in candidates):
            self.notes.append(f"h{prior.history_id} was pending and is superseded by h{newest.id}: SUCCESS")

        for entry in candidates:
            previous = chain[-1] if chain else None
            deployment_class = _classify(entry, previous, chain[:-1])
            chain.append(_fingerprint(entry))
            baseline: Mapping[str, str] = {}
            if entry is newest:
                if verdict.result is None:
                    break
                result, reason, images = verdict.result, verdict.reason, self._images_of_newest(entry)
                if self._settled():
                    baseline = self.policy.commit_images(self.obs.summary_images)
                elif images:
                    baseline = self.policy.commit_images(images)
            else:
                result, reason, images = Result.SUCCESS, "superseded by a newer history entry", ()
            if monotonic and recorded is not None and entry.id <= recorded:
                reason = f"{reason} (backfill: sent again)"
            self.state = _after_entry(self.state, entry, baseline, monotonic=monotonic)
            self.steps.append(
                _Step(
                    kind=DeploymentKind.HISTORY,
                    ref=f"h{entry.id}",
                    result=result,
                    deployment_class=deployment_class,
                    started_at=entry.started_at or entry.deployed_at,
                    finished_at=entry.deployed_at,
                    revisions=entry.revisions,
                    sources=entry.sources,
                    state=self.state,
                    images=images,
                    history_id=entry.id,
                    message=reason,
                )
            )
        return pending

    def _verdict(self, entry: HistoryEntry) -> _Verdict:
        """The verdict of the newest history entry; after ``verdict_timeout`` pending, it is FAILED."""
        verdict = self._health_verdict(entry)
        if verdict.result is not None:
            return verdict
        prior = self.prior_pending
        since = prior.since if prior is not None and prior.history_id == entry.id else self.now
        if self.now - since >= self.policy.verdict_timeout:
            return _Verdict(
                Result.FAILED,
                f"no health verdict within {_duration(self.policy.verdict_timeout)} "
                f"(pending since {format_time(since)}: {verdict.reason})",
            )
        return verdict

    def _health_verdict(self, entry: HistoryEntry) -> _Verdict:
        obs, op = self.obs, self.obs.operation
        entry_start = entry.started_at or entry.deployed_at
        health = obs.health_status or "no health status"
        transition = obs.health_transition_at
        if op is not None and not op.dry_run and not op.partial and op.started_at > entry_start:
            # A later full sync owns the live state now: the health no longer speaks for this entry, so it is
            # decided at once, like an entry superseded by a newer one. Waiting would let a newer sync that
            # hangs (Progressing forever, endless retries) turn this entry into a FAILED after the timeout.
            if health == "Degraded" and transition is not None and entry_start <= transition < op.started_at:
                return _Verdict(Result.FAILED, f"Degraded at {format_time(transition)}, before the next sync")
            return _Verdict(Result.SUCCESS, f"superseded by the sync started {format_time(op.started_at)} ({op.phase})")
        if obs.reconciled_at is None or obs.reconciled_at < entry.deployed_at - FRESHNESS_TOLERANCE:
            return _Verdict(None, f"status not refreshed since the sync ({health})")
        if health == "Healthy":
            # The status is fresh (reconciled after the sync), which is what the catalog's lastTransitionTime
            # clauses approximate; a Healthy computed after the sync is accepted whenever it last changed.
            return _Verdict(Result.SUCCESS, "Healthy")
        if health == "Degraded":
            if transition is None or transition >= entry_start:
                at = "" if transition is None else f" at {format_time(transition)}"
                return _Verdict(Result.FAILED, f"Degraded{at} after the sync started {format_time(entry_start)}")
            return _Verdict(
                Result.SUCCESS, f"Degraded since {format_time(transition)}, before this sync: not caused by it"
            )
        if health == "Missing":
            return _Verdict(Result.FAILED, "Missing after the sync")
        return _Verdict(None, health)

    def _images_of_newest(self, entry: HistoryEntry) -> tuple[str, ...]:
        """What the sync applied when the operation that produced the entry is still the current one, else the
        live images once the app is settled, else nothing known."""
        op = self.obs.operation
        produced = op is not None and entry.started_at is not None and op.started_at == entry.started_at
        if op is not None and produced and op.images is not None:
            return op.images
        if self._settled():
            return self.obs.summary_images
        return ()

    # -- rule 4: failed operations -------------------------------------------------------------------------

    def _failed_operation(self, emit: Callable[[datetime], bool], *, ignore_high_water: bool = False) -> None:
        op = self.obs.operation
        if op is None or not op.failed or op.finished_at is None:
            return
        key = format_time(op.started_at)
        if op.dry_run or op.partial:
            if self.state.last_failed_operation != key:
                kind = "a dry run" if op.dry_run else "a partial (selective or self-heal) sync"
                self.notes.append(f"{op.phase} sync started {key} was {kind}: not a deployment")
                self._record(last_failed_operation=key)
            return
        if (self.state.last_failed_operation == key and not ignore_high_water) or self._produced_entry(op):
            return
        if not emit(op.finished_at):
            return
        retried = f" (retried {op.retry_count} times)" if op.retry_count else ""
        message = f"sync {op.phase}{retried}" + (f": {op.message}" if op.message else "")
        self._operation_step(op, message)

    # -- rule 5: OutOfSync + Missing -----------------------------------------------------------------------

    def _out_of_sync_missing(self, emit: Callable[[datetime], bool]) -> None:
        obs, op = self.obs, self.obs.operation
        if not self.policy.failure_on_out_of_sync_missing:
            return
        if obs.sync_status != "OutOfSync" or obs.health_status != "Missing":
            return
        if op is None:
            if not obs.history:
                self.notes.append("OutOfSync and Missing but never synced: not a failure")
            return
        if not op.completed or op.dry_run or op.partial or self._produced_entry(op):
            return
        key = format_time(op.started_at)
        last = self.state.last_deployment_started_at
        if self.state.last_failed_operation == key or (last is not None and op.started_at <= last):
            return
        if not emit(_finished(op)):
            return
        self._operation_step(op, f"OutOfSync and Missing after the sync started {key} ({op.phase})")

    def _operation_step(self, op: OperationState, message: str) -> None:
        last = self.state.last_deployment_started_at
        self.state = self.state.evolve(
            last_failed_operation=format_time(op.started_at),
            last_deployment_started_at=op.started_at if last is None else max(last, op.started_at),
        )
        self.steps.append(
            _Step(
                kind=DeploymentKind.OPERATION,
                ref=f"op-{int(op.started_at.timestamp())}",
                result=Result.FAILED,
                deployment_class=DeploymentClass.FAILED_SYNC,
                started_at=op.started_at,
                finished_at=_finished(op),
                revisions=op.revisions,
                sources=op.sources,
                state=self.state,
                images=op.images or (),
                message=message,
            )
        )

    # -- rule 6: image-only change -------------------------------------------------------------------------

    def _image_only_change(self) -> None:
        if not self.policy.detect_image_only_changes or not self._settled():
            return
        current = dict(self.policy.commit_images(self.obs.summary_images))
        before = dict(self.state.images)
        if current == before:
            return
        changed = sorted(repo for repo in current.keys() & before.keys() if current[repo] != before[repo])
        if not changed:
            # Only images appearing or disappearing (init containers, sidecars, hook Jobs, a scale to zero,
            # a baseline cleared by a deployment without known images): the baseline moves, nothing deployed.
            self._record(images=current)
            return
        at, from_health = self._image_change_time()
        material = {
            "images": sorted(f"{repo}={tag}" for repo, tag in current.items()),
            "previous": sorted(f"{repo}={tag}" for repo, tag in before.items()),
            "history": self.state.last_history_id,
            "at": format_time(at) if from_health else None,
        }
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
        last_entry = self.obs.history[-1] if self.obs.history else None
        changes = ", ".join(f"{repo} {before[repo]} -> {current[repo]}" for repo in changed)
        self.state = self.state.evolve(images=current, last_deployment_started_at=at)
        self.notes.append(f"image-only change without a new history entry: {changes}")
        self.steps.append(
            _Step(
                kind=DeploymentKind.IMAGE,
                ref=f"img-{digest}",
                result=Result.SUCCESS,
                deployment_class=DeploymentClass.IMAGE_CHANGE,
                started_at=at,
                finished_at=at,
                revisions=last_entry.revisions if last_entry else (),
                sources=last_entry.sources if last_entry else self.obs.sources,
                state=self.state,
                images=self.obs.summary_images,
                message=f"images changed: {changes}",
            )
        )

    def _image_change_time(self) -> tuple[datetime, bool]:
        """When the new images went live: the health transition that settled them, when it happened after
        everything the stored snapshot already knows (its ``last_seen``, which is at or after the last
        deployment) and not in the future; else ``now``, at most one tick late. The flag says which."""
        transition = self.obs.health_transition_at
        known = [self.state.last_deployment_started_at, self.snapshot.last_seen if self.snapshot else None]
        if transition is not None and transition <= self.now and all(t is None or transition > t for t in known):
            return transition, True
        return self.now, False

    # -- helpers -------------------------------------------------------------------------------------------

    def _record(self, **changes: Any) -> None:
        self.recorded.update(changes)
        self.state = self.state.evolve(**changes)

    def _settled(self) -> bool:
        """Synced, Healthy and no operation requested or running: ``summary.images`` is the deployed state."""
        obs, op = self.obs, self.obs.operation
        in_flight = obs.operation_in_flight or (op is not None and not op.completed)
        return obs.sync_status == "Synced" and obs.health_status == "Healthy" and not in_flight

    def _produced_entry(self, op: OperationState) -> bool:
        return any(entry.started_at == op.started_at for entry in self.obs.history)

    def _live_images(self) -> dict[str, str]:
        """The image baseline of an app recorded without a deployment."""
        if self._settled():
            return dict(self.policy.commit_images(self.obs.summary_images))
        op, history = self.obs.operation, self.obs.history
        if op is not None and op.images is not None and history and history[-1].started_at == op.started_at:
            return dict(self.policy.commit_images(op.images))
        return {}

    def _since_filter(self) -> Callable[[datetime], bool]:
        since = self.policy.since
        if since is None:
            return _always
        self.notes.append(f"backfill since {format_time(since)}")
        return lambda at: at >= since

    def _fresh(self, previous: Snapshot | None) -> Snapshot:
        """An empty snapshot for this uid; only ``commits`` (the reconciler's) survives from ``previous``."""
        commits = dict(previous.commits) if previous is not None else {}
        return Snapshot(uid=self.obs.uid, last_seen=self.now, commits=commits)

    def _carried(self, snapshot: Snapshot) -> Snapshot:
        return snapshot.evolve(last_seen=self.now, deleting_since=None)

    def _baseline(self, previous: Snapshot | None) -> Snapshot:
        """The app's current state, recorded without emitting anything."""
        state = self._fresh(previous)
        for entry in self.obs.history:
            state = _after_entry(state, entry, {}, monotonic=False)
        state = state.evolve(images=self._live_images())
        op = self.obs.operation
        if op is not None and op.completed and not self._produced_entry(op):
            state = state.evolve(last_failed_operation=format_time(op.started_at))
        return state

    def _note_operation(self) -> None:
        op = self.obs.operation
        if op is None or op.completed:
            return
        started = format_time(op.started_at)
        if op.finished_at is not None:
            detail = f": {op.message}" if op.message else ""
            self.notes.append(f"sync started {started} is retrying (retry {op.retry_count}), not final yet{detail}")
        else:
            self.notes.append(f"sync started {started} in progress ({op.phase})")

    def _finish(self, state: Snapshot, pending: PendingVerdict | None) -> Plan:
        deployments = tuple(
            Deployment(
                key=self.obs.key,
                uid=self.obs.uid,
                kind=step.kind,
                ref=step.ref,
                result=step.result,
                deployment_class=step.deployment_class,
                started_at=step.started_at,
                finished_at=step.finished_at,
                revisions=step.revisions,
                sources=step.sources,
                snapshot_after=step.state.evolve(pending=pending, **self.recorded),
                images=step.images,
                history_id=step.history_id,
                message=step.message,
            )
            for step in self.steps
        )
        if not deployments:
            return self._quiet(state.evolve(pending=pending))
        return Plan(deployments=deployments, snapshot=state.evolve(pending=pending), notes=tuple(self.notes))

    def _quiet(self, final: Snapshot) -> Plan:
        """A plan without deployments. When only ``last_seen`` would change, the stored snapshot is returned
        as it is, so that a quiet tick writes nothing."""
        previous = self.snapshot
        if previous is not None and final.evolve(last_seen=previous.last_seen) == previous:
            final = previous
        return Plan(deployments=(), snapshot=final, notes=tuple(self.notes))


def _stale(finished_at: datetime, obs: AppObservation) -> bool:
    """The notifications controller's gate: health and sync predate the operation's end."""
    return obs.reconciled_at is None or finished_at > obs.reconciled_at


def _finished(op: OperationState) -> datetime:
    return op.finished_at or op.started_at


# -- pure helpers ------------------------------------------------------------------------------------------


def _fingerprint(entry: HistoryEntry) -> _Fingerprint:
    return (entry.revisions, entry.source_fingerprint)


def _classify(entry: HistoryEntry, previous: _Fingerprint | None, older: Sequence[_Fingerprint]) -> DeploymentClass:
    """Against the entry before it: new revision, config-only, redeploy or rollback."""
    if previous is None:
        return DeploymentClass.INITIAL if entry.id == 0 else DeploymentClass.NEW_REVISION
    current = _fingerprint(entry)
    if current == previous:
        return DeploymentClass.REDEPLOY
    if current in older:
        return DeploymentClass.ROLLBACK
    if entry.revisions != previous[0]:
        if entry.revisions and any(revisions == entry.revisions for revisions, _ in older):
            return DeploymentClass.ROLLBACK
        return DeploymentClass.NEW_REVISION
    return DeploymentClass.CONFIG_ONLY


def _after_entry(state: Snapshot, entry: HistoryEntry, images: Mapping[str, str], *, monotonic: bool) -> Snapshot:
    """The snapshot once ``entry`` is delivered (or folded into a baseline).

    ``images`` is the new image baseline: the live commit-tagged images when the app is settled, else what
    the deployment applied, else empty. Empty means unknown: the deployment changed the live images to
    something not seen yet, and the next settled tick re-reads them instead of mistaking the deployment for
    an image-only change.
    """
    if monotonic and state.last_history_id is not None and entry.id <= state.last_history_id:
        return state
    recent = (*state.recent, _fingerprint(entry))[-RECENT_ENTRIES_KEPT:]
    pending = state.pending if state.pending is not None and state.pending.history_id > entry.id else None
    return state.evolve(
        last_history_id=entry.id,
        recent=recent,
        images=dict(images),
        last_deployment_started_at=entry.started_at or entry.deployed_at,
        pending=pending,
    )


def _id_range(first: int, last: int) -> str:
    return f"id {first}" if first == last else f"ids {first}-{last}"


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"
