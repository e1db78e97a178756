"""The state store contract, run against Redis (a real server) and SQLite alike."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from freezegun import freeze_time

from reconciler.config import StateConfig
from reconciler.model import AppKey, DecidedVerdict, EntryRecord, PendingVerdict, Result, Snapshot, SourceRef
from reconciler.store import (
    DEAD_LETTER_CAP,
    RUN_SUMMARY_CAP,
    BacklogItem,
    BacklogSlot,
    LockHeld,
    RedisStore,
    RunLock,
    SQLiteStore,
    Store,
    StoreUnavailable,
    open_store,
)

T0 = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def snapshot(uid: str = "9f1c2d3e-0000-4000-8000-000000000001", history_id: int = 7) -> Snapshot:
    """A snapshot with every field set, so a round trip that drops one shows up."""
    return Snapshot(
        uid=uid,
        last_seen=T0,
        last_history_id=history_id,
        recent=((("a" * 40,), "fp-1"), (("b" * 40, "c" * 40), "fp-2")),
        images={"ghcr.io/acme/api": "3f2a9c1", "ghcr.io/acme/worker": "77e0d1a"},
        commits={"acme/api": "3f2a9c1" + "0" * 33, "acme/worker": "77e0d1a" + "1" * 33},
        last_failed_operation="2024-05-01T11:00:00Z",
        last_deployment_started_at=T0 - timedelta(minutes=5),
        pending=PendingVerdict(history_id=history_id, since=T0 - timedelta(minutes=1)),
        deleting_since=T0 + timedelta(hours=1),
        covered_until=T0 - timedelta(minutes=4),
        history_restarts=2,
        pending_entry=_kept(uid, "h7-1717225200", history_id),
        decided=(DecidedVerdict(_kept(uid, "h6-1717224900", history_id - 1, images=()), Result.FAILED, "Degraded"),),
        last_image_change="img-0123456789ab",
        rollout_since=T0 - timedelta(minutes=5),
    )


def _kept(uid: str, ref: str, history_id: int, images: tuple[str, ...] = ("ghcr.io/acme/api:3f2a9c1",)) -> EntryRecord:
    return EntryRecord(
        uid=uid,
        ref=ref,
        id=history_id,
        revisions=("3.4.2", "a" * 40),
        deployed_at=T0 - timedelta(minutes=2),
        started_at=None,
        sources=(SourceRef("https://charts.acme.io", chart="api", target_revision="3.4.*"), SourceRef("https://x")),
        source_fingerprint="fp-3",
        images=images,
    )


def app(name: str, cluster: str = "prod", namespace: str = "argocd") -> AppKey:
    return AppKey(cluster, namespace, name)


# -- backend-specific levers, so the contract tests themselves stay backend-neutral --------------


@contextmanager
def _sqlite(store: SQLiteStore) -> Iterator[sqlite3.Connection]:
    """A second connection to the store's file, as another process would have."""
    conn = sqlite3.connect(store.path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def _lock_remaining(store: Store, name: str) -> float:
    if isinstance(store, RedisStore):
        return store.client.pttl(f"{store.key_prefix}:lock:{name}") / 1000
    assert isinstance(store, SQLiteStore)
    with _sqlite(store) as conn:
        (expires_at,) = conn.execute(
            "SELECT expires_at FROM locks WHERE prefix = ? AND name = ?", (store.key_prefix, name)
        ).fetchone()
    return float(expires_at) - time.time()


def _set_lock_remaining(store: Store, name: str, seconds: float) -> None:
    if isinstance(store, RedisStore):
        assert store.client.pexpire(f"{store.key_prefix}:lock:{name}", int(seconds * 1000))
        return
    assert isinstance(store, SQLiteStore)
    with _sqlite(store) as conn:
        conn.execute(
            "UPDATE locks SET expires_at = ? WHERE prefix = ? AND name = ?",
            (time.time() + seconds, store.key_prefix, name),
        )


def _let_lock_expire(store: Store, name: str, travel: Callable[[], object]) -> None:
    """Redis keeps its own clock: shorten the TTL on the server and wait for it to lapse. SQLite follows
    ``time.time()``, so travel past the expiry."""
    if isinstance(store, RedisStore):
        key = f"{store.key_prefix}:lock:{name}"
        store.client.pexpire(key, 1)
        for _ in range(100_000):
            if not store.client.exists(key):
                return
        pytest.fail("the lock key did not expire on the Redis server")
    travel()


@contextmanager
def _failing_marker(store: Store, marker: str, request: pytest.FixtureRequest) -> Iterator[Store]:
    """A store on the same state whose write of ``marker`` fails inside the delivery transaction.

    Redis: a user whose ACL forbids that marker's key, so the queued SET is refused and EXEC aborts.
    SQLite: a trigger that aborts the marker INSERT after the snapshot row was written.
    """
    if isinstance(store, RedisStore):
        user, password = f"limited-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        prefix = store.key_prefix
        store.client.acl_setuser(
            user,
            enabled=True,
            passwords=[f"+{password}"],
            keys=[f"{prefix}:snap:*", f"{prefix}:mark:sent:*"],
            commands=["+@all"],
        )
        parts = urlsplit(request.getfixturevalue("redis_url"))
        host = parts.netloc.rsplit("@", 1)[-1]
        limited = RedisStore(urlunsplit(parts._replace(netloc=f"{user}:{password}@{host}")), prefix)
        try:
            yield limited
        finally:
            limited.close()
            store.client.acl_deluser(user)
        return
    assert isinstance(store, SQLiteStore)
    with _sqlite(store) as conn:
        conn.execute(
            "CREATE TRIGGER fail_marker BEFORE INSERT ON markers"
            f" WHEN NEW.marker = '{marker}' BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    yield store


def _write_raw_snapshot(store: Store, key: AppKey, text: str) -> None:
    if isinstance(store, RedisStore):
        store.client.hset(f"{store.key_prefix}:snap:{key.cluster}", key.qualified_name, text)
        return
    assert isinstance(store, SQLiteStore)
    with _sqlite(store) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?)",
            (store.key_prefix, key.cluster, key.namespace, key.name, text),
        )


