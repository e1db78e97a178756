"""Domain types shared by every stage of a tick.

Everything here is immutable and free of I/O. Times are always timezone-aware UTC datetimes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

FULL_SHA = re.compile(r"[0-9a-f]{40}")
"""A full git commit SHA as GitHub and DevLake need it: 40 lowercase hex characters (use ``fullmatch``)."""
OWNER_REPO = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")
"""A GitHub ``owner/repo`` name (use ``fullmatch``)."""

SNAPSHOT_VERSION = 1
MAX_DEPLOYMENT_ID_LENGTH = 150
RECENT_ENTRIES_KEPT = 20


class Result(StrEnum):
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"

    @property
    def devlake(self) -> str:
        """DevLake spells a failure ``FAILURE``; DORA only recognises exactly these two values."""
        return "SUCCESS" if self is Result.SUCCESS else "FAILURE"


class DeploymentKind(StrEnum):
    HISTORY = "history"
    OPERATION = "operation"
    IMAGE = "image"


class DeploymentClass(StrEnum):
    INITIAL = "initial"
    NEW_REVISION = "new-revision"
    CONFIG_ONLY = "config-only"
    REDEPLOY = "redeploy"
    ROLLBACK = "rollback"
    FAILED_SYNC = "failed-sync"
    IMAGE_CHANGE = "image-change"


@dataclass(frozen=True, order=True)
class AppKey:
    cluster: str
    namespace: str
    name: str

    @property
    def qualified_name(self) -> str:
        """``namespace/name``, the form used by include/exclude globs and the CLI."""
        return f"{self.namespace}/{self.name}"

    def __str__(self) -> str:
        return f"{self.cluster}/{self.namespace}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> AppKey:
        cluster, namespace, name = text.split("/", 2)
        return cls(cluster, namespace, name)


@dataclass(frozen=True)
class ImageRef:
    """A fully parsed container image reference.

    ``registry`` is ``docker.io`` for Docker Hub short names and ``path`` then gets the ``library/``
    prefix for official images, so ``nginx:1.25`` is ``docker.io/library/nginx`` tag ``1.25``.
    """

    raw: str
    registry: str
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def repository(self) -> str:
        """``registry/path``, without tag or digest: what ``images.repositories`` rules match."""
        return f"{self.registry}/{self.path}"


@dataclass(frozen=True)
class SourceRef:
    """One Argo CD application source (``spec.source`` or an element of ``spec.sources``)."""

    repo_url: str
    path: str | None = None
    chart: str | None = None
    target_revision: str | None = None


@dataclass(frozen=True)
class HistoryEntry:
    """One ``status.history[]`` entry: a successful, recorded sync."""

    id: int
    revisions: tuple[str, ...]
    deployed_at: datetime
    started_at: datetime | None
    sources: tuple[SourceRef, ...]
    source_fingerprint: str
    """A stable hash of the entry's full ``source``/``sources`` JSON (Helm parameters, Kustomize images…)."""
    initiated_by: str | None = None


@dataclass(frozen=True)
class OperationState:
    """``status.operationState`` reduced to what the planner reads."""

    phase: str
    started_at: datetime
    finished_at: datetime | None
    message: str = ""
    retry_count: int = 0
    revisions: tuple[str, ...] = ()
    """``syncResult.revision(s)``, falling back to ``operation.sync.revision(s)``."""
    sources: tuple[SourceRef, ...] = ()
    images: tuple[str, ...] | None = None
    """``syncResult.resources[].images`` in manifest order; ``None`` when the controller does not report them."""
    dry_run: bool = False
    partial: bool = False
    """A selective (or self-heal) sync: Argo CD records no history entry for it."""

    @property
    def completed(self) -> bool:
        return self.phase in ("Succeeded", "Failed", "Error")

    @property
    def failed(self) -> bool:
        return self.phase in ("Failed", "Error")


