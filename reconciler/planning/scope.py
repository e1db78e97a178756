"""Which history entries a plan walks, and the snapshot it starts from (``docs/design.md`` §3, rules 3 and 7):
the regular tick (entries above the high-water mark), a first sight or a first-run backfill (entries after a
cut-off), a backfill (every entry again), a new uid under a known name (entries the previous snapshot did not
cover: a re-applied Application brings its history back), and history ids restarting under the same uid.

Entries before the first one a plan emits are folded into its baseline without a deployment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from reconciler.model import EntryRecord, HistoryEntry, Snapshot, format_time
from reconciler.planning.draft import Draft, Fingerprint, after_entry, always, fingerprint
from reconciler.planning.health import entry_start
from reconciler.planning.history import Candidate, candidates


@dataclass(frozen=True)
class Scope:
    """What the rules walk: the history entries to emit and what their operation rules compare against."""

    candidates: Sequence[Candidate]
    chain: Sequence[Fingerprint]
    """The fingerprints of the entries before the first candidate, to classify against."""
    emit: Callable[[datetime], bool] = always
    """Whether something deployed (an operation: finished) at a time is new: the cut-off of a first sight or
    a backfill."""
    monotonic: bool = False
    """A backfill over entries already recorded: sent again, the high-water mark never moves back."""
    regular: bool = False
    """The regular tick (not a first sight, a backfill, a new uid or a restart)."""


def fresh(draft: Draft, previous: Snapshot | None) -> Snapshot:
    """An empty snapshot for this uid; ``commits`` (the reconciler's) and ``covered_until`` survive."""
    if previous is None:
        return Snapshot(uid=draft.obs.uid, last_seen=draft.now)
    return Snapshot(
        uid=draft.obs.uid, last_seen=draft.now, commits=dict(previous.commits), covered_until=previous.covered_until
    )


def carried(draft: Draft, snapshot: Snapshot) -> Snapshot:
    return snapshot.evolve(last_seen=draft.now, deleting_since=None)


def baseline(draft: Draft, previous: Snapshot | None) -> Snapshot:
    """The app's current state, recorded without emitting anything."""
    state = fresh(draft, previous)
    for entry in draft.obs.history:
        state = after_entry(state, entry, {}, monotonic=False)
    draft.state = state
    rollout = draft.baseline_rollout(draft.obs.history[-1]) if draft.obs.history else None
    state = state.evolve(images=_recorded_images(draft), rollout_since=rollout)
    op = draft.obs.operation
    if op is not None and op.completed and not draft.produced_entry(op):
        state = state.evolve(last_failed_operation=format_time(op.started_at))
    return state


def since_filter(draft: Draft, since: datetime | None) -> Callable[[datetime], bool]:
    """A backfill's ``--since``: what was deployed (finished) at or after it."""
    if since is None:
        return always
    draft.notes.append(f"backfill since {format_time(since)}")
    return lambda at: at >= since


def undelivered(snapshot: Snapshot) -> tuple[EntryRecord, ...]:
    """The entries ``snapshot`` kept and has not delivered: its pending entry and its decided verdicts."""
    records = [verdict.entry for verdict in snapshot.decided]
    pending, entry = snapshot.pending, snapshot.pending_entry
    if pending is not None and entry is not None and entry.id == pending.history_id:
        records.append(entry)
    return tuple(records)


def incremental(draft: Draft, snapshot: Snapshot) -> Scope:
    """The regular tick: the entries above the recorded id, and the entries the snapshot kept."""
    history = draft.obs.history
    last = snapshot.last_history_id
    new = [entry for entry in history if last is None or entry.id > last]
    draft.state = carried(draft, snapshot)
    found = candidates(draft, new, records_advance=True)
    kept_ids = {c.entry.id for c in found if c.record is not None}
    if new and last is not None and new[0].id > last + 1:
        first, final = last + 1, new[0].id - 1
        kept = sorted(i for i in kept_ids if first <= i <= final)
        if len(kept) < final - first + 1:
            also = f" (kept by the snapshot: {', '.join(f'h{i}' for i in kept)})" if kept else ""
            draft.notes.append(
                f"history {_id_range(first, final)} lost to revisionHistoryLimit between ticks (unrecoverable)" + also
            )
    chain = list(snapshot.recent) or [fingerprint(e) for e in history if last is not None and e.id <= last]
    return Scope(found, chain, regular=True)


def full(
    draft: Draft,
    base: Snapshot,
    emit: Callable[[datetime], bool],
    *,
    monotonic: bool = False,
    accept: Callable[[HistoryEntry], bool] | None = None,
    records_advance: bool = False,
) -> Scope:
    """Walk every entry present. The oldest ones ``accept`` (default: ``emit`` of their ``deployedAt``) rejects
    are folded into the baseline silently; from the first accepted one on, every entry is emitted."""
    history = draft.obs.history
    accepted = accept or (lambda entry: emit(entry.deployed_at))
    start = next((i for i, entry in enumerate(history) if accepted(entry)), len(history))
    chain: list[Fingerprint] = [] if not monotonic else list(base.recent)
    draft.state = base
    for entry in history[:start]:
        draft.state = after_entry(draft.state, entry, {}, monotonic=monotonic)
        if not monotonic:
            chain.append(fingerprint(entry))
    if start and not monotonic:
        draft.state = draft.state.evolve(rollout_since=draft.baseline_rollout(history[start - 1]))
    if start == len(history) and not monotonic:
        draft.state = draft.state.evolve(images=_recorded_images(draft))
    found = candidates(draft, history[start:], records_advance=records_advance)
    return Scope(found, chain, emit, monotonic)


def new_uid(draft: Draft, previous: Snapshot, *, backfill: bool, since: datetime | None) -> Scope:
    """A new uid under a known name: a new Application, or the same one deleted and re-applied (from an
    export or a backup: Application has no status subresource, so its history comes back with it). Entries
    the previous snapshot already covered are not new either way."""
    obs = draft.obs
    base = fresh(draft, previous)
    op = obs.operation
    if op is not None and previous.last_failed_operation == format_time(op.started_at):
        base = base.evolve(last_failed_operation=previous.last_failed_operation)
    covered = [entry for entry in obs.history if _covered(previous, entry)]
    if covered:
        draft.notes.append(
            f"new uid {obs.uid} (was {previous.uid}): entries up to h{covered[-1].id} were recorded under the old "
            f"uid (a re-applied Application); only later entries are new"
        )
    else:
        draft.notes.append(f"new uid {obs.uid} (was {previous.uid}): a new Application, all its history is new")
    if backfill:
        emit = since_filter(draft, since)
        return full(draft, base, emit, accept=lambda e: emit(e.deployed_at) and not _covered(previous, e))
    return full(draft, base, always, accept=lambda entry: not _covered(previous, entry))


def restart(draft: Draft, snapshot: Snapshot) -> str | None:
    """Why the history ids restarted under this uid, or ``None``. Ids restart at 0 when the history is
    emptied; seen from the snapshot, an entry at or below the recorded id that is not covered by it (deployed
    later than anything recorded) is from a new generation, however many syncs happened since."""
    history, last = draft.obs.history, snapshot.last_history_id
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


def restarted(draft: Draft, snapshot: Snapshot) -> Scope:
    """After a history restart: a new generation of refs, every entry the snapshot does not cover is new."""
    base = fresh(draft, snapshot).evolve(
        history_restarts=snapshot.history_restarts + 1,
        covered_until=snapshot.covered_until,
        last_failed_operation=snapshot.last_failed_operation,
        last_deployment_started_at=snapshot.last_deployment_started_at,
        last_image_change=snapshot.last_image_change,
        rollout_since=snapshot.rollout_since,
    )
    return full(draft, base, always, accept=lambda entry: not _covered(snapshot, entry))


def _recorded_images(draft: Draft) -> dict[str, str]:
    """The image baseline of an app recorded without a deployment."""
    if draft.settled():
        return draft.live.baseline(draft.state.images)
    op, history = draft.obs.operation, draft.obs.history
    if op is not None and op.images is not None and history and history[-1].started_at == op.started_at:
        return dict(draft.commit_images(op.images))
    return {}


def _covered(snapshot: Snapshot, entry: HistoryEntry) -> bool:
    """Whether ``snapshot`` already recorded ``entry`` (or a later one): deployed at or before ``covered_until``.
    A snapshot written before ``covered_until`` existed answers with its last deployment's start instead."""
    if snapshot.covered_until is not None:
        return entry.deployed_at <= snapshot.covered_until
    if snapshot.last_deployment_started_at is not None and snapshot.last_history_id is not None:
        return entry_start(entry) <= snapshot.last_deployment_started_at
    return False


def _id_range(first: int, last: int) -> str:
    return f"id {first}" if first == last else f"ids {first}-{last}"