def _sibling(store: Store, key_prefix: str, request: pytest.FixtureRequest) -> Store:
    """Another store on the same backend and the same data, under a different key prefix."""
    if isinstance(store, RedisStore):
        return RedisStore(request.getfixturevalue("redis_url"), key_prefix)
    assert isinstance(store, SQLiteStore)
    return SQLiteStore(store.path, key_prefix)


def _count_round_trips(store: RedisStore, monkeypatch: pytest.MonkeyPatch) -> Callable[[], int]:
    """Every command or pipeline checks one connection out of the pool: that is one round trip."""
    pool = store.client.connection_pool
    original = pool.get_connection
    calls = 0

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pool, "get_connection", counting)
    return lambda: calls


# -- snapshots -----------------------------------------------------------------------------------


def test_snapshot_round_trip_keeps_every_field(store: Store) -> None:
    original = snapshot()
    store.save_snapshots({app("api"): original})

    loaded = store.load_snapshots([app("api")])

    assert loaded == {app("api"): original}
    assert loaded[app("api")].pending == PendingVerdict(7, T0 - timedelta(minutes=1))
    assert dict(loaded[app("api")].commits) == {"acme/api": "3f2a9c1" + "0" * 33, "acme/worker": "77e0d1a" + "1" * 33}


def test_snapshot_with_only_required_fields_round_trips(store: Store) -> None:
    bare = Snapshot(uid="u", last_seen=T0)
    store.save_snapshots({app("bare"): bare})
    assert store.load_snapshots([app("bare")]) == {app("bare"): bare}


