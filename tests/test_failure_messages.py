"""Failures that say what to do, with the exit code that fits: secrets the config names but the environment
lacks, repositories the GitHub token cannot read, Applications ``explain`` cannot find, a lock held by another
run, and readers of the output that go away."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import exitcodes
from reconciler.cli import main
from reconciler.config import load_config
from reconciler.store import open_store
from tests.factories import at, make_app
from tests.scenarios import deploy, payments_world, settled_app
from tests.world import World, log_lines


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        yield world


# -- secrets the config names -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "backfill", "serve"])
def test_a_devlake_key_the_config_names_but_the_environment_lacks_is_a_config_error_at_start(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    monkeypatch.delenv("DEVLAKE_KEY_1")
    assert world.run(command=command) == exitcodes.CONFIG
    assert capsys.readouterr().err == (
        "config error: devlake.connections[0].api_key_env: the environment variable DEVLAKE_KEY_1 is not set "
        "(or is empty)\n"
    )
    assert world.kube.list_calls == 0, "nothing was started"


def test_a_dry_run_needs_no_devlake_key(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEVLAKE_KEY_1")
    assert world.run("--dry-run") == exitcodes.OK


def test_a_github_token_variable_the_config_names_must_be_set_and_the_default_one_may_be_absent(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("GITHUB_TOKEN")
    assert world.run() == exitcodes.OK, "left at its default, an unset GITHUB_TOKEN is unauthenticated GitHub"

    world.overrides["github"] = {"max_rate_limit_wait": "0s", "timeout": "5s", "token_env": "CI_GITHUB_TOKEN"}
    world.write_config(world.tmp_path / "kubeconfig")
    capsys.readouterr()
    assert world.run() == exitcodes.CONFIG
    assert "github.token_env: the environment variable CI_GITHUB_TOKEN is not set" in capsys.readouterr().err


def test_check_names_every_secret_the_environment_lacks_and_still_checks_the_rest(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("DEVLAKE_KEY_1")
    assert world.run(command="check") == exitcodes.CONFIG
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "config: FAILED (devlake.connections[0].api_key_env: the environment variable DEVLAKE_KEY_1 is not set "
        "(or is empty))"
    )
    assert any(line.startswith("kubernetes prod-east: ok") for line in lines), "the other dependencies still"


# -- check: repositories GitHub must read -----------------------------------------------------------------


def fleet(world: World) -> None:
    gitops, images = payments_world(world)
    cart = world.github.add_commits("acme/cart", 1)
    world.set_apps(
        [
            settled_app("payments-api", gitops[0], images[0]),
            settled_app("cart", gitops[0], cart[0], image_repo="cart"),
        ]
    )


def test_check_reads_one_commit_of_each_repository_runs_will_need(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet(world)
    assert world.run(command="check") == exitcodes.OK
    lines = capsys.readouterr().out.splitlines()
    repositories = [line for line in lines if line.startswith("github repository ")]
    assert repositories == [
        "github repository acme/cart: ok (readable; needed by images.repositories[0] for quay.io/acme/cart)",
        "github repository acme/gitops: ok (readable; needed by the GitOps source of argocd/cart)",
        "github repository acme/payments-api: ok (readable; needed by images.repositories[0] for "
        "quay.io/acme/payments-api)",
    ]
    assert "kubernetes prod-east: ok (can list applications.argoproj.io; 2 Application(s))" in lines
    assert world.github.count("commits") == 3, "one request per repository"


def test_check_fails_when_the_token_cannot_read_a_mapped_repository(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    fleet(world)
    world.github.hide("acme/payments-api")
    assert world.run(command="check") == exitcodes.CONFIG
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "acme/payments-api" in line]
    assert line.startswith(
        "github repository acme/payments-api: FAILED (needed by images.repositories[0] for quay.io/acme/payments-api; "
        "GitHub answers 404: the repository does not exist or the token cannot read it"
    )


def test_check_names_a_rule_that_maps_no_image_of_the_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rules = [
        {"image": r"quay\.io/acme/(?P<name>[^/]+)", "repo": "acme/{name}"},
        {"image": r"ghcr\.io/acme/(?P<name>[^/]+)", "repo": "acme/{name}"},
        {"image": r"registry\.example\.com/tools", "repo": "acme/tools"},
    ]
    with World(tmp_path, None, monkeypatch, config={"images": {"repositories": rules}}) as world:
        fleet(world)
        world.github.add_commits("acme/tools", 1)
        assert world.run(command="check") == exitcodes.OK
        lines = capsys.readouterr().out.splitlines()
    assert r"github rule images.repositories[1] (ghcr\.io/acme/(?P<name>[^/]+)): ok (no image of the listed " in (
        "\n".join(lines)
    )
    assert "github repository acme/tools: ok (readable; needed by images.repositories[2])" in lines, (
        "a rule without a placeholder names its repository: probed even when no image uses it yet"
    )


def test_check_says_when_the_rate_limit_is_exhausted(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    fleet(world)
    world.github.exhaust_rate_limit(at(60))
    assert world.run(command="check") == exitcodes.CONFIG
    lines = capsys.readouterr().out.splitlines()
    (github,) = [line for line in lines if line.startswith("github:")]
    assert github == (
        "github: FAILED (authenticated; rate limit exhausted: 0/5000 until 2025-06-03T10:00:00Z; runs defer their "
        "GitHub work until then)"
    )
    assert not [line for line in lines if line.startswith("github repository")], "nothing more asked of GitHub"


def test_check_points_at_devlake_url_when_every_connection_answers_404(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with World(tmp_path, None, monkeypatch) as world:
        world.overrides["devlake"] = {"url": f"{world.devlake.url}/api"}
        world.write_config(tmp_path / "kubeconfig")
        assert world.run(command="check") == exitcodes.CONFIG
        lines = capsys.readouterr().out.splitlines()
    (connection,) = [line for line in lines if line.startswith("devlake connection 1")]
    assert connection.endswith("is devlake.url the Config UI address, without /api?)")
    assert lines[-1].startswith("devlake: FAILED (every connection answered 404: is devlake.url (")


# -- explain of an Application no run reads ---------------------------------------------------------------


def test_explain_of_an_application_that_does_not_exist_exits_1_and_names_what_would_hide_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = {
        "name": "prod-east",
        "kubeconfig": str(tmp_path / "kubeconfig"),
        "context": "fake",
        "namespaces": ["argocd"],
        "label_selector": "team=payments",
    }
    config = {"clusters": [cluster], "applications": {"exclude": ["*/preview-*"]}}
    with World(tmp_path, None, monkeypatch, config=config) as world:
        world.set_apps([make_app("payments-api")])
        assert world.run("apps/preview-42", command="explain") == exitcodes.NOT_FOUND
        out = capsys.readouterr().out.splitlines()
    assert out == [
        "apps/preview-42: not found in any selected cluster (prod-east)",
        "  would hide it: clusters[0] (prod-east).namespaces ['argocd'] does not include apps",
        "  would hide it: clusters[0] (prod-east).label_selector 'team=payments' lists only the Applications whose "
        "labels match it",
        "  would hide it: applications.exclude '*/preview-*' matches apps/preview-42",
    ]


def test_explain_of_an_application_the_label_selector_hides_exits_1_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster = {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "label_selector": "team=payments"}
    with World(tmp_path, None, monkeypatch, config={"clusters": [cluster]}) as world:
        world.set_apps([make_app("payments-api", labels={"team": "checkout"})])
        assert world.run("argocd/payments-api", command="explain") == exitcodes.NOT_FOUND
        out = capsys.readouterr().out
    assert out.startswith("Application argocd/payments-api in cluster prod-east")
    assert (
        "  NOT READ BY RUNS: clusters[0] (prod-east).label_selector 'team=payments' does not match its labels\n" in out
    )


# -- the lock --------------------------------------------------------------------------------------------


def test_the_lock_held_message_says_which_run_holds_it_where_and_until_when(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    store = open_store(load_config(world.config_path).state)
    try:
        assert store.acquire_lock("run:prod-east", "3f2a9c1b7d4e@dora-reconciler-29170560-x7k2p", 60)
        capsys.readouterr()
        assert world.run() == exitcodes.LOCKED
        (line,) = [line for line in log_lines(capsys.readouterr().err) if line["message"].startswith("another run")]
        assert line["reason"].startswith(
            "lock 'run:prod-east' is held by run 3f2a9c1b7d4e on dora-reconciler-29170560-x7k2p until "
        )
        assert "(in 60 s, unless renewed while it runs)" in line["reason"] or "(in 59 s" in line["reason"]
        store.release_lock("run:prod-east", "3f2a9c1b7d4e@dora-reconciler-29170560-x7k2p")

        assert store.acquire_shared_lock("layout:prod-east", "layout-3", "a1b2c3d4e5f6@dora-reconciler-shard-0", 60)
        assert store.acquire_shared_lock("layout:prod-east", "layout-3", "0f9e8d7c6b5a@dora-reconciler-shard-2", 60)
        assert world.run() == exitcodes.LOCKED
        (line,) = [line for line in log_lines(capsys.readouterr().err) if line["message"].startswith("another run")]
        assert "is held by the shards of a 3-shard layout (--shard I/3) until " in line["reason"]
        assert line["reason"].endswith(
            "; held now by run 0f9e8d7c6b5a on dora-reconciler-shard-2, run a1b2c3d4e5f6 on dora-reconciler-shard-0"
        )
    finally:
        store.close()


def test_a_run_lock_carries_the_run_id_and_the_host(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    store = open_store(load_config(world.config_path).state)

    def spy(message: str, *args: Any, **kwargs: Any) -> None:
        seen.append(store.lock_holder("run:prod-east"))

    try:
        monkeypatch.setattr("reconciler.reconcile.log.info", spy)
        gitops, images = payments_world(world)
        world.set_apps([settled_app("payments-api", gitops[0], images[0])])
        assert world.run() == exitcodes.OK
        assert store.lock_holder("run:prod-east") is None, "released at the end"
    finally:
        store.close()
    holders = [holder for holder in seen if holder is not None]
    assert holders, "the lock was read while the run held it"
    run_id, host = holders[0].owner.split("@")
    assert len(run_id) == 12 and host == os.uname().nodename


# -- readers that go away ----------------------------------------------------------------------------------


class ClosedPipe(io.StringIO):
    """A stdout whose reader exits after the first line (``| head -1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0

    def write(self, text: str) -> int:
        if self.lines >= 1:
            raise BrokenPipeError(32, "Broken pipe")
        self.lines += text.count("\n")
        return super().write(text)


@pytest.mark.parametrize("command", [["status"], ["explain", "argocd/payments-api"], ["check"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(
    world: World, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    gitops, images = payments_world(world)
    world.set_apps([settled_app("payments-api", gitops[0], images[0])])
    assert world.run() == exitcodes.OK
    capsys.readouterr()
    pipe = ClosedPipe()
    assert main([*command, "--config", str(world.config_path)], stdout=pipe) == exitcodes.OK
    assert pipe.getvalue().count("\n") == 1
    assert "Traceback" not in capsys.readouterr().err


def test_a_dry_run_whose_reader_goes_away_stops_early_and_quietly(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    gitops, images = payments_world(world)
    apps = [settled_app(f"app-{n}", gitops[0], images[0]) for n in range(6)]
    world.set_apps(apps)
    assert world.run() == exitcodes.OK
    world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])
    capsys.readouterr()
    pipe = ClosedPipe()
    main(["run", "--dry-run", "--config", str(world.config_path)], stdout=pipe)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "the reader of the dry run's output went away; the dry run stopped early" in err
    summary = next(line for line in log_lines(err) if line["message"] == "run finished")["summary"]
    assert summary["would_send"] < 6, "stopped at the next safe point, not after the whole fleet"


def test_status_piped_into_a_closed_reader_exits_0_without_a_traceback(world: World) -> None:
    """The real process: Python flushes stdout at exit, where a closed pipe would print a traceback."""
    gitops, images = payments_world(world)
    world.set_apps([settled_app("payments-api", gitops[0], images[0])])
    for _ in range(40):
        assert world.run() == exitcodes.OK  # enough output to fill more than one write
    process = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "status", "--config", str(world.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=world.tmp_path,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr
