"""Prometheus metrics: scraped from ``serve``, pushed to a Pushgateway after ``run`` when configured.

In ``serve`` the counters accumulate over the life of the process. A ``run`` is one process per pass,
so what it pushes are that pass's counts: the Pushgateway keeps the last value pushed for each series
until the next push of the same name replaces it.
"""

from __future__ import annotations

import http.client
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, pushadd_to_gateway
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler import exitcodes
from reconciler.config import Config
from reconciler.devlake import DeliveryOutcome
from reconciler.model import Deployment, DeploymentClass, Result
from reconciler.run import RunSummary

log = logging.getLogger(__name__)

PUSH_TIMEOUT_SECONDS = 10.0
RUN_EXIT_CODES = (exitcodes.OK, exitcodes.RETRY, exitcodes.LOCKED)
"""The exit codes a pass that got as far as the metrics can end with (2 stops before any)."""


class OptionalGauge(Collector):
    """A gauge with no sample until it is first set.

    "Never succeeded" must not read as 0 (1970-01-01) and "no GitHub request yet" must not read as
    "no rate limit left": either would fire an alert. Absent, an alert needs ``absent()``; and a push
    without the sample leaves the value pushed by an earlier run in place.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self._value: float | None = None
        registry.register(self)

    @property
    def value(self) -> float | None:
        return self._value

    def set(self, value: float) -> None:
        self._value = float(value)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self._value is None:
            return []
        return [GaugeMetricFamily(self.name, self.documentation, value=self._value)]


class PrometheusMetrics:
    """Implements the reconciler's ``Metrics`` hooks on a registry of its own (no global state).

    Every label value known in advance (results, classes, outcomes, the configured connections, exit
    codes) starts at 0, so a series exists before its first event and each push replaces every series
    of the previous one.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        connections: Sequence[int] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self._clock = clock
        r = self.registry
        self.deployments = Counter(
            "dora_reconciler_deployments",
            "Deployments recorded (delivered, or rejected for good), by result and class",
            ["result", "deployment_class"],
            registry=r,
        )
        self.deliveries = Counter(
            "dora_reconciler_deliveries",
            "DevLake deliveries, by connection and outcome (DELIVERED, RETRY_LATER, REJECTED)",
            ["connection", "outcome"],
            registry=r,
        )
        self.dead_letters = Counter(
            "dora_reconciler_dead_letters", "Payloads DevLake rejected for good (see `status`)", registry=r
        )
        self.github_requests = Counter("dora_reconciler_github_requests", "GitHub API requests sent", registry=r)
        self.rate_limit_remaining = OptionalGauge(
            "dora_reconciler_github_rate_limit_remaining", "GitHub core rate limit left, as last seen", r
        )
        self.apps_listed = Gauge(
            "dora_reconciler_apps_listed", "Applications listed and selected by the last run", registry=r
        )
        self.pending = Gauge(
            "dora_reconciler_deployments_pending", "Deployments waiting for a health verdict", registry=r
        )
        self.deferred = Gauge(
            "dora_reconciler_deployments_deferred", "Deployments the last run deferred to the next", registry=r
        )
        self.tick_seconds = Gauge("dora_reconciler_tick_duration_seconds", "Duration of the last run", registry=r)
        self.last_exit_code = Gauge("dora_reconciler_last_run_exit_code", "Exit code of the last run", registry=r)
        self.last_run = OptionalGauge(
            "dora_reconciler_last_run_timestamp_seconds", "When the last run ended, whatever its outcome", r
        )
        self.last_success = OptionalGauge(
            "dora_reconciler_last_success_timestamp_seconds", "When the last fully successful run ended", r
        )
        self.runs = Counter("dora_reconciler_runs", "Runs, by exit code", ["exit_code"], registry=r)
        for result in Result:
            for deployment_class in DeploymentClass:
                self.deployments.labels(result.value, deployment_class.value)
        for connection in connections:
            for outcome in DeliveryOutcome:
                self.deliveries.labels(str(connection), outcome.value)
        for code in RUN_EXIT_CODES:
            self.runs.labels(str(code))

    @classmethod
    def for_config(cls, config: Config) -> PrometheusMetrics:
        return cls(connections=[connection.id for connection in config.devlake.connections])

    # -- the reconciler's hooks ----------------------------------------------------------------------

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
        self._ended(summary.exit_code)

    def run_aborted(self, exit_code: int) -> None:
        """A run that ended before the tick could summarise it (lock held, state store down)."""
        self._ended(exit_code)

    def _ended(self, exit_code: int) -> None:
        now = self._clock()
        self.last_exit_code.set(exit_code)
        self.runs.labels(str(exit_code)).inc()
        self.last_run.set(now)
        if exit_code == exitcodes.OK:
            self.last_success.set(now)


def grouping_key(config: Config, clusters: tuple[str, ...] = (), shard: str | None = None) -> dict[str, str]:
    """Stable across runs (no pod name, no run id), so the Pushgateway keeps one group per job instance.

    ``clusters`` is what ``--cluster`` selected (empty: every configured cluster); ``shard`` is ``I/N``.
    """
    names = clusters or tuple(c.name for c in config.clusters)
    return {
        "environment": config.environment.value,
        "clusters": "+".join(sorted(set(names))),
        "shard": shard.replace("/", "-of-") if shard else "all",
    }


def push(config: Config, metrics: PrometheusMetrics, key: Mapping[str, str]) -> bool:
    """Push after a run; a Pushgateway that is down costs a warning, never the run's exit code.

    POST, not PUT: a PUT replaces the whole group, and a failed run, which has no
    ``last_success_timestamp_seconds`` sample, would erase the time of the last success that alerts
    are built on. Every other series is present in every push (labels start at 0), so each push
    still replaces the previous run's values.
    """
    gateway = config.metrics.pushgateway
    if not gateway:
        return False
    try:
        pushadd_to_gateway(
            gateway,
            job=config.metrics.job,
            registry=metrics.registry,
            grouping_key=dict(key),
            timeout=PUSH_TIMEOUT_SECONDS,
        )
    except (OSError, ValueError, http.client.HTTPException) as error:
        log.warning(
            "could not push metrics to the Pushgateway; the run's result stands",
            extra={"reason": str(error), "gateway": gateway},
        )
        return False
    log.debug("metrics pushed", extra={"gateway": gateway, "grouping_key": dict(key)})
    return True