def test_batched_load_returns_present_keys_only_in_one_round_trip(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = {app(f"app-{i}", cluster="prod" if i % 2 else "staging"): snapshot(uid=f"uid-{i}") for i in range(60)}
    store.save_snapshots(present)
    missing = [app(f"gone-{i}") for i in range(20)] + [app("app-1", cluster="elsewhere")]
    requested = list(present) + missing
    round_trips = _count_round_trips(store, monkeypatch) if isinstance(store, RedisStore) else None

    loaded = store.load_snapshots(requested)

    assert loaded == present
    if round_trips is not None:
        assert round_trips() == 1
    assert store.load_snapshots([]) == {}


def test_save_overwrites_and_delete_removes_only_the_given_keys(store: Store) -> None:
    store.save_snapshots({app("api"): snapshot(history_id=1), app("web"): snapshot(history_id=1)})
    store.save_snapshots({app("api"): snapshot(history_id=2)})

    assert store.load_snapshots([app("api")])[app("api")].last_history_id == 2

    store.delete_snapshots([app("api"), app("never-saved")])

    assert store.load_snapshots([app("api"), app("web")]) == {app("web"): snapshot(history_id=1)}


def test_snapshot_keys_lists_one_cluster(store: Store) -> None:
    store.save_snapshots(
        {
            app("web", namespace="team-b"): snapshot(),
            app("api", namespace="team-a"): snapshot(),
            app("api", cluster="staging"): snapshot(),
        }
    )

    assert store.snapshot_keys("prod") == [app("api", namespace="team-a"), app("web", namespace="team-b")]
    assert store.snapshot_keys("staging") == [app("api", cluster="staging")]
    assert store.snapshot_keys("unknown") == []

    store.delete_snapshots([app("web", namespace="team-b")])
    assert store.snapshot_keys("prod") == [app("api", namespace="team-a")]


def test_unreadable_snapshot_is_treated_as_absent(store: Store) -> None:
    store.save_snapshots({app("good"): snapshot()})
    _write_raw_snapshot(store, app("corrupt"), "{not json")
    _write_raw_snapshot(store, app("future"), json.dumps({"version": 99, "uid": "u"}))

    loaded = store.load_snapshots([app("good"), app("corrupt"), app("future")])

    assert loaded == {app("good"): snapshot()}


def test_key_prefixes_do_not_see_each_other(store: Store, request: pytest.FixtureRequest) -> None:
    other = _sibling(store, f"other-{uuid.uuid4().hex[:8]}", request)
    try:
        other.save_snapshots({app("api"): snapshot(history_id=99)})
        other.record_delivery(app("web"), snapshot(), ["sent:1:x"])
        other.cache_put("commit", {"abc": "other"})

        assert store.load_snapshots([app("api"), app("web")]) == {}
        assert store.snapshot_keys("prod") == []
        assert store.existing_markers(["sent:1:x"]) == set()
        assert store.cache_get("commit", ["abc"]) == {}
        assert store.acquire_lock("run", "me", 60)
        assert other.acquire_lock("run", "someone-else", 60)
    finally:
        if isinstance(other, RedisStore):
            keys = list(other.client.scan_iter(match=f"{other.key_prefix}:*"))
            other.client.delete(*keys)
        other.close()


# -- delivery --------------------------------------------------------------------------------------


def test_record_delivery_writes_snapshot_and_markers_together(store: Store) -> None:
    after = snapshot(history_id=8)

    store.record_delivery(app("api"), after, ["sent:3:argocd:prod:argocd:api:9f1c2d3e:h8", "component:3:fp"])

    assert store.load_snapshots([app("api")]) == {app("api"): after}
    assert store.existing_markers(["sent:3:argocd:prod:argocd:api:9f1c2d3e:h8", "component:3:fp", "sent:3:other"]) == {
        "sent:3:argocd:prod:argocd:api:9f1c2d3e:h8",
        "component:3:fp",
    }
    assert store.snapshot_keys("prod") == [app("api")]


def test_record_delivery_without_markers_still_saves_the_snapshot(store: Store) -> None:
    store.record_delivery(app("api"), snapshot(history_id=3), [])
    assert store.load_snapshots([app("api")])[app("api")].last_history_id == 3


def test_record_delivery_failing_midway_writes_neither_snapshot_nor_markers(
    store: Store, request: pytest.FixtureRequest
) -> None:
    before = snapshot(history_id=7)
    store.save_snapshots({app("api"): before})

    with _failing_marker(store, "boom", request) as failing, pytest.raises(StoreUnavailable):
        failing.record_delivery(app("api"), snapshot(history_id=8), ["sent:1:h8", "boom", "sent:2:h8"])

    assert store.load_snapshots([app("api")]) == {app("api"): before}
    assert store.existing_markers(["sent:1:h8", "boom", "sent:2:h8"]) == set()


def test_existing_markers(store: Store) -> None:
    assert store.existing_markers([]) == set()
    assert store.existing_markers(["sent:1:a"]) == set()

    store.record_delivery(app("a"), snapshot(), ["sent:1:a", "sent:2:a"])
    store.record_delivery(app("b"), snapshot(), ["sent:1:b"])

    assert store.existing_markers(["sent:1:a", "sent:1:a", "sent:2:b", "sent:1:b"]) == {"sent:1:a", "sent:1:b"}


# -- clusters and caches ---------------------------------------------------------------------------


def test_initialized_at_per_cluster(store: Store) -> None:
    assert store.initialized_at("prod") is None

    when = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)
    store.set_initialized_at("prod", when)

    assert store.initialized_at("prod") == when
    assert store.initialized_at("staging") is None

    later = when + timedelta(days=1)
    store.set_initialized_at("prod", later)
    assert store.initialized_at("prod") == later


