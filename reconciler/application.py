"""Turn one raw Argo CD ``Application`` dict into an :class:`AppObservation`.

Only the fields the job needs are read, and they are copied into the model types so the raw dict can
be dropped right after parsing. Every field that is read is type-checked; anything unexpected raises
:class:`MalformedApplication` naming the field path, so one corrupt object never crashes a tick.

Conventions, following how Argo CD's own Go types decode JSON:

* ``null`` is the same as an absent field (Go leaves the zero value).
* An integer is an ``int`` and never a ``bool`` or a ``float`` (Go refuses ``3.0`` for an ``int64``).
* ``{"repoURL": ""}`` is the placeholder Argo CD serializes in ``source`` for multi-source apps; it
  is not a source.
* Values are otherwise kept as given: unknown phases and health values, ``HEAD`` revisions, very
  long strings and Unicode are not errors here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from reconciler.model import AppKey, AppObservation, HistoryEntry, OperationState, SourceRef, parse_time

__all__ = ["MalformedApplication", "UnreadableApplication", "parse_application", "source_fingerprint"]

_DESCRIBE_LIMIT = 40
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, check_circular=False)
"""What ``json.dumps(..., sort_keys=True, separators=(",", ":"))`` writes, a third faster: one encoder for every call,
and no cycle bookkeeping (a decoded API object has no cycles; a cyclic one still fails, with RecursionError)."""


class MalformedApplication(ValueError):
    """The Application cannot be read; ``reason`` names the field path and what was wrong."""

    def __init__(self, reason: str, *, app: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.app = app
        """``namespace/name`` when the metadata could be read, for the caller's log line."""


class UnreadableApplication(dict[str, Any]):
    """Stands in a page for an item that could not be decoded (e.g. nested deeper than the decoder can go).

    It holds only ``metadata.namespace`` and ``metadata.name`` when those could be read, so the item keeps its
    identity (shard, selection, not taken for deleted) while :func:`parse_application` reports ``reason``.
    """

    def __init__(self, reason: str, namespace: str | None = None, name: str | None = None) -> None:
        metadata = {key: value for key, value in (("namespace", namespace), ("name", name)) if value is not None}
        super().__init__({"metadata": metadata} if metadata else {})
        self.reason = reason


def parse_application(raw: Mapping[str, Any], cluster: str) -> AppObservation:
    """Read ``raw`` (one Application as the Kubernetes API returns it) seen on ``cluster``.

    Raises :class:`MalformedApplication` when a field the job reads is missing or of the wrong type, or when
    the object could not be decoded or walked at all (nested too deeply).
    A missing or ``null`` ``status`` is a never-reconciled Application, not an error.
    """
    if isinstance(raw, UnreadableApplication):
        metadata = raw.get("metadata") or {}
        known = "namespace" in metadata and "name" in metadata
        raise MalformedApplication(raw.reason, app=f"{metadata['namespace']}/{metadata['name']}" if known else None)
    if not isinstance(raw, Mapping):
        raise MalformedApplication(f"application: expected an object, got {_describe(raw)}")
    metadata = _mapping(raw, "metadata", "metadata")
    if metadata is None:
        raise MalformedApplication("metadata: missing")
    namespace = _identity(metadata, "namespace")
    name = _identity(metadata, "name")
    try:
        return _parse(raw, metadata, AppKey(cluster, namespace, name))
    except MalformedApplication as error:
        raise MalformedApplication(error.reason, app=f"{namespace}/{name}") from None
    except RecursionError:
        reason = "the object is nested too deeply to be read (a free-form field such as a Helm valuesObject?)"
        raise MalformedApplication(reason, app=f"{namespace}/{name}") from None


def application_key(raw: Any, cluster: str) -> AppKey | None:
    """The key of a raw Application without parsing the rest, checked as ``parse_application`` checks it;
    ``None`` when its metadata is unusable (then parsing reports why)."""
    try:
        metadata = raw["metadata"]
        return AppKey(cluster, _identity(metadata, "namespace"), _identity(metadata, "name"))
    except (MalformedApplication, KeyError, TypeError, AttributeError):
        return None


