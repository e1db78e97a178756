"""Durable state between ticks: Redis, or SQLite as the embedded default.

Both backends implement :class:`Store` and pass the same contract suite (``tests/test_store.py``).
Every failure to reach or use the backend surfaces as :class:`StoreUnavailable`, whose reason never
carries a password from the state URL.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.client import Pipeline
from redis.retry import Retry
from redis.typing import EncodableT

from reconciler.config import StateConfig
from reconciler.dedupe import Target
from reconciler.model import AppKey, Snapshot, parse_time
from reconciler.settled import stored_settled_digest

log = logging.getLogger(__name__)

VALUE_VERSION = 1
DEAD_LETTER_CAP = 1000
RUN_SUMMARY_CAP = 100
DEFAULT_SQLITE_PATH = Path(".dora-reconciler") / "state.db"
SOCKET_TIMEOUT_SECONDS = 5.0
CONNECTION_RETRIES = 3


class StoreUnavailable(Exception):
    """The state backend could not be reached or refused the operation."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class LockHeld(Exception):
    """Another run holds the lock."""

    def __init__(self, name: str) -> None:
        super().__init__(f"lock {name!r} is held by another run")
        self.name = name


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock, as stored with it, and when it expires unless renewed.

    A shared lock (the layout lock): ``owner`` is the group (``layout-N``), ``holders`` the token of each run
    holding it now (``RUN_ID@HOST``), and ``expires_at`` the latest of their expiries (the lock is free then)."""

    owner: str
    expires_at: datetime | None
    holders: tuple[str, ...] = ()


class Store(Protocol):
    def ping(self) -> None: ...
    def close(self) -> None: ...

    def load_snapshots(self, keys: Sequence[AppKey]) -> dict[AppKey, Snapshot]: ...
    def load_stored(self, keys: Sequence[AppKey]) -> dict[AppKey, StoredSnapshot]: ...
    def save_snapshots(self, snapshots: Mapping[AppKey, Snapshot]) -> None: ...
    def delete_snapshots(self, keys: Sequence[AppKey]) -> None: ...
    def snapshot_keys(self, cluster: str) -> list[AppKey]: ...

    def record_delivery(
        self,
        key: AppKey,
        snapshot: Snapshot,
        markers: Sequence[str],
        *,
        backlog: Sequence[BacklogItem] = (),
        delivered: Sequence[BacklogSlot] = (),
    ) -> None: ...
    def existing_markers(self, markers: Sequence[str]) -> set[str]: ...

    def backlog(self, cluster: str | None = None) -> list[BacklogItem]: ...
    def settle_backlog(self, slot: BacklogSlot, markers: Sequence[str]) -> None: ...
    def claim_changes(self, claims: Sequence[ChangeClaim]) -> dict[str, str]: ...

    def initialized_at(self, cluster: str) -> datetime | None: ...
    def set_initialized_at(self, cluster: str, when: datetime) -> None: ...

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]: ...
    def cache_put(self, kind: str, items: Mapping[str, str]) -> None: ...

    def acquire_lock(self, name: str, owner: str, ttl_seconds: int) -> bool: ...
    def renew_lock(self, name: str, owner: str, ttl_seconds: int) -> bool: ...
    def release_lock(self, name: str, owner: str) -> None: ...
    def acquire_shared_lock(self, name: str, group: str, holder: str, ttl_seconds: int) -> bool: ...
    def renew_shared_lock(self, name: str, holder: str, ttl_seconds: int) -> bool: ...
    def release_shared_lock(self, name: str, holder: str) -> None: ...
    def lock_holder(self, name: str) -> LockHolder | None: ...

    def add_dead_letter(self, entry: Mapping[str, Any]) -> None: ...
    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]: ...
    def add_run_summary(self, summary: Mapping[str, Any]) -> None: ...
    def run_summaries(self, limit: int = 20) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Eviction:
    """Redis's ``maxmemory-policy`` and ``maxmemory`` (0: no limit); ``None`` with ``unreadable`` when Redis would
    not say.

    Only ``allkeys-*`` policies can evict the state (snapshots, markers and the initialisation time carry no
    TTL): an evicted snapshot is a silent re-baseline — the deployments since the last run are never sent — and
    an evicted sent marker a duplicate. ``volatile-*`` policies evict keys with a TTL only, the run locks here:
    a run that loses its lock stops at its next renewal, and a full Redis refuses writes, which fails loudly.
    """

    policy: str | None
    maxmemory: int | None
    unreadable: str = ""

    @property
    def evicts_state(self) -> bool:
        """The state can be evicted now: an ``allkeys-*`` policy under a memory limit."""
        return self.policy is not None and self.policy.startswith("allkeys-") and bool(self.maxmemory)

    @property
    def problem(self) -> str | None:
        """Why this policy can lose state, or ``None`` when it cannot (as far as Redis said)."""
        if self.policy is None or not self.policy.startswith("allkeys-"):
            return None
        harm = (
            "an evicted snapshot is a silent re-baseline (the deployments since the last run are never sent) "
            "and an evicted sent marker a duplicate; set maxmemory-policy noeviction"
        )
        if self.evicts_state:
            when = f"with maxmemory {self.maxmemory} bytes evicts any key when full"
        else:
            when = "will evict any key once a maxmemory is set"
        return f"maxmemory-policy {self.policy} {when}: {harm}"

    def describe(self) -> str:
        if self.policy is None:
            return f"maxmemory-policy unknown ({self.unreadable}): make sure it is noeviction"
        limit = f", maxmemory {self.maxmemory} bytes" if self.maxmemory else ""
        return f"maxmemory-policy {self.policy}{limit}"


def state_eviction(store: Store) -> Eviction | None:
    """The eviction policy of a Redis store; ``None`` for SQLite, which evicts nothing."""
    return store.eviction() if isinstance(store, RedisStore) else None


def warn_if_state_can_be_evicted(store: Store) -> None:
    """At the start of ``run`` and ``serve``: a warning when Redis may evict the state. Never fails the run."""
    try:
        eviction = state_eviction(store)
    except StoreUnavailable as error:
        log.info("could not read Redis's maxmemory-policy", extra={"reason": str(error)})
        return
    if eviction is None:
        return
    if eviction.problem is not None:
        log.warning("Redis may evict the state", extra={"reason": eviction.problem})
    elif eviction.policy is None:
        log.info("could not read Redis's maxmemory-policy", extra={"reason": eviction.describe()})


def open_store(state: StateConfig) -> Store:
    """The backend named by ``state.url``: Redis for ``redis://``, ``rediss://``, ``unix://``, else SQLite.

    ``None`` is ``./.dora-reconciler/state.db``; ``sqlite:///relative.db`` is relative to the working
    directory and ``sqlite:////abs/path.db`` is absolute.
    """
    url = state.url
    if url is None:
        return SQLiteStore(DEFAULT_SQLITE_PATH, state.key_prefix)
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///").split("?", 1)[0]
        if not path:
            raise StoreUnavailable("the sqlite:/// state URL has no file path")
        return SQLiteStore(path, state.key_prefix)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, state.key_prefix)
    raise StoreUnavailable(f"unsupported state URL scheme {url.split(':', 1)[0]!r}")


# -- helpers shared by both backends -------------------------------------------------------------


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def _encode(data: Mapping[str, Any]) -> str:
    """A versioned JSON envelope for values the store owns (dead letters, run summaries)."""
    return json.dumps({"version": VALUE_VERSION, "data": dict(data)}, separators=(",", ":"), default=_json_default)


def _decode(text: str | bytes, what: str) -> dict[str, Any] | None:
    try:
        envelope = json.loads(text)
    except ValueError:
        log.warning("unreadable %s in the state store; ignored", what, extra={"reason": "invalid JSON"})
        return None
    if not isinstance(envelope, dict) or envelope.get("version") != VALUE_VERSION:
        log.warning("unsupported %s version in the state store; ignored", what, extra={"reason": "version"})
        return None
    data = envelope.get("data")
    return data if isinstance(data, dict) else None


def _dead_letter_target(entry: Mapping[str, Any]) -> str | None:
    """``connection:deployment id`` of a dead letter: a later delivery of that deployment to that connection takes
    it off the list, and a new refusal of it replaces it. An entry without both has none and stays until trimmed."""
    connection, deployment_id = entry.get("connection"), entry.get("deployment_id")
    if isinstance(connection, int) and not isinstance(connection, bool) and isinstance(deployment_id, str):
        return f"{connection}:{deployment_id}"
    return None


def _delivered_targets(markers: Sequence[str]) -> list[str]:
    """The dead-letter targets that ``sent`` markers record as delivered."""
    targets = (Target.delivered_by(marker) for marker in markers)
    return list(dict.fromkeys(f"{t.connection_id}:{t.deployment_id}" for t in targets if t is not None))


def _format_instant(when: datetime) -> str:
    """Full-precision ISO 8601 UTC (``format_time`` drops sub-seconds, which an instant must keep)."""
    if when.tzinfo is None:
        raise ValueError("naive datetime")
    return when.astimezone(UTC).isoformat()


def _marker_value() -> str:
    return json.dumps({"version": VALUE_VERSION, "at": _format_instant(datetime.now(UTC))}, separators=(",", ":"))


class StoredSnapshot:
    """A snapshot as stored: its settled digest is read at once, the rest only decoded when asked for."""

    __slots__ = ("_decoded", "key", "settled_digest", "text")

    def __init__(self, key: AppKey, text: str | bytes) -> None:
        self.key = key
        self.text = text.decode() if isinstance(text, bytes) else text
        self.settled_digest = stored_settled_digest(self.text)
        self._decoded: tuple[Snapshot | None] | None = None

    def snapshot(self) -> Snapshot | None:
        if self._decoded is None:
            self._decoded = (_parse_snapshot(self.text, self.key),)
        return self._decoded[0]


def _decoded(stored: Mapping[AppKey, StoredSnapshot]) -> dict[AppKey, Snapshot]:
    return {key: snapshot for key, item in stored.items() if (snapshot := item.snapshot()) is not None}


def _parse_snapshot(text: str | bytes, key: AppKey) -> Snapshot | None:
    """A corrupt or newer-version snapshot is treated as absent rather than failing the whole tick."""
    try:
        return Snapshot.from_json(text)
    except (ValueError, KeyError, TypeError) as error:
        log.warning(
            "ignoring unreadable snapshot", extra={"app": str(key), "cluster": key.cluster, "reason": str(error)}
        )
        return None


@dataclass(frozen=True)
class BacklogSlot:
    """Where one deployment waits for one connection: the cluster of its Application (the run that owns that
    Application retries it), the connection, the deployment id, and the marker that says it waits (read with the
    other delivery markers, so a run never sends it any other way)."""

    cluster: str
    connection: int
    deployment_id: str
    marker: str

    @property
    def field(self) -> str:
        return f"{self.connection}:{self.deployment_id}"


@dataclass(frozen=True)
class BacklogItem:
    """A deployment kept with its payload until its connection accepts it: the connection refused its key, id
    or URL (an operator's fix, which may take days while the entry leaves the Application's history), or this
    deployment claimed a change its component's other Applications then do not send."""

    slot: BacklogSlot
    app: AppKey
    payload: Mapping[str, Any]
    delivered_markers: tuple[str, ...]
    """Written, with the item removed, once DevLake accepts it (its sent marker, the change it claimed)."""
    since: datetime
    reason: str

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": VALUE_VERSION,
                "connection": self.slot.connection,
                "deployment_id": self.slot.deployment_id,
                "marker": self.slot.marker,
                "app": str(self.app),
                "payload": dict(self.payload),
                "delivered_markers": list(self.delivered_markers),
                "since": _format_instant(self.since),
                "reason": self.reason,
            },
            separators=(",", ":"),
            default=_json_default,
        )

    @classmethod
    def from_json(cls, cluster: str, text: str | bytes) -> BacklogItem | None:
        """``None`` (with a warning) for a value this version cannot read: it stays in the store untouched."""
        try:
            data = json.loads(text)
            if data.get("version") != VALUE_VERSION:
                raise ValueError(f"unsupported version {data.get('version')!r}")
            slot = BacklogSlot(cluster, int(data["connection"]), str(data["deployment_id"]), str(data["marker"]))
            return cls(
                slot=slot,
                app=AppKey.parse(str(data["app"])),
                payload=dict(data["payload"]),
                delivered_markers=tuple(str(marker) for marker in data["delivered_markers"]),
                since=parse_time(str(data["since"])),
                reason=str(data.get("reason", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            log.warning("unreadable backlog item ignored", extra={"cluster": cluster, "reason": str(error)})
            return None


@dataclass(frozen=True)
class ChangeClaim:
    """A deployment claiming the right to send a change to a connection (``key``: the change, per connection;
    ``aliases``: the other keys the same change is known by).

    The first claimer holds it for good; the claim and its backlog item (the payload) are written in one atomic
    step, so the change reaches DevLake even if its holder's Application is deleted or its run dies. Its keys are
    claimed together: if another deployment holds any of them, the claim is lost, and those of its keys nobody
    holds yet are given to that holder (the same change, whichever key a later claimer knows it by)."""

    key: str
    item: BacklogItem
    aliases: tuple[str, ...] = ()

    @property
    def holder(self) -> str:
        return self.item.slot.deployment_id

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.key, *self.aliases)))


