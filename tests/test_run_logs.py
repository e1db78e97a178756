"""What an operator reads on stderr: one line per delivered deployment and per dead letter, summaries that are
bounded and grouped, baselines and backfills of large fleets in a few lines, and a text format for humans."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler import exitcodes
from reconciler.logs import Redactor, TextFormatter
from reconciler.run import MAX_ERROR_CAUSES, OTHER_CAUSES, RunError, RunSummary
from tests.scenarios import deploy, payments_world, settled_app
from tests.world import World, log_lines

CONNECTIONS = [{"id": 1, "api_key_env": "DEVLAKE_KEY_1"}, {"id": 6, "api_key_env": "DEVLAKE_KEY_6"}]


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch, connections=CONNECTIONS) as world:
        yield world


def waiting(world: World, count: int) -> list[str]:
    """``count`` Applications baselined by a first run, each with one deployment (h1) waiting to be sent."""
    gitops, images = payments_world(world)
    names = [f"app-{n:02d}" for n in range(count)]
    apps = [settled_app(name, gitops[0], images[0]) for name in names]
    world.set_apps(apps)
    assert world.run() == 0
    world.set_apps([deploy(app, 1, gitops[1], images[1]) for app in apps])
    return names


def summary_of(err: str) -> dict[str, Any]:
    (line,) = [line for line in log_lines(err) if line["message"] == "run finished"]
    summary: dict[str, Any] = line["summary"]
    return summary


def test_each_delivered_deployment_is_one_info_line_saying_where_it_went(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    (name,) = waiting(world, 1)
    capsys.readouterr()
    assert world.run() == 0
    delivered = [line for line in log_lines(capsys.readouterr().err) if line["message"] == "deployment delivered"]
    assert len(delivered) == 1
    (line,) = delivered
    assert line["level"] == "info"
    assert line["app"] == f"prod-east/argocd/{name}"
    assert line["deployment_id"].endswith(":h1") and line["result"] == "SUCCESS"
    assert line["connections"] == [1, 6]


def test_a_dead_letter_is_one_line_naming_the_app_the_deployment_and_devlakes_answer(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    (name,) = waiting(world, 1)
    world.devlake.fail_next(1, status=400)
    capsys.readouterr()
    assert world.run() == 0
    lines = log_lines(capsys.readouterr().err)
    (dead,) = [line for line in lines if "dead-letter" in line["message"]]
    assert dead["level"] == "error"
    assert dead["app"] == f"prod-east/argocd/{name}" and dead["deployment_id"].endswith(":h1")
    assert dead["result"] == "SUCCESS" and dead["connection"] == 1 and dead["status"] == 400
    (delivered,) = [line for line in lines if line["message"] == "deployment delivered"]
    assert delivered["connections"] == [6], "only the connection that accepted it"


def test_a_dry_runs_summary_counts_what_it_would_send_and_never_says_sent(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting(world, 3)
    capsys.readouterr()
    assert world.run("--dry-run") == 0
    captured = capsys.readouterr()
    summary = summary_of(captured.err)
    assert summary["would_send"] == 6 and "sent" not in summary, "3 deployments x 2 connections, printed"
    assert summary["dry_run"] is True
    assert len(captured.out.splitlines()) == 6
    assert not [line for line in log_lines(captured.err) if line["message"] == "deployment delivered"]
    assert world.devlake.post_count == 0

    assert world.run() == 0
    summary = summary_of(capsys.readouterr().err)
    assert summary["sent"] == 6 and "would_send" not in summary


def test_errors_are_one_entry_per_cause_with_the_count_and_the_http_status(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """Eight deployments held back by a refused key: one entry (not eight), and one warning line per deployment
    would bury the connection's one error line, so those are at debug level."""
    waiting(world, 8)
    world.devlake.remove_connection(6)
    capsys.readouterr()
    assert world.run() == exitcodes.RETRY
    err = capsys.readouterr().err
    summary = summary_of(err)
    (error,) = summary["errors"]
    assert error["count"] == 8 and error["status"] == 403
    assert error["cause"].startswith("DevLake connection 6: DevLake refused the connection's configuration (HTTP 403)")
    assert error["example"].startswith("prod-east/argocd/app-")
    assert not [line for line in log_lines(err) if "held back for the rest of this run; will retry" in line["message"]]
    (held,) = [
        line for line in log_lines(err) if line["message"] == "DevLake connection held back for the rest of this run"
    ]
    assert held["level"] == "error" and held["connection"] == 6


