"""backfill, explain and the GitHub rate limit, through the real CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from reconciler import exitcodes
from tests.factories import DEFAULT_REPO as GITOPS
from tests.factories import at, git_source, history_entry, make_app, operation_state, set_health
from tests.scenarios import baselined, deployed_app, new_deployment, settled_app
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


def test_backfill_emits_every_history_entry_and_rerunning_it_sends_nothing_new(
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
        assert len(world.posts()) == 4, "a second backfill finds every id already delivered"
        assert len(world.devlake.deployment_rows(1)) == 4

        assert world.run() == 0
        assert len(world.posts()) == 4, "a normal run after a backfill has nothing left to send"


def test_backfill_never_turns_a_delivered_failure_into_a_success(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, images, app = baselined(world, 3)
        broken = set_health(new_deployment(app, 1, gitops[1], images[1], minute=30), "Degraded", at(40))
        world.set_apps([broken])
        assert world.run() == 0
        world.set_apps([new_deployment(broken, 2, gitops[2], images[2], minute=60)])
        assert world.run() == 0
        assert [p["result"] for p in world.posts()] == ["FAILURE", "SUCCESS"]

        assert world.run(command="backfill") == 0
        rows = world.devlake.deployment_rows(1)
        h1 = next(row for deployment_id, row in rows.items() if deployment_id.endswith(":h1"))
        assert h1["result"] == "FAILURE", "h1 is no longer the newest: a re-derived verdict would say SUCCESS"
        assert {c["result"] for c in world.devlake.commit_rows(1) if c["cicd_deployment_id"].endswith(":h1")} == {
            "FAILURE"
        }


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

        assert world.run("argocd/absent", command="explain") == exitcodes.NOT_FOUND
        assert "argocd/absent: not found in any selected cluster" in capsys.readouterr().out
        assert world.run("no-slash", command="explain") == 2


def test_rate_limited_github_defers_and_the_next_run_sends_the_deployment_complete(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, images, app = baselined(world, 2, images=3)
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


def test_a_dead_lettered_deployment_is_left_by_runs_and_retried_by_a_backfill(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, images, app = baselined(world, 2)
        world.set_apps([new_deployment(app, 1, gitops[1], images[1], minute=30)])
        world.devlake.fail_next(1, status=400)
        assert world.run() == 0, "a permanent refusal is dead-lettered and the Application moves on"
        assert world.run() == 0
        assert world.posts() == [] and world.devlake.post_count == 1
        capsys.readouterr()
        assert world.run(command="status") == 0
        assert "dead letters (1):" in capsys.readouterr().out

        assert world.run("--since", "2025-06-03T09:20:00Z", command="backfill") == 0
        assert [p["id"].rsplit(":", 1)[1] for p in world.posts()] == ["h1"], "retried once the cause is fixed"
        capsys.readouterr()
        assert world.run(command="status") == 0
        assert "dead letters (0):" in capsys.readouterr().out, "delivered: no longer a dead letter"
        assert world.run("--json", command="status") == 0
        assert json.loads(capsys.readouterr().out)["dead_letters"] == []


def test_status_shows_what_the_last_runs_decided_held_back_and_could_not_do(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clusters = [
        {"name": "prod-east", "applications_file": "east.json"},
        {"name": "prod-west", "applications_file": "west.json"},
    ]
    with World(tmp_path, state_url, monkeypatch, config={"clusters": clusters}) as world:

        def export(name: str, apps: list[dict[str, Any]]) -> None:
            (tmp_path / name).write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": apps}))

        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        payments = deployed_app(world, gitops[0], images[0])
        orders = settled_app("orders-api", gitops[0], images[0])
        export("east.json", [payments, orders])
        export("west.json", [])
        assert world.run() == 0
        rolling = set_health(new_deployment(orders, 1, gitops[1], images[1], minute=30), "Progressing", at(30))
        export("east.json", [new_deployment(payments, 1, gitops[1], images[1], minute=30), rolling])
        (tmp_path / "west.json").unlink()
        world.github.exhaust_rate_limit(at(120))
        assert world.run() == 1
        capsys.readouterr()

        assert world.run(command="status") == 0
        lines = capsys.readouterr().out.splitlines()

    assert lines[0] == "last 2 run(s), newest first:"
    seconds = lines[1].rsplit(", ", 1)[1]
    assert lines[1].endswith(
        f" run exit 1: 2 apps, 0 success, 0 failed, 1 pending, 1 deferred, 0 sent, 0 dead-lettered, {seconds}"
    ), "the Progressing deployment waits for its verdict; the rate-limited one for GitHub"
    assert lines[2] == (
        "    error: cluster prod-west: Applications file west.json: cannot read it: No such file or directory"
    ), "under the run that met it"
    assert " run exit 0: 2 apps, 0 success, 0 failed, 0 pending, 0 deferred, 0 sent, 0 dead-lettered" in lines[3]
    assert lines[4:] == ["dead letters (0):", "backlog (0 waiting):"]