@dataclass(frozen=True)
class AppObservation:
    """What one listing saw of one Application, with only the fields the job needs."""

    key: AppKey
    uid: str
    deleting: bool = False
    sync_status: str | None = None
    health_status: str | None = None
    health_transition_at: datetime | None = None
    reconciled_at: datetime | None = None
    history: tuple[HistoryEntry, ...] = ()
    """Sorted by id, oldest first."""
    operation: OperationState | None = None
    operation_in_flight: bool = False
    """The top-level ``operation`` field is present: a sync was requested or is running."""
    summary_images: tuple[str, ...] = ()
    sources: tuple[SourceRef, ...] = ()
    destination: str = ""
    project: str = ""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class PendingVerdict:
    """The newest history entry synced but its health has not settled yet."""

    history_id: int
    since: datetime


@dataclass(frozen=True)
class EntryRecord:
    """A history entry as the snapshot keeps it until its deployment is delivered, so that it can still be
    emitted once ``status.history`` no longer holds it (``revisionHistoryLimit``, a history reset, a new uid)."""

    uid: str
    """The Application (``metadata.uid``) the entry belongs to: part of its deployment id."""
    ref: str
    """Its deployment's ref (``h12``, or ``h0-1748941200`` after a history restart)."""
    id: int
    revisions: tuple[str, ...]
    deployed_at: datetime
    started_at: datetime | None
    sources: tuple[SourceRef, ...]
    source_fingerprint: str
    images: tuple[str, ...] = ()
    """What its sync applied, when it was known; empty: unknown."""

    def history_entry(self) -> HistoryEntry:
        return HistoryEntry(
            id=self.id,
            revisions=self.revisions,
            deployed_at=self.deployed_at,
            started_at=self.started_at,
            sources=self.sources,
            source_fingerprint=self.source_fingerprint,
        )

    def same_entry(self, entry: HistoryEntry) -> bool:
        """The same sync as ``entry``: ids repeat after a history restart, ``deployedAt`` with them does not."""
        return self.id == entry.id and self.deployed_at == entry.deployed_at

    def to_data(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "ref": self.ref,
            "id": self.id,
            "revisions": list(self.revisions),
            "deployed_at": format_time(self.deployed_at),
            "started_at": _format_optional(self.started_at),
            "sources": [
                {"repo_url": s.repo_url, "path": s.path, "chart": s.chart, "target_revision": s.target_revision}
                for s in self.sources
            ],
            "source_fingerprint": self.source_fingerprint,
            "images": list(self.images),
        }

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> EntryRecord:
        return cls(
            uid=str(data["uid"]),
            ref=str(data["ref"]),
            id=int(data["id"]),
            revisions=tuple(str(r) for r in data.get("revisions", [])),
            deployed_at=parse_time(data["deployed_at"]),
            started_at=_parse_optional(data.get("started_at")),
            sources=tuple(
                SourceRef(
                    repo_url=str(s["repo_url"]),
                    path=s.get("path"),
                    chart=s.get("chart"),
                    target_revision=s.get("target_revision"),
                )
                for s in data.get("sources", [])
            ),
            source_fingerprint=str(data["source_fingerprint"]),
            images=tuple(str(i) for i in data.get("images", [])),
        )


@dataclass(frozen=True)
class DecidedVerdict:
    """A history entry's verdict once decided, kept until its deployment is delivered: a re-plan (after a failed
    delivery, a crash, a held-back deployment) delivers it as decided, whatever the live status says by then."""

    entry: EntryRecord
    result: Result
    reason: str

    def to_data(self) -> dict[str, Any]:
        return {"entry": self.entry.to_data(), "result": self.result.value, "reason": self.reason}

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DecidedVerdict:
        entry = EntryRecord.from_data(data["entry"])
        return cls(entry=entry, result=Result(data["result"]), reason=str(data["reason"]))