def test_cache_get_and_put(store: Store) -> None:
    assert store.cache_get("commit", []) == {}
    assert store.cache_get("commit", ["abc"]) == {}

    store.cache_put("commit", {"abc": '{"sha":"abc"}', "def": '{"sha":"def"}'})
    store.cache_put("repo", {"abc": "acme/api"})
    store.cache_put("commit", {})

    assert store.cache_get("commit", ["abc", "missing", "def"]) == {"abc": '{"sha":"abc"}', "def": '{"sha":"def"}'}
    assert store.cache_get("repo", ["abc", "def"]) == {"abc": "acme/api"}


def test_compare_cache_keys_with_colons_and_dots(store: Store) -> None:
    store.cache_put("compare", {"acme/api:aaa...bbb": "[]"})
    assert store.cache_get("compare", ["acme/api:aaa...bbb", "acme/api:aaa...ccc"]) == {"acme/api:aaa...bbb": "[]"}


# -- locks -----------------------------------------------------------------------------------------


def test_second_acquire_fails_until_released(store: Store) -> None:
    assert store.acquire_lock("run", "first", 60)
    assert not store.acquire_lock("run", "second", 60)
    assert store.acquire_lock("run:other-shard", "second", 60)

    store.release_lock("run", "first")

    assert store.acquire_lock("run", "second", 60)


def test_only_the_owner_renews_or_releases(store: Store) -> None:
    assert store.acquire_lock("run", "owner", 60)

    assert not store.renew_lock("run", "intruder", 60)
    store.release_lock("run", "intruder")
    assert not store.acquire_lock("run", "third", 60)

    assert store.renew_lock("run", "owner", 60)
    store.release_lock("run", "owner")
    assert store.acquire_lock("run", "third", 60)


def test_lock_carries_the_requested_expiry(store: Store) -> None:
    assert store.acquire_lock("run", "owner", 60)
    assert 55 < _lock_remaining(store, "run") <= 60

    _set_lock_remaining(store, "run", 10)
    assert store.renew_lock("run", "owner", 45)
    assert 40 < _lock_remaining(store, "run") <= 45


def test_expired_lock_is_free_and_the_old_owner_cannot_touch_the_new_one(store: Store) -> None:
    with freeze_time(T0, ignore=["redis"]) as frozen:
        assert store.acquire_lock("run", "crashed", 60)
        _let_lock_expire(store, "run", lambda: frozen.tick(timedelta(seconds=61)))

        assert not store.renew_lock("run", "crashed", 60)
        assert store.acquire_lock("run", "next", 60)
        store.release_lock("run", "crashed")
        assert not store.acquire_lock("run", "third", 60)


def test_lock_rejects_a_zero_ttl(store: Store) -> None:
    with pytest.raises(ValueError, match="ttl"):
        store.acquire_lock("run", "owner", 0)


def test_run_lock_renews_while_held_and_releases_on_exit(store: Store) -> None:
    with RunLock(store, "run", owner="me", ttl_seconds=60, renew_every=0.01) as lock:
        _set_lock_remaining(store, "run", 30)
        lock.renewed.clear()
        assert lock.renewed.wait(timeout=5), "the lock was not renewed"
        assert _lock_remaining(store, "run") > 50
        assert not lock.lost

    assert store.acquire_lock("run", "next", 60)


def test_run_lock_second_holder_gets_lock_held(store: Store) -> None:
    with RunLock(store, "run", ttl_seconds=60, renew_every=20):
        second = RunLock(store, "run", ttl_seconds=60, renew_every=20)
        with pytest.raises(LockHeld, match="run"), second:
            pytest.fail("entered a held lock")

    with RunLock(store, "run", ttl_seconds=60, renew_every=20):
        pass


def test_run_lock_released_when_the_body_raises(store: Store) -> None:
    with pytest.raises(RuntimeError), RunLock(store, "run", ttl_seconds=60, renew_every=20):
        raise RuntimeError("tick failed")

    assert store.acquire_lock("run", "next", 60)


