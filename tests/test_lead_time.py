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
