"""One tick: list -> load snapshots -> plan -> enrich -> deliver -> save.

This module knows the order of the stages and nothing of their rules. Per-Application errors are
isolated: a malformed object is skipped with a reason, a failing delivery holds back only its own
Application, and a cluster that cannot be listed does not stop the others.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol, TextIO

from reconciler.application import MalformedApplication, application_key, parse_application, settled_digest
from reconciler.argocd import ClusterLister, ClusterUnavailable
from reconciler.config import ClusterConfig, Config, ConnectionConfig
from reconciler.devlake import (
    CONFIGURATION_STATUSES,
    Delivery,
    DeliveryOutcome,
    DevLakeClient,
    PayloadError,
    Router,
    build_payload,
    commit_set_fingerprint,
)
from reconciler.enrich import Deferred, Enricher, Skipped
from reconciler.exitcodes import UsageError
from reconciler.github import GitHubClient
from reconciler.images import CommitImages, InvalidImageReference, RepositoryMapper, parse_image
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
from reconciler.planner import Plan, PlannerPolicy, plan
from reconciler.store import LockHeld, RunLock, Store, StoreUnavailable

log = logging.getLogger(__name__)

LOCK_TTL_SECONDS = 60
LOCK_RENEW_SECONDS = 20
PROGRESS_EVERY_SECONDS = 10.0
OUTAGE_FAILURES = 5
"""Deliveries to one connection that may fail (each after its retries) before it is held back for the tick,
as long as it has accepted none."""
OCCURRENCES_PROBED = 8
"""How many earlier occurrences of one change by one Application component dedupe looks up; past that the
change is sent anyway (a possible duplicate beats a lost deployment)."""


class ListerFactory(Protocol):
    def __call__(self, cluster: ClusterConfig) -> ClusterLister: ...


class Metrics(Protocol):
    def deployment_recorded(self, deployment: Deployment) -> None: ...
    def delivery(self, connection_id: int, outcome: str) -> None: ...
    def dead_letter(self) -> None: ...
    def tick_finished(self, summary: RunSummary) -> None: ...


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` with ``0 <= I < N``."""
        try:
            index_text, count_text = text.split("/", 1)
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise UsageError(f"--shard expects I/N, got {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise UsageError(f"--shard expects 0 <= I < N, got {text!r}")
        return cls(index, count)

    def owns(self, key: AppKey) -> bool:
        digest = hashlib.sha256(f"{key.cluster}/{key.namespace}/{key.name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class RunOptions:
    dry_run: bool = False
    clusters: tuple[str, ...] = ()
    """Only these clusters (``--cluster``); empty: every configured cluster."""
    shard: Shard | None = None
    backfill: bool = False
    since: datetime | None = None


@dataclass
class RunSummary:
    run_id: str
    command: str
    started_at: str
    finished_at: str = ""
    apps_listed: int = 0
    apps_malformed: int = 0
    deployments_success: int = 0
    deployments_failed: int = 0
    deployments_pending: int = 0
    deployments_skipped: int = 0
    deployments_deferred: int = 0
    deployments_held_unreadable: int = 0
    """Of the deferred: held back because GitHub cannot read a repository they need (named in ``errors``)."""
    deployments_deduplicated: int = 0
    sent: int = 0
    retry_later: int = 0
    dead_lettered: int = 0
    github_requests: int = 0
    rate_limit_remaining: int | None = None
    rate_limit_reset: str | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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


@dataclass
class _Target:
    """One deployment to one connection, with the markers that say it happened."""

    connection: ConnectionConfig
    sent: str
    """Written once DevLake accepted it."""
    deduped: str
    """Written instead of ``sent`` when another Application of the component sends this change."""
    rejected: str
    """Written instead of ``sent`` when DevLake refused it for good (dead-lettered): a run moves on, a
    backfill tries it again once the operator has fixed the cause."""
    component: str | None = None
    """The component-change marker; ``None`` when this delivery is not deduplicated (``dedupe: application``,
    or a deployment already recorded that a backfill sees again)."""


@dataclass
class _Step:
    """One planned deployment of an Application, prepared for delivery."""

    deployment: Deployment
    outcome: EnrichedDeployment | Deferred | Skipped
    commits: dict[str, str]
    """The snapshot's ``commits`` once this deployment is recorded."""
    payload: dict[str, Any] | None = None
    unsendable: str | None = None
    """Why no payload could be built (``PayloadError``): recorded without sending, like ``Skipped``."""
    fingerprint: str | None = None
    change: str | None = None
    """This Application's marker for its n-th occurrence of the change, written once the deployment is recorded."""
    targets: list[_Target] = field(default_factory=list)


class _Changed(NamedTuple):
    observation: AppObservation
    stored: Snapshot | None
    digest: str | None


@dataclass
class _AppWork:
    observation: AppObservation
    snapshot: Snapshot | None
    plan: Plan
    component: str = ""
    steps: list[_Step] = field(default_factory=list)


@dataclass
class _AppResult:
    success: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0
    held_unreadable: int = 0
    deduplicated: int = 0
    sent: int = 0
    retry_later: int = 0
    dead_lettered: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: _AppResult) -> None:
        self.sent += other.sent
        self.retry_later += other.retry_later
        self.dead_lettered += other.dead_lettered
        self.deduplicated += other.deduplicated


class Reconciler:
    """Runs reconciliation passes with the clients it is given (so tests can point them at fakes)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        github: GitHubClient,
        devlake: DevLakeClient,
        *,
        lister_factory: ListerFactory = ClusterLister,
        metrics: Metrics | None = None,
        dry_run_output: TextIO | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        stop: threading.Event | None = None,
        progress: Callable[[RunSummary], None] | None = None,
        progress_every: float | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.store = store
        self.github = github
        self.devlake = devlake
        self.enricher = Enricher(config, github, clock=clock)
        self.mapper = RepositoryMapper(config.images)
        self.router = Router(config.devlake)
        self.lister_factory = lister_factory
        self.metrics = metrics
        self.dry_run_output = dry_run_output
        self.clock = clock
        self.stop = stop or threading.Event()
        self.progress = progress
        self.progress_every = PROGRESS_EVERY_SECONDS if progress_every is None else progress_every
        """Seconds between two ``progress`` calls (checked after each page of Applications)."""
        self.monotonic = monotonic
        self._claims: dict[str, str] = {}
        """Component-change marker -> the deployment id that sends it this tick (the first in listing order)."""
        self._down: dict[int, str] = {}
        """Connections that will not be tried again this tick, with the reason."""
        self._answered: set[int] = set()
        """Connections that accepted (or rejected for good) a deployment this tick."""
        self._failures: dict[int, int] = {}
        self._locks: list[RunLock] = []
        self._state_lock = threading.Lock()
        self._output_lock = threading.Lock()

    # -- the run -------------------------------------------------------------------------------------

    def run(self, options: RunOptions, command: str = "run") -> RunSummary:
        """One pass over every selected cluster. Raises ``LockHeld`` when another run holds a cluster."""
        # What exists before the pass (modules, clients, config) outlives it: moving it out of the collector's
        # reach keeps the many short-lived objects of decoding pages from re-scanning it. Unfrozen afterwards,
        # so that in ``serve`` garbage frozen by chance is collected after all.
        gc.freeze()
        try:
            return self._run(options, command)
        finally:
            gc.unfreeze()

    def _run(self, options: RunOptions, command: str) -> RunSummary:
        started = self.monotonic()
        summary = RunSummary(run_id=uuid.uuid4().hex[:12], command=command, started_at=format_time(self.clock()))
        clusters = self._selected_clusters(options)
        self.github.reset_tick()
        self._claims.clear()
        self._down.clear()
        self._answered.clear()
        self._failures.clear()
        self._locks = []
        budget = RetryBudget(self.config.devlake.retry_budget.total_seconds(), self.monotonic)
        with ExitStack() as locks:
            if not options.dry_run:
                suffix = f":{options.shard.index}of{options.shard.count}" if options.shard else ""
                shards = options.shard.count if options.shard else 1
                for cluster in sorted(clusters, key=lambda c: c.name):
                    # Runs of one shard layout share this lock and keep runs of another layout out: a
                    # manual unsharded run never works the same Applications as a sharded one. An unsharded
                    # run is its layout's only holder and releases it; shards leave it to expire.
                    self._locks.append(
                        locks.enter_context(
                            RunLock(
                                self.store,
                                f"layout:{cluster.name}",
                                owner=f"layout-{shards}",
                                ttl_seconds=LOCK_TTL_SECONDS,
                                renew_every=LOCK_RENEW_SECONDS,
                                shared=True,
                                keep=shards > 1,
                            )
                        )
                    )
                    self._locks.append(
                        locks.enter_context(
                            RunLock(
                                self.store,
                                f"run:{cluster.name}{suffix}",
                                owner=summary.run_id,
                                ttl_seconds=LOCK_TTL_SECONDS,
                                renew_every=LOCK_RENEW_SECONDS,
                            )
                        )
                    )
            for cluster in clusters:
                if self._halted():
                    summary.errors.append("stopped before every cluster was reconciled")
                    break
                try:
                    self._run_cluster(cluster, options, summary, budget)
                except ClusterUnavailable as error:
                    summary.errors.append(f"cluster {cluster.name}: {error}")
                    log.error("cluster unavailable", extra={"cluster": cluster.name, "reason": str(error)})
                except StoreUnavailable as error:
                    summary.errors.append(f"state store unavailable: {error}")
                    log.error("state store unavailable; stopping the tick", extra={"reason": str(error)})
                    break
                except Exception as error:
                    # A bug or an unforeseen failure in one cluster holds back what is left of that cluster only.
                    reason = f"unexpected {type(error).__name__}: {error}"
                    summary.errors.append(f"cluster {cluster.name}: {reason}")
                    log.error("cluster failed", exc_info=True, extra={"cluster": cluster.name, "reason": reason})
            if self._lock_lost():
                summary.errors.append("the run lock was lost: stopped sending, the rest is left to the next run")
        summary.github_requests = self.github.requests
        summary.errors.extend(self.github.tick_problems())
        summary.rate_limit_remaining = self.github.rate_limit_remaining
        reset = self.github.rate_limit_reset
        summary.rate_limit_reset = format_time(reset) if reset else None
        summary.finished_at = format_time(self.clock())
        summary.seconds = round(self.monotonic() - started, 3)
        failed = summary.errors or summary.retry_later or summary.deployments_deferred
        summary.exit_code = 1 if failed else 0
        if not options.dry_run:
            try:
                self.store.add_run_summary(summary.as_dict())
            except StoreUnavailable as error:
                log.warning("could not record the run summary", extra={"reason": str(error)})
        if self.metrics:
            self.metrics.tick_finished(summary)
        return summary

    def _selected_clusters(self, options: RunOptions) -> list[ClusterConfig]:
        if not options.clusters:
            return list(self.config.clusters)
        unknown = sorted(set(options.clusters) - {c.name for c in self.config.clusters})
        if unknown:
            raise UsageError(f"unknown cluster(s): {', '.join(unknown)}")
        return [c for c in self.config.clusters if c.name in options.clusters]

    def _lock_lost(self) -> bool:
        return any(lock.lost for lock in self._locks)

    def _halted(self) -> bool:
        """Stop sending: asked to stop (SIGTERM), or the run lock was lost and another run may be sending."""
        return self.stop.is_set() or self._lock_lost()

    # -- one cluster ---------------------------------------------------------------------------------

    def _run_cluster(
        self, cluster: ClusterConfig, options: RunOptions, summary: RunSummary, budget: RetryBudget
    ) -> None:
        now = self.clock()
        initialized_at = self.store.initialized_at(cluster.name)
        policy = planner_policy(self.config, initialized_at, options)
        seen: set[AppKey] = set()
        salt = _decision_salt(self.config)
        last_progress = self.monotonic()
        for page in self.lister_factory(cluster).pages():
            changed = self._parse_page(page, cluster.name, options, summary, salt, seen)
            self._process_page(changed, policy, now, options, summary, budget)
            if self._halted():
                summary.errors.append(f"cluster {cluster.name}: stopped before the listing was finished")
                return
            if self.progress and self.monotonic() - last_progress >= self.progress_every:
                self.progress(summary)
                last_progress = self.monotonic()
        if options.dry_run:
            return
        self._forget_unlisted(cluster.name, seen, options.shard, now)
        if initialized_at is None:
            self.store.set_initialized_at(cluster.name, now)
            log.info("cluster initialised", extra={"cluster": cluster.name, "apps": len(seen)})

    def _parse_page(
        self,
        page: Sequence[Any],
        cluster: str,
        options: RunOptions,
        summary: RunSummary,
        salt: str,
        seen: set[AppKey],
    ) -> list[_Changed]:
        """The selected Applications of a page that may have changed, parsed, with their stored snapshots.

        An Application whose settled digest equals the one its snapshot stored is unchanged since a tick
        that left nothing to decide: it is not parsed nor planned (the steady state costs the listing, one
        batched snapshot read and a digest per Application). A backfill looks at everything.
        """
        candidates: list[tuple[Any, AppKey | None]] = []
        for raw in page:
            key = application_key(raw, cluster)
            if key is not None and not self._selected(key, options):
                continue
            candidates.append((raw, key))
        snapshots = self.store.load_stored([key for _, key in candidates if key is not None])
        changed: list[_Changed] = []
        for raw, key in candidates:
            item = snapshots.get(key) if key is not None else None
            digest = None if options.backfill else settled_digest(raw, salt)
            if key is not None and item is not None and digest is not None and item.settled_digest == digest:
                seen.add(key)
                summary.apps_listed += 1
                continue
            stored = item.snapshot() if item is not None else None
            try:
                observation = parse_application(raw, cluster)
            except Exception as error:
                # Listed but unreadable is not deleted: its snapshot stays until it can be read again.
                if key is not None:
                    seen.add(key)
                summary.apps_malformed += 1
                unexpected = not isinstance(error, MalformedApplication)
                reason = f"unexpected {type(error).__name__}: {error}" if unexpected else str(error)
                log.warning(
                    "skipping malformed application",
                    exc_info=unexpected,
                    extra={"cluster": cluster, "app": _raw_name(raw), "reason": reason},
                )
                continue
            if key is None and not self._selected(observation.key, options):
                continue
            seen.add(observation.key)
            summary.apps_listed += 1
            changed.append(_Changed(observation, stored, digest))
        return changed

    def _selected(self, key: AppKey, options: RunOptions) -> bool:
        if not self.config.applications.selects(key.qualified_name):
            return False
        return options.shard is None or options.shard.owns(key)

    def _process_page(
        self,
        changed: list[_Changed],
        policy: PlannerPolicy,
        now: datetime,
        options: RunOptions,
        summary: RunSummary,
        budget: RetryBudget,
    ) -> None:
        if not changed:
            return
        quiet: dict[AppKey, Snapshot] = {}
        busy: list[_AppWork] = []
        for observation, stored, digest in changed:
            # The planner never sees (so never carries forward) a settled digest: only a settled plan sets one.
            snapshot = stored.evolve(settled_digest=None) if stored and stored.settled_digest else stored
            try:
                app_plan = plan(observation, snapshot, now, policy)
            except Exception as error:
                log.exception("could not plan the application; retrying next run", extra={"app": str(observation.key)})
                summary.errors.append(f"{observation.key}: internal error while planning ({type(error).__name__})")
                continue
            for note in app_plan.notes:
                log.info(note, extra={"app": str(observation.key)})
            if app_plan.snapshot.pending is not None:
                summary.deployments_pending += 1
            if app_plan.deployments:
                busy.append(_AppWork(observation, snapshot, app_plan))
                continue
            if app_plan.deferred:
                continue
            final = app_plan.snapshot
            if digest is not None and final.pending is None:
                final = final.evolve(settled_digest=digest)
            if final != stored:
                quiet[observation.key] = final
        if quiet and not options.dry_run:
            self.store.save_snapshots(quiet)
        if not busy:
            return
        outcomes = self.enricher.enrich_many(
            [(work.plan.deployments, self._previous_commits(work.snapshot)) for work in busy]
        )
        works: list[_AppWork] = []
        for work, app_outcomes in zip(busy, outcomes, strict=True):
            try:
                self._prepare(work, app_outcomes)
            except Exception as error:
                key = work.observation.key
                log.exception("could not prepare the deliveries; retrying next run", extra={"app": str(key)})
                summary.errors.append(f"{key}: internal error while preparing deliveries ({type(error).__name__})")
                continue
            works.append(work)
        if not works:
            return
        existing = self._assign(works)
        workers = min(self.config.devlake.max_concurrency, len(works))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deliver") as pool:
            results = list(pool.map(lambda work: self._deliver_app_isolated(work, existing, options, budget), works))
        for result in results:
            summary.deployments_success += result.success
            summary.deployments_failed += result.failed
            summary.deployments_skipped += result.skipped
            summary.deployments_deferred += result.deferred
            summary.deployments_held_unreadable += result.held_unreadable
            summary.deployments_deduplicated += result.deduplicated
            summary.sent += result.sent
            summary.retry_later += result.retry_later
            summary.dead_lettered += result.dead_lettered
            summary.errors.extend(result.errors)

    # -- preparing a page's deliveries ---------------------------------------------------------------

    def _prepare(self, work: _AppWork, outcomes: Sequence[EnrichedDeployment | Deferred | Skipped]) -> None:
        """Build each deployment's payload and change fingerprint, carrying the compare base forward as the
        deliveries will (a held-back deployment stops the Application, so what follows it never runs)."""
        observation = work.observation
        key = observation.key
        work.component = self.config.applications.component_of(key.name, observation.labels)
        source_paths = [s.path for s in observation.sources if s.path]
        commits = self._previous_commits(work.snapshot)
        for deployment, outcome in zip(work.plan.deployments, outcomes, strict=True):
            step = _Step(deployment, outcome, dict(commits))
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
                step.fingerprint = commit_set_fingerprint(
                    outcome, environment=str(step.payload["environment"]), previous=commits
                )
            commits.update(outcome.deployed_commits)
            step.commits = dict(commits)

    def _assign(self, works: Sequence[_AppWork]) -> set[str]:
        """Decide every delivery's markers for a page in two batched store reads, and give each component
        change to the first Application in listing order that makes it this tick, so that who sends it does
        not depend on thread timing (the same ids after a crash or a wiped store). Returns the markers
        already in the store."""
        dedupe = self.config.devlake.dedupe == "component"
        probes: list[str] = []
        for work in works:
            connections = self.router.connections_for(work.observation.key, work.component)
            for step in work.steps:
                if step.payload is None:
                    continue
                for connection in connections:
                    target = _Target(
                        connection,
                        _sent_marker(connection.id, step.deployment.id),
                        _deduped_marker(connection.id, step.deployment.id),
                        _rejected_marker(connection.id, step.deployment.id),
                    )
                    step.targets.append(target)
                    probes += [target.sent, target.deduped, target.rejected]
                if dedupe and step.fingerprint is not None:
                    probes += [
                        _change_marker(work.observation, step.fingerprint, occurrence)
                        for occurrence in range(1, OCCURRENCES_PROBED + 1)
                    ]
        existing = self.store.existing_markers(probes) if probes else set()
        if not dedupe:
            return existing
        components: list[str] = []
        for work in works:
            in_this_tick: dict[str, int] = {}
            for step in work.steps:
                fingerprint = step.fingerprint
                if fingerprint is None or not step.targets:
                    continue
                if all(_handled(target, existing) for target in step.targets):
                    continue  # recorded before (a backfill sees it again): its occurrence is already counted
                earlier = 0
                while (
                    earlier < OCCURRENCES_PROBED
                    and _change_marker(work.observation, fingerprint, earlier + 1) in existing
                ):
                    earlier += 1
                occurrence = earlier + in_this_tick.get(fingerprint, 0) + 1
                in_this_tick[fingerprint] = in_this_tick.get(fingerprint, 0) + 1
                if earlier == OCCURRENCES_PROBED:
                    continue
                step.change = _change_marker(work.observation, fingerprint, occurrence)
                for target in step.targets:
                    target.component = _component_marker(target.connection.id, work.component, fingerprint, occurrence)
                    components.append(target.component)
        if components:
            existing |= self.store.existing_markers(components)
        with self._state_lock:
            for work in works:
                for step in work.steps:
                    for target in step.targets:
                        if target.component is None or _handled(target, existing) or target.component in existing:
                            continue
                        self._claims.setdefault(target.component, step.deployment.id)
        return existing

    # -- one application -----------------------------------------------------------------------------

    def _deliver_app_isolated(
        self, work: _AppWork, existing: set[str], options: RunOptions, budget: RetryBudget
    ) -> _AppResult:
        """A bug met while delivering one Application holds back that Application only."""
        try:
            return self._deliver_app(work, existing, options, budget)
        except StoreUnavailable:
            raise
        except Exception as error:
            key = work.observation.key
            log.exception("delivery failed unexpectedly; retrying next run", extra={"app": str(key)})
            return _AppResult(errors=[f"{key}: internal error while delivering ({type(error).__name__})"])

    def _deliver_app(self, work: _AppWork, existing: set[str], options: RunOptions, budget: RetryBudget) -> _AppResult:
        """Deliver an Application's deployments strictly in order; stop at the first that cannot go out.

        After each deployment its snapshot and its markers are written in one transaction, so a crash
        anywhere leaves either "not sent" (sent again under the same id: an upsert) or "sent and recorded".
        """
        result = _AppResult()
        key = work.observation.key
        commits = self._previous_commits(work.snapshot)
        saved = work.snapshot
        total = len(work.steps)
        for index, step in enumerate(work.steps):
            deployment, outcome = step.deployment, step.outcome
            if self._halted():
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
                if not options.dry_run:
                    self.store.record_delivery(key, saved, [])
                continue
            delivered, markers, stats = self._deliver_step(step, payload, existing, options, budget)
            result.add(stats)
            if not delivered:
                if markers and saved is not None and not options.dry_run:
                    self.store.record_delivery(key, saved, markers)
                result.errors.append(f"{key}: {deployment.id} will be retried next run")
                return result
            if deployment.result is Result.SUCCESS:
                result.success += 1
            else:
                result.failed += 1
            if step.change is not None:
                markers.append(step.change)
            commits = step.commits
            saved = deployment.snapshot_after.evolve(commits=dict(commits))
            if not options.dry_run:
                self.store.record_delivery(key, saved, markers)
                if self.metrics:
                    self.metrics.deployment_recorded(deployment)
        final = work.plan.snapshot.evolve(commits=dict(commits))
        if final != saved and not options.dry_run:
            self.store.save_snapshots({key: final})
        return result

    def _previous_commits(self, snapshot: Snapshot | None) -> dict[str, str]:
        """The compare base per GitHub repository: the heads delivered last time, else the full-SHA image
        tags the snapshot recorded (a baseline resolves nothing, so its first deployment still gets a range)."""
        if snapshot is None:
            return {}
        commits = dict(snapshot.commits)
        for repository, tag in snapshot.images.items():
            if not FULL_SHA.fullmatch(tag):
                continue
            try:
                repo = self.mapper.repository_for(parse_image(repository))
            except InvalidImageReference:
                continue
            if repo is not None:
                commits.setdefault(repo, tag)
        return commits

    def _deliver_step(
        self,
        step: _Step,
        payload: Mapping[str, Any],
        existing: set[str],
        options: RunOptions,
        budget: RetryBudget,
    ) -> tuple[bool, list[str], _AppResult]:
        """Send one deployment to each of its connections. Returns (all done, markers to record, counts)."""
        stats = _AppResult()
        deployment = step.deployment
        markers: list[str] = []
        all_done = True
        for target in step.targets:
            connection = target.connection
            if target.deduped in existing:
                continue
            # Never re-sent, not even by a backfill: the verdict of an entry that is no longer the newest can
            # only be re-derived as "superseded: SUCCESS", which would overwrite a FAILURE in DevLake.
            if target.sent in existing or (target.rejected in existing and not options.backfill):
                continue
            if target.component is not None and (
                target.component in existing or self._claim_holder(target.component) != deployment.id
            ):
                stats.deduplicated += 1
                holder = self._claim_holder(target.component)
                log.info(
                    "another Application of this component sends the same change; not sent again",
                    extra={
                        "deployment_id": deployment.id,
                        "connection": connection.id,
                        "app": str(deployment.key),
                        "reason": f"sent as {holder}" if holder else "already in DevLake",
                    },
                )
                markers.append(target.deduped)
                continue
            if options.dry_run:
                self._print_dry_run(connection.id, payload)
                stats.sent += 1
                continue
            down = self._connection_down(connection.id)
            if down is not None:
                stats.retry_later += 1
                all_done = False
                log.warning(
                    "connection held back for the rest of this run; will retry next run",
                    extra={"deployment_id": deployment.id, "connection": connection.id, "reason": down},
                )
                continue
            began = budget.clock()
            delivery = self.devlake.deliver(connection, payload, budget.deadline())
            if delivery.attempts > 1:
                budget.spend(budget.clock() - began)
            self._note_answer(connection.id, delivery)
            if self.metrics:
                self.metrics.delivery(connection.id, delivery.outcome.value)
            if delivery.outcome is DeliveryOutcome.DELIVERED:
                stats.sent += 1
                markers.append(target.sent)
                if target.component is not None:
                    markers.append(target.component)
            elif delivery.outcome is DeliveryOutcome.REJECTED:
                stats.dead_lettered += 1
                markers.append(target.rejected)
                self._dead_letter(connection.id, deployment, payload, delivery.status, delivery.message)
            else:
                stats.retry_later += 1
                all_done = False
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

    def _note_answer(self, connection_id: int, delivery: Delivery) -> None:
        """Hold a connection back for the rest of the tick once trying it again cannot help: DevLake refused its
        key or id (an operator's fix), or it has failed ``OUTAGE_FAILURES`` deliveries, each after its retries,
        without accepting one this tick (an outage: the rest would only spend time failing). One failing
        payload among successful ones never holds a connection back."""
        if delivery.outcome is not DeliveryOutcome.RETRY_LATER:
            with self._state_lock:
                self._answered.add(connection_id)
            return
        if delivery.status in CONFIGURATION_STATUSES or delivery.attempts == 0:
            reason = f"configuration refused: {delivery.message}"
        else:
            with self._state_lock:
                self._failures[connection_id] = failures = self._failures.get(connection_id, 0) + 1
                if connection_id in self._answered or failures < OUTAGE_FAILURES:
                    return
            reason = f"{failures} deliveries failed and none succeeded: {delivery.message}"
        with self._state_lock:
            if connection_id in self._down:
                return
            self._down[connection_id] = reason
        log.error(
            "DevLake connection held back for the rest of this run",
            extra={"connection": connection_id, "status": delivery.status, "reason": reason},
        )

    def _connection_down(self, connection_id: int) -> str | None:
        with self._state_lock:
            return self._down.get(connection_id)

    def _claim_holder(self, marker: str) -> str | None:
        with self._state_lock:
            return self._claims.get(marker)

    def _dead_letter(
        self, connection_id: int, deployment: Deployment, payload: Mapping[str, Any], status: int | None, message: str
    ) -> None:
        log.error(
            "DevLake rejected the deployment; moved to the dead-letter list",
            extra={"deployment_id": deployment.id, "connection": connection_id, "status": status, "reason": message},
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

    # -- housekeeping --------------------------------------------------------------------------------

    def _forget_unlisted(self, cluster: str, seen: set[AppKey], shard: Shard | None, now: datetime) -> None:
        """An Application no longer listed is deleted: mark it, and drop its snapshot after the grace period."""
        stored = [k for k in self.store.snapshot_keys(cluster) if k not in seen and (shard is None or shard.owns(k))]
        if not stored:
            return
        grace = self.config.detection.deleted_grace
        snapshots = self.store.load_snapshots(stored)
        expired = [k for k, s in snapshots.items() if s.deleting_since is not None and now - s.deleting_since >= grace]
        marked = {
            k: s.evolve(deleting_since=now, settled_digest=None)
            for k, s in snapshots.items()
            if s.deleting_since is None
        }
        if marked:
            self.store.save_snapshots(marked)
        if expired:
            self.store.delete_snapshots(expired)
            log.info("forgot deleted applications", extra={"cluster": cluster, "apps": [str(k) for k in expired]})


def planner_policy(config: Config, initialized_at: datetime | None, options: RunOptions) -> PlannerPolicy:
    detection = config.detection
    images = config.images
    return PlannerPolicy(
        initialized_at=initialized_at,
        first_run=detection.first_run,
        verdict_timeout=detection.verdict_timeout,
        failure_on_out_of_sync_missing=detection.failure_on_out_of_sync_missing,
        detect_image_only_changes=detection.detect_image_only_changes,
        commit_images=CommitImages(images),
        backfill=options.backfill,
        since=options.since,
    )


def _sent_marker(connection_id: int, deployment_id: str) -> str:
    return f"sent:{connection_id}:{deployment_id}"


def _deduped_marker(connection_id: int, deployment_id: str) -> str:
    return f"deduped:{connection_id}:{deployment_id}"


def _rejected_marker(connection_id: int, deployment_id: str) -> str:
    return f"rejected:{connection_id}:{deployment_id}"


def _handled(target: _Target, existing: set[str]) -> bool:
    return target.sent in existing or target.deduped in existing or target.rejected in existing


def _component_marker(connection_id: int, component: str, fingerprint: str, occurrence: int) -> str:
    """The n-th time this component made this change, as delivered to a connection (the first keeps the
    short form)."""
    base = f"component:{connection_id}:{component}:{fingerprint}"
    return base if occurrence == 1 else f"{base}:{occurrence}"


def _change_marker(observation: AppObservation, fingerprint: str, occurrence: int) -> str:
    """An Application made this change for the n-th time. Counting lets a roll-forward after a rollback (the
    same change again) go out, while a second Application making a change already sent is deduplicated."""
    key = observation.key
    return f"change:{key.cluster}:{key.namespace}:{key.name}:{observation.uid[:8]}:{fingerprint}:{occurrence}"


def _decision_salt(config: Config) -> str:
    """The configuration that shapes the planner's decisions: changing it invalidates every settled digest."""
    shaping = {"detection": config.detection.model_dump(mode="json"), "images": config.images.model_dump(mode="json")}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


def _raw_name(raw: Any) -> str:
    try:
        metadata = raw["metadata"]
        return f"{metadata.get('namespace')}/{metadata.get('name')}"
    except (TypeError, KeyError, AttributeError):
        return "(unnamed)"


def iter_observations(lister: ClusterLister, cluster: str) -> Iterator[AppObservation | MalformedApplication]:
    """Every Application of a cluster, parsed (for ``explain``)."""
    for page in lister.pages():
        for raw in page:
            try:
                yield parse_application(raw, cluster)
            except MalformedApplication as error:
                yield error


__all__ = ["LockHeld", "Reconciler", "RetryBudget", "RunOptions", "RunSummary", "Shard"]
