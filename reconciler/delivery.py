"""Delivery of a page's planned deployments: payloads, dedupe, sending, recording; nothing lost, nothing twice.

Each Application's deployments go out strictly in order and stop at the first that cannot; after each one its
snapshot and markers are written in one transaction, so a crash anywhere leaves either "not sent" (sent again
under the same id: an upsert) or "sent and recorded". Applications are delivered concurrently. A permanent
rejection goes to the dead-letter list; a connection that cannot help this tick is held back (``ConnectionBreaker``);
retries share one time budget per tick (``RetryBudget``); a dry run prints each payload instead of sending it.

Each connection is delivered on its own: what a connection refuses for its configuration (its key, id or URL)
goes, with its payload, to that connection's backlog in the store, written in the transaction that advances the
snapshot, and the other connections get everything. Each run first retries the backlogs of its clusters
(``retry_backlog``). Transient failures (5xx, 429, timeouts, an outage) still hold the Application back: DevLake is
down for every connection then. A change several Applications of a component make is claimed in the store by the
deployment that sends it, with its payload in the backlog, so exactly one sends it even across parallel shards and
even if that deployment's Application is deleted or its run dies before it is delivered.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from reconciler.config import Config, ConnectionConfig
from reconciler.dedupe import (
    AppSteps,
    Claims,
    Decision,
    Step,
    Target,
    assign,
    change_fingerprint,
    claim_key,
    intended_claims,
    markers_to_read,
    settle_claims,
    shipped_fingerprint,
)
from reconciler.devlake import (
    CONFIGURATION_STATUSES,
    Delivery,
    DeliveryOutcome,
    DevLakeClient,
    PayloadError,
    Router,
    build_payload,
)
from reconciler.enrich import Deferred, Skipped
from reconciler.images import InvalidImageReference, RepositoryMapper, parse_image
from reconciler.model import (
    FULL_SHA,
    AppKey,
    AppObservation,
    Deployment,
    EnrichedDeployment,
    Result,
    Snapshot,
    format_time,
)
from reconciler.planner import Plan
from reconciler.run import RunError, RunOptions
from reconciler.store import BacklogItem, BacklogSlot, ChangeClaim, Store, StoreUnavailable

log = logging.getLogger(__name__)

OUTAGE_FAILURES = 5
"""Deliveries to one connection that may fail (each after its retries) before it is held back for the tick,
as long as it has accepted none."""


class DeliveryMetrics(Protocol):
    def deployment_recorded(self, deployment: Deployment) -> None: ...
    def delivery(self, connection_id: int, outcome: str) -> None: ...
    def dead_letter(self) -> None: ...


class RetryBudget:
    """``devlake.retry_budget``: the time one tick may spend on deliveries that needed retries, shared by every
    worker. Listing and enrichment do not consume it, so a long backfill still has its retries when it sends."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._remaining = max(0.0, seconds)
        self.clock = clock
        self._lock = threading.Lock()

    @property
    def remaining(self) -> float:
        with self._lock:
            return max(0.0, self._remaining)

    def deadline(self) -> float:
        """For ``DevLakeClient.deliver``: retries may wait until the rest of the budget is used up."""
        return self.clock() + self.remaining

    def spend(self, seconds: float) -> None:
        with self._lock:
            self._remaining -= max(0.0, seconds)


class ConnectionBreaker:
    """Holds a connection back for the rest of the tick once trying it again cannot help: DevLake refused its
    key or id (an operator's fix), or it has failed ``outage_failures`` deliveries, each after its retries,
    without accepting one this tick (an outage: the rest would only spend time failing). One failing payload
    among successful ones never holds a connection back. Shared by the delivery workers."""

    def __init__(self, outage_failures: int = OUTAGE_FAILURES) -> None:
        self.outage_failures = outage_failures
        self._lock = threading.Lock()
        self._down: dict[int, str] = {}
        self._refused: set[int] = set()
        self._answered: set[int] = set()
        """Connections that accepted (or rejected for good) a deployment this tick."""
        self._failures: dict[int, int] = {}

    def held_back(self, connection_id: int) -> str | None:
        """Why the connection is not tried again this tick, or ``None``."""
        with self._lock:
            return self._down.get(connection_id)

    def refused(self, connection_id: int) -> bool:
        """Held back because DevLake refused the connection's configuration (not for an outage)."""
        with self._lock:
            return connection_id in self._refused

    def record(self, connection_id: int, delivery: Delivery) -> str | None:
        """Note a delivery's answer. Returns the reason when this answer holds the connection back (once)."""
        with self._lock:
            if delivery.outcome is not DeliveryOutcome.RETRY_LATER:
                self._answered.add(connection_id)
                return None
            if refused_configuration(delivery):
                reason = f"configuration refused: {delivery.message}"
                self._refused.add(connection_id)
            else:
                self._failures[connection_id] = failures = self._failures.get(connection_id, 0) + 1
                if connection_id in self._answered or failures < self.outage_failures:
                    return None
                reason = f"{failures} deliveries failed and none succeeded: {delivery.message}"
            if connection_id in self._down:
                return None
            self._down[connection_id] = reason
            return reason


