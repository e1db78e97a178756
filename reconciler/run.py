"""What a run is asked to do and what it reports: the types every layer shares, from the CLI down to the tick.

``RunOptions`` (with ``Shard``) says which Applications a pass works on; ``RunSummary`` is what it did, logged,
stored for ``status`` and turned into metrics. ``InvalidRequest`` is raised for an argument that names nothing
configured or cannot be read; the command line maps it to exit code 2 and nothing else does. ``StopFlag`` is a
process's stop request as every client sees it: its waits between retries end at once (``Stopping``).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from reconciler.config import ClusterConfig, Config
from reconciler.model import AppKey


class InvalidRequest(ValueError):
    """An argument the command cannot use (``--shard``, ``--cluster``, ``--since``, ``NAMESPACE/NAME``).

    Nothing was done. Only this exits 2 once the config is valid: any other error inside a run is a failure
    to retry, not the operator's typo."""


class InvalidShard(InvalidRequest):
    pass


class UnknownCluster(InvalidRequest):
    pass


@dataclass(frozen=True)
class Shard:
    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``I/N`` with ``0 <= I < N``."""
        try:
            index_text, count_text = text.split("/", 1)
            index, count = int(index_text), int(count_text)
        except ValueError:
            raise InvalidShard(f"--shard expects I/N, got {text!r}") from None
        if count < 1 or not 0 <= index < count:
            raise InvalidShard(f"--shard expects 0 <= I < N, got {text!r}")
        return cls(index, count)

    def owns(self, key: AppKey) -> bool:
        digest = hashlib.sha256(f"{key.cluster}/{key.namespace}/{key.name}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class RunOptions:
    dry_run: bool = False
    clusters: tuple[str, ...] = ()
    """Only these clusters (``--cluster``); empty: every configured cluster."""
    shard: Shard | None = None
    backfill: bool = False
    since: datetime | None = None


def selected_clusters(config: Config, options: RunOptions) -> list[ClusterConfig]:
    """The clusters a run works on, in configuration order. Raises ``UnknownCluster`` for a name not configured."""
    if not options.clusters:
        return list(config.clusters)
    unknown = sorted(set(options.clusters) - {c.name for c in config.clusters})
    if unknown:
        raise UnknownCluster(f"unknown cluster(s): {', '.join(unknown)}")
    return [c for c in config.clusters if c.name in options.clusters]


MAX_ERROR_CAUSES = 20
"""Distinct causes a run summary lists in ``errors``; the rest are counted in one last entry."""
OTHER_CAUSES = "other causes (not listed: see the log)"


@dataclass(frozen=True)
class RunError:
    """Why some work of a run was left for the next one. Summaries group errors by ``(cause, status)``."""

    cause: str
    """What went wrong, without what differs between the deployments it hit (ids, attempt counts)."""
    status: int | None = None
    """The HTTP status behind it, when one answered."""
    example: str | None = None
    """One thing it hit (an Application, a deployment id): where to start looking."""


@dataclass
class ClusterProgress:
    """Where the listing of the cluster in hand is, for progress lines (never stored)."""

    cluster: str
    apps_read: int = 0
    apps_total: int | None = None
    """The Applications the cluster is expected to have: the API server's count of the listing, else the count
    the last complete listing of the cluster read; ``None`` when neither is known."""


@dataclass
class RunSummary:
    run_id: str
    command: str
    started_at: str
    finished_at: str = ""
    dry_run: bool = False
    apps_read: int = 0
    """Application objects read from Argo CD, before ``applications.include/exclude`` and ``--shard``."""
    apps_listed: int = 0
    apps_malformed: int = 0
    deployments_success: int = 0
    deployments_failed: int = 0
    deployments_pending: int = 0
    deployments_skipped: int = 0
    deployments_deferred: int = 0
    deployments_held_unreadable: int = 0
    """Of the deferred: held back because GitHub cannot read a repository they need (named in ``errors``)."""
    deployments_deduplicated: int = 0
    sent: int = 0
    would_send: int = 0
    """Dry run: the deliveries printed instead of sent (a dry run's summary has no ``sent``)."""
    retry_later: int = 0
    dead_lettered: int = 0
    backlogged: int = 0
    """Deliveries a connection refused for its configuration (key, id, URL) this run, kept in its backlog."""
    backlog_sent: int = 0
    """Deliveries sent from a connection's backlog this run."""
    backlog_waiting: int = 0
    """Deliveries still waiting in the backlogs of this run's Applications when it ended."""
    github_requests: int = 0
    rate_limit_remaining: int | None = None
    rate_limit_reset: str | None = None
    seconds: float = 0.0
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per cluster: ``apps_read``, ``apps_listed``, and ``listed`` (whether every Application was read)."""
    errors: list[dict[str, Any]] = field(default_factory=list)
    """One entry per cause: ``cause``, ``count``, and ``status`` and ``example`` when known; at most
    ``MAX_ERROR_CAUSES`` of them, then one entry counting the others."""
    exit_code: int = 0
    progress: ClusterProgress | None = field(default=None, compare=False)
    """The listing in hand (for progress lines); not part of the summary's record."""

    def add_error(self, error: RunError | str, count: int = 1) -> None:
        """Count ``error`` under its cause: one entry per ``(cause, status)``, bounded."""
        if isinstance(error, str):
            error = RunError(error)
        for known in self.errors:
            if known["cause"] == error.cause and known.get("status") == error.status:
                known["count"] += count
                return
        if len(self.errors) >= MAX_ERROR_CAUSES:
            last = self.errors[-1]
            if last["cause"] != OTHER_CAUSES:
                self.errors.append({"cause": OTHER_CAUSES, "count": 0})
                last = self.errors[-1]
            last["count"] += count
            return
        entry: dict[str, Any] = {"cause": error.cause, "count": count}
        if error.status is not None:
            entry["status"] = error.status
        if error.example is not None:
            entry["example"] = error.example
        self.errors.append(entry)

    def cluster(self, name: str) -> dict[str, Any]:
        """The per-cluster counts of ``name``, created on first use."""
        return self.clusters.setdefault(name, {"apps_read": 0, "apps_listed": 0, "listed": False})

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        del data["progress"]
        del data["would_send" if not self.dry_run else "sent"]
        return data


# -- stopping --------------------------------------------------------------------------------------------

STOPPING_REQUEST_TIMEOUT = 5.0
"""Seconds a request started after a stop was asked for may take, at most, whatever its client's timeout."""


class Stopping(Exception):
    """The process was asked to stop: a wait between retries was cut short. Clients turn it into their own
    "try again next run" failure, so what was in hand is retried by the next run and nothing is recorded."""


class StopFlag:
    """A process's stop request as its clients see it (``serve`` sets it on SIGTERM).

    :meth:`sleep` is the clients' wait between retries: it ends as soon as the flag is set and raises
    ``Stopping``, so no retry starts after a stop. :meth:`timeout` bounds the timeout of a request started
    after the stop to ``STOPPING_REQUEST_TIMEOUT``."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self.event = event or threading.Event()

    def set(self) -> None:
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def sleep(self, seconds: float) -> None:
        if self.event.wait(max(0.0, seconds)):
            raise Stopping(f"stopping: a wait of {seconds:.3g} s between retries was cut short")

    def timeout(self, seconds: float) -> float:
        return min(seconds, STOPPING_REQUEST_TIMEOUT) if self.event.is_set() else seconds