def source_fingerprint(source: Any, sources: Any) -> str:
    """A stable sha256 of a history entry's full ``source`` and ``sources`` JSON.

    Key order and whitespace do not matter; an absent field and ``null`` hash the same.
    """
    canonical = _CANONICAL.encode({"source": source, "sources": sources})
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _parse(raw: Mapping[str, Any], metadata: Mapping[str, Any], key: AppKey) -> AppObservation:
    uid = _identity(metadata, "uid")
    deletion = _time(metadata, "deletionTimestamp", "metadata.deletionTimestamp")
    labels = _labels(metadata)

    spec = _mapping(raw, "spec", "spec") or {}
    sources = _sources_of(spec, "spec")
    destination_raw = _mapping(spec, "destination", "spec.destination") or {}
    destination_name = _string(destination_raw, "name", "spec.destination.name")
    destination = destination_name or _string(destination_raw, "server", "spec.destination.server")
    project = _string(spec, "project", "spec.project")

    in_flight = _mapping(raw, "operation", "operation") is not None

    status = _mapping(raw, "status", "status")
    if status is None:
        return AppObservation(
            key=key,
            uid=uid,
            deleting=deletion is not None,
            operation_in_flight=in_flight,
            sources=sources,
            destination=destination,
            project=project,
            labels=labels,
        )

    sync = _mapping(status, "sync", "status.sync") or {}
    health = _mapping(status, "health", "status.health") or {}
    summary = _mapping(status, "summary", "status.summary") or {}
    summary_images = _string_list(summary, "images", "status.summary.images")

    return AppObservation(
        key=key,
        uid=uid,
        deleting=deletion is not None,
        sync_status=_optional_string(sync, "status", "status.sync.status"),
        health_status=_optional_string(health, "status", "status.health.status"),
        health_transition_at=_time(health, "lastTransitionTime", "status.health.lastTransitionTime"),
        reconciled_at=_time(status, "reconciledAt", "status.reconciledAt"),
        history=_history(status),
        operation=_operation_state(status),
        operation_in_flight=in_flight,
        summary_images=summary_images,
        sources=sources,
        destination=destination,
        project=project,
        labels=labels,
    )


# --- metadata ---------------------------------------------------------------------------------------------


def _identity(metadata: Mapping[str, Any], field: str) -> str:
    path = f"metadata.{field}"
    value = metadata.get(field)
    if value is None or value == "":
        raise MalformedApplication(f"{path}: missing or empty")
    if not isinstance(value, str):
        raise MalformedApplication(f"{path}: expected a string, got {_describe(value)}")
    _check_unicode(value, path)
    if field != "uid" and "/" in value:
        raise MalformedApplication(f"{path}: must not contain '/', got {_describe(value)}")
    return value


def _labels(metadata: Mapping[str, Any]) -> dict[str, str]:
    labels = _mapping(metadata, "labels", "metadata.labels")
    if labels is None:
        return {}
    copied: dict[str, str] = {}
    for label, value in labels.items():
        if not isinstance(label, str):
            raise MalformedApplication(f"metadata.labels: expected string keys, got {_describe(label)}")
        path = f"metadata.labels[{_describe(label)}]"
        if not isinstance(value, str):
            raise MalformedApplication(f"{path}: expected a string, got {_describe(value)}")
        _check_unicode(label, path)
        _check_unicode(value, path)
        copied[label] = value
    return copied


# --- sources ----------------------------------------------------------------------------------------------


def _sources_of(container: Mapping[str, Any], path: str) -> tuple[SourceRef, ...]:
    """``sources`` when non-empty, else ``source`` unless it is the ``{"repoURL": ""}`` placeholder."""
    single = _source(container, "source", f"{path}.source")
    plural = _source_list(container, "sources", f"{path}.sources")
    if plural:
        return plural
    if single is not None and single.repo_url:
        return (single,)
    return ()


def _source(container: Mapping[str, Any], field: str, path: str) -> SourceRef | None:
    source = _mapping(container, field, path)
    return None if source is None else _source_ref(source, path)


def _source_list(container: Mapping[str, Any], field: str, path: str) -> tuple[SourceRef, ...]:
    items = _list(container, field, path)
    refs: list[SourceRef] = []
    for index, item in enumerate(items):
        item_path = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            raise MalformedApplication(f"{item_path}: expected an object, got {_describe(item)}")
        refs.append(_source_ref(item, item_path))
    return tuple(refs)


