"""Delivery of a page's planned deployments: payloads, dedupe, sending, recording; nothing lost, nothing twice.

Each Application's deployments go out strictly in order and stop at the first that cannot; after each one its
snapshot and markers are written in one transaction, so a crash anywhere leaves either "not sent" (sent again
under the same id: an upsert) or "sent and recorded". Applications are delivered concurrently. A permanent
rejection goes to the dead-letter list; a connection that cannot help this tick is held back (``ConnectionBreaker``);
retries share one time budget per tick (``RetryBudget``); a dry run prints each payload instead of sending it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from reconciler.config import Config, ConnectionConfig
from reconciler.dedupe import AppSteps, Claims, Decision, Step, Target, assign, change_fingerprint, markers_to_read
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
from reconciler.model import FULL_SHA, AppObservation, Deployment, EnrichedDeployment, Result, Snapshot, format_time
from reconciler.planner import Plan
from reconciler.run import RunError, RunOptions
from reconciler.store import Store, StoreUnavailable

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
        self._answered: set[int] = set()
        """Connections that accepted (or rejected for good) a deployment this tick."""
        self._failures: dict[int, int] = {}

    def held_back(self, connection_id: int) -> str | None:
        """Why the connection is not tried again this tick, or ``None``."""
        with self._lock:
            return self._down.get(connection_id)

    def record(self, connection_id: int, delivery: Delivery) -> str | None:
        """Note a delivery's answer. Returns the reason when this answer holds the connection back (once)."""
        with self._lock:
            if delivery.outcome is not DeliveryOutcome.RETRY_LATER:
                self._answered.add(connection_id)
                return None
            if delivery.status in CONFIGURATION_STATUSES or delivery.attempts == 0:
                reason = f"configuration refused: {delivery.message}"
            else:
                self._failures[connection_id] = failures = self._failures.get(connection_id, 0) + 1
                if connection_id in self._answered or failures < self.outage_failures:
                    return None
                reason = f"{failures} deliveries failed and none succeeded: {delivery.message}"
            if connection_id in self._down:
                return None
            self._down[connection_id] = reason
            return reason


def _never() -> bool:
    return False


