"""Benchmark of the reconciler against a fleet: ``.venv/bin/python -m benchmarks.tick`` (1,000 and 5,000 apps).

For each fleet size N, a fake Kubernetes API server (and a fake DevLake) is started in a process of its own,
serving N realistic Applications (``benchmarks.fleet``), with the state in a real Redis. Then:

1. ``baseline``: the first pass for the cluster (every Application recorded, nothing sent), in a process of its
   own (``benchmarks.phase``).
2. ``steady``: nothing changed. ``--repeat`` alternating pairs (which one goes first alternates too) of two fresh
   processes, after one pair for warming up that is not counted:
   * the floor, ``python -m benchmarks.floor``: imports the same ``kubernetes`` client, lists the same
     Applications with the same page size, and does nothing else;
   * the run, ``dora-reconciler run --config ...``: interpreter start, imports, config load, store connect,
     listing, digest checks, exit, exactly as a CronJob runs it.
   Each is timed from its start to its exit: wall time, and CPU time (user + system, from ``wait4``), and its
   peak RSS. The ratios are of the medians; the spread of the ratio over the pairs shows how noisy the machine
   was. The run's summary gives its GitHub requests, the fake DevLake the DevLake requests, Redis's keyspace
   notifications the writes to the snapshot hashes (``SnapshotWrites``; the run locks are written on every run
   and not counted): all must be 0 at rest.
3. ``backfill`` (sizes in ``--backfill-apps``, default 5,000): ``backfill`` on a fresh state over every history
   entry (10 per Application), GitHub answering every request from the fake after ``--latency-ms``: its time, its
   GitHub requests and the DevLake requests.
4. ``burst``: 10 % of the apps deploy a new image (20 image repositories, apps of one component share one),
   GitHub answering every request after ``--latency-ms``: the GitHub requests against the minimum with a cold
   cache (one compare per distinct repo/previous/new SHA, one commit lookup per new SHA no compare returns: here
   none, as a deployment of a new image carries no GitOps commit by default), the pass's time and how long at
   least one GitHub request was in flight (against requests x latency, what sending them one by one would
   cost); then one more pass, which must be quiet again.
   ``--commits range`` runs every phase with ``devlake.commits: range`` (default ``head``).

The package's bytecode is compiled first, as the image's install does: a run never compiles its own modules.
``--large`` adds 20,000 apps (about two more minutes on 2 cores). State in Redis (``$REDIS_URL``, else a throwaway
``redis-server`` on a free port) or ``--state sqlite``. Prints a table; exit status 0 when every target is met,
1 otherwise.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import redis

from benchmarks.phase import DEVLAKE_KEY_ENV, GITHUB_TOKEN_ENV, Spec, config_data
from tests.fakes.server import free_port
from tests.redis_server import RedisStartError, serving_redis

ROOT = Path(__file__).resolve().parent.parent
GITHUB_TOKEN = "ghp_benchSECRETtoken0123456789abcdefghijklm"
DEVLAKE_KEY = "devlake-bench-key-" + "b" * 40
PHASE_TIMEOUT_SECONDS = 900
RATIO_TARGET = 1.25
RSS_TARGET_MB = 150.0
LARGE_APPS = 20000
WATCH_SECONDS = 30.0
"""How long the snapshot-write watcher waits for Redis to echo its marker after a run."""


# -- processes -----------------------------------------------------------------------------------------


def _drop_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


class SnapshotWrites:
    """Counts the writes to the snapshot hashes of one key prefix (``{prefix}:snap:{cluster}``) from Redis's
    keyspace notifications of hash commands, turned on for the watch and restored afterwards. Only those hashes
    are counted: the run locks are written on every run (the layout lock is a hash of its holders)."""

    def __init__(self, url: str, prefix: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._flags = str(self._client.config_get("notify-keyspace-events").get("notify-keyspace-events", ""))
        self._client.config_set("notify-keyspace-events", self._flags + "Kh")
        self._marker = f"{prefix}:watch-marker"
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._pubsub.psubscribe(f"__keyspace@*__:{prefix}:snap:*")
        self._pubsub.subscribe(self._marker)

    def count(self) -> int:
        """Snapshot writes notified since the last call: every notification Redis sent before it echoes a marker
        published now (one connection's messages arrive in order)."""
        self._client.publish(self._marker, "done")
        writes = 0
        deadline = time.monotonic() + WATCH_SECONDS
        while time.monotonic() < deadline:
            message = self._pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            if message["type"] == "message":
                return writes
            writes += 1
        raise RuntimeError("Redis did not echo the snapshot-write watcher's marker")

    def close(self) -> None:
        self._pubsub.close()
        self._client.config_set("notify-keyspace-events", self._flags)
        self._client.close()


class Server:
    """The ``benchmarks.server`` process: fake Kubernetes API and fake DevLake."""

    def __init__(self, apps: int, now: str, kubeconfig: Path, sync_result_resources: int, log: IO[bytes]) -> None:
        command = [
            sys.executable,
            "-m",
            "benchmarks.server",
            "--apps",
            str(apps),
            "--now",
            now,
            "--kubeconfig",
            str(kubeconfig),
            "--devlake-key",
            DEVLAKE_KEY,
            "--sync-result-resources",
            str(sync_result_resources),
        ]
        self.process = subprocess.Popen(
            command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
        )
        self.info = self._read()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the benchmark server exited early (see its log)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def command(self, text: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                assert self.process.stdin is not None
                self.process.stdin.write("quit\n")
                self.process.stdin.close()
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def _environment() -> dict[str, str]:
    env = {**os.environ, GITHUB_TOKEN_ENV: GITHUB_TOKEN, DEVLAKE_KEY_ENV: DEVLAKE_KEY}
    env.pop("KUBECONFIG", None)
    return env


def run_phase(spec: Spec, log_path: Path) -> dict[str, Any]:
    env = {**_environment(), "PYTHONHASHSEED": "0"}
    with log_path.open("wb") as log:
        completed = subprocess.run(
            [sys.executable, "-m", "benchmarks.phase", json.dumps(asdict(spec))],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=PHASE_TIMEOUT_SECONDS,
            check=False,
        )
    lines = completed.stdout.decode().strip().splitlines()
    if completed.returncode != 0 or not lines:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"phase {spec.phase} for {spec.apps} apps failed (exit {completed.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


@dataclass(frozen=True)
class Finished:
    """One fresh process, from its start to its exit."""

    seconds: float
    cpu_seconds: float
    """User + system time of the process (``wait4``)."""
    rss_mb: float
    """Peak resident set size (``ru_maxrss``)."""
    exit_code: int
    stdout: str


def timed(command: Sequence[str], log_path: Path) -> Finished:
    with log_path.open("ab") as log, tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, env=_environment(), stdout=out, stderr=log)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    return Finished(
        seconds=seconds,
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        rss_mb=usage.ru_maxrss / 1024,
        exit_code=process.returncode,
        stdout=stdout,
    )


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "dora-reconciler"
    return [str(script)] if script.exists() else [sys.executable, "-m", "reconciler"]


def _last_summary(log_path: Path) -> dict[str, Any]:
    """The summary of the last ``run finished`` line in a run's JSON log."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("message") == "run finished":
            summary: dict[str, Any] = record["summary"]
            return summary
    raise RuntimeError(f"no 'run finished' line in {log_path}")


def measure_steady(
    spec: Spec, options: Options, server: Server, redis_url: str | None, config_path: Path
) -> dict[str, Any]:
    """Alternating pairs of fresh processes: the list-only floor and ``dora-reconciler run``; the snapshot writes
    of each run when the state is in Redis (``redis_url``)."""
    watcher = SnapshotWrites(redis_url, spec.key_prefix) if redis_url is not None else None
    try:
        return _measure_steady(spec, options, server, watcher, config_path)
    finally:
        if watcher is not None:
            watcher.close()


def _measure_steady(
    spec: Spec, options: Options, server: Server, watcher: SnapshotWrites | None, config_path: Path
) -> dict[str, Any]:
    floor_command = [sys.executable, "-m", "benchmarks.floor", spec.kubeconfig, str(spec.page_size)]
    run_command = [*_console_script(), "run", "--config", str(config_path)]
    floor_log = options.logs / f"floor-{spec.apps}.log"
    run_log = options.logs / f"steady-{spec.apps}.log"

    def floor() -> Finished:
        done = timed(floor_command, floor_log)
        if done.exit_code != 0 or done.stdout.strip() != str(spec.apps):
            raise RuntimeError(f"the floor failed (exit {done.exit_code}, listed {done.stdout.strip()!r})")
        return done

    def run() -> tuple[Finished, dict[str, Any]]:
        before = server.command("stats")
        if watcher is not None:
            watcher.count()
        done = timed(run_command, run_log)
        summary = _last_summary(run_log)
        if done.exit_code != 0 or summary["apps_listed"] != spec.apps:
            raise RuntimeError(f"the steady run failed (exit {done.exit_code}); see {run_log}")
        after = server.command("stats")
        counts = {
            "github_requests": summary["github_requests"],
            "devlake_requests": after["devlake_requests"] - before["devlake_requests"],
            "kube_lists": after["kube_lists"] - before["kube_lists"],
            "snapshot_writes": None if watcher is None else watcher.count(),
        }
        return done, counts

    floor()
    run()
    floors: list[Finished] = []
    runs: list[Finished] = []
    counts: list[dict[str, Any]] = []
    for pair in range(options.repeat):
        if pair % 2:
            done, seen = run()
            floors.append(floor())
        else:
            floors.append(floor())
            done, seen = run()
        runs.append(done)
        counts.append(seen)
    if options.profile:
        profile = options.logs / f"steady-{spec.apps}.prof"
        script = run_command[0] if run_command[0] != sys.executable else "-m"
        target = [script] if script != "-m" else ["-m", "reconciler"]
        profiled = [sys.executable, "-X", "importtime", "-m", "cProfile", "-o", str(profile), *target]
        timed([*profiled, "run", "--config", str(config_path)], options.logs / f"steady-{spec.apps}-importtime.log")

    def median(values: Sequence[float]) -> float:
        return statistics.median(values)

    return {
        "floors": [asdict(f) for f in floors],
        "runs": [asdict(r) for r in runs],
        "counts": counts,
        "floor_seconds": median([f.seconds for f in floors]),
        "floor_cpu_seconds": median([f.cpu_seconds for f in floors]),
        "run_seconds": median([r.seconds for r in runs]),
        "run_cpu_seconds": median([r.cpu_seconds for r in runs]),
        "pair_ratios": [r.seconds / f.seconds for r, f in zip(runs, floors, strict=True)],
        "pair_cpu_ratios": [r.cpu_seconds / f.cpu_seconds for r, f in zip(runs, floors, strict=True)],
        "rss_peak_mb": max(r.rss_mb for r in runs),
        "floor_rss_peak_mb": max(f.rss_mb for f in floors),
    }


# -- one fleet size ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    state: str
    repeat: int
    page_size: int
    latency: float
    sync_result_resources: int
    logs: Path
    profile: bool
    commits: str = "head"
    backfill_apps: tuple[int, ...] = (5000,)


def measure(apps: int, options: Options, redis_url: str | None) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    prefix = f"bench-{apps}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="dora-bench-") as tmp:
        directory = Path(tmp)
        state_url = redis_url if options.state == "redis" else f"sqlite:///{directory / 'state.db'}"
        assert state_url is not None
        started = time.monotonic()
        with (options.logs / f"server-{apps}.log").open("wb") as server_log:
            server = Server(apps, now, directory / "kubeconfig", options.sync_result_resources, server_log)
            prefixes = [prefix]
            try:
                spec = Spec(
                    phase="baseline",
                    apps=apps,
                    now=now,
                    kubeconfig=str(directory / "kubeconfig"),
                    devlake_url=str(server.info["devlake"]),
                    state_url=state_url,
                    key_prefix=prefix,
                    page_size=options.page_size,
                    repeat=options.repeat,
                    latency=0.0,
                    sync_result_resources=options.sync_result_resources,
                    github_token=GITHUB_TOKEN,
                    commits=options.commits,
                )
                results: dict[str, Any] = {
                    "apps": apps,
                    "server": server.info,
                    "setup_seconds": time.monotonic() - started,
                }

                def phase(name: str, phase_spec: Spec) -> dict[str, Any]:
                    before = server.command("stats")
                    profile = str(options.logs / f"{name}-{apps}.prof") if options.profile else None
                    latency = options.latency if name in ("burst", "backfill") else 0.0
                    result = run_phase(
                        replace(phase_spec, phase=name, latency=latency, profile=profile),
                        options.logs / f"{name}-{apps}.log",
                    )
                    after = server.command("stats")
                    result["server_devlake_requests"] = after["devlake_requests"] - before["devlake_requests"]
                    result["server_kube_lists"] = after["kube_lists"] - before["kube_lists"]
                    return result

                results["baseline"] = phase("baseline", spec)
                # GitHub is a closed port: a quiet run that asked it anything would fail and say so.
                config_path = directory / "config.yaml"
                github_url = f"http://127.0.0.1:{free_port()}"
                config_path.write_text(json.dumps(config_data(spec, github_url=github_url)))
                writes_redis = redis_url if options.state == "redis" else None
                results["steady"] = measure_steady(spec, options, server, writes_redis, config_path)
                if apps in options.backfill_apps:
                    backfill_prefix = f"{prefix}-backfill"
                    prefixes.append(backfill_prefix)
                    backfill_state = state_url
                    if options.state == "sqlite":
                        backfill_state = f"sqlite:///{directory / 'backfill.db'}"
                    results["backfill"] = phase(
                        "backfill", replace(spec, key_prefix=backfill_prefix, state_url=backfill_state)
                    )
                server.command("burst")
                results["burst"] = phase("burst", spec)
            finally:
                server.close()
                if options.state == "redis" and redis_url is not None:
                    for used in prefixes:
                        _drop_keys(redis_url, used)
        results["seconds"] = time.monotonic() - started
        return results


# -- report --------------------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _spread(values: Sequence[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def report(results: Sequence[dict[str, Any]], options: Options) -> tuple[str, bool]:
    passed = True

    def check(ok: bool) -> str:
        nonlocal passed
        passed = passed and ok
        return _mark(ok)

    cells: dict[str, list[str]] = {}

    def cell(key: str, value: str) -> None:
        cells.setdefault(key, []).append(value)

    for result in results:
        steady, baseline, burst = result["steady"], result["baseline"], result["burst"]
        ratio = steady["run_seconds"] / steady["floor_seconds"]
        ratio_cpu = steady["run_cpu_seconds"] / steady["floor_cpu_seconds"]
        counts = steady["counts"]
        github_steady = sum(c["github_requests"] for c in counts)
        devlake_steady = sum(c["devlake_requests"] for c in counts)
        writes = [c["snapshot_writes"] for c in counts]
        tick = burst["tick"]
        minimum = burst["minimum"]["compare"] + burst["minimum"]["commit"]
        calls = tick["github_calls"]
        other = sum(count for kind, count in calls.items() if kind not in ("compare", "commit"))
        serial = tick["github_requests"] * options.latency
        after = burst["after"]
        cell("size", f"{result['server']['bytes'] / result['server']['apps'] / 1024:.1f} KB")
        cell("run", f"{steady['run_seconds']:.3f} s / {steady['run_cpu_seconds']:.3f} s")
        cell("floor", f"{steady['floor_seconds']:.3f} s / {steady['floor_cpu_seconds']:.3f} s")
        cell("ratio", f"{ratio:.2f} {check(ratio <= RATIO_TARGET)}")
        cell("ratio_cpu", f"{ratio_cpu:.2f} {check(ratio_cpu <= RATIO_TARGET)}")
        cell("spread", f"{_spread(steady['pair_ratios'])} / {_spread(steady['pair_cpu_ratios'])}")
        cell(
            "steady_requests", f"{github_steady} / {devlake_steady} {check(github_steady == 0 and devlake_steady == 0)}"
        )
        if None in writes:
            cell("steady_writes", "n/a")
        else:
            cell("steady_writes", f"{sum(writes)} {check(sum(writes) == 0)}")
        rss = steady["rss_peak_mb"]
        cell("rss_steady", f"{rss:.0f} MB {check(rss <= RSS_TARGET_MB)}")
        cell("rss_floor", f"{steady['floor_rss_peak_mb']:.0f} MB")
        rss_passes = max(baseline["rss_peak_mb"], burst["rss_peak_mb"])
        cell("rss_passes", f"{rss_passes:.0f} MB {check(rss_passes <= RSS_TARGET_MB)}")
        cell("baseline", f"{baseline['tick']['seconds']:.2f} s / {baseline['tick']['cpu_seconds']:.2f} s")
        backfill = result.get("backfill")
        if backfill is None:
            for key in ("backfill", "backfill_github", "backfill_devlake"):
                cell(key, "-")
        else:
            done = backfill["tick"]
            backfill_calls = done["github_calls"]
            cell("backfill", f"{done['seconds']:.1f} s / {done['cpu_seconds']:.1f} s")
            cell(
                "backfill_github",
                f"{done['github_requests']} ({backfill_calls.get('compare', 0)} compares, "
                f"{backfill_calls.get('commit', 0)} commits)",
            )
            summary = done["summary"]
            cell(
                "backfill_devlake",
                f"{done['devlake_requests']} for {summary['deployments_success'] + summary['deployments_failed']}"
                f" deployments ({summary['deployments_deduplicated']} deduped)",
            )
            rss_backfill = backfill["rss_peak_mb"]
            cells["rss_passes"][-1] = f"{max(rss_passes, rss_backfill):.0f} MB {check(rss_backfill <= RSS_TARGET_MB)}"
        cell("burst_apps", f"{burst['burst_apps']} apps, {tick['summary']['deployments_success']} recorded")
        cell(
            "burst_github",
            f"{tick['github_requests']} (min {minimum}) {check(tick['github_requests'] == minimum)}",
        )
        cell(
            "burst_split",
            f"{calls.get('compare', 0)}/{calls.get('commit', 0)}/{other} (min {burst['minimum']['compare']}/"
            f"{burst['minimum']['commit']}/0)",
        )
        busy = tick["github_busy_seconds"]
        cell("burst_time", f"{tick['seconds']:.2f} s")
        cell("burst_busy", f"{busy:.2f} s vs {serial:.1f} s {check(busy <= serial / 2)}")
        cell("burst_devlake", f"{tick['devlake_requests']} ({tick['summary']['deployments_deduplicated']} deduped)")
        after_quiet = after["github_requests"] == 0 and after["devlake_requests"] == 0
        cell("after", f"{after['github_requests']} / {after['devlake_requests']} {check(after_quiet)}")
        cell("wall", f"{result['seconds']:.0f} s")

    latency_ms = round(options.latency * 1000)
    labels = [
        ("size", "app JSON (average)", ""),
        ("run", "steady run, fresh process: wall / CPU", ""),
        ("floor", "list-only floor, fresh process: wall / CPU", ""),
        ("ratio", "steady run / floor, wall (medians)", f"<= {RATIO_TARGET}"),
        ("ratio_cpu", "steady run / floor, CPU (medians)", f"<= {RATIO_TARGET}"),
        ("spread", "  ratio over the pairs: wall / CPU", ""),
        ("steady_requests", "steady GitHub / DevLake requests", "0 / 0"),
        ("steady_writes", "steady snapshot writes", "0"),
        ("rss_steady", "peak RSS, steady run", f"<= {RSS_TARGET_MB:.0f} MB"),
        ("rss_floor", "peak RSS, floor", ""),
        ("rss_passes", "peak RSS, baseline/backfill/burst", f"<= {RSS_TARGET_MB:.0f} MB"),
        ("baseline", "baseline pass: wall / CPU", ""),
        ("backfill", "backfill pass (10 history entries/app)", ""),
        ("backfill_github", "backfill: GitHub requests", ""),
        ("backfill_devlake", "backfill: DevLake requests", ""),
        ("burst_apps", "burst: apps deploying", ""),
        ("burst_github", "burst: GitHub requests", "= minimum"),
        ("burst_split", "burst: compare / commit / other", ""),
        ("burst_time", f"burst: pass, GitHub at {latency_ms} ms", ""),
        ("burst_busy", "burst: waiting on GitHub vs serial", "<= serial / 2"),
        ("burst_devlake", "burst: DevLake requests", ""),
        ("after", "pass after burst: GitHub / DevLake", "0 / 0"),
        ("wall", "benchmark wall time", ""),
    ]
    rows = [(label, cells[key], target) for key, label, target in labels]
    headers = [f"{result['apps']:,} apps" for result in results]
    width = max(len(label) for label, _, _ in rows)
    widths = [max(len(h), *(len(values[i]) for _, values, _ in rows)) for i, h in enumerate(headers)]
    lines = [
        f"dora-reconciler benchmark: state {options.state}, page size {options.page_size}, steady: median of "
        f"{options.repeat} alternating pairs of fresh processes, GitHub latency {latency_ms} ms in the burst and "
        f"the backfill, commits {options.commits}",
        "",
        "  ".join([" " * width, *(h.rjust(w) for h, w in zip(headers, widths, strict=True)), "target"]),
    ]
    for label, values, target in rows:
        lines.append(
            "  ".join([label.ljust(width), *(v.rjust(w) for v, w in zip(values, widths, strict=True)), target]).rstrip()
        )
    lines.append("")
    lines.append("all targets met" if passed else "SOME TARGETS MISSED")
    return "\n".join(lines), passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--apps", type=int, nargs="+", default=[1000, 5000], help="fleet sizes (default 1000 5000)")
    parser.add_argument("--large", action="store_true", help=f"add {LARGE_APPS:,} apps to the sizes")
    parser.add_argument("--state", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--repeat", type=int, default=7, help="steady pairs (floor, run) per size (median)")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument(
        "--latency-ms", type=float, default=50.0, help="GitHub latency per request in the burst and the backfill"
    )
    parser.add_argument("--sync-result-resources", type=int, default=20, help="resources the last sync reports (of 20)")
    parser.add_argument(
        "--backfill-apps",
        type=int,
        nargs="*",
        default=[5000],
        help="sizes at which a backfill is measured too (default 5000; none: no backfill)",
    )
    parser.add_argument("--logs", type=Path, help="where the processes' logs go (default: a temporary directory)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile the baseline, backfill and burst passes, and one extra steady run under -X importtime too "
        "(the passes' times then include the profiler's overhead); the .prof files and logs go to --logs",
    )
    parser.add_argument("--commits", choices=("head", "range"), default="head", help="devlake.commits (default head)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    sizes = list(dict.fromkeys([*args.apps, *([LARGE_APPS] if args.large else [])]))
    compileall.compile_dir(ROOT / "reconciler", quiet=1)
    with ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dora-bench-logs-")))
        logs.mkdir(parents=True, exist_ok=True)
        options = Options(
            state=args.state,
            repeat=max(1, args.repeat),
            page_size=args.page_size,
            latency=args.latency_ms / 1000,
            sync_result_resources=args.sync_result_resources,
            logs=logs,
            profile=args.profile,
            commits=args.commits,
            backfill_apps=tuple(args.backfill_apps),
        )
        redis_url: str | None = None
        if args.state == "redis":
            redis_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dora-bench-redis-"))
            try:
                redis_url = stack.enter_context(serving_redis(Path(redis_dir)))
            except RedisStartError as error:
                raise SystemExit(f"{error} (or use --state sqlite)") from None
        results = []
        for apps in sizes:
            print(f"measuring {apps:,} apps ...", file=sys.stderr, flush=True)
            results.append(measure(apps, options, redis_url))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    table, passed = report(results, options)
    print(table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
