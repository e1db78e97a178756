"""What DevLake's lead time makes of what the reconciler sends, computed by ``tests/fakes/dora.py`` from the rows the
fake DevLake stored: which deployment DevLake credits with first shipping a commit, and what its previous-success
chains contain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import at
from tests.fakes.dora import CommitGraph, DoraReport
from tests.scenarios import new_deployment, settled_app
from tests.world import World

APP_REPO_URL = "https://github.com/acme/payments-api"


def by_app(world: World) -> dict[str, list[dict[str, Any]]]:
    """The bodies DevLake accepted, per Application name, in the order sent."""
    found: dict[str, list[dict[str, Any]]] = {}
    for body in world.posts():
        found.setdefault(body["name"].split()[0].rsplit("/", 1)[1], []).append(body)
    return found


def connection_for(connection_id: int, application: str) -> dict[str, Any]:
    return {
        "id": connection_id,
        "api_key_env": f"DEVLAKE_KEY_{connection_id}",
        "match": {"applications": [application]},
    }


def test_a_commit_is_credited_to_the_deployment_that_shipped_it_first_not_to_the_one_with_the_older_commit(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Applications (two clusters' team connections of one DevLake project) ship one pull request: eu deploys
    Y at minute 30, which contains X (the PR's merge commit); us deploys X itself at minute 40. X reached
    production at minute 30. DevLake credits a commit to the earliest row by ``started_date`` whose range contains
    it; with commit dates as ``startedDate`` us's row (X, written before Y) would come first and the PR's lead time
    would end at minute 40."""
    connections = [connection_for(1, "argocd/payments-api-eu"), connection_for(6, "argocd/payments-api-us")]
    with World(tmp_path, state_url, monkeypatch, connections=connections) as world:
        gitops = world.github.add_commits("acme/gitops", 3)
        w, x, y = (world.github.add_commit("acme/payments-api", author_date=at(minute)) for minute in (-50, -40, -30))
        eu, us = settled_app("payments-api-eu", gitops[0], w), settled_app("payments-api-us", gitops[0], w)
        world.set_apps([eu, us])
        assert world.run() == 0, "baseline"
        eu, us = new_deployment(eu, 1, gitops[1], w, minute=20), new_deployment(us, 1, gitops[1], w, minute=20)
        world.set_apps([eu, us])
        assert world.run() == 0, "each chain's first row: W"
        eu = new_deployment(eu, 2, gitops[2], y, minute=30)
        world.set_apps([eu, us])
        assert world.run() == 0
        us = new_deployment(us, 2, gitops[2], x, minute=40)
        world.set_apps([eu, us])
        assert world.run() == 0

        sent = by_app(world)
        eu_h2, us_h2 = sent["payments-api-eu"][-1], sent["payments-api-us"][-1]
        report = DoraReport.of(world.devlake, [1, 6])
        assert [link.commit_sha for link in report.chain(APP_REPO_URL, 1)] == [w, y]
        assert [link.commit_sha for link in report.chain(APP_REPO_URL, 6)] == [w, x]

        shipped = report.first_shipped(CommitGraph.linear([w, x, y]), [x, y])
        first_x, first_y = shipped[x], shipped[y]
        assert first_x is not None and first_y is not None
        assert first_x.deployment_id == eu_h2["id"], "X was in production with Y, ten minutes before us deployed it"
        assert first_x.finished_date == at(30)
        assert first_y.deployment_id == eu_h2["id"]
        for body in (eu_h2, us_h2):
            assert {item["startedDate"] for item in body["deploymentCommits"]} == {body["startedDate"]}
            assert body["createdDate"] == body["startedDate"]


GITOPS_REPO_URL = "https://github.com/acme/gitops"


