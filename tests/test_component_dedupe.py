"""Component dedupe end to end: one change made by several Applications of a component reaches DevLake once,
whatever path each Application took to it (one sync per run, several caught up in one run, a cluster that could not
be listed for a run) and however the Applications are split across shards running at the same time.

What counts is what DevLake's DORA dashboards show: ``DoraReport`` over the fake DevLake's rows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from reconciler import exitcodes
from reconciler.model import AppKey, deployment_id
from reconciler.run import Shard
from reconciler.store import RedisStore
from tests.factories import fake_uid
from tests.fakes.dora import DoraReport
from tests.fakes.hardening import never_wait
from tests.fakes.kube_api import FakeKubeAPI
from tests.scenarios import deploy, settled_app
from tests.test_delivery import REGIONS, open_world
from tests.world import KUBE_TOKEN, World

EAST, WEST = "prod-east", "prod-west"
COMPONENTS = [f"svc-{n}" for n in range(5)]


@pytest.fixture(autouse=True)
def clients_never_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    never_wait(monkeypatch)


def id_in(cluster: str, name: str, ref: str) -> str:
    return deployment_id(AppKey(cluster, "argocd", name), fake_uid(f"argocd/{name}"), ref)


def production_deployments(world: World, connection: int = 1) -> list[str]:
    """The deployments DevLake's deployment frequency counts for the project of ``connection``."""
    return DoraReport.of(world.devlake, [connection]).deployment_ids


# -- 13.3: the fingerprint of a change does not depend on the path an Application took to it -------------------

GITOPS_COMMIT = pytest.mark.parametrize("gitops_commit", ["always", "fallback"])
"""Whatever commits the payloads carry: the GitOps commit in every deployment, or (the default) only where no
image commit changed, so that a twin's payload and its own differ in commits when only one knows the images."""


@GITOPS_COMMIT
def test_a_twin_catching_up_two_syncs_in_one_run_does_not_send_them_again(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, gitops_commit: str
) -> None:
    """eu deploys change 1 then change 2, one run each; us makes the same two changes and a run sees both at once
    (superseded entries carry no images). DevLake must count 2 deployments, not 4."""
    devlake_config = {"include_gitops_commit": gitops_commit}
    with open_world(tmp_path, state_url, monkeypatch, config=REGIONS, devlake=devlake_config) as (world, devlake):
        gitops = world.github.add_commits("acme/gitops", 3)
        images = world.github.add_commits("acme/payments-api", 3)
        eu = settled_app("payments-api-eu", gitops[0], images[0])
        us = settled_app("payments-api-us", gitops[0], images[0])
        world.set_apps([eu, us])
        assert world.run() == 0

        for change in (1, 2):
            eu = deploy(eu, change, gitops[change], images[change])
            world.set_apps([eu, us])
            assert world.run() == 0
        us = deploy(deploy(us, 1, gitops[1], images[1]), 2, gitops[2], images[2])
        world.set_apps([eu, us])
        assert world.run() == 0

        eu_ids = [id_in(EAST, "payments-api-eu", f"h{n}") for n in (1, 2)]
        assert sorted(devlake.deployments(1)) == sorted(eu_ids), "us made the very same two changes"
        assert sorted(production_deployments(world)) == sorted(eu_ids)


@contextmanager
def two_clusters(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, devlake: dict[str, Any] | None = None
) -> Iterator[tuple[World, FakeKubeAPI]]:
    """prod-east runs each component's ``-eu`` Application, prod-west its ``-us`` twin."""
    with FakeKubeAPI() as west:
        west.require_token(KUBE_TOKEN)
        west_config = west.write_kubeconfig(tmp_path / "kubeconfig-west", token=KUBE_TOKEN)
        clusters = [
            {"name": EAST, "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": 50},
            {"name": WEST, "kubeconfig": str(west_config), "context": "fake", "page_size": 50},
        ]
        config: dict[str, Any] = {**REGIONS, "clusters": clusters}
        with open_world(tmp_path, state_url, monkeypatch, config=config, devlake=devlake) as (world, _devlake):
            yield world, west