def refused_configuration(delivery: Delivery) -> bool:
    """DevLake refused the connection's key, id or URL (401, 403, 404, a redirect), or its key is not set: an
    operator's fix, which may take days, not an outage."""
    return delivery.outcome is DeliveryOutcome.RETRY_LATER and (
        delivery.status in CONFIGURATION_STATUSES or delivery.attempts == 0
    )


class BacklogTally:
    """The backlog slots of this run's Applications still waiting, for the run summary. Shared by the workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: set[tuple[str, str]] = set()

    def keep(self, slots: Iterable[BacklogSlot]) -> None:
        with self._lock:
            self._waiting.update((slot.cluster, slot.field) for slot in slots)

    def done(self, slots: Iterable[BacklogSlot]) -> None:
        with self._lock:
            self._waiting.difference_update((slot.cluster, slot.field) for slot in slots)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)


def _never() -> bool:
    return False


@dataclass
class Tick:
    """What one pass shares across its pages and delivery workers. A new one per pass: nothing to reset."""

    options: RunOptions
    budget: RetryBudget
    breaker: ConnectionBreaker = field(default_factory=ConnectionBreaker)
    claims: dict[str, str] = field(default_factory=dict)
    """Component-change marker -> the deployment that sends it (the store's claim; the first in listing order
    within this process, which is all a dry run has)."""
    backlog: BacklogTally = field(default_factory=BacklogTally)
    halted: Callable[[], bool] = _never
    """Stop sending: asked to stop, or the run lock was lost and another run may be sending."""
    held_back: dict[int, RunError] = field(default_factory=dict)
    """Connection -> the failure that held it back: the cause counted for every deployment it then holds."""


@dataclass
class PreparedStep:
    """One planned deployment of an Application, prepared for delivery."""

    deployment: Deployment
    outcome: EnrichedDeployment | Deferred | Skipped
    commits: dict[str, str]
    """The snapshot's ``commits`` once this deployment is recorded."""
    payload: dict[str, Any] | None = None
    unsendable: str | None = None
    """Why no payload could be built (``PayloadError``): recorded without sending, like ``Skipped``."""
    fingerprint: str | None = None
    aliases: tuple[str, ...] = ()
    """Other fingerprints of the same change (``shipped_fingerprint``)."""


@dataclass
class AppWork:
    """An Application with deployments to deliver this tick."""

    observation: AppObservation
    snapshot: Snapshot | None
    plan: Plan
    component: str = ""
    connections: list[ConnectionConfig] = field(default_factory=list)
    steps: list[PreparedStep] = field(default_factory=list)


@dataclass
class AppResult:
    success: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0
    held_unreadable: int = 0
    deduplicated: int = 0
    sent: int = 0
    would_send: int = 0
    retry_later: int = 0
    dead_lettered: int = 0
    backlogged: int = 0
    """Deliveries a connection refused for its configuration this run, kept in its backlog."""
    backlog_sent: int = 0
    errors: list[RunError] = field(default_factory=list)

    def add(self, other: AppResult) -> None:
        self.sent += other.sent
        self.would_send += other.would_send
        self.errors.extend(other.errors)
        self.retry_later += other.retry_later
        self.dead_lettered += other.dead_lettered
        self.deduplicated += other.deduplicated
        self.backlogged += other.backlogged
        self.backlog_sent += other.backlog_sent


