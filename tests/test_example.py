"""The README's first command: the main job on the example fleet (examples/), with no cluster, no GitHub token and
no DevLake, prints the deployments it would send."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import responses

from reconciler.cli import main
from reconciler.config import Config, load_config
from reconciler.images import CommitTagRule, RepositoryMapper, parse_image
from reconciler.model import FULL_SHA
from tests.fakes.github import FakeGitHub

REPO = Path(__file__).resolve().parent.parent
FIRST_COMMAND = ["run", "--config", "examples/config.yaml", "--dry-run", "--log-format", "text"]
"""The README's first command, after ``.venv/bin/dora-reconciler``."""
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && .venv/bin/pytest"

EXPECTED = {
    ("payments-api", "h3"): ("SUCCESS", "new-revision"),
    ("payments-api", "h4"): ("SUCCESS", "new-revision"),
    ("payments-api", "h5"): ("SUCCESS", "new-revision"),
    ("checkout-service", "h21"): ("SUCCESS", "new-revision"),
    ("checkout-service", "h22"): ("SUCCESS", "new-revision"),
    ("checkout-service", f"op-{int(datetime(2025, 6, 3, 10, 31, 52, tzinfo=UTC).timestamp())}"): (
        "FAILURE",
        "failed-sync",
    ),
    ("recommendations-api", "h30"): ("SUCCESS", "new-revision"),
    ("recommendations-api", "h31"): ("FAILURE", "new-revision"),
    ("ledger-api", "h5"): ("SUCCESS", "new-revision"),
    ("ledger-api", "h6"): ("SUCCESS", "new-revision"),
    ("ledger-api", "h7"): ("SUCCESS", "rollback"),
    ("search-platform", "h8"): ("SUCCESS", "new-revision"),
    ("search-platform", "h9"): ("SUCCESS", "new-revision"),
}
"""What the example fleet deployed, by (Application, deployment ref): the DevLake result and the class in the title.
``billing-worker-eu-west-1`` was never synced: no deployment."""


def readme_commands() -> list[str]:
    """The commands of the README's ``sh`` blocks, in order."""
    text = (REPO / "README.md").read_text()
    return [block.strip() for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL)]


def readme_first_command() -> list[str]:
    """The argv of the README's first command, after the program."""
    last = readme_commands()[0].split("&&")[-1]
    program, *argv = shlex.split(last)
    assert program == ".venv/bin/dora-reconciler"
    return argv


def test_the_readme_runs_the_tested_command_first_and_the_tests_second() -> None:
    assert readme_first_command() == FIRST_COMMAND
    assert readme_commands()[1] == TEST_COMMAND


def example_commits(config: Config, export: dict[str, Any]) -> set[tuple[str, str]]:
    """``(GitHub repository, SHA)`` of every commit the fleet names: the GitOps revisions and the commit-tagged
    images the config maps to a repository."""
    rule, mapper = CommitTagRule(config.images.commit_tag_pattern), RepositoryMapper(config.images)
    commits: set[tuple[str, str]] = set()
    for app in export["items"]:
        status = app.get("status") or {}
        operation = status.get("operationState") or {}
        result = operation.get("syncResult") or {}
        revisions: list[str] = [result.get("revision") or "", *(result.get("revisions") or [])]
        for entry in status.get("history") or []:
            revisions += [entry.get("revision") or "", *(entry.get("revisions") or [])]
        commits |= {("acme/gitops", revision) for revision in revisions if FULL_SHA.fullmatch(revision)}
        images = [*(status.get("summary") or {}).get("images", [])]
        for resource in result.get("resources") or []:
            images += resource.get("images") or []
        for raw in images:
            image = parse_image(raw)
            sha = rule.commit_of(image.tag) if image.tag else None
            repo = mapper.repository_for(image)
            if sha is not None and repo is not None:
                commits.add((repo, sha))
    return commits


def files_under(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(path.relative_to(root)): (path.stat().st_mtime_ns, path.stat().st_size)
        for path in root.rglob("*")
        if path.is_file()
    }


