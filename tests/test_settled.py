"""The steady-state fast path: an Application unchanged since a settled tick is neither parsed nor planned."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from reconciler.application import parse_application
from reconciler.config import load_config
from reconciler.model import AppKey
from reconciler.settled import settled_digest
from reconciler.store import open_store
from tests.factories import (
    at,
    fake_sha,
    mark_deleting,
    operation_state,
    redeployed,
    set_health,
    set_reconciled,
    set_summary_images,
    settled_app,
    with_operation,
    with_operation_state,
)
from tests.world import IMAGE_REPO, World

GITOPS, IMAGE = fake_sha("gitops-0"), fake_sha("image-0")


def base() -> dict[str, Any]:
    return settled_app("payments-api", GITOPS, f"{IMAGE_REPO}:{IMAGE}")


def bump_metadata(app: dict[str, Any]) -> dict[str, Any]:
    app = set_reconciled(app, at(90))
    app["metadata"]["resourceVersion"] = "99999999"
    app["metadata"]["generation"] += 7
    return app


CHANGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "new history entry": lambda app: redeployed(app, 1, fake_sha("gitops-1"), f"{IMAGE_REPO}:{IMAGE}", 30),
    "health": lambda app: set_health(app, "Degraded", at(1)),
    "health transition": lambda app: set_health(app, "Healthy", at(20)),
    "live images": lambda app: set_summary_images(app, [f"{IMAGE_REPO}:{fake_sha('image-1')}"]),
    "failed operation": lambda app: with_operation_state(app, operation_state("Failed", at(40), at(41))),
    "sync requested": lambda app: with_operation(app, fake_sha("gitops-2")),
    "deletion": lambda app: mark_deleting(app, at(50)),
}


def test_the_digest_ignores_refreshes_and_sees_every_change_the_planner_reads() -> None:
    app = base()
    digest = settled_digest(app, "salt")
    assert digest is not None
    assert settled_digest(bump_metadata(app), "salt") == digest, "refreshes move reconciledAt and resourceVersion"
    for change, apply in CHANGES.items():
        assert settled_digest(apply(base()), "salt") != digest, change
    recreated = base()
    recreated["metadata"]["uid"] = "another-uid"
    assert settled_digest(recreated, "salt") != digest
    assert settled_digest(app, "other configuration") != digest


@pytest.mark.parametrize("garbage", [None, [], "app", {"metadata": None}, {"metadata": {}}, {"status": []}])
def test_the_digest_of_garbage_is_none_so_it_is_parsed_and_reported(garbage: Any) -> None:
    assert settled_digest(garbage) is None


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Applications the tick parsed."""
    seen: list[str] = []

    def counting(raw: Any, cluster: str) -> Any:
        seen.append(raw["metadata"]["name"])
        return parse_application(raw, cluster)

    monkeypatch.setattr("reconciler.settled.parse_application", counting)
    return seen


def test_a_steady_tick_parses_nothing_and_a_change_is_still_seen(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, parses: list[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        apps = [settled_app(name, gitops[0], f"{IMAGE_REPO}:{images[0]}") for name in ("a", "b", "c")]
        world.set_apps(apps)
        assert world.run() == 0
        assert sorted(parses) == ["a", "b", "c"]

        parses.clear()
        world.set_apps([bump_metadata(app) for app in apps])
        assert world.run() == 0
        assert parses == [], "refreshed but unchanged Applications are not parsed"

        world.set_apps([apps[0], redeployed(apps[1], 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", 30), apps[2]])
        assert world.run() == 0
        assert parses == ["b"]
        assert [p["id"].rsplit(":", 1)[1] for p in world.posts()] == ["h1"]

        parses.clear()
        assert world.run() == 0
        assert parses == ["b"], "after a deployment one full tick settles it again"
        parses.clear()
        assert world.run() == 0
        assert parses == []


def test_changing_the_decision_config_parses_everything_again(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, parses: list[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        world.set_apps([base()])
        assert world.run() == 0
        parses.clear()
        monkeypatch.setenv("DORA__DETECTION__DETECT_IMAGE_ONLY_CHANGES", "false")
        assert world.run() == 0
        assert parses == ["payments-api"]


def test_an_application_listed_again_after_going_missing_is_not_forgotten(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        world.set_apps([base()])
        assert world.run() == 0
        world.set_apps([])
        assert world.run() == 0
        world.set_apps([base()])
        assert world.run() == 0

        store = open_store(load_config(world.config_path).state)
        try:
            key = AppKey("prod-east", "argocd", "payments-api")
            snapshot = store.load_snapshots([key])[key]
        finally:
            store.close()
        assert snapshot.deleting_since is None, "a stale 'missing since' would drop it after the grace period"
        assert snapshot.settled_digest is not None


def test_the_store_reads_the_settled_digest_without_decoding_the_snapshot(store: Any) -> None:
    from datetime import UTC, datetime

    from reconciler.model import Snapshot
    from reconciler.settled import stored_settled_digest

    key, other = AppKey("prod", "argocd", "settled"), AppKey("prod", "argocd", "busy")
    settled = Snapshot(uid="u1", last_seen=datetime(2026, 1, 1, tzinfo=UTC), settled_digest="0123abcd" * 4)
    busy = Snapshot(uid="u2", last_seen=datetime(2026, 1, 1, tzinfo=UTC), last_history_id=3)
    store.save_snapshots({key: settled, other: busy})

    loaded = store.load_stored([key, other, AppKey("prod", "argocd", "absent")])
    assert set(loaded) == {key, other}
    assert loaded[key].settled_digest == settled.settled_digest
    assert loaded[other].settled_digest is None
    assert loaded[key].snapshot() == settled and loaded[other].snapshot() == busy
    assert stored_settled_digest(settled.to_json()) == settled.settled_digest
    assert stored_settled_digest('{"uid":"x"}') is None


def test_a_run_leaves_nothing_frozen_out_of_the_collectors_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve runs pass after pass in one process: what a pass freezes must be handed back to the collector."""
    import gc

    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        world.set_apps([base()])
        for _ in range(3):
            assert world.run() == 0
            assert gc.get_freeze_count() == 0


def test_runs_of_another_shard_layout_are_kept_out_while_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        world.set_apps([base()])
        store = open_store(load_config(world.config_path).state)
        try:
            assert store.acquire_shared_lock("layout:prod-east", "layout-2", 60), "a 2-shard run is working"
            assert world.run() == 3, "an unsharded run would work the same Applications"
            assert world.run("--shard", "1/2") == 0, "another shard of the same layout goes ahead"
            assert world.run("--shard", "0/3") == 3
        finally:
            store.close()