@pytest.mark.parametrize(
    ("mode", "chain", "credited"),
    [
        ("fallback", ["payments-api h1", "payments-api h2"], "payments-api h2"),
        (True, ["payments-api h1", "orders-api h1", "payments-api h2"], "orders-api h1"),
    ],
    ids=["default-fallback", "always"],
)
def test_one_gitops_repository_shared_by_applications(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, mode: object, chain: list[str], credited: str
) -> None:
    """Two Applications deploy from one GitOps repository to one connection, so DevLake chains every row of that
    repository together (scope + repoUrl + environment). payments-api's config change P (GitOps commit g2) is
    synced by hand at minute 40; orders-api's image bump (g3, after P) syncs itself at minute 30.

    By default (``fallback``) orders-api's image deployment carries its image commit only: the GitOps chain holds
    the deployments the GitOps repository caused, and P is credited to payments-api's sync at minute 40. With
    ``true`` (``always``) every deployment carries the GitOps commit: orders-api's row (g1..g3) comes first and
    takes P, ten minutes before P was live, and payments-api's own sync then ships nothing."""
    with World(tmp_path, state_url, monkeypatch, config={"devlake": {"include_gitops_commit": mode}}) as world:
        g = [world.github.add_commit("acme/gitops", author_date=at(minute)) for minute in (-60, 10, 15, 25)]
        pay = world.github.add_commit("acme/payments-api", author_date=at(-70))
        orders = [world.github.add_commit("acme/orders-api", author_date=at(minute)) for minute in (-70, 24)]
        payments_app = settled_app("payments-api", g[0], pay)
        orders_app = settled_app("orders-api", g[0], orders[0], image_repo="orders-api")
        world.set_apps([payments_app, orders_app])
        assert world.run() == 0, "baseline"

        payments_app = new_deployment(payments_app, 1, g[1], pay, minute=20)  # a config change: same image
        world.set_apps([payments_app, orders_app])
        assert world.run() == 0
        orders_app = new_deployment(orders_app, 1, g[3], orders[1], minute=30, image_repo="orders-api")
        world.set_apps([payments_app, orders_app])
        assert world.run() == 0
        payments_app = new_deployment(payments_app, 2, g[3], pay, minute=40)  # P (g2) and g3, synced by hand
        world.set_apps([payments_app, orders_app])
        assert world.run() == 0

        names = {body["id"]: body["name"].split("/")[-1] for body in world.posts()}
        report = DoraReport.of(world.devlake, [1])
        links = report.chain(GITOPS_REPO_URL, 1)
        assert [names[link.deployment_id] for link in links] == chain
        first = report.first_shipped(CommitGraph.linear(g), [g[2]])[g[2]]
        assert first is not None and names[first.deployment_id] == credited
        if mode == "fallback":
            assert first.finished_date == at(40), "P was live when payments-api synced it"
            (orders_body,) = (body for body in world.posts() if names[body["id"]] == "orders-api h1")
            assert [item["repoUrl"] for item in orders_body["deploymentCommits"]] == [
                "https://github.com/acme/orders-api"
            ]


def test_one_image_rollout_reaching_two_applications_by_two_gitops_commits_is_one_deployment(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Component dedupe compares the commits a deployment ships. By default an image rollout ships its image
    commits only, so the same image reaching payments-api-eu and payments-api-us through two GitOps commits (one per
    overlay) is one deployment of the component, as component dedupe promises; with a GitOps commit in every
    deployment the two commit sets differ and DevLake counted the rollout twice."""
    config = {
        "applications": {"component": {"strip_suffixes": ["eu", "us"]}},
        "devlake": {"include_gitops_commit": "fallback"},
    }
    with World(tmp_path, state_url, monkeypatch, config=config) as world:
        g = world.github.add_commits("acme/gitops", 3)
        image = world.github.add_commits("acme/payments-api", 2)
        eu, us = settled_app("payments-api-eu", g[0], image[0]), settled_app("payments-api-us", g[0], image[0])
        world.set_apps([eu, us])
        assert world.run() == 0, "baseline"
        eu, us = new_deployment(eu, 1, g[1], image[1], minute=30), new_deployment(us, 1, g[2], image[1], minute=35)
        world.set_apps([eu, us])
        assert world.run() == 0

        (body,) = world.posts()
        assert body["name"].split()[0].endswith("payments-api-eu")
        assert [(c["repoUrl"], c["commitSha"]) for c in body["deploymentCommits"]] == [
            ("https://github.com/acme/payments-api", image[1])
        ]
        assert len(DoraReport.of(world.devlake, [1]).deployments) == 1
