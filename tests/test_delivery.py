"""Delivery to DevLake: exactly once per deployment and connection, whatever fails.

The real CLI runs against the fake Kubernetes API, GitHub and DevLake of ``tests/world.py``. Clients never
sleep: ``Runtime.open`` is patched to give them a no-op ``sleep``, and the one test about the retry budget
drives a virtual clock that only sleeping advances.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from reconciler import exitcodes
from reconciler.config import Config, load_config
from reconciler.delivery import OUTAGE_FAILURES, RetryBudget
from reconciler.devlake import MAX_ATTEMPTS, Delivery, DevLakeClient, PayloadError, build_payload
from reconciler.github import GitHubClient
from reconciler.model import MAX_DEPLOYMENT_ID_LENGTH, AppKey, Snapshot, deployment_id
from reconciler.reconcile import Reconciler
from reconciler.run import RunOptions
from reconciler.runtime import Runtime
from reconciler.store import RedisStore, RunLock, SQLiteStore, Store, open_store
from tests.factories import DEFAULT_REPO as GITOPS
from tests.factories import (
    at,
    fake_uid,
    git_source,
    history_entry,
    make_app,
    operation_state,
    set_health,
)
from tests.fakes.devlake import FakeDevLake
from tests.scenarios import (
    baselined_twins,
    deploy,
    image_of,
    payments_world,
    settled_app,
    three_deployments_waiting,
)
from tests.world import DEVLAKE_KEYS, World

CLUSTER = "prod-east"
NAMESPACE = "argocd"


class Crash(BaseException):
    """The process dies at this point: nothing after it runs (not an ``Exception``, so nothing catches it)."""


class ScriptedDevLake(FakeDevLake):
    """The fake DevLake plus an answer chosen per deployment id, and the number of requests in flight."""

    def __init__(self) -> None:
        super().__init__()
        self._script_lock = threading.Lock()
        self._answers: dict[str, int] = {}
        self._in_flight = 0
        self._max_in_flight = 0

    def answer(self, deployment_id: str, status: int | None) -> None:
        """Answer every POST of this deployment id with ``status`` (``None``: behave normally again)."""
        with self._script_lock:
            if status is None:
                self._answers.pop(deployment_id, None)
            else:
                self._answers[deployment_id] = status

    @property
    def max_in_flight(self) -> int:
        with self._script_lock:
            return self._max_in_flight

    def _handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, Any, dict[str, str]]:
        with self._script_lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            return super()._handle(method, path, headers, raw)
        finally:
            with self._script_lock:
                self._in_flight -= 1

    def _respond(self, method: str, path: str, headers: dict[str, str], text: str) -> tuple[int, Any, dict[str, str]]:
        try:
            body = json.loads(text) if text.strip() else None
        except ValueError:
            body = None
        if isinstance(body, dict):
            with self._script_lock:
                status = self._answers.get(str(body.get("id")))
            if status is not None:
                message = f"scripted answer {status} for this deployment"
                return status, {"code": 0, "success": False, "message": message, "causes": None, "data": None}, {}
        return super()._respond(method, path, headers, text)

    # -- what DevLake received ---------------------------------------------------------------------

    def accepted_ids(self, connection: int | None = None) -> list[str]:
        """Deployment ids of the POSTs answered 200, in order."""
        return [
            r.body["id"]
            for r in self.requests
            if r.method == "POST"
            and r.status == 200
            and isinstance(r.body, dict)
            and (connection is None or r.connection == connection)
        ]

    def posted_ids(self, connection: int | None = None) -> list[str]:
        """Deployment ids of every POST, whatever the answer, in order."""
        return [
            r.body["id"]
            for r in self.requests
            if r.method == "POST" and isinstance(r.body, dict) and (connection is None or r.connection == connection)
        ]


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def redis_state(redis_url: str) -> str:
    return redis_url


@pytest.fixture(autouse=True)
def clients_never_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = Runtime.open.__func__  # type: ignore[attr-defined]

    def open_without_sleeping(cls: type[Runtime], /, config: Config, **_: Any) -> Runtime:
        runtime: Runtime = opened(cls, config, sleep=lambda _seconds: None)
        return runtime

    monkeypatch.setattr(Runtime, "open", classmethod(open_without_sleeping))


@contextmanager
def open_world(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    *,
    devlake: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    connections: Sequence[dict[str, Any]] | None = None,
) -> Iterator[tuple[World, ScriptedDevLake]]:
    overrides: dict[str, Any] = dict(config or {})
    overrides["devlake"] = {"retry_budget": "1h", **(devlake or {})}
    world = World(tmp_path, state_url, monkeypatch, config=overrides, connections=connections)
    world.devlake.close()
    fake = ScriptedDevLake()
    world.devlake = fake
    with world:
        yield world, fake


def one_page(tmp_path: Path, page_size: int = 500) -> dict[str, Any]:
    """A ``clusters`` override listing every Application in one page (so deliveries can all overlap)."""
    return {
        "clusters": [
            {"name": CLUSTER, "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": page_size}
        ]
    }


def id_of(name: str, ref: str, namespace: str = NAMESPACE) -> str:
    return deployment_id(AppKey(CLUSTER, namespace, name), fake_uid(f"{namespace}/{name}"), ref)


def ids_of(name: str, *history_ids: int) -> list[str]:
    return [id_of(name, f"h{i}") for i in history_ids]


def open_state(world: World) -> Store:
    return open_store(load_config(world.config_path).state)


def wipe_state(world: World) -> None:
    """Lose the state store entirely (a new Redis, a deleted SQLite file)."""
    store = open_state(world)
    try:
        if isinstance(store, RedisStore):
            keys = list(store.client.scan_iter(match=f"{store.key_prefix}:*", count=1000))
            if keys:
                store.client.delete(*keys)
            return
        assert isinstance(store, SQLiteStore)
        path = store.path
    finally:
        store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def snapshots_of(world: World, *names: str) -> dict[AppKey, Snapshot]:
    store = open_state(world)
    try:
        return store.load_snapshots([AppKey(CLUSTER, NAMESPACE, name) for name in names])
    finally:
        store.close()


def status_json(world: World, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert world.run("--json", command="status") == 0
    data: dict[str, Any] = json.loads(capsys.readouterr().out)
    return data


def in_order_per_app(ids: Sequence[str]) -> dict[str, list[str]]:
    """The ids grouped by Application (the id without its ``:h<n>`` ref), each group in arrival order."""
    groups: dict[str, list[str]] = {}
    for deployment in ids:
        groups.setdefault(deployment.rsplit(":", 1)[0], []).append(deployment)
    return groups


def history_number(deployment: str) -> int:
    return int(deployment.rsplit(":h", 1)[1])


# -- 1. ids -----------------------------------------------------------------------------------------


def test_ids_are_deterministic_and_a_backfill_after_losing_the_store_sends_the_same_ones(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops = world.github.add_commits("acme/gitops", 4)
        images = world.github.add_commits("acme/payments-api", 4)
        app = settled_app("payments-api", gitops[0], images[0])
        for i in range(1, 4):
            app = deploy(app, i, gitops[i], images[i])
        world.set_apps([app])

        assert world.run(command="backfill") == 0
        first = devlake.accepted_ids(1)
        assert first == ids_of("payments-api", 0, 1, 2, 3)
        assert all(len(i) <= MAX_DEPLOYMENT_ID_LENGTH for i in first)

        wipe_state(world)
        assert snapshots_of(world, "payments-api") == {}
        assert world.run(command="backfill") == 0
        assert devlake.accepted_ids(1)[len(first) :] == first, "the same ids again, oldest first"
        assert sorted(devlake.deployments(1)) == sorted(first), "DevLake upserted them: still one each"
        rows = devlake.commit_rows(1)
        assert len(rows) == len({(r["id"], r["commit_sha"]) for r in rows})
        assert {r["cicd_deployment_id"] for r in rows} == set(first)

        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts, "the backfill restored the snapshot: a run has nothing to send"


def test_long_names_give_distinct_ids_within_150_characters_that_devlake_stores(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    names = ["payments-" + "x" * 230 + "-a", "payments-" + "x" * 230 + "-b"]
    namespace = "team-" + "n" * 58
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        apps = [
            make_app(
                name,
                namespace,
                source=git_source(GITOPS),
                history=[
                    history_entry(0, gitops[0], at(0), source=git_source(GITOPS)),
                    history_entry(1, gitops[1], at(10), source=git_source(GITOPS)),
                ],
                operation_state=operation_state(
                    "Succeeded", at(9.8), at(10), revision=gitops[1], images=[image_of("payments-api", images[1])]
                ),
                summary_images=[image_of("payments-api", images[1])],
                health_transition_at=at(11),
            )
            for name in names
        ]
        world.set_apps(apps)
        assert world.run(command="backfill") == 0

        ids = devlake.accepted_ids(1)
        expected = [id_of(name, f"h{i}", namespace) for name in names for i in (0, 1)]
        assert sorted(ids) == sorted(expected)
        assert len(set(ids)) == 4
        assert all(len(i) <= MAX_DEPLOYMENT_ID_LENGTH for i in ids)
        assert all(len(row["id"]) <= 255 for row in devlake.commit_rows(1)), "DevLake's commit-row id column"


# -- 2. routing and component dedupe ---------------------------------------------------------------

REGIONS = {"applications": {"component": {"strip_suffixes": ["eu", "us"]}}}
TWO_CONNECTIONS = [
    {"id": 1, "api_key_env": "DEVLAKE_KEY_1"},
    {"id": 6, "api_key_env": "DEVLAKE_KEY_6", "match": {"components": ["payments-api"]}},
]


def test_each_connection_gets_its_deployments_once_with_its_own_key(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS, connections=TWO_CONNECTIONS) as (world, devlake):
        gitops, images = payments_world(world)
        search = world.github.add_commits("acme/search-api", 2)
        eu = settled_app("payments-api-eu", gitops[0], images[0])
        us = settled_app("payments-api-us", gitops[0], images[0])
        other = settled_app("search-api", gitops[0], search[0], image_repo="search-api")
        world.set_apps([eu, us, other])
        assert world.run() == 0

        world.set_apps(
            [
                deploy(eu, 1, gitops[1], images[1]),
                deploy(us, 1, gitops[1], images[1]),
                deploy(other, 1, gitops[1], search[1], image_repo="search-api"),
            ]
        )
        assert world.run() == 0

        payments = id_of("payments-api-eu", "h1")
        assert sorted(devlake.deployments(1)) == sorted([payments, id_of("search-api", "h1")])
        assert list(devlake.deployments(6)) == [payments], "only payments-api matches connection 6"
        assert sorted(devlake.accepted_ids()) == sorted([payments, payments, id_of("search-api", "h1")])
        assert {r.status for r in devlake.requests} == {200}, "each connection's own key was accepted"
        assert id_of("payments-api-us", "h1") not in devlake.posted_ids(), "the same change, already sent"

        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts, "the deduplicated Application advanced too"


def test_the_same_change_deployed_by_a_second_application_a_tick_later_is_not_sent(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS, connections=TWO_CONNECTIONS) as (world, devlake):
        gitops, images, eu, us = baselined_twins(world)

        eu = deploy(eu, 1, gitops[1], images[1])
        world.set_apps([eu, us])
        assert world.run() == 0
        assert devlake.accepted_ids() == [id_of("payments-api-eu", "h1")] * 2

        us = deploy(us, 1, gitops[1], images[1])
        world.set_apps([eu, us])
        assert world.run() == 0
        assert devlake.post_count == 2, "us made the change eu already sent"

        eu, us = deploy(eu, 2, gitops[2], images[2]), deploy(us, 2, gitops[2], images[2])
        world.set_apps([eu, us])
        assert world.run() == 0
        assert devlake.accepted_ids()[2:] == [id_of("payments-api-eu", "h2")] * 2
        assert world.run() == 0
        assert devlake.post_count == 4


def test_application_dedupe_mode_sends_every_applications_deployment(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(
        tmp_path, state_url, monkeypatch, config=REGIONS, devlake={"dedupe": "application"}, connections=TWO_CONNECTIONS
    ) as (world, devlake):
        gitops, images, eu, us = baselined_twins(world)
        world.set_apps([deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])])
        assert world.run() == 0
        both = sorted([id_of("payments-api-eu", "h1"), id_of("payments-api-us", "h1")])
        assert sorted(devlake.deployments(1)) == both
        assert sorted(devlake.deployments(6)) == both
        assert devlake.post_count == 4


def test_rollbacks_and_roll_forwards_go_out_while_the_twin_application_repeating_them_does_not(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS) as (world, devlake):
        gitops, images, eu, us = baselined_twins(world)

        path = [1, 0, 1]  # forward, rollback, the same change forward again
        for step, target in enumerate(path, start=1):
            eu = deploy(eu, step, gitops[target], images[target])
            world.set_apps([eu, us])
            assert world.run() == 0
        assert devlake.accepted_ids() == ids_of("payments-api-eu", 1, 2, 3), "each is a real deployment"

        for step, target in enumerate(path, start=1):
            us = deploy(us, step, gitops[target], images[target])
            world.set_apps([eu, us])
            assert world.run() == 0
        assert devlake.post_count == 3, "us made the same three changes"

        us = deploy(us, 4, gitops[0], images[0])
        us = deploy(us, 5, gitops[1], images[1])
        world.set_apps([eu, us])
        assert world.run() == 0
        assert devlake.accepted_ids()[3:] == ids_of("payments-api-us", 4, 5), "eu never made these a second time"


def test_a_shared_change_whose_sender_is_held_back_is_sent_once_by_it_on_the_next_run(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS) as (world, devlake):
        gitops, images, eu, us = baselined_twins(world)
        world.set_apps([deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])])
        sender = id_of("payments-api-eu", "h1")
        devlake.answer(sender, 503)

        assert world.run() == exitcodes.RETRY
        assert devlake.deployments(1) == {}
        devlake.answer(sender, None)
        assert world.run() == 0
        assert list(devlake.deployments(1)) == [sender]
        assert id_of("payments-api-us", "h1") not in devlake.posted_ids()


def test_a_backfill_sends_only_what_no_application_has_sent(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS) as (world, devlake):
        gitops, images, eu, us = baselined_twins(world)
        eu, us = deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])
        world.set_apps([eu, us])
        assert world.run() == 0
        assert devlake.accepted_ids() == [id_of("payments-api-eu", "h1")]

        assert world.run(command="backfill") == 0
        assert devlake.posted_ids()[1:] == ids_of("payments-api-eu", 0), (
            "the baseline entry (new to DevLake) once for both Applications; h1 is in DevLake already"
        )

        eu, us = deploy(eu, 2, gitops[2], images[2]), deploy(us, 2, gitops[2], images[2])
        world.set_apps([eu, us])
        assert world.run() == 0
        assert devlake.posted_ids()[2:] == ids_of("payments-api-eu", 2)
        assert sorted(devlake.deployments(1)) == sorted(ids_of("payments-api-eu", 0, 1, 2))
        assert not [i for i in devlake.posted_ids() if "payments-api-us" in i]


# -- 3. retries and holding back -------------------------------------------------------------------


@pytest.mark.parametrize(("status", "retry_after"), [(503, None), (429, 1), (502, None)])
def test_a_transient_failure_is_retried_within_the_run(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch, status: int, retry_after: int | None
) -> None:
    with open_world(tmp_path, redis_state, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1])])
        devlake.fail_next(2, status=status, retry_after=retry_after)
        assert world.run() == 0
        assert devlake.posted_ids() == ids_of("payments-api", 1) * 3
        assert list(devlake.deployments(1)) == ids_of("payments-api", 1)


def test_an_undeliverable_deployment_holds_back_its_application_and_the_next_run_sends_in_order(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        search = world.github.add_commits("acme/search-api", 2)
        app = settled_app("payments-api", gitops[0], images[0])
        other = settled_app("search-api", gitops[0], search[0], image_repo="search-api")
        world.set_apps([app, other])
        assert world.run() == 0
        before = snapshots_of(world, "payments-api")

        for i in (1, 2, 3):
            app = deploy(app, i, gitops[i], images[i])
        world.set_apps([app, deploy(other, 1, gitops[1], search[1], image_repo="search-api")])
        stuck = id_of("payments-api", "h2")
        devlake.answer(stuck, 503)
        assert world.run() == exitcodes.RETRY

        assert set(devlake.deployments(1)) == {id_of("payments-api", "h1"), id_of("search-api", "h1")}
        assert devlake.posted_ids().count(stuck) == MAX_ATTEMPTS, "retried within the budget, then left"
        assert id_of("payments-api", "h3") not in devlake.posted_ids(), "h3 waits behind h2"
        after = snapshots_of(world, "payments-api")[AppKey(CLUSTER, NAMESPACE, "payments-api")]
        assert after.last_history_id == 1, "the snapshot stopped at the last deployment delivered"
        assert before[AppKey(CLUSTER, NAMESPACE, "payments-api")].last_history_id == 0
        last = status_json(world, capsys)["runs"][0]
        assert last["exit_code"] == 1 and last["retry_later"] == 1 and last["dead_lettered"] == 0

        devlake.answer(stuck, None)
        sent = len(devlake.accepted_ids())
        assert world.run() == 0
        assert devlake.accepted_ids()[sent:] == ids_of("payments-api", 2, 3), "same ids, in order, h1 not again"
        assert sorted(devlake.deployments(1)) == sorted([*ids_of("payments-api", 1, 2, 3), id_of("search-api", "h1")])


@pytest.mark.parametrize("broken", ["revoked key", "unknown connection", "key not set"])
def test_a_connection_configuration_error_holds_deployments_back_without_dead_letters_or_more_requests(
    tmp_path: Path,
    redis_state: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    broken: str,
) -> None:
    state_url = redis_state
    with open_world(tmp_path, state_url, monkeypatch, config=one_page(tmp_path), devlake={"max_concurrency": 1}) as (
        world,
        devlake,
    ):
        gitops, images = payments_world(world)
        names = [f"app-{n}" for n in range(4)]
        apps = [settled_app(name, gitops[0], images[0]) for name in names]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])

        if broken == "revoked key":
            monkeypatch.setenv("DEVLAKE_KEY_1", "revoked-" + DEVLAKE_KEYS[1])
        elif broken == "key not set":
            monkeypatch.delenv("DEVLAKE_KEY_1")
        else:
            devlake.remove_connection(1)
            devlake.add_api_key(DEVLAKE_KEYS[1])  # a key that may call any path, to a connection id gone
        capsys.readouterr()
        code = world.run()
        if broken == "key not set":
            assert code == exitcodes.CONFIG, "a key the config names but the environment lacks stops the run at start"
            assert "devlake.connections[0].api_key_env: the environment variable DEVLAKE_KEY_1 is not set" in (
                capsys.readouterr().err
            )
        else:
            assert code == exitcodes.RETRY
        expected = {"revoked key": ({403}, 1), "unknown connection": ({404}, 1), "key not set": (set(), 0)}[broken]
        assert ({r.status for r in devlake.requests}, devlake.post_count) == expected, (
            "the connection is held back for the rest of the run once its configuration is refused"
        )
        assert devlake.deployments(1) == {}
        assert status_json(world, capsys)["dead_letters"] == []

        monkeypatch.setenv("DEVLAKE_KEY_1", DEVLAKE_KEYS[1])
        devlake.add_connection(1, DEVLAKE_KEYS[1])
        assert world.run() == 0
        assert sorted(devlake.deployments(1)) == sorted(id_of(name, "h1") for name in names)


def test_a_redirect_in_front_of_devlake_is_never_followed_and_holds_deliveries_back(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An SSO proxy answers the POST with 302 to its login page; following it would turn the POST into a GET
    that the login page answers 200, and the deployment would be recorded as sent without reaching DevLake."""
    with open_world(tmp_path, redis_state, monkeypatch, config=one_page(tmp_path), devlake={"max_concurrency": 1}) as (
        world,
        devlake,
    ):
        gitops, images = payments_world(world)
        names = [f"app-{n}" for n in range(3)]
        apps = [settled_app(name, gitops[0], images[0]) for name in names]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])
        devlake.sso_redirect("/oauth2/start")
        capsys.readouterr()

        assert world.run() == exitcodes.RETRY
        err = capsys.readouterr().err
        assert [(r.method, r.status) for r in devlake.requests] == [("POST", 302)], (
            "not followed, and the connection is held back for the rest of the run"
        )
        held = [json.loads(line) for line in err.splitlines() if "held back for the rest of this run" in line]
        assert held and f"to {devlake.url}/oauth2/start;" in held[0]["reason"], held
        assert "rd=" not in err, "the redirect's query (SSO state, the original URL) is not repeated"
        status = status_json(world, capsys)
        assert status["dead_letters"] == []
        (waiting,) = status["backlog"]
        assert waiting["connection"] == 1 and sorted(waiting["deployments"]) == sorted(id_of(n, "h1") for n in names), (
            "kept with their payloads in the connection's backlog until the redirect is fixed"
        )

        devlake.sso_redirect(None)
        assert world.run() == 0
        assert sorted(devlake.deployments(1)) == sorted(id_of(name, "h1") for name in names)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, {"code": 0, "success": False, "message": "record not saved", "causes": None, "data": None}),
        (200, b""),
        (204, b""),
        (200, b"<html><body>Sign in</body></html>"),
    ],
    ids=["success-false", "empty-200", "204", "html-200"],
)
def test_a_2xx_without_devlakes_success_answer_is_retried_and_never_recorded_as_sent(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch, status: int, body: Any
) -> None:
    with open_world(tmp_path, redis_state, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1])])
        devlake.fail_always(status, body=body)

        assert world.run() == exitcodes.RETRY
        assert devlake.posted_ids() == ids_of("payments-api", 1) * MAX_ATTEMPTS, "retried as a 5xx is"
        assert snapshots_of(world, "payments-api")[AppKey(CLUSTER, NAMESPACE, "payments-api")].last_history_id == 0

        devlake.fail_always(None)
        assert world.run() == 0
        assert list(devlake.deployments(1)) == ids_of("payments-api", 1)


