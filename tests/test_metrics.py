"""Prometheus metrics: scraped from ``serve``'s ``/metrics``, pushed to a Pushgateway after ``run``."""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from reconciler import exitcodes
from reconciler.config import load_config, validate_config
from reconciler.metrics import OptionalGauge, PrometheusMetrics, grouping_key, push
from reconciler.runtime import Runtime
from reconciler.scheduler import Service
from reconciler.store import open_store
from tests.fakes.kube_api import FakeKubeAPI
from tests.fakes.server import FakeServer
from tests.scenarios import deployed_app, new_deployment
from tests.world import World, log_lines

JOB_PATH = "/metrics/job/dora-reconciler"


@dataclass
class Push:
    method: str
    path: str
    body: str

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return parse_samples(self.body)


class FakePushgateway(FakeServer):
    """Records every push (method, path, body) and answers ``status``."""

    thread_name = "fake-pushgateway"

    def __init__(self, status: int = 200, location: str | None = None) -> None:
        super().__init__()
        self.status = status
        self.location = location
        """With a 3xx ``status``: where it redirects (an SSO proxy's login page)."""
        self.pushes: list[Push] = []
        self._lock = threading.Lock()

    def handler(self) -> type[BaseHTTPRequestHandler]:
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode()
                with gateway._lock:
                    gateway.pushes.append(Push(self.command, self.path, body))
                self.send_response(gateway.status)
                if gateway.location is not None:
                    self.send_header("Location", gateway.location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_PUT = do_POST = do_DELETE = do_GET = _record

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def parse_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``(sample name, sorted labels) -> value`` from the Prometheus text format."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def gateway() -> Iterator[FakePushgateway]:
    with FakePushgateway() as fake:
        yield fake


@pytest.fixture
def world(tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, gateway: FakePushgateway) -> Iterator[World]:
    config = {"metrics": {"port": 0, "pushgateway": gateway.url}}
    with World(tmp_path, state_url, monkeypatch, config=config) as world:
        yield world


def one_new_deployment(world: World) -> None:
    """A baseline run, then the app's next deployment waiting to be sent."""
    gitops = world.github.add_commits("acme/gitops", 2)
    images = world.github.add_commits("acme/payments-api", 2)
    app = deployed_app(world, gitops[0], images[0])
    world.set_apps([app])
    assert world.run() == 0
    world.set_apps([new_deployment(app, 1, gitops[1], images[1], minute=30)])


# -- /metrics in serve -----------------------------------------------------------------------------------


def test_metrics_endpoint_exposes_the_counters_after_a_pass_with_deployments(world: World) -> None:
    one_new_deployment(world)
    config = load_config(world.config_path)
    service = Service(config, runtime=Runtime.open(config), host="127.0.0.1", port=0)
    server = service.serve_http()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=5) as response:
            before = parse_samples(response.read().decode())
        assert value(before, "dora_reconciler_last_success_timestamp_seconds") is None, "no success yet: no sample"
        assert value(before, "dora_reconciler_deliveries_total", connection="1", outcome="DELIVERED") == 0.0
        for name in (
            "dora_reconciler_last_run_exit_code",
            "dora_reconciler_run_duration_seconds",
            "dora_reconciler_deployments_pending",
            "dora_reconciler_deployments_deferred",
            "dora_reconciler_backlog_waiting",
        ):
            assert value(before, name) is None, f"{name}: no run yet, so no value that reads as one"
        assert not [key for key in before if key[0].startswith(("dora_reconciler_apps_listed", "dora_reconciler_cl"))]
        assert not [key for key in before if key[0].endswith("_created")], "no _created series"

        assert service.tick() == exitcodes.OK
        with urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=5) as response:
            assert response.headers["Content-Type"].startswith("text/plain")
            after = parse_samples(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
        service.runtime.close()

    ok = {"result": "SUCCESS", "deployment_class": "new-revision"}
    assert value(after, "dora_reconciler_deployments_total", **ok) == 1.0
    assert value(after, "dora_reconciler_deliveries_total", connection="1", outcome="DELIVERED") == 1.0
    assert value(after, "dora_reconciler_dead_letters_total") == 0.0
    assert value(after, "dora_reconciler_backlog_waiting") == 0.0
    assert value(after, "dora_reconciler_apps_listed", cluster="prod-east") == 1.0
    assert value(after, "dora_reconciler_cluster_listed", cluster="prod-east") == 1.0
    requests = value(after, "dora_reconciler_github_requests_total")
    assert requests is not None and requests >= 1, "the deployment's commits came from GitHub"
    assert value(after, "dora_reconciler_github_rate_limit_remaining") is not None
    assert value(after, "dora_reconciler_runs_total", exit_code="0") == 1.0
    assert value(after, "dora_reconciler_last_run_exit_code") == 0.0
    assert not [key for key in after if key[0].endswith("_created") or "tick" in key[0]]
    duration = value(after, "dora_reconciler_run_duration_seconds")
    assert duration is not None and duration > 0
    last_success = value(after, "dora_reconciler_last_success_timestamp_seconds")
    assert last_success is not None and last_success == value(after, "dora_reconciler_last_run_timestamp_seconds")


# -- pushing after run ------------------------------------------------------------------------------------


def test_run_pushes_its_metrics_under_a_stable_grouping_key(world: World, gateway: FakePushgateway) -> None:
    one_new_deployment(world)
    assert world.run() == 0

    path = f"{JOB_PATH}/clusters/prod-east/environment/PRODUCTION/shard/all"
    assert [(p.method, p.path) for p in gateway.pushes] == [("POST", path), ("POST", path)], "one group, every run"
    first, second = (p.samples() for p in gateway.pushes)
    assert "dora_reconciler_deployments_total" in gateway.pushes[1].body
    ok = {"result": "SUCCESS", "deployment_class": "new-revision"}
    assert value(first, "dora_reconciler_deployments_total", **ok) == 0.0, "the baseline run sent nothing"
    assert value(second, "dora_reconciler_deployments_total", **ok) == 1.0
    assert value(second, "dora_reconciler_deliveries_total", connection="1", outcome="DELIVERED") == 1.0
    assert value(second, "dora_reconciler_last_success_timestamp_seconds") is not None


def test_shards_and_clusters_push_to_their_own_groups(world: World, gateway: FakePushgateway) -> None:
    assert world.run("--shard", "1/2") == 0
    assert world.run("--cluster", "prod-east", "--shard", "0/2") == 0
    assert [p.path for p in gateway.pushes] == [
        f"{JOB_PATH}/clusters/prod-east/environment/PRODUCTION/shard/1-of-2",
        f"{JOB_PATH}/clusters/prod-east/environment/PRODUCTION/shard/0-of-2",
    ]


def test_a_failed_run_pushes_its_exit_code_but_keeps_the_last_success(world: World, gateway: FakePushgateway) -> None:
    one_new_deployment(world)
    world.devlake.fail_always(401)
    assert world.run() == exitcodes.RETRY

    failed = gateway.pushes[-1]
    assert failed.method == "POST", "a PUT would replace the group, last success included"
    samples = failed.samples()
    assert value(samples, "dora_reconciler_last_success_timestamp_seconds") is None
    assert value(samples, "dora_reconciler_last_run_exit_code") == 1.0
    assert value(samples, "dora_reconciler_runs_total", exit_code="1") == 1.0
    assert value(samples, "dora_reconciler_deliveries_total", connection="1", outcome="RETRY_LATER") == 1.0
    assert value(samples, "dora_reconciler_deployments_deferred") == 0.0
    assert value(samples, "dora_reconciler_backlog_waiting") == 1.0, "the refused deployment waits for its connection"


def test_dead_letters_are_counted(world: World, gateway: FakePushgateway) -> None:
    one_new_deployment(world)
    world.devlake.fail_next(1, status=400)
    assert world.run() == 0, "a rejected payload is dead-lettered, not retried"
    samples = gateway.pushes[-1].samples()
    assert value(samples, "dora_reconciler_dead_letters_total") == 1.0
    assert value(samples, "dora_reconciler_deliveries_total", connection="1", outcome="REJECTED") == 1.0
    recorded = {"result": "SUCCESS", "deployment_class": "new-revision"}
    assert value(samples, "dora_reconciler_deployments_total", **recorded) == 1.0, "recorded, though rejected"


def test_a_run_that_finds_the_lock_held_pushes_exit_code_3(world: World, gateway: FakePushgateway) -> None:
    store = open_store(load_config(world.config_path).state)
    try:
        assert store.acquire_lock("run:prod-east", "another-pod", 60)
        assert world.run() == exitcodes.LOCKED
    finally:
        store.close()
    samples = gateway.pushes[-1].samples()
    assert value(samples, "dora_reconciler_last_run_exit_code") == 3.0
    assert value(samples, "dora_reconciler_runs_total", exit_code="3") == 1.0
    assert value(samples, "dora_reconciler_last_success_timestamp_seconds") is None


def test_a_dry_run_pushes_nothing(world: World, gateway: FakePushgateway) -> None:
    assert world.run("--dry-run") == 0
    assert gateway.pushes == []


@pytest.mark.parametrize("answer", ["refused", 500])
def test_a_pushgateway_that_is_down_only_costs_a_warning(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    answer: str | int,
) -> None:
    with FakePushgateway(status=500) as failing:
        if answer == "refused":
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                url = f"http://127.0.0.1:{probe.getsockname()[1]}"
        else:
            url = failing.url
        with World(tmp_path, state_url, monkeypatch, config={"metrics": {"pushgateway": url}}) as world:
            capsys.readouterr()
            assert world.run() == 0
    lines = log_lines(capsys.readouterr().err)
    warnings = [line for line in lines if line["message"].startswith("could not push metrics")]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"
    assert warnings[0]["gateway"] == url
    assert lines[-1]["message"] == "run finished", "the summary stays the last line"


def test_a_push_answered_with_a_redirect_is_not_followed_and_says_where_it_points(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """urllib would follow the 302 with a GET and no body, which an SSO login page answers 200: lost, silently."""
    with FakePushgateway(status=302) as sso:
        url = sso.url
        sso.location = f"{url}/oauth2/start?rd=%2Fmetrics%2Fjob%2Fdora-reconciler"
        with World(tmp_path, state_url, monkeypatch, config={"metrics": {"pushgateway": sso.url}}) as world:
            capsys.readouterr()
            assert world.run() == 0
    assert [push.method for push in sso.pushes] == ["POST"], "never replayed as a GET"
    (warning,) = [line for line in log_lines(capsys.readouterr().err) if line["message"].startswith("could not push")]
    assert f"redirect (HTTP 302) to {url}/oauth2/start;" in warning["reason"]
    assert "rd=" not in warning["reason"] and "metrics.pushgateway" in warning["reason"]


def test_a_cluster_that_cannot_be_listed_is_a_cluster_labelled_series(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, gateway: FakePushgateway
) -> None:
    with FakeKubeAPI() as west:
        west.require_token("not-the-one-in-the-kubeconfig")
        clusters = [
            {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake"},
            {"name": "prod-west", "kubeconfig": str(west.write_kubeconfig(tmp_path / "west", token="wrong"))},
        ]
        config = {"clusters": clusters, "metrics": {"pushgateway": gateway.url}}
        with World(tmp_path, state_url, monkeypatch, config=config) as world:
            world.set_apps([deployed_app(world, "a" * 40, "b" * 40)])
            assert world.run() == exitcodes.RETRY
    samples = gateway.pushes[-1].samples()
    assert value(samples, "dora_reconciler_cluster_listed", cluster="prod-east") == 1.0
    assert value(samples, "dora_reconciler_cluster_listed", cluster="prod-west") == 0.0
    assert value(samples, "dora_reconciler_apps_listed", cluster="prod-east") == 1.0
    assert value(samples, "dora_reconciler_apps_listed", cluster="prod-west") is None, "no count it did not make"
    assert value(samples, "dora_reconciler_last_run_exit_code") == 1.0


# -- units ------------------------------------------------------------------------------------------------


def minimal_config(**overrides: Any) -> Any:
    return validate_config(
        {
            "clusters": [{"name": "prod-west"}, {"name": "prod-east"}],
            "devlake": {"url": "https://devlake.example.com", "connections": [{"id": 1, "api_key_env": "K"}]},
            **overrides,
        }
    )


def test_the_grouping_key_does_not_depend_on_order_or_run() -> None:
    config = minimal_config(environment="STAGING")
    assert grouping_key(config) == {"environment": "STAGING", "clusters": "prod-east+prod-west", "shard": "all"}
    assert grouping_key(config, ("prod-west", "prod-east")) == grouping_key(config, ("prod-east", "prod-west"))
    assert grouping_key(config, ("prod-east",), "2/4")["shard"] == "2-of-4"


def test_push_without_a_pushgateway_does_nothing() -> None:
    assert push(minimal_config(), PrometheusMetrics(), {"shard": "all"}) is False


def test_an_optional_gauge_has_no_sample_until_set() -> None:
    registry = CollectorRegistry()
    gauge = OptionalGauge("example_seconds", "an example", registry)
    assert b"example_seconds " not in generate_latest(registry)
    gauge.set(12.5)
    assert value(parse_samples(generate_latest(registry).decode()), "example_seconds") == 12.5
