"""One refused connection does not starve the others: each connection is delivered on its own.

A connection whose key, id or URL DevLake refuses (401, 403, 404, a redirect) keeps what it could not take in its
backlog in the store, with the payloads; every other connection gets everything in the same run; the run exits 1;
and once the operator fixes it the backlog is delivered, even the deployments whose history entries left the
Application in the meantime. A key variable that is not set is a configuration error at start (exit 2, nothing
listed or sent), not a refusal. Through the real CLI, against the fake DevLake; what DevLake counts comes from
``DoraReport``.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from reconciler import exitcodes
from reconciler.devlake import Delivery, DevLakeClient
from reconciler.model import AppKey, Snapshot
from reconciler.store import BacklogItem, BacklogSlot, ChangeClaim, RedisStore, SQLiteStore, Store
from tests.factories import at, set_health
from tests.fakes.dora import DoraReport
from tests.fakes.hardening import never_wait
from tests.scenarios import deploy, payments_world, settled_app, three_deployments_waiting
from tests.state import another_client
from tests.test_delivery import (
    REGIONS,
    TWO_CONNECTIONS,
    Crash,
    ScriptedDevLake,
    id_of,
    ids_of,
    open_state,
    open_world,
    status_json,
)
from tests.world import DEVLAKE_KEYS, World, log_lines

PAYMENTS_REPO = "https://github.com/acme/payments-api"
GITOPS_REPO = "https://github.com/acme/gitops"


@pytest.fixture(autouse=True)
def clients_never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    never_wait(monkeypatch)


def refuse(world: World, devlake: ScriptedDevLake, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Break connection 6's configuration the way an operator would notice it days later."""
    if how == "revoked key":
        monkeypatch.setenv("DEVLAKE_KEY_6", "revoked-" + DEVLAKE_KEYS[6])
    elif how == "key not set":
        monkeypatch.delenv("DEVLAKE_KEY_6")
    else:
        devlake.remove_connection(6)
        devlake.add_api_key(DEVLAKE_KEYS[6])  # a key that may call any path, to a connection id gone


