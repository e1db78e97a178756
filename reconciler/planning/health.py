"""The health verdict of a history entry (``docs/design.md`` §3, rule 3): did its sync succeed, fail, or is it
too early to say?

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
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from reconciler.model import AppObservation, HistoryEntry, Result, format_time

FRESHNESS_TOLERANCE = timedelta(seconds=1)
"""``deployedAt`` and ``finishedAt`` differ by up to a second; both have one-second precision."""


@dataclass(frozen=True)
class Verdict:
    result: Result | None
    """``None``: not decided yet (pending)."""
    reason: str
    observed: bool = True
    """The verdict comes from the app's health after the sync (its rollout was seen to end or to fail)."""


def entry_start(entry: HistoryEntry) -> datetime:
    """When the entry's sync started: ``deployStartedAt``, else ``deployedAt``."""
    return entry.started_at or entry.deployed_at


def verdict(
    obs: AppObservation,
    entry: HistoryEntry,
    unobserved: datetime | None,
    *,
    pending_since: datetime,
    now: datetime,
    timeout: timedelta,
) -> Verdict:
    """The verdict of the newest history entry; after ``timeout`` pending (since ``pending_since``), it is FAILED.

    ``unobserved``: the earliest start of a sync whose rollout was never seen to end (``Snapshot.rollout_since``
    and the entries before this one in the plan), if any."""
    decided = health_verdict(obs, entry, unobserved)
    if decided.result is not None:
        return decided
    if now - pending_since >= timeout:
        return Verdict(
            Result.FAILED,
            f"no health verdict within {_duration(timeout)} "
            f"(pending since {format_time(pending_since)}: {decided.reason})",
        )
    return decided


def health_verdict(obs: AppObservation, entry: HistoryEntry, unobserved: datetime | None) -> Verdict:
    """What the live health says of ``entry`` (the newest history entry), without a timeout."""
    op = obs.operation
    start = entry_start(entry)
    health = obs.health_status or "no health status"
    transition = obs.health_transition_at
    if op is not None and not op.dry_run and not op.partial and op.started_at > start:
        # A later full sync owns the live state now: the health no longer speaks for this entry, so it is
        # decided at once, like an entry superseded by a newer one. Waiting would let a newer sync that
        # hangs (Progressing forever, endless retries) turn this entry into a FAILED after the timeout.
        if health == "Degraded" and transition is not None and start <= transition < op.started_at:
            return Verdict(Result.FAILED, f"Degraded at {format_time(transition)}, before the next sync")
        return Verdict(
            Result.SUCCESS,
            f"superseded by the sync started {format_time(op.started_at)} ({op.phase})",
            observed=False,
        )
    if obs.reconciled_at is None or obs.reconciled_at < entry.deployed_at - FRESHNESS_TOLERANCE:
        return Verdict(None, f"status not refreshed since the sync ({health})")
    if health == "Healthy":
        # The status is fresh (reconciled after the sync), which is what the catalog's lastTransitionTime
        # clauses approximate; a Healthy computed after the sync is accepted whenever it last changed.
        return Verdict(Result.SUCCESS, "Healthy")
    if health == "Degraded":
        if transition is None or transition >= start:
            at = "" if transition is None else f" at {format_time(transition)}"
            return Verdict(Result.FAILED, f"Degraded{at} after the sync started {format_time(start)}")
        return Verdict(Result.SUCCESS, f"Degraded since {format_time(transition)}, before this sync: not caused by it")
    if health == "Missing":
        return Verdict(Result.FAILED, "Missing after the sync")
    if health in ("Progressing", "Suspended") and transition is not None and transition < start:
        return _state_before_sync(health, transition, unobserved)
    return Verdict(None, health)


def _state_before_sync(health: str, transition: datetime, unobserved: datetime | None) -> Verdict:
    """``Progressing`` or ``Suspended`` since before the sync started."""
    # A paused Rollout or CronJob, a KEDA-scaled object, a LoadBalancer that never gets an address: the
    # state predates the sync, which did not change it. Unless an earlier sync whose rollout was never seen
    # to end had started by then: this sync's rollout may be continuing that one's, so wait for it.
    if unobserved is None or transition < unobserved:
        return Verdict(Result.SUCCESS, f"{health} since {format_time(transition)}, before this sync: not caused by it")
    return Verdict(
        None,
        f"{health} since {format_time(transition)}, during the rollout of the sync started {format_time(unobserved)}",
    )


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"
