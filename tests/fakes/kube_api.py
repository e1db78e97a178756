"""A small fake Kubernetes API server that serves Argo CD Applications to the real ``kubernetes`` client.

It speaks just enough of the API for listing: ``GET /apis/argoproj.io/v1alpha1/applications`` (all namespaces)
and ``/apis/argoproj.io/v1alpha1/namespaces/{ns}/applications``, with ``limit``/``continue`` paging over a
consistent snapshot, equality label selectors, expiring continue tokens (410), injected failures, bearer-token
auth and a request log. Items are serialised once in ``set_apps`` so large lists are cheap to serve, and written
the way the API server writes them (Go's ``encoding/json``: compact, the keys of every object sorted).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from tests.fakes.server import FakeServer

API_PREFIX = "/apis/argoproj.io/v1alpha1"
MAX_OPEN_LISTS = 256


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: dict[str, str]
    status: int
    authorization: str | None

    @property
    def namespace(self) -> str | None:
        """The namespace of a namespaced list, ``None`` for the all-namespaces list or other paths."""
        prefix = f"{API_PREFIX}/namespaces/"
        if self.path.startswith(prefix) and self.path.endswith("/applications"):
            return self.path[len(prefix) : -len("/applications")]
        return None


@dataclass(frozen=True)
class EncodedApp:
    """An Application served exactly as ``body`` (JSON already written): for objects ``json.dumps`` cannot write,
    such as one nested deeper than Python's recursion limit, which the API server accepts (it allows 10,000)."""

    namespace: str
    name: str
    body: bytes

    @classmethod
    def nested(cls, app: Mapping[str, Any], path: Sequence[str], depth: int) -> EncodedApp:
        """``app`` with the object at ``path`` (e.g. ``spec.source.helm.valuesObject``) replaced by one nested
        ``depth`` levels deep: ``{"level":{"level":...{"level":0}...}}``."""
        marker = "\u0000nested\u0000"
        copy = json.loads(json.dumps(app))
        node = copy
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = marker
        nested = '{"level":' * depth + "0" + "}" * depth
        text = json.dumps(copy, separators=(",", ":"), sort_keys=True).replace(json.dumps(marker), nested)
        metadata = copy["metadata"]
        return cls(metadata["namespace"], metadata["name"], text.encode())


@dataclass(frozen=True)
class _Item:
    namespace: str | None
    labels: Mapping[str, str]
    body: bytes


@dataclass
class _OpenList:
    items: list[bytes]
    resource_version: str


