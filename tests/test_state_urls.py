"""Every documented ``state.url`` form against a real ``redis-server``: TCP, TLS and a unix socket, with and
without a password and a database number, through the real CLI.

Two servers are started for the module, each listening on a TCP port, a TLS port (a self-signed certificate the
client is given as its CA) and a unix socket: one open, one with ``requirepass`` and an ACL user.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from reconciler.config import StateConfig
from reconciler.store import StoreUnavailable, open_store
from tests.fakes.hardening import never_wait
from tests.fakes.server import free_port
from tests.fakes.tls import self_signed_certificate
from tests.redis_server import START_DEADLINE_SECONDS, terminate
from tests.scenarios import Deploys
from tests.world import World, log_lines

PASSWORD = "state-Pa55word-0123456789"
ACL_USER, ACL_PASSWORD = "dora", "acl-Pa55word-9876543210"


@dataclass(frozen=True)
class RedisServer:
    port: int
    tls_port: int
    socket: Path
    ca: Path
    password: str | None

    def client(self, db: int) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), db=db, password=self.password, decode_responses=True)


def _start(directory: Path, password: str | None) -> tuple[subprocess.Popen[bytes], RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not on PATH: install it (apt-get install redis-server)")
    directory.mkdir()
    cert, key = self_signed_certificate(directory)
    server = RedisServer(free_port(), free_port(), directory / "redis.sock", cert, password)
    command = [binary, "--bind", "127.0.0.1", "--port", str(server.port), "--save", "", "--appendonly", "no"]
    command += ["--dir", str(directory), "--unixsocket", str(server.socket), "--unixsocketperm", "700"]
    command += ["--tls-port", str(server.tls_port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    command += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    if password is not None:
        command += ["--requirepass", password, "--user", ACL_USER, "on", f">{ACL_PASSWORD}", "~*", "&*", "+@all"]
    log_path = directory / "redis.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT)
    # The unix socket is created after the TCP and TLS listeners: once it exists, every listener is up.
    deadline = time.monotonic() + START_DEADLINE_SECONDS
    while not server.socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"redis-server did not start:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=0.02)  # doubles as the poll interval
    return process, server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, RedisServer]]:
    """``open`` (no password) and ``locked`` (``requirepass`` plus an ACL user)."""
    base = tmp_path_factory.mktemp("urls")
    started: list[subprocess.Popen[bytes]] = []
    try:
        found: dict[str, RedisServer] = {}
        for name, password in (("open", None), ("locked", PASSWORD)):
            process, server = _start(base / name, password)
            started.append(process)
            found[name] = server
        yield found
    finally:
        for process in started:
            terminate(process)


# (server, URL template, database the state must land in); {port}, {tls}, {sock}, {ca} are filled in.
FORMS = {
    "redis": ("open", "redis://127.0.0.1:{port}", 0),
    "redis-db": ("open", "redis://127.0.0.1:{port}/3", 3),
    "redis-password-db": ("locked", f"redis://:{PASSWORD}@127.0.0.1:{{port}}/2", 2),
    "redis-user-password": ("locked", f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{{port}}/4", 4),
    "redis-password-query": ("locked", f"redis://127.0.0.1:{{port}}/5?password={PASSWORD}", 5),
    "rediss": ("open", "rediss://127.0.0.1:{tls}/1?ssl_ca_certs={ca}", 1),
    "rediss-password": ("locked", f"rediss://:{PASSWORD}@127.0.0.1:{{tls}}/6?ssl_ca_certs={{ca}}", 6),
    "unix": ("open", "unix://{sock}", 0),
    "unix-db": ("open", "unix://{sock}?db=7", 7),
    "unix-password-db": ("locked", f"unix://:{PASSWORD}@{{sock}}?db=8", 8),
    "unix-user-password-query": ("locked", f"unix://{{sock}}?db=9&username={ACL_USER}&password={ACL_PASSWORD}", 9),
}


def url_of(server: RedisServer, template: str) -> str:
    return template.format(port=server.port, tls=server.tls_port, sock=server.socket, ca=server.ca)


@pytest.mark.parametrize("form", FORMS)
def test_every_documented_state_url_form_runs_every_command(
    form: str,
    servers: dict[str, RedisServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    never_wait(monkeypatch)
    name, template, db = FORMS[form]
    server = servers[name]
    url = url_of(server, template)
    with World(tmp_path, url, monkeypatch) as world:
        deploys = Deploys(world)
        assert world.run() == 0, "the baseline: locks, scripts, pipelines"
        wanted = deploys.next()
        assert world.run() == 0
        assert list(world.devlake.deployment_rows(1)) == [wanted]
        assert world.run() == 0, "a quiet run"
        assert world.devlake.post_count == 1
        capsys.readouterr()

        assert world.run(command="status") == 0
        assert "last 3 run(s)" in capsys.readouterr().out
        assert world.run(command="check") == 0
        out, err = capsys.readouterr()
        assert "state store: ok" in out
        assert all(secret not in out + err for secret in (PASSWORD, ACL_PASSWORD))

        client = server.client(db)
        try:
            assert client.keys(f"e2e-{tmp_path.name}:*"), f"the state is in database {db}"
        finally:
            client.close()
    assert not [line for line in log_lines(err) if line["level"] in ("error", "critical")]


def test_a_wrong_password_or_an_untrusted_certificate_is_a_clear_store_error(servers: dict[str, RedisServer]) -> None:
    locked, tls = servers["locked"], servers["open"]
    wrong = [
        f"unix://:not-{PASSWORD}@{locked.socket}",
        f"redis://:not-{PASSWORD}@127.0.0.1:{locked.port}/0",
        f"rediss://127.0.0.1:{tls.tls_port}/0",
    ]
    for url in wrong:
        store = open_store(StateConfig(url=url, key_prefix="wrong"))
        try:
            with pytest.raises(StoreUnavailable) as raised:
                store.ping()
        finally:
            store.close()
        assert PASSWORD not in str(raised.value)
    assert "certificate verify failed" in str(raised.value)
