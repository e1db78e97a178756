"""GitHub that cannot give a deployment's commits, through the real CLI: nothing is lost, nothing goes out
incomplete while waiting can still help, and the run says why once.

Clients never really wait here: ``never_wait`` gives every client built by the CLI a no-op sleep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from freezegun import freeze_time

from reconciler.enrich import MISSING_COMMIT_GRACE
from reconciler.github import OUTAGE_ATTEMPTS
from tests.factories import at, fake_sha, redeployed, settled_app
from tests.fakes.github import SilentServer
from tests.fakes.hardening import never_wait
from tests.world import World, log_lines

API = "quay.io/acme/payments-api"
CART = "quay.io/acme/cart"


def summary_of(err: str) -> dict[str, Any]:
    last = log_lines(err)[-1]
    assert last["message"] == "run finished", last
    summary: dict[str, Any] = last["summary"]
    return summary


def heads_of(body: dict[str, Any]) -> dict[str, str]:
    return {c["repoUrl"].removeprefix("https://github.com/"): c["commitSha"] for c in body["deploymentCommits"]}


def test_a_repository_github_will_not_show_holds_its_deployments_back_until_access_is_fixed(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        api = world.github.add_commits("acme/payments-api", 3)
        cart = world.github.add_commits("acme/cart", 2)
        apps = [
            settled_app("api-eu", gitops[0], f"{API}:{api[0]}"),
            settled_app("api-us", gitops[0], f"{API}:{api[0]}"),
            settled_app("cart", gitops[0], f"{CART}:{cart[0]}"),
        ]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps(
            [
                redeployed(apps[0], 1, gitops[1], f"{API}:{api[2]}", minute=30),
                redeployed(apps[1], 1, gitops[1], f"{API}:{api[2]}", minute=30),
                redeployed(apps[2], 1, gitops[1], f"{CART}:{cart[1]}", minute=30),
            ]
        )
        world.github.hide("acme/payments-api")
        capsys.readouterr()

        assert world.run() == 1, "held back: the run says some work waits for the next one"
        err = capsys.readouterr().err
        assert [heads_of(body)["acme/cart"] for body in world.posts()] == [cart[1]], "the other repository goes on"
        named = [line for line in log_lines(err) if line.get("repository") == "acme/payments-api"]
        assert len(named) == 1 and named[0]["level"] == "error", "the repository and the cause, once per run"
        assert "cannot read" in named[0]["reason"] and "images.repositories" in named[0]["reason"]
        summary = summary_of(err)
        assert summary["deployments_held_unreadable"] == 2 == summary["deployments_deferred"]
        assert [e for e in summary["errors"] if "acme/payments-api" in e["cause"]] == [
            {"cause": f"GitHub repository acme/payments-api: {named[0]['reason']}", "count": 1}
        ]
        assert world.github.count("repo") == 1, "GitHub was asked once whether it can read the repository"

        world.github.hide("acme/payments-api", hidden=False)
        assert world.run() == 0
        sent = {body["name"].split()[0].rsplit("/", 1)[1]: heads_of(body) for body in world.posts()}
        assert sent == {
            "cart": {"acme/cart": cart[1], "acme/gitops": gitops[1]},
            "api-eu": {"acme/payments-api": api[2], "acme/gitops": gitops[1]},
            "api-us": {"acme/payments-api": api[2], "acme/gitops": gitops[1]},
        }, "delivered with their commits once access is fixed"


def test_a_commit_github_does_not_have_waits_within_the_grace_then_goes_out_without_it(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 3)
        api = world.github.add_commits("acme/payments-api", 2)
        app = settled_app("payments-api", gitops[0], f"{API}:{api[0]}")
        world.set_apps([app])
        assert world.run() == 0
        unpushed, never = fake_sha("pushed late"), fake_sha("never pushed")
        app = redeployed(app, 1, gitops[1], f"{API}:{unpushed}", minute=30)
        world.set_apps([app])

        with freeze_time(at(40), ignore=["redis"], tick=True):
            assert world.run() == 1
        assert world.devlake.post_count == 0, "not sent without its image commit while it may still arrive"
        world.github.add_commit("acme/payments-api", sha=unpushed)
        with freeze_time(at(50), ignore=["redis"], tick=True):
            assert world.run() == 0
        assert heads_of(world.posts()[-1]) == {"acme/payments-api": unpushed, "acme/gitops": gitops[1]}

        world.set_apps([redeployed(app, 2, gitops[2], f"{API}:{never}", minute=60)])
        capsys.readouterr()
        with freeze_time(at(60) + MISSING_COMMIT_GRACE, ignore=["redis"], tick=True):
            assert world.run() == 0, "past the grace it goes out: the Application's later deployments are not stuck"
        assert heads_of(world.posts()[-1]) == {"acme/gitops": gitops[2]}
        dropped = [line for line in log_lines(capsys.readouterr().err) if "commit dropped" in line["message"]]
        assert dropped and never[:12] in dropped[0]["message"]


def test_a_github_that_never_answers_is_given_up_on_for_the_run_and_the_next_run_delivers(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    never_wait(monkeypatch)
    with SilentServer() as silent, World(tmp_path, state_url, monkeypatch) as world:
        repos = [f"acme/service-{i}" for i in range(12)]
        gitops = world.github.add_commits("acme/gitops", 2)
        shas = {repo: world.github.add_commits(repo, 2) for repo in repos}
        apps = [settled_app(repo[5:], gitops[0], f"quay.io/{repo}:{shas[repo][0]}") for repo in repos]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps(
            [
                redeployed(app, 1, gitops[1], f"quay.io/{repo}:{shas[repo][1]}", minute=30)
                for app, repo in zip(apps, repos, strict=True)
            ]
        )
        working = world.overrides.get("github", {})
        world.overrides["github"] = {"url": silent.url, "timeout": "50ms", "max_concurrency": 4}
        world.write_config(tmp_path / "kubeconfig")
        capsys.readouterr()

        assert world.run() == 1
        err = capsys.readouterr().err
        summary = summary_of(err)
        assert summary["deployments_deferred"] == len(repos) and world.devlake.post_count == 0
        assert OUTAGE_ATTEMPTS <= summary["github_requests"] <= OUTAGE_ATTEMPTS + 4, (
            "the attempts in flight when it gave up, not six per commit"
        )
        assert [line["message"] for line in log_lines(err) if line["level"] == "error"] == [
            "GitHub is down for the rest of this run"
        ]
        assert any("not answering" in error["cause"] for error in summary["errors"])

        world.overrides["github"] = working
        world.write_config(tmp_path / "kubeconfig")
        assert world.run() == 0
        delivered = {body["name"].split()[0].rsplit("/", 1)[1]: heads_of(body) for body in world.posts()}
        assert {f"acme/{name}": heads[f"acme/{name}"] for name, heads in delivered.items()} == {
            repo: shas[repo][1] for repo in repos
        }
