"""Rule 3 (``docs/design.md`` §3): history entries become deployments, oldest first.

Every entry but the newest is superseded (SUCCESS) unless a verdict was decided for it before; the newest one
gets the health verdict (``health``) or stays pending, kept whole in the snapshot. Entries the snapshot kept
(pending or decided, not delivered yet) are emitted with their visible entry, or on their own before the
visible ones once ``status.history`` no longer holds them. Each deployment is classified against the entry
before it and carries the images its sync applied when known.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from reconciler.model import (
    DecidedVerdict,
    DeploymentClass,
    DeploymentKind,
    EntryRecord,
    HistoryEntry,
    PendingVerdict,
    Result,
)
from reconciler.planning.draft import Draft, Fingerprint, Step, after_entry, fingerprint
from reconciler.planning.health import Verdict, entry_start, verdict


@dataclass(frozen=True)
class Candidate:
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


def candidates(draft: Draft, visible: Sequence[HistoryEntry], *, records_advance: bool) -> list[Candidate]:
    """``visible`` as candidates, preceded by what the snapshot kept of entries no longer visible."""
    snapshot, uid = draft.snapshot, draft.obs.uid
    decided = {_record_key(d.entry): d for d in (snapshot.decided if snapshot and draft.records else ())}
    matched: set[tuple[str, int, datetime]] = set()
    shown: list[Candidate] = []
    for entry in visible:
        record = next((r for r in draft.records if r.same_entry(entry)), None)
        if record is not None:
            matched.add(_record_key(record))
        kept = decided.get(_record_key(record)) if record is not None else None
        shown.append(Candidate(entry, draft.ref(entry), uid, record, kept))
    gone: list[Candidate] = []
    for record in draft.records:
        if _record_key(record) in matched:
            continue
        advances = records_advance and record.uid == uid
        gone.append(
            Candidate(
                record.history_entry(), record.ref, record.uid, record, decided.get(_record_key(record)), advances
            )
        )
        draft.notes.append(
            f"{record.ref} is not delivered yet and is no longer among the entries to emit: emitted as the "
            "snapshot kept it" + ("" if record.uid == uid else f" (uid {record.uid})")
        )
    gone.sort(key=lambda c: c.entry.deployed_at)
    return [*gone, *shown]


def emit_history(
    draft: Draft, candidates: Sequence[Candidate], chain: Sequence[Fingerprint], *, monotonic: bool = False
) -> PendingVerdict | None:
    """Emit ``candidates`` (oldest first); returns the pending verdict of the newest one if undecided.

    ``chain``: the fingerprints of the entries before the first candidate, to classify against. ``monotonic``:
    a backfill over entries already recorded, which sends them again and never moves the high-water mark back."""
    if not candidates:
        return None
    newest = candidates[-1]
    draft.replaced = dict(draft.state.images)
    newest_verdict = _newest_verdict(draft, candidates)
    pending = _pending(draft, newest, newest_verdict, monotonic=monotonic) if newest_verdict.result is None else None
    prior = draft.prior_pending
    if (
        prior is not None
        and prior.history_id != newest.entry.id
        and any(c.entry.id == prior.history_id for c in candidates)
    ):
        draft.notes.append(f"h{prior.history_id} was pending and is superseded by {newest.ref}: SUCCESS")

    recorded = draft.snapshot.last_history_id if draft.snapshot is not None else None
    current = list(chain)
    old_chain = list(draft.snapshot.recent) if draft.snapshot is not None else []
    for candidate in candidates:
        if candidate.advances:
            deployment_class = _classify(candidate.entry, current[-1] if current else None, current[:-1])
            current.append(fingerprint(candidate.entry))
        else:
            deployment_class = _classify(candidate.entry, old_chain[-1] if old_chain else None, old_chain[:-1])
        decided = newest_verdict if candidate is newest else _superseded(candidate)
        if decided.result is None:
            break
        resent = monotonic and recorded is not None and candidate.entry.id <= recorded and candidate.advances
        _emit(
            draft,
            candidate,
            deployment_class,
            decided,
            decided.result,
            newest=candidate is newest,
            monotonic=monotonic,
            resent=resent,
        )
    return pending


def _pending(draft: Draft, newest: Candidate, undecided: Verdict, *, monotonic: bool) -> PendingVerdict | None:
    """The newest entry waits for its verdict, kept whole in the snapshot; a backfill (``monotonic``) does not
    send an entry recorded before that is still undecided."""
    recorded = draft.snapshot.last_history_id if draft.snapshot is not None else None
    if monotonic and recorded is not None and newest.entry.id <= recorded:
        draft.notes.append(f"{newest.ref}: recorded before and still undecided ({undecided.reason}): not resent")
        return None
    draft.pending_entry = _entry_record(newest, _images_of(draft, newest))
    draft.notes.append(f"pending verdict for {newest.ref}: {undecided.reason}")
    return PendingVerdict(history_id=newest.entry.id, since=_pending_since(draft, newest.entry))


def _newest_verdict(draft: Draft, candidates: Sequence[Candidate]) -> Verdict:
    """The verdict decided before, else the health verdict (``unobserved``: the earliest rollout never seen to
    end, of the snapshot or of the entries this plan supersedes)."""
    newest = candidates[-1]
    if newest.decided is not None:
        before = newest.decided
        draft.notes.append(f"{newest.ref}: {before.result.value} as decided before ({before.reason})")
        return Verdict(before.result, before.reason)
    unobserved = _earliest([draft.state.rollout_since, *(entry_start(c.entry) for c in candidates[:-1])])
    return verdict(
        draft.obs,
        newest.entry,
        unobserved,
        pending_since=_pending_since(draft, newest.entry),
        now=draft.now,
        timeout=draft.verdict_timeout,
    )


def _superseded(candidate: Candidate) -> Verdict:
    if candidate.decided is not None:
        return Verdict(candidate.decided.result, candidate.decided.reason, observed=False)
    return Verdict(Result.SUCCESS, "superseded by a newer history entry", observed=False)


def _emit(
    draft: Draft,
    candidate: Candidate,
    deployment_class: DeploymentClass,
    decided: Verdict,
    result: Result,
    *,
    newest: bool,
    monotonic: bool,
    resent: bool,
) -> None:
    """One history deployment with its verdict (``result``: ``decided.result``, known). The newest entry carries
    the images its sync applied (or the live ones) and sets the image baseline; an entry before it carries what
    the snapshot kept of it. ``resent``: a backfill sends an entry recorded before again (no verdict kept)."""
    entry = candidate.entry
    baseline: Mapping[str, str] = {}
    if newest:
        images = _images_of(draft, candidate)
        baseline = _baseline_after(draft, candidate)
    else:
        images = candidate.record.images if candidate.record is not None else ()
    reason = f"{decided.reason} (backfill: sent again)" if resent else decided.reason
    draft.begin()
    if candidate.advances:
        kept = candidate.record is not None
        draft.state = after_entry(draft.state, entry, baseline, monotonic=monotonic or kept)
        rollout = None if decided.observed else _earliest([draft.state.rollout_since, entry_start(entry)])
        draft.state = draft.state.evolve(rollout_since=rollout)
    draft.steps.append(
        Step(
            kind=DeploymentKind.HISTORY,
            ref=candidate.ref,
            result=result,
            deployment_class=deployment_class,
            started_at=entry_start(entry),
            finished_at=entry.deployed_at,
            revisions=entry.revisions,
            sources=entry.sources,
            state=draft.state,
            uid=candidate.uid,
            images=images,
            history_id=entry.id,
            message=reason,
            decided=None if resent else DecidedVerdict(_entry_record(candidate, images), result, reason),
        )
    )


def _pending_since(draft: Draft, entry: HistoryEntry) -> datetime:
    """When ``entry`` was first seen pending: by an earlier tick (the same entry, not one of another generation
    with the same id), else now."""
    prior, record = draft.prior_pending, draft.snapshot.pending_entry if draft.snapshot is not None else None
    if prior is None or prior.history_id != entry.id:
        return draft.now
    if record is not None and record.id == entry.id and record.deployed_at != entry.deployed_at:
        return draft.now
    return prior.since


def _images_of(draft: Draft, candidate: Candidate) -> tuple[str, ...]:
    """The images a history deployment carries: what its sync applied when known (kept with the entry, or the
    operation that produced it is still the current one), else the live images once the app is settled."""
    if candidate.record is not None and candidate.record.images:
        return candidate.record.images
    if not candidate.advances:
        return ()
    applied = _applied(draft, candidate.entry)
    if applied is not None:
        return applied
    if draft.settled():
        return draft.live.refs(draft.replaced)
    return ()


def _applied(draft: Draft, entry: HistoryEntry) -> tuple[str, ...] | None:
    """``syncResult.resources[].images`` when the operation in the status is the one that produced ``entry``."""
    op = draft.obs.operation
    if op is not None and entry.started_at is not None and op.started_at == entry.started_at:
        return op.images
    return None


def _baseline_after(draft: Draft, candidate: Candidate) -> dict[str, str]:
    """The image baseline once the newest entry is delivered: the live images when the app is settled, else
    what the sync applied. A repository showing two tags live (old pods still terminating) gets the tag the
    sync applied, else the one that is not the tag the deployment replaced: never the replaced one."""
    if not candidate.advances:
        return dict(draft.state.images)
    applied = candidate.record.images if candidate.record is not None and candidate.record.images else None
    applied = applied or _applied(draft, candidate.entry)
    applied_tags = dict(draft.commit_images(applied)) if applied else {}
    if draft.settled():
        return draft.live.baseline(draft.replaced, prefer=applied_tags)
    return applied_tags


def _classify(entry: HistoryEntry, previous: Fingerprint | None, older: Sequence[Fingerprint]) -> DeploymentClass:
    """Against the entry before it: new revision, config-only, redeploy or rollback."""
    if previous is None:
        return DeploymentClass.INITIAL if entry.id == 0 else DeploymentClass.NEW_REVISION
    current = fingerprint(entry)
    if current == previous:
        return DeploymentClass.REDEPLOY
    if current in older:
        return DeploymentClass.ROLLBACK
    if entry.revisions != previous[0]:
        if entry.revisions and any(revisions == entry.revisions for revisions, _ in older):
            return DeploymentClass.ROLLBACK
        return DeploymentClass.NEW_REVISION
    return DeploymentClass.CONFIG_ONLY


def _earliest(times: Iterable[datetime | None]) -> datetime | None:
    return min((t for t in times if t is not None), default=None)


def _record_key(record: EntryRecord) -> tuple[str, int, datetime]:
    return (record.uid, record.id, record.deployed_at)


def _entry_record(candidate: Candidate, images: Sequence[str]) -> EntryRecord:
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
