"""Progress of long runs: a line updated in place on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import reconcile
from reconciler.commands import run_command
from reconciler.config import load_config
from reconciler.logs import configure_logging
from reconciler.reconcile import PROGRESS_EVERY_SECONDS, Reconciler
from reconciler.run import RunOptions, RunSummary
from reconciler.runtime import ProgressReporter, Runtime, progress_reporter
from tests.scenarios import deployed_app, new_deployment
from tests.world import World, log_lines

NAMES = ["alpha-api", "bravo-api", "charlie-api", "delta-api", "echo-api"]
"""Five apps; the World lists them two per page, so a run sees three pages."""


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    """Five apps past their baseline, each with one deployment waiting to be sent."""
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        apps = [deployed_app(world, gitops[0], images[0], name=name) for name in NAMES]
        world.set_apps(apps)
        assert world.run() == 0
        world.set_apps([new_deployment(app, 1, gitops[1], images[1], minute=30) for app in apps])
        yield world


def run_with(world: World, progress: ProgressReporter | list[RunSummary], every: float) -> RunSummary:
    config = load_config(world.config_path)
    runtime = Runtime.open(config)
    callback = progress if isinstance(progress, ProgressReporter) else progress.append
    try:
        reconciler = Reconciler(
            config,
            runtime.store,
            runtime.github,
            runtime.devlake,
            progress=callback,
            progress_every=every,
        )
        return reconciler.run(RunOptions())
    finally:
        runtime.close()


def test_without_a_terminal_progress_is_a_log_line_per_interval(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    stream = io.StringIO()
    configure_logging()  # onto this test's captured stderr, as the command line does
    capsys.readouterr()
    summary = run_with(world, progress_reporter(stream), every=0)
    assert summary.sent == 5

    lines = [line for line in log_lines(capsys.readouterr().err) if line["message"] == "progress"]
    assert [(line["cluster"], line["apps"], line["deployments"], line["sent"]) for line in lines] == [
        ("prod-east", "2/5", 2, 2),
        ("prod-east", "4/5", 4, 4),
        ("prod-east", "5/5", 5, 5),
    ], "one line after each page: the run's counts so far, and the total the API server counted"
    assert stream.getvalue() == "", "no terminal control characters in a log"


def test_on_a_terminal_progress_is_one_line_rewritten_in_place(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    terminal = FakeTerminal()
    reporter = progress_reporter(terminal)
    assert reporter.interactive
    configure_logging()
    capsys.readouterr()
    run_with(world, reporter, every=0)

    assert "progress" not in [line["message"] for line in log_lines(capsys.readouterr().err)]
    updates = terminal.getvalue().split("\r\x1b[K")
    assert updates == [
        "",
        "prod-east: apps 2/5, 2 deployments, 2 sent, 0 deferred",
        "prod-east: apps 4/5, 4 deployments, 4 sent, 0 deferred",
        "prod-east: apps 5/5, 5 deployments, 5 sent, 0 deferred",
    ]
    reporter.close()
    assert terminal.getvalue().endswith(" deferred\n"), "closing ends the line for whatever is printed next"
    reporter.close()
    assert terminal.getvalue().count("\n") == 1


def test_applications_listed_again_after_an_expired_continue_token_are_read_once(world: World) -> None:
    """The listing starts again from its first page: the count goes back to what that listing has read."""
    world.kube.expire_continue_tokens(1)
    terminal = FakeTerminal()
    summary = run_with(world, progress_reporter(terminal), every=0)

    assert terminal.getvalue().split("\r\x1b[K")[1:] == [
        "prod-east: apps 2/5, 2 deployments, 2 sent, 0 deferred",
        "prod-east: apps 2/5, 2 deployments, 2 sent, 0 deferred",
        "prod-east: apps 4/5, 4 deployments, 4 sent, 0 deferred",
        "prod-east: apps 5/5, 5 deployments, 5 sent, 0 deferred",
    ]
    assert (summary.apps_read, summary.apps_listed, summary.sent) == (5, 5, 5)
    assert summary.clusters["prod-east"] == {"apps_read": 5, "apps_listed": 5, "listed": True}


def test_progress_waits_for_its_interval(world: World) -> None:
    calls: list[RunSummary] = []
    run_with(world, calls, every=3600)
    assert calls == [], "a run shorter than the interval reports no progress"


def test_the_default_interval(world: World) -> None:
    config = load_config(world.config_path)
    runtime = Runtime.open(config)
    try:
        assert runtime.reconciler(progress=print).progress_every == PROGRESS_EVERY_SECONDS == 10.0
    finally:
        runtime.close()


def test_run_ends_the_terminal_line_before_the_summary(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reconcile, "PROGRESS_EVERY_SECONDS", 0.0)
    terminal = FakeTerminal()
    configure_logging()
    capsys.readouterr()
    assert run_command(load_config(world.config_path), progress=progress_reporter(terminal)) == 0
    assert terminal.getvalue().startswith("\r\x1b[Kprod-east: apps 2/5")
    assert terminal.getvalue().endswith("5 sent, 0 deferred\n")
    assert log_lines(capsys.readouterr().err)[-1]["message"] == "run finished"


def test_the_command_line_logs_progress_when_stderr_is_not_a_terminal(
    world: World, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(reconcile, "PROGRESS_EVERY_SECONDS", 0.0)
    capsys.readouterr()
    assert world.run() == 0
    messages = [line["message"] for line in log_lines(capsys.readouterr().err)]
    assert messages.count("progress") == 3
    assert messages[-1] == "run finished"


def test_without_the_api_servers_count_the_total_is_the_last_complete_listing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a label selector the API server counts nothing (``remainingItemCount`` is only given without one): the
    total is what the last run that read the whole cluster read, and the first run has none."""
    cluster = {"name": "prod-east", "kubeconfig": str(tmp_path / "kubeconfig"), "context": "fake", "page_size": 2}
    config = {"clusters": [{**cluster, "label_selector": "team=payments"}]}
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch, config=config) as world:
        gitops = world.github.add_commits("acme/gitops", 1)
        images = world.github.add_commits("acme/payments-api", 1)
        world.set_apps([labelled(deployed_app(world, gitops[0], images[0], name=name)) for name in NAMES])
        monkeypatch.setattr(reconcile, "PROGRESS_EVERY_SECONDS", 0.0)
        capsys.readouterr()
        assert world.run() == 0
        first = [line["apps"] for line in log_lines(capsys.readouterr().err) if line["message"] == "progress"]
        assert world.run() == 0
        second = [line["apps"] for line in log_lines(capsys.readouterr().err) if line["message"] == "progress"]
    assert first == ["2", "4", "5"], "nothing to count against yet"
    assert second == ["2/5", "4/5", "5/5"], "the first run read the whole cluster: its count is the total"


def test_a_dry_runs_progress_says_what_would_be_sent(world: World, capsys: pytest.CaptureFixture[str]) -> None:
    terminal = FakeTerminal()
    configure_logging()
    capsys.readouterr()
    config = load_config(world.config_path)
    assert run_command(config, dry_run=True, stdout=io.StringIO(), progress=progress_reporter(terminal)) == 0
    summary = log_lines(capsys.readouterr().err)[-1]["summary"]
    assert summary["would_send"] == 5 and "sent" not in summary, "a dry run sends nothing and says so"
    assert summary["dry_run"] is True


def labelled(app: dict[str, Any]) -> dict[str, Any]:
    app["metadata"].setdefault("labels", {})["team"] = "payments"
    return app
