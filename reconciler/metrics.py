"""Prometheus metrics: scraped from ``serve``, pushed to a Pushgateway after ``run`` when configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, push_to_gateway

from reconciler.config import Config
from reconciler.model import Deployment
from reconciler.reconcile import RunSummary

log = logging.getLogger(__name__)


class PrometheusMetrics:
    """Implements the reconciler's ``Metrics`` hooks on a registry of its own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.deployments = Counter(
            "dora_reconciler_deployments",
            "Deployments recorded, by result and class",
            ["result", "deployment_class"],
            registry=r,
        )
        self.deliveries = Counter(
            "dora_reconciler_deliveries",
            "DevLake deliveries, by connection and outcome",
            ["connection", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter("dora_reconciler_dead_letters", "Payloads DevLake rejected for good", registry=r)
        self.github_requests = Counter("dora_reconciler_github_requests", "GitHub API requests sent", registry=r)
        self.rate_limit_remaining = Gauge(
            "dora_reconciler_github_rate_limit_remaining", "GitHub rate limit left after the last run", registry=r
        )
        self.apps_listed = Gauge("dora_reconciler_apps_listed", "Applications listed by the last run", registry=r)
        self.pending = Gauge(
            "dora_reconciler_deployments_pending", "Deployments waiting for a health verdict", registry=r
        )
        self.deferred = Gauge(
            "dora_reconciler_deployments_deferred", "Deployments the last run deferred to the next", registry=r
        )
        self.tick_seconds = Gauge("dora_reconciler_tick_duration_seconds", "Duration of the last run", registry=r)
        self.last_exit_code = Gauge("dora_reconciler_last_run_exit_code", "Exit code of the last run", registry=r)
        self.last_success = Gauge(
            "dora_reconciler_last_success_timestamp_seconds", "When the last fully successful run ended", registry=r
        )
        self.runs = Counter("dora_reconciler_runs", "Runs, by exit code", ["exit_code"], registry=r)

    def deployment_recorded(self, deployment: Deployment) -> None:
        self.deployments.labels(deployment.result.value, deployment.deployment_class.value).inc()

    def delivery(self, connection_id: int, outcome: str) -> None:
        self.deliveries.labels(str(connection_id), outcome).inc()

    def dead_letter(self) -> None:
        self.dead_letters.inc()

    def tick_finished(self, summary: RunSummary) -> None:
        self.github_requests.inc(summary.github_requests)
        if summary.rate_limit_remaining is not None:
            self.rate_limit_remaining.set(summary.rate_limit_remaining)
        self.apps_listed.set(summary.apps_listed)
        self.pending.set(summary.deployments_pending)
        self.deferred.set(summary.deployments_deferred)
        self.tick_seconds.set(summary.seconds)
        self.last_exit_code.set(summary.exit_code)
        self.runs.labels(str(summary.exit_code)).inc()
        if summary.exit_code == 0:
            self.last_success.set(time.time())


def grouping_key(config: Config, clusters: tuple[str, ...] = (), shard: str | None = None) -> dict[str, str]:
    """Stable across runs (no pod name, no run id), so the Pushgateway keeps one series per job instance."""
    names = clusters or tuple(c.name for c in config.clusters)
    return {
        "environment": config.environment.value,
        "clusters": "+".join(sorted(names)),
        "shard": shard.replace("/", "-of-") if shard else "all",
    }


def push(config: Config, metrics: PrometheusMetrics, key: Mapping[str, str]) -> None:
    """Push after a run; a Pushgateway that is down costs a warning, never the run's exit code."""
    gateway = config.metrics.pushgateway
    if not gateway:
        return
    try:
        push_to_gateway(gateway, job=config.metrics.job, registry=metrics.registry, grouping_key=dict(key), timeout=10)
    except OSError as error:
        log.warning("could not push metrics to the Pushgateway", extra={"reason": str(error), "gateway": gateway})
