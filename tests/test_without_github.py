"""Runs with no GitHub at all: ``github.enabled: false``, or no token and no network. Every request to GitHub is
refused and recorded, so a run that asked GitHub anything fails these tests."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import requests
import responses

from tests.factories import fake_sha
from tests.fakes.dora import DoraReport
from tests.scenarios import new_deployment, settled_app
from tests.world import World, log_lines

GITHUB = re.compile(r"https?://api\.github\.com(?::\d+)?/.*")
DEFAULT = {"include_gitops_commit": "fallback"}
"""The product's default (the World pins ``true`` for its older scenarios)."""


class NoGitHub:
    """No route to GitHub: each request to it is recorded and fails with a connection error."""

    def __init__(self, world: World) -> None:
        self.requests: list[str] = []
        world.rsps.reset()
        world.rsps.add_passthru(re.compile(r"https?://127\.0\.0\.1(:\d+)?/.*"))
        for method in (responses.GET, responses.POST):
            world.rsps.add_callback(method, GITHUB, callback=self._refuse)

    def _refuse(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        self.requests.append(f"{request.method} {request.path_url}")
        raise requests.exceptions.ConnectionError("Failed to resolve 'api.github.com' (no network)")


def sent_by_app(world: World) -> dict[str, dict[str, Any]]:
    return {body["name"].split()[0].rsplit("/", 1)[1]: body for body in world.posts()}


def commits(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(c["repoUrl"], c["commitSha"], c["commitMsg"]) for c in body["deploymentCommits"]]


def test_with_github_disabled_commit_tags_and_gitops_revisions_still_give_commits(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A full-SHA tag with a repository rule is a commit (repository and SHA, no message); a short-SHA tag cannot be
    expanded, said per image, and the 40-hex GitOps revision stands in; what is missing is said once per run. Every
    payload is one DevLake accepts: its dates are the deployment's, so no commit date is needed."""
    config = {"github": {"enabled": False}, "devlake": DEFAULT}
    with World(tmp_path, state_url, monkeypatch, config=config) as world:
        github = NoGitHub(world)
        g = [fake_sha(f"gitops-{n}") for n in range(3)]
        pay, orders = [fake_sha(f"pay-{n}") for n in range(2)], fake_sha("orders-1")
        apps = {
            "payments-api": settled_app("payments-api", g[0], pay[0]),
            "orders-api": settled_app("orders-api", g[0], "v1.4.0", image_repo="orders-api"),
            "web": settled_app("web", g[0], "2.0.1", image_repo="web"),
        }
        world.set_apps(list(apps.values()))
        assert world.run() == 0, "baseline"
        short = f"build-{orders[:7]}" if not orders[:7].isdigit() else f"build-{orders[:8]}"
        world.set_apps(
            [
                new_deployment(apps["payments-api"], 1, g[1], pay[1], minute=30),
                new_deployment(apps["orders-api"], 1, g[2], short, minute=31, image_repo="orders-api"),
                new_deployment(apps["web"], 1, g[2], "2.0.2", minute=32, image_repo="web"),
            ]
        )
        capsys.readouterr()
        assert world.run() == 0
        logs = log_lines(capsys.readouterr().err)

        assert github.requests == []
        sent = sent_by_app(world)
        assert commits(sent["payments-api"]) == [("https://github.com/acme/payments-api", pay[1], "")]
        assert commits(sent["orders-api"]) == [("https://github.com/acme/gitops", g[2], "")]
        assert commits(sent["web"]) == [("https://github.com/acme/gitops", g[2], "")]
        for body in sent.values():
            assert {c["startedDate"] for c in body["deploymentCommits"]} == {body["startedDate"]}
        assert len(DoraReport.of(world.devlake, [1]).deployments) == 3

        told = [line for line in logs if line["message"] == "GitHub is not used this run"]
        assert len(told) == 1 and told[0]["reason"].startswith("github.enabled is false: ")
        assert told[0]["level"] == "info", "turned off in the config: nothing to warn about"
        assert "short-SHA image tags cannot be expanded" in told[0]["reason"]
        assert any(
            short in line["message"] and "cannot be expanded without GitHub" in line["message"] for line in logs
        ), "the short tag is named"
        assert logs[-1]["summary"]["github_requests"] == 0 and logs[-1]["summary"]["errors"] == []


def test_no_token_and_no_network_is_a_run_without_github_and_a_token_set_still_waits_for_github(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With no token, GitHub out of reach is a run without it: one quick probe, no retries, exit 0. With a token,
    GitHub is wanted, so its outage holds the deployment back as before (exit 1), complete on a later run."""
    with World(tmp_path, state_url, monkeypatch, config={"devlake": DEFAULT}) as world:
        github = NoGitHub(world)
        g, pay = [fake_sha(f"gitops-{n}") for n in range(2)], [fake_sha(f"pay-{n}") for n in range(2)]
        app = settled_app("payments-api", g[0], pay[0])
        world.set_apps([app])
        assert world.run() == 0, "baseline"
        world.set_apps([new_deployment(app, 1, g[1], pay[1], minute=30)])

        assert world.run() == 1, "a token is set: GitHub is wanted and unreachable"
        assert world.posts() == []

        monkeypatch.delenv("GITHUB_TOKEN")
        github.requests.clear()
        capsys.readouterr()
        assert world.run() == 0
        logs = log_lines(capsys.readouterr().err)

        assert github.requests == ["GET /rate_limit"], "one probe, not retried"
        (body,) = world.posts()
        assert commits(body) == [("https://github.com/acme/payments-api", pay[1], "")]
        told = [line for line in logs if line["message"] == "GitHub is not used this run"]
        assert len(told) == 1 and told[0]["level"] == "warning"
        assert told[0]["reason"].startswith("no GitHub token is set and api.github.com cannot be reached")


def test_check_says_github_is_disabled_instead_of_failing(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch, config={"github": {"enabled": False}}) as world:
        github = NoGitHub(world)
        assert world.run(command="check") == 0
        lines = capsys.readouterr().out.splitlines()
        (line,) = (line for line in lines if line.startswith("github:"))
        assert line.startswith("github: disabled (github.enabled: false): commits are sent with their repository")
        assert github.requests == []
