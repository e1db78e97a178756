"""The pure decision: what did one Application deploy since its last snapshot, and was it a success?

``plan(observation, snapshot, now, policy)`` applies ``docs/design.md`` §3 in order and returns the deployments to
deliver, oldest first, each carrying the snapshot to store once it has been delivered. No I/O and no clock:
the only time is ``now``.

Snapshot invariants the reconciler relies on (so that a crash or a failed delivery never loses a deployment
and never sends one twice):

* ``last_history_id`` only moves past an entry once that entry's deployment is delivered. A history entry
  whose health verdict is still open (``pending``) is *not* emitted and ``last_history_id`` stays below it, so
  the entry is "new" again on every tick until it is decided. Every ``snapshot_after`` of a plan carries the
  plan's pending verdict (and ``pending_entry``, what is needed to emit it once it leaves ``status.history``),
  and the last one equals ``Plan.snapshot``.
* ``decided`` holds verdicts decided and not delivered yet. ``Plan.decided_snapshot`` is the snapshot the plan
  starts from plus every verdict it decides, ``last_history_id`` not advanced: stored before (or whenever)
  delivery stops short, a re-plan delivers the same ids with the same verdicts, whatever the live status says
  by then. Each ``snapshot_after`` keeps the verdicts of the deployments after it.
* ``covered_until`` is the newest ``deployedAt`` recorded: an entry deployed at or before it is never emitted
  again by a history restart or a new uid; ``history_restarts`` says which ref form this uid's entries take.
* ``last_failed_operation`` is the key space of operation deployments (``op-<startedAt>``): rules 4 and 5
  both check and advance it, so one operation is never counted twice. A baseline, a failed dry run and a
  failed partial sync also record their operation there, so they are never reconsidered.
* ``images`` is the planner's own baseline for image-only changes: the commit-tagged images (repository ->
  tag) of the live state when the app was last settled, else of what the last deployment applied, else
  empty (unknown: re-read at the next settled tick without emitting anything). It never goes back to a tag
  the last deployment replaced.
* ``commits`` belongs to the reconciler: carried forward untouched.
* ``last_seen`` is when the snapshot last changed: when nothing else would change, the input snapshot is
  returned as is, so a quiet tick writes nothing to the store.

Choices ``docs/design.md`` §3 leaves open:

* Health verdicts need a fresh status (``reconciledAt`` at or after ``deployedAt``, 1 s tolerance). Once fresh,
  ``Healthy`` is accepted whatever ``lastTransitionTime`` says: freshness is what the catalog's time clauses
  approximate. ``Degraded`` that began before the sync started is not this deployment's failure (SUCCESS);
  nor is ``Progressing`` or ``Suspended`` that began before it, unless a sync whose rollout was never seen to
  end had started by then. ``Missing`` after a sync is FAILED whatever its transition time.
* A later full sync (not partial, not a dry run) owns the live health: while it runs the newest entry stays
  pending; when it failed, the entry is settled (FAILED if it went Degraded before that sync started, else
  SUCCESS), like an entry superseded by a newer entry.
* The verdict timeout counts from the first tick that saw the entry pending (``PendingVerdict.since``).
* Failed dry runs and failed partial (selective, self-heal) syncs are not deployments (rule 4 and 5 skip them).
* Image-only changes (rule 6) need a tag change of an image repository already in the baseline; images that
  only appear or disappear (init containers, sidecars, hook Jobs, scale to zero) move the baseline silently,
  and a repository showing two tags is a rollout in flight, left out of the comparison. Its ref hashes the
  new image set with the previous set, the last history id, the settling health transition and the previous
  image-only ref, so every occurrence of a change has its own id.
* Backfills and first sights also emit the failed operation present in the status (same cut-off rule:
  its ``finishedAt``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from reconciler.config import ImagesConfig
from reconciler.images import commit_images
from reconciler.model import (
    RECENT_ENTRIES_KEPT,
    AppObservation,
    DecidedVerdict,
    Deployment,
    DeploymentClass,
    DeploymentKind,
    EntryRecord,
    HistoryEntry,
    OperationState,
    PendingVerdict,
    Result,
    Snapshot,
    SourceRef,
    format_time,
)

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "Plan",
    "PlannerPolicy",
    "initialization_cutoff",
    "newest_argocd_time",
    "plan",
]

FRESHNESS_TOLERANCE = timedelta(seconds=1)
"""``deployedAt`` and ``finishedAt`` differ by up to a second; both have one-second precision."""
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=15)
"""How far the reconciler's clock may be ahead of Argo CD's when a cluster is initialised with no Application
to read Argo CD's time from."""

