"""What a run is asked to do and what it reports: the types every layer shares, from the CLI down to the tick.

``RunOptions`` (with ``Shard``) says which Applications a pass works on; ``RunSummary`` is what it did, logged,
stored for ``status`` and turned into metrics. ``InvalidRequest`` is raised for an argument that names nothing
configured or cannot be read; the command line maps it to exit code 2 and nothing else does.
"""

from __future__ import annotations

import hashlib
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


@dataclass
class RunSummary:
    run_id: str
    command: str
    started_at: str
    finished_at: str = ""
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
    retry_later: int = 0
    dead_lettered: int = 0
    github_requests: int = 0
    rate_limit_remaining: int | None = None
    rate_limit_reset: str | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    exit_code: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
