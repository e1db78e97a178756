"""Faults in every dependency, through the real CLI: each tick stops or degrades cleanly and the next one recovers.

Clients never really wait here: ``never_wait`` gives every client built by the CLI a no-op sleep.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests

from reconciler import argocd
from reconciler.cli import main
from reconciler.config import StateConfig
from reconciler.model import AppKey, Snapshot, deployment_id
from reconciler.store import RedisStore, SQLiteStore, StoreUnavailable, open_store
from tests.factories import fake_uid, redeployed, settled_app
from tests.fakes.hardening import never_wait
from tests.fakes.kube_api import EncodedApp, FakeKubeAPI
from tests.fakes.server import free_port
from tests.redis_server import RedisServer
from tests.scenarios import Deploys
from tests.world import IMAGE_REPO, KUBE_TOKEN, World, log_lines

PAYMENTS = AppKey("prod-east", "argocd", "payments-api")


def summary_of(err: str) -> dict[str, Any]:
    last = log_lines(err)[-1]
    assert last["message"] == "run finished", last
    summary: dict[str, Any] = last["summary"]
    return summary


def messages(err: str) -> list[str]:
    return [line["message"] for line in log_lines(err)]


# -- the state store -------------------------------------------------------------------------------------


def test_help_documents_what_an_unreachable_store_at_start_exits_with(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "state store cannot be reached at the start: then nothing is listed or sent" in out


def test_redis_unreachable_at_start_exits_1_with_a_clear_message_and_touches_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    url = f"redis://127.0.0.1:{free_port()}/0"
    with World(tmp_path, url, monkeypatch) as world:
        deploys = Deploys(world)
        deploys.next()
        capsys.readouterr()

        assert world.run() == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        (line,) = log_lines(err)
        assert line["level"] == "error"
        assert line["message"].startswith("state store unavailable at start: nothing was listed or sent")
        assert f"Redis at {url} unreachable" in line["reason"]
        assert world.kube.list_calls == 0
        assert world.github.count("all") == 0
        assert world.devlake.post_count == 0


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_store_lost_after_the_post_stops_the_tick_cleanly_and_the_next_run_recovers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    never_wait(monkeypatch)
    url = f"sqlite:///{tmp_path / 'state.db'}" if backend == "sqlite" else request.getfixturevalue("redis_url")
    with World(tmp_path, url, monkeypatch) as world:
        deploys = Deploys(world)
        assert world.run() == 0
        wanted = deploys.next()

        store_class: type[SQLiteStore | RedisStore] = SQLiteStore if backend == "sqlite" else RedisStore
        original = store_class.record_delivery

        def lost(self: Any, key: AppKey, snapshot: Snapshot, markers: Any, **kwargs: Any) -> None:
            raise StoreUnavailable("the state store went away (record delivery): connection reset")

        monkeypatch.setattr(store_class, "record_delivery", lost)
        capsys.readouterr()
        assert world.run() == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "state store unavailable; stopping the tick" in messages(err)
        summary = summary_of(err)
        assert summary["exit_code"] == 1
        assert any("state store unavailable" in error["cause"] for error in summary["errors"])
        assert list(world.devlake.deployment_rows(1)) == [wanted], "the POST went out before the store failed"

        monkeypatch.setattr(store_class, "record_delivery", original)
        assert world.run() == 0, "the snapshot did not move: the next run sends again"
        assert list(world.devlake.deployment_rows(1)) == [wanted], "the same id again: an upsert, no duplicate"
        assert [body["id"] for body in world.posts()] == [wanted, wanted]

        capsys.readouterr()
        assert world.run() == 0
        assert summary_of(capsys.readouterr().err)["sent"] == 0
        assert world.devlake.post_count == 2


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone (append-only file, fsync always) that can be killed and restarted."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory, append_only=True)
    try:
        yield server.start()
    finally:
        server.kill()


def test_redis_killed_during_delivery_stops_the_tick_without_a_traceback_and_the_next_run_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], own_redis: RedisServer
) -> None:
    never_wait(monkeypatch)
    url, server = own_redis.url, own_redis
    with World(tmp_path, url, monkeypatch) as world:
        deploys = Deploys(world)
        assert world.run() == 0
        wanted = deploys.next()

        original = RedisStore.record_delivery

        def killed_first(self: RedisStore, key: AppKey, snapshot: Snapshot, markers: Any, **kwargs: Any) -> None:
            server.kill()
            original(self, key, snapshot, markers, **kwargs)

        monkeypatch.setattr(RedisStore, "record_delivery", killed_first)
        capsys.readouterr()
        assert world.run() == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        reasons = [line.get("reason", "") for line in log_lines(err) if line["level"] in ("error", "warning")]
        assert any(f"Redis at {url} unreachable (record delivery)" in reason for reason in reasons), reasons
        assert "could not record the run summary" in messages(err)
        assert list(world.devlake.deployment_rows(1)) == [wanted]

        monkeypatch.setattr(RedisStore, "record_delivery", original)
        server.start()
        client = redis.Redis.from_url(url)
        try:
            # The killed run could not release its locks (its shard layout's and its cluster's); they expire
            # after 60 s. Skip the wait.
            assert client.delete(*client.keys(f"e2e-{tmp_path.name}:lock:*")) == 2
        finally:
            client.close()
        assert world.run() == 0
        assert list(world.devlake.deployment_rows(1)) == [wanted], "sent again under the same id"
        capsys.readouterr()
        assert world.run() == 0
        assert summary_of(capsys.readouterr().err)["sent"] == 0


def test_a_wiped_state_store_rebaselines_without_resending(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    never_wait(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        deploys = Deploys(world)
        assert world.run() == 0
        first = deploys.next()
        assert world.run() == 0
        assert world.devlake.post_count == 1

        _wipe(state_url, f"e2e-{tmp_path.name}")
        capsys.readouterr()
        assert world.run() == 0
        err = capsys.readouterr().err
        assert "cluster initialised" in messages(err), "the cluster is baselined again"
        assert world.devlake.post_count == 1, "nothing already delivered is sent again"
        assert list(world.devlake.deployment_rows(1)) == [first]

        second = deploys.next()
        assert world.run() == 0
        assert [body["id"] for body in world.posts()] == [first, second], "later deployments flow as before"
        body = world.posts()[-1]
        heads = {c["repoUrl"]: c["commitSha"] for c in body["deploymentCommits"]}
        assert heads["https://github.com/acme/payments-api"] == deploys.images[2]


def _wipe(state_url: str, prefix: str) -> None:
    if state_url.startswith("sqlite:///"):
        path = Path(state_url.removeprefix("sqlite:///"))
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return
    client = redis.Redis.from_url(state_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        assert keys
        client.delete(*keys)
    finally:
        client.close()


# -- Kubernetes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["http-500", "server-down", "unauthorized"])
def test_one_failing_cluster_does_not_stop_the_other(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    failure: str,
) -> None:
    never_wait(monkeypatch)
    with FakeKubeAPI() as west:
        west_config = west.write_kubeconfig(tmp_path / "kubeconfig-west", token=KUBE_TOKEN)
        west.set_apps([])
        clusters = [
            {"name": "prod-west", "kubeconfig": str(west_config), "context": "fake"},
            {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": 2},
        ]
        with World(tmp_path, state_url, monkeypatch, config={"clusters": clusters}) as world:
            deploys = Deploys(world)
            if failure == "http-500":
                west.fail_next(1000, status=500)
            elif failure == "server-down":
                west.stop()
            else:
                west.require_token("another-token")
            assert world.run() == 1, "the baseline of prod-east is done, prod-west is retried next run"
            wanted = deploys.next()
            capsys.readouterr()

            assert world.run() == 1
            err = capsys.readouterr().err
            assert "Traceback" not in err
            assert list(world.devlake.deployment_rows(1)) == [wanted], "prod-east still delivers"
            summary = summary_of(err)
            assert summary["apps_listed"] == 1
            ((error, count),) = [(entry["cause"], entry["count"]) for entry in summary["errors"]]
            assert error.startswith("cluster prod-west: ") and count == 1
            unavailable = [line for line in log_lines(err) if line["message"] == "cluster unavailable"]
            assert [line["cluster"] for line in unavailable] == ["prod-west"]
            if failure != "unauthorized":
                assert f"after {argocd.ATTEMPTS} attempts" in error, "transient failures are retried first"
            else:
                assert "unauthorized (401)" in error


@pytest.mark.parametrize("depth", [1_000, 10_000])
def test_an_application_nested_too_deeply_is_skipped_and_every_other_app_and_cluster_goes_on(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], depth: int
) -> None:
    """A free-form field (``spec.source.helm.valuesObject``) may nest as deep as the API server allows (10,000
    levels); decoding such a page must not crash the run, the page, or the clusters listed after it."""
    never_wait(monkeypatch)
    with FakeKubeAPI() as west:
        west_config = west.write_kubeconfig(tmp_path / "kubeconfig-west", token=KUBE_TOKEN)
        west.require_token(KUBE_TOKEN)
        clusters = [
            {"name": "prod-west", "kubeconfig": str(west_config), "context": "fake", "page_size": 3},
            {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": 2},
        ]
        with World(tmp_path, state_url, monkeypatch, config={"clusters": clusters}) as world:
            deploys = Deploys(world)
            search = world.github.add_commits("acme/search-api", 2)
            west_apps = {
                name: settled_app(name, deploys.gitops[0], f"quay.io/acme/search-api:{search[0]}")
                for name in ("a-values", "helm-values", "search-api")
            }
            west.set_apps(west_apps.values())
            assert world.run() == 0
            wanted_east = deploys.next()
            moved = {
                name: redeployed(app, 1, deploys.gitops[1], f"quay.io/acme/search-api:{search[1]}", minute=30)
                for name, app in west_apps.items()
            }
            deep = EncodedApp.nested(moved["helm-values"], ["spec", "source", "helm", "valuesObject"], depth)
            west.set_apps([moved["a-values"], deep, moved["search-api"]])
            capsys.readouterr()

            assert world.run() == 0
            err = capsys.readouterr().err
            assert "Traceback" not in err and "RecursionError" not in err
            west_ids = [
                deployment_id(AppKey("prod-west", "argocd", name), fake_uid(f"argocd/{name}"), "h1")
                for name in ("a-values", "search-api")
            ]
            assert sorted(world.devlake.deployment_rows(1)) == sorted([*west_ids, wanted_east]), (
                "the rest of the page, and the cluster listed after it, are delivered"
            )
            (skipped,) = [line for line in log_lines(err) if line["message"] == "skipping malformed application"]
            assert skipped["app"] == "argocd/helm-values" and skipped["cluster"] == "prod-west"
            assert f"nested {depth + 4} levels deep" in skipped["reason"]
            assert "spec.source.helm.valuesObject" in skipped["reason"]
            summary = summary_of(err)
            assert summary["apps_malformed"] == 1 and summary["apps_listed"] == 3 and summary["errors"] == []
            store = open_store(StateConfig(url=state_url, key_prefix=f"e2e-{tmp_path.name}"))
            try:
                kept = store.load_snapshots([AppKey("prod-west", "argocd", "helm-values")])
                runs = store.run_summaries(5)
            finally:
                store.close()
            assert [snapshot.deleting_since for snapshot in kept.values()] == [None], "unreadable is not deleted"
            assert runs[0]["run_id"] == summary["run_id"], "the run's summary is recorded"

            capsys.readouterr()
            assert world.run("argocd/helm-values", "--cluster", "prod-west", command="explain") == 0
            assert capsys.readouterr().out == (
                f"Application argocd/helm-values in cluster prod-west: malformed, skipped by every run "
                f"({skipped['reason']})\n"
            )

            west.set_apps(moved.values())
            assert world.run() == 0, "once readable again, its deployment goes out"
            helm_id = deployment_id(AppKey("prod-west", "argocd", "helm-values"), fake_uid("argocd/helm-values"), "h1")
            assert sorted(world.devlake.deployment_rows(1)) == sorted([*west_ids, wanted_east, helm_id])
            assert world.devlake.post_count == 4


def test_an_unexpected_error_while_listing_one_cluster_does_not_stop_the_others(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    listed = argocd.ClusterLister.listed_pages

    def pages(lister: argocd.ClusterLister) -> Iterator[argocd.ListedPage]:
        if lister.name == "prod-west":
            raise LookupError("a bug met while listing")
        yield from listed(lister)

    with FakeKubeAPI() as west:
        west_config = west.write_kubeconfig(tmp_path / "kubeconfig-west", token=KUBE_TOKEN)
        clusters = [
            {"name": "prod-west", "kubeconfig": str(west_config), "context": "fake"},
            {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": 2},
        ]
        with World(tmp_path, state_url, monkeypatch, config={"clusters": clusters}) as world:
            deploys = Deploys(world)
            assert world.run() == 0
            wanted = deploys.next()
            monkeypatch.setattr(argocd.ClusterLister, "listed_pages", pages)
            capsys.readouterr()

            assert world.run() == 1
            err = capsys.readouterr().err
            assert list(world.devlake.deployment_rows(1)) == [wanted], "prod-east is still listed and delivered"
            (error,) = summary_of(err)["errors"]
            assert error == {"cause": "cluster prod-west: unexpected LookupError: a bug met while listing", "count": 1}
            (failed,) = [line for line in log_lines(err) if line["message"] == "cluster failed"]
            assert failed["cluster"] == "prod-west" and "Traceback" in failed["error"]


@pytest.mark.parametrize("stage", ["parse", "plan"])
def test_an_unexpected_error_on_one_application_does_not_stop_its_page(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    stage: str,
) -> None:
    never_wait(monkeypatch)
    from reconciler import reconcile, settled

    module, target = (settled, "parse_application") if stage == "parse" else (reconcile, "plan")
    real = getattr(module, target)

    def failing(first: Any, *rest: Any) -> Any:
        name = first["metadata"]["name"] if stage == "parse" else first.key.name
        if name == "a-api":
            raise ZeroDivisionError("a bug met on one Application")
        return real(first, *rest)

    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        apps = [settled_app(name, gitops[0], f"{IMAGE_REPO}:{images[0]}") for name in ("a-api", "b-api")]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([redeployed(app, 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", minute=30) for app in apps])
        monkeypatch.setattr(module, target, failing)
        capsys.readouterr()

        code = world.run()
        err = capsys.readouterr().err
        b_api = deployment_id(AppKey("prod-east", "argocd", "b-api"), fake_uid("argocd/b-api"), "h1")
        assert list(world.devlake.deployment_rows(1)) == [b_api], "the rest of the page goes on"
        summary = summary_of(err)
        if stage == "parse":
            assert code == 0 and summary["apps_malformed"] == 1
            (skipped,) = [line for line in log_lines(err) if line["message"] == "skipping malformed application"]
            assert skipped["app"] == "argocd/a-api"
            assert skipped["reason"] == "unexpected ZeroDivisionError: a bug met on one Application"
        else:
            assert code == 1, "an internal error is retried next run"
            assert summary["errors"] == [
                {
                    "cause": "internal error while planning (ZeroDivisionError)",
                    "count": 1,
                    "example": "prod-east/argocd/a-api",
                }
            ]

        monkeypatch.setattr(module, target, real)
        assert world.run() == 0
        a_api = deployment_id(AppKey("prod-east", "argocd", "a-api"), fake_uid("argocd/a-api"), "h1")
        assert sorted(world.devlake.deployment_rows(1)) == sorted([a_api, b_api])


def test_a_listing_that_breaks_off_delivers_what_was_listed_and_marks_nothing_deleted(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        names = ["a-api", "b-api", "c-api"]  # two on the first page, one on the second
        apps = [settled_app(name, gitops[0], f"{IMAGE_REPO}:{images[0]}") for name in names]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([redeployed(app, 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", minute=30) for app in apps])
        ids = {
            name: deployment_id(AppKey("prod-east", "argocd", name), fake_uid(f"argocd/{name}"), "h1") for name in names
        }
        world.kube.expire_continue_tokens(100)
        capsys.readouterr()

        assert world.run() == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert sorted(world.devlake.deployment_rows(1)) == sorted([ids["a-api"], ids["b-api"]])
        (entry,) = summary_of(err)["errors"]
        assert entry["cause"].startswith("cluster prod-east: the continue token of the Application list")
        store = open_store(StateConfig(url=state_url, key_prefix=f"e2e-{tmp_path.name}"))
        try:
            unlisted = store.load_snapshots([AppKey("prod-east", "argocd", "c-api")])
        finally:
            store.close()
        assert [snapshot.deleting_since for snapshot in unlisted.values()] == [None], "not listed is not deleted"

        world.kube.expire_continue_tokens(0)
        assert world.run() == 0
        assert sorted(world.devlake.deployment_rows(1)) == sorted(ids.values())
        assert world.devlake.post_count == 3, "what was delivered before the break is not sent again"


# -- GitHub ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["http-502", "read-timeout", "connection-refused"])
def test_github_down_defers_the_deployment_until_it_can_be_sent_complete(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    fault: str,
) -> None:
    never_wait(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        deploys = Deploys(world)
        assert world.run() == 0
        wanted = deploys.next()
        for _ in range(40):
            if fault == "http-502":
                world.github.fail_next(1, status=502)
            elif fault == "read-timeout":
                world.github.raise_next(requests.exceptions.ReadTimeout("read timed out"))
            else:
                world.github.raise_next(requests.exceptions.ConnectionError("connection refused"))
        capsys.readouterr()

        assert world.run() == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert world.devlake.post_count == 0, "never sent with commits missing"
        assert "deployment deferred to the next run" in messages(err)
        assert summary_of(err)["deployments_deferred"] == 1

        world.github.canned.clear()
        assert world.run() == 0
        (body,) = world.posts()
        assert body["id"] == wanted
        heads = {c["repoUrl"]: c["commitSha"] for c in body["deploymentCommits"]}
        assert heads == {
            "https://github.com/acme/payments-api": deploys.images[1],
            "https://github.com/acme/gitops": deploys.gitops[1],
        }


# -- DevLake ---------------------------------------------------------------------------------------------


def test_devlake_slower_than_its_timeout_is_retried_next_run_and_recorded_once(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    config = {"devlake": {"timeout": "100ms", "retry_budget": "0s"}}
    with World(tmp_path, state_url, monkeypatch, config=config) as world:
        deploys = Deploys(world)
        assert world.run() == 0
        wanted = deploys.next()
        world.devlake.delay(0.5)
        capsys.readouterr()

        assert world.run() == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err
        failed = [line for line in log_lines(err) if line["message"] == "delivery failed; will retry next run"]
        assert [line["deployment_id"] for line in failed] == [wanted]
        assert "timed out" in failed[0]["reason"]
        assert summary_of(err)["retry_later"] == 1

        world.devlake.delay(0)
        assert world.run() == 0
        assert list(world.devlake.deployment_rows(1)) == [wanted], "one deployment, whatever the slow POST did"
        capsys.readouterr()
        assert world.run() == 0
        assert summary_of(capsys.readouterr().err)["sent"] == 0


# -- check -----------------------------------------------------------------------------------------------


def test_check_reports_every_dependency_on_its_own_line_and_exits_0_when_all_answer(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        assert world.run(command="check") == 0
        lines = capsys.readouterr().out.splitlines()
        assert [line.split(":", 1)[0] for line in lines] == [
            "config",
            "kubernetes prod-east",
            "state store",
            "github",
            "devlake connection 1",
        ]
        assert all(": ok" in line for line in lines), lines
        assert "github: ok (authenticated; rate limit 5000/5000" in lines[3]
        assert world.devlake.deployment_rows(1) == {}, "the DevLake probe stores nothing"


def test_check_names_an_unreachable_devlake_and_a_bad_github_token_and_exits_2(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    devlake_url = f"http://127.0.0.1:{free_port()}"
    with World(tmp_path, state_url, monkeypatch, config={"devlake": {"url": devlake_url}}) as world:
        monkeypatch.setenv("GITHUB_TOKEN", "ghp_revoked0000000000000000000000000000")
        assert world.run(command="check") == 2
        lines = capsys.readouterr().out.splitlines()
        by_name = {line.split(":", 1)[0]: line for line in lines}
        assert by_name["github"] == "github: FAILED (bad credentials (HTTP 401); check $GITHUB_TOKEN)"
        devlake = by_name["devlake connection 1"]
        assert devlake == (
            f"devlake connection 1: FAILED (unreachable: cannot connect to {devlake_url.removeprefix('http://')}: "
            "connection refused (is DevLake running, and is this its address?))"
        )
        assert by_name["kubernetes prod-east"].startswith("kubernetes prod-east: ok")
        assert by_name["state store"].startswith("state store: ok")


def test_check_still_checks_github_when_the_state_store_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    with World(tmp_path, f"redis://127.0.0.1:{free_port()}/0", monkeypatch) as world:
        assert world.run(command="check") == 2
        by_name = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
        assert by_name["state store"].startswith("state store: FAILED (Redis at redis://127.0.0.1:")
        assert by_name["github"].startswith("github: ok (authenticated")
        assert world.github.count("rate_limit") == 1


# -- Redis's eviction policy -----------------------------------------------------------------------------


def set_eviction(server: RedisServer, policy: str, maxmemory: str) -> None:
    client = redis.Redis(port=server.port)
    try:
        client.config_set("maxmemory-policy", policy)
        client.config_set("maxmemory", maxmemory)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("policy", "maxmemory", "code", "line"),
    [
        (
            "allkeys-lru",
            "100mb",
            2,
            "FAILED ({url}: maxmemory-policy allkeys-lru with maxmemory 104857600 bytes evicts",
        ),
        ("allkeys-random", "0", 0, "ok ({url}; WARNING: maxmemory-policy allkeys-random will evict any key once a"),
        ("volatile-lru", "100mb", 0, "ok ({url}; maxmemory-policy volatile-lru, maxmemory 104857600 bytes)"),
        ("noeviction", "100mb", 0, "ok ({url}; maxmemory-policy noeviction, maxmemory 104857600 bytes)"),
    ],
    ids=["allkeys-with-limit", "allkeys-without-limit", "volatile", "noeviction"],
)
def test_check_fails_when_redis_may_evict_the_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    own_redis: RedisServer,
    policy: str,
    maxmemory: str,
    code: int,
    line: str,
) -> None:
    """An ``allkeys-*`` policy may evict a snapshot (a silent re-baseline: its deployments are never sent) or a
    sent marker (a duplicate); ``volatile-*`` evicts keys with a TTL only (the run locks)."""
    set_eviction(own_redis, policy, maxmemory)
    with World(tmp_path, own_redis.url, monkeypatch) as world:
        assert world.run(command="check") == code
        (state,) = [text for text in capsys.readouterr().out.splitlines() if text.startswith("state store:")]
        assert state.startswith("state store: " + line.format(url=f"redis://127.0.0.1:{own_redis.port}/0")), state
        if policy.startswith("allkeys-"):
            assert state.endswith("set maxmemory-policy noeviction)")


@pytest.mark.parametrize("command", ["run", "serve"])
def test_run_and_serve_warn_at_start_when_redis_may_evict_the_state(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    own_redis: RedisServer,
    command: str,
) -> None:
    from reconciler import scheduler

    class NoPasses(scheduler.Service):
        def run(self) -> int:
            log_lines_seen.append("serving")
            self.runtime.close()
            return 0

    log_lines_seen: list[str] = []
    monkeypatch.setattr(scheduler, "Service", NoPasses)
    set_eviction(own_redis, "allkeys-lfu", "64mb")
    with World(tmp_path, own_redis.url, monkeypatch) as world:
        Deploys(world)
        capsys.readouterr()
        assert world.run(command=command) == 0, "a warning, not a failure"
        lines = log_lines(capsys.readouterr().err)
        (warning,) = [line for line in lines if line["message"] == "Redis may evict the state"]
        assert warning["level"] == "warning"
        assert warning["reason"].startswith("maxmemory-policy allkeys-lfu with maxmemory 67108864 bytes evicts")
        assert lines.index(warning) == 0, "said at the start, before any work"
        if command == "serve":
            assert log_lines_seen == ["serving"]


def test_a_redis_that_will_not_tell_its_policy_is_a_warning_not_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], own_redis: RedisServer
) -> None:
    """Managed Redis services often refuse CONFIG, sometimes INFO too: the policy is then read where it can be."""
    admin = redis.Redis(port=own_redis.port)
    try:
        admin.config_set("maxmemory-policy", "allkeys-lru")
        admin.config_set("maxmemory", "100mb")
        admin.acl_setuser(
            "no-config",
            enabled=True,
            passwords=["+pw-no-config"],
            keys="*",
            channels="*",
            commands=["+@all", "-config"],
        )
        admin.acl_setuser(
            "no-info",
            enabled=True,
            passwords=["+pw-no-info"],
            keys="*",
            channels="*",
            commands=["+@all", "-config", "-info"],
        )
    finally:
        admin.close()

    url = f"redis://no-config:pw-no-config@127.0.0.1:{own_redis.port}/0"
    with World(tmp_path / "a", url, monkeypatch) as world:
        assert world.run(command="check") == 2, "INFO still tells the policy"
        assert "maxmemory-policy allkeys-lru with maxmemory 104857600 bytes" in capsys.readouterr().out

    url = f"redis://no-info:pw-no-info@127.0.0.1:{own_redis.port}/0"
    with World(tmp_path / "b", url, monkeypatch) as world:
        Deploys(world)
        assert world.run(command="check") == 0
        (state,) = [text for text in capsys.readouterr().out.splitlines() if text.startswith("state store:")]
        assert state.startswith(f"state store: ok (redis://127.0.0.1:{own_redis.port}/0; WARNING: ")
        assert "WARNING: maxmemory-policy unknown (INFO refused: " in state and "CONFIG GET refused: " in state
        assert state.endswith("make sure it is noeviction)") and "pw-no-info" not in state

        assert world.run() == 0
        lines = log_lines(capsys.readouterr().err)
        (unknown,) = [line for line in lines if line["message"] == "could not read Redis's maxmemory-policy"]
        assert unknown["level"] == "info"
