"""One measured pass of a benchmark, in a process of its own: ``baseline``, ``backfill`` or ``burst``.

Run by ``benchmarks.tick`` (``python -m benchmarks.phase SPEC_JSON``); prints one JSON line with the figures.
The pass is the real one (``runtime.run_pass`` with the real Kubernetes, GitHub, DevLake and store clients);
only the far ends are fakes: the API server and DevLake in the server process, GitHub through ``responses``
(these passes need GitHub; the steady state, which must not, is measured as a whole ``dora-reconciler run``
process by ``benchmarks.tick``). Times are the pass's, from the first listing to the summary.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import logging
import pstats
import re
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import responses
from requests import PreparedRequest

from benchmarks.fleet import COMPONENT_LABEL, IMAGE_RULE, Fleet
from reconciler.config import Config, validate_config
from reconciler.devlake import DevLakeClient
from reconciler.github import GitHubClient
from reconciler.model import AppKey, Snapshot
from reconciler.run import RunOptions, RunSummary
from reconciler.runtime import Runtime, run_pass
from reconciler.store import BacklogItem, BacklogSlot, ChangeClaim, LockHolder, Store, StoredSnapshot, open_store
from tests.fakes.github import FakeGitHub, Reply

GITHUB_TOKEN_ENV = "BENCH_GITHUB_TOKEN"
DEVLAKE_KEY_ENV = "BENCH_DEVLAKE_KEY"
CLUSTER = "bench"


@dataclass(frozen=True)
class Spec:
    phase: str
    apps: int
    now: str
    kubeconfig: str
    devlake_url: str
    state_url: str
    key_prefix: str
    page_size: int
    repeat: int
    latency: float
    sync_result_resources: int
    github_token: str
    profile: str | None = None
    commits: str = "head"
    """``devlake.commits``: ``head`` or ``range``."""

    @classmethod
    def from_json(cls, text: str) -> Spec:
        return cls(**json.loads(text))


# -- counting wrappers ---------------------------------------------------------------------------------


class CountingStore:
    """A ``Store`` that counts what a tick asks of the backend."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.counts: Counter[str] = Counter()

    def ping(self) -> None:
        self.inner.ping()

    def close(self) -> None:
        self.inner.close()

    def load_snapshots(self, keys: Sequence[AppKey]) -> dict[AppKey, Snapshot]:
        self.counts["snapshot_reads"] += 1
        return self.inner.load_snapshots(keys)

    def load_stored(self, keys: Sequence[AppKey]) -> dict[AppKey, StoredSnapshot]:
        self.counts["snapshot_reads"] += 1
        return self.inner.load_stored(keys)

    def save_snapshots(self, snapshots: Mapping[AppKey, Snapshot]) -> None:
        self.counts["snapshot_writes"] += len(snapshots)
        self.inner.save_snapshots(snapshots)

    def delete_snapshots(self, keys: Sequence[AppKey]) -> None:
        self.counts["snapshot_deletes"] += len(keys)
        self.inner.delete_snapshots(keys)

    def snapshot_keys(self, cluster: str) -> list[AppKey]:
        return self.inner.snapshot_keys(cluster)

    def record_delivery(
        self,
        key: AppKey,
        snapshot: Snapshot,
        markers: Sequence[str],
        *,
        backlog: Sequence[BacklogItem] = (),
        delivered: Sequence[BacklogSlot] = (),
    ) -> None:
        self.counts["snapshot_writes"] += 1
        self.counts["deliveries_recorded"] += 1
        self.inner.record_delivery(key, snapshot, markers, backlog=backlog, delivered=delivered)

    def existing_markers(self, markers: Sequence[str]) -> set[str]:
        self.counts["marker_reads"] += 1
        return self.inner.existing_markers(markers)

    def backlog(self, cluster: str | None = None) -> list[BacklogItem]:
        self.counts["backlog_reads"] += 1
        return self.inner.backlog(cluster)

    def settle_backlog(self, slot: BacklogSlot, markers: Sequence[str]) -> None:
        self.counts["backlog_writes"] += 1
        self.inner.settle_backlog(slot, markers)

    def claim_changes(self, claims: Sequence[ChangeClaim]) -> dict[str, str]:
        self.counts["claim_writes"] += 1
        return self.inner.claim_changes(claims)

    def initialized_at(self, cluster: str) -> datetime | None:
        return self.inner.initialized_at(cluster)

    def set_initialized_at(self, cluster: str, when: datetime) -> None:
        self.inner.set_initialized_at(cluster, when)

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        self.counts["cache_reads"] += 1
        return self.inner.cache_get(kind, keys)

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        self.counts["cache_writes"] += 1
        self.inner.cache_put(kind, items)

    def acquire_lock(self, name: str, owner: str, ttl_seconds: int) -> bool:
        return self.inner.acquire_lock(name, owner, ttl_seconds)

    def acquire_shared_lock(self, name: str, group: str, holder: str, ttl_seconds: int) -> bool:
        return self.inner.acquire_shared_lock(name, group, holder, ttl_seconds)

    def renew_shared_lock(self, name: str, holder: str, ttl_seconds: int) -> bool:
        return self.inner.renew_shared_lock(name, holder, ttl_seconds)

    def release_shared_lock(self, name: str, holder: str) -> None:
        self.inner.release_shared_lock(name, holder)

    def renew_lock(self, name: str, owner: str, ttl_seconds: int) -> bool:
        return self.inner.renew_lock(name, owner, ttl_seconds)

    def release_lock(self, name: str, owner: str) -> None:
        self.inner.release_lock(name, owner)

    def lock_holder(self, name: str) -> LockHolder | None:
        return self.inner.lock_holder(name)

    def add_dead_letter(self, entry: Mapping[str, Any]) -> None:
        self.counts["dead_letters"] += 1
        self.inner.add_dead_letter(entry)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return self.inner.dead_letters(limit)

    def add_run_summary(self, summary: Mapping[str, Any]) -> None:
        self.inner.add_run_summary(summary)

    def run_summaries(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.inner.run_summaries(limit)


class CountingSession(requests.Session):
    """Counts every HTTP request the DevLake client sends, retries included."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = 0
        self._lock = threading.Lock()

    def send(self, request: PreparedRequest, **kwargs: Any) -> requests.Response:
        with self._lock:
            self.sent += 1
        return super().send(request, **kwargs)


class SlowGitHub(FakeGitHub):
    """``FakeGitHub`` whose every answer takes ``latency`` seconds, concurrently (the sleep holds no lock)."""

    def __init__(self, rsps: responses.RequestsMock, *, latency: float, **kwargs: Any) -> None:
        self.latency = latency
        self.intervals: list[tuple[float, float]] = []
        """``(start, end)`` of every answer, ``time.perf_counter()``."""
        super().__init__(rsps, **kwargs)

    def _wrap(self, handler: Any) -> Any:
        inner: Callable[[PreparedRequest], Reply] = super()._wrap(handler)

        def callback(request: PreparedRequest) -> Reply:
            started = time.perf_counter()
            if self.latency > 0:
                time.sleep(self.latency)
            try:
                return inner(request)
            finally:
                self.intervals.append((started, time.perf_counter()))

        return callback

    def busy_seconds(self) -> float:
        """How long at least one request was in flight (the union of the intervals)."""
        total, end = 0.0, float("-inf")
        for start, stop in sorted(self.intervals):
            if stop <= end:
                continue
            total += stop - max(start, end)
            end = stop
        return total


# -- the phase -----------------------------------------------------------------------------------------


def config_data(spec: Spec, *, github_url: str | None = None) -> dict[str, Any]:
    """The benchmark's configuration: the same for the passes here and the ``dora-reconciler run`` processes."""
    github: dict[str, Any] = {"token_env": GITHUB_TOKEN_ENV, "max_rate_limit_wait": "0s", "timeout": "10s"}
    if github_url is not None:
        github["url"] = github_url
    return {
        "environment": "PRODUCTION",
        "clusters": [{"name": CLUSTER, "kubeconfig": spec.kubeconfig, "page_size": spec.page_size}],
        "applications": {"component": {"label": COMPONENT_LABEL}},
        "images": {"repositories": [IMAGE_RULE]},
        "github": github,
        "state": {"url": spec.state_url, "key_prefix": spec.key_prefix},
        "devlake": {
            "url": spec.devlake_url,
            "connections": [{"id": 1, "api_key_env": DEVLAKE_KEY_ENV}],
            "commits": spec.commits,
            "timeout": "10s",
            "retry_budget": "30s",
        },
    }


def build_config(spec: Spec) -> Config:
    return validate_config(config_data(spec))


class GCTimer:
    """Time the cyclic garbage collector spends, through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = 0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    def reset(self) -> None:
        self.seconds, self.collections = 0.0, 0


class Bench:
    def __init__(self, spec: Spec, rsps: responses.RequestsMock) -> None:
        self.spec = spec
        self.config = build_config(spec)
        self.fleet = Fleet(
            spec.apps, datetime.fromisoformat(spec.now), sync_result_resources=spec.sync_result_resources
        )
        self.github_fake = SlowGitHub(rsps, latency=spec.latency, token=spec.github_token)
        self.fleet.seed_github(self.github_fake)
        self.store = CountingStore(open_store(self.config.state))
        self.github = GitHubClient(self.config.github, self.store)
        self.session = CountingSession()
        self.devlake = DevLakeClient(self.config.devlake, session=self.session)
        self.runtime = Runtime(self.config, self.store, self.github, self.devlake)
        self.gc = GCTimer()

    def tick(self, profile: Path | None = None, options: RunOptions | None = None) -> dict[str, Any]:
        self.store.counts.clear()
        self.github_fake.calls.clear()
        self.github_fake.intervals.clear()
        sent_before = self.session.sent
        profiler = cProfile.Profile() if profile else None
        self.gc.reset()
        cpu = time.process_time()
        started = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        summary = run_pass(self.runtime, options or RunOptions()).summary
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        if profiler is not None and profile is not None:
            profiler.dump_stats(profile)
            _print_profile(profiler)
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "gc_seconds": self.gc.seconds,
            "summary": _summary(summary),
            "store": dict(self.store.counts),
            "github_requests": self.github.requests,
            "github_busy_seconds": self.github_fake.busy_seconds(),
            "github_calls": dict(Counter(_kind(path) for _method, path, _params in self.github_fake.calls)),
            "devlake_requests": self.session.sent - sent_before,
        }


def run(spec: Spec) -> dict[str, Any]:
    result: dict[str, Any] = {"phase": spec.phase, "apps": spec.apps}
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_passthru(re.compile(r"https?://127\.0\.0\.1(:\d+)?/.*"))
        bench = Bench(spec, rsps)
        result["rss_setup_mb"] = _memory()["rss"]
        profile = Path(spec.profile) if spec.profile else None
        if spec.phase == "baseline":
            result["tick"] = bench.tick(profile)
        elif spec.phase == "backfill":
            result["history"] = bench.fleet.history_entries()
            result["tick"] = bench.tick(profile, RunOptions(backfill=True))
        elif spec.phase == "burst":
            compares, lookups = bench.fleet.burst_minimum(bench.config.devlake.include_gitops_commit)
            result["minimum"] = {"compare": compares, "commit": lookups}
            result["burst_apps"] = bench.fleet.burst_count()
            result["tick"] = bench.tick(profile)
            result["after"] = bench.tick()
        else:
            raise ValueError(f"unknown phase {spec.phase!r}")
        memory = _memory()
        result["rss_peak_mb"] = memory["hwm"]
        result["ru_maxrss_mb"] = memory["maxrss"]
        bench.devlake.close()
        bench.store.close()
    return result


def _summary(summary: RunSummary | None) -> dict[str, Any]:
    if summary is None:
        raise RuntimeError("the pass did not run: see the log above")
    keys = (
        "apps_listed",
        "apps_malformed",
        "deployments_success",
        "deployments_failed",
        "deployments_pending",
        "deployments_skipped",
        "deployments_deferred",
        "deployments_deduplicated",
        "sent",
        "retry_later",
        "dead_lettered",
        "errors",
        "exit_code",
    )
    data = summary.as_dict()
    return {key: data[key] for key in keys}


def _kind(path: str) -> str:
    if "/commits/" in path:
        return "commit"
    if "/compare/" in path:
        return "compare"
    return path.split("/")[1] if path.count("/") else path


def _memory() -> dict[str, float]:
    """``VmRSS`` and ``VmHWM`` (peak) from ``/proc/self/status``, and ``ru_maxrss``, in MB."""
    values = {"rss": 0.0, "hwm": 0.0}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values["rss" if name == "VmRSS" else "hwm"] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    values["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if not values["hwm"]:
        values["hwm"] = values["maxrss"]
    return values


def _print_profile(profiler: cProfile.Profile) -> None:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(40)
    print(out.getvalue(), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    spec = Spec.from_json(args[0])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    result = run(spec)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
