"""The real CLI against fake Argo CD, GitHub and DevLake, over several runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.model import AppKey, deployment_id
from tests.factories import at, fake_uid, make_app, operation_state, with_operation_state
from tests.scenarios import baselined, deployed_app, new_deployment
from tests.world import DEVLAKE_KEYS, GITHUB_TOKEN, IMAGE_REPO, KUBE_TOKEN, World, dry_run_lines, log_lines


def test_baseline_then_exactly_one_deployment_then_nothing(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, image, app = baselined(world, 2, images=3)
        assert world.devlake.post_count == 0, "the first run of a cluster only records a baseline"
        assert world.github.count("all") == 0

        world.set_apps([new_deployment(app, 1, gitops[1], image[2], minute=30)])
        assert world.run() == 0

        posts = world.posts()
        assert len(posts) == 1 and world.devlake.post_count == 1
        body = posts[0]
        key = AppKey("prod-east", "argocd", "payments-api")
        assert body["id"] == deployment_id(key, fake_uid("argocd/payments-api"), "h1")
        assert body["result"] == "SUCCESS"
        assert body["environment"] == "PRODUCTION"
        assert body["startedDate"] == "2025-06-03T09:29:48Z"
        assert body["finishedDate"] == "2025-06-03T09:30:00Z"
        heads = {c["repoUrl"]: c for c in body["deploymentCommits"]}
        assert set(heads) == {"https://github.com/acme/payments-api", "https://github.com/acme/gitops"}
        assert heads["https://github.com/acme/payments-api"]["commitSha"] == image[2]
        assert heads["https://github.com/acme/gitops"]["commitSha"] == gitops[1]
        assert all(c["result"] == "SUCCESS" and c["finishedDate"] == body["finishedDate"] for c in heads.values())
        stored = world.devlake.deployment_rows(1)
        assert list(stored) == [body["id"]]
        assert world.github.count("compare", "acme/payments-api") == 1, "the baseline's image is the compare base"

        github_before = world.github.count("all")
        capsys.readouterr()
        assert world.run() == 0
        assert world.github.count("all") == github_before, "a quiet run makes no GitHub request"
        assert world.devlake.post_count == 1, "and no DevLake request"
        summary = log_lines(capsys.readouterr().err)[-1]
        assert summary["message"] == "run finished"
        assert summary["summary"]["apps_listed"] == 1
        assert summary["summary"]["sent"] == 0
        assert summary["summary"]["github_requests"] == 0


def test_range_mode_sends_every_commit_since_the_previous_deployment(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch, config={"devlake": {"commits": "range"}}) as world:
        gitops, image, app = baselined(world, 2, images=4)
        world.set_apps([new_deployment(app, 1, gitops[1], image[3], minute=30)])
        assert world.run() == 0

        (body,) = world.posts()
        shas = [c["commitSha"] for c in body["deploymentCommits"] if c["repoUrl"].endswith("payments-api")]
        assert shas == image[1:], "the commits after the previously deployed one, oldest first"
        created = min(c["createdDate"] for c in body["deploymentCommits"])
        assert body["createdDate"] == created


def test_dry_run_prints_payloads_and_changes_nothing(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, image, app = baselined(world, 2)
        world.set_apps([new_deployment(app, 1, gitops[1], image[1], minute=30)])
        capsys.readouterr()

        for _ in range(2):
            assert world.run("--dry-run") == 0
            lines = list(dry_run_lines(capsys.readouterr().out))
            assert [line["connection"] for line in lines] == [1]
            assert lines[0]["payload"]["id"].endswith(":h1")
        assert world.devlake.post_count == 0
        github_before = world.github.count("all")

        assert world.run() == 0, "the real run still has the deployment to send"
        assert [p["id"] for p in world.posts()] == [lines[0]["payload"]["id"]]
        assert world.github.count("all") > github_before, "the dry runs cached nothing in the state store"


def test_malformed_application_is_skipped_and_the_others_are_delivered(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        image = world.github.add_commits("acme/payments-api", 2)
        app = deployed_app(world, gitops[0], image[0])
        broken = make_app("broken-app")
        broken["status"]["history"] = [{"id": "seven", "deployedAt": "yesterday"}]
        world.set_apps([broken, app])
        assert world.run() == 0
        world.set_apps([broken, new_deployment(app, 1, gitops[1], image[1], minute=30)])
        capsys.readouterr()

        assert world.run() == 0
        assert len(world.posts()) == 1
        skipped = [
            line for line in log_lines(capsys.readouterr().err) if line["message"] == "skipping malformed application"
        ]
        assert len(skipped) == 1
        assert skipped[0]["app"] == "argocd/broken-app"
        assert "status.history[0].id" in skipped[0]["reason"]


def test_failed_sync_is_one_failure_on_the_deployment_and_every_commit(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, image, app = baselined(world, 2)

        bad = f"{IMAGE_REPO}:{image[1]}"
        for retry in (1, 2):
            retrying = operation_state(
                "Running", at(30), at(30 + retry), revision=gitops[1], images=[bad], retry_count=retry
            )
            world.set_apps([with_operation_state(app, retrying, reconciled_at=at(31 + retry))])
            assert world.run() == 0
        failed = operation_state("Failed", at(30), at(34), revision=gitops[1], images=[bad], retry_count=2)
        world.set_apps([with_operation_state(app, failed, reconciled_at=at(35))])
        assert world.run() == 0
        assert world.run() == 0

        (body,) = world.posts()
        assert body["result"] == "FAILURE"
        assert body["id"].endswith(f":op-{int(at(30).timestamp())}")
        assert {c["result"] for c in body["deploymentCommits"]} == {"FAILURE"}
        assert {c["commitSha"] for c in body["deploymentCommits"]} == {image[1], gitops[1]}


def test_secrets_never_reach_any_output(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops, image, app = baselined(world, 2, "--log-level", "debug")
        world.set_apps([new_deployment(app, 1, gitops[1], image[1], minute=30)])
        world.devlake.fail_next(2, status=503)
        world.run("--log-level", "debug")
        world.run("--dry-run", "--log-level", "debug")
        world.run("--log-level", "debug")
        world.run(command="check")
        monkeypatch.setenv("DEVLAKE_KEY_1", "wrong-" + DEVLAKE_KEYS[1])
        world.github.exhaust_rate_limit(at(90))
        world.run("--log-level", "debug")
        captured = capsys.readouterr()
        output = captured.out + captured.err
        assert output
        for secret in (GITHUB_TOKEN, DEVLAKE_KEYS[1], KUBE_TOKEN):
            assert secret not in output