def test_the_retry_budget_bounds_the_time_a_run_spends_retrying(tmp_path: Path, state_url: str) -> None:
    """Sleeping is the only thing that moves this clock, so the run's retry waits are measured exactly."""
    monkeypatch = pytest.MonkeyPatch()
    with (
        monkeypatch.context() as patch,
        open_world(tmp_path, state_url, patch, devlake={"retry_budget": "20s"}) as (
            world,
            devlake,
        ),
    ):
        gitops, images = payments_world(world)
        names = [f"app-{n}" for n in range(3)]
        apps = [settled_app(name, gitops[0], images[0]) for name in names]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])
        devlake.fail_always(503)

        slept: list[float] = []
        config = load_config(world.config_path).model_copy()
        config = config.model_copy(update={"devlake": config.devlake.model_copy(update={"max_concurrency": 1})})

        def clock() -> float:
            return 1000.0 + sum(slept)

        store = open_store(config.state)
        try:
            github = GitHubClient(config.github, store, sleep=lambda _s: None)
            with DevLakeClient(config.devlake, sleep=slept.append, clock=clock) as client:
                reconciler = Reconciler(config, store, github, client, monotonic=clock)
                summary = reconciler.run(RunOptions())
        finally:
            store.close()

        assert summary.exit_code == 1 and summary.retry_later == 3
        assert 0 < sum(slept) <= 20, "every wait fits in what was left of the run's budget"
        assert devlake.posted_ids().count(id_of("app-0", "h1")) > 1, "the first delivery had budget to retry"
        assert devlake.post_count < 3 * MAX_ATTEMPTS, "later deliveries only had what was left"