class FakeKubeAPI(FakeServer):
    """``with FakeKubeAPI() as api: api.set_apps([...]); api.write_kubeconfig(tmp_path / "kubeconfig")``."""

    thread_name = "fake-kube-api"

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._items: list[_Item] = []
        self._resource_version = 1
        self._lists: OrderedDict[str, _OpenList] = OrderedDict()
        self._list_ids = itertools.count(1)
        self._expire_continues = 0
        self._failures: list[int] = []
        self._retry_after: int | None = None
        self._disconnects = 0
        self._hangs = 0
        self._released = threading.Event()
        self._token: str | None = None
        self._requests: list[RecordedRequest] = []
        self._list_calls = 0
        self._connections: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    def handler(self) -> type[BaseHTTPRequestHandler]:
        return _handler_for(self)

    def start(self) -> Self:
        self._released.clear()
        return super().start()

    def stopping(self) -> None:
        self._released.set()

    def stopped(self) -> None:
        """Cut every open connection, so clients see the server as down."""
        with self._lock:
            connections, self._connections = set(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    # -- controls --------------------------------------------------------------------------------

    def set_apps(self, apps: Iterable[Any]) -> None:
        """Replace every Application (a JSON value each, or an :class:`EncodedApp`). Lists already in progress keep
        serving their snapshot."""
        items: list[tuple[tuple[str, str], _Item]] = []
        for position, app in enumerate(apps):
            if isinstance(app, EncodedApp):
                items.append(((app.namespace, app.name), _Item(app.namespace, {}, app.body)))
                continue
            metadata = app.get("metadata") if isinstance(app, dict) else None
            metadata = metadata if isinstance(metadata, dict) else {}
            namespace = metadata.get("namespace")
            namespace = namespace if isinstance(namespace, str) else None
            name = metadata.get("name")
            labels = metadata.get("labels")
            labels = {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}
            body = json.dumps(app, separators=(",", ":"), sort_keys=True).encode()
            sort_key = (namespace or "", name if isinstance(name, str) else f"~{position:09d}")
            items.append((sort_key, _Item(namespace, labels, body)))
        items.sort(key=lambda pair: pair[0])
        with self._lock:
            self._items = [item for _, item in items]
            self._resource_version += 1

    def expire_continue_tokens(self, count: int = 1) -> None:
        """The next ``count`` requests carrying a continue token get 410 Gone (reason ``Expired``)."""
        with self._lock:
            self._expire_continues = count

    def fail_next(self, n: int, status: int = 500, retry_after: int | None = None) -> None:
        """The next ``n`` list requests answer ``status`` with a Kubernetes Status body (and ``Retry-After``)."""
        with self._lock:
            self._failures = [status] * n
            self._retry_after = retry_after

    def disconnect_next(self, n: int) -> None:
        """The next ``n`` list requests are answered by closing the connection (a protocol error)."""
        with self._lock:
            self._disconnects = n

    def hang_next(self, n: int) -> None:
        """The next ``n`` list requests get no answer until the server stops (the client's read timeout fires)."""
        with self._lock:
            self._hangs = n

    def require_token(self, token: str | None) -> None:
        """Answer 401 unless ``Authorization: Bearer <token>``; ``None`` turns auth off."""
        with self._lock:
            self._token = token

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def list_calls(self) -> int:
        with self._lock:
            return self._list_calls

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()
            self._list_calls = 0

    def write_kubeconfig(self, path: str | Path, token: str = "test-token", context: str = "fake") -> Path:
        """A kubeconfig whose context ``context`` (also current) points at this server with a bearer token."""
        path = Path(path)
        document = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": token}}],
            "contexts": [{"name": context, "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": context,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
        return path

    # -- request handling (called from handler threads) --------------------------------------------

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def _respond(self, method: str, raw_path: str, authorization: str | None) -> _Outcome | None:
        """What to answer (status, JSON body, headers), or ``None`` to drop the connection."""
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/")
        query = {key: values[-1] for key, values in parse_qs(parts.query, keep_blank_values=True).items()}
        namespace, is_list = _route(path)
        with self._lock:
            outcome = self._decide(method, is_list, namespace, query, authorization)
            status = outcome.status if outcome is not None else 0
            self._requests.append(RecordedRequest(method, path, query, status, authorization))
            if is_list:
                self._list_calls += 1
        return outcome

    def _decide(
        self, method: str, is_list: bool, namespace: str | None, query: dict[str, str], authorization: str | None
    ) -> _Outcome | None:
        if self._token is not None and authorization != f"Bearer {self._token}":
            return _Outcome(401, _status(401, "Unauthorized", "Unauthorized"))
        if not is_list:
            return _Outcome(404, _status(404, "NotFound", "the server could not find the requested resource"))
        if method != "GET":
            return _Outcome(405, _status(405, "MethodNotAllowed", f"{method} is not supported by the fake"))
        if self._disconnects:
            self._disconnects -= 1
            return None
        if self._hangs:
            self._hangs -= 1
            return _HANG
        if self._failures:
            failure = self._failures.pop()
            headers = {"Retry-After": str(self._retry_after)} if self._retry_after is not None else {}
            body = _status(failure, _REASONS.get(failure, "InternalError"), f"injected failure {failure}")
            return _Outcome(failure, body, headers)
        try:
            limit = int(query.get("limit") or 0)
            selector = _parse_selector(query.get("labelSelector", ""))
        except ValueError as error:
            return _Outcome(400, _status(400, "BadRequest", str(error)))
        token = query.get("continue") or ""
        if token:
            if self._expire_continues:
                self._expire_continues -= 1
                self._lists.clear()
                return _Outcome(410, _status(410, "Expired", _EXPIRED_MESSAGE))
            try:
                list_id, offset_text = base64.urlsafe_b64decode(token.encode()).decode().split(":")
                offset = int(offset_text)
                snapshot = self._lists[list_id]
            except (ValueError, KeyError):
                return _Outcome(410, _status(410, "Expired", _EXPIRED_MESSAGE))
        else:
            list_id, offset = str(next(self._list_ids)), 0
            selected = [
                item.body
                for item in self._items
                if (namespace is None or item.namespace == namespace)
                and all(item.labels.get(key) == value for key, value in selector)
            ]
            snapshot = _OpenList(selected, str(self._resource_version))
        end = len(snapshot.items) if limit <= 0 else min(offset + limit, len(snapshot.items))
        metadata: dict[str, Any] = {"resourceVersion": snapshot.resource_version}
        if end < len(snapshot.items):
            metadata["continue"] = base64.urlsafe_b64encode(f"{list_id}:{end}".encode()).decode()
            if not selector:
                metadata["remainingItemCount"] = len(snapshot.items) - end
            self._lists[list_id] = snapshot
            self._lists.move_to_end(list_id)
            while len(self._lists) > MAX_OPEN_LISTS:
                self._lists.popitem(last=False)
        else:
            self._lists.pop(list_id, None)
        tail = json.dumps({"metadata": metadata}, separators=(",", ":"), sort_keys=True).encode()
        body = b"".join(
            (
                b'{"apiVersion":"argoproj.io/v1alpha1","items":[',
                b",".join(snapshot.items[offset:end]),
                b'],"kind":"ApplicationList",',
                tail[1:],
            )
        )
        return _Outcome(200, body)


@dataclass(frozen=True)
class _Outcome:
    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


_HANG = _Outcome(0, b"")

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

_EXPIRED_MESSAGE = (
    "The provided continue parameter is too old to display a consistent list result. "
    "You can start a new list without the continue parameter."
)


def _status(code: int, reason: str, message: str) -> bytes:
    return json.dumps(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        }
    ).encode()


def _route(path: str) -> tuple[str | None, bool]:
    """``(namespace, is_applications_list)``."""
    if path == f"{API_PREFIX}/applications":
        return None, True
    prefix = f"{API_PREFIX}/namespaces/"
    if path.startswith(prefix) and path.endswith("/applications"):
        namespace = unquote(path[len(prefix) : -len("/applications")])
        if namespace and "/" not in namespace:
            return namespace, True
    return None, False


def _parse_selector(text: str) -> list[tuple[str, str]]:
    """``k=v[,k2==v2]``: equality requirements only."""
    requirements = []
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        key, sep, value = part.partition("==") if "==" in part else part.partition("=")
        if not sep or not key.strip() or key.strip().endswith("!"):
            raise ValueError(f"unsupported label selector requirement {part!r} (the fake knows only k=v)")
        requirements.append((key.strip(), value.strip()))
    return requirements


def _handler_for(api: FakeKubeAPI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        timeout = 30

        def setup(self) -> None:
            super().setup()
            api._track(self.connection, open_=True)

        def finish(self) -> None:
            api._track(self.connection, open_=False)
            with contextlib.suppress(OSError):
                super().finish()

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            outcome = api._respond(method, self.path, self.headers.get("Authorization"))
            if outcome is _HANG:
                api._released.wait()
                outcome = None
            if outcome is None:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.send_response(outcome.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(outcome.body)))
            for name, value in outcome.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(outcome.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
