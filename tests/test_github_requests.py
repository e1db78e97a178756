"""What a burst costs on GitHub, counted per path through the fake GitHub, through the real CLI.

The minimum, with a cold cache: one compare per distinct (repository, previous SHA, new SHA), plus one commit
lookup per distinct new SHA that no compare returns (a compare ``base...head`` returns every commit in
(base, head], head included, with its message and dates): the GitOps revisions of the new history entries, an
image SHA with no previous SHA, the head of a rollback that no other compare passes through.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import redeployed, settled_app
from tests.fakes.github import FakeGitHub
from tests.world import World

API = "quay.io/acme/payments-api"
WEB = "quay.io/acme/web"
CART = "quay.io/acme/cart"


def short_tag(sha: str) -> str:
    """A short-SHA tag the default commit tag rule recognises (7 hex characters, at least one a-f)."""
    for length in range(7, 12):
        if not sha[:length].isdigit():
            return f"build-{sha[:length]}"
    raise AssertionError(sha)


def commits_by_repo(body: dict[str, Any]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for item in body["deploymentCommits"]:
        found.setdefault(item["repoUrl"].removeprefix("https://github.com/"), []).append(item["commitSha"])
    return found


def first_line(fake: FakeGitHub, repo: str, sha: str) -> str:
    return fake.repos[repo].commits[sha].message.splitlines()[0]


@pytest.mark.parametrize("mode", ["head", "range"])
def test_a_burst_with_a_cold_cache_costs_the_minimum_github_requests(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    config = {"devlake": {"commits": mode, "dedupe": "application"}}
    with World(tmp_path, state_url, monkeypatch, config=config, page_size=100) as world:
        github = world.github
        gitops = github.add_commits("acme/gitops", 3)
        api = github.add_commits("acme/payments-api", 5)
        web = github.add_commits("acme/web", 4)
        cart = github.add_commits("acme/cart", 2)
        before = {
            "api-eu": f"{API}:{api[0]}",
            "api-us": f"{API}:{api[0]}",
            "api-ap": f"{API}:{api[1]}",
            "api-rollback": f"{API}:{api[4]}",
            "web": f"{WEB}:{web[0]}",
            "cart": f"{CART}:v1.0",
        }
        apps = {name: settled_app(name, gitops[0], image) for name, image in before.items()}
        world.set_apps(list(apps.values()))
        assert world.run() == 0
        assert github.count("all") == 0, "a baseline asks GitHub nothing"

        after = {
            "api-eu": (gitops[1], f"{API}:{api[3]}"),
            "api-us": (gitops[1], f"{API}:{api[3]}"),
            "api-ap": (gitops[1], f"{API}:{api[3]}"),
            "api-rollback": (gitops[1], f"{API}:{api[2]}"),
            "web": (gitops[1], f"{WEB}:{short_tag(web[3])}"),
            "cart": (gitops[2], f"{CART}:{cart[1]}"),
        }
        world.set_apps(
            [redeployed(apps[name], 1, revision, image, minute=30) for name, (revision, image) in after.items()]
        )
        assert world.run() == 0

        compares = {
            f"/repos/acme/payments-api/compare/{api[0]}...{api[3]}",  # api-eu and api-us: one range, once
            f"/repos/acme/payments-api/compare/{api[1]}...{api[3]}",
            f"/repos/acme/payments-api/compare/{api[4]}...{api[2]}",  # behind: a rollback returns no commit
            f"/repos/acme/web/compare/{web[0]}...{short_tag(web[3]).removeprefix('build-')}",
        }
        lookups = {
            f"/repos/acme/gitops/commits/{gitops[1]}",  # one GitOps revision shared by five apps
            f"/repos/acme/gitops/commits/{gitops[2]}",
            f"/repos/acme/cart/commits/{cart[1]}",  # no previous SHA: nothing to compare with
        }
        assert sorted(github.paths("compare")) == sorted(compares)
        assert sorted(github.paths("commit")) == sorted(lookups), "the rollback's head came with api-eu's range"
        assert github.count("all") == len(compares) + len(lookups)

        posts = {body["name"].split()[0].rsplit("/", 1)[1]: body for body in world.posts()}
        assert set(posts) == set(after)
        for name, body in posts.items():
            for item in body["deploymentCommits"]:
                repo = item["repoUrl"].removeprefix("https://github.com/")
                assert len(item["commitSha"]) == 40
                assert item["commitMsg"] == first_line(github, repo, item["commitSha"])
                assert item["startedDate"] == body["startedDate"], "the deployment's start, not the commit's date"
            if mode == "head":
                heads = {repo: shas[-1] for repo, shas in commits_by_repo(body).items()}
                assert heads["acme/gitops"] == after[name][0]
        if mode == "head":
            assert commits_by_repo(posts["web"])["acme/web"] == [web[3]], "the short tag expanded"
            assert commits_by_repo(posts["api-rollback"])["acme/payments-api"] == [api[2]]
            assert commits_by_repo(posts["cart"])["acme/cart"] == [cart[1]]
        else:
            assert commits_by_repo(posts["api-eu"])["acme/payments-api"] == api[1:4]
            assert commits_by_repo(posts["api-ap"])["acme/payments-api"] == api[2:4]
            assert commits_by_repo(posts["api-rollback"])["acme/payments-api"] == [api[2]]
            assert commits_by_repo(posts["web"])["acme/web"] == web[1:4]
            assert commits_by_repo(posts["cart"])["acme/cart"] == [cart[1]]