def _backlog_order(items: Sequence[BacklogItem]) -> list[BacklogItem]:
    return sorted(items, key=lambda item: (item.since, item.slot.connection, item.slot.deployment_id))


def _claim_value(holder: str) -> str:
    return json.dumps(
        {"version": VALUE_VERSION, "holder": holder, "at": _format_instant(datetime.now(UTC))}, separators=(",", ":")
    )


def _claim_holder(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return text
    return str(data["holder"]) if isinstance(data, dict) and "holder" in data else text


def _check_ttl(ttl_seconds: int) -> None:
    if ttl_seconds < 1:
        raise ValueError("a lock ttl must be at least one second")


# -- Redis ---------------------------------------------------------------------------------------

_RENEW_SCRIPT = """
if redis.call('type', KEYS[1])['ok'] == 'string' and redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE_SCRIPT = """
if redis.call('type', KEYS[1])['ok'] == 'string' and redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""

_MEMBERS = """
local function now_ms()
    local t = redis.call('time')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function live_members(key, now)
    local fields = redis.call('hgetall', key)
    local live, latest = 0, 0
    for i = 1, #fields, 2 do
        local name = fields[i]
        if string.sub(name, 1, 7) == 'holder:' then
            local expires = tonumber(fields[i + 1])
            if expires <= now then
                redis.call('hdel', key, name)
            else
                live = live + 1
                if expires > latest then latest = expires end
            end
        end
    end
    return live, latest
end
"""

_SHARED_ACQUIRE_SCRIPT = (
    _MEMBERS
    + """
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'hash' then
    return 0
end
local now = now_ms()
if kind == 'hash' then
    local live = live_members(KEYS[1], now)
    if live > 0 and redis.call('hget', KEYS[1], 'group') ~= ARGV[1] then
        return 0
    end
end
redis.call('hset', KEYS[1], 'group', ARGV[1], 'holder:' .. ARGV[2], now + tonumber(ARGV[3]))
local _, latest = live_members(KEYS[1], now)
redis.call('pexpireat', KEYS[1], latest)
return 1
"""
)

_SHARED_RENEW_SCRIPT = (
    _MEMBERS
    + """
if redis.call('type', KEYS[1])['ok'] ~= 'hash' then
    return 0
end
local now = now_ms()
local expires = redis.call('hget', KEYS[1], 'holder:' .. ARGV[1])
if not expires or tonumber(expires) <= now then
    return 0
end
redis.call('hset', KEYS[1], 'holder:' .. ARGV[1], now + tonumber(ARGV[2]))
local _, latest = live_members(KEYS[1], now)
redis.call('pexpireat', KEYS[1], latest)
return 1
"""
)

_SHARED_RELEASE_SCRIPT = (
    _MEMBERS
    + """
if redis.call('type', KEYS[1])['ok'] ~= 'hash' then
    return 0
end
local removed = redis.call('hdel', KEYS[1], 'holder:' .. ARGV[1])
local live, latest = live_members(KEYS[1], now_ms())
if live == 0 then
    redis.call('del', KEYS[1])
else
    redis.call('pexpireat', KEYS[1], latest)
end
return removed
"""
)

_LOCK_HOLDER_SCRIPT = (
    _MEMBERS
    + """
local kind = redis.call('type', KEYS[1])['ok']
if kind == 'string' then
    return {'string', redis.call('get', KEYS[1]), redis.call('pttl', KEYS[1])}
end
if kind ~= 'hash' then
    return {}
end
local now = now_ms()
local reply = {'hash', redis.call('hget', KEYS[1], 'group') or '', 0}
local fields = redis.call('hgetall', KEYS[1])
local latest = 0
for i = 1, #fields, 2 do
    local name, expires = fields[i], tonumber(fields[i + 1])
    if string.sub(name, 1, 7) == 'holder:' and expires and expires > now then
        table.insert(reply, string.sub(name, 8))
        if expires > latest then latest = expires end
    end
end
if latest == 0 then
    return {}
end
reply[3] = latest - now
return reply
"""
)

_CLAIM_SCRIPT = """
-- KEYS[1]: the backlog hash; KEYS[2]: the queued marker; KEYS[3..]: the change's claim keys (its key, its aliases).
-- ARGV: the claim's value, the claimer, the backlog field, the backlog item, the marker's value.
local function holder_of(value)
    local ok, decoded = pcall(cjson.decode, value)
    if ok and type(decoded) == 'table' and decoded['holder'] then
        return decoded['holder']
    end
    return value
end
local value, holder = ARGV[1], ARGV[2]
for i = 3, #KEYS do
    local held = redis.call('get', KEYS[i])
    if held and holder_of(held) ~= ARGV[2] then
        value, holder = held, holder_of(held)
        break
    end
end
local holders = {}
for i = 3, #KEYS do
    local held = redis.call('get', KEYS[i])
    if not held then
        redis.call('set', KEYS[i], value)
        held = value
    end
    holders[#holders + 1] = holder_of(held)
end
if holder == ARGV[2] and redis.call('hsetnx', KEYS[1], ARGV[3], ARGV[4]) == 1 then
    redis.call('set', KEYS[2], ARGV[5])
end
return holders
"""


_DEAD_LETTER_TARGET_LUA = """
local function target_of(value)
    local ok, envelope = pcall(cjson.decode, value)
    if ok and type(envelope) == 'table' and type(envelope.data) == 'table' then
        local connection, deployment = envelope.data.connection, envelope.data.deployment_id
        if type(connection) == 'number' and type(deployment) == 'string' then
            return string.format('%d', connection) .. ':' .. deployment
        end
    end
    return nil
end
-- KEYS[1]: the dead-letter list (newest first); KEYS[2]: its index, target -> the entry in the list;
-- KEYS[3]: set once the index covers the list (entries written before the index existed are added once).
if redis.call('exists', KEYS[3]) == 0 then
    for _, value in ipairs(redis.call('lrange', KEYS[1], 0, -1)) do
        local target = target_of(value)
        if target and redis.call('hexists', KEYS[2], target) == 0 then
            redis.call('hset', KEYS[2], target, value)
        end
    end
    redis.call('set', KEYS[3], '{"version":1}')
end
"""

_ADD_DEAD_LETTER_SCRIPT = (
    _DEAD_LETTER_TARGET_LUA
    + """
-- ARGV[1]: the entry's target ('' for none); ARGV[2]: the entry; ARGV[3]: how many entries the list keeps.
if ARGV[1] ~= '' then
    local previous = redis.call('hget', KEYS[2], ARGV[1])
    if previous then
        redis.call('lrem', KEYS[1], 0, previous)
    end
    redis.call('hset', KEYS[2], ARGV[1], ARGV[2])
end
redis.call('lpush', KEYS[1], ARGV[2])
local cap = tonumber(ARGV[3])
local dropped = redis.call('lrange', KEYS[1], cap, -1)
if #dropped > 0 then
    redis.call('ltrim', KEYS[1], 0, cap - 1)
    for _, value in ipairs(dropped) do
        local target = target_of(value)
        if target and redis.call('hget', KEYS[2], target) == value then
            redis.call('hdel', KEYS[2], target)
        end
    end
end
return 1
"""
)

_CLEAR_DEAD_LETTERS_SCRIPT = (
    _DEAD_LETTER_TARGET_LUA
    + """
-- ARGV: the targets just delivered.
local removed = 0
for _, target in ipairs(ARGV) do
    local value = redis.call('hget', KEYS[2], target)
    if value then
        removed = removed + redis.call('lrem', KEYS[1], 0, value)
        redis.call('hdel', KEYS[2], target)
    end
end
return removed
"""
)


def _redact_url(url: str) -> tuple[str, list[str]]:
    """The URL with any password replaced by ``***``, and the secret strings to scrub from messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable state URL>", []
    secrets: list[str] = []
    netloc = parts.netloc
    if parts.password:
        secrets += [parts.password, unquote(parts.password)]
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    for value in parse_qs(query).get("password", []):
        secrets.append(value)
    if secrets:
        query = "&".join(
            "password=***" if pair.split("=", 1)[0] == "password" else pair for pair in query.split("&") if pair
        )
    redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return redacted, sorted({s for s in secrets if s}, key=len, reverse=True)


class RedisStore:
    """State in Redis. Snapshots live in one hash per cluster (``{prefix}:snap:{cluster}``, field
    ``namespace/name``) so a page of loads is one ``HMGET`` and listing a cluster is one ``HKEYS``."""

    def __init__(self, url: str, key_prefix: str, *, retries: int = CONNECTION_RETRIES) -> None:
        self.key_prefix = key_prefix
        self._safe_url, self._secrets = _redact_url(url)
        # TCP keepalive is a TCP socket option: the unix-socket connection refuses the argument (redis-py 8).
        tcp: dict[str, Any] = {} if url.startswith("unix://") else {"socket_keepalive": True}
        try:
            self.client: redis.Redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_timeout=SOCKET_TIMEOUT_SECONDS,
                socket_connect_timeout=SOCKET_TIMEOUT_SECONDS,
                health_check_interval=30,
                retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), retries),
                client_name="dora-reconciler",
                **tcp,
            )
        except ValueError as error:
            raise StoreUnavailable(f"invalid Redis URL {self._safe_url}: {self._scrub(str(error))}") from None
        self._renew = self.client.register_script(_RENEW_SCRIPT)
        self._release = self.client.register_script(_RELEASE_SCRIPT)
        self._shared_acquire = self.client.register_script(_SHARED_ACQUIRE_SCRIPT)
        self._shared_renew = self.client.register_script(_SHARED_RENEW_SCRIPT)
        self._shared_release = self.client.register_script(_SHARED_RELEASE_SCRIPT)
        self._claim = self.client.register_script(_CLAIM_SCRIPT)
        self._lock_holder = self.client.register_script(_LOCK_HOLDER_SCRIPT)
        self._add_dead_letter = self.client.register_script(_ADD_DEAD_LETTER_SCRIPT)

    def __repr__(self) -> str:
        return f"RedisStore({self._safe_url!r}, key_prefix={self.key_prefix!r})"

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    @contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as error:
            reason = f"Redis at {self._safe_url} unreachable ({action}): {self._scrub(str(error))}"
            raise StoreUnavailable(reason) from None
        except redis.RedisError as error:
            reason = f"Redis at {self._safe_url} failed ({action}): {self._scrub(str(error))}"
            raise StoreUnavailable(reason) from None

    def _key(self, *parts: str) -> str:
        return ":".join((self.key_prefix, *parts))

    def _snap_key(self, cluster: str) -> str:
        return self._key("snap", cluster)

    def _mark_key(self, marker: str) -> str:
        return self._key("mark", marker)

    def _lock_key(self, name: str) -> str:
        return self._key("lock", name)

    @staticmethod
    def _lock_value(owner: str) -> str:
        return json.dumps({"version": VALUE_VERSION, "owner": owner}, separators=(",", ":"))

    def ping(self) -> None:
        with self._guard("ping"):
            self.client.ping()

    def eviction(self) -> Eviction:
        """What Redis does when its memory is full, from ``INFO memory`` or else ``CONFIG GET`` (managed services
        often refuse one or both: then the policy is unknown). Raises ``StoreUnavailable`` if Redis is not reached."""
        refusals: list[str] = []
        with self._guard("read maxmemory-policy"):
            try:
                info = self.client.info("memory")
                if "maxmemory_policy" in info:
                    return Eviction(str(info["maxmemory_policy"]), int(info.get("maxmemory") or 0))
                refusals.append("INFO memory has no maxmemory_policy")
            except redis.ResponseError as error:
                refusals.append(f"INFO refused: {self._scrub(str(error))}")
            try:
                values = self.client.config_get("maxmemory*")
                if "maxmemory-policy" in values:
                    return Eviction(str(values["maxmemory-policy"]), int(values.get("maxmemory") or 0))
                refusals.append("CONFIG GET returned no maxmemory-policy")
            except redis.ResponseError as error:
                refusals.append(f"CONFIG GET refused: {self._scrub(str(error))}")
        return Eviction(None, None, "; ".join(refusals))

    def close(self) -> None:
        with suppress(redis.RedisError):
            self.client.close()

    # snapshots

    def load_snapshots(self, keys: Sequence[AppKey]) -> dict[AppKey, Snapshot]:
        return _decoded(self.load_stored(keys))

    def load_stored(self, keys: Sequence[AppKey]) -> dict[AppKey, StoredSnapshot]:
        by_cluster: dict[str, list[AppKey]] = defaultdict(list)
        for key in dict.fromkeys(keys):
            by_cluster[key.cluster].append(key)
        if not by_cluster:
            return {}
        groups = list(by_cluster.items())
        with self._guard("load snapshots"), self.client.pipeline(transaction=False) as pipe:
            for cluster, members in groups:
                pipe.hmget(self._snap_key(cluster), [key.qualified_name for key in members])
            replies: list[list[str | None]] = pipe.execute()
        found: dict[AppKey, StoredSnapshot] = {}
        for (_, members), values in zip(groups, replies, strict=True):
            for key, text in zip(members, values, strict=True):
                if text is not None:
                    found[key] = StoredSnapshot(key, text)
        return found

    def save_snapshots(self, snapshots: Mapping[AppKey, Snapshot]) -> None:
        if not snapshots:
            return
        by_cluster: dict[str, dict[EncodableT, EncodableT]] = defaultdict(dict)
        for key, snapshot in snapshots.items():
            by_cluster[key.cluster][key.qualified_name] = snapshot.to_json()
        with self._guard("save snapshots"), self.client.pipeline(transaction=True) as pipe:
            for cluster, fields in by_cluster.items():
                pipe.hset(self._snap_key(cluster), mapping=fields)
            pipe.execute()

    def delete_snapshots(self, keys: Sequence[AppKey]) -> None:
        if not keys:
            return
        by_cluster: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_cluster[key.cluster].append(key.qualified_name)
        with self._guard("delete snapshots"), self.client.pipeline(transaction=True) as pipe:
            for cluster, fields in by_cluster.items():
                pipe.hdel(self._snap_key(cluster), *fields)
            pipe.execute()

    def snapshot_keys(self, cluster: str) -> list[AppKey]:
        with self._guard("list snapshots"):
            fields = self.client.hkeys(self._snap_key(cluster))
        pairs = sorted(str(field).partition("/")[::2] for field in fields)  # C-level tuple order, as AppKey's
        return [AppKey(cluster, namespace, name) for namespace, name in pairs]

    # delivery

    def _backlog_key(self, cluster: str) -> str:
        return self._key("backlog", cluster)

    def record_delivery(
        self,
        key: AppKey,
        snapshot: Snapshot,
        markers: Sequence[str],
        *,
        backlog: Sequence[BacklogItem] = (),
        delivered: Sequence[BacklogSlot] = (),
    ) -> None:
        """The snapshot, the markers, the backlog items added and removed and, for each ``sent`` marker, the
        removal of that deployment's dead letter for that connection: one transaction."""
        value = _marker_value()
        with self._guard("record delivery"), self.client.pipeline(transaction=True) as pipe:
            pipe.hset(self._snap_key(key.cluster), key.qualified_name, snapshot.to_json())
            for marker in markers:
                pipe.set(self._mark_key(marker), value)
            self._clear_dead_letters(pipe, markers)
            for slot in delivered:
                pipe.hdel(self._backlog_key(slot.cluster), slot.field)
                pipe.delete(self._mark_key(slot.marker))
            for item in backlog:
                pipe.hsetnx(self._backlog_key(item.slot.cluster), item.slot.field, item.to_json())
                pipe.set(self._mark_key(item.slot.marker), value)
            pipe.execute()

    def _clear_dead_letters(self, pipe: Pipeline, markers: Sequence[str]) -> None:
        """Queue, in the caller's transaction, the removal of the dead letters that ``sent`` markers deliver."""
        cleared = _delivered_targets(markers)
        if cleared:
            # EVAL, not the registered script's EVALSHA: a pipeline with scripts first asks SCRIPT EXISTS (one
            # more round trip per delivery), and a NOSCRIPT inside MULTI would not abort the transaction.
            keys = self._dead_letter_keys()
            pipe.eval(_CLEAR_DEAD_LETTERS_SCRIPT, len(keys), *keys, *cleared)

    def backlog(self, cluster: str | None = None) -> list[BacklogItem]:
        with self._guard("read backlog"):
            if cluster is not None:
                clusters = {cluster: self._backlog_key(cluster)}
            else:
                start = len(self._key("backlog", ""))
                clusters = {
                    str(name)[start:]: str(name) for name in self.client.scan_iter(match=self._key("backlog", "*"))
                }
            with self.client.pipeline(transaction=False) as pipe:
                for hash_key in clusters.values():
                    pipe.hvals(hash_key)
                replies: list[list[str]] = pipe.execute()
        items = [
            item
            for name, values in zip(clusters, replies, strict=True)
            for value in values
            if (item := BacklogItem.from_json(name, value)) is not None
        ]
        return _backlog_order(items)

    def settle_backlog(self, slot: BacklogSlot, markers: Sequence[str]) -> None:
        """The item removed, its markers written and the dead letters its ``sent`` markers deliver removed: one
        transaction."""
        value = _marker_value()
        with self._guard("settle backlog"), self.client.pipeline(transaction=True) as pipe:
            pipe.hdel(self._backlog_key(slot.cluster), slot.field)
            pipe.delete(self._mark_key(slot.marker))
            for marker in markers:
                pipe.set(self._mark_key(marker), value)
            self._clear_dead_letters(pipe, markers)
            pipe.execute()

    def claim_changes(self, claims: Sequence[ChangeClaim]) -> dict[str, str]:
        if not claims:
            return {}
        value = _marker_value()
        with self._guard("claim changes"), self.client.pipeline(transaction=False) as pipe:
            for claim in claims:
                slot = claim.item.slot
                self._claim(
                    keys=[
                        self._backlog_key(slot.cluster),
                        self._mark_key(slot.marker),
                        *(self._key("claim", key) for key in claim.keys),
                    ],
                    args=[_claim_value(claim.holder), claim.holder, slot.field, claim.item.to_json(), value],
                    client=pipe,
                )
            replies: list[list[str]] = pipe.execute()
        return {
            key: str(holder)
            for claim, holders in zip(claims, replies, strict=True)
            for key, holder in zip(claim.keys, holders, strict=True)
        }

    def existing_markers(self, markers: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(markers))
        if not unique:
            return set()
        with self._guard("read markers"):
            values = self.client.mget([self._mark_key(marker) for marker in unique])
        return {marker for marker, value in zip(unique, values, strict=True) if value is not None}

    # clusters

    def initialized_at(self, cluster: str) -> datetime | None:
        with self._guard("read cluster state"):
            text = self.client.get(self._key("cluster", cluster))
        if text is None:
            return None
        try:
            data = json.loads(text)
            return parse_time(data["initialized_at"]) if data.get("version") == VALUE_VERSION else None
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("unreadable cluster state ignored", extra={"cluster": cluster, "reason": "invalid JSON"})
            return None

    def set_initialized_at(self, cluster: str, when: datetime) -> None:
        value = json.dumps({"version": VALUE_VERSION, "initialized_at": _format_instant(when)}, separators=(",", ":"))
        with self._guard("write cluster state"):
            self.client.set(self._key("cluster", cluster), value)

    # caches

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return {}
        with self._guard("read cache"):
            values = self.client.mget([self._key("cache", kind, key) for key in unique])
        return {key: str(value) for key, value in zip(unique, values, strict=True) if value is not None}

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        if not items:
            return
        with self._guard("write cache"), self.client.pipeline(transaction=False) as pipe:
            for key, value in items.items():
                pipe.set(self._key("cache", kind, key), value)
            pipe.execute()

    # lock

    def acquire_lock(self, name: str, owner: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        with self._guard("acquire lock"):
            return bool(self.client.set(self._lock_key(name), self._lock_value(owner), nx=True, ex=ttl_seconds))

    def acquire_shared_lock(self, name: str, group: str, holder: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        with self._guard("acquire lock"):
            taken = self._shared_acquire(keys=[self._lock_key(name)], args=[group, holder, ttl_seconds * 1000])
        return bool(taken)

    def renew_shared_lock(self, name: str, holder: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        with self._guard("renew lock"):
            renewed = self._shared_renew(keys=[self._lock_key(name)], args=[holder, ttl_seconds * 1000])
        return bool(renewed)

    def release_shared_lock(self, name: str, holder: str) -> None:
        with self._guard("release lock"):
            self._shared_release(keys=[self._lock_key(name)], args=[holder])

    def renew_lock(self, name: str, owner: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        with self._guard("renew lock"):
            renewed = self._renew(keys=[self._lock_key(name)], args=[self._lock_value(owner), ttl_seconds * 1000])
        return bool(renewed)

    def release_lock(self, name: str, owner: str) -> None:
        with self._guard("release lock"):
            self._release(keys=[self._lock_key(name)], args=[self._lock_value(owner)])

    def lock_holder(self, name: str) -> LockHolder | None:
        """An exclusive lock's owner, or a shared lock's group and live holders (read in one script, so a holder
        expiring meanwhile is never half counted)."""
        with self._guard("read lock"):
            reply = self._lock_holder(keys=[self._lock_key(name)])
        if not reply:
            return None
        kind, value, pttl, *holders = reply
        expires = datetime.now(UTC) + timedelta(milliseconds=pttl) if isinstance(pttl, int) and pttl >= 0 else None
        if kind == "hash":
            return LockHolder(
                str(value) or "an unknown group", expires, tuple(sorted(str(holder) for holder in holders))
            )
        try:
            owner = str(json.loads(value)["owner"])
        except (ValueError, KeyError, TypeError):
            owner = "an unreadable owner"
        return LockHolder(owner, expires)

    # dead letters and run summaries

    def _push(self, list_name: str, cap: int, data: Mapping[str, Any]) -> None:
        key = self._key(list_name)
        with self._guard(f"write {list_name}"), self.client.pipeline(transaction=True) as pipe:
            pipe.lpush(key, _encode(data))
            pipe.ltrim(key, 0, cap - 1)
            pipe.execute()

    def _range(self, list_name: str, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        with self._guard(f"read {list_name}"):
            values = self.client.lrange(self._key(list_name), 0, limit - 1)
        return [data for value in values if (data := _decode(value, list_name)) is not None]

    def _dead_letter_keys(self) -> list[str]:
        return [self._key("dead-letters"), self._key("dead-letters-index"), self._key("dead-letters-indexed")]

    def add_dead_letter(self, entry: Mapping[str, Any]) -> None:
        target = _dead_letter_target(entry) or ""
        with self._guard("write dead-letters"):
            self._add_dead_letter(keys=self._dead_letter_keys(), args=[target, _encode(entry), DEAD_LETTER_CAP])

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._range("dead-letters", limit)

    def add_run_summary(self, summary: Mapping[str, Any]) -> None:
        self._push("runs", RUN_SUMMARY_CAP, summary)

    def run_summaries(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._range("runs", limit)


# -- SQLite --------------------------------------------------------------------------------------

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    prefix TEXT NOT NULL, cluster TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, json TEXT NOT NULL,
    PRIMARY KEY (prefix, cluster, namespace, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS markers (
    prefix TEXT NOT NULL, marker TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (prefix, marker)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cache (
    prefix TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
    PRIMARY KEY (prefix, kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    prefix TEXT NOT NULL, cluster TEXT NOT NULL, initialized_at TEXT NOT NULL,
    PRIMARY KEY (prefix, cluster)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS locks (
    prefix TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (prefix, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS lock_members (
    prefix TEXT NOT NULL, name TEXT NOT NULL, holder TEXT NOT NULL, grp TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (prefix, name, holder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS backlog (
    id INTEGER PRIMARY KEY AUTOINCREMENT, prefix TEXT NOT NULL, cluster TEXT NOT NULL, field TEXT NOT NULL,
    json TEXT NOT NULL, UNIQUE (prefix, cluster, field)
);
CREATE TABLE IF NOT EXISTS claims (
    prefix TEXT NOT NULL, claim TEXT NOT NULL, json TEXT NOT NULL,
    PRIMARY KEY (prefix, claim)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT, prefix TEXT NOT NULL, json TEXT NOT NULL, target TEXT
);
CREATE INDEX IF NOT EXISTS dead_letters_prefix ON dead_letters (prefix, id);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, prefix TEXT NOT NULL, json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_prefix ON runs (prefix, id);
"""
_CHUNK = 300
"""Rows per ``IN (VALUES …)`` query: 3 parameters each stays under SQLite's 999-variable floor."""


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SQLiteStore:
    """State in one SQLite file (WAL). One connection guarded by a lock, so worker threads may share it.

    ``key_prefix`` partitions every table, so two configurations can share a file without seeing each other.
    """

    def __init__(self, path: str | os.PathLike[str], key_prefix: str) -> None:
        self.path = Path(path)
        self.key_prefix = key_prefix
        self._lock = threading.RLock()
        try:
            if str(self.path) != ":memory:":
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=5.0, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable(f"cannot open SQLite state {self.path}: {error}") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            with self._write() as conn:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > _SCHEMA_VERSION:
                    raise StoreUnavailable(f"SQLite state {self.path} has schema version {version}, newer than this")
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                _add_dead_letter_targets(conn)
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
        except sqlite3.Error as error:
            self._conn.close()
            raise StoreUnavailable(f"cannot initialise SQLite state {self.path}: {error}") from None
        except StoreUnavailable:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, key_prefix={self.key_prefix!r})"

    def _unavailable(self, error: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(f"SQLite state {self.path}: {error}")

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed if the block ends normally, else rolled back."""
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as error:
                raise self._unavailable(error) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as error:
                if conn.in_transaction:
                    with suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                if isinstance(error, sqlite3.Error):
                    raise self._unavailable(error) from None
                raise

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as error:
                raise self._unavailable(error) from None

    def ping(self) -> None:
        with self._read() as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        with self._lock, suppress(sqlite3.Error):
            self._conn.close()

    # snapshots

    def load_snapshots(self, keys: Sequence[AppKey]) -> dict[AppKey, Snapshot]:
        return _decoded(self.load_stored(keys))

    def load_stored(self, keys: Sequence[AppKey]) -> dict[AppKey, StoredSnapshot]:
        unique = list(dict.fromkeys(keys))
        found: dict[AppKey, StoredSnapshot] = {}
        with self._read() as conn:
            for chunk in _chunks(unique):
                values = ",".join("(?,?,?)" for _ in chunk)
                params: list[str] = [self.key_prefix]
                for key in chunk:
                    params += [key.cluster, key.namespace, key.name]
                rows = conn.execute(
                    "SELECT cluster, namespace, name, json FROM snapshots"
                    f" WHERE prefix = ? AND (cluster, namespace, name) IN (VALUES {values})",
                    params,
                ).fetchall()
                for cluster, namespace, name, text in rows:
                    key = AppKey(cluster, namespace, name)
                    found[key] = StoredSnapshot(key, text)
        return found

    def save_snapshots(self, snapshots: Mapping[AppKey, Snapshot]) -> None:
        if not snapshots:
            return
        rows = [(self.key_prefix, k.cluster, k.namespace, k.name, s.to_json()) for k, s in snapshots.items()]
        with self._write() as conn:
            conn.executemany("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)", rows)

    def delete_snapshots(self, keys: Sequence[AppKey]) -> None:
        if not keys:
            return
        rows = [(self.key_prefix, k.cluster, k.namespace, k.name) for k in keys]
        with self._write() as conn:
            conn.executemany(
                "DELETE FROM snapshots WHERE prefix = ? AND cluster = ? AND namespace = ? AND name = ?", rows
            )

    def snapshot_keys(self, cluster: str) -> list[AppKey]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT namespace, name FROM snapshots WHERE prefix = ? AND cluster = ? ORDER BY namespace, name",
                (self.key_prefix, cluster),
            ).fetchall()
        return [AppKey(cluster, namespace, name) for namespace, name in rows]

    # delivery

    def record_delivery(
        self,
        key: AppKey,
        snapshot: Snapshot,
        markers: Sequence[str],
        *,
        backlog: Sequence[BacklogItem] = (),
        delivered: Sequence[BacklogSlot] = (),
    ) -> None:
        """The snapshot, the markers, the backlog items added and removed and, for each ``sent`` marker, the
        removal of that deployment's dead letter for that connection: one transaction."""
        created = _format_instant(datetime.now(UTC))
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)",
                (self.key_prefix, key.cluster, key.namespace, key.name, snapshot.to_json()),
            )
            conn.executemany(
                "INSERT OR REPLACE INTO markers VALUES (?, ?, ?)",
                [(self.key_prefix, marker, created) for marker in markers],
            )
            self._clear_dead_letters(conn, markers)
            for slot in delivered:
                self._unqueue(conn, slot)
            for item in backlog:
                self._queue(conn, item, created)

    def _queue(self, conn: sqlite3.Connection, item: BacklogItem, created: str) -> None:
        """Add the item unless its slot already waits (the first payload stays: a later one, rebuilt by a
        backfill, could only re-derive an older entry's verdict as SUCCESS)."""
        slot = item.slot
        cursor = conn.execute(
            "INSERT OR IGNORE INTO backlog (prefix, cluster, field, json) VALUES (?, ?, ?, ?)",
            (self.key_prefix, slot.cluster, slot.field, item.to_json()),
        )
        if cursor.rowcount == 1:
            conn.execute("INSERT OR REPLACE INTO markers VALUES (?, ?, ?)", (self.key_prefix, slot.marker, created))

    def _unqueue(self, conn: sqlite3.Connection, slot: BacklogSlot) -> None:
        conn.execute(
            "DELETE FROM backlog WHERE prefix = ? AND cluster = ? AND field = ?",
            (self.key_prefix, slot.cluster, slot.field),
        )
        conn.execute("DELETE FROM markers WHERE prefix = ? AND marker = ?", (self.key_prefix, slot.marker))

    def backlog(self, cluster: str | None = None) -> list[BacklogItem]:
        query = "SELECT cluster, json FROM backlog WHERE prefix = ?"
        params: list[str] = [self.key_prefix]
        if cluster is not None:
            query += " AND cluster = ?"
            params.append(cluster)
        with self._read() as conn:
            rows = conn.execute(query + " ORDER BY id", params).fetchall()
        return _backlog_order([item for name, text in rows if (item := BacklogItem.from_json(name, text)) is not None])

    def _clear_dead_letters(self, conn: sqlite3.Connection, markers: Sequence[str]) -> None:
        """Remove, in the caller's transaction, the dead letters that ``sent`` markers deliver."""
        conn.executemany(
            "DELETE FROM dead_letters WHERE prefix = ? AND target = ?",
            [(self.key_prefix, target) for target in _delivered_targets(markers)],
        )

    def settle_backlog(self, slot: BacklogSlot, markers: Sequence[str]) -> None:
        """The item removed, its markers written and the dead letters its ``sent`` markers deliver removed: one
        transaction."""
        created = _format_instant(datetime.now(UTC))
        with self._write() as conn:
            self._unqueue(conn, slot)
            conn.executemany(
                "INSERT OR REPLACE INTO markers VALUES (?, ?, ?)",
                [(self.key_prefix, marker, created) for marker in markers],
            )
            self._clear_dead_letters(conn, markers)

    def claim_changes(self, claims: Sequence[ChangeClaim]) -> dict[str, str]:
        holders: dict[str, str] = {}
        if not claims:
            return holders
        created = _format_instant(datetime.now(UTC))
        with self._write() as conn:
            for claim in claims:
                held = {key: self._claim_value(conn, key) for key in claim.keys}
                value = next(
                    (text for text in held.values() if text is not None and _claim_holder(text) != claim.holder),
                    _claim_value(claim.holder),
                )
                conn.executemany(
                    "INSERT OR IGNORE INTO claims VALUES (?, ?, ?)",
                    [(self.key_prefix, key, value) for key, text in held.items() if text is None],
                )
                for key, text in held.items():
                    holders[key] = _claim_holder(value if text is None else text)
                if all(holders[key] == claim.holder for key in claim.keys):
                    self._queue(conn, claim.item, created)
        return holders

    def _claim_value(self, conn: sqlite3.Connection, key: str) -> str | None:
        row = conn.execute("SELECT json FROM claims WHERE prefix = ? AND claim = ?", (self.key_prefix, key)).fetchone()
        return None if row is None else str(row[0])

    def existing_markers(self, markers: Sequence[str]) -> set[str]:
        unique = list(dict.fromkeys(markers))
        found: set[str] = set()
        with self._read() as conn:
            for chunk in _chunks(unique, 900):
                marks = ",".join("?" for _ in chunk)
                rows = conn.execute(
                    f"SELECT marker FROM markers WHERE prefix = ? AND marker IN ({marks})", [self.key_prefix, *chunk]
                ).fetchall()
                found.update(row[0] for row in rows)
        return found

    # clusters

    def initialized_at(self, cluster: str) -> datetime | None:
        with self._read() as conn:
            row = conn.execute(
                "SELECT initialized_at FROM meta WHERE prefix = ? AND cluster = ?", (self.key_prefix, cluster)
            ).fetchone()
        if row is None:
            return None
        try:
            return parse_time(row[0])
        except ValueError:
            log.warning("unreadable cluster state ignored", extra={"cluster": cluster, "reason": "invalid time"})
            return None

    def set_initialized_at(self, cluster: str, when: datetime) -> None:
        value = _format_instant(when)
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?, ?)", (self.key_prefix, cluster, value))

    # caches

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        unique = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        with self._read() as conn:
            for chunk in _chunks(unique, 900):
                marks = ",".join("?" for _ in chunk)
                rows = conn.execute(
                    f"SELECT key, value FROM cache WHERE prefix = ? AND kind = ? AND key IN ({marks})",
                    [self.key_prefix, kind, *chunk],
                ).fetchall()
                found.update((key, value) for key, value in rows)
        return found

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        if not items:
            return
        with self._write() as conn:
            conn.executemany(
                "INSERT OR REPLACE INTO cache VALUES (?, ?, ?, ?)",
                [(self.key_prefix, kind, key, value) for key, value in items.items()],
            )

    # lock

    def acquire_lock(self, name: str, owner: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        now = time.time()
        with self._write() as conn:
            shared = conn.execute(
                "SELECT 1 FROM lock_members WHERE prefix = ? AND name = ? AND expires_at > ? LIMIT 1",
                (self.key_prefix, name, now),
            ).fetchone()
            if shared is not None:
                return False
            cursor = conn.execute(
                "INSERT INTO locks VALUES (?, ?, ?, ?) ON CONFLICT (prefix, name) DO UPDATE"
                " SET owner = excluded.owner, expires_at = excluded.expires_at WHERE locks.expires_at <= ?",
                (self.key_prefix, name, owner, now + ttl_seconds, now),
            )
            return cursor.rowcount == 1

    def acquire_shared_lock(self, name: str, group: str, holder: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "DELETE FROM lock_members WHERE prefix = ? AND name = ? AND expires_at <= ?",
                (self.key_prefix, name, now),
            )
            exclusive = conn.execute(
                "SELECT 1 FROM locks WHERE prefix = ? AND name = ? AND expires_at > ?", (self.key_prefix, name, now)
            ).fetchone()
            other = conn.execute(
                "SELECT 1 FROM lock_members WHERE prefix = ? AND name = ? AND grp != ? LIMIT 1",
                (self.key_prefix, name, group),
            ).fetchone()
            if exclusive is not None or other is not None:
                return False
            conn.execute(
                "INSERT OR REPLACE INTO lock_members VALUES (?, ?, ?, ?, ?)",
                (self.key_prefix, name, holder, group, now + ttl_seconds),
            )
            return True

    def renew_shared_lock(self, name: str, holder: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE lock_members SET expires_at = ?"
                " WHERE prefix = ? AND name = ? AND holder = ? AND expires_at > ?",
                (now + ttl_seconds, self.key_prefix, name, holder, now),
            )
            return cursor.rowcount == 1

    def release_shared_lock(self, name: str, holder: str) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM lock_members WHERE prefix = ? AND name = ? AND holder = ?", (self.key_prefix, name, holder)
            )

    def renew_lock(self, name: str, owner: str, ttl_seconds: int) -> bool:
        _check_ttl(ttl_seconds)
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE locks SET expires_at = ? WHERE prefix = ? AND name = ? AND owner = ? AND expires_at > ?",
                (now + ttl_seconds, self.key_prefix, name, owner, now),
            )
            return cursor.rowcount == 1

    def release_lock(self, name: str, owner: str) -> None:
        with self._write() as conn:
            conn.execute(
                "DELETE FROM locks WHERE prefix = ? AND name = ? AND owner = ?", (self.key_prefix, name, owner)
            )

    def lock_holder(self, name: str) -> LockHolder | None:
        """An exclusive lock's owner, or a shared lock's group and live holders."""
        now = time.time()
        with self._read() as conn:
            row = conn.execute(
                "SELECT owner, expires_at FROM locks WHERE prefix = ? AND name = ? AND expires_at > ?",
                (self.key_prefix, name, now),
            ).fetchone()
            members = conn.execute(
                "SELECT grp, holder, expires_at FROM lock_members WHERE prefix = ? AND name = ? AND expires_at > ?"
                " ORDER BY holder",
                (self.key_prefix, name, now),
            ).fetchall()
        if row is not None:
            return LockHolder(str(row[0]), datetime.fromtimestamp(float(row[1]), UTC))
        if not members:
            return None
        latest = max(float(expires) for _, _, expires in members)
        holders = tuple(str(holder) for _, holder, _ in members)
        return LockHolder(str(members[0][0]), datetime.fromtimestamp(latest, UTC), holders)

    # dead letters and run summaries

    def _push(self, table: str, cap: int, data: Mapping[str, Any]) -> None:
        with self._write() as conn:
            conn.execute(f"INSERT INTO {table} (prefix, json) VALUES (?, ?)", (self.key_prefix, _encode(data)))
            conn.execute(
                f"DELETE FROM {table} WHERE prefix = ? AND id <= "
                f"(SELECT id FROM {table} WHERE prefix = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.key_prefix, self.key_prefix, cap),
            )

    def _range(self, table: str, limit: int) -> list[dict[str, Any]]:
        if limit <= 0:
            return []
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT json FROM {table} WHERE prefix = ? ORDER BY id DESC LIMIT ?", (self.key_prefix, limit)
            ).fetchall()
        return [data for (text,) in rows if (data := _decode(text, table)) is not None]

    def add_dead_letter(self, entry: Mapping[str, Any]) -> None:
        target = _dead_letter_target(entry)
        with self._write() as conn:
            if target is not None:
                conn.execute("DELETE FROM dead_letters WHERE prefix = ? AND target = ?", (self.key_prefix, target))
            conn.execute(
                "INSERT INTO dead_letters (prefix, json, target) VALUES (?, ?, ?)",
                (self.key_prefix, _encode(entry), target),
            )
            conn.execute(
                "DELETE FROM dead_letters WHERE prefix = ? AND id <= "
                "(SELECT id FROM dead_letters WHERE prefix = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (self.key_prefix, self.key_prefix, DEAD_LETTER_CAP),
            )

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        return self._range("dead_letters", limit)

    def add_run_summary(self, summary: Mapping[str, Any]) -> None:
        self._push("runs", RUN_SUMMARY_CAP, summary)

    def run_summaries(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._range("runs", limit)


def _add_dead_letter_targets(conn: sqlite3.Connection) -> None:
    """A state file written before dead letters had a ``target`` column gets it, filled from each entry, so a
    later delivery takes those off the list too. Idempotent; an older reconciler still reads and writes the table."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(dead_letters)")}
    if "target" not in columns:
        conn.execute("ALTER TABLE dead_letters ADD COLUMN target TEXT")
        rows = conn.execute("SELECT id, json FROM dead_letters").fetchall()
        updates = []
        for row_id, text in rows:
            data = _decode(text, "dead letter")
            target = _dead_letter_target(data) if data is not None else None
            if target is not None:
                updates.append((target, row_id))
        conn.executemany("UPDATE dead_letters SET target = ? WHERE id = ?", updates)
    conn.execute("CREATE INDEX IF NOT EXISTS dead_letters_target ON dead_letters (prefix, target)")


# -- run lock ------------------------------------------------------------------------------------


def default_owner() -> str:
    """``host:pid:random``: tells operators which run holds a lock and never collides between runs."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RunLock:
    """Hold a store lock for the duration of a ``with`` block, renewing it from a daemon thread.

    Raises :class:`LockHeld` on entry if another owner holds it. If a renewal finds the lock gone or
    taken, :attr:`lost` becomes true and renewing stops: the run should wind down. On exit the lock is
    released — only this owner's hold: renewals and the release name the owner, and the store checks it
    atomically, so a run never releases or extends a lock it does not hold.

    ``group``: a shared lock. Holders of the same group share it, each under its own ``owner`` token; another
    group is kept out until the last holder has released it or let it expire.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        owner: str | None = None,
        ttl_seconds: int = 60,
        renew_every: float = 20,
        *,
        group: str | None = None,
    ) -> None:
        _check_ttl(ttl_seconds)
        if not 0 < renew_every < ttl_seconds:
            raise ValueError("renew_every must be positive and shorter than ttl_seconds")
        self.store = store
        self.name = name
        self.owner = owner or default_owner()
        self.ttl_seconds = ttl_seconds
        self.renew_every = renew_every
        self.group = group
        self.renewed = threading.Event()
        """Set after every successful renewal (tests and callers may clear and wait on it)."""
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lock is found lost or ``timeout`` passes; true if lost."""
        return self._lost.wait(timeout)

    def __enter__(self) -> RunLock:
        if self.group is not None:
            taken = self.store.acquire_shared_lock(self.name, self.group, self.owner, self.ttl_seconds)
        else:
            taken = self.store.acquire_lock(self.name, self.owner, self.ttl_seconds)
        if not taken:
            raise LockHeld(self.name)
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lock-renew-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=SOCKET_TIMEOUT_SECONDS * 2)
            self._thread = None
        try:
            if self.group is not None:
                self.store.release_shared_lock(self.name, self.owner)
            else:
                self.store.release_lock(self.name, self.owner)
        except StoreUnavailable as error:
            log.warning("could not release the run lock; it will expire", extra={"reason": error.reason})

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every):
            try:
                if self.group is not None:
                    still_ours = self.store.renew_shared_lock(self.name, self.owner, self.ttl_seconds)
                else:
                    still_ours = self.store.renew_lock(self.name, self.owner, self.ttl_seconds)
            except StoreUnavailable as error:
                log.warning("could not renew the run lock; will retry", extra={"reason": error.reason})
                continue
            except Exception:
                log.exception("unexpected error renewing the run lock; will retry")
                continue
            if not still_ours:
                if not self._stop.is_set():
                    log.error(
                        "run lock lost: another run holds it or it expired",
                        extra={"reason": f"lock {self.name!r} lost"},
                    )
                    self._lost.set()
                return
            self.renewed.set()
