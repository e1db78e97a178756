"""The long-lived clients of one process (``Runtime``) and one pass with them (``run_pass``).

A pass is the same whichever command starts it (``run``, ``backfill``, each tick of ``serve``): lock the
selected clusters, reconcile them, record and log the summary, count it in the metrics, and end with an exit
code. ``commands.py`` (``run``/``backfill``) and ``scheduler.py`` (``serve``) both call ``run_pass``.
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

from reconciler import exitcodes
from reconciler.argocd import ApplicationLister, open_lister
from reconciler.config import ClusterConfig, Config
from reconciler.delivery import DeliveryMetrics
from reconciler.devlake import DevLakeClient
from reconciler.github import GitHubClient
from reconciler.model import format_time
from reconciler.reconcile import Reconciler
from reconciler.run import RunOptions, RunSummary, StopFlag, selected_clusters
from reconciler.store import LockHeld, RunLock, Store, StoreUnavailable, open_store

if TYPE_CHECKING:
    from reconciler.metrics import PrometheusMetrics

log = logging.getLogger("reconciler")

LOCK_TTL_SECONDS = 60
LOCK_RENEW_SECONDS = 20


@dataclass
class Runtime:
    """The long-lived clients of one process."""

    config: Config
    store: Store
    github: GitHubClient
    devlake: DevLakeClient
    stop: StopFlag = field(default_factory=StopFlag)
    """The process's stop request (``serve`` sets it on SIGTERM): waits between retries end at once when it is
    set, and requests started after it are bounded (``StopFlag``)."""
    sleep: Callable[[float], None] | None = None
    """How every client waits between retries (Kubernetes, GitHub, DevLake); ``None``: ``stop.sleep``. Tests pass
    a no-op."""

    @classmethod
    def open(
        cls,
        config: Config,
        *,
        sleep: Callable[[float], None] | None = None,
        stop: StopFlag | None = None,
        read_only: bool = False,
    ) -> Runtime:
        """Open the state store and build the clients. Raises ``StoreUnavailable`` (nothing is left open then).

        ``read_only`` (``--dry-run``): GitHub answers are cached for this process only, never in the store."""
        stop = stop or StopFlag()
        wait = sleep or stop.sleep
        store = open_store(config.state)
        try:
            cache = _ProcessCache(store) if read_only else store
            github = GitHubClient(config.github, cache, sleep=wait, bound_timeout=stop.timeout)
            devlake = DevLakeClient(config.devlake, sleep=wait, bound_timeout=stop.timeout)
        except BaseException:
            store.close()
            raise
        return cls(config, store, github, devlake, stop, sleep)

    def lister(self, cluster: ClusterConfig) -> ApplicationLister:
        return open_lister(cluster, sleep=self.sleep or self.stop.sleep)

    def reconciler(
        self,
        *,
        dry_run_output: TextIO | None = None,
        metrics: DeliveryMetrics | None = None,
        stop: threading.Event | None = None,
        progress: Callable[[RunSummary], None] | None = None,
    ) -> Reconciler:
        return Reconciler(
            self.config,
            self.store,
            self.github,
            self.devlake,
            lister_factory=self.lister,
            metrics=metrics,
            dry_run_output=dry_run_output,
            stop=stop or self.stop.event,
            progress=progress,
        )

    def close(self) -> None:
        self.devlake.close()
        self.store.close()


class _ProcessCache:
    """Reads the store's GitHub cache, keeps new entries in memory: a dry run changes no state."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._local: dict[tuple[str, str], str] = {}

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        found = {key: self._local[(kind, key)] for key in keys if (kind, key) in self._local}
        missing = [key for key in keys if key not in found]
        if missing:
            found.update(self._store.cache_get(kind, missing))
        return found

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        self._local.update({(kind, key): value for key, value in items.items()})


# -- progress and the summary line ------------------------------------------------------------------------


def log_summary(summary: RunSummary) -> None:
    """The last line of a run on stderr: what was listed, decided, sent and spent."""
    level = logging.INFO if summary.exit_code == 0 else logging.WARNING
    log.log(level, "run finished", extra={"summary": summary.as_dict()})