def fix(devlake: ScriptedDevLake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVLAKE_KEY_6", DEVLAKE_KEYS[6])
    devlake.add_connection(6, DEVLAKE_KEYS[6])


def summary_of(err: str) -> dict[str, Any]:
    last = log_lines(err)[-1]
    assert last["message"] == "run finished", last
    summary: dict[str, Any] = last["summary"]
    return summary


def waiting_in_backlog(world: World, capsys: pytest.CaptureFixture[str]) -> dict[int, list[str]]:
    return {entry["connection"]: entry["deployments"] for entry in status_json(world, capsys)["backlog"]}


def continue_history(app: dict[str, Any], history_id: int, gitops: str, image: str, *, limit: int) -> dict[str, Any]:
    """``deploy`` with Argo CD keeping only the newest ``limit`` history entries (``revisionHistoryLimit``)."""
    app = deploy(app, history_id, gitops, image)
    entries = app["status"]["history"]
    app["status"]["history"] = entries[-limit:]
    return app


# -- the issue: the healthy connection gets everything, the refused one loses nothing ----------------------------


@pytest.mark.parametrize("how", ["revoked key", "unknown connection"])
def test_a_refused_team_connection_does_not_starve_the_global_one_and_loses_nothing_while_refused(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    how: str,
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, connections=TWO_CONNECTIONS) as (world, devlake):
        gitops = world.github.add_commits("acme/gitops", 6)
        images = world.github.add_commits("acme/payments-api", 6)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        for n in (1, 2, 3):
            app = deploy(app, n, gitops[n], images[n])
        world.set_apps([app])
        refuse(world, devlake, monkeypatch, how)
        capsys.readouterr()

        assert world.run() == exitcodes.RETRY
        summary = summary_of(capsys.readouterr().err)
        assert devlake.accepted_ids(1) == ids_of("payments-api", 1, 2, 3), "the global connection gets everything"
        assert devlake.accepted_ids(6) == []
        assert len(devlake.posted_ids(6)) == 1, "tried once, then held back"
        assert (summary["backlogged"], summary["backlog_waiting"], summary["retry_later"]) == (3, 3, 3)
        assert waiting_in_backlog(world, capsys) == {6: ids_of("payments-api", 1, 2, 3)}

        # Days pass with the key still refused; Argo CD keeps two history entries, so h1..h3 leave the CR.
        for n in (4, 5):
            app = continue_history(app, n, gitops[n], images[n], limit=2)
        world.set_apps([app])
        assert [entry["id"] for entry in app["status"]["history"]] == [4, 5]
        capsys.readouterr()
        assert world.run() == exitcodes.RETRY
        summary = summary_of(capsys.readouterr().err)
        assert devlake.accepted_ids(1) == ids_of("payments-api", 1, 2, 3, 4, 5)
        assert summary["backlog_waiting"] == 5 and summary["backlog_sent"] == 0
        assert len(devlake.posted_ids(6)) == 2, "one refused POST per run"

        fix(devlake, monkeypatch)
        capsys.readouterr()
        assert world.run() == 0
        summary = summary_of(capsys.readouterr().err)
        assert (summary["backlog_sent"], summary["backlog_waiting"]) == (5, 0)
        assert devlake.accepted_ids(6) == ids_of("payments-api", 1, 2, 3, 4, 5), "oldest first, each once"
        assert Counter(devlake.accepted_ids(1)) == Counter(ids_of("payments-api", 1, 2, 3, 4, 5))
        team = DoraReport.of(devlake, [6])
        assert team.deployment_ids == ids_of("payments-api", 1, 2, 3, 4, 5)
        everyone = DoraReport.of(devlake, [1])
        for repo in (PAYMENTS_REPO, GITOPS_REPO):
            assert [link.commit_sha for link in team.chain(repo, 6)] == [
                link.commit_sha for link in everyone.chain(repo, 1)
            ], "the team's chains are the whole chains"
        assert [link.commit_sha for link in team.chain(GITOPS_REPO, 6)] == gitops[1:6]
        assert waiting_in_backlog(world, capsys) == {}

        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts


def test_a_key_variable_not_set_stops_the_run_at_start_and_loses_nothing(
    tmp_path: Path,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unset key variable is a configuration error found before anything is listed (exit 2): no connection gets
    anything, no snapshot moves and nothing waits in a backlog, so once the variable is set every connection gets
    every deployment, in order, once."""
    with open_world(tmp_path, state_url, monkeypatch, connections=TWO_CONNECTIONS) as (world, devlake):
        gitops = world.github.add_commits("acme/gitops", 4)
        images = world.github.add_commits("acme/payments-api", 4)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        for n in (1, 2, 3):
            app = deploy(app, n, gitops[n], images[n])
        world.set_apps([app])
        refuse(world, devlake, monkeypatch, "key not set")
        capsys.readouterr()

        assert world.run() == exitcodes.CONFIG
        assert "DEVLAKE_KEY_6 is not set" in capsys.readouterr().err
        assert devlake.post_count == 0
        assert waiting_in_backlog(world, capsys) == {}

        fix(devlake, monkeypatch)
        assert world.run() == 0
        assert devlake.accepted_ids(1) == ids_of("payments-api", 1, 2, 3)
        assert devlake.accepted_ids(6) == ids_of("payments-api", 1, 2, 3)


def test_a_connection_refused_in_the_middle_of_a_run_keeps_the_rest_of_the_run_for_its_backlog(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Many Applications, one refused connection: one refused POST, every other delivery to it goes to the
    backlog without a request, and every Application advances."""
    connections = [TWO_CONNECTIONS[0], {**TWO_CONNECTIONS[1], "match": {"components": ["payments-api", "search-api"]}}]
    with open_world(tmp_path, state_url, monkeypatch, connections=connections, devlake={"max_concurrency": 1}) as (
        world,
        devlake,
    ):
        three_deployments_waiting(world, "payments-api", "search-api")
        refuse(world, devlake, monkeypatch, "revoked key")
        assert world.run() == exitcodes.RETRY
        everything = sorted(ids_of("payments-api", 1, 2, 3) + ids_of("search-api", 1, 2, 3))
        assert sorted(devlake.accepted_ids(1)) == everything
        assert len(devlake.posted_ids(6)) == 1
        waiting = waiting_in_backlog(world, capsys)
        assert sorted(waiting[6]) == everything

        fix(devlake, monkeypatch)
        assert world.run() == 0
        assert sorted(devlake.deployments(6)) == sorted(waiting[6])


@pytest.mark.parametrize("dedupe", ["application", "component"])
def test_a_verdict_decided_before_a_run_stops_survives_a_snapshot_advanced_past_a_backlogged_deployment(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, dedupe: str
) -> None:
    """h1 goes out to the global connection and into the refused team connection's backlog, and the snapshot
    advances past it; h2, Degraded after its sync (FAILED), then fails transiently on the global connection, so the
    run stops there. By the next run a fix (h3) is Healthy: h2 must still be a FAILURE on both connections, as it
    was decided, not "superseded: SUCCESS": for the team connection its backlog item carries it; for the global one
    the snapshot h1 advanced to keeps it (with component dedupe, h2's claim on its change keeps its payload too)."""
    with open_world(tmp_path, state_url, monkeypatch, connections=TWO_CONNECTIONS, devlake={"dedupe": dedupe}) as (
        world,
        devlake,
    ):
        gitops = world.github.add_commits("acme/gitops", 4)
        images = world.github.add_commits("acme/payments-api", 4)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        app = set_health(deploy(deploy(app, 1, gitops[1], images[1]), 2, gitops[2], images[2]), "Degraded", at(21))
        world.set_apps([app])
        refuse(world, devlake, monkeypatch, "revoked key")
        h1, h2, h3 = ids_of("payments-api", 1, 2, 3)
        devlake.answer(h2, 503)

        assert world.run() == exitcodes.RETRY
        assert devlake.accepted_ids(1) == [h1]
        store = open_state(world)
        try:
            waiting = {
                (item.slot.connection, item.slot.deployment_id): item.payload["result"] for item in store.backlog()
            }
        finally:
            store.close()
        refused = {(6, h1): "SUCCESS", (6, h2): "FAILURE"}
        assert waiting == (refused if dedupe == "application" else {**refused, (1, h2): "FAILURE"})

        app = deploy(app, 3, gitops[3], images[3])
        world.set_apps([app])
        devlake.answer(h2, None)
        fix(devlake, monkeypatch)
        assert world.run() == 0

        results = {
            connection: {d: row["result"] for d, row in devlake.deployment_rows(connection).items()}
            for connection in (1, 6)
        }
        expected = {h1: "SUCCESS", h2: "FAILURE", h3: "SUCCESS"}
        assert results == {1: expected, 6: expected}
        for connection in (1, 6):
            assert DoraReport.of(devlake, [connection]).deployment_ids == [h1, h3], "h2 is no successful deployment"


# -- dry runs, backfills, removed and fixed connections -------------------------------------------------------


def test_a_dry_run_prints_the_backlog_and_sends_and_changes_nothing(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, connections=TWO_CONNECTIONS) as (world, devlake):
        three_deployments_waiting(world, "payments-api")
        refuse(world, devlake, monkeypatch, "revoked key")
        assert world.run() == exitcodes.RETRY
        fix(devlake, monkeypatch)
        posts = devlake.post_count
        capsys.readouterr()

        assert world.run("--dry-run") == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.strip()]
        assert [(line["connection"], line["payload"]["id"]) for line in printed] == [
            (6, deployment) for deployment in ids_of("payments-api", 1, 2, 3)
        ]
        assert devlake.post_count == posts
        assert waiting_in_backlog(world, capsys) == {6: ids_of("payments-api", 1, 2, 3)}

        assert world.run() == 0
        assert devlake.accepted_ids(6) == ids_of("payments-api", 1, 2, 3)


def test_a_backfill_neither_duplicates_nor_rewrites_what_waits_in_a_backlog(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """h2 went Degraded (FAILED); once h3 supersedes it a backfill can only re-derive it as SUCCESS: the backlog keeps
    the verdict it was decided with."""
    with open_world(tmp_path, state_url, monkeypatch, connections=TWO_CONNECTIONS) as (world, devlake):
        gitops, images = payments_world(world)
        app = settled_app("payments-api", gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        app = set_health(deploy(deploy(app, 1, gitops[1], images[1]), 2, gitops[2], images[2]), "Degraded", at(21.5))
        world.set_apps([app])
        refuse(world, devlake, monkeypatch, "revoked key")
        assert world.run() == exitcodes.RETRY
        assert devlake.deployments(1)[id_of("payments-api", "h2")]["result"] == "FAILURE"

        world.set_apps([deploy(app, 3, gitops[3], images[3])])
        assert world.run(command="backfill") == exitcodes.RETRY
        assert devlake.accepted_ids(1)[2:] == ids_of("payments-api", 0, 3), "what was new to the global connection"
        waiting = waiting_in_backlog(world, capsys)[6]
        assert Counter(waiting) == Counter(ids_of("payments-api", 0, 1, 2, 3)), "one item per deployment"
        assert devlake.deployments(1)[id_of("payments-api", "h2")]["result"] == "FAILURE"

        fix(devlake, monkeypatch)
        assert world.run() == 0
        assert Counter(devlake.accepted_ids(6)) == Counter(ids_of("payments-api", 0, 1, 2, 3))
        assert devlake.deployments(6)[id_of("payments-api", "h2")]["result"] == "FAILURE", "as decided"
        assert DoraReport.of(devlake, [6]).deployment_ids == DoraReport.of(devlake, [1]).deployment_ids
        assert DoraReport.of(devlake, [6]).deployment_ids == ids_of("payments-api", 0, 1, 3)


def test_a_connection_removed_from_the_config_keeps_its_backlog_until_it_comes_back(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, connections=TWO_CONNECTIONS) as (world, devlake):
        three_deployments_waiting(world, "payments-api")
        refuse(world, devlake, monkeypatch, "revoked key")
        assert world.run() == exitcodes.RETRY

        world.connections = [TWO_CONNECTIONS[0]]
        world.write_config(tmp_path / "kubeconfig")
        posts = devlake.post_count
        capsys.readouterr()
        assert world.run() == 0, "nothing this configuration can deliver is left undone"
        err = capsys.readouterr().err
        (warning,) = [line for line in log_lines(err) if line["message"].startswith("backlog kept for a connection")]
        assert (warning["connection"], warning["deployments"]) == (6, 3)
        assert devlake.post_count == posts
        (entry,) = status_json(world, capsys)["backlog"]
        assert (entry["connection"], entry["configured"], entry["deployments"]) == (
            6,
            False,
            ids_of("payments-api", 1, 2, 3),
        )
        capsys.readouterr()
        assert world.run(command="status") == 0
        assert "connection 6 (no longer configured: not sent): 3 waiting since" in capsys.readouterr().out

        world.connections = list(TWO_CONNECTIONS)
        world.write_config(tmp_path / "kubeconfig")
        fix(devlake, monkeypatch)
        assert world.run() == 0
        assert devlake.accepted_ids(6) == ids_of("payments-api", 1, 2, 3)


# -- component dedupe: a claim held by a backlog item, a claimer that is deleted ---------------------------------


def test_a_shared_change_whose_sender_is_refused_by_one_connection_reaches_it_once_when_fixed(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS, connections=TWO_CONNECTIONS) as (world, devlake):
        gitops, images = payments_world(world)
        eu = settled_app("payments-api-eu", gitops[0], images[0])
        us = settled_app("payments-api-us", gitops[0], images[0])
        world.set_apps([eu, us])
        assert world.run() == 0
        world.set_apps([deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])])
        refuse(world, devlake, monkeypatch, "revoked key")
        assert world.run() == exitcodes.RETRY
        fix(devlake, monkeypatch)
        assert world.run() == 0

        sender = id_of("payments-api-eu", "h1")
        assert list(devlake.deployments(1)) == list(devlake.deployments(6)) == [sender]
        assert id_of("payments-api-us", "h1") not in devlake.posted_ids()
        assert DoraReport.of(devlake, [1, 6]).deployment_ids == [sender]


def test_a_shared_change_whose_sender_is_deleted_before_delivering_it_still_reaches_devlake_once(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """eu claims the change its twin also makes, DevLake fails it, us is deduplicated; then eu is deleted. The
    claim kept eu's payload: the next run delivers it from the backlog."""
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS) as (world, devlake):
        gitops, images = payments_world(world)
        eu = settled_app("payments-api-eu", gitops[0], images[0])
        us = settled_app("payments-api-us", gitops[0], images[0])
        world.set_apps([eu, us])
        assert world.run() == 0
        us = deploy(us, 1, gitops[1], images[1])
        world.set_apps([deploy(eu, 1, gitops[1], images[1]), us])
        sender = id_of("payments-api-eu", "h1")
        devlake.answer(sender, 503)
        assert world.run() == exitcodes.RETRY
        assert devlake.deployments(1) == {}

        world.set_apps([us])
        devlake.answer(sender, None)
        assert world.run() == 0
        assert list(devlake.deployments(1)) == [sender]
        assert id_of("payments-api-us", "h1") not in devlake.posted_ids()
        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts


# -- a crash between any two writes ---------------------------------------------------------------------------

WRITES = ("claim_changes", "record_delivery", "settle_backlog")


@contextmanager
def crash_at_event(number: int) -> Iterator[list[str]]:
    """Kill the run just before its ``number``-th (0-based) event — a POST, a store write, or the moment right
    after one — as kill -9 would: nothing after it runs. Yields the events seen, for the test to check."""
    seen: list[str] = []
    lock = threading.Lock()
    dead = threading.Event()

    def event(name: str) -> None:
        with lock:
            if dead.is_set():
                raise Crash
            if len(seen) == number:
                dead.set()
                raise Crash
            seen.append(name)

    real_deliver = DevLakeClient.deliver

    def deliver(self: DevLakeClient, connection: Any, payload: Any, deadline: float) -> Delivery:
        event(f"before POST {connection.id} {payload['id']}")
        delivery = real_deliver(self, connection, payload, deadline)
        event(f"after POST {connection.id} {payload['id']}")
        return delivery

    def wrapped(name: str, real: Any) -> Any:
        def write(self: Store, *args: Any, **kwargs: Any) -> Any:
            event(f"before {name}")
            result = real(self, *args, **kwargs)
            event(f"after {name}")
            return result

        return write

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DevLakeClient, "deliver", deliver)
        for cls in (RedisStore, SQLiteStore):
            for name in WRITES:
                patch.setattr(cls, name, wrapped(name, getattr(cls, name)))
        yield seen