@GITOPS_COMMIT
def test_a_cluster_that_could_not_be_listed_for_a_run_does_not_make_its_twins_send_again(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, gitops_commit: str
) -> None:
    """Five components, each an ``-eu`` Application on prod-east and a ``-us`` twin on prod-west, make three changes
    each, one per run; prod-west cannot be listed during the second run, so its Applications catch up two syncs in
    the third. 15 changes: DevLake must count 15 deployments (it received 25)."""
    with two_clusters(tmp_path, state_url, monkeypatch, {"include_gitops_commit": gitops_commit}) as (world, west):
        gitops = world.github.add_commits("acme/gitops", 4)
        images = {name: world.github.add_commits(f"acme/{name}", 4) for name in COMPONENTS}
        eu = {name: settled_app(f"{name}-eu", gitops[0], images[name][0], image_repo=name) for name in COMPONENTS}
        us = {name: settled_app(f"{name}-us", gitops[0], images[name][0], image_repo=name) for name in COMPONENTS}
        world.set_apps(list(eu.values()))
        west.set_apps(us.values())
        assert world.run() == 0

        for change in (1, 2, 3):
            eu = {n: deploy(app, change, gitops[change], images[n][change], image_repo=n) for n, app in eu.items()}
            us = {n: deploy(app, change, gitops[change], images[n][change], image_repo=n) for n, app in us.items()}
            world.set_apps(list(eu.values()))
            west.set_apps(us.values())
            if change == 2:
                west.fail_next(1000, status=500)
                assert world.run() == exitcodes.RETRY
                west.fail_next(0)
            else:
                assert world.run() == 0

        expected = [id_in(EAST, f"{name}-eu", f"h{change}") for name in COMPONENTS for change in (1, 2, 3)]
        assert sorted(world.devlake.deployments(1)) == sorted(expected)
        assert len(production_deployments(world)) == 15


