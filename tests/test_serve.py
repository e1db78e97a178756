"""``serve`` (schedule, HTTP endpoints, graceful SIGTERM) and the production shapes of ``run``
(``--shard I/N``, ``--cluster NAME``), against the fake Argo CD, GitHub and DevLake of ``tests/world.py``."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from reconciler import exitcodes, scheduler
from reconciler.cli import main
from reconciler.config import Config, load_config
from reconciler.cron import cron_trigger
from reconciler.metrics import PrometheusMetrics
from reconciler.model import AppKey
from reconciler.run import Shard
from reconciler.runtime import Runtime
from reconciler.scheduler import Service
from reconciler.store import open_store
from tests.fakes.kube_api import FakeKubeAPI
from tests.scenarios import deployed_app, new_deployment
from tests.world import KUBE_TOKEN, World, log_lines

WAIT = 30.0
"""Upper bound for any wait on another thread; a test that needs it has failed."""


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def world(tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with World(tmp_path, state_url, monkeypatch, config={"metrics": {"port": 0}}) as world:
        yield world


def no_sleep(seconds: float) -> None:
    return None


class PollingTrigger(BaseTrigger):  # type: ignore[misc]
    """Fires at once, then every 20 ms until ``enough`` is set (fires that find a pass running are skipped)."""

    def __init__(self, enough: threading.Event) -> None:
        self.enough = enough

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        if previous_fire_time is None:
            return now
        if self.enough.is_set():
            return None
        return now + timedelta(milliseconds=20)


def service_for(world: World, **kwargs: Any) -> Service:
    config = load_config(world.config_path)
    kwargs.setdefault("trigger", PollingTrigger(threading.Event()))
    return Service(config, runtime=Runtime.open(config, sleep=no_sleep), host="127.0.0.1", port=0, **kwargs)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def assert_closed(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def posted_refs(world: World) -> list[str]:
    """``name:ref`` of every deployment DevLake accepted, in order."""
    refs = []
    for body in world.posts():
        parts = body["id"].split(":")
        refs.append(f"{parts[3]}:{parts[-1]}")
    return refs


def baseline(world: World, names: list[str]) -> tuple[dict[str, dict[str, Any]], list[str], list[str]]:
    """Apps deployed once, recorded by a first run (which sends nothing)."""
    gitops = world.github.add_commits("acme/gitops", 4)
    images = world.github.add_commits("acme/payments-api", 4)
    apps = {name: deployed_app(world, gitops[0], images[0], name=name) for name in names}
    world.set_apps(list(apps.values()))
    assert world.run() == 0
    assert world.devlake.post_count == 0
    return apps, gitops, images


# -- serve: two scheduled passes, then SIGTERM ---------------------------------------------------------


def test_serve_runs_scheduled_passes_and_stops_cleanly_on_sigterm(world: World) -> None:
    apps, gitops, images = baseline(world, ["payments-api"])
    first = new_deployment(apps["payments-api"], 1, gitops[1], images[1], minute=30)
    second = new_deployment(first, 2, gitops[2], images[2], minute=60)
    world.set_apps([first])

    enough = threading.Event()
    codes: list[int] = []
    seen: dict[str, Any] = {}
    problems: list[BaseException] = []
    service: Service

    def on_pass_finished(code: int) -> None:
        codes.append(code)
        try:
            if len(codes) == 1:
                world.set_apps([second])
            else:
                seen["metrics"] = http_get(service.port, "/metrics")
                seen["healthz"] = http_get(service.port, "/healthz")
        except BaseException as error:
            problems.append(error)
        finally:
            if len(codes) == 2:
                enough.set()
                os.kill(os.getpid(), signal.SIGTERM)
                seen["stop_seen"] = service.stop.wait(WAIT)

    service = service_for(world, trigger=PollingTrigger(enough), on_pass_finished=on_pass_finished)
    previous_handler = signal.getsignal(signal.SIGTERM)
    watchdog = threading.Timer(WAIT, service.request_stop)
    watchdog.start()
    try:
        assert service.run() == exitcodes.OK
    finally:
        watchdog.cancel()

    assert not problems, problems
    assert codes == [0, 0], "two passes, both complete"
    assert seen["stop_seen"], "SIGTERM reached the service"
    assert posted_refs(world) == ["payments-api:h1", "payments-api:h2"], "each pass delivered its deployment"
    status, text = seen["metrics"]
    assert status == 200
    assert 'dora_reconciler_deployments_total{deployment_class="new-revision",result="SUCCESS"} 2.0' in text
    assert seen["healthz"][0] == 200
    assert_closed(service.port)
    assert signal.getsignal(signal.SIGTERM) is previous_handler, "the previous SIGTERM handler is restored"
    assert service.passes == 2


def test_sigterm_during_a_pass_finishes_the_application_in_hand_and_the_next_run_does_the_rest(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = {"metrics": {"port": 0}, "devlake": {"max_concurrency": 1}}
    with World(tmp_path, state_url, monkeypatch, config=config) as world:
        names = ["alpha-api", "bravo-api", "charlie-api"]
        apps, gitops, images = baseline(world, names)
        world.set_apps([new_deployment(apps[n], 1, gitops[1], images[1], minute=30) for n in names])

        service: Service
        stopped_in_time: list[bool] = []

        class SignalOnFirstDelivery(PrometheusMetrics):
            def delivery(self, connection_id: int, outcome: str) -> None:
                super().delivery(connection_id, outcome)
                if not stopped_in_time:
                    os.kill(os.getpid(), signal.SIGTERM)
                    stopped_in_time.append(service.stop.wait(WAIT))

        enough = threading.Event()
        enough.set()  # one pass only
        codes: list[int] = []
        service = service_for(
            world, trigger=PollingTrigger(enough), metrics=SignalOnFirstDelivery(), on_pass_finished=codes.append
        )
        watchdog = threading.Timer(WAIT, service.request_stop)
        watchdog.start()
        try:
            assert service.run() == exitcodes.OK, "a stop is a clean exit, whatever the pass left undone"
        finally:
            watchdog.cancel()

        assert stopped_in_time == [True]
        assert codes == [exitcodes.RETRY], "the interrupted pass reports work left for the next one"
        assert posted_refs(world) == ["alpha-api:h1"], "the Application in hand was finished, no other started"
        assert_closed(service.port)

        assert world.run() == 0
        assert sorted(posted_refs(world)) == ["alpha-api:h1", "bravo-api:h1", "charlie-api:h1"], (
            "the next run sends the rest, and the stopped pass saved what it sent: nothing twice"
        )


class StopOnRetry(logging.Handler):
    """Sends SIGTERM to the process the first time a client is about to wait before a retry."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().endswith("retrying") and not self.sent:
            self.sent += 1
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_while_a_delivery_waits_out_a_long_retry_after_stops_at_once_and_loses_nothing(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DevLake answers 429 with Retry-After: 100. Waiting it out would keep the pod past its 30 s grace period (and
    SIGKILL): the stop ends the wait at once, no attempt follows, the deployment is not recorded, and the next run
    sends it once."""
    config = {"metrics": {"port": 0}, "devlake": {"retry_budget": "10m"}}
    with World(tmp_path, state_url, monkeypatch, config=config) as world:
        apps, gitops, images = baseline(world, ["payments-api"])
        world.set_apps([new_deployment(apps["payments-api"], 1, gitops[1], images[1], minute=30)])
        world.devlake.fail_always(429, retry_after=100)
        loaded = load_config(world.config_path)
        codes: list[int] = []
        daemon: list[bool] = []

        def finished(code: int) -> None:
            codes.append(code)
            daemon.append(threading.current_thread().daemon)

        service = Service(
            loaded,
            runtime=Runtime.open(loaded),  # the stop flag's own wait: the one serve uses
            trigger=PollingTrigger(threading.Event()),
            host="127.0.0.1",
            port=0,
            on_pass_finished=finished,
        )
        trigger = StopOnRetry()
        logging.getLogger("reconciler").addHandler(trigger)
        watchdog = threading.Timer(WAIT, service.request_stop)
        watchdog.start()
        started = time.monotonic()
        try:
            assert service.run() == exitcodes.OK
        finally:
            watchdog.cancel()
            logging.getLogger("reconciler").removeHandler(trigger)
        assert time.monotonic() - started < WAIT / 2, "the 100 s wait was cut short"
        assert trigger.sent == 1
        assert codes == [exitcodes.RETRY] and daemon == [True], "a daemon pass thread: exit never waits for it"
        assert world.devlake.post_count == 1, "no attempt after the stop"

        world.devlake.fail_always(None)
        assert world.run() == 0
        assert posted_refs(world) == ["payments-api:h1"], "the next run sends it, once"


def test_a_pass_that_outlives_the_grace_period_does_not_hold_the_process(world: World) -> None:
    """A request in flight ignores the stop flag until its timeout: when the grace is up the process exits
    anyway, as a SIGKILL would end it but with its logs written and within the pod's grace period."""
    apps, gitops, images = baseline(world, ["payments-api"])
    world.set_apps([new_deployment(apps["payments-api"], 1, gitops[1], images[1], minute=30)])
    in_flight = threading.Event()
    release = threading.Event()
    exits: list[int] = []
    service: Service

    class HangingMetrics(PrometheusMetrics):
        def delivery(self, connection_id: int, outcome: str) -> None:
            super().delivery(connection_id, outcome)
            in_flight.set()
            service.request_stop()
            release.wait(WAIT)  # still "in flight" when the grace is up

    config = load_config(world.config_path)
    enough = threading.Event()
    enough.set()
    service = Service(
        config,
        runtime=Runtime.open(config, sleep=no_sleep),
        trigger=PollingTrigger(enough),
        host="127.0.0.1",
        port=0,
        metrics=HangingMetrics(),
        stop_grace=0.0,
        exit_process=exits.append,
    )
    try:
        assert service.run() == exitcodes.OK
        assert in_flight.is_set() and exits == [exitcodes.OK], "the process ends without waiting for the pass"
        assert_closed(service.port)
    finally:
        release.set()
        service._idle.wait(WAIT)
        service.runtime.close()


def test_serve_through_the_cli(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    apps, gitops, images = baseline(world, ["payments-api"])
    world.set_apps([new_deployment(apps["payments-api"], 1, gitops[1], images[1], minute=30)])
    enough = threading.Event()
    created: list[Service] = []

    class TestService(Service):
        def __init__(self, config: Config) -> None:
            super().__init__(config, host="127.0.0.1", trigger=PollingTrigger(enough), on_pass_finished=self.done)
            created.append(self)

        def done(self, code: int) -> None:
            enough.set()
            self.request_stop()

    monkeypatch.setattr(scheduler, "Service", TestService)
    capsys.readouterr()
    assert main(["serve", "--config", str(world.config_path)]) == 0
    assert posted_refs(world) == ["payments-api:h1"]
    (service,) = created
    assert service.passes == 1
    messages = [line["message"] for line in log_lines(capsys.readouterr().err)]
    assert messages[0] == "serving"
    assert "run finished" in messages
    assert messages[-1] == "stopped"


def test_a_stop_before_the_first_pass_exits_at_once(world: World) -> None:
    baseline(world, ["payments-api"])
    service = service_for(world)
    service.request_stop()
    assert service.run() == exitcodes.OK
    assert service.passes == 0
    assert_closed(service.port)


def test_a_port_in_use_is_a_config_error(world: World) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = load_config(world.config_path)
        service = Service(
            config, runtime=Runtime.open(config, sleep=no_sleep), host="127.0.0.1", port=taken.getsockname()[1]
        )
        assert service.run() == exitcodes.CONFIG


def test_a_pass_finding_the_lock_held_is_skipped_and_the_service_goes_on(world: World) -> None:
    apps, gitops, images = baseline(world, ["payments-api"])
    world.set_apps([new_deployment(apps["payments-api"], 1, gitops[1], images[1], minute=30)])
    service = service_for(world)
    store = open_store(service.config.state)
    try:
        assert store.acquire_lock("run:prod-east", "someone-else", 60)
        assert service.tick() == exitcodes.LOCKED
        assert world.devlake.post_count == 0
        store.release_lock("run:prod-east", "someone-else")
        assert service.tick() == exitcodes.OK
        assert posted_refs(world) == ["payments-api:h1"]
    finally:
        store.close()
        service.runtime.close()
    runs = {
        sample.labels["exit_code"]: sample.value
        for metric in service.metrics.registry.collect()
        if metric.name == "dora_reconciler_runs"
        for sample in metric.samples
        if sample.name.endswith("_total")
    }
    assert runs == {"0": 1.0, "1": 0.0, "3": 1.0}


# -- /healthz --------------------------------------------------------------------------------------------


def test_healthz_answers_200_while_passes_happen_and_503_when_they_stop(world: World) -> None:
    baseline(world, ["payments-api"])
    config = load_config(world.config_path)
    service = Service(
        config,
        runtime=Runtime.open(config, sleep=no_sleep),
        trigger=cron_trigger("*/5 * * * *"),
        host="127.0.0.1",
        port=0,
    )
    server = service.serve_http()
    try:
        status, text = http_get(service.port, "/healthz")
        assert (status, text) == (200, "waiting for the first pass\n")
        start = service.started_at
        # Due by the second fire time after the last sign of life (5-10 min) plus 5 minutes of grace.
        assert service.health(start + timedelta(minutes=9, seconds=59))[0]
        ok, reason = service.health(start + timedelta(minutes=16))
        assert not ok and "no pass ran since the process started" in reason

        assert service.tick() == exitcodes.OK
        assert service.last_finished is not None
        ok, reason = service.health(service.last_finished + timedelta(minutes=4))
        assert ok and "with exit code 0" in reason
        assert not service.health(service.last_finished + timedelta(minutes=16))[0]

        assert http_get(service.port, "/nothing")[0] == 404
        service.request_stop()
        assert http_get(service.port, "/healthz") == (503, "stopping\n")
    finally:
        server.shutdown()
        server.server_close()
        service.runtime.close()


# -- the schedule ------------------------------------------------------------------------------------------

FRIDAY = datetime(2025, 6, 6, 10, 2, tzinfo=UTC)


def fire_times(trigger: BaseTrigger, start: datetime, count: int) -> list[datetime]:
    times: list[datetime] = []
    previous: datetime | None = None
    now = start
    for _ in range(count):
        fire: datetime = trigger.get_next_fire_time(previous, now)
        times.append(fire)
        previous = now = fire
    return times


def test_the_default_schedule_fires_every_five_minutes_on_the_minute() -> None:
    expected = [datetime(2025, 6, 6, 10, m, tzinfo=UTC) for m in (5, 10, 15)]
    assert fire_times(CronTrigger.from_crontab("*/5 * * * *", timezone=UTC), FRIDAY, 3) == expected
    assert fire_times(cron_trigger("*/5 * * * *"), FRIDAY, 3) == expected


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("30 2 * * *", ["2025-06-07T02:30", "2025-06-08T02:30", "2025-06-09T02:30"]),
        ("0 9 * * 1-5", ["2025-06-09T09:00", "2025-06-10T09:00", "2025-06-11T09:00"]),
        ("0 9 * * 0", ["2025-06-08T09:00", "2025-06-15T09:00", "2025-06-22T09:00"]),
        ("0 9 * * 7", ["2025-06-08T09:00", "2025-06-15T09:00", "2025-06-22T09:00"]),
        ("0 9 * * sat,SUN", ["2025-06-07T09:00", "2025-06-08T09:00", "2025-06-14T09:00"]),
        ("0 9 * * */3", ["2025-06-07T09:00", "2025-06-08T09:00", "2025-06-11T09:00"]),  # sun, wed, sat
        ("0 0 1,20 * 1", ["2025-06-09T00:00", "2025-06-16T00:00", "2025-06-20T00:00"]),
        ("15 */6 * * *", ["2025-06-06T12:15", "2025-06-06T18:15", "2025-06-07T00:15"]),
    ],
)
def test_schedules_fire_when_cron_would(schedule: str, expected: list[str]) -> None:
    """From Friday 2025-06-06 10:02 UTC. Weekdays as in cron (0 and 7 Sunday); both day fields: either."""
    got = [t.strftime("%Y-%m-%dT%H:%M") for t in fire_times(cron_trigger(schedule), FRIDAY, 3)]
    assert got == expected