class ProgressReporter:
    """A progress line on a terminal (long backfills, first runs over thousands of apps), log lines otherwise.

    Called by the reconciler with the run's summary so far; :meth:`close` ends the terminal line, so the
    run's last log line does not land on it.
    """

    def __init__(self, stream: TextIO, *, interactive: bool | None = None) -> None:
        self.stream = stream
        self.interactive = stream.isatty() if interactive is None else interactive
        self._line_open = False

    def __call__(self, summary: RunSummary) -> None:
        done = summary.deployments_success + summary.deployments_failed
        progress = summary.progress
        apps = str(summary.apps_read) if progress is None else str(progress.apps_read)
        if progress is not None and progress.apps_total is not None:
            apps += f"/{max(progress.apps_total, progress.apps_read)}"
        sent_key, sent = ("would_send", summary.would_send) if summary.dry_run else ("sent", summary.sent)
        if self.interactive:
            where = f"{progress.cluster}: " if progress is not None else ""
            said = f"{sent} would be sent" if summary.dry_run else f"{sent} sent"
            self.stream.write(
                f"\r\x1b[K{where}apps {apps}, {done} deployments, {said}, {summary.deployments_deferred} deferred"
            )
            self.stream.flush()
            self._line_open = True
        else:
            fields: dict[str, object] = {"apps": apps}
            if progress is not None:
                fields = {"cluster": progress.cluster, **fields}
            log.info(
                "progress",
                extra={**fields, "deployments": done, sent_key: sent, "deferred": summary.deployments_deferred},
            )

    def close(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


def progress_reporter(stream: TextIO, *, interactive: bool | None = None) -> ProgressReporter:
    """``interactive``: None decides by ``stream.isatty()``."""
    return ProgressReporter(stream, interactive=interactive)


# -- one pass -------------------------------------------------------------------------------------------


class RunLocks:
    """The run locks of one pass; ``lost`` once any renewal found one gone or taken."""

    def __init__(self, locks: Sequence[RunLock] = ()) -> None:
        self.locks = list(locks)

    def lost(self) -> bool:
        return any(lock.lost for lock in self.locks)


@contextmanager
def run_locks(store: Store, clusters: Sequence[ClusterConfig], options: RunOptions, owner: str) -> Iterator[RunLocks]:
    """Hold, for each cluster, this run's lock and a place in its shard layout's lock. Raises ``LockHeld``.

    The run lock (per cluster and shard) comes first: a run that finds it taken stops before it touches the layout
    lock. The layout lock is shared by the runs of one shard layout, each holding it under its own token, and
    keeps runs of another layout out (a manual unsharded run never works the same Applications as a sharded one).
    Leaving releases only this run's own holds; another layout gets in once the last holder has left.
    """
    shard = options.shard
    suffix = f":{shard.index}of{shard.count}" if shard else ""
    owner = run_lock_owner(owner)
    shards = shard.count if shard else 1
    held = RunLocks()
    with ExitStack() as stack:
        for cluster in sorted(clusters, key=lambda c: c.name):
            own = RunLock(
                store,
                f"run:{cluster.name}{suffix}",
                owner=owner,
                ttl_seconds=LOCK_TTL_SECONDS,
                renew_every=LOCK_RENEW_SECONDS,
            )
            held.locks.append(stack.enter_context(own))
            layout = RunLock(
                store,
                f"layout:{cluster.name}",
                owner=owner,
                ttl_seconds=LOCK_TTL_SECONDS,
                renew_every=LOCK_RENEW_SECONDS,
                group=f"layout-{shards}",
            )
            held.locks.append(stack.enter_context(layout))
        yield held


def run_lock_owner(run_id: str) -> str:
    """What a run's lock holds: ``RUN_ID@HOST`` (in a pod, the host name is the pod's), so that a run finding it
    held can say who holds it."""
    return f"{run_id}@{socket.gethostname()}"


def describe_lock_holder(store: Store, error: LockHeld) -> str:
    """``lock NAME is held by …, until …``: who holds the lock and when it expires unless renewed."""
    try:
        holder = store.lock_holder(error.name)
    except StoreUnavailable:
        holder = None
    if holder is None:
        return f"{error} (it was released or expired just now: the next run takes it)"
    owner = holder.owner
    if owner.startswith("layout-") and owner[len("layout-") :].isdigit():
        shards = int(owner[len("layout-") :])
        who = "an unsharded run" if shards == 1 else f"the shards of a {shards}-shard layout (--shard I/{shards})"
    else:
        who = _describe_run(owner)
    until = ""
    if holder.expires_at is not None:
        left = max(0, round((holder.expires_at - datetime.now(UTC)).total_seconds()))
        until = f" until {format_time(holder.expires_at)} (in {left} s, unless renewed while it runs)"
    holders = f"; held now by {', '.join(_describe_run(token) for token in holder.holders)}" if holder.holders else ""
    return f"lock {error.name!r} is held by {who}{until}{holders}"


def _describe_run(token: str) -> str:
    """``run RUN_ID on HOST`` for a ``RUN_ID@HOST`` lock token; any other token as it is."""
    if "@" in token:
        run_id, host = token.split("@", 1)
        return f"run {run_id} on {host}"
    return token


def store_unavailable_at_start(error: StoreUnavailable) -> None:
    log.error(
        "state store unavailable at start: nothing was listed or sent; the next run retries",
        extra={"reason": str(error)},
    )


@dataclass(frozen=True)
class PassResult:
    exit_code: int
    summary: RunSummary | None = None
    """``None`` when the pass stopped before reconciling anything (state store down, lock held)."""


def run_pass(
    runtime: Runtime,
    options: RunOptions,
    *,
    command: str = "run",
    metrics: PrometheusMetrics | None = None,
    stop: threading.Event | None = None,
    progress: Callable[[RunSummary], None] | None = None,
    dry_run_output: TextIO | None = None,
    publish: Callable[[], object] | None = None,
    on_store_reached: Callable[[Store], object] | None = None,
) -> PassResult:
    """One pass: lock, reconcile, record the summary, count it in ``metrics`` and ``publish`` them (``run``
    pushes them to a Pushgateway), then log the summary line. Never raises for what a pass can meet (the state
    store down, another run holding the lock): those end it with exit code 1 or 3.

    Raises ``UnknownCluster`` (nothing was done) for a ``--cluster`` not configured. A ``ProgressReporter``
    passed as ``progress`` is closed before the summary line; ``on_store_reached`` is called once the state
    store answered (``run`` warns there when Redis may evict the state)."""

    def finished(code: int, summary: RunSummary | None = None) -> PassResult:
        if metrics is not None:
            if summary is None:
                metrics.run_aborted(code)
            else:
                metrics.run_finished(summary)
        if publish is not None:
            publish()
        return PassResult(code, summary)

    store = runtime.store
    try:
        store.ping()
    except StoreUnavailable as error:
        store_unavailable_at_start(error)
        return finished(exitcodes.RETRY)
    if on_store_reached is not None:
        on_store_reached(store)
    clusters = selected_clusters(runtime.config, options)
    run_id = uuid.uuid4().hex[:12]
    reconciler = runtime.reconciler(dry_run_output=dry_run_output, metrics=metrics, stop=stop, progress=progress)
    try:
        with run_locks(store, [] if options.dry_run else clusters, options, owner=run_id) as locks:
            summary = reconciler.run(options, command, run_id=run_id, lock_lost=locks.lost)
    except LockHeld as error:
        log.error("another run holds the lock; nothing was done", extra={"reason": describe_lock_holder(store, error)})
        return finished(exitcodes.LOCKED)
    except StoreUnavailable as error:
        log.error("state store unavailable; the run stopped", extra={"reason": str(error)})
        return finished(exitcodes.RETRY)
    finally:
        if isinstance(progress, ProgressReporter):
            progress.close()
    if not options.dry_run:
        try:
            store.add_run_summary(summary.as_dict())
        except StoreUnavailable as error:
            log.warning("could not record the run summary", extra={"reason": str(error)})
    result = finished(summary.exit_code, summary)
    log_summary(summary)
    return result