@dataclass
class StepRecord:
    """What delivering one deployment to its connections did, to be written in one transaction."""

    done: bool = True
    """Every connection is settled: delivered, rejected for good, deduplicated, or waiting in its backlog."""
    markers: list[str] = field(default_factory=list)
    backlog: list[BacklogItem] = field(default_factory=list)
    delivered: list[BacklogSlot] = field(default_factory=list)
    """Slots this deployment may wait in (its claims) that are settled now: removed with its markers."""
    stats: AppResult = field(default_factory=AppResult)


def previous_commits(snapshot: Snapshot | None, mapper: RepositoryMapper) -> dict[str, str]:
    """The compare base per GitHub repository: the heads delivered last time, else the full-SHA image tags the
    snapshot recorded (a baseline resolves nothing, so its first deployment still gets a range)."""
    if snapshot is None:
        return {}
    commits = dict(snapshot.commits)
    for repository, tag in snapshot.images.items():
        if not FULL_SHA.fullmatch(tag):
            continue
        try:
            repo = mapper.repository_for(parse_image(repository))
        except InvalidImageReference:
            continue
        if repo is not None:
            commits.setdefault(repo, tag)
    return commits


class Deliverer:
    """Prepares and delivers the deployments of a page's Applications with the clients it is given."""

    def __init__(
        self,
        config: Config,
        store: Store,
        devlake: DevLakeClient,
        *,
        metrics: DeliveryMetrics | None = None,
        dry_run_output: TextIO | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.store = store
        self.devlake = devlake
        self.metrics = metrics
        self.dry_run_output = dry_run_output
        self.clock = clock
        self.mapper = RepositoryMapper(config.images)
        self.router = Router(config.devlake)
        self._output_lock = threading.Lock()

    def previous_commits(self, snapshot: Snapshot | None) -> dict[str, str]:
        return previous_commits(snapshot, self.mapper)

    # -- preparing -----------------------------------------------------------------------------------

    def prepare(self, work: AppWork, outcomes: Sequence[EnrichedDeployment | Deferred | Skipped]) -> None:
        """Build each deployment's payload and change fingerprint, carrying the compare base forward as the
        deliveries will (a held-back deployment stops the Application, so what follows it never runs)."""
        observation = work.observation
        key = observation.key
        work.component = self.config.applications.component_of(key.name, observation.labels)
        work.connections = self.router.connections_for(key, work.component)
        source_paths = [s.path for s in observation.sources if s.path]
        commits = self.previous_commits(work.snapshot)
        for deployment, outcome in zip(work.plan.deployments, outcomes, strict=True):
            step = PreparedStep(deployment, outcome, dict(commits))
            work.steps.append(step)
            if not isinstance(outcome, EnrichedDeployment):
                continue
            try:
                step.payload = build_payload(
                    outcome,
                    config=self.config,
                    component=work.component,
                    destination=observation.destination,
                    source_paths=source_paths,
                )
            except PayloadError as error:
                step.unsendable = error.reason
            else:
                environment = str(step.payload["environment"])
                step.fingerprint = change_fingerprint(outcome, environment=environment)
                shipped = shipped_fingerprint(outcome, environment=environment)
                step.aliases = (shipped,) if shipped is not None and shipped != step.fingerprint else ()
            commits.update(outcome.deployed_commits)
            step.commits = dict(commits)

    # -- the backlogs of a cluster ----------------------------------------------------------------------

    def retry_backlog(self, cluster: str, tick: Tick) -> AppResult:
        """Deliver what waits in the backlogs of this run's Applications of ``cluster``, oldest first per
        connection, before anything new: each item delivered is removed in the transaction that writes its sent
        marker. A connection still refused (or down) keeps its items for the next run; one no longer configured
        keeps them too (they go out if it comes back) and is only warned about."""
        result = AppResult()
        shard = tick.options.shard
        items = [item for item in self.store.backlog(cluster) if shard is None or shard.owns(item.app)]
        if not items:
            return result
        configured = {connection.id: connection for connection in self.config.devlake.connections}
        by_connection: dict[int, list[BacklogItem]] = {}
        for item in items:
            by_connection.setdefault(item.slot.connection, []).append(item)
        for connection_id, waiting in by_connection.items():
            tick.backlog.keep(item.slot for item in waiting)
            connection = configured.get(connection_id)
            if connection is None:
                log.warning(
                    "backlog kept for a connection that is no longer configured; not sent",
                    extra={"cluster": cluster, "connection": connection_id, "deployments": len(waiting)},
                )
                continue
            self._retry_connection(connection, waiting, tick, result)
        return result

    def _retry_connection(
        self, connection: ConnectionConfig, waiting: Sequence[BacklogItem], tick: Tick, result: AppResult
    ) -> None:
        for index, item in enumerate(waiting):
            slot = item.slot
            if tick.options.dry_run:
                self._print_dry_run(connection.id, item.payload)
                result.would_send += 1
                continue
            down = tick.breaker.held_back(connection.id)
            if tick.halted() or down is not None:
                left = len(waiting) - index
                result.retry_later += left
                if down is not None:
                    held = tick.held_back.get(connection.id) or RunError(f"DevLake connection {connection.id}: {down}")
                    result.errors.extend([held] * left)
                log.warning(
                    "backlog waits for the next run",
                    extra={"connection": connection.id, "deployments": left, "reason": down or "stopping"},
                )
                return
            delivery = self._send(connection, item.payload, tick)
            target = Target(connection.id, slot.deployment_id)
            if delivery.outcome is DeliveryOutcome.DELIVERED:
                self.store.settle_backlog(slot, item.delivered_markers)
                tick.backlog.done([slot])
                result.sent += 1
                result.backlog_sent += 1
                log.info(
                    "deployment delivered from the backlog",
                    extra={
                        "app": str(item.app),
                        "deployment_id": slot.deployment_id,
                        "result": _payload_result(item.payload),
                        "connections": [connection.id],
                    },
                )
            elif delivery.outcome is DeliveryOutcome.REJECTED:
                self._dead_letter(
                    connection.id,
                    slot.deployment_id,
                    item.app,
                    _payload_result(item.payload),
                    item.payload,
                    delivery.status,
                    delivery.message,
                )
                self.store.settle_backlog(slot, [target.rejected])
                tick.backlog.done([slot])
                result.dead_lettered += 1
            else:
                result.retry_later += 1
                result.errors.append(self._failure(connection.id, delivery, str(item.app), tick))
                if not refused_configuration(delivery):
                    result.retry_later += len(waiting) - index - 1
                    log.warning(
                        "delivery from the backlog failed; the backlog waits for the next run",
                        extra={
                            "deployment_id": slot.deployment_id,
                            "connection": connection.id,
                            "status": delivery.status,
                            "reason": delivery.message,
                        },
                    )
                    return

    # -- a page --------------------------------------------------------------------------------------

    def deliver(self, works: Sequence[AppWork], tick: Tick) -> list[AppResult]:
        """Decide every delivery's dedupe in one batched store read and claim the shared changes this page sends in
        one more, then deliver the Applications concurrently."""
        mode = self.config.devlake.dedupe
        apps = [_dedupe_view(work) for work in works]
        wanted = markers_to_read(apps, mode)
        existing = self.store.existing_markers(wanted) if wanted else set()
        claims = assign(apps, existing, mode, tick.claims)
        if mode == "component" and not tick.options.dry_run:
            claims = self._claim(works, claims, tick)
        tick.claims.update(claims.holders)
        workers = min(self.config.devlake.max_concurrency, len(works))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deliver") as pool:
            return list(pool.map(lambda work: self._deliver_app_isolated(work, existing, claims, tick), works))

    def _claim(self, works: Sequence[AppWork], claims: Claims, tick: Tick) -> Claims:
        """Claim in the store each change this page would send; a claim another deployment holds (a parallel shard,
        an earlier run) makes this one a duplicate. A won claim keeps the payload in the connection's backlog until
        it is delivered, so the change does not depend on this run or this Application surviving."""
        steps = {step.deployment.id: (work, step) for work in works for step in work.steps}
        wanted: list[ChangeClaim] = []
        for deployment_id, connection, markers in intended_claims(claims):
            work, step = steps[deployment_id]
            if step.payload is None:
                continue
            target = Target(connection, deployment_id)
            reason = "claimed a change its component's other Applications do not send"
            item = self._backlog_item(work, step.payload, target, (target.sent, *markers), reason)
            aliases = tuple(claim_key(marker) for marker in markers[1:])
            wanted.append(ChangeClaim(claim_key(markers[0]), item, aliases))
        if not wanted:
            return claims
        holders = self.store.claim_changes(wanted)
        won = [claim for claim in wanted if all(holders.get(key) == claim.holder for key in claim.keys)]
        tick.backlog.keep(claim.item.slot for claim in won)
        return settle_claims(claims, holders)

    def _backlog_item(
        self, work: AppWork, payload: Mapping[str, Any], target: Target, markers: Sequence[str], reason: str
    ) -> BacklogItem:
        key = work.observation.key
        slot = BacklogSlot(key.cluster, target.connection_id, target.deployment_id, target.queued)
        return BacklogItem(slot, key, dict(payload), tuple(markers), self.clock(), reason)

    # -- one Application -----------------------------------------------------------------------------

    def _deliver_app_isolated(self, work: AppWork, existing: set[str], claims: Claims, tick: Tick) -> AppResult:
        """A bug met while delivering one Application holds back that Application only."""
        try:
            return self._deliver_app(work, existing, claims, tick)
        except StoreUnavailable:
            raise
        except Exception as error:
            key = work.observation.key
            log.exception("delivery failed unexpectedly; retrying next run", extra={"app": str(key)})
            cause = f"internal error while delivering ({type(error).__name__})"
            return AppResult(errors=[RunError(cause, None, str(key))])

    def _deliver_app(self, work: AppWork, existing: set[str], claims: Claims, tick: Tick) -> AppResult:
        """Deliver an Application's deployments strictly in order; stop at the first that cannot go out (what a
        connection refuses for its configuration waits in its backlog and does not stop the others)."""
        result = AppResult()
        key = work.observation.key
        dry_run = tick.options.dry_run
        commits = self.previous_commits(work.snapshot)
        saved = work.plan.decided_snapshot or work.snapshot
        total = len(work.steps)
        for index, step in enumerate(work.steps):
            deployment, outcome = step.deployment, step.outcome
            if tick.halted():
                result.deferred += total - index
                return result
            if isinstance(outcome, Deferred):
                result.deferred += total - index
                if outcome.unreadable is not None:
                    result.held_unreadable += total - index
                log.log(
                    logging.INFO if outcome.reported else logging.WARNING,
                    "deployment deferred to the next run",
                    extra={"app": str(key), "deployment_id": deployment.id, "reason": outcome.reason},
                )
                return result
            payload = step.payload
            if isinstance(outcome, Skipped) or payload is None:
                reason = outcome.reason if isinstance(outcome, Skipped) else step.unsendable
                result.skipped += 1
                log.warning(
                    "deployment has no commit DevLake can take; recorded without sending",
                    extra={"app": str(key), "deployment_id": deployment.id, "reason": reason},
                )
                commits = step.commits
                saved = deployment.snapshot_after.evolve(commits=dict(commits))
                if not dry_run:
                    self.store.record_delivery(key, saved, [])
                continue
            decision = claims.of(deployment.id)
            record = self._deliver_step(work, step, payload, decision, existing, tick)
            result.add(record.stats)
            if not record.done:
                if (record.markers or record.backlog) and saved is not None and not dry_run:
                    self._record(key, saved, record, tick)
                return result
            if deployment.result is Result.SUCCESS:
                result.success += 1
            else:
                result.failed += 1
            self._log_delivered(work, deployment, record, dry_run)
            record.markers.extend(decision.changes)
            commits = step.commits
            saved = deployment.snapshot_after.evolve(commits=dict(commits))
            if not dry_run:
                self._record(key, saved, record, tick)
                if self.metrics:
                    self.metrics.deployment_recorded(deployment)
        final = work.plan.snapshot.evolve(commits=dict(commits))
        if final != saved and not dry_run:
            self.store.save_snapshots({key: final})
        return result

    def _record(self, key: AppKey, snapshot: Snapshot, record: StepRecord, tick: Tick) -> None:
        self.store.record_delivery(key, snapshot, record.markers, backlog=record.backlog, delivered=record.delivered)
        tick.backlog.done(record.delivered)
        tick.backlog.keep(item.slot for item in record.backlog)

    def _deliver_step(
        self,
        work: AppWork,
        step: PreparedStep,
        payload: Mapping[str, Any],
        decision: Decision,
        existing: set[str],
        tick: Tick,
    ) -> StepRecord:
        """Send one deployment to each of its connections and say what to record."""
        record = StepRecord()
        stats = record.stats
        deployment = step.deployment
        for connection in work.connections:
            target = Target(connection.id, deployment.id)
            if target.deduped in existing or target.queued in existing:
                continue
            # Never re-sent, not even by a backfill: the verdict of an entry that is no longer the newest can
            # only be re-derived as "superseded: SUCCESS", which would overwrite a FAILURE in DevLake.
            if target.sent in existing or (target.rejected in existing and not tick.options.backfill):
                continue
            duplicate = decision.duplicates.get(connection.id)
            if duplicate is not None:
                stats.deduplicated += 1
                log.info(
                    "another Application of this component sends the same change; not sent again",
                    extra={
                        "deployment_id": deployment.id,
                        "connection": connection.id,
                        "app": str(deployment.key),
                        "reason": duplicate,
                    },
                )
                record.markers.append(target.deduped)
                # The change is in DevLake (or claimed, its payload kept) under another key: this deployment's own
                # keys say so too, so a later deployment knowing the change only by one of them matches it.
                record.markers.extend(decision.markers(connection.id))
                continue
            if tick.options.dry_run:
                self._print_dry_run(connection.id, payload)
                stats.would_send += 1
                continue
            components = decision.markers(connection.id)
            slot = BacklogSlot(deployment.key.cluster, connection.id, deployment.id, target.queued)
            down = tick.breaker.held_back(connection.id)
            if down is not None:
                stats.errors.append(
                    tick.held_back.get(connection.id) or RunError(f"DevLake connection {connection.id}: {down}")
                )
                # The connection's one error line said why; a line per deployment would bury it.
                refused = tick.breaker.refused(connection.id)
                self._hold(work, payload, target, components, record, down, refused=refused, quiet=True)
                continue
            delivery = self._send(connection, payload, tick)
            if delivery.outcome is DeliveryOutcome.DELIVERED:
                stats.sent += 1
                record.markers.append(target.sent)
                record.delivered.append(slot)
                record.markers.extend(components)
            elif delivery.outcome is DeliveryOutcome.REJECTED:
                stats.dead_lettered += 1
                record.markers.append(target.rejected)
                record.delivered.append(slot)
                self._dead_letter(
                    connection.id,
                    deployment.id,
                    deployment.key,
                    deployment.result.value,
                    payload,
                    delivery.status,
                    delivery.message,
                )
            else:
                stats.errors.append(self._failure(connection.id, delivery, str(deployment.key), tick))
                refused = refused_configuration(delivery)
                self._hold(
                    work, payload, target, components, record, delivery.message, refused=refused, status=delivery.status
                )
        return record

    @staticmethod
    def _failure(connection_id: int, delivery: Delivery, example: str, tick: Tick) -> RunError:
        """The run error a failed delivery counts under; the first one that holds its connection back becomes the
        cause every deployment that connection then holds is counted under."""
        error = RunError(
            f"DevLake connection {connection_id}: {delivery.cause or delivery.message}", delivery.status, example
        )
        if tick.breaker.held_back(connection_id) is not None:
            tick.held_back.setdefault(connection_id, error)
        return error

    def _hold(
        self,
        work: AppWork,
        payload: Mapping[str, Any],
        target: Target,
        components: Sequence[str],
        record: StepRecord,
        reason: str,
        *,
        refused: bool,
        status: int | None = None,
        quiet: bool = False,
    ) -> None:
        """A connection that cannot take this deployment now: refused for its configuration, it waits in that
        connection's backlog and the Application goes on; anything else holds the Application back.

        ``quiet``: the connection was held back by an earlier failure, whose line said why; a line per deployment
        would bury it (debug)."""
        record.stats.retry_later += 1
        fields: dict[str, Any] = {
            "app": str(work.observation.key),
            "deployment_id": target.deployment_id,
            "connection": target.connection_id,
        }
        if status is not None:
            fields["status"] = status
        fields["reason"] = reason
        emit = log.debug if quiet else log.warning
        if refused:
            markers = (target.sent, *components)
            record.backlog.append(self._backlog_item(work, payload, target, markers, f"refused: {reason}"))
            record.stats.backlogged += 1
            emit("connection refused its configuration; kept in its backlog for the next run", extra=fields)
            return
        record.done = False
        emit("delivery failed; will retry next run", extra=fields)

    def _send(self, connection: ConnectionConfig, payload: Mapping[str, Any], tick: Tick) -> Delivery:
        budget = tick.budget
        began = budget.clock()
        delivery = self.devlake.deliver(connection, payload, budget.deadline())
        if delivery.attempts > 1:
            budget.spend(budget.clock() - began)
        reason = tick.breaker.record(connection.id, delivery)
        if reason is not None:
            log.error(
                "DevLake connection held back for the rest of this run",
                extra={"connection": connection.id, "status": delivery.status, "reason": reason},
            )
        if self.metrics:
            self.metrics.delivery(connection.id, delivery.outcome.value)
        return delivery

    def _log_delivered(self, work: AppWork, deployment: Deployment, record: StepRecord, dry_run: bool) -> None:
        """One line per deployment recorded: where it went (connections that accepted it now), where it waits
        (connections that refused their configuration keep it in their backlog), or why not."""
        sent = [c.id for c in work.connections if Target(c.id, deployment.id).sent in record.markers]
        deduplicated = [c.id for c in work.connections if Target(c.id, deployment.id).deduped in record.markers]
        backlogged = [item.slot.connection for item in record.backlog]
        fields: dict[str, Any] = {
            "app": str(deployment.key),
            "deployment_id": deployment.id,
            "result": deployment.result.value,
            "connections": sent,
        }
        if deduplicated:
            fields["deduplicated"] = deduplicated
        if backlogged:
            fields["backlogged"] = backlogged
        if dry_run:
            log.debug("deployment printed (dry run)", extra={**fields, "connections": [c.id for c in work.connections]})
        elif sent:
            log.info("deployment delivered", extra=fields)
        elif backlogged:
            log.info("deployment recorded; it waits in the backlog of the connections that refused it", extra=fields)
        elif deduplicated:
            log.info("deployment recorded; another Application of its component sent the change", extra=fields)
        else:
            log.info("deployment recorded; every connection already had it", extra=fields)

    def _dead_letter(
        self,
        connection_id: int,
        deployment_id: str,
        app: AppKey,
        result: str | None,
        payload: Mapping[str, Any],
        status: int | None,
        message: str,
    ) -> None:
        log.error(
            "DevLake rejected the deployment; moved to the dead-letter list",
            extra={
                "app": str(app),
                "deployment_id": deployment_id,
                "result": result,
                "connection": connection_id,
                "status": status,
                "reason": message,
            },
        )
        if self.metrics:
            self.metrics.dead_letter()
        self.store.add_dead_letter(
            {
                "time": format_time(self.clock()),
                "connection": connection_id,
                "deployment_id": deployment_id,
                "app": str(app),
                "status": status,
                "message": message,
                "payload": dict(payload),
            }
        )

    def _print_dry_run(self, connection_id: int, payload: Mapping[str, Any]) -> None:
        line = json.dumps({"connection": connection_id, "payload": payload}, ensure_ascii=False)
        with self._output_lock:
            if self.dry_run_output is not None:
                print(line, file=self.dry_run_output, flush=True)


def _payload_result(payload: Mapping[str, Any]) -> str | None:
    """A stored payload's result as the logs spell it (``SUCCESS``, ``FAILED``), from DevLake's spelling."""
    result = payload.get("result")
    if not isinstance(result, str):
        return None
    return Result.FAILED.value if result == Result.FAILED.devlake else result


def _dedupe_view(work: AppWork) -> AppSteps:
    """What dedupe decides on: the deployments that have a payload, with their change and connections."""
    connections = tuple(connection.id for connection in work.connections)
    observation = work.observation
    steps = [
        Step(step.deployment.id, step.fingerprint, connections, step.aliases)
        for step in work.steps
        if step.payload is not None
    ]
    return AppSteps(observation.key, observation.uid, work.component, steps)
