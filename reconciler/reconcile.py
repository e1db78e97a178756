"""One tick: list -> filter -> plan -> enrich -> hand off to delivery, per page of Applications.

This module knows the order of the stages and nothing of their rules. Per-Application errors are
isolated: a malformed object is skipped with a reason, a failing delivery holds back only its own
Application, and a cluster that cannot be listed does not stop the others.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Protocol, TextIO

from reconciler.application import MalformedApplication, parse_application
from reconciler.argocd import ApplicationLister, ClusterUnavailable, open_lister
from reconciler.config import ClusterConfig, Config
from reconciler.delivery import AppResult, AppWork, Deliverer, DeliveryMetrics, RetryBudget, Tick
from reconciler.devlake import DevLakeClient
from reconciler.enrich import Enricher
from reconciler.github import GitHubClient
from reconciler.images import CommitImages
from reconciler.model import AppKey, AppObservation, Snapshot, format_time
from reconciler.planner import PlannerPolicy, initialization_cutoff, newest_argocd_time, plan
from reconciler.run import ClusterProgress, RunError, RunOptions, RunSummary, Shard, selected_clusters
from reconciler.settled import Changed, decision_salt, for_planning, frozen_heap, settle, split_page
from reconciler.store import Store, StoreUnavailable

log = logging.getLogger(__name__)

PROGRESS_EVERY_SECONDS = 10.0
SUMMARISED_NOTES = 10
"""Distinct planner notes a baseline or backfill summarises per cluster (each is logged at debug level)."""
PREVIOUS_RUNS_FOR_TOTALS = 20
"""Stored run summaries searched for the last complete listing of each cluster (the progress lines' total)."""


class ListerFactory(Protocol):
    def __call__(self, cluster: ClusterConfig) -> ApplicationLister: ...


def _never() -> bool:
    return False


class Reconciler:
    """Runs reconciliation passes with the clients it is given (so tests can point them at fakes)."""

    def __init__(
        self,
        config: Config,
        store: Store,
        github: GitHubClient,
        devlake: DevLakeClient,
        *,
        lister_factory: ListerFactory = open_lister,
        metrics: DeliveryMetrics | None = None,
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
        self.enricher = Enricher(config, github, clock=clock)
        self.deliverer = Deliverer(config, store, devlake, metrics=metrics, dry_run_output=dry_run_output, clock=clock)
        self.lister_factory = lister_factory
        self.clock = clock
        self.stop = stop or threading.Event()
        self.progress = progress
        self.progress_every = PROGRESS_EVERY_SECONDS if progress_every is None else progress_every
        """Seconds between two ``progress`` calls (checked after each page of Applications)."""
        self.monotonic = monotonic

    # -- the run -------------------------------------------------------------------------------------

    def run(
        self,
        options: RunOptions,
        command: str = "run",
        *,
        run_id: str | None = None,
        lock_lost: Callable[[], bool] = _never,
    ) -> RunSummary:
        """One pass over every selected cluster; the caller holds the run locks and says when one is lost.

        Raises ``UnknownCluster`` for a ``--cluster`` not configured, ``StoreUnavailable`` when the state store
        fails outside of a cluster's listing."""
        with frozen_heap():
            return self._run(options, command, run_id or uuid.uuid4().hex[:12], lock_lost)

    def _run(self, options: RunOptions, command: str, run_id: str, lock_lost: Callable[[], bool]) -> RunSummary:
        started = self.monotonic()
        summary = RunSummary(
            run_id=run_id, command=command, started_at=format_time(self.clock()), dry_run=options.dry_run
        )
        clusters = selected_clusters(self.config, options)
        previous_totals = self._previous_totals() if self.progress else {}
        self.github.reset_tick()
        tick = Tick(
            options,
            RetryBudget(self.config.devlake.retry_budget.total_seconds(), self.monotonic),
            halted=lambda: self.stop.is_set() or lock_lost(),
        )
        for cluster in clusters:
            if tick.halted():
                summary.add_error("stopped before every cluster was reconciled")
                break
            try:
                self._run_cluster(cluster, tick, summary, previous_totals.get(cluster.name))
            except ClusterUnavailable as error:
                summary.add_error(f"cluster {cluster.name}: {error}")
                log.error("cluster unavailable", extra={"cluster": cluster.name, "reason": str(error)})
            except StoreUnavailable as error:
                summary.add_error(f"state store unavailable: {error}")
                log.error("state store unavailable; stopping the tick", extra={"reason": str(error)})
                break
            except Exception as error:
                # A bug or an unforeseen failure in one cluster holds back what is left of that cluster only.
                reason = f"unexpected {type(error).__name__}: {error}"
                summary.add_error(f"cluster {cluster.name}: {reason}")
                log.error("cluster failed", exc_info=True, extra={"cluster": cluster.name, "reason": reason})
        summary.progress = None
        if lock_lost():
            summary.add_error("the run lock was lost: stopped sending, the rest is left to the next run")
        summary.github_requests = self.github.requests
        for problem in self.github.tick_problems():
            summary.add_error(problem)
        summary.rate_limit_remaining = self.github.rate_limit_remaining
        reset = self.github.rate_limit_reset
        summary.rate_limit_reset = format_time(reset) if reset else None
        summary.backlog_waiting = tick.backlog.waiting
        summary.finished_at = format_time(self.clock())
        summary.seconds = round(self.monotonic() - started, 3)
        failed = summary.errors or summary.retry_later or summary.deployments_deferred
        summary.exit_code = 1 if failed else 0
        return summary

    # -- one cluster ---------------------------------------------------------------------------------

    def _previous_totals(self) -> dict[str, int]:
        """Per cluster, the Applications its last complete listing read (from the stored run summaries)."""
        try:
            runs = self.store.run_summaries(PREVIOUS_RUNS_FOR_TOTALS)
        except StoreUnavailable:
            return {}
        totals: dict[str, int] = {}
        for run in runs:
            clusters = run.get("clusters")
            if not isinstance(clusters, dict):
                continue
            for name, counts in clusters.items():
                read = counts.get("apps_read") if isinstance(counts, dict) else None
                if isinstance(read, int) and counts.get("listed") is True:
                    totals.setdefault(name, read)
        return totals

    def _run_cluster(
        self, cluster: ClusterConfig, tick: Tick, summary: RunSummary, previous_total: int | None = None
    ) -> None:
        options = tick.options
        now = self.clock()
        initialized_at = self.store.initialized_at(cluster.name)
        self._retry_backlog(cluster.name, tick, summary)
        policy = planner_policy(self.config, initialized_at, options)
        seen: set[AppKey] = set()
        salt = decision_salt(self.config)
        last_progress = self.monotonic()
        argocd_now: datetime | None = None  # at initialisation: the newest time Argo CD wrote (its clock, not ours)
        counts = summary.cluster(cluster.name)
        progress = summary.progress = ClusterProgress(cluster.name, apps_total=previous_total)
        notes: Counter[str] | None = Counter() if initialized_at is None or options.backfill else None
        lister = self.lister_factory(cluster)
        read_in_listing: dict[str | None, int] = {}  # per namespace listed, the Applications read since it started
        for page in lister.listed_pages():
            split = split_page(
                page,
                cluster.name,
                # After an expired continue token the listing starts again: what was seen is not looked at twice.
                selected=lambda key: key not in seen and self._selected(key, options.shard),
                load=self.store.load_stored,
                salt=salt,
                backfill=options.backfill,
            )
            if split.refreshed and not options.dry_run:
                self.store.save_snapshots(split.refreshed)
            listed = split.listed
            seen.update(listed)
            seen.update(split.unreadable)
            # Each Application is read once per listing: a listing started again reads again what it had read.
            read = page.count() - (read_in_listing.pop(page.namespace, 0) if page.restarted else 0)
            read_in_listing[page.namespace] = read_in_listing.get(page.namespace, 0) + page.count()
            summary.apps_read += read
            summary.apps_listed += len(listed)
            summary.apps_malformed += split.malformed
            for item in split.changed if initialized_at is None else ():
                written = newest_argocd_time(item.observation)
                if written is not None and (argocd_now is None or written > argocd_now):
                    argocd_now = written
            counts["apps_read"] += read
            counts["apps_listed"] += len(listed)
            progress.apps_read += read
            progress.apps_total = lister.expected or previous_total
            self._process_page(split.changed, policy, now, tick, summary, notes)
            if tick.halted():
                summary.add_error(f"cluster {cluster.name}: stopped before the listing was finished")
                return
            if self.progress and self.monotonic() - last_progress >= self.progress_every:
                self.progress(summary)
                last_progress = self.monotonic()
        counts["listed"] = True
        if notes:
            log.info(
                "planner notes of this baseline or backfill, counted (each at debug level)",
                extra={"cluster": cluster.name, "apps": len(seen), "notes": dict(notes.most_common(SUMMARISED_NOTES))},
            )
        if options.dry_run:
            return
        self._forget_unlisted(cluster.name, seen, options.shard, now)
        if initialized_at is None:
            self.store.set_initialized_at(cluster.name, initialization_cutoff(now, argocd_now))
            log.info("cluster initialised", extra={"cluster": cluster.name, "apps": len(seen)})

    def _retry_backlog(self, cluster: str, tick: Tick, summary: RunSummary) -> None:
        """What waits in the connections' backlogs goes first; a bug there does not stop the cluster's listing."""
        try:
            _count(summary, self.deliverer.retry_backlog(cluster, tick))
        except StoreUnavailable:
            raise
        except Exception as error:
            log.exception("retrying the backlog failed unexpectedly", extra={"cluster": cluster})
            summary.add_error(
                RunError(f"internal error while retrying the backlog ({type(error).__name__})", None, cluster)
            )

    def _selected(self, key: AppKey, shard: Shard | None) -> bool:
        if not self.config.applications.selects(key.qualified_name):
            return False
        return shard is None or shard.owns(key)

    def _process_page(
        self,
        changed: list[Changed],
        policy: PlannerPolicy,
        now: datetime,
        tick: Tick,
        summary: RunSummary,
        notes: Counter[str] | None = None,
    ) -> None:
        """``notes``: count the planner's notes there and log them at debug level (a baseline or a backfill
        notes every Application; one summary line per cluster replaces thousands)."""
        if not changed:
            return
        quiet: dict[AppKey, Snapshot] = {}
        busy: list[AppWork] = []
        for observation, stored, digest in changed:
            snapshot = for_planning(stored)
            try:
                app_plan = plan(observation, snapshot, now, policy)
            except Exception as error:
                log.exception("could not plan the application; retrying next run", extra={"app": str(observation.key)})
                summary.add_error(
                    RunError(f"internal error while planning ({type(error).__name__})", example=str(observation.key))
                )
                continue
            for note in app_plan.notes:
                log.log(logging.INFO if notes is None else logging.DEBUG, note, extra={"app": str(observation.key)})
                if notes is not None:
                    notes[note] += 1
            if app_plan.snapshot.pending is not None:
                summary.deployments_pending += 1
            if app_plan.deployments:
                busy.append(AppWork(observation, snapshot, app_plan))
                if app_plan.decided_snapshot is not None and app_plan.decided_snapshot != stored:
                    # Verdicts are stored as decided before delivery starts: a failed delivery or a crash must not
                    # let the next run re-decide them from a live status that moved on.
                    quiet[observation.key] = app_plan.decided_snapshot
                continue
            if app_plan.deferred:
                continue
            final = settle(app_plan.snapshot, digest)
            if final != stored:
                quiet[observation.key] = final
        if quiet and not tick.options.dry_run:
            self.store.save_snapshots(quiet)
        if not busy:
            return
        deliverer = self.deliverer
        outcomes = self.enricher.enrich_many(
            [(work.plan.deployments, deliverer.previous_commits(work.snapshot)) for work in busy]
        )
        works: list[AppWork] = []
        for work, app_outcomes in zip(busy, outcomes, strict=True):
            try:
                deliverer.prepare(work, app_outcomes)
            except Exception as error:
                key = work.observation.key
                log.exception("could not prepare the deliveries; retrying next run", extra={"app": str(key)})
                summary.add_error(
                    RunError(f"internal error while preparing deliveries ({type(error).__name__})", example=str(key))
                )
                continue
            works.append(work)
        if works:
            for result in deliverer.deliver(works, tick):
                _count(summary, result)

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


def _count(summary: RunSummary, result: AppResult) -> None:
    summary.deployments_success += result.success
    summary.deployments_failed += result.failed
    summary.deployments_skipped += result.skipped
    summary.deployments_deferred += result.deferred
    summary.deployments_held_unreadable += result.held_unreadable
    summary.deployments_deduplicated += result.deduplicated
    summary.sent += result.sent
    summary.would_send += result.would_send
    summary.retry_later += result.retry_later
    summary.dead_lettered += result.dead_lettered
    summary.backlogged += result.backlogged
    summary.backlog_sent += result.backlog_sent
    for error in result.errors:
        summary.add_error(error)


def planner_policy(config: Config, initialized_at: datetime | None, options: RunOptions) -> PlannerPolicy:
    detection = config.detection
    images = config.images
    return PlannerPolicy(
        initialized_at=initialized_at,
        first_run=detection.first_run,
        verdict_timeout=detection.verdict_timeout,
        failure_on_out_of_sync_missing=detection.failure_on_out_of_sync_missing,
        detect_image_only_changes=detection.detect_image_only_changes,
        commit_images=CommitImages(images, mapped_only=True),
        backfill=options.backfill,
        since=options.since,
    )


def iter_observations(lister: ApplicationLister, cluster: str) -> Iterator[AppObservation | MalformedApplication]:
    """Every Application of a cluster, parsed (for ``explain``)."""
    for page in lister.pages():
        for raw in page:
            try:
                yield parse_application(raw, cluster)
            except MalformedApplication as error:
                yield error


__all__ = ["Reconciler", "iter_observations", "planner_policy"]
