"""Shared fixtures: a real Redis server for the session and a state store per test on each backend."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import freezegun
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from reconciler.store import RedisStore, SQLiteStore, Store

REDIS_START_DEADLINE_SECONDS = 10.0

# Frozen time is for our code. The kubernetes client builds pydantic models lazily (a FakeDatetime there
# breaks its schemas), Redis keeps its own clock, and urllib3 checks the system time for TLS.
freezegun.configure(extend_ignore_list=["kubernetes", "redis", "urllib3", "pydantic", "pydantic_core"])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_redis(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    deadline = time.monotonic() + REDIS_START_DEADLINE_SECONDS
    try:
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                break
            try:
                process.wait(timeout=0.02)  # doubles as the poll interval and detects an early exit
            except subprocess.TimeoutExpired:
                continue
            break
    finally:
        client.close()
    process.kill()
    process.wait()
    pytest.fail(f"redis-server did not answer PING on port {port}:\n{log_path.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``$REDIS_URL``, else a throwaway ``redis-server`` on a free 127.0.0.1 port, stopped at session end."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: install it (apt-get install redis-server) or set REDIS_URL")
    directory = tmp_path_factory.mktemp("redis")
    port = _free_port()
    log_path = directory / "redis.log"
    with log_path.open("wb") as log_file:
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        process = subprocess.Popen(
            [*command, "--dir", str(directory)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_redis(process, port, log_path)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