def test_apscheduler_from_crontab_would_shift_weekdays_by_one() -> None:
    """Why ``serve`` does not use ``from_crontab`` as is: in APScheduler 3.x, 1-5 means Tuesday to Saturday."""
    shifted = CronTrigger.from_crontab("0 9 * * 1-5", timezone=UTC).get_next_fire_time(None, FRIDAY)
    assert shifted.strftime("%a") == "Sat"
    assert cron_trigger("0 9 * * 1-5").get_next_fire_time(None, FRIDAY).strftime("%a") == "Mon"


@pytest.mark.parametrize(
    ("schedule", "reason"),
    [
        ("*/5 * * *", "5 fields"),
        ("0 9 * * 8", "weekday '8'"),
        ("0 9 * * fri-mon", "backwards"),
        ("0 9 * * mon/0", "step"),
        ("61 * * * *", "invalid cron schedule"),
        ("0 9 * * weekday", "not a number"),
    ],
)
def test_invalid_schedules_are_rejected_with_the_reason(schedule: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        cron_trigger(schedule)


# -- run --shard I/N and --cluster NAME ----------------------------------------------------------------

SHARD_APPS = [f"service-{letter}" for letter in "abcdefghij"]


def shard_of(name: str, count: int) -> int:
    key = AppKey("prod-east", "argocd", name)
    return next(i for i in range(count) if Shard(i, count).owns(key))


def test_shards_partition_the_applications(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    apps, gitops, images = baseline(world, SHARD_APPS)
    world.set_apps([new_deployment(apps[n], 1, gitops[1], images[1], minute=30) for n in SHARD_APPS])
    expected = {i: sorted(n for n in SHARD_APPS if shard_of(n, 3) == i) for i in range(3)}
    assert all(expected.values()), "every shard has work (else this test proves little)"

    handled: dict[int, list[str]] = {}
    for index in range(3):
        before = len(world.posts())
        capsys.readouterr()
        assert world.run("--shard", f"{index}/3") == 0
        handled[index] = sorted(ref.split(":")[0] for ref in posted_refs(world)[before:])
        summary = log_lines(capsys.readouterr().err)[-1]["summary"]
        assert summary["apps_listed"] == len(expected[index]), "a shard lists only its own Applications"
    assert handled == expected
    assert sorted(posted_refs(world)) == sorted(f"{n}:h1" for n in SHARD_APPS), "each app once, by one shard"

    for index in range(3):
        assert world.run("--shard", f"{index}/3") == 0
    assert world.devlake.post_count == len(SHARD_APPS), "nothing left, nothing sent twice"


def test_each_shard_has_its_own_lock(world: World) -> None:
    apps, gitops, images = baseline(world, SHARD_APPS)
    world.set_apps([new_deployment(apps[n], 1, gitops[1], images[1], minute=30) for n in SHARD_APPS])
    store = open_store(load_config(world.config_path).state)
    try:
        assert store.acquire_lock("run:prod-east:0of3", "another-pod", 60)
        assert world.run("--shard", "0/3") == exitcodes.LOCKED
        assert world.run("--shard", "1/3") == 0, "another shard's lock does not block this one"
        assert world.run("--shard", "2/3") == 0
    finally:
        store.close()
    sent = {ref.split(":")[0] for ref in posted_refs(world)}
    assert sent == {n for n in SHARD_APPS if shard_of(n, 3) != 0}


@pytest.mark.parametrize("shard", ["3/3", "1", "a/b", "0/0"])
def test_a_bad_shard_is_a_usage_error(world: World, shard: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert world.run("--shard", shard) == exitcodes.CONFIG
    assert "--shard expects" in capsys.readouterr().err


@pytest.fixture
def two_clusters(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[World, FakeKubeAPI]]:
    with FakeKubeAPI() as west:
        west.require_token(KUBE_TOKEN)
        west_kubeconfig = west.write_kubeconfig(tmp_path / "kubeconfig-west", token=KUBE_TOKEN)
        clusters = [
            {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": 2},
            {"name": "prod-west", "kubeconfig": str(west_kubeconfig), "context": "fake"},
        ]
        with World(tmp_path, state_url, monkeypatch, config={"clusters": clusters}) as world:
            yield world, west


def test_cluster_limits_the_run_to_one_cluster(two_clusters: tuple[World, FakeKubeAPI]) -> None:
    world, west = two_clusters
    gitops = world.github.add_commits("acme/gitops", 2)
    images = world.github.add_commits("acme/payments-api", 2)
    east_app = deployed_app(world, gitops[0], images[0], name="orders-api")
    west_app = deployed_app(world, gitops[0], images[0], name="billing-api")
    world.set_apps([east_app])
    west.set_apps([west_app])
    assert world.run() == 0, "baseline of both clusters"
    world.set_apps([new_deployment(east_app, 1, gitops[1], images[1], minute=30)])
    west.set_apps([new_deployment(west_app, 1, gitops[1], images[1], minute=30)])
    world.kube.clear_requests()

    assert world.run("--cluster", "prod-west") == 0
    assert [body["id"].split(":")[1:4] for body in world.posts()] == [["prod-west", "argocd", "billing-api"]]
    assert world.kube.list_calls == 0, "the other cluster is not even listed"

    assert world.run() == 0
    assert sorted(body["id"].split(":")[1] for body in world.posts()) == ["prod-east", "prod-west"]


def test_an_unknown_cluster_is_a_usage_error(
    two_clusters: tuple[World, FakeKubeAPI], capsys: pytest.CaptureFixture[str]
) -> None:
    world, west = two_clusters
    world.kube.clear_requests()
    assert world.run("--cluster", "prod-north") == exitcodes.CONFIG
    assert "unknown cluster(s): prod-north" in capsys.readouterr().err
    assert world.kube.list_calls == 0 and west.list_calls == 0
