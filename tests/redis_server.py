"""A ``redis-server`` of our own on a free 127.0.0.1 port, for the tests and the benchmarks.

``serving_redis`` gives ``$REDIS_URL`` when it is set, else starts a throwaway server without persistence.
``RedisServer`` with ``append_only`` keeps every write on disk (fsync always), so a test can kill it and start
it again on the same port with its data.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.fakes.server import Running, free_port

START_DEADLINE_SECONDS = 10.0


class RedisStartError(RuntimeError):
    """``redis-server`` is missing or did not answer PING; the message carries its log."""


class RedisServer(Running):
    def __init__(self, directory: Path, *, append_only: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisStartError(
                "redis-server is not on PATH: install it (apt-get install redis-server) or set REDIS_URL"
            )
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = directory / "redis.log"
        self._command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
        self._command += ["--appendonly", "yes", "--appendfsync", "always"] if append_only else ["--appendonly", "no"]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        """Start it and wait until it answers PING. Raises ``RedisStartError``."""
        with self.log_path.open("ab") as log:
            self._process = process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + START_DEADLINE_SECONDS
        try:
            while time.monotonic() < deadline:
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    pass
                try:
                    process.wait(timeout=0.02)  # doubles as the poll interval and notices an early exit
                except subprocess.TimeoutExpired:
                    continue
                break
        finally:
            client.close()
        self.kill()
        raise RedisStartError(f"redis-server did not answer PING on port {self.port}:\n{self._log()}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            terminate(process)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the clients."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def _log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"


def terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it does not go within ten seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def serving_redis(directory: Path) -> Iterator[str]:
    """``$REDIS_URL``, else the URL of a throwaway ``redis-server`` in ``directory``, stopped on exit."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    with RedisServer(directory) as server:
        yield server.url
