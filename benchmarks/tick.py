"""Benchmark of a reconciliation tick: ``.venv/bin/python -m benchmarks.tick --apps 1000 5000``.

For each fleet size N, a fake Kubernetes API server (and a fake DevLake) is started in a process of its own,
serving N realistic Applications (``benchmarks.fleet``). Then, each in a fresh process running the real
``Reconciler``:

1. ``baseline``: the first tick for the cluster (every Application recorded, nothing sent);
2. ``steady``: nothing changed. ``--repeat`` times: the floor (the same ``kubernetes`` client listing the same
   Applications with the same page size, ``ClusterLister.pages()`` consumed and nothing else), then a tick;
   medians of both, the GitHub and DevLake requests and the snapshot writes of each tick, the peak RSS;
3. ``burst``: 10 % of the apps deploy a new image (20 image repositories, apps of one component share one),
   GitHub answering every request after ``--latency-ms``: the GitHub requests against the minimum with a cold
   cache (one compare per distinct repo/previous/new SHA, one commit lookup per new SHA no compare returns: here
   none, as a deployment of a new image carries no GitOps commit by default), the tick time and how long at
   least one GitHub request was in flight (against requests x latency, what sending them one by one would
   cost); then one more tick, which must be quiet again.
   ``--commits range`` runs every phase with ``devlake.commits: range`` (default ``head``).

State in Redis (``$REDIS_URL``, else a throwaway ``redis-server`` on a free port) or ``--state sqlite``. Prints a
table; exit status 0 when every target is met, 1 otherwise. Both sizes take a minute and a half on 2 cores.
Timings on a shared machine are noisy: the table also gives the ratio of the fastest runs and of CPU times.
"""

from __future__ import annotations

import argparse
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

from benchmarks.phase import DEVLAKE_KEY_ENV, GITHUB_TOKEN_ENV, Spec
from tests.redis_server import RedisStartError, serving_redis

ROOT = Path(__file__).resolve().parent.parent
GITHUB_TOKEN = "ghp_benchSECRETtoken0123456789abcdefghijklm"
DEVLAKE_KEY = "devlake-bench-key-" + "b" * 40
PHASE_TIMEOUT_SECONDS = 600
RATIO_TARGET = 1.25
RSS_TARGET_MB = 150.0
RSS_TARGET_APPS = 5000


# -- processes -----------------------------------------------------------------------------------------


def _drop_keys(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])
    finally:
        client.close()


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


def run_phase(spec: Spec, log_path: Path) -> dict[str, Any]:
    env = {**os.environ, GITHUB_TOKEN_ENV: GITHUB_TOKEN, DEVLAKE_KEY_ENV: DEVLAKE_KEY, "PYTHONHASHSEED": "0"}
    env.pop("KUBECONFIG", None)
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
                for phase in ("baseline", "steady", "burst"):
                    if phase == "burst":
                        server.command("burst")
                    before = server.command("stats")
                    profile = str(options.logs / f"{phase}-{apps}.prof") if options.profile else None
                    phase_spec = replace(
                        spec, phase=phase, latency=options.latency if phase == "burst" else 0.0, profile=profile
                    )
                    results[phase] = run_phase(phase_spec, options.logs / f"{phase}-{apps}.log")
                    after = server.command("stats")
                    results[phase]["server_devlake_requests"] = after["devlake_requests"] - before["devlake_requests"]
                    results[phase]["server_kube_lists"] = after["kube_lists"] - before["kube_lists"]
            finally:
                server.close()
                if options.state == "redis" and redis_url is not None:
                    _drop_keys(redis_url, prefix)
        results["seconds"] = time.monotonic() - started
        return results