def twins_with_a_refused_team_connection(
    world: World, devlake: ScriptedDevLake, monkeypatch: pytest.MonkeyPatch
) -> None:
    gitops, images = payments_world(world)
    eu = settled_app("payments-api-eu", gitops[0], images[0])
    us = settled_app("payments-api-us", gitops[0], images[0])
    world.set_apps([eu, us])
    assert world.run() == 0
    world.set_apps([deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])])
    refuse(world, devlake, monkeypatch, "revoked key")


REFUSED_RUN_EVENTS = 10
"""Events of the refused run: the claims (2), eu's POSTs to 1 and 6 (4), eu's and us's records (4)."""
FIXED_RUN_EVENTS = 4
"""Events of the run after the fix: the backlog's POST to 6 (2) and its settle (2)."""


@pytest.mark.parametrize(
    ("phase", "number"),
    [("refused", n) for n in range(REFUSED_RUN_EVENTS)] + [("fixed", n) for n in range(FIXED_RUN_EVENTS)],
)
def test_a_run_killed_between_any_two_writes_loses_nothing_and_sends_nothing_twice(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, phase: str, number: int
) -> None:
    with open_world(
        tmp_path, state_url, monkeypatch, config=REGIONS, connections=TWO_CONNECTIONS, devlake={"max_concurrency": 1}
    ) as (world, devlake):
        twins_with_a_refused_team_connection(world, devlake, monkeypatch)
        if phase == "fixed":
            assert world.run() == exitcodes.RETRY
            fix(devlake, monkeypatch)
        with crash_at_event(number) as seen, pytest.raises(Crash):
            world.run()
        assert len(seen) == number, seen

        if phase == "refused":
            world.run()
            fix(devlake, monkeypatch)
        assert world.run() == 0
        sender, twin = id_of("payments-api-eu", "h1"), id_of("payments-api-us", "h1")
        assert list(devlake.deployments(1)) == [sender] and list(devlake.deployments(6)) == [sender]
        assert twin not in devlake.posted_ids(), "the twin never sends the change its sibling claimed"
        assert set(devlake.accepted_ids()) == {sender}
        store = open_state(world)
        try:
            assert store.backlog() == []
        finally:
            store.close()
        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts


