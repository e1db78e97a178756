"""What every fake HTTP service of the tests shares: a server on 127.0.0.1 (a free port) answering from a
daemon thread, started and stopped by ``with``. A fake gives its request handler (``handler``) and may hook
into stopping (release requests it holds, cut connections)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Self


class Running:
    """Something ``with`` starts and stops: a fake server, a ``redis-server``."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


class FakeServer(Running):
    thread_name = "fake-server"
    scheme = "http"

    def __init__(self) -> None:
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def handler(self) -> type[BaseHTTPRequestHandler]:
        raise NotImplementedError

    def prepare(self, server: ThreadingHTTPServer) -> None:
        """Adjust the bound server before it serves (wrap its socket in TLS)."""

    def stopping(self) -> None:
        """Called first when stopping: release whatever requests are held."""

    def stopped(self) -> None:
        """Called once the listening socket is closed: cut what is still connected."""

    def _bound(self) -> ThreadingHTTPServer:
        if self._server is None:
            server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
            server.daemon_threads = True
            self.prepare(server)
            self._server = server
        return self._server

    @property
    def url(self) -> str:
        host, port = self._bound().server_address[:2]
        return f"{self.scheme}://{host!s}:{port}"

    def start(self) -> Self:
        if self._thread is None:
            server = self._bound()
            self._thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.02}, name=self.thread_name, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening; a stopped fake can be started again (on another port)."""
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        self.stopping()
        if server is None:
            return
        if thread is not None:
            server.shutdown()
        server.server_close()
        self.stopped()
        if thread is not None:
            thread.join(timeout=5)

    def close(self) -> None:
        self.stop()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (free when asked: the caller binds it, or counts on a refusal)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