def test_one_image_reaching_twins_through_their_own_gitops_commits_is_one_change_even_when_one_catches_up(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default ``fallback`` an image rollout ships the image commit, not the GitOps one: eu and us take
    image 1 then image 2 through their own overlay commits (the GitOps revisions differ), one run each. Then their
    sibling ap, which shares us's overlay, catches up the same two entries in one run, knowing no images for the
    first: it matches us by the GitOps revision, us matched eu by the image. 2 changes, 2 records."""
    config = {"applications": {"component": {"strip_suffixes": ["eu", "us", "ap"]}}}
    with open_world(tmp_path, state_url, monkeypatch, config=config, devlake={"include_gitops_commit": "fallback"}) as (
        world,
        devlake,
    ):
        eu_commits = world.github.add_commits("acme/gitops", 3)
        us_commits = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 3)
        eu = settled_app("payments-api-eu", eu_commits[0], images[0])
        us = settled_app("payments-api-us", eu_commits[0], images[0])
        ap = settled_app("payments-api-ap", eu_commits[0], images[0])
        world.set_apps([eu, us, ap])
        assert world.run() == 0

        for change in (1, 2):
            eu = deploy(eu, change, eu_commits[change], images[change])
            us = deploy(us, change, us_commits[change - 1], images[change])
            world.set_apps([eu, us, ap])
            assert world.run() == 0
        ap = deploy(deploy(ap, 1, us_commits[0], images[1]), 2, us_commits[1], images[2])
        world.set_apps([eu, us, ap])
        assert world.run() == 0

        eu_ids = [id_in(EAST, "payments-api-eu", f"h{n}") for n in (1, 2)]
        assert sorted(devlake.deployments(1)) == sorted(eu_ids)
        assert sorted(production_deployments(world)) == sorted(eu_ids)


# -- 13.2: parallel shards claim a change in the store ---------------------------------------------------------


def shards_deliver_together(world: World) -> list[int]:
    """Run shards 0/2 and 1/2 at once; both read their markers before either decides who sends."""
    barrier = threading.Barrier(2)
    real = RedisStore.existing_markers

    def read_then_wait(self: RedisStore, markers: Sequence[str]) -> set[str]:
        found = real(self, markers)
        barrier.wait(timeout=30)
        return found

    codes: dict[str, int] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RedisStore, "existing_markers", read_then_wait)
        threads = [
            threading.Thread(target=lambda s=shard: codes.__setitem__(s, world.run("--shard", s)), daemon=True)
            for shard in ("0/2", "1/2")
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return [codes["0/2"], codes["1/2"]]


def twins_in_two_shards(world: World) -> tuple[dict[str, Any], dict[str, Any]]:
    """payments-api-eu falls in shard 0 of 2 and payments-api-us in shard 1; both make change 1 (not run yet)."""
    assert Shard(0, 2).owns(AppKey(EAST, "argocd", "payments-api-eu"))
    assert Shard(1, 2).owns(AppKey(EAST, "argocd", "payments-api-us"))
    gitops = world.github.add_commits("acme/gitops", 2)
    images = world.github.add_commits("acme/payments-api", 2)
    eu = settled_app("payments-api-eu", gitops[0], images[0])
    us = settled_app("payments-api-us", gitops[0], images[0])
    world.set_apps([eu, us])
    assert world.run() == 0
    eu, us = deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[1], images[1])
    world.set_apps([eu, us])
    return eu, us


def test_two_shards_running_at_once_send_a_shared_change_once(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, redis_url, monkeypatch, config=REGIONS) as (world, devlake):
        twins_in_two_shards(world)
        assert shards_deliver_together(world) == [0, 0]

        sent = devlake.deployments(1)
        assert len(sent) == 1, f"one change, one deployment in DevLake: {sorted(sent)}"
        assert len(production_deployments(world)) == 1
        posts = devlake.post_count
        assert shards_deliver_together(world) == [0, 0]
        assert world.run() == 0
        assert devlake.post_count == posts


def test_two_shards_running_at_once_send_one_image_reaching_twins_through_two_gitops_commits_once(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The twins' GitOps revisions differ and their payloads ship the same image commit (``fallback``): the change
    is claimed under both its keys at once, so the shard that claims second loses whichever key it knows it by."""
    with open_world(
        tmp_path, redis_url, monkeypatch, config=REGIONS, devlake={"include_gitops_commit": "fallback"}
    ) as (world, devlake):
        gitops = world.github.add_commits("acme/gitops", 3)
        images = world.github.add_commits("acme/payments-api", 2)
        eu = settled_app("payments-api-eu", gitops[0], images[0])
        us = settled_app("payments-api-us", gitops[0], images[0])
        world.set_apps([eu, us])
        assert world.run() == 0
        world.set_apps([deploy(eu, 1, gitops[1], images[1]), deploy(us, 1, gitops[2], images[1])])

        assert shards_deliver_together(world) == [0, 0]
        sent = devlake.deployments(1)
        assert len(sent) == 1, f"one change, one deployment in DevLake: {sorted(sent)}"
        assert len(production_deployments(world)) == 1
        posts = devlake.post_count
        assert world.run() == 0
        assert devlake.post_count == posts


def test_a_shard_whose_claimed_change_fails_delivers_it_next_run_and_its_twin_never_sends_it(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_world(tmp_path, redis_url, monkeypatch, config=REGIONS) as (world, devlake):
        twins_in_two_shards(world)
        eu_id, us_id = id_in(EAST, "payments-api-eu", "h1"), id_in(EAST, "payments-api-us", "h1")
        devlake.answer(eu_id, 503)
        devlake.answer(us_id, 503)
        codes = shards_deliver_together(world)
        assert sorted(codes) == [0, exitcodes.RETRY], "the claimer failed; its twin left the change to it"
        claimer = eu_id if codes[0] else us_id
        assert devlake.deployments(1) == {}

        devlake.answer(eu_id, None)
        devlake.answer(us_id, None)
        assert world.run("--shard", "0/2") == 0
        assert world.run("--shard", "1/2") == 0
        assert list(devlake.deployments(1)) == [claimer]
        assert {eu_id, us_id} - {claimer} & set(devlake.posted_ids()) == set(), "the twin never sent it"