def test_a_summary_lists_a_bounded_number_of_causes() -> None:
    summary = RunSummary("r", "run", "t")
    for n in range(MAX_ERROR_CAUSES + 5):
        summary.add_error(RunError(f"cause {n}", 500))
        summary.add_error(RunError(f"cause {n}", 500))
    summary.add_error(RunError("cause 0", 502))
    assert len(summary.errors) == MAX_ERROR_CAUSES + 1
    assert summary.errors[0] == {"cause": "cause 0", "count": 2, "status": 500}
    assert summary.errors[-1] == {"cause": OTHER_CAUSES, "count": 11}, "5 more causes twice, and cause 0 with 502"


def test_a_baseline_of_a_large_fleet_is_summarised_not_one_info_line_per_app(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    gitops, images = payments_world(world)
    world.set_apps([settled_app(f"app-{n:02d}", gitops[0], images[0]) for n in range(30)])
    capsys.readouterr()
    assert world.run() == 0
    lines = log_lines(capsys.readouterr().err)
    assert len(lines) < 10, [line["message"] for line in lines]
    (counted,) = [line for line in lines if line["message"].startswith("planner notes")]
    assert counted["notes"] == {"first run for the cluster: current state recorded as the baseline": 30}
    assert counted["apps"] == 30 and counted["cluster"] == "prod-east"

    world.kube.set_apps([settled_app(f"app-{n:02d}", gitops[0], images[0]) for n in range(30)])
    assert world.run("--log-level", "debug", command="backfill") == 0
    lines = log_lines(capsys.readouterr().err)
    per_app = [line for line in lines if line["message"] == "backfill: emitting every history entry present again"]
    assert len(per_app) == 30 and {line["level"] for line in per_app} == {"debug"}, "per app at debug level"


def test_the_text_format_prints_the_summary_as_key_value_pairs(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    waiting(world, 1)
    world.devlake.fail_always(401)
    capsys.readouterr()
    assert world.run("--log-format", "text") == exitcodes.RETRY
    (last,) = [line for line in capsys.readouterr().err.splitlines() if " run finished " in line]
    assert "{'" not in last and "': " not in last, "no Python dict"
    assert " apps_listed=1 " in last and " sent=0 " in last and " exit_code=1" in last
    assert " clusters.prod-east.listed=true " in last
    assert ' errors="HTTP 401: DevLake connection 1: ' in last and "; HTTP 401: DevLake connection 6: " in last


def record(message: str, **fields: Any) -> logging.LogRecord:
    entry = logging.makeLogRecord({"msg": message, "levelname": "ERROR", "levelno": logging.ERROR})
    entry.__dict__.update(fields)
    return entry


def test_the_text_format_never_repeats_the_message_in_the_reason() -> None:
    formatter = TextFormatter(Redactor())
    assert formatter.format(record("state store unavailable", reason="state store unavailable")).endswith(
        "state store unavailable"
    )
    line = formatter.format(record("cluster unavailable", reason="cluster unavailable: 401 from the API server"))
    assert line.endswith('cluster unavailable reason="401 from the API server"')
    line = formatter.format(record("x", summary={"sent": 2, "clusters": {"a": {"listed": True}}}, nothing=None))
    assert line.endswith("x sent=2 clusters.a.listed=true")