def test_the_crash_points_cover_every_write_of_both_runs(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parametrisation above stops before each of these events in turn: check the list is the whole run."""
    with open_world(
        tmp_path, state_url, monkeypatch, config=REGIONS, connections=TWO_CONNECTIONS, devlake={"max_concurrency": 1}
    ) as (world, devlake):
        twins_with_a_refused_team_connection(world, devlake, monkeypatch)
        sender = id_of("payments-api-eu", "h1")
        with crash_at_event(10_000) as refused:
            assert world.run() == exitcodes.RETRY
        assert refused == [
            "before claim_changes",
            "after claim_changes",
            f"before POST 1 {sender}",
            f"after POST 1 {sender}",
            f"before POST 6 {sender}",
            f"after POST 6 {sender}",
            "before record_delivery",
            "after record_delivery",
            "before record_delivery",
            "after record_delivery",
        ]
        assert len(refused) == REFUSED_RUN_EVENTS
        fix(devlake, monkeypatch)
        with crash_at_event(10_000) as fixed:
            assert world.run() == 0
        assert fixed == [
            f"before POST 6 {sender}",
            f"after POST 6 {sender}",
            "before settle_backlog",
            "after settle_backlog",
        ]
        assert len(fixed) == FIXED_RUN_EVENTS


# -- the store's side ------------------------------------------------------------------------------------------


def _item(connection: int, deployment: str, *, cluster: str = "prod-east", payload: Any = None) -> BacklogItem:
    slot = BacklogSlot(cluster, connection, deployment, f"queued:{connection}:{deployment}")
    return BacklogItem(
        slot,
        AppKey(cluster, "argocd", "payments-api"),
        payload or {"id": deployment},
        (f"sent:{connection}:{deployment}",),
        at(0),
        "refused: HTTP 403",
    )


def test_the_backlog_is_written_with_the_snapshot_and_settled_with_the_sent_marker(store: Store) -> None:
    key = AppKey("prod-east", "argocd", "payments-api")
    snapshot = Snapshot(uid="u", last_seen=at(0), last_history_id=3)
    first, second = _item(6, "d1"), _item(6, "d2")
    store.record_delivery(key, snapshot, ["sent:1:d1"], backlog=[first, second])
    assert store.load_snapshots([key])[key].last_history_id == 3
    assert [item.slot for item in store.backlog("prod-east")] == [first.slot, second.slot]
    assert store.backlog("prod-west") == [] and len(store.backlog()) == 2
    assert store.existing_markers(["queued:6:d1", "queued:6:d2", "sent:1:d1"]) == {
        "queued:6:d1",
        "queued:6:d2",
        "sent:1:d1",
    }

    store.record_delivery(key, snapshot, [], backlog=[_item(6, "d1", payload={"id": "d1", "rebuilt": True})])
    assert store.backlog("prod-east")[0].payload == {"id": "d1"}, "the first payload stays"

    store.settle_backlog(first.slot, first.delivered_markers)
    assert [item.slot for item in store.backlog()] == [second.slot]
    assert store.existing_markers(["queued:6:d1", "sent:6:d1"]) == {"sent:6:d1"}

    store.record_delivery(key, snapshot, ["sent:6:d2"], delivered=[second.slot])
    assert store.backlog() == [] and store.existing_markers(["queued:6:d2"]) == set()


def test_the_first_claimer_of_a_change_holds_it_and_keeps_its_payload(store: Store) -> None:
    eu, us = _item(1, "eu:h1"), _item(1, "us:h1")
    claim = "claim:1:payments-api:f00d"
    assert store.claim_changes([ChangeClaim(claim, eu)]) == {claim: "eu:h1"}
    assert store.claim_changes([ChangeClaim(claim, us)]) == {claim: "eu:h1"}, "taken"
    assert store.claim_changes([ChangeClaim(claim, eu)]) == {claim: "eu:h1"}, "its holder may claim it again"
    assert [item.slot.deployment_id for item in store.backlog()] == ["eu:h1"], "only the holder's payload"
    assert store.existing_markers([eu.slot.marker, us.slot.marker]) == {eu.slot.marker}


def test_a_change_is_claimed_under_all_its_keys_at_once(store: Store) -> None:
    """eu claims the change under its revision and the image it ships; us, another revision shipping the same
    image, loses, and its own revision's key goes to eu; ap, knowing the change only by us's revision, loses too."""
    eu, us, ap = _item(1, "eu:h1"), _item(1, "us:h1"), _item(1, "ap:h1")
    eu_revision, us_revision, image = "claim:1:payments-api:e0", "claim:1:payments-api:05", "claim:1:payments-api:1a"
    assert store.claim_changes([ChangeClaim(eu_revision, eu, (image,))]) == {eu_revision: "eu:h1", image: "eu:h1"}
    assert store.claim_changes([ChangeClaim(us_revision, us, (image,))]) == {us_revision: "eu:h1", image: "eu:h1"}
    assert store.claim_changes([ChangeClaim(us_revision, ap)]) == {us_revision: "eu:h1"}
    assert [item.slot.deployment_id for item in store.backlog()] == ["eu:h1"], "only the holder's payload"
    assert store.existing_markers([eu.slot.marker, us.slot.marker, ap.slot.marker]) == {eu.slot.marker}


def test_concurrent_claims_of_one_change_have_exactly_one_winner(store: Store) -> None:
    """Each thread is a shard process with its own connection to the same state, all claiming at once."""
    contenders = 8
    barrier = threading.Barrier(contenders)
    stores = [another_client(store) for _ in range(contenders)]
    holders: list[str] = []
    lock = threading.Lock()

    def contend(index: int) -> None:
        barrier.wait(timeout=30)
        won = stores[index].claim_changes([ChangeClaim("claim:1:c:f", _item(1, f"app-{index}:h1"))])
        with lock:
            holders.append(won["claim:1:c:f"])

    try:
        threads = [threading.Thread(target=contend, args=(index,)) for index in range(contenders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for other in stores:
            other.close()
    assert len(holders) == contenders and len(set(holders)) == 1
    assert [item.slot.deployment_id for item in store.backlog()] == holders[:1]