@dataclass(frozen=True)
class Snapshot:
    """What the store remembers of one Application between ticks."""

    uid: str
    last_seen: datetime
    last_history_id: int | None = None
    recent: tuple[tuple[tuple[str, ...], str], ...] = ()
    """``(revisions, source_fingerprint)`` of the latest history entries, oldest first, for classification."""
    images: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Commit-tagged images of the last deployment: image repository -> tag."""
    commits: Mapping[str, str] = field(default_factory=dict, hash=False)
    """Last delivered head commit per GitHub repository (``owner/repo`` -> full SHA): the next compare's base."""
    last_failed_operation: str | None = None
    """``startedAt`` (RFC 3339) of the last failed operation already recorded."""
    last_deployment_started_at: datetime | None = None
    pending: PendingVerdict | None = None
    deleting_since: datetime | None = None
    settled_digest: str | None = None
    """Digest of what the planner read (``settled.settled_digest``) when the last tick left nothing to
    decide; the same digest next time means the Application did not change and need not be parsed."""
    covered_until: datetime | None = None
    """The newest ``deployedAt`` among the history entries recorded (delivered, or folded into a baseline): an
    entry deployed at or before it is not new, whatever its id or the uid say (history restarts, re-applied
    Applications). ``None`` in snapshots written before it existed."""
    history_restarts: int = 0
    """History id restarts detected under this uid. From the first one on, history refs carry the entry's
    ``deployedAt`` (``h0-1748941200``) so that they never repeat an id of the generation before."""
    pending_entry: EntryRecord | None = None
    """The entry ``pending`` waits for, kept so that it is still emitted if it leaves ``status.history``."""
    decided: tuple[DecidedVerdict, ...] = ()
    """Verdicts decided but not delivered yet, oldest entry first."""
    last_image_change: str | None = None
    """Ref of the last image-only deployment recorded: part of the next one's ref, so each occurrence of a
    change (A -> B -> A -> B) gets its own id."""
    rollout_since: datetime | None = None
    """Start of the oldest sync recorded whose rollout was never seen to end (decided as superseded, or
    recorded by a baseline of an unsettled app); ``None`` once a verdict came from the app's health."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": SNAPSHOT_VERSION,
                "settled_digest": self.settled_digest,
                "uid": self.uid,
                "last_seen": format_time(self.last_seen),
                "last_history_id": self.last_history_id,
                "recent": [[list(revisions), fingerprint] for revisions, fingerprint in self.recent],
                "images": dict(sorted(self.images.items())),
                "commits": dict(sorted(self.commits.items())),
                "last_failed_operation": self.last_failed_operation,
                "last_deployment_started_at": _format_optional(self.last_deployment_started_at),
                "pending": (
                    None
                    if self.pending is None
                    else {"history_id": self.pending.history_id, "since": format_time(self.pending.since)}
                ),
                "deleting_since": _format_optional(self.deleting_since),
                **self._additions(),
            },
            separators=(",", ":"),
        )

    def _additions(self) -> dict[str, Any]:
        """Fields added after version 1, written only when set: a snapshot that does not use them is stored
        byte for byte as version 1 wrote it, and a version-1 reader ignores keys it does not know."""
        data: dict[str, Any] = {}
        if self.covered_until is not None:
            data["covered_until"] = format_time(self.covered_until)
        if self.history_restarts:
            data["history_restarts"] = self.history_restarts
        if self.pending_entry is not None:
            data["pending_entry"] = self.pending_entry.to_data()
        if self.decided:
            data["decided"] = [verdict.to_data() for verdict in self.decided]
        if self.last_image_change is not None:
            data["last_image_change"] = self.last_image_change
        if self.rollout_since is not None:
            data["rollout_since"] = format_time(self.rollout_since)
        return data

    @classmethod
    def from_json(cls, text: str | bytes) -> Snapshot:
        data: dict[str, Any] = json.loads(text)
        version = data.get("version")
        if version != SNAPSHOT_VERSION:
            raise ValueError(f"unsupported snapshot version {version!r}")
        pending = data.get("pending")
        return cls(
            uid=str(data["uid"]),
            last_seen=parse_time(data["last_seen"]),
            last_history_id=data.get("last_history_id"),
            recent=tuple((tuple(revisions), str(fingerprint)) for revisions, fingerprint in data.get("recent", [])),
            images=dict(data.get("images", {})),
            commits=dict(data.get("commits", {})),
            last_failed_operation=data.get("last_failed_operation"),
            last_deployment_started_at=_parse_optional(data.get("last_deployment_started_at")),
            pending=(
                None
                if pending is None
                else PendingVerdict(history_id=int(pending["history_id"]), since=parse_time(pending["since"]))
            ),
            deleting_since=_parse_optional(data.get("deleting_since")),
            settled_digest=data.get("settled_digest"),
            covered_until=_parse_optional(data.get("covered_until")),
            history_restarts=int(data.get("history_restarts", 0)),
            pending_entry=(None if data.get("pending_entry") is None else EntryRecord.from_data(data["pending_entry"])),
            decided=tuple(DecidedVerdict.from_data(item) for item in data.get("decided", [])),
            last_image_change=data.get("last_image_change"),
            rollout_since=_parse_optional(data.get("rollout_since")),
        )

    def evolve(self, **changes: Any) -> Snapshot:
        return replace(self, **changes)


@dataclass(frozen=True)
class Deployment:
    """One real deployment decided by the planner, before its commits are resolved."""

    key: AppKey
    uid: str
    kind: DeploymentKind
    ref: str
    """The part of the id that names this deployment within its Application: ``h12``, ``op-1717000000``,
    ``img-1a2b3c4d5e6f``."""
    result: Result
    deployment_class: DeploymentClass
    started_at: datetime
    finished_at: datetime
    revisions: tuple[str, ...]
    sources: tuple[SourceRef, ...]
    snapshot_after: Snapshot
    """The snapshot to store once this deployment has been delivered everywhere."""
    images: tuple[str, ...] = ()
    """Raw image references this deployment applied; empty when unknown (older history entries)."""
    history_id: int | None = None
    message: str = ""

    @property
    def id(self) -> str:
        return deployment_id(self.key, self.uid, self.ref)


def deployment_id(key: AppKey, uid: str, ref: str) -> str:
    """Deterministic DevLake id, stable across runs and across loss of the state store.

    Over 150 characters the readable prefix is shortened and a hash of the full id keeps it unique.
    """
    full = f"argocd:{key.cluster}:{key.namespace}:{key.name}:{uid[:8]}:{ref}"
    if len(full) <= MAX_DEPLOYMENT_ID_LENGTH:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:16]
    tail = f":{uid[:8]}:{ref}:{digest}"
    return full[: MAX_DEPLOYMENT_ID_LENGTH - len(tail)] + tail


@dataclass(frozen=True)
class Commit:
    """A GitHub commit as DevLake needs it. Immutable, so it is cached forever by full SHA."""

    repo: str
    """``owner/repo``."""
    repo_url: str
    """Canonical ``https://HOST/owner/repo``: no ``.git``, no trailing slash, byte-identical forever."""
    sha: str
    message: str
    date: datetime | None
    """Author date, else committer date."""

    def to_json(self) -> str:
        return json.dumps(
            {
                "repo": self.repo,
                "repo_url": self.repo_url,
                "sha": self.sha,
                "message": self.message,
                "date": _format_optional(self.date),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Commit:
        data = json.loads(text)
        return cls(
            repo=data["repo"],
            repo_url=data["repo_url"],
            sha=data["sha"],
            message=data["message"],
            date=_parse_optional(data["date"]),
        )


@dataclass(frozen=True)
class EnrichedDeployment:
    """A deployment with its commits resolved: ready to be turned into a DevLake payload."""

    deployment: Deployment
    heads: tuple[Commit, ...]
    """One commit per repository: the deployed head of each image repository, then the GitOps commit."""
    history: tuple[Commit, ...]
    """Every commit since the previous deployment, per repository, heads included; oldest first."""
    deployed_commits: Mapping[str, str] = field(default_factory=dict, hash=False)
    """``owner/repo`` -> full SHA of the image heads, to become the snapshot's ``commits``."""
    rollback: bool = False
    """GitHub compare said ``behind`` for at least one image repository."""
    warnings: tuple[str, ...] = ()


def format_time(value: datetime) -> str:
    """RFC 3339 UTC with a ``Z``, whole seconds: accepted by DevLake and by Argo CD alike."""
    if value.tzinfo is None:
        raise ValueError("naive datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> datetime:
    """Parse an RFC 3339 timestamp (``Z`` or an offset) into an aware UTC datetime."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp without offset: {value!r}")
    return parsed.astimezone(UTC)


def _format_optional(value: datetime | None) -> str | None:
    return None if value is None else format_time(value)


def _parse_optional(value: str | None) -> datetime | None:
    return None if value is None else parse_time(value)