# -- report --------------------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(results: Sequence[dict[str, Any]], options: Options) -> tuple[str, bool]:
    rows: list[tuple[str, list[str], str]] = []
    passed = True

    def row(label: str, values: list[str], target: str = "") -> None:
        rows.append((label, values, target))

    def check(ok: bool) -> str:
        nonlocal passed
        passed = passed and ok
        return _mark(ok)

    cells: dict[str, list[str]] = {}

    def cell(key: str, value: str) -> None:
        cells.setdefault(key, []).append(value)

    for result in results:
        steady, baseline, burst = result["steady"], result["baseline"], result["burst"]
        ratio = steady["tick_median"] / steady["floor"]
        github_steady = sum(t["github_requests"] for t in steady["ticks"])
        devlake_steady = sum(t["devlake_requests"] for t in steady["ticks"]) + steady["server_devlake_requests"]
        writes_steady = sum(t["store"].get("snapshot_writes", 0) for t in steady["ticks"])
        tick = burst["tick"]
        minimum = burst["minimum"]["compare"] + burst["minimum"]["commit"]
        calls = tick["github_calls"]
        other = sum(count for kind, count in calls.items() if kind not in ("compare", "commit"))
        serial = tick["github_requests"] * options.latency
        after = burst["after"]
        rss_ok = result["apps"] < RSS_TARGET_APPS or steady["rss_peak_mb"] <= RSS_TARGET_MB
        cell("size", f"{result['server']['bytes'] / result['server']['apps'] / 1024:.1f} KB")
        cell("tick", f"{steady['tick_median']:.3f} s")
        cell("floor", f"{steady['floor']:.3f} s")
        best = min(t["seconds"] for t in steady["ticks"]) / min(f["seconds"] for f in steady["floors"])
        cell("ratio", f"{ratio:.2f} {check(ratio <= RATIO_TARGET)}")
        cell("ratio_min", f"{best:.2f}")
        cpu_tick = statistics.median(t["cpu_seconds"] for t in steady["ticks"])
        cpu_floor = statistics.median(f["cpu_seconds"] for f in steady["floors"])
        gc_share = statistics.median(t["gc_seconds"] / t["seconds"] for t in steady["ticks"])
        cell("ratio_cpu", f"{cpu_tick / cpu_floor:.2f}")
        cell("gc", f"{gc_share:.0%}")
        cell(
            "steady_requests", f"{github_steady} / {devlake_steady} {check(github_steady == 0 and devlake_steady == 0)}"
        )
        cell("steady_writes", f"{writes_steady} {check(writes_steady == 0)}")
        cell("rss_steady", f"{steady['rss_peak_mb']:.0f} MB {check(rss_ok)}")
        cell("rss_baseline", f"{baseline['rss_peak_mb']:.0f} MB")
        cell("rss_setup", f"{steady['rss_setup_mb']:.0f} MB")
        cell("baseline", f"{baseline['tick']['seconds']:.2f} s")
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
        cell("run", f"{result['seconds']:.0f} s")

    latency_ms = round(options.latency * 1000)
    labels = [
        ("size", "app JSON (average)", ""),
        ("tick", "steady tick, median", ""),
        ("floor", "list-only floor, median", ""),
        ("ratio", "steady tick / floor (medians)", f"<= {RATIO_TARGET}"),
        ("ratio_min", "steady tick / floor (fastest runs)", ""),
        ("ratio_cpu", "steady tick / floor (CPU time, medians)", ""),
        ("gc", "steady tick: share in the cyclic GC", ""),
        ("steady_requests", "steady GitHub / DevLake requests", "0 / 0"),
        ("steady_writes", "steady snapshot writes", "0"),
        ("rss_steady", "peak RSS, steady process", f"<= {RSS_TARGET_MB:.0f} MB at {RSS_TARGET_APPS:,}"),
        ("rss_baseline", "peak RSS, baseline process", ""),
        ("rss_setup", "RSS after imports and set-up", ""),
        ("baseline", "baseline tick", ""),
        ("burst_apps", "burst: apps deploying", ""),
        ("burst_github", "burst: GitHub requests", "= minimum"),
        ("burst_split", "burst: compare / commit / other", ""),
        ("burst_time", f"burst: tick, GitHub at {latency_ms} ms", ""),
        ("burst_busy", "burst: waiting on GitHub vs serial", "<= serial / 2"),
        ("burst_devlake", "burst: DevLake requests", ""),
        ("after", "tick after burst: GitHub / DevLake", "0 / 0"),
        ("run", "benchmark wall time", ""),
    ]
    for key, label, target in labels:
        row(label, cells[key], target)
    headers = [f"{result['apps']:,} apps" for result in results]
    width = max(len(label) for label, _, _ in rows)
    widths = [max(len(h), *(len(values[i]) for _, values, _ in rows)) for i, h in enumerate(headers)]
    lines = [
        f"dora-reconciler tick benchmark: state {options.state}, page size {options.page_size}, "
        f"median of {options.repeat} runs, GitHub latency {latency_ms} ms in the burst, commits {options.commits}",
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
    parser.add_argument("--state", choices=("redis", "sqlite"), default="redis")
    parser.add_argument("--repeat", type=int, default=5, help="steady ticks and floors per size (median)")
    parser.add_argument("--page-size", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=50.0, help="GitHub latency per request in the burst")
    parser.add_argument("--sync-result-resources", type=int, default=20, help="resources the last sync reports (of 20)")
    parser.add_argument("--logs", type=Path, help="where the processes' logs go (default: a temporary directory)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile one extra steady tick, and the baseline and burst ticks (their times then include the "
        "profiler's overhead); the .prof files and the top functions go to --logs",
    )
    parser.add_argument("--commits", choices=("head", "range"), default="head", help="devlake.commits (default head)")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
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
        )
        redis_url: str | None = None
        if args.state == "redis":
            redis_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="dora-bench-redis-"))
            try:
                redis_url = stack.enter_context(serving_redis(Path(redis_dir)))
            except RedisStartError as error:
                raise SystemExit(f"{error} (or use --state sqlite)") from None
        results = []
        for apps in args.apps:
            print(f"measuring {apps:,} apps ...", file=sys.stderr, flush=True)
            results.append(measure(apps, options, redis_url))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    table, passed = report(results, options)
    print(table)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
