"""Progress of long runs: a line updated in place on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

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
    assert [(line["apps_listed"], line["deployments"], line["sent"]) for line in lines] == [
        (2, 2, 2),
        (4, 4, 4),
        (5, 5, 5),
    ], "one line after each page: the run's counts so far"
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
        "2 apps listed, 2 deployments recorded, 2 sent, 0 deferred",
        "4 apps listed, 4 deployments recorded, 4 sent, 0 deferred",
        "5 apps listed, 5 deployments recorded, 5 sent, 0 deferred",
    ]
    reporter.close()
    assert terminal.getvalue().endswith(" deferred\n"), "closing ends the line for whatever is printed next"
    reporter.close()
    assert terminal.getvalue().count("\n") == 1


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
    assert terminal.getvalue().startswith("\r\x1b[K2 apps listed")
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