def test_run_lock_reports_a_lock_taken_by_another_run(store: Store) -> None:
    with RunLock(store, "run", owner="slow", ttl_seconds=60, renew_every=0.01) as lock:
        store.release_lock("run", "slow")
        assert store.acquire_lock("run", "thief", 60)

        assert lock.wait_lost(timeout=5)
        assert lock.lost

    assert store.renew_lock("run", "thief", 60), "exiting must not release someone else's lock"


def test_run_lock_validates_its_timing(sqlite_store: SQLiteStore) -> None:
    with pytest.raises(ValueError, match="renew_every"):
        RunLock(sqlite_store, "run", ttl_seconds=10, renew_every=10)


# -- dead letters and run summaries ----------------------------------------------------------------


def test_dead_letters_newest_first_and_capped(store: Store) -> None:
    assert store.dead_letters() == []
    for n in range(DEAD_LETTER_CAP + 5):
        store.add_dead_letter({"n": n, "app": "prod/argocd/api"})

    everything = store.dead_letters(limit=DEAD_LETTER_CAP * 2)

    assert len(everything) == DEAD_LETTER_CAP
    assert everything[0] == {"n": DEAD_LETTER_CAP + 4, "app": "prod/argocd/api"}
    assert everything[-1]["n"] == 5
    assert [entry["n"] for entry in store.dead_letters()] == list(range(DEAD_LETTER_CAP + 4, DEAD_LETTER_CAP - 96, -1))
    assert store.dead_letters(limit=0) == []


def test_dead_letter_values_that_are_not_json_are_kept_as_text(store: Store) -> None:
    store.add_dead_letter({"at": T0, "ids": ("a", "b"), "error": ValueError("bad payload")})

    assert store.dead_letters() == [{"at": "2024-05-01T12:00:00+00:00", "ids": ["a", "b"], "error": "bad payload"}]


def letter(connection: int, deployment_id: str, message: str = "HTTP 400") -> dict[str, Any]:
    return {"connection": connection, "deployment_id": deployment_id, "status": 400, "message": message}


def test_a_delivery_takes_its_dead_letter_off_the_list_for_that_connection_only(store: Store) -> None:
    h1, h2 = "argocd:prod:argocd:api:9f1c2d3e:h1", "argocd:prod:argocd:api:9f1c2d3e:h2"
    store.add_dead_letter(letter(1, h1))
    store.add_dead_letter(letter(2, h1))
    store.add_dead_letter(letter(1, h2))
    store.add_dead_letter({"reason": "an entry of unknown target"})

    store.record_delivery(app("api"), snapshot(), [f"sent:1:{h1}", f"deduped:1:{h2}", f"rejected:2:{h1}"])

    assert store.dead_letters() == [{"reason": "an entry of unknown target"}, letter(1, h2), letter(2, h1)], (
        "only the (connection, deployment) that was sent; deduped and rejected markers deliver nothing"
    )
    store.record_delivery(app("api"), snapshot(), [f"sent:2:{h1}", f"sent:1:{h2}", "sent:3:never-dead-lettered"])
    assert store.dead_letters() == [{"reason": "an entry of unknown target"}]


def test_a_backlog_delivery_takes_its_dead_letter_off_the_list_in_the_same_transaction(store: Store) -> None:
    """A deployment waiting in a connection's backlog that DevLake refused before (a dead letter) and accepts now
    leaves the dead-letter list with the item: settle_backlog, or record_delivery delivering the slot."""
    h1, h2 = "argocd:prod:argocd:api:9f1c2d3e:h1", "argocd:prod:argocd:api:9f1c2d3e:h2"
    store.add_dead_letter(letter(1, h1))
    store.add_dead_letter(letter(1, h2))
    store.add_dead_letter(letter(2, h1))
    items = [
        BacklogItem(BacklogSlot("prod", 1, h, f"queued:1:{h}"), app("api"), {"id": h}, (f"sent:1:{h}",), T0, "HTTP 401")
        for h in (h1, h2)
    ]
    store.record_delivery(app("api"), snapshot(), [], backlog=items)
    assert [item.slot.deployment_id for item in store.backlog("prod")] == [h1, h2]

    store.settle_backlog(items[0].slot, items[0].delivered_markers)
    assert store.dead_letters() == [letter(2, h1), letter(1, h2)], "connection 2's refusal stays"
    store.record_delivery(app("api"), snapshot(), list(items[1].delivered_markers), delivered=[items[1].slot])
    assert store.dead_letters() == [letter(2, h1)]
    assert store.backlog("prod") == []
    assert store.existing_markers([f"queued:1:{h1}", f"queued:1:{h2}", f"sent:1:{h1}", f"sent:1:{h2}"]) == {
        f"sent:1:{h1}",
        f"sent:1:{h2}",
    }


