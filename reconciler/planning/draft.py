"""The plan being built for one Application: what it reads, the steps emitted so far, and the snapshot after them.

Every rule reads and extends one ``Draft``; ``reconciler.planner`` turns it into a ``Plan``.

Snapshot invariants the reconciler relies on (so that a crash or a failed delivery never loses a deployment
and never sends one twice), kept by every rule:

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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from reconciler.model import (
    RECENT_ENTRIES_KEPT,
    AppObservation,
    DecidedVerdict,
    DeploymentClass,
    DeploymentKind,
    EntryRecord,
    HistoryEntry,
    OperationState,
    PendingVerdict,
    Result,
    Snapshot,
    SourceRef,
)
from reconciler.planning.health import entry_start
from reconciler.planning.live_images import CommitImages, LiveImages

Fingerprint = tuple[tuple[str, ...], str]
"""What tells history entries apart for classification: their revisions and source fingerprint."""


@dataclass(frozen=True)
class Step:
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


class Draft:
    """One ``plan()`` call. ``state`` is the snapshot as it would be after the steps emitted so far."""

    def __init__(
        self,
        observation: AppObservation,
        snapshot: Snapshot | None,
        now: datetime,
        *,
        commit_images: CommitImages,
        verdict_timeout: timedelta,
    ) -> None:
        self.obs = observation
        self.snapshot = snapshot
        self.now = now
        self.commit_images = commit_images
        self.verdict_timeout = verdict_timeout
        self.live = LiveImages(observation.summary_images, commit_images)
        self.notes: list[str] = []
        self.steps: list[Step] = []
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
        self.replaced: Mapping[str, str] = {}
        """The image baseline before the history entries of this plan: the tags their deployments replaced."""

    def begin(self) -> None:
        """Called before each step: the first one fixes ``start``."""
        if self.start is None:
            self.start = self.state

    def record(self, **changes: Any) -> None:
        """Record facts learnt without a deployment."""
        self.recorded.update(changes)
        self.state = self.state.evolve(**changes)

    def ref(self, entry: HistoryEntry) -> str:
        """``h<id>``; once this uid's history ids restarted, ``h<id>-<deployedAt epoch>``, unique across restarts."""
        if self.state.history_restarts:
            return f"h{entry.id}-{int(entry.deployed_at.timestamp())}"
        return f"h{entry.id}"

    def settled(self) -> bool:
        """Synced, Healthy and no operation requested or running: ``summary.images`` is the deployed state."""
        obs = self.obs
        return obs.sync_status == "Synced" and obs.health_status == "Healthy" and not self.in_flight()

    def in_flight(self) -> bool:
        op = self.obs.operation
        return self.obs.operation_in_flight or (op is not None and not op.completed)

    def produced_entry(self, op: OperationState) -> bool:
        """The operation is the sync of a history entry present."""
        return any(entry.started_at == op.started_at for entry in self.obs.history)

    def baseline_rollout(self, newest: HistoryEntry) -> datetime | None:
        """``rollout_since`` of a baseline whose newest entry is ``newest``: unknown unless the app is Healthy."""
        if self.obs.health_status == "Healthy" and not self.in_flight():
            return None
        return entry_start(newest)


def always(at: datetime) -> bool:
    return True


def operation_finished(op: OperationState) -> datetime:
    return op.finished_at or op.started_at


def fingerprint(entry: HistoryEntry) -> Fingerprint:
    return (entry.revisions, entry.source_fingerprint)


def after_entry(state: Snapshot, entry: HistoryEntry, images: Mapping[str, str], *, monotonic: bool) -> Snapshot:
    """The snapshot once ``entry`` is delivered (or folded into a baseline).

    ``images`` is the new image baseline: the live commit-tagged images when the app is settled, else what
    the deployment applied, else empty. Empty means unknown: the deployment changed the live images to
    something not seen yet, and the next settled tick re-reads them instead of mistaking the deployment for
    an image-only change.
    """
    if monotonic and state.last_history_id is not None and entry.id <= state.last_history_id:
        return state
    recent = (*state.recent, fingerprint(entry))[-RECENT_ENTRIES_KEPT:]
    pending = state.pending if state.pending is not None and state.pending.history_id > entry.id else None
    covered = entry.deployed_at if state.covered_until is None else max(state.covered_until, entry.deployed_at)
    return state.evolve(
        last_history_id=entry.id,
        recent=recent,
        images=dict(images),
        last_deployment_started_at=entry_start(entry),
        pending=pending,
        covered_until=covered,
    )
