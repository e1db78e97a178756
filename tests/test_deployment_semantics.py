"""What DevLake receives in the Argo CD situations where a deployment's existence, id or result is easy to get wrong.

The real CLI runs against the fake Kubernetes API, GitHub and DevLake of ``tests/world.py``; each test asserts the
deployments DevLake stored (``docs/design.md`` §3 and §5).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from reconciler import exitcodes
from reconciler.config import Config
from reconciler.model import AppKey, deployment_id
from reconciler.runtime import Runtime
from tests.factories import (
    DEFAULT_REPO,
    SIDECAR,
    at,
    fake_uid,
    git_source,
    history_entry,
    make_app,
    operation_state,
    redeployed,
    set_health,
    set_summary_images,
    settled_app,
    with_history,
    with_operation_state,
)
from tests.world import IMAGE_REPO, World

CLUSTER = "prod-east"


@pytest.fixture(autouse=True)
def clients_never_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    opened = Runtime.open.__func__  # type: ignore[attr-defined]

    def open_without_sleeping(cls: type[Runtime], /, config: Config, **_: Any) -> Runtime:
        runtime: Runtime = opened(cls, config, sleep=lambda _seconds: None)
        return runtime

    monkeypatch.setattr(Runtime, "open", classmethod(open_without_sleeping))


@pytest.fixture
def world(tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with World(tmp_path, state_url, monkeypatch) as opened:
        yield opened


def image(sha: str) -> str:
    return f"{IMAGE_REPO}:{sha}"


def id_of(ref: str, name: str = "payments-api", uid: str | None = None) -> str:
    return deployment_id(AppKey(CLUSTER, "argocd", name), uid or fake_uid(f"argocd/{name}"), ref)


def stored(world: World) -> dict[str, str]:
    """Deployment id -> result, as DevLake stored them on the global connection."""
    return {deployment: row["result"] for deployment, row in world.devlake.deployment_rows(1).items()}


def baselined(world: World, gitops: int = 3, images: int = 3) -> tuple[list[str], list[str], dict[str, Any]]:
    gitops_shas = world.github.add_commits("acme/gitops", gitops)
    image_shas = world.github.add_commits("acme/payments-api", images)
    app = settled_app("payments-api", gitops_shas[0], image(image_shas[0]))
    world.set_apps([app])
    assert world.run() == 0
    return gitops_shas, image_shas, app


def test_a_sync_of_an_app_suspended_since_before_it_is_a_success(world: World) -> None:
    """A paused Rollout or CronJob keeps the app Suspended: the sync did not cause that."""
    gitops, images, app = baselined(world)
    paused = set_health(app, "Suspended", at(10))
    world.set_apps([paused])
    assert world.run() == 0

    synced = set_summary_images(
        set_health(redeployed(paused, 1, gitops[1], image(images[1]), 30), "Suspended", at(10)), []
    )
    world.set_apps([synced])
    assert world.run() == 0
    assert stored(world) == {id_of("h1"): "SUCCESS"}


def test_old_pods_still_terminating_when_the_sync_turns_healthy_send_one_deployment(world: World) -> None:
    gitops, images, app = baselined(world, images=4)
    old, new = next((a, b) for i, a in enumerate(images) for b in images[i + 1 :] if a < b)
    app = settled_app("payments-api", gitops[0], image(old))
    world.set_apps([app])
    assert world.run() == 0

    synced = redeployed(app, 1, gitops[1], image(new), 30)
    world.set_apps([set_summary_images(synced, [image(old), image(new), SIDECAR])])
    assert world.run() == 0
    world.set_apps([set_summary_images(synced, [image(new), SIDECAR])])
    assert world.run() == 0
    assert world.run() == 0

    assert stored(world) == {id_of("h1"): "SUCCESS"}, "no image-only deployment repeating the sync"
    (commit,) = [
        c for c in world.devlake.deployments(1)[id_of("h1")]["deploymentCommits"] if "payments" in c["repoUrl"]
    ]
    assert commit["commitSha"] == new


def test_a_platform_sidecar_changing_its_commit_tag_is_not_a_deployment(world: World) -> None:
    """``registry.acme.io/platform/log-agent`` has a commit tag but no ``images.repositories`` rule maps it."""
    _, images, app = baselined(world)
    agent = "registry.acme.io/platform/log-agent"
    app = set_summary_images(app, [image(images[0]), f"{agent}:3f9c2ab"])
    world.set_apps([app])
    assert world.run() == 0
    world.set_apps([set_health(set_summary_images(app, [image(images[0]), f"{agent}:5d1e0c4"]), "Healthy", at(20))])
    assert world.run() == 0
    assert stored(world) == {}


def test_a_failure_decided_while_devlake_is_down_is_delivered_as_a_failure_after_the_fix(world: World) -> None:
    gitops, images, app = baselined(world)
    broken = set_health(redeployed(app, 1, gitops[1], image(images[1]), 30), "Degraded", at(31))
    world.set_apps([broken])
    world.devlake.fail_always(503)
    assert world.run() == exitcodes.RETRY
    assert stored(world) == {}

    fixed = redeployed(broken, 2, gitops[2], image(images[2]), 50)
    world.set_apps([fixed])
    world.devlake.fail_always(None)
    assert world.run() == 0
    assert stored(world) == {id_of("h1"): "FAILURE", id_of("h2"): "SUCCESS"}
    h1 = world.devlake.deployments(1)[id_of("h1")]
    assert {c["result"] for c in h1["deploymentCommits"]} == {"FAILURE"}


def test_history_ids_restarting_with_two_syncs_before_the_next_run_are_new_deployments(world: World) -> None:
    """History emptied (revisionHistoryLimit 0, then raised), then two syncs: ids 0 and 1 again."""
    gitops, images, app = baselined(world, gitops=4, images=4)
    app = redeployed(app, 1, gitops[1], image(images[1]), 30)
    world.set_apps([app])
    assert world.run() == 0
    assert list(stored(world)) == [id_of("h1")]

    emptied = with_history(app, [])
    restarted = redeployed(redeployed(emptied, 0, gitops[2], image(images[2]), 60), 1, gitops[3], image(images[3]), 70)
    world.set_apps([restarted])
    assert world.run() == 0
    h0, h1 = f"h0-{int(at(60).timestamp())}", f"h1-{int(at(70).timestamp())}"
    assert stored(world) == {id_of("h1"): "SUCCESS", id_of(h0): "SUCCESS", id_of(h1): "SUCCESS"}
    assert world.run() == 0
    assert world.devlake.post_count == 3


def test_a_pending_entry_pushed_out_of_a_short_history_is_still_delivered(world: World) -> None:
    """revisionHistoryLimit 2: h1 is Progressing, then h2 and h3 leave only themselves in the CR."""
    gitops, images, app = baselined(world, gitops=4, images=4)
    started, finished = at(29.8), at(30)
    h1 = history_entry(1, gitops[1], finished, started, source=git_source(DEFAULT_REPO))
    rolling = with_operation_state(
        with_history(app, [app["status"]["history"][0], h1]),
        operation_state("Succeeded", started, finished, revision=gitops[1], images=[image(images[1])]),
        reconciled_at=at(31),
    )
    world.set_apps([set_health(rolling, "Progressing", at(30, seconds=2))])
    assert world.run() == 0
    assert stored(world) == {}

    later = redeployed(redeployed(rolling, 2, gitops[2], image(images[2]), 40), 3, gitops[3], image(images[3]), 50)
    later = with_history(later, later["status"]["history"][-2:])
    world.set_apps([later])
    assert world.run() == 0
    assert stored(world) == {id_of("h1"): "SUCCESS", id_of("h2"): "SUCCESS", id_of("h3"): "SUCCESS"}
    h1_commits = {c["commitSha"] for c in world.devlake.deployments(1)[id_of("h1")]["deploymentCommits"]}
    assert h1_commits == {gitops[1], images[1]}, "its own GitOps revision and the image its sync applied"


def test_an_application_re_applied_from_an_export_does_not_send_its_history_again(world: World) -> None:
    gitops, images, app = baselined(world)
    app = redeployed(app, 1, gitops[1], image(images[1]), 30)
    world.set_apps([app])
    assert world.run() == 0
    assert world.devlake.post_count == 1

    re_applied: dict[str, Any] = {**app, "metadata": {**app["metadata"], "uid": fake_uid("re-applied")}}
    world.set_apps([re_applied])
    assert world.run() == 0
    assert world.devlake.post_count == 1, "h0 and h1 were deployed once"

    world.set_apps([redeployed(re_applied, 2, gitops[2], image(images[2]), 50)])
    assert world.run() == 0
    assert list(stored(world)) == [id_of("h1"), id_of("h2", uid=fake_uid("re-applied"))]


def test_an_image_flip_flop_without_transition_times_sends_every_change(world: World) -> None:
    """A -> B -> A -> B with a controller that reports no health lastTransitionTime (before v2.14)."""
    _, images, app = baselined(world)
    app = set_health(app, "Healthy", None)
    world.set_apps([app])
    assert world.run() == 0
    for tag in (images[1], images[0], images[1]):
        world.set_apps([set_summary_images(app, [image(tag), SIDECAR])])
        assert world.run() == 0
    ids = list(stored(world))
    assert len(ids) == 3 and all(":img-" in i for i in ids)


def test_with_the_reconcilers_clock_ahead_an_application_created_after_the_first_run_is_sent(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reconciler's clock is 10 minutes ahead of Argo CD's. Its first run reads a cluster last reconciled at
    09:01:35 (Argo CD's clock) at 09:11:40 (its own); billing-api is created and deployed at 09:05."""
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/billing-api", 2)
        payments = settled_app("payments-api", gitops[0], image(images[0]))
        world.set_apps([payments])
        with freeze_time(at(1, seconds=40) + SKEW, ignore=["redis"], tick=True):
            assert world.run() == 0

        billing = redeployed(
            make_app("billing-api", source=git_source(DEFAULT_REPO)),
            0,
            gitops[1],
            f"quay.io/acme/billing-api:{images[1]}",
            5,
        )
        world.set_apps([payments, billing])
        with freeze_time(at(7) + SKEW, ignore=["redis"], tick=True):
            assert world.run() == 0
        assert stored(world) == {id_of("h0", name="billing-api"): "SUCCESS"}


SKEW = at(10) - at(0)
