"""Prometheus metrics: scraped from ``serve``, pushed to a Pushgateway after ``run`` when configured.

In ``serve`` the counters accumulate over the life of the process. A ``run`` is one process per pass,
so what it pushes are that pass's counts: the Pushgateway keeps the last value pushed for each series
until the next push of the same name replaces it. A value that only a run can give (its exit code, its
duration, what it listed) has no sample until a run gave it. Counters have no ``_created`` series: a
Pushgateway would keep one per push, and no alert here uses them.
"""

from __future__ import annotations

import http.client
import logging
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from email.message import Message
from typing import IO, Any
from urllib.parse import urljoin, urlsplit

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, pushadd_to_gateway
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from reconciler import exitcodes
from reconciler.config import Config
from reconciler.devlake import DeliveryOutcome
from reconciler.model import Deployment, DeploymentClass, Result
from reconciler.run import RunSummary

log = logging.getLogger(__name__)

disable_created_metrics()  # type: ignore[no-untyped-call]

PUSH_TIMEOUT_SECONDS = 10.0
RUN_EXIT_CODES = (exitcodes.OK, exitcodes.RETRY, exitcodes.LOCKED)
"""The exit codes a pass that got as far as the metrics can end with (2 stops before any)."""


class OptionalGauge(Collector):
    """A gauge with no sample until it is first set (per label value, when it has a label).

    "Never succeeded" must not read as 0 (1970-01-01), "no run yet" must not read as exit code 0, and
    "no GitHub request yet" must not read as "no rate limit left": each would fire an alert or hide one.
    Absent, an alert needs ``absent()``; and a push without the sample leaves the value pushed by an
    earlier run in place.
    """

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry, label: str | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._values: dict[str, float] = {}
        registry.register(self)

    @property
    def value(self) -> float | None:
        return self._values.get("")

    def set(self, value: float, label_value: str = "") -> None:
        self._values[label_value] = float(value)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=[self.label] if self.label else None)]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if not self._values:
            return []
        if self.label is None:
            return [GaugeMetricFamily(self.name, self.documentation, value=self._values[""])]
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.label])
        for label_value, value in sorted(self._values.items()):
            family.add_metric([label_value], value)
        return [family]


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
        self.apps_listed = OptionalGauge(
            "dora_reconciler_apps_listed",
            "Applications listed and selected by the last run that listed the cluster",
            r,
            label="cluster",
        )
        self.cluster_listed = OptionalGauge(
            "dora_reconciler_cluster_listed",
            "1 when the last run read every Application of the cluster, 0 when it could not (see the run's errors)",
            r,
            label="cluster",
        )
        self.pending = OptionalGauge(
            "dora_reconciler_deployments_pending", "Deployments waiting for a health verdict, as of the last run", r
        )
        self.deferred = OptionalGauge(
            "dora_reconciler_deployments_deferred", "Deployments the last run deferred to the next", r
        )
        self.backlog_waiting = OptionalGauge(
            "dora_reconciler_backlog_waiting",
            "Deliveries waiting in the backlog of a connection that refused them (key, id, URL), as of the last run",
            r,
        )
        self.run_seconds = OptionalGauge("dora_reconciler_run_duration_seconds", "Duration of the last run", r)
        self.last_exit_code = OptionalGauge("dora_reconciler_last_run_exit_code", "Exit code of the last run", r)
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

    def run_finished(self, summary: RunSummary) -> None:
        self.github_requests.inc(summary.github_requests)
        if summary.rate_limit_remaining is not None:
            self.rate_limit_remaining.set(summary.rate_limit_remaining)
        for cluster, counts in summary.clusters.items():
            listed = bool(counts.get("listed"))
            self.cluster_listed.set(1 if listed else 0, cluster)
            if listed:
                self.apps_listed.set(counts.get("apps_listed", 0), cluster)
        self.pending.set(summary.deployments_pending)
        self.deferred.set(summary.deployments_deferred)
        self.backlog_waiting.set(summary.backlog_waiting)
        self.run_seconds.set(summary.seconds)
        self._ended(summary.exit_code)

    def run_aborted(self, exit_code: int) -> None:
        """A run that ended before it could summarise anything (lock held, state store down)."""
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
            handler=_push_without_redirects,
        )
    except (OSError, ValueError, http.client.HTTPException) as error:
        log.warning(
            "could not push metrics to the Pushgateway; the run's result stands",
            extra={"reason": str(error), "gateway": gateway},
        )
        return False
    log.debug("metrics pushed", extra={"gateway": gateway, "grouping_key": dict(key)})
    return True


class PushRedirected(OSError):
    """The Pushgateway's URL answered with a redirect, which a push does not follow."""


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a 302 after a POST with a GET and no body: a push through a single-sign-on proxy would end
    on its login page with a 200 and the metrics would be silently lost. Every redirect is an error instead."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        raise PushRedirected(
            f"the Pushgateway URL answered with a redirect (HTTP {code}) to {_where(req.full_url, newurl)}; "
            "redirects are not followed: set metrics.pushgateway to the Pushgateway's own address (is a "
            "single-sign-on proxy or an http-to-https redirect in front of it?)"
        )


def _where(base: str, location: str) -> str:
    """Where a redirect points, without its query (SSO state) or credentials."""
    try:
        parts = urlsplit(urljoin(base, location))
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "an unreadable address"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


def _push_without_redirects(
    url: str, method: str, timeout: float | None, headers: list[tuple[str, str]], data: bytes
) -> Callable[[], None]:
    """prometheus-client's push handler, minus following redirects (``_RefuseRedirects``)."""

    def handle() -> None:
        request = urllib.request.Request(url, data=data, method=method)
        for name, value in headers:
            request.add_header(name, value)
        opener = urllib.request.build_opener(_RefuseRedirects)
        response: Any = opener.open(request, timeout=timeout)
        with response:
            if response.status >= 300:
                raise OSError(f"error talking to the Pushgateway: HTTP {response.status} {response.reason}")

    return handle
