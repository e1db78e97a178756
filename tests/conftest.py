"""Shared fixtures: a real Redis server for the session and a state store per test on each backend."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import freezegun
import pytest

from reconciler.store import RedisStore, SQLiteStore, Store
from tests.redis_server import RedisStartError, serving_redis

# Frozen time is for our code. The kubernetes client builds pydantic models lazily (a FakeDatetime there
# breaks its schemas), Redis keeps its own clock, and urllib3 checks the system time for TLS.
freezegun.configure(extend_ignore_list=["kubernetes", "redis", "urllib3", "pydantic", "pydantic_core"])


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``$REDIS_URL``, else a throwaway ``redis-server`` on a free 127.0.0.1 port, stopped at session end."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(serving_redis(tmp_path_factory.mktemp("redis")))
        except RedisStartError as error:
            pytest.fail(str(error))
        yield url


@pytest.fixture
def redis_store(redis_url: str) -> Iterator[RedisStore]:
    """A RedisStore under a key prefix unique to the test; its keys are deleted afterwards."""
    store = RedisStore(redis_url, key_prefix=f"test-{uuid.uuid4().hex[:12]}")
    try:
        yield store
    finally:
        keys = list(store.client.scan_iter(match=f"{store.key_prefix}:*", count=1000))
        if keys:
            store.client.delete(*keys)
        store.close()


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "state.db", key_prefix="test")
    try:
        yield store
    finally:
        store.close()


@pytest.fixture(params=["redis", "sqlite"])
def store(request: pytest.FixtureRequest) -> Store:
    """The same test once per backend."""
    backend: Store = request.getfixturevalue(f"{request.param}_store")
    return backend


@pytest.fixture(params=["sqlite", "redis"])
def state_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A state URL for each backend: end-to-end tests run on both (a test module may narrow it)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    url: str = request.getfixturevalue("redis_url")
    return url