def _source_ref(source: Mapping[str, Any], path: str) -> SourceRef:
    return SourceRef(
        repo_url=_string(source, "repoURL", f"{path}.repoURL"),
        path=_optional_string(source, "path", f"{path}.path"),
        chart=_optional_string(source, "chart", f"{path}.chart"),
        target_revision=_optional_string(source, "targetRevision", f"{path}.targetRevision"),
    )


def _revisions(container: Mapping[str, Any], path: str) -> tuple[str, ...]:
    """``revisions`` when non-empty, else ``(revision,)``, else ``()``: Argo CD's ``GetRevisions``.

    An empty ``revision`` gives ``()`` rather than ``("",)``: nothing was resolved.
    """
    single = _string(container, "revision", f"{path}.revision")
    plural = _string_list(container, "revisions", f"{path}.revisions")
    if plural:
        return plural
    return (single,) if single else ()


# --- history ----------------------------------------------------------------------------------------------


def _history(status: Mapping[str, Any]) -> tuple[HistoryEntry, ...]:
    items = _list(status, "history", "status.history")
    entries: list[HistoryEntry] = []
    seen: dict[int, int] = {}
    for index, item in enumerate(items):
        path = f"status.history[{index}]"
        if type(item) is not dict and not isinstance(item, Mapping):
            raise MalformedApplication(f"{path}: expected an object, got {_describe(item)}")
        entry = _history_entry(item, path)
        if entry.id in seen:
            raise MalformedApplication(
                f"{path}.id: duplicate history id {entry.id} (also status.history[{seen[entry.id]}])"
            )
        seen[entry.id] = index
        entries.append(entry)
    entries.sort(key=lambda entry: entry.id)
    return tuple(entries)


def _history_entry(item: Mapping[str, Any], path: str) -> HistoryEntry:
    entry_id = item.get("id")
    if entry_id is None:
        raise MalformedApplication(f"{path}.id: missing")
    if not _is_int(entry_id):
        raise MalformedApplication(f"{path}.id: expected an integer, got {_describe(entry_id)}")
    if entry_id < 0:
        raise MalformedApplication(f"{path}.id: must not be negative, got {_describe(entry_id)}")
    deployed_at = _time(item, "deployedAt", f"{path}.deployedAt")
    if deployed_at is None:
        raise MalformedApplication(f"{path}.deployedAt: missing")
    sources = _sources_of(item, path)
    raw_source, raw_sources = item.get("source"), item.get("sources")
    try:
        fingerprint = source_fingerprint(raw_source, raw_sources)
    except (TypeError, ValueError, RecursionError) as error:
        raise MalformedApplication(f"{path}.source: not plain JSON ({type(error).__name__})") from None
    return HistoryEntry(
        id=entry_id,
        revisions=_revisions(item, path),
        deployed_at=deployed_at,
        started_at=_time(item, "deployStartedAt", f"{path}.deployStartedAt"),
        sources=sources,
        source_fingerprint=fingerprint,
        initiated_by=_initiated_by(item, path),
    )


def _initiated_by(item: Mapping[str, Any], path: str) -> str | None:
    initiated = _mapping(item, "initiatedBy", f"{path}.initiatedBy")
    if initiated is None:
        return None
    username = _string(initiated, "username", f"{path}.initiatedBy.username")
    automated = _bool(initiated, "automated", f"{path}.initiatedBy.automated")
    if username:
        return username
    return "automated" if automated else None


# --- operation --------------------------------------------------------------------------------------------