def test_a_dead_letter_refused_again_replaces_the_older_one(store: Store) -> None:
    store.add_dead_letter(letter(1, "h1", "first refusal"))
    store.add_dead_letter(letter(1, "h2"))
    store.add_dead_letter(letter(1, "h1", "second refusal"))

    assert store.dead_letters() == [letter(1, "h1", "second refusal"), letter(1, "h2")]
    store.record_delivery(app("api"), snapshot(), ["sent:1:h1"])
    assert store.dead_letters() == [letter(1, "h2")]


def test_a_delivery_failing_midway_keeps_its_dead_letter(store: Store, request: pytest.FixtureRequest) -> None:
    store.add_dead_letter(letter(1, "h8"))

    with _failing_marker(store, "boom", request) as failing, pytest.raises(StoreUnavailable):
        failing.record_delivery(app("api"), snapshot(history_id=8), ["sent:1:h8", "boom"])

    assert store.dead_letters() == [letter(1, "h8")], "taken off only with the sent marker, in one transaction"


def test_dead_letters_trimmed_by_the_cap_are_not_taken_off_again(store: Store) -> None:
    for n in range(DEAD_LETTER_CAP + 3):
        store.add_dead_letter(letter(1, f"h{n}"))

    store.record_delivery(app("api"), snapshot(), ["sent:1:h0", "sent:1:h1", "sent:1:h3"])

    remaining = store.dead_letters(limit=DEAD_LETTER_CAP)
    assert len(remaining) == DEAD_LETTER_CAP - 1
    assert remaining[-1] == letter(1, "h4") and remaining[0] == letter(1, f"h{DEAD_LETTER_CAP + 2}")
    if isinstance(store, RedisStore):
        index = store.client.hkeys(f"{store.key_prefix}:dead-letters-index")
        assert sorted(index) == sorted(f"1:h{n}" for n in range(4, DEAD_LETTER_CAP + 3)), "the index follows the list"


@pytest.fixture
def reopened_sqlite_store(sqlite_store: SQLiteStore) -> Iterator[SQLiteStore]:
    """The SQLite store's file opened again, by a new process: after its schema was changed behind its back."""
    sqlite_store.close()
    store = SQLiteStore(sqlite_store.path, sqlite_store.key_prefix)
    try:
        yield store
    finally:
        store.close()


def test_dead_letters_written_before_they_were_indexed_leave_the_list_when_delivered(
    store: Store, request: pytest.FixtureRequest
) -> None:
    """A store that already held dead letters when this version was installed."""
    old = [letter(1, "h1"), letter(1, "h2")]
    if isinstance(store, RedisStore):
        for entry in old:
            store.client.lpush(f"{store.key_prefix}:dead-letters", json.dumps({"version": 1, "data": entry}))
    else:
        assert isinstance(store, SQLiteStore)
        with _sqlite(store) as conn:
            conn.execute("DROP TABLE dead_letters")
            conn.execute(
                "CREATE TABLE dead_letters"
                " (id INTEGER PRIMARY KEY AUTOINCREMENT, prefix TEXT NOT NULL, json TEXT NOT NULL)"
            )
            for entry in old:
                conn.execute(
                    "INSERT INTO dead_letters (prefix, json) VALUES (?, ?)",
                    (store.key_prefix, json.dumps({"version": 1, "data": entry})),
                )
        store = request.getfixturevalue("reopened_sqlite_store")

    store.record_delivery(app("api"), snapshot(), ["sent:1:h1"])

    assert store.dead_letters() == [letter(1, "h2")]


def test_run_summaries_newest_first_and_capped(store: Store) -> None:
    for n in range(RUN_SUMMARY_CAP + 5):
        store.add_run_summary({"run": n, "delivered": n * 2})

    assert [summary["run"] for summary in store.run_summaries()] == list(
        range(RUN_SUMMARY_CAP + 4, RUN_SUMMARY_CAP - 16, -1)
    )
    everything = store.run_summaries(limit=1000)
    assert len(everything) == RUN_SUMMARY_CAP
    assert everything[-1] == {"run": 5, "delivered": 10}


