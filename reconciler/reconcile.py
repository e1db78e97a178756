"""One tick: list -> load snapshots -> plan -> enrich -> deliver -> save.

This module knows the order of the stages and nothing of their rules. Per-Application errors are
isolated: a malformed object is skipped with a reason, a failing delivery holds back only its own
Application, and a cluster that cannot be listed does not stop the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from reconciler.application import MalformedApplication, parse_application
from reconciler.argocd import ClusterLister, ClusterUnavailable
from reconciler.config import ClusterConfig, Config, ConnectionConfig
from reconciler.devlake import (
    DeliveryOutcome,
    DevLakeClient,
    PayloadError,
    Router,
    build_payload,
    commit_set_fingerprint,
)
from reconciler.enrich import Deferred, Enricher, Skipped
from reconciler.github import GitHubClient
from reconciler.images import InvalidImageReference, RepositoryMapper, commit_images, parse_image
from reconciler.model import (
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

_FULL_SHA = re.compile(r"[0-9a-f]{40}")
LOCK_TTL_SECONDS = 60
LOCK_RENEW_SECONDS = 20
PROGRESS_EVERY_SECONDS = 10.0


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
            raise ValueError(f"--shard expects I/N, got {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise ValueError(f"--shard expects 0 <= I < N, got {text!r}")
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


@dataclass
class _AppWork:
    observation: AppObservation
    snapshot: Snapshot | None
    plan: Plan


@dataclass
class _AppResult:
    success: int = 0
    failed: int = 0
    skipped: int = 0
    deferred: int = 0
    deduplicated: int = 0
    sent: int = 0
    retry_later: int = 0
    dead_lettered: int = 0
    errors: list[str] = field(default_factory=list)


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
    ) -> None:
        self.config = config
        self.store = store
        self.github = github
        self.devlake = devlake
        self.enricher = Enricher(config, github)
        self.mapper = RepositoryMapper(config.images)
        self.router = Router(config.devlake)
        self.lister_factory = lister_factory
        self.metrics = metrics
        self.dry_run_output = dry_run_output
        self.clock = clock
        self.stop = stop or threading.Event()
        self.progress = progress
        self._claims: set[str] = set()
        self._claims_lock = threading.Lock()
        self._output_lock = threading.Lock()

    # -- the run -------------------------------------------------------------------------------------

    def run(self, options: RunOptions, command: str = "run") -> RunSummary:
        """One pass over every selected cluster. Raises ``LockHeld`` when another run holds a cluster."""
        started = time.monotonic()
        summary = RunSummary(run_id=uuid.uuid4().hex[:12], command=command, started_at=format_time(self.clock()))
        clusters = self._selected_clusters(options)
        self.github.reset_tick()
        self._claims.clear()
        deadline = time.monotonic() + self.config.devlake.retry_budget.total_seconds()
        with ExitStack() as locks:
            if not options.dry_run:
                suffix = f":{options.shard.index}of{options.shard.count}" if options.shard else ""
                for cluster in sorted(clusters, key=lambda c: c.name):
                    locks.enter_context(
                        RunLock(
                            self.store,
                            f"run:{cluster.name}{suffix}",
                            owner=summary.run_id,
                            ttl_seconds=LOCK_TTL_SECONDS,
                            renew_every=LOCK_RENEW_SECONDS,
                        )
                    )
            for cluster in clusters:
                if self.stop.is_set():
                    summary.errors.append("stopped before every cluster was reconciled")
                    break
                try:
                    self._run_cluster(cluster, options, summary, deadline)
                except ClusterUnavailable as error:
                    summary.errors.append(f"cluster {cluster.name}: {error}")
                    log.error("cluster unavailable", extra={"cluster": cluster.name, "reason": str(error)})
                except StoreUnavailable as error:
                    summary.errors.append(f"state store unavailable: {error}")
                    log.error("state store unavailable; stopping the tick", extra={"reason": str(error)})
                    break
        summary.github_requests = self.github.requests
        summary.rate_limit_remaining = self.github.rate_limit_remaining
        reset = self.github.rate_limit_reset
        summary.rate_limit_reset = format_time(reset) if reset else None
        summary.finished_at = format_time(self.clock())
        summary.seconds = round(time.monotonic() - started, 3)
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
            raise ValueError(f"unknown cluster(s): {', '.join(unknown)}")
        return [c for c in self.config.clusters if c.name in options.clusters]

    # -- one cluster ---------------------------------------------------------------------------------

    def _run_cluster(self, cluster: ClusterConfig, options: RunOptions, summary: RunSummary, deadline: float) -> None:
        now = self.clock()
        initialized_at = self.store.initialized_at(cluster.name)
        policy = planner_policy(self.config, initialized_at, options)
        seen: set[AppKey] = set()
        last_progress = time.monotonic()
        for page in self.lister_factory(cluster).pages():
            observations = self._parse_page(page, cluster.name, options, summary)
            seen.update(observation.key for observation in observations)
            self._process_page(observations, policy, now, options, summary, deadline)
            if self.stop.is_set():
                summary.errors.append(f"cluster {cluster.name}: stopped before the listing was finished")
                return
            if self.progress and time.monotonic() - last_progress >= PROGRESS_EVERY_SECONDS:
                self.progress(summary)
                last_progress = time.monotonic()
        if options.dry_run:
            return
        self._forget_unlisted(cluster.name, seen, options.shard, now)
        if initialized_at is None:
            self.store.set_initialized_at(cluster.name, now)
            log.info("cluster initialised", extra={"cluster": cluster.name, "apps": len(seen)})

    def _parse_page(
        self, page: Sequence[Any], cluster: str, options: RunOptions, summary: RunSummary
    ) -> list[AppObservation]:
        observations: list[AppObservation] = []
        for raw in page:
            try:
                observation = parse_application(raw, cluster)
            except MalformedApplication as error:
                summary.apps_malformed += 1
                log.warning(
                    "skipping malformed application",
                    extra={"cluster": cluster, "app": _raw_name(raw), "reason": str(error)},
                )
                continue
            if not self.config.applications.selects(observation.key.qualified_name):
                continue
            if options.shard and not options.shard.owns(observation.key):
                continue
            observations.append(observation)
        summary.apps_listed += len(observations)
        return observations

    def _process_page(
        self,
        observations: list[AppObservation],
        policy: PlannerPolicy,
        now: datetime,
        options: RunOptions,
        summary: RunSummary,
        deadline: float,
    ) -> None:
        if not observations:
            return
        snapshots = self.store.load_snapshots([o.key for o in observations])
        quiet: dict[AppKey, Snapshot] = {}
        busy: list[_AppWork] = []
        for observation in observations:
            snapshot = snapshots.get(observation.key)
            app_plan = plan(observation, snapshot, now, policy)
            for note in app_plan.notes:
                log.info(note, extra={"app": str(observation.key)})
            if app_plan.snapshot.pending is not None:
                summary.deployments_pending += 1
            if app_plan.deployments:
                busy.append(_AppWork(observation, snapshot, app_plan))
            elif not app_plan.deferred and app_plan.snapshot != snapshot:
                quiet[observation.key] = app_plan.snapshot
        if quiet and not options.dry_run:
            self.store.save_snapshots(quiet)
        if not busy:
            return
        outcomes = self.enricher.enrich_many(
            [(work.plan.deployments, self._previous_commits(work.snapshot)) for work in busy]
        )
        with ThreadPoolExecutor(max_workers=self.config.devlake.max_concurrency) as pool:
            results = list(
                pool.map(
                    lambda pair: self._deliver_app(pair[0], pair[1], options, deadline),
                    zip(busy, outcomes, strict=True),
                )
            )
        for result in results:
            summary.deployments_success += result.success
            summary.deployments_failed += result.failed
            summary.deployments_skipped += result.skipped
            summary.deployments_deferred += result.deferred
            summary.deployments_deduplicated += result.deduplicated
            summary.sent += result.sent
            summary.retry_later += result.retry_later
            summary.dead_lettered += result.dead_lettered
            summary.errors.extend(result.errors)

    # -- one application -----------------------------------------------------------------------------

    def _deliver_app(
        self,
        work: _AppWork,
        outcomes: Sequence[EnrichedDeployment | Deferred | Skipped],
        options: RunOptions,
        deadline: float,
    ) -> _AppResult:
        """Deliver an Application's deployments strictly in order; stop at the first that cannot go out."""
        result = _AppResult()
        if self.stop.is_set():
            result.deferred += len(work.plan.deployments)
            return result
        observation = work.observation
        key = observation.key
        component = self.config.applications.component_of(key.name, observation.labels)
        connections = self.router.connections_for(key, component)
        commits = self._previous_commits(work.snapshot)
        saved = work.snapshot
        for index, (deployment, outcome) in enumerate(zip(work.plan.deployments, outcomes, strict=True)):
            if isinstance(outcome, Deferred):
                result.deferred += len(work.plan.deployments) - index
                log.warning(
                    "deployment deferred to the next run",
                    extra={"app": str(key), "deployment_id": deployment.id, "reason": outcome.reason},
                )
                return result
            if isinstance(outcome, Skipped):
                result.skipped += 1
                log.warning(
                    "deployment has no commit DevLake can take; recorded without sending",
                    extra={"app": str(key), "deployment_id": deployment.id, "reason": outcome.reason},
                )
                saved = deployment.snapshot_after.evolve(commits=dict(commits))
                if not options.dry_run:
                    self.store.record_delivery(key, saved, [])
                continue
            delivered, markers, stats = self._deliver_deployment(
                outcome, observation, component, connections, commits, options, deadline
            )
            result.sent += stats.sent
            result.retry_later += stats.retry_later
            result.dead_lettered += stats.dead_lettered
            result.deduplicated += stats.deduplicated
            if not delivered:
                if markers and saved is not None and not options.dry_run:
                    self.store.record_delivery(key, saved, markers)
                result.errors.append(f"{key}: {deployment.id} will be retried next run")
                return result
            if deployment.result is Result.SUCCESS:
                result.success += 1
            else:
                result.failed += 1
            commits.update(outcome.deployed_commits)
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
            if not _FULL_SHA.fullmatch(tag):
                continue
            try:
                repo = self.mapper.repository_for(parse_image(repository))
            except InvalidImageReference:
                continue
            if repo is not None:
                commits.setdefault(repo, tag)
        return commits

    def _deliver_deployment(
        self,
        enriched: EnrichedDeployment,
        observation: AppObservation,
        component: str,
        connections: Sequence[ConnectionConfig],
        previous: Mapping[str, str],
        options: RunOptions,
        deadline: float,
    ) -> tuple[bool, list[str], _AppResult]:
        """Send one deployment to each of its connections. Returns (all done, markers to record, counts)."""
        stats = _AppResult()
        deployment = enriched.deployment
        try:
            payload = build_payload(
                enriched,
                config=self.config,
                component=component,
                destination=observation.destination,
                source_paths=[s.path for s in observation.sources if s.path],
            )
        except PayloadError as error:
            stats.skipped += 1
            log.warning("no payload could be built", extra={"deployment_id": deployment.id, "reason": str(error)})
            return True, [], stats
        fingerprint = commit_set_fingerprint(enriched, environment=str(payload["environment"]), previous=previous)
        dedupe_by_component = self.config.devlake.dedupe == "component"
        wanted: list[str] = []
        for connection in connections:
            wanted.append(_sent_marker(connection.id, deployment.id))
            if dedupe_by_component:
                wanted.append(_component_marker(connection.id, component, fingerprint))
        existing = self.store.existing_markers(wanted)
        markers: list[str] = []
        all_done = True
        for connection in connections:
            sent_marker = _sent_marker(connection.id, deployment.id)
            component_marker = _component_marker(connection.id, component, fingerprint)
            already_sent = sent_marker in existing
            if already_sent and not options.backfill:
                continue
            # A backfill re-sends what this connection already has (an upsert: same id), so DevLake ends up
            # with every deployment still in Argo CD's history even if it lost some.
            if (
                dedupe_by_component
                and not already_sent
                and (component_marker in existing or not self._claim(component_marker))
            ):
                stats.deduplicated += 1
                log.info(
                    "same commits of this component already delivered; not sent again",
                    extra={"deployment_id": deployment.id, "connection": connection.id, "component": component},
                )
                markers.append(sent_marker)
                continue
            if options.dry_run:
                self._print_dry_run(connection.id, payload)
                stats.sent += 1
                continue
            delivery = self.devlake.deliver(connection, payload, deadline)
            if self.metrics:
                self.metrics.delivery(connection.id, delivery.outcome.value)
            if delivery.outcome is DeliveryOutcome.DELIVERED:
                stats.sent += 1
                markers.append(sent_marker)
                if dedupe_by_component:
                    markers.append(component_marker)
            elif delivery.outcome is DeliveryOutcome.REJECTED:
                stats.dead_lettered += 1
                markers.append(sent_marker)
                self._dead_letter(connection.id, deployment, payload, delivery.status, delivery.message)
            else:
                stats.retry_later += 1
                all_done = False
                self._release(component_marker)
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

    def _claim(self, marker: str) -> bool:
        """Within one tick, only one Application may send a given component commit set to a connection."""
        with self._claims_lock:
            if marker in self._claims:
                return False
            self._claims.add(marker)
            return True

    def _release(self, marker: str) -> None:
        with self._claims_lock:
            self._claims.discard(marker)

    # -- housekeeping --------------------------------------------------------------------------------

    def _forget_unlisted(self, cluster: str, seen: set[AppKey], shard: Shard | None, now: datetime) -> None:
        """An Application no longer listed is deleted: mark it, and drop its snapshot after the grace period."""
        stored = [k for k in self.store.snapshot_keys(cluster) if k not in seen and (shard is None or shard.owns(k))]
        if not stored:
            return
        grace = self.config.detection.deleted_grace
        snapshots = self.store.load_snapshots(stored)
        expired = [k for k, s in snapshots.items() if s.deleting_since is not None and now - s.deleting_since >= grace]
        marked = {k: s.evolve(deleting_since=now) for k, s in snapshots.items() if s.deleting_since is None}
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
        commit_images=lambda refs: commit_images(refs, images),
        backfill=options.backfill,
        since=options.since,
    )


def _sent_marker(connection_id: int, deployment_id: str) -> str:
    return f"sent:{connection_id}:{deployment_id}"


def _component_marker(connection_id: int, component: str, fingerprint: str) -> str:
    return f"component:{connection_id}:{component}:{fingerprint}"


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


__all__ = ["LockHeld", "Reconciler", "RunOptions", "RunSummary", "Shard"]