def _operation_state(status: Mapping[str, Any]) -> OperationState | None:
    path = "status.operationState"
    state = _mapping(status, "operationState", path)
    if state is None:
        return None
    phase = state.get("phase")
    if phase is None:
        raise MalformedApplication(f"{path}.phase: missing")
    if not isinstance(phase, str):
        raise MalformedApplication(f"{path}.phase: expected a string, got {_describe(phase)}")
    started_at = _time(state, "startedAt", f"{path}.startedAt")
    if started_at is None:
        raise MalformedApplication(f"{path}.startedAt: missing")
    finished_at = _time(state, "finishedAt", f"{path}.finishedAt")
    message = _string(state, "message", f"{path}.message")
    retry_count = _int(state, "retryCount", f"{path}.retryCount")

    result = _mapping(state, "syncResult", f"{path}.syncResult") or {}
    result_revisions = _revisions(result, f"{path}.syncResult")
    result_sources = _sources_of(result, f"{path}.syncResult")
    images = _resource_images(result, f"{path}.syncResult.resources")

    operation = _mapping(state, "operation", f"{path}.operation") or {}
    requested = _mapping(operation, "sync", f"{path}.operation.sync") or {}
    requested_path = f"{path}.operation.sync"
    requested_revisions = _revisions(requested, requested_path)
    requested_sources = _sources_of(requested, requested_path)
    dry_run = _bool(requested, "dryRun", f"{requested_path}.dryRun")
    partial = bool(_list(requested, "resources", f"{requested_path}.resources"))

    return OperationState(
        phase=phase,
        started_at=started_at,
        finished_at=finished_at,
        message=message,
        retry_count=retry_count,
        revisions=result_revisions or requested_revisions,
        sources=result_sources or requested_sources,
        images=images,
        dry_run=dry_run,
        partial=partial,
    )


def _resource_images(result: Mapping[str, Any], path: str) -> tuple[str, ...] | None:
    """Images of every synced resource in manifest order; ``None`` when no resource reports them."""
    resources = _list(result, "resources", path)
    images: list[str] = []
    reported = False
    for index, resource in enumerate(resources):
        resource_path = f"{path}[{index}]"
        if type(resource) is not dict and not isinstance(resource, Mapping):
            raise MalformedApplication(f"{resource_path}: expected an object, got {_describe(resource)}")
        if resource.get("images") is None:
            continue
        reported = True
        images.extend(_string_list(resource, "images", f"{resource_path}.images"))
    return tuple(images) if reported else None


# --- typed field access -----------------------------------------------------------------------------------


def _mapping(container: Mapping[str, Any], field: str, path: str) -> Mapping[str, Any] | None:
    value = container.get(field)
    if value is None or type(value) is dict:
        return value
    if not isinstance(value, Mapping):
        raise MalformedApplication(f"{path}: expected an object, got {_describe(value)}")
    return value


def _list(container: Mapping[str, Any], field: str, path: str) -> list[Any] | tuple[Any, ...]:
    value = container.get(field)
    if value is None:
        return ()
    if type(value) is list:
        return value
    if not isinstance(value, list | tuple):
        raise MalformedApplication(f"{path}: expected a list, got {_describe(value)}")
    return value


def _optional_string(container: Mapping[str, Any], field: str, path: str) -> str | None:
    value = container.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedApplication(f"{path}: expected a string, got {_describe(value)}")
    if not value.isascii():
        _check_unicode(value, path)
    return value


def _string(container: Mapping[str, Any], field: str, path: str) -> str:
    return _optional_string(container, field, path) or ""


def _string_list(container: Mapping[str, Any], field: str, path: str) -> tuple[str, ...]:
    items = _list(container, field, path)
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise MalformedApplication(f"{path}[{index}]: expected a string, got {_describe(item)}")
        if not item.isascii():
            _check_unicode(item, f"{path}[{index}]")
    return tuple(items)


def _bool(container: Mapping[str, Any], field: str, path: str) -> bool:
    value = container.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise MalformedApplication(f"{path}: expected true or false, got {_describe(value)}")
    return value


def _int(container: Mapping[str, Any], field: str, path: str) -> int:
    value = container.get(field)
    if value is None:
        return 0
    if not _is_int(value):
        raise MalformedApplication(f"{path}: expected an integer, got {_describe(value)}")
    result: int = value
    return result


def _time(container: Mapping[str, Any], field: str, path: str) -> datetime | None:
    value = container.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MalformedApplication(f"{path}: expected an RFC 3339 timestamp string, got {_describe(value)}")
    try:
        return parse_time(value)
    except (ValueError, OverflowError):
        raise MalformedApplication(f"{path}: not an RFC 3339 timestamp: {_describe(value)}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_unicode(value: str, path: str) -> None:
    """Reject lone surrogates: they cannot be encoded, hashed into ids or sent anywhere."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedApplication(f"{path}: not valid Unicode (lone surrogate)") from None


def _describe(value: object) -> str:
    """A short, JSON-flavoured description of a bad value for an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = value if len(value) <= _DESCRIBE_LIMIT else value[:_DESCRIBE_LIMIT] + "..."
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return ascii(text)
        return repr(text)
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"