# -- concurrency -----------------------------------------------------------------------------------


def test_worker_threads_can_share_one_store(store: Store) -> None:
    def deliver(worker: int) -> None:
        for i in range(25):
            key = app(f"app-{worker}-{i}")
            store.record_delivery(key, snapshot(uid=f"{worker}-{i}"), [f"sent:1:{worker}-{i}"])
            assert store.existing_markers([f"sent:1:{worker}-{i}"]) == {f"sent:1:{worker}-{i}"}

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(deliver, range(8)))

    assert len(store.snapshot_keys("prod")) == 200
    assert len(store.existing_markers([f"sent:1:{w}-{i}" for w in range(8) for i in range(25)])) == 200


# -- Redis specifics -------------------------------------------------------------------------------


def test_redis_values_are_versioned_json_under_the_prefix(redis_store: RedisStore) -> None:
    store = redis_store
    store.record_delivery(app("api"), snapshot(), ["sent:1:x"])
    store.set_initialized_at("prod", T0)
    store.acquire_lock("run", "me", 60)
    store.add_dead_letter({"reason": "400"})
    store.add_dead_letter({"connection": 1, "deployment_id": "y", "status": 400})
    store.add_run_summary({"delivered": 1})

    client, prefix = store.client, store.key_prefix
    assert sorted(client.scan_iter(match=f"{prefix}:*")) == sorted(
        f"{prefix}:{suffix}"
        for suffix in (
            "snap:prod",
            "mark:sent:1:x",
            "cluster:prod",
            "lock:run",
            "dead-letters",
            "dead-letters-index",
            "dead-letters-indexed",
            "runs",
        )
    )
    values = [
        client.hget(f"{prefix}:snap:prod", "argocd/api"),
        client.get(f"{prefix}:mark:sent:1:x"),
        client.get(f"{prefix}:cluster:prod"),
        client.get(f"{prefix}:lock:run"),
        *client.lrange(f"{prefix}:dead-letters", 0, -1),
        *client.hvals(f"{prefix}:dead-letters-index"),
        client.get(f"{prefix}:dead-letters-indexed"),
        *client.lrange(f"{prefix}:runs", 0, -1),
    ]
    assert all(isinstance(value, str) and json.loads(value)["version"] == 1 for value in values)


def test_unreachable_redis_raises_store_unavailable_without_the_password() -> None:
    store = RedisStore("redis://:s3cret-pw@127.0.0.1:1/0", "dora", retries=1)

    for call in (store.ping, lambda: store.load_snapshots([app("api")]), lambda: store.acquire_lock("run", "me", 60)):
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert "unreachable" in caught.value.reason
        assert "127.0.0.1:1" in caught.value.reason
        assert "s3cret-pw" not in caught.value.reason
        assert "s3cret-pw" not in str(caught.value)
    assert "s3cret-pw" not in repr(store)
    store.close()


def test_wrong_redis_password_is_reported_without_it(redis_url: str) -> None:
    parts = urlsplit(redis_url)
    host = parts.netloc.rsplit("@", 1)[-1]
    store = RedisStore(urlunsplit(parts._replace(netloc=f"nobody:wr0ng-pw@{host}")), "dora", retries=0)

    with pytest.raises(StoreUnavailable) as caught:
        store.ping()

    assert "wr0ng-pw" not in caught.value.reason
    store.close()


# -- open_store ------------------------------------------------------------------------------------


def test_open_store_defaults_to_sqlite_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    store = open_store(StateConfig())

    assert isinstance(store, SQLiteStore)
    store.set_initialized_at("prod", T0)
    store.close()
    assert (tmp_path / ".dora-reconciler" / "state.db").is_file()
    reopened = open_store(StateConfig())
    assert reopened.initialized_at("prod") == T0
    reopened.close()