@dataclass
class Tick:
    """What one pass shares across its pages and delivery workers. A new one per pass: nothing to reset."""

    options: RunOptions
    budget: RetryBudget
    breaker: ConnectionBreaker = field(default_factory=ConnectionBreaker)
    claims: dict[str, str] = field(default_factory=dict)
    """Component-change marker -> the deployment that sends it this tick (the first in listing order)."""
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
    errors: list[RunError] = field(default_factory=list)

    def add(self, other: AppResult) -> None:
        self.sent += other.sent
        self.would_send += other.would_send
        self.errors.extend(other.errors)
        self.retry_later += other.retry_later
        self.dead_lettered += other.dead_lettered
        self.deduplicated += other.deduplicated


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
                step.fingerprint = change_fingerprint(outcome, environment=str(step.payload["environment"]))
            commits.update(outcome.deployed_commits)
            step.commits = dict(commits)

    # -- a page --------------------------------------------------------------------------------------

    def deliver(self, works: Sequence[AppWork], tick: Tick) -> list[AppResult]:
        """Decide every delivery's dedupe in one batched store read, then deliver the Applications concurrently."""
        mode = self.config.devlake.dedupe
        apps = [_dedupe_view(work) for work in works]
        wanted = markers_to_read(apps, mode)
        existing = self.store.existing_markers(wanted) if wanted else set()
        claims = assign(apps, existing, mode, tick.claims)
        tick.claims.update(claims.holders)
        workers = min(self.config.devlake.max_concurrency, len(works))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deliver") as pool:
            return list(pool.map(lambda work: self._deliver_app_isolated(work, existing, claims, tick), works))

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
        """Deliver an Application's deployments strictly in order; stop at the first that cannot go out."""
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
            delivered, markers, stats = self._deliver_step(work, step, payload, decision, existing, tick)
            result.add(stats)
            if not delivered:
                if markers and saved is not None and not dry_run:
                    self.store.record_delivery(key, saved, markers)
                return result
            if deployment.result is Result.SUCCESS:
                result.success += 1
            else:
                result.failed += 1
            self._log_delivered(work, deployment, markers, dry_run)
            if decision.change is not None:
                markers.append(decision.change)
            commits = step.commits
            saved = deployment.snapshot_after.evolve(commits=dict(commits))
            if not dry_run:
                self.store.record_delivery(key, saved, markers)
                if self.metrics:
                    self.metrics.deployment_recorded(deployment)
        final = work.plan.snapshot.evolve(commits=dict(commits))
        if final != saved and not dry_run:
            self.store.save_snapshots({key: final})
        return result

    def _deliver_step(
        self,
        work: AppWork,
        step: PreparedStep,
        payload: Mapping[str, Any],
        decision: Decision,
        existing: set[str],
        tick: Tick,
    ) -> tuple[bool, list[str], AppResult]:
        """Send one deployment to each of its connections. Returns (all done, markers to record, counts)."""
        stats = AppResult()
        deployment = step.deployment
        markers: list[str] = []
        all_done = True
        for connection in work.connections:
            target = Target(connection.id, deployment.id)
            if target.deduped in existing:
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
                markers.append(target.deduped)
                continue
            if tick.options.dry_run:
                self._print_dry_run(connection.id, payload)
                stats.would_send += 1
                continue
            down = tick.breaker.held_back(connection.id)
            if down is not None:
                stats.retry_later += 1
                all_done = False
                stats.errors.append(
                    tick.held_back.get(connection.id) or RunError(f"DevLake connection {connection.id}: {down}")
                )
                # The connection's one error line said why; a line per deployment would bury it.
                log.debug(
                    "connection held back for the rest of this run; will retry next run",
                    extra={"deployment_id": deployment.id, "connection": connection.id, "reason": down},
                )
                continue
            delivery = self._send(connection, payload, tick)
            if delivery.outcome is DeliveryOutcome.DELIVERED:
                stats.sent += 1
                markers.append(target.sent)
                component = decision.components.get(connection.id)
                if component is not None:
                    markers.append(component)
            elif delivery.outcome is DeliveryOutcome.REJECTED:
                stats.dead_lettered += 1
                markers.append(target.rejected)
                self._dead_letter(connection.id, deployment, payload, delivery.status, delivery.message)
            else:
                stats.retry_later += 1
                all_done = False
                error = RunError(
                    f"DevLake connection {connection.id}: {delivery.cause or delivery.message}",
                    delivery.status,
                    str(deployment.key),
                )
                stats.errors.append(error)
                if tick.breaker.held_back(connection.id) is not None:
                    tick.held_back.setdefault(connection.id, error)
                log.warning(
                    "delivery failed; will retry next run",
                    extra={
                        "deployment_id": deployment.id,
                        "connection": connection.id,
                        "status": delivery.status,
                        "reason": delivery.message,
                    },
                )
        return all_done, markers, stats

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

    def _log_delivered(self, work: AppWork, deployment: Deployment, markers: Sequence[str], dry_run: bool) -> None:
        """One line per deployment recorded: where it went (connections that accepted it now), or why not."""
        sent = [c.id for c in work.connections if Target(c.id, deployment.id).sent in markers]
        deduplicated = [c.id for c in work.connections if Target(c.id, deployment.id).deduped in markers]
        fields: dict[str, Any] = {
            "app": str(deployment.key),
            "deployment_id": deployment.id,
            "result": deployment.result.value,
            "connections": sent,
        }
        if deduplicated:
            fields["deduplicated"] = deduplicated
        if dry_run:
            log.debug("deployment printed (dry run)", extra={**fields, "connections": [c.id for c in work.connections]})
        elif sent:
            log.info("deployment delivered", extra=fields)
        elif deduplicated:
            log.info("deployment recorded; another Application of its component sent the change", extra=fields)
        else:
            log.info("deployment recorded; every connection already had it", extra=fields)

    def _dead_letter(
        self, connection_id: int, deployment: Deployment, payload: Mapping[str, Any], status: int | None, message: str
    ) -> None:
        log.error(
            "DevLake rejected the deployment; moved to the dead-letter list",
            extra={
                "app": str(deployment.key),
                "deployment_id": deployment.id,
                "result": deployment.result.value,
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
                "deployment_id": deployment.id,
                "app": str(deployment.key),
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


def _dedupe_view(work: AppWork) -> AppSteps:
    """What dedupe decides on: the deployments that have a payload, with their change and connections."""
    connections = tuple(connection.id for connection in work.connections)
    observation = work.observation
    steps = [Step(step.deployment.id, step.fingerprint, connections) for step in work.steps if step.payload is not None]
    return AppSteps(observation.key, observation.uid, work.component, steps)