@pytest.fixture
def example_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the repository's ``examples/`` as the working directory, in an environment with no kubeconfig,
    no GitHub token and no config override."""
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("DORA__") or name in ("KUBECONFIG", "GITHUB_TOKEN", "DEVLAKE_KEY_EXAMPLE"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return tmp_path


def test_the_readme_first_command_prints_the_example_fleet_deployments_and_writes_only_its_state(
    example_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config("examples/config.yaml", {})
    export = json.loads(Path("examples/fleet/applications.json").read_text())
    before = files_under(example_dir)

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        github = FakeGitHub(rsps)
        for repo, sha in sorted(example_commits(config, export)):
            github.add_commit(repo, sha=sha, parent=None, author_date=datetime(2025, 5, 1, tzinfo=UTC))

        assert main(FIRST_COMMAND) == 0

    out = capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines()]
    assert {line["connection"] for line in lines} == {1}
    payloads = [line["payload"] for line in lines]
    by_ref = {(p["id"].split(":")[3], p["id"].split(":", 5)[5]): p for p in payloads}
    assert len(payloads) == len(by_ref) == len(EXPECTED) == 13
    assert {ref: (p["result"], _class_in_title(p)) for ref, p in by_ref.items()} == EXPECTED
    for app in ("payments-api", "ledger-api"):
        refs = [ref for name, ref in by_ref if name == app]
        assert refs == sorted(refs, key=lambda ref: int(ref[1:])), "each Application's deployments oldest first"

    items = {item["metadata"]["name"]: item for item in export["items"]}
    payments = items["payments-api"]["status"]
    image = next(r for r in payments["operationState"]["syncResult"]["resources"] if r["kind"] == "Deployment")
    assert _commits(by_ref["payments-api", "h5"]) == {
        ("https://github.com/acme/payments-api", image["images"][0].rsplit(":", 1)[1]),
    }, "the newest sync: its commit-tagged image (the GitOps commit only goes with no image commit, the default)"
    assert _commits(by_ref["payments-api", "h3"]) == {
        ("https://github.com/acme/gitops", payments["history"][0]["revision"])
    }, "an older history entry: its GitOps commit"
    checkout = items["checkout-service"]["status"]["operationState"]["syncResult"]
    failed = next(p for (name, ref), p in by_ref.items() if name == "checkout-service" and ref.startswith("op-"))
    assert _commits(failed) == {
        ("https://github.com/acme/checkout-service", checkout["resources"][0]["images"][0].rsplit(":", 1)[1]),
    }, "the failed sync carries what it tried to deploy: the migration Job's image maps to the service's repository"
    search = items["search-platform"]["status"]["history"][-1]["revisions"]
    search_images = [raw for raw in items["search-platform"]["status"]["summary"]["images"] if "acme/search" in raw]
    assert _commits(by_ref["search-platform", "h9"]) == {
        ("https://github.com/acme/search-api", raw.rsplit(":", 1)[1]) for raw in search_images
    }, "a multi-source (chart + git) sync: its image commit; the git source's revision only goes without one"
    assert search[0] == "3.4.2" and all(
        c["commitSha"] != "3.4.2" for c in by_ref["search-platform", "h9"]["deploymentCommits"]
    )

    assert all("api.github.com" in str(call.request.url) for call in rsps.calls), "DevLake is never contacted"
    if not getattr(config.github, "enabled", True):
        assert list(rsps.calls) == [], "GitHub off: no request at all"
    after = files_under(example_dir)
    assert {path: stamp for path, stamp in after.items() if path in before} == before, "nothing else changed"
    written = sorted(set(after) - set(before))
    assert written and all(path.startswith(".dora-reconciler/") for path in written), written


def _class_in_title(payload: dict[str, Any]) -> str:
    """The deployment class in the DevLake title ``component → where: CLASS shas``."""
    found = re.search(r": ([a-z-]+) ", payload["displayTitle"])
    assert found is not None, payload["displayTitle"]
    return found.group(1)


def _commits(payload: dict[str, Any]) -> set[tuple[str, str]]:
    return {(commit["repoUrl"], commit["commitSha"]) for commit in payload["deploymentCommits"]}


def test_explain_and_check_read_the_example_fleet_from_its_file(
    example_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["explain", "--config", "examples/config.yaml", "argocd/ledger-api"]) == 0
    out = capsys.readouterr().out
    assert "Application argocd/ledger-api in cluster demo" in out
    assert "next run emits argocd:demo:argocd:ledger-api:" in out and ":h7: SUCCESS rollback" in out

    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        FakeGitHub(rsps)
        assert main(["check", "--config", "examples/config.yaml"]) == 2, "the example's DevLake does not exist"
    lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["applications file demo"] == (
        "applications file demo: ok (examples/fleet/applications.json: 6 Application(s))"
    )
    assert lines["devlake connection 1"].startswith("devlake connection 1: FAILED")