def test_open_store_sqlite_relative_and_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    relative = open_store(StateConfig(url="sqlite:///data/relative.db", key_prefix="mine"))
    absolute = open_store(StateConfig(url=f"sqlite:///{tmp_path / 'abs' / 'state.db'}"))

    assert isinstance(relative, SQLiteStore) and isinstance(absolute, SQLiteStore)
    assert relative.path.resolve() == tmp_path / "data" / "relative.db"
    assert relative.key_prefix == "mine"
    assert absolute.path == tmp_path / "abs" / "state.db"
    assert absolute.path.is_absolute() and absolute.path.is_file()
    relative.close()
    absolute.close()


def test_open_store_redis(redis_url: str) -> None:
    store = open_store(StateConfig(url=redis_url, key_prefix=f"open-{uuid.uuid4().hex[:8]}"))
    try:
        assert isinstance(store, RedisStore)
        store.ping()
        assert store.snapshot_keys("prod") == []
    finally:
        store.close()


def test_sqlite_path_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="SQLite"):
        SQLiteStore(tmp_path, "dora")


def test_a_shared_lock_admits_its_group_and_keeps_another_out(store: Store) -> None:
    assert store.acquire_shared_lock("layout", "layout-3", "shard-0", 60)
    assert store.acquire_shared_lock("layout", "layout-3", "shard-1", 60), "another shard of the same layout"
    assert not store.acquire_shared_lock("layout", "layout-1", "manual", 60), "a run of another layout"
    assert not store.acquire_lock("layout", "someone", 60)
    assert store.renew_shared_lock("layout", "shard-0", 60)
    assert not store.renew_shared_lock("layout", "manual", 60), "only a holder renews its own hold"


def test_a_holder_leaving_a_shared_lock_releases_only_its_own_hold(store: Store) -> None:
    """Shards of one layout each hold the layout lock under their own token: the first to finish leaves the others
    holding it, and another layout gets in only once the last holder has left."""
    with RunLock(store, "layout", owner="shard-0", group="layout-3"):
        with RunLock(store, "layout", owner="shard-1", group="layout-3"):
            pass
        with pytest.raises(LockHeld):
            RunLock(store, "layout", owner="manual", group="layout-1").__enter__()
        assert not store.acquire_shared_lock("layout", "layout-1", "manual", 60), "shard-0 still holds it"
        store.release_shared_lock("layout", "stranger")
        assert not store.acquire_shared_lock("layout", "layout-1", "manual", 60), "only a holder releases its hold"
        assert store.renew_shared_lock("layout", "shard-0", 60)
        assert not store.renew_shared_lock("layout", "shard-1", 60), "shard-1 left"
    assert store.acquire_shared_lock("layout", "layout-1", "manual", 60), "the last holder left"


def test_lock_holder_names_an_exclusive_owner_or_a_shared_locks_group_and_live_holders(store: Store) -> None:
    """The "lock held" message reads who holds a lock: a run lock's RUN_ID@HOST, or the layout lock's group with
    the token of each run holding it now; a holder that left is no longer named, and a lock nobody holds is None."""
    before = datetime.now(UTC)
    assert store.acquire_lock("run", "3f2a9c1b7d4e@pod-a", 60)
    run = store.lock_holder("run")
    assert run is not None and run.owner == "3f2a9c1b7d4e@pod-a" and run.holders == ()
    assert run.expires_at is not None and before + timedelta(seconds=58) <= run.expires_at

    assert store.lock_holder("layout") is None
    assert store.acquire_shared_lock("layout", "layout-3", "b@pod-b", 60)
    assert store.acquire_shared_lock("layout", "layout-3", "a@pod-a", 60)
    layout = store.lock_holder("layout")
    assert layout is not None and layout.owner == "layout-3" and layout.holders == ("a@pod-a", "b@pod-b")
    assert layout.expires_at is not None and before + timedelta(seconds=58) <= layout.expires_at
    store.release_shared_lock("layout", "a@pod-a")
    layout = store.lock_holder("layout")
    assert layout is not None and layout.holders == ("b@pod-b",)
    store.release_shared_lock("layout", "b@pod-b")
    assert store.lock_holder("layout") is None


def test_an_expired_shared_lock_lets_another_layout_in(store: Store) -> None:
    with freeze_time(T0, ignore=["redis"]) as frozen:
        assert store.acquire_shared_lock("layout", "layout-3", "shard-0", 60)
        _let_lock_expire(store, "layout", lambda: frozen.tick(timedelta(seconds=61)))
        assert not store.renew_shared_lock("layout", "shard-0", 60), "expired"
        assert store.acquire_shared_lock("layout", "layout-1", "manual", 60)