def test_with_no_retry_budget_each_delivery_is_tried_once(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, redis_state, monkeypatch, devlake={"retry_budget": "0s"}) as (world, devlake):
        gitops, images = payments_world(world)
        apps = [settled_app(f"app-{n}", gitops[0], images[0]) for n in range(3)]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])
        devlake.fail_always(503)
        assert world.run() == exitcodes.RETRY
        assert sorted(devlake.posted_ids()) == sorted(id_of(f"app-{n}", "h1") for n in range(3))


# -- 4. permanent rejections: dead letters and status ----------------------------------------------


def test_a_rejected_deployment_is_dead_lettered_the_application_moves_on_and_status_lists_it(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        three_deployments_waiting(world, "payments-api")
        rejected = id_of("payments-api", "h2")
        devlake.answer(rejected, 400)

        assert world.run() == 0, "nothing is left to retry"
        assert devlake.posted_ids().count(rejected) == 1, "a 400 is not retried"
        assert sorted(devlake.deployments(1)) == sorted(ids_of("payments-api", 1, 3))

        capsys.readouterr()
        assert world.run(command="status") == 0
        text = capsys.readouterr().out
        assert "dead letters (1):" in text
        assert f"connection 1 {rejected}: HTTP 400 scripted answer 400 for this deployment" in text
        assert "1 dead-lettered" in text

        data = status_json(world, capsys)
        (letter,) = data["dead_letters"]
        assert letter["deployment_id"] == rejected and letter["status"] == 400 and letter["connection"] == 1
        assert letter["app"] == f"{CLUSTER}/{NAMESPACE}/payments-api"
        assert letter["payload"]["id"] == rejected and letter["payload"]["deploymentCommits"]
        assert data["runs"][0]["dead_lettered"] == 1 and data["runs"][0]["sent"] == 2
        assert DEVLAKE_KEYS[1] not in json.dumps(data)

        devlake.answer(rejected, None)
        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts, "the application advanced past it"
        assert len(status_json(world, capsys)["dead_letters"]) == 1


def test_a_deployment_without_a_payload_is_counted_as_skipped_and_recorded(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unbuildable = id_of("payments-api", "h1")

    def build(enriched: Any, **kwargs: Any) -> dict[str, Any]:
        if enriched.deployment.id == unbuildable:
            raise PayloadError("no commit with a full 40-hex SHA")
        payload: dict[str, Any] = build_payload(enriched, **kwargs)
        return payload

    with open_world(tmp_path, redis_state, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        app = deploy(deploy(app, 1, gitops[1], images[1]), 2, gitops[2], images[2])
        world.set_apps([app])
        monkeypatch.setattr("reconciler.delivery.build_payload", build)
        assert world.run() == 0
        assert devlake.posted_ids() == ids_of("payments-api", 2)
        run = status_json(world, capsys)["runs"][0]
        assert run["deployments_skipped"] == 1 and run["deployments_success"] == 1
        assert world.run() == 0
        assert devlake.post_count == 1


# -- 5. concurrency across Applications, order within one ------------------------------------------


def test_deployments_of_one_application_arrive_in_history_order(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=one_page(tmp_path)) as (world, devlake):
        names = ["alpha", "beta", "gamma"]
        three_deployments_waiting(world, *names)
        assert world.run() == 0
        groups = in_order_per_app(devlake.accepted_ids())
        assert groups == {id_of(name, "h1").rsplit(":", 1)[0]: ids_of(name, 1, 2, 3) for name in names}


def test_a_burst_of_300_deployments_over_100_applications_is_delivered_once_each_concurrently(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    bound = 4
    with open_world(
        tmp_path, redis_state, monkeypatch, config=one_page(tmp_path, 50), devlake={"max_concurrency": bound}
    ) as (world, devlake):
        names = [f"svc-{n:03d}" for n in range(100)]
        three_deployments_waiting(world, *names)
        devlake.delay(0.005)

        assert world.run() == 0
        accepted = devlake.accepted_ids()
        assert len(accepted) == 300 and len(set(accepted)) == 300, "every deployment exactly once"
        assert set(devlake.deployments(1)) == {i for name in names for i in ids_of(name, 1, 2, 3)}
        assert all(ids == sorted(ids, key=history_number) for ids in in_order_per_app(accepted).values())
        assert 1 < devlake.max_in_flight <= bound


# -- 6. crash safety -------------------------------------------------------------------------------


@contextmanager
def crash_at(where: str, nth: int) -> Iterator[threading.Event]:
    """Kill the run at the ``nth`` (0-based) delivery: before its POST, after its POST but before the store
    write, or after the store write. Once dead, every later call dies too, as a dead process would."""
    dead = threading.Event()
    calls = Counter[str]()
    lock = threading.Lock()

    def due(kind: str) -> bool:
        with lock:
            calls[kind] += 1
            return calls[kind] - 1 == nth

    real_deliver = DevLakeClient.deliver
    real_records = {cls: cls.record_delivery for cls in (RedisStore, SQLiteStore)}

    def deliver(self: DevLakeClient, connection: Any, payload: Any, deadline: float) -> Delivery:
        if dead.is_set():
            raise Crash
        crash = due("deliver")
        if crash and where == "before POST":
            dead.set()
            raise Crash
        delivery = real_deliver(self, connection, payload, deadline)
        if crash and where == "after POST":
            dead.set()
            raise Crash
        return delivery

    def recorder(real: Callable[..., None]) -> Callable[..., None]:
        def record(self: Store, key: AppKey, snapshot: Snapshot, markers: Sequence[str], **kwargs: Any) -> None:
            if dead.is_set():
                raise Crash
            real(self, key, snapshot, markers, **kwargs)
            if where == "after the store write" and due("record"):
                dead.set()
                raise Crash

        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DevLakeClient, "deliver", deliver)
        for cls, real in real_records.items():
            patch.setattr(cls, "record_delivery", recorder(real))
        yield dead


@pytest.mark.parametrize("nth", [0, 1, 2])
@pytest.mark.parametrize("where", ["before POST", "after POST", "after the store write"])
def test_a_run_killed_at_any_step_of_a_delivery_leaves_every_deployment_in_devlake_exactly_once(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, where: str, nth: int
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        three_deployments_waiting(world, "payments-api")
        expected = ids_of("payments-api", 1, 2, 3)

        with crash_at(where, nth) as dead, pytest.raises(Crash):
            world.run()
        assert dead.is_set()
        delivered_before = devlake.accepted_ids()
        assert delivered_before == expected[: nth + (0 if where == "before POST" else 1)]

        assert world.run() == 0
        assert sorted(devlake.deployments(1)) == sorted(expected), "each deployment once, by id"
        assert set(devlake.posted_ids()) == set(expected), "no other id was ever created for these entries"
        resumed_at = nth + 1 if where == "after the store write" else nth
        assert devlake.accepted_ids()[len(delivered_before) :] == expected[resumed_at:], (
            "the next run resumes at the first deployment not recorded, in order, under the same ids"
        )
        if where == "after POST":
            assert Counter(devlake.accepted_ids())[expected[nth]] == 2, "sent, not recorded: sent again (upsert)"
        rows = devlake.commit_rows(1)
        assert len(rows) == sum(len(body["deploymentCommits"]) for body in devlake.deployments(1).values())

        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts


def test_a_failure_decided_by_a_run_that_crashed_before_sending_it_is_sent_as_a_failure_after_the_fix(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The verdict is stored before delivery starts: a crash cannot turn it into "superseded: SUCCESS"."""
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        broken = set_health(deploy(app, 1, gitops[1], images[1]), "Degraded", at(11))
        world.set_apps([broken])

        with crash_at("before POST", 0), pytest.raises(Crash):
            world.run()
        assert devlake.accepted_ids() == []
        world.set_apps([deploy(broken, 2, gitops[2], images[2])])
        assert world.run() == 0
        results = {i: body["result"] for i, body in devlake.deployments(1).items()}
        assert results == {id_of("payments-api", "h1"): "FAILURE", id_of("payments-api", "h2"): "SUCCESS"}


def test_a_crash_after_sending_a_shared_change_does_not_let_the_twin_application_send_it_too(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS) as (world, devlake):
        gitops, images, eu, us = baselined_twins(world)
        world.set_apps([deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])])

        with crash_at("after POST", 0), pytest.raises(Crash):
            world.run()
        assert world.run() == 0
        assert list(devlake.deployments(1)) == [id_of("payments-api-eu", "h1")]
        assert set(devlake.posted_ids()) == {id_of("payments-api-eu", "h1")}


# -- 7. the run lock -------------------------------------------------------------------------------


def test_a_second_run_while_one_is_sending_exits_3_and_sends_nothing(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        world.set_apps([deploy(deploy(app, 1, gitops[1], images[1]), 2, gitops[2], images[2])])

        inside, release = threading.Event(), threading.Event()
        real_deliver = DevLakeClient.deliver

        def gated(self: DevLakeClient, connection: Any, payload: Any, deadline: float) -> Delivery:
            inside.set()
            if not release.wait(30):
                raise AssertionError("the test never released the first run")
            return real_deliver(self, connection, payload, deadline)

        monkeypatch.setattr(DevLakeClient, "deliver", gated)
        first: list[int] = []
        runner = threading.Thread(target=lambda: first.append(world.run()), daemon=True)
        runner.start()
        try:
            assert inside.wait(30), "the first run never reached DevLake"
            assert world.run() == exitcodes.LOCKED
            assert devlake.post_count == 0, "the second run sent nothing"
        finally:
            release.set()
            runner.join(30)
        assert first == [0]
        assert devlake.accepted_ids() == ids_of("payments-api", 1, 2)
        assert world.run() == 0
        assert devlake.post_count == 2


def test_a_killed_runs_lock_blocks_until_it_expires(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1])])

        store = open_state(world)
        try:
            name = f"run:{CLUSTER}"
            assert store.acquire_lock(name, "killed-run", 60), "a run that died without releasing its lock"
            assert world.run() == exitcodes.LOCKED
            assert devlake.post_count == 0
            expire_lock(store, name)
        finally:
            store.close()
        assert world.run() == 0
        assert devlake.accepted_ids() == ids_of("payments-api", 1)


def expire_lock(store: Store, name: str) -> None:
    """Redis expires the key on its own clock (shorten the TTL, then watch it go); SQLite compares with
    ``time.time()``, so set the expiry in the past."""
    if isinstance(store, RedisStore):
        key = f"{store.key_prefix}:lock:{name}"
        assert store.client.pexpire(key, 1)
        for _ in range(100_000):
            if not store.client.exists(key):
                return
        pytest.fail("the lock key did not expire on the Redis server")
    assert isinstance(store, SQLiteStore)
    conn = sqlite3.connect(store.path, isolation_level=None)
    try:
        conn.execute("UPDATE locks SET expires_at = 0 WHERE prefix = ? AND name = ?", (store.key_prefix, name))
    finally:
        conn.close()


def test_a_run_that_loses_its_lock_stops_sending(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_world(tmp_path, redis_state, monkeypatch) as (world, devlake):
        three_deployments_waiting(world, "payments-api")

        lost = threading.Event()
        real_deliver = DevLakeClient.deliver

        def deliver_then_lose(self: DevLakeClient, connection: Any, payload: Any, deadline: float) -> Delivery:
            delivery = real_deliver(self, connection, payload, deadline)
            lost.set()
            return delivery

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DevLakeClient, "deliver", deliver_then_lose)
            patch.setattr(RunLock, "lost", property(lambda _self: lost.is_set()))
            assert world.run() == exitcodes.RETRY
        assert devlake.accepted_ids() == ids_of("payments-api", 1)
        run = status_json(world, capsys)["runs"][0]
        assert run["deployments_deferred"] == 2
        assert any("lock was lost" in error["cause"] for error in run["errors"])

        assert world.run() == 0
        assert devlake.accepted_ids() == ids_of("payments-api", 1, 2, 3)


# -- 8. outages and bugs ---------------------------------------------------------------------------


def test_devlake_down_for_a_whole_run_advances_nothing_and_the_next_run_sends_everything_in_order(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        names = ["alpha", "beta", "gamma"]
        apps = [settled_app(name, gitops[0], images[0]) for name in names]
        world.set_apps(apps)
        assert world.run() == 0
        for i in (1, 2):
            apps = [deploy(app, i, gitops[i], images[i]) for app in apps]
        world.set_apps(apps)
        before = snapshots_of(world, *names)

        devlake.fail_always(503)
        assert world.run() == exitcodes.RETRY
        after = snapshots_of(world, *names)
        # What the run decided is stored (and the settled digest cleared: there is work left); no progress is.
        progress = {key: s.evolve(decided=(), settled_digest=None) for key, s in after.items()}
        assert progress == {key: s.evolve(settled_digest=None) for key, s in before.items()}, "nothing advanced"
        assert all([d.entry.ref for d in s.decided] == ["h1", "h2"] for s in after.values()), "verdicts kept as decided"
        assert devlake.deployments(1) == {}
        assert {i.rsplit(":", 1)[1] for i in devlake.posted_ids()} == {"h1"}, "each app stopped at its first"
        run = status_json(world, capsys)["runs"][0]
        assert run["exit_code"] == 1 and run["retry_later"] == 3 and run["sent"] == 0

        devlake.fail_always(None)
        assert world.run() == 0
        accepted = devlake.accepted_ids()
        assert len(accepted) == len(set(accepted)) == 6
        assert in_order_per_app(accepted) == {id_of(n, "h1").rsplit(":", 1)[0]: ids_of(n, 1, 2) for n in names}


def test_an_outage_holds_a_connection_back_after_a_few_failed_deliveries(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    apps_count = OUTAGE_FAILURES + 3
    with open_world(tmp_path, redis_state, monkeypatch, config=one_page(tmp_path), devlake={"max_concurrency": 1}) as (
        world,
        devlake,
    ):
        gitops, images = payments_world(world)
        apps = [settled_app(f"app-{n}", gitops[0], images[0]) for n in range(apps_count)]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])
        devlake.fail_always(503)

        assert world.run() == exitcodes.RETRY
        assert len(set(devlake.posted_ids())) == OUTAGE_FAILURES, "the rest were not tried in this run"
        devlake.fail_always(None)
        assert world.run() == 0
        assert len(devlake.deployments(1)) == apps_count


def test_one_failing_payload_among_good_ones_never_holds_the_connection_back(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, redis_state, monkeypatch, config=one_page(tmp_path), devlake={"max_concurrency": 1}) as (
        world,
        devlake,
    ):
        gitops, images = payments_world(world)
        names = [f"app-{n}" for n in range(OUTAGE_FAILURES + 3)]
        apps = [settled_app(name, gitops[0], images[0]) for name in names]
        world.set_apps(apps)
        assert world.run() == 0
        for i in (1, 2):
            apps = [deploy(app, i, gitops[i], images[i]) for app in apps]
        world.set_apps(apps)
        for name in names[1:]:
            devlake.answer(id_of(name, "h1"), 500)

        assert world.run() == exitcodes.RETRY
        assert set(devlake.deployments(1)) == set(ids_of(names[0], 1, 2))
        assert {i for i in devlake.posted_ids() if i.endswith(":h1")} == {id_of(n, "h1") for n in names}


def test_a_bug_while_delivering_one_application_holds_back_only_that_application(
    tmp_path: Path, redis_state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, redis_state, monkeypatch) as (world, devlake):
        gitops, images = payments_world(world)
        apps = [settled_app(name, gitops[0], images[0]) for name in ("alpha", "beta")]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])

        real_deliver = DevLakeClient.deliver

        def buggy(self: DevLakeClient, connection: Any, payload: Any, deadline: float) -> Delivery:
            if payload["id"] == id_of("alpha", "h1"):
                raise RuntimeError("a bug")
            return real_deliver(self, connection, payload, deadline)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(DevLakeClient, "deliver", buggy)
            assert world.run() == exitcodes.RETRY
        assert devlake.accepted_ids() == [id_of("beta", "h1")]
        assert world.run() == 0
        assert devlake.accepted_ids() == [id_of("beta", "h1"), id_of("alpha", "h1")]


# -- the retry budget on its own -------------------------------------------------------------------


def test_retry_budget_gives_each_delivery_what_is_left_and_never_goes_below_zero() -> None:
    now = [100.0]
    budget = RetryBudget(10, clock=lambda: now[0])
    assert budget.deadline() == 110
    budget.spend(4)
    now[0] = 200.0
    assert budget.remaining == 6 and budget.deadline() == 206
    budget.spend(-3)
    assert budget.remaining == 6, "a clock going backwards spends nothing"
    budget.spend(50)
    assert budget.remaining == 0 and budget.deadline() == 200
