"""Rules 4 and 5 (``docs/design.md`` §3): a sync operation that failed is a FAILED deployment, keyed by its
``startedAt`` (``op-<epoch>``; its retries share it), and so is OutOfSync + Missing after a sync of this app.

Both check and advance ``last_failed_operation``, so one operation is never counted twice. Choices
``docs/design.md`` §3 leaves open:

* Failed dry runs and failed partial (selective, self-heal) syncs are not deployments (rules 4 and 5 skip them);
  their operation is recorded so that it is never reconsidered.
* Backfills and first sights also emit the failed operation present in the status (same cut-off rule:
  its ``finishedAt``); one from before the cut-off is recorded as part of the baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from reconciler.model import DeploymentClass, DeploymentKind, OperationState, Result, format_time
from reconciler.planning.draft import Draft, Step, operation_finished


def failed_operation(draft: Draft, emit: Callable[[datetime], bool], *, ignore_high_water: bool = False) -> None:
    """Rule 4. ``emit``: whether an operation that finished then is new (the cut-off of a first sight or a
    backfill); ``ignore_high_water``: a backfill sends the operation again even if it was recorded."""
    op = draft.obs.operation
    if op is None or not op.failed or op.finished_at is None:
        return
    key = format_time(op.started_at)
    if op.dry_run or op.partial:
        if draft.state.last_failed_operation != key:
            kind = "a dry run" if op.dry_run else "a partial (selective or self-heal) sync"
            draft.notes.append(f"{op.phase} sync started {key} was {kind}: not a deployment")
            draft.record(last_failed_operation=key)
        return
    if (draft.state.last_failed_operation == key and not ignore_high_water) or draft.produced_entry(op):
        return
    if not emit(op.finished_at):
        return
    retried = f" (retried {op.retry_count} times)" if op.retry_count else ""
    message = f"sync {op.phase}{retried}" + (f": {op.message}" if op.message else "")
    _operation_step(draft, op, message)


def out_of_sync_missing(draft: Draft, emit: Callable[[datetime], bool]) -> None:
    """Rule 5: OutOfSync and Missing after a sync of this app that started after its last recorded deployment."""
    obs, op = draft.obs, draft.obs.operation
    if obs.sync_status != "OutOfSync" or obs.health_status != "Missing":
        return
    if op is None:
        if not obs.history:
            draft.notes.append("OutOfSync and Missing but never synced: not a failure")
        return
    if not op.completed or op.dry_run or op.partial or draft.produced_entry(op):
        return
    key = format_time(op.started_at)
    last = draft.state.last_deployment_started_at
    if draft.state.last_failed_operation == key or (last is not None and op.started_at <= last):
        return
    if not emit(operation_finished(op)):
        return
    _operation_step(draft, op, f"OutOfSync and Missing after the sync started {key} ({op.phase})")


def record_before_cutoff(draft: Draft, emit: Callable[[datetime], bool]) -> None:
    """An operation from before the cut-off of a first sight or a backfill: part of the baseline, never to be
    counted later."""
    op = draft.obs.operation
    if op is not None and op.completed and not draft.produced_entry(op) and not emit(operation_finished(op)):
        draft.record(last_failed_operation=format_time(op.started_at))


def note_in_flight(draft: Draft) -> None:
    """Say why an operation still running or retrying is not decided yet."""
    op = draft.obs.operation
    if op is None or op.completed:
        return
    started = format_time(op.started_at)
    if op.finished_at is not None:
        detail = f": {op.message}" if op.message else ""
        draft.notes.append(f"sync started {started} is retrying (retry {op.retry_count}), not final yet{detail}")
    else:
        draft.notes.append(f"sync started {started} in progress ({op.phase})")


def _operation_step(draft: Draft, op: OperationState, message: str) -> None:
    draft.begin()
    last = draft.state.last_deployment_started_at
    draft.state = draft.state.evolve(
        last_failed_operation=format_time(op.started_at),
        last_deployment_started_at=op.started_at if last is None else max(last, op.started_at),
    )
    draft.steps.append(
        Step(
            kind=DeploymentKind.OPERATION,
            ref=f"op-{int(op.started_at.timestamp())}",
            result=Result.FAILED,
            deployment_class=DeploymentClass.FAILED_SYNC,
            started_at=op.started_at,
            finished_at=operation_finished(op),
            revisions=op.revisions,
            sources=op.sources,
            state=draft.state,
            uid=draft.obs.uid,
            images=op.images or (),
            message=message,
        )
    )
