"""backfill, explain and the GitHub rate limit, through the real CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import DEFAULT_REPO as GITOPS
from tests.factories import at, git_source, history_entry, make_app, operation_state
from tests.test_end_to_end import deployed_app, new_deployment
from tests.world import IMAGE_REPO, World, log_lines


def app_with_history(world: World, count: int) -> tuple[dict[str, Any], list[str], list[str]]:
    """An app with ``count`` history entries (ids 0..count-1, one every 10 minutes), the newest Healthy."""
    gitops = world.github.add_commits("acme/gitops", count)
    images = world.github.add_commits("acme/payments-api", count)
    entries = [history_entry(i, gitops[i], at(10 * i), source=git_source(GITOPS)) for i in range(count)]
    newest = f"{IMAGE_REPO}:{images[-1]}"
    app = make_app(
        "payments-api",
        source=git_source(GITOPS),
        history=entries,
        operation_state=operation_state(
            "Succeeded", at(10 * (count - 1) - 0.1), at(10 * (count - 1)), revision=gitops[-1], images=[newest]
        ),
        summary_images=[newest],
        health_transition_at=at(10 * (count - 1) + 1),
    )
    return app, gitops, images


@pytest.fixture
def state_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


def test_backfill_emits_every_history_entry_and_rerunning_it_sends_the_same_ids(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        app, gitops, images = app_with_history(world, 4)
        world.set_apps([app])
        assert world.run() == 0
        assert world.devlake.post_count == 0

        assert world.run(command="backfill") == 0
        first = [p["id"] for p in world.posts()]
        assert [i.rsplit(":", 1)[1] for i in first] == ["h0", "h1", "h2", "h3"], "oldest first"
        newest = world.posts()[-1]
        assert {c["commitSha"] for c in newest["deploymentCommits"]} == {gitops[3], images[3]}
        older = world.posts()[0]
        assert [c["commitSha"] for c in older["deploymentCommits"]] == [gitops[0]], "older entries: GitOps commit"

        assert world.run(command="backfill") == 0
        again = [p["id"] for p in world.posts()[len(first) :]]
        assert again == first, "a second backfill re-sends the same ids (DevLake upserts them)"
        assert len(world.devlake.deployment_rows(1)) == 4

        assert world.run() == 0
        assert len(world.posts()) == 8, "a normal run after a backfill has nothing left to send"


def test_backfill_since_keeps_only_later_entries(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        app, _, _ = app_with_history(world, 4)
        world.set_apps([app])
        assert world.run("--since", "2025-06-03T09:20:00Z", command="backfill") == 0
        assert [p["id"].rsplit(":", 1)[1] for p in world.posts()] == ["h2", "h3"]


def test_backfill_rejects_a_bad_since(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        assert world.run("--since", "last tuesday", command="backfill") == 2
        assert "--since expects an ISO 8601 date" in capsys.readouterr().err


def test_explain_shows_how_an_application_is_read_and_what_comes_next(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        app = deployed_app(world, gitops[0], images[0])
        world.set_apps([app, make_app("other-app")])
        assert world.run() == 0
        world.set_apps([new_deployment(app, 1, gitops[1], images[1], minute=30), make_app("other-app")])
        capsys.readouterr()

        assert world.run("argocd/payments-api", command="explain") == 0
        out = capsys.readouterr().out
        assert "Application argocd/payments-api in cluster prod-east" in out
        assert f"image {IMAGE_REPO}:{images[1]}: commit tag {images[1]}; GitHub repository acme/payments-api" in out
        assert "image docker.io/library/busybox:1.36.1: commit tag none" in out
        assert '"last_history_id": 0' in out, "the stored snapshot"
        assert "next run emits argocd:prod-east:argocd:payments-api:" in out
        assert ":h1: SUCCESS new-revision" in out
        assert world.devlake.post_count == 0, "explain sends nothing"

        assert world.run("argocd/absent", command="explain") == 0
        assert "argocd/absent: not found in any selected cluster" in capsys.readouterr().out
        assert world.run("no-slash", command="explain") == 2


def test_rate_limited_github_defers_and_the_next_run_sends_the_deployment_complete(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 3)
        app = deployed_app(world, gitops[0], images[0])
        world.set_apps([app])
        assert world.run() == 0
        world.set_apps([new_deployment(app, 1, gitops[1], images[2], minute=30)])
        reset = at(120)
        world.github.exhaust_rate_limit(reset)
        capsys.readouterr()

        assert world.run() == 1
        assert world.devlake.post_count == 0, "never sent with missing commits"
        summary = log_lines(capsys.readouterr().err)[-1]["summary"]
        assert summary["deployments_deferred"] == 1
        assert summary["rate_limit_reset"] == "2025-06-03T11:00:00Z"

        world.github.restore_rate_limit()
        assert world.run() == 0
        (body,) = world.posts()
        assert {c["commitSha"] for c in body["deploymentCommits"]} == {images[2], gitops[1]}