_Fingerprint = tuple[tuple[str, ...], str]


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
    return _Planner(observation, snapshot, now, policy).run()


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


@dataclass(frozen=True)
class _Verdict:
    result: Result | None
    """``None``: not decided yet (pending)."""
    reason: str
    observed: bool = True
    """The verdict comes from the app's health after the sync (its rollout was seen to end or to fail)."""


@dataclass(frozen=True)
class _Candidate:
    """A history entry to emit: from ``status.history``, or kept by the snapshot after it left it."""

    entry: HistoryEntry
    ref: str
    uid: str
    record: EntryRecord | None = None
    """What the input snapshot kept of this entry (it was pending, or decided and not delivered)."""
    decided: DecidedVerdict | None = None
    advances: bool = True
    """It belongs to the current history: delivering it moves the high-water mark. Entries of an earlier
    generation (before a history restart) or of an earlier uid do not."""


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
    uid: str
    images: tuple[str, ...] = ()
    history_id: int | None = None
    message: str = ""
    decided: DecidedVerdict | None = None
    """The verdict to keep until this deployment is delivered."""


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
        self.start: Snapshot | None = None
        """The state before the first step: what ``Plan.decided_snapshot`` is built on."""
        self.recorded: dict[str, Any] = {}
        """Facts learnt without a deployment; true whatever gets delivered, so every snapshot gets them."""
        self.prior_pending: PendingVerdict | None = None
        self.pending_entry: EntryRecord | None = None
        self.records: tuple[EntryRecord, ...] = ()
        """Entries the input snapshot kept and that are not delivered yet (pending or decided): each is emitted
        by this plan, with its visible entry or on its own."""
        self._live: dict[str, frozenset[str]] | None = None
        self.replaced: Mapping[str, str] = {}
        """The image baseline before the history entries of this plan: the tags their deployments replaced."""

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
        self.records = _undelivered(snapshot)
        if not same_app:
            return self._new_uid(snapshot)
        self.prior_pending = snapshot.pending
        if policy.backfill:
            self.notes.append("backfill: emitting every history entry present again")
            return self._full(self._carried(snapshot), self._since_filter(), monotonic=True, records_advance=True)
        restart = self._restart(snapshot)
        if restart is not None:
            self.notes.append(restart)
            self.prior_pending = None
            return self._restarted(snapshot)
        return self._incremental(snapshot)

    # -- the regular tick ----------------------------------------------------------------------------------

    def _incremental(self, snapshot: Snapshot) -> Plan:
        history = self.obs.history
        last = snapshot.last_history_id
        new = [entry for entry in history if last is None or entry.id > last]
        self.state = self._carried(snapshot)
        candidates = self._candidates(new, records_advance=True)
        kept_ids = {c.entry.id for c in candidates if c.record is not None}
        if new and last is not None and new[0].id > last + 1:
            first, final = last + 1, new[0].id - 1
            kept = sorted(i for i in kept_ids if first <= i <= final)
            if len(kept) < final - first + 1:
                also = f" (kept by the snapshot: {', '.join(f'h{i}' for i in kept)})" if kept else ""
                self.notes.append(
                    f"history {_id_range(first, final)} lost to revisionHistoryLimit between ticks (unrecoverable)"
                    + also
                )
        chain = list(snapshot.recent) or [_fingerprint(e) for e in history if last is not None and e.id <= last]
        pending = self._history(candidates, chain)
        self._failed_operation(_always)
        self._out_of_sync_missing(_always)
        if not candidates:
            self._image_only_change()
        self._note_operation()
        return self._finish(self.state, pending)

    # -- first seen, first-run backfill, backfill, new uid, history restart --------------------------------

    def _full(
        self,
        base: Snapshot,
        emit: Callable[[datetime], bool],
        *,
        monotonic: bool = False,
        accept: Callable[[HistoryEntry], bool] | None = None,
        records_advance: bool = False,
    ) -> Plan:
        """Walk every entry present. The oldest ones ``accept`` (default: ``emit`` of their ``deployedAt``) rejects
        are folded into the baseline silently; from the first accepted one on, every entry is emitted."""
        history = self.obs.history
        accepted = accept or (lambda entry: emit(entry.deployed_at))
        start = next((i for i, entry in enumerate(history) if accepted(entry)), len(history))
        chain: list[_Fingerprint] = [] if not monotonic else list(base.recent)
        self.state = base
        for entry in history[:start]:
            self.state = _after_entry(self.state, entry, {}, monotonic=monotonic)
            if not monotonic:
                chain.append(_fingerprint(entry))
        if start and not monotonic:
            self.state = self.state.evolve(rollout_since=self._baseline_rollout(history[start - 1]))
        if start == len(history) and not monotonic:
            self.state = self.state.evolve(images=self._live_images())
        candidates = self._candidates(history[start:], records_advance=records_advance)
        pending = self._history(candidates, chain, monotonic=monotonic)
        self._failed_operation(emit, ignore_high_water=monotonic)
        self._out_of_sync_missing(emit)
        op = self.obs.operation
        if op is not None and op.completed and not self._produced_entry(op) and not emit(_finished(op)):
            # An operation from before the cut-off: part of the baseline, never to be counted later.
            self._record(last_failed_operation=format_time(op.started_at))
        self._note_operation()
        return self._finish(self.state, pending)

    def _new_uid(self, previous: Snapshot) -> Plan:
        """A new uid under a known name: a new Application, or the same one deleted and re-applied (from an
        export or a backup: Application has no status subresource, so its history comes back with it). Entries
        the previous snapshot already covered are not new either way."""
        obs = self.obs
        base = self._fresh(previous)
        op = obs.operation
        if op is not None and previous.last_failed_operation == format_time(op.started_at):
            base = base.evolve(last_failed_operation=previous.last_failed_operation)
        covered = [entry for entry in obs.history if _covered(previous, entry)]
        if covered:
            self.notes.append(
                f"new uid {obs.uid} (was {previous.uid}): entries up to h{covered[-1].id} were recorded under the old "
                f"uid (a re-applied Application); only later entries are new"
            )
        else:
            self.notes.append(f"new uid {obs.uid} (was {previous.uid}): a new Application, all its history is new")
        if self.policy.backfill:
            since = self._since_filter()
            return self._full(base, since, accept=lambda e: since(e.deployed_at) and not _covered(previous, e))
        return self._full(base, _always, accept=lambda entry: not _covered(previous, entry))

    def _restart(self, snapshot: Snapshot) -> str | None:
        """Why the history ids restarted under this uid, or ``None``. Ids restart at 0 when the history is
        emptied; seen from the snapshot, an entry at or below the recorded id that is not covered by it (deployed
        later than anything recorded) is from a new generation, however many syncs happened since."""
        history, last = self.obs.history, snapshot.last_history_id
        if not history or last is None:
            return None
        if history[-1].id < last:
            return f"history ids restarted (newest id {history[-1].id} < last recorded {last}): the entries are new"
        later = next((entry for entry in history if entry.id <= last and not _covered(snapshot, entry)), None)
        if later is None:
            return None
        return (
            f"history ids restarted (h{later.id} deployed {format_time(later.deployed_at)}, after everything recorded "
            f"up to h{last}): the entries are new"
        )

    def _restarted(self, snapshot: Snapshot) -> Plan:
        base = self._fresh(snapshot).evolve(
            history_restarts=snapshot.history_restarts + 1,
            covered_until=snapshot.covered_until,
            last_failed_operation=snapshot.last_failed_operation,
            last_deployment_started_at=snapshot.last_deployment_started_at,
            last_image_change=snapshot.last_image_change,
            rollout_since=snapshot.rollout_since,
        )
        return self._full(base, _always, accept=lambda entry: not _covered(snapshot, entry))

    # -- rule 3: history entries ---------------------------------------------------------------------------

    def _candidates(self, visible: Sequence[HistoryEntry], *, records_advance: bool) -> list[_Candidate]:
        """``visible`` as candidates, preceded by what the snapshot kept of entries no longer visible."""
        decided = {_record_key(d.entry): d for d in (self.snapshot.decided if self.snapshot and self.records else ())}
        matched: set[tuple[str, int, datetime]] = set()
        shown: list[_Candidate] = []
        for entry in visible:
            record = next((r for r in self.records if r.same_entry(entry)), None)
            if record is not None:
                matched.add(_record_key(record))
            shown.append(
                _Candidate(
                    entry,
                    self._ref(entry),
                    self.obs.uid,
                    record,
                    decided.get(_record_key(record)) if record is not None else None,
                )
            )
        gone: list[_Candidate] = []
        for record in self.records:
            if _record_key(record) in matched:
                continue
            advances = records_advance and record.uid == self.obs.uid
            gone.append(
                _Candidate(
                    record.history_entry(),
                    record.ref,
                    record.uid,
                    record,
                    decided.get(_record_key(record)),
                    advances=advances,
                )
            )
            self.notes.append(
                f"{record.ref} is not delivered yet and is no longer among the entries to emit: emitted as the "
                "snapshot kept it" + ("" if record.uid == self.obs.uid else f" (uid {record.uid})")
            )
        gone.sort(key=lambda c: c.entry.deployed_at)
        return [*gone, *shown]

    def _history(
        self, candidates: Sequence[_Candidate], chain: list[_Fingerprint], *, monotonic: bool = False
    ) -> PendingVerdict | None:
        """Emit ``candidates`` (oldest first); returns the pending verdict of the newest one if undecided."""
        if not candidates:
            return None
        newest = candidates[-1]
        prior = self.prior_pending
        self.replaced = dict(self.state.images)
        unobserved = _earliest(
            [self.state.rollout_since, *(_start(c.entry) for c in candidates[:-1])],
        )
        if newest.decided is not None:
            verdict = _Verdict(newest.decided.result, newest.decided.reason)
            before = newest.decided
            self.notes.append(f"{newest.ref}: {before.result.value} as decided before ({before.reason})")
        else:
            verdict = self._verdict(newest.entry, unobserved)
        pending: PendingVerdict | None = None
        recorded = self.snapshot.last_history_id if self.snapshot is not None else None
        if verdict.result is None:
            if monotonic and recorded is not None and newest.entry.id <= recorded:
                self.notes.append(f"{newest.ref}: recorded before and still undecided ({verdict.reason}): not resent")
            else:
                since = self._pending_since(newest.entry)
                pending = PendingVerdict(history_id=newest.entry.id, since=since)
                self.pending_entry = _record(newest, self._images_of(newest))
                self.notes.append(f"pending verdict for {newest.ref}: {verdict.reason}")
        if (
            prior is not None
            and prior.history_id != newest.entry.id
            and any(c.entry.id == prior.history_id for c in candidates)
        ):
            self.notes.append(f"h{prior.history_id} was pending and is superseded by {newest.ref}: SUCCESS")

        old_chain = list(self.snapshot.recent) if self.snapshot is not None else []
        for candidate in candidates:
            entry = candidate.entry
            if candidate.advances:
                previous = chain[-1] if chain else None
                deployment_class = _classify(entry, previous, chain[:-1])
                chain.append(_fingerprint(entry))
            else:
                deployment_class = _classify(entry, old_chain[-1] if old_chain else None, old_chain[:-1])
            baseline: Mapping[str, str] = {}
            if candidate is newest:
                if verdict.result is None:
                    break
                result, reason, observed = verdict.result, verdict.reason, verdict.observed
                images = self._images_of(candidate)
                baseline = self._baseline_after(candidate)
            else:
                observed = False
                images = candidate.record.images if candidate.record is not None else ()
                if candidate.decided is not None:
                    result, reason = candidate.decided.result, candidate.decided.reason
                else:
                    result, reason = Result.SUCCESS, "superseded by a newer history entry"
            resent = monotonic and recorded is not None and entry.id <= recorded and candidate.advances
            if resent:
                reason = f"{reason} (backfill: sent again)"
            self._begin()
            if candidate.advances:
                kept = candidate.record is not None
                self.state = _after_entry(self.state, entry, baseline, monotonic=monotonic or kept)
                rollout = None if observed else _earliest([self.state.rollout_since, _start(entry)])
                self.state = self.state.evolve(rollout_since=rollout)
            decided = None if resent else DecidedVerdict(_record(candidate, images), result, reason)
            self.steps.append(
                _Step(
                    kind=DeploymentKind.HISTORY,
                    ref=candidate.ref,
                    result=result,
                    deployment_class=deployment_class,
                    started_at=_start(entry),
                    finished_at=entry.deployed_at,
                    revisions=entry.revisions,
                    sources=entry.sources,
                    state=self.state,
                    uid=candidate.uid,
                    images=images,
                    history_id=entry.id,
                    message=reason,
                    decided=decided,
                )
            )
        return pending

    def _verdict(self, entry: HistoryEntry, unobserved: datetime | None) -> _Verdict:
        """The verdict of the newest history entry; after ``verdict_timeout`` pending, it is FAILED."""
        verdict = self._health_verdict(entry, unobserved)
        if verdict.result is not None:
            return verdict
        since = self._pending_since(entry)
        if self.now - since >= self.policy.verdict_timeout:
            return _Verdict(
                Result.FAILED,
                f"no health verdict within {_duration(self.policy.verdict_timeout)} "
                f"(pending since {format_time(since)}: {verdict.reason})",
            )
        return verdict

    def _pending_since(self, entry: HistoryEntry) -> datetime:
        prior, record = self.prior_pending, self.snapshot.pending_entry if self.snapshot is not None else None
        if prior is None or prior.history_id != entry.id:
            return self.now
        if record is not None and record.id == entry.id and record.deployed_at != entry.deployed_at:
            return self.now
        return prior.since

    def _health_verdict(self, entry: HistoryEntry, unobserved: datetime | None) -> _Verdict:
        obs, op = self.obs, self.obs.operation
        entry_start = _start(entry)
        health = obs.health_status or "no health status"
        transition = obs.health_transition_at
        if op is not None and not op.dry_run and not op.partial and op.started_at > entry_start:
            # A later full sync owns the live state now: the health no longer speaks for this entry, so it is
            # decided at once, like an entry superseded by a newer one. Waiting would let a newer sync that
            # hangs (Progressing forever, endless retries) turn this entry into a FAILED after the timeout.
            if health == "Degraded" and transition is not None and entry_start <= transition < op.started_at:
                return _Verdict(Result.FAILED, f"Degraded at {format_time(transition)}, before the next sync")
            return _Verdict(
                Result.SUCCESS,
                f"superseded by the sync started {format_time(op.started_at)} ({op.phase})",
                observed=False,
            )
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
        if health in ("Progressing", "Suspended") and transition is not None and transition < entry_start:
            # A paused Rollout or CronJob, a KEDA-scaled object, a LoadBalancer that never gets an address: the
            # state predates the sync, which did not change it. Unless an earlier sync whose rollout was never seen
            # to end had started by then: this sync's rollout may be continuing that one's, so wait for it.
            if unobserved is None or transition < unobserved:
                return _Verdict(
                    Result.SUCCESS, f"{health} since {format_time(transition)}, before this sync: not caused by it"
                )
            return _Verdict(
                None,
                f"{health} since {format_time(transition)}, during the rollout of the sync started "
                f"{format_time(unobserved)}",
            )
        return _Verdict(None, health)

    def _images_of(self, candidate: _Candidate) -> tuple[str, ...]:
        """The images a history deployment carries: what its sync applied when known (kept with the entry, or the
        operation that produced it is still the current one), else the live images once the app is settled."""
        if candidate.record is not None and candidate.record.images:
            return candidate.record.images
        if not candidate.advances:
            return ()
        applied = self._applied(candidate.entry)
        if applied is not None:
            return applied
        if self._settled():
            return self._live_refs(self.replaced)
        return ()

    def _applied(self, entry: HistoryEntry) -> tuple[str, ...] | None:
        """``syncResult.resources[].images`` when the operation in the status is the one that produced ``entry``."""
        op = self.obs.operation
        if op is not None and entry.started_at is not None and op.started_at == entry.started_at:
            return op.images
        return None

    def _baseline_after(self, candidate: _Candidate) -> dict[str, str]:
        """The image baseline once the newest entry is delivered: the live images when the app is settled, else
        what the sync applied. A repository showing two tags live (old pods still terminating) gets the tag the
        sync applied, else the one that is not the tag the deployment replaced: never the replaced one."""
        if not candidate.advances:
            return dict(self.state.images)
        applied = candidate.record.images if candidate.record is not None and candidate.record.images else None
        applied = applied or self._applied(candidate.entry)
        applied_tags = dict(self.policy.commit_images(applied)) if applied else {}
        if self._settled():
            return self._live_baseline(self.replaced, prefer=applied_tags)
        return applied_tags

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
        self._begin()
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
                uid=self.obs.uid,
                images=op.images or (),
                message=message,
            )
        )

    # -- rule 6: image-only change -------------------------------------------------------------------------

    def _image_only_change(self) -> None:
        if not self.policy.detect_image_only_changes or not self._settled():
            return
        live = self._live_tags()
        before = dict(self.state.images)
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
            self._record(images=current)
            return
        at, from_health = self._image_change_time()
        material: dict[str, Any] = {
            "images": sorted(f"{repo}={tag}" for repo, tag in current.items()),
            "previous": sorted(f"{repo}={tag}" for repo, tag in before.items()),
            "history": self.state.last_history_id,
            "at": format_time(at) if from_health else None,
        }
        if self.state.last_image_change is not None:
            # Chains each image-only change to the one before it: A -> B, B -> A, A -> B again get three ids even
            # without a health transition time to tell them apart. Left out of the very first one, so that ids
            # planned before the chain existed stay what they were.
            material["after"] = self.state.last_image_change
        digest = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:12]
        ref = f"img-{digest}"
        last_entry = self.obs.history[-1] if self.obs.history else None
        changes = ", ".join(f"{repo} {before[repo]} -> {current[repo]}" for repo in changed)
        self._begin()
        self.state = self.state.evolve(
            images=current, last_deployment_started_at=at, last_image_change=ref, rollout_since=None
        )
        self.notes.append(f"image-only change without a new history entry: {changes}")
        if rolling:
            self.notes.append(f"rollout in flight (two tags live), left out: {', '.join(rolling)}")
        self.steps.append(
            _Step(
                kind=DeploymentKind.IMAGE,
                ref=ref,
                result=Result.SUCCESS,
                deployment_class=DeploymentClass.IMAGE_CHANGE,
                started_at=at,
                finished_at=at,
                revisions=last_entry.revisions if last_entry else (),
                sources=last_entry.sources if last_entry else self.obs.sources,
                state=self.state,
                uid=self.obs.uid,
                images=self._live_refs(before, leave_out=set(rolling)),
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

    # -- live images ---------------------------------------------------------------------------------------

    def _live_tags(self) -> dict[str, frozenset[str]]:
        """``status.summary.images`` as image repository -> every commit tag live (two during a rollout)."""
        if self._live is None:
            tags: dict[str, set[str]] = {}
            for ref in self.obs.summary_images:
                for repository, tag in self.policy.commit_images([ref]).items():
                    tags.setdefault(repository, set()).add(tag)
            self._live = {repository: frozenset(found) for repository, found in tags.items()}
        return self._live

    def _live_baseline(self, previous: Mapping[str, str], prefer: Mapping[str, str] | None = None) -> dict[str, str]:
        """One tag per live repository: the only one; of two or more (a rollout's old pods still terminating), the
        one ``prefer`` names (what a sync applied), else the one left once ``previous`` (the tag the last deployment
        replaced) is set aside. A repository still ambiguous is left out: unknown, re-read at a later tick."""
        baseline: dict[str, str] = {}
        for repository, tags in self._live_tags().items():
            preferred = (prefer or {}).get(repository)
            if len(tags) > 1 and preferred in tags:
                baseline[repository] = preferred
                continue
            remaining = tags - {previous.get(repository)} if len(tags) > 1 else tags
            if len(remaining) == 1:
                baseline[repository] = next(iter(remaining))
        return baseline

    def _live_refs(self, previous: Mapping[str, str], leave_out: Iterable[str] = ()) -> tuple[str, ...]:
        """``status.summary.images`` without the references of a rollout's old pods: in a repository showing two
        tags, the tag ``previous`` had; and without the repositories in ``leave_out``."""
        live, skip = self._live_tags(), set(leave_out)
        refs: list[str] = []
        for ref in self.obs.summary_images:
            tagged = self.policy.commit_images([ref])
            if any(
                repository in skip or (len(live.get(repository, ())) > 1 and previous.get(repository) == tag)
                for repository, tag in tagged.items()
            ):
                continue
            refs.append(ref)
        return tuple(refs)

    def _live_images(self) -> dict[str, str]:
        """The image baseline of an app recorded without a deployment."""
        if self._settled():
            return self._live_baseline(self.state.images)
        op, history = self.obs.operation, self.obs.history
        if op is not None and op.images is not None and history and history[-1].started_at == op.started_at:
            return dict(self.policy.commit_images(op.images))
        return {}

    # -- helpers -------------------------------------------------------------------------------------------

    def _ref(self, entry: HistoryEntry) -> str:
        """``h<id>``; once this uid's history ids restarted, ``h<id>-<deployedAt epoch>``, unique across restarts."""
        if self.state.history_restarts:
            return f"h{entry.id}-{int(entry.deployed_at.timestamp())}"
        return f"h{entry.id}"

    def _begin(self) -> None:
        if self.start is None:
            self.start = self.state

    def _record(self, **changes: Any) -> None:
        self.recorded.update(changes)
        self.state = self.state.evolve(**changes)

    def _settled(self) -> bool:
        """Synced, Healthy and no operation requested or running: ``summary.images`` is the deployed state."""
        obs = self.obs
        return obs.sync_status == "Synced" and obs.health_status == "Healthy" and not self._in_flight()

    def _in_flight(self) -> bool:
        op = self.obs.operation
        return self.obs.operation_in_flight or (op is not None and not op.completed)

    def _baseline_rollout(self, newest: HistoryEntry) -> datetime | None:
        """``rollout_since`` of a baseline whose newest entry is ``newest``: unknown unless the app is Healthy."""
        if self.obs.health_status == "Healthy" and not self._in_flight():
            return None
        return _start(newest)

    def _produced_entry(self, op: OperationState) -> bool:
        return any(entry.started_at == op.started_at for entry in self.obs.history)

    def _since_filter(self) -> Callable[[datetime], bool]:
        since = self.policy.since
        if since is None:
            return _always
        self.notes.append(f"backfill since {format_time(since)}")
        return lambda at: at >= since

    def _fresh(self, previous: Snapshot | None) -> Snapshot:
        """An empty snapshot for this uid; ``commits`` (the reconciler's) and ``covered_until`` survive."""
        if previous is None:
            return Snapshot(uid=self.obs.uid, last_seen=self.now)
        return Snapshot(
            uid=self.obs.uid, last_seen=self.now, commits=dict(previous.commits), covered_until=previous.covered_until
        )

    def _carried(self, snapshot: Snapshot) -> Snapshot:
        return snapshot.evolve(last_seen=self.now, deleting_since=None)

    def _baseline(self, previous: Snapshot | None) -> Snapshot:
        """The app's current state, recorded without emitting anything."""
        state = self._fresh(previous)
        for entry in self.obs.history:
            state = _after_entry(state, entry, {}, monotonic=False)
        self.state = state
        rollout = self._baseline_rollout(self.obs.history[-1]) if self.obs.history else None
        state = state.evolve(images=self._live_images(), rollout_since=rollout)
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
        pending_entry = self.pending_entry if pending is not None else None
        decided = [(index, step.decided) for index, step in enumerate(self.steps) if step.decided is not None]

        def after(index: int, step: _Step) -> Snapshot:
            later = tuple(verdict for position, verdict in decided if position > index)
            return step.state.evolve(pending=pending, pending_entry=pending_entry, decided=later, **self.recorded)

        deployments = tuple(
            Deployment(
                key=self.obs.key,
                uid=step.uid,
                kind=step.kind,
                ref=step.ref,
                result=step.result,
                deployment_class=step.deployment_class,
                started_at=step.started_at,
                finished_at=step.finished_at,
                revisions=step.revisions,
                sources=step.sources,
                snapshot_after=after(index, step),
                images=step.images,
                history_id=step.history_id,
                message=step.message,
            )
            for index, step in enumerate(self.steps)
        )
        final = state.evolve(pending=pending, pending_entry=pending_entry, decided=())
        if not deployments:
            return self._quiet(final)
        decided_snapshot = None
        if decided and self.start is not None:
            start = self.start
            if self.snapshot is not None and start.uid == self.snapshot.uid:
                # Nothing was learnt of the live state yet: the stored ``last_seen`` still says what it knew when.
                start = start.evolve(last_seen=self.snapshot.last_seen)
            decided_snapshot = start.evolve(
                pending=pending,
                pending_entry=pending_entry,
                decided=tuple(verdict for _, verdict in decided),
                **self.recorded,
            )
        return Plan(
            deployments=deployments,
            snapshot=final,
            notes=tuple(self.notes),
            decided_snapshot=decided_snapshot,
        )

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


def _start(entry: HistoryEntry) -> datetime:
    return entry.started_at or entry.deployed_at


def _earliest(times: Iterable[datetime | None]) -> datetime | None:
    return min((t for t in times if t is not None), default=None)


def _covered(snapshot: Snapshot, entry: HistoryEntry) -> bool:
    """Whether ``snapshot`` already recorded ``entry`` (or a later one): deployed at or before ``covered_until``.
    A snapshot written before ``covered_until`` existed answers with its last deployment's start instead."""
    if snapshot.covered_until is not None:
        return entry.deployed_at <= snapshot.covered_until
    if snapshot.last_deployment_started_at is not None and snapshot.last_history_id is not None:
        return _start(entry) <= snapshot.last_deployment_started_at
    return False


def _undelivered(snapshot: Snapshot) -> tuple[EntryRecord, ...]:
    """The entries ``snapshot`` kept and has not delivered: its pending entry and its decided verdicts."""
    records = [verdict.entry for verdict in snapshot.decided]
    pending, entry = snapshot.pending, snapshot.pending_entry
    if pending is not None and entry is not None and entry.id == pending.history_id:
        records.append(entry)
    return tuple(records)


def _record_key(record: EntryRecord) -> tuple[str, int, datetime]:
    return (record.uid, record.id, record.deployed_at)


def _record(candidate: _Candidate, images: Sequence[str]) -> EntryRecord:
    entry = candidate.entry
    return EntryRecord(
        uid=candidate.uid,
        ref=candidate.ref,
        id=entry.id,
        revisions=entry.revisions,
        deployed_at=entry.deployed_at,
        started_at=entry.started_at,
        sources=entry.sources,
        source_fingerprint=entry.source_fingerprint,
        images=tuple(images),
    )


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
    covered = entry.deployed_at if state.covered_until is None else max(state.covered_until, entry.deployed_at)
    return state.evolve(
        last_history_id=entry.id,
        recent=recent,
        images=dict(images),
        last_deployment_started_at=_start(entry),
        pending=pending,
        covered_until=covered,
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
