"""Listing Argo CD Applications from one cluster: through the Kubernetes API, or from an exported file.

One independent ``ApiClient`` per cluster (the global default configuration is never touched), paged lists
(``limit``/``continue``) streamed page by page, a restart of the list when the continue token expires (410),
short retries for transient failures, and every failure surfaced as ``ClusterUnavailable`` with a reason an
operator can act on. Items are returned as raw dicts; parsing them is ``application.py``'s job.

``listed_pages()`` also hands out each item's JSON as the API server sent it, cut out of the page without decoding
it (``cut_list``): the steady-state fast path (``settled.py``) recognises an unchanged Application from those bytes,
so a quiet run does not decode what it does not need.

A cluster entry with ``applications_file`` is listed by :class:`FileLister` instead: the same pages of raw
items, selected by ``namespaces`` and ``label_selector`` as the API server would, so the reconciler cannot tell
the difference (:func:`open_lister` picks the lister).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple, Protocol, cast

import urllib3
import yaml
from kubernetes import config as kube_config
from kubernetes.client import ApiClient, Configuration, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from reconciler.application import UnreadableApplication
from reconciler.config import ClusterConfig
from reconciler.run import Stopping

log = logging.getLogger(__name__)

GROUP = "argoproj.io"
VERSION = "v1alpha1"
PLURAL = "applications"

CONNECT_TIMEOUT_SECONDS = 5.0
MIN_READ_TIMEOUT_SECONDS = 0.05
MAX_RESTARTS = 3
"""How many times one listing is restarted from the beginning after its continue token expired."""
ATTEMPTS = 4
"""Tries per request when the failure is transient (connection errors, timeouts, 429, 5xx)."""
MAX_RETRY_AFTER_SECONDS = 10.0
_REASON_LIMIT = 300
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")


class ClusterUnavailable(Exception):
    """The cluster could not be listed. ``str(error)`` is the reason (the cluster name is ``.cluster``)."""

    def __init__(self, cluster: str, reason: str) -> None:
        super().__init__(reason)
        self.cluster = cluster
        self.reason = reason

    def __reduce__(self) -> tuple[type[ClusterUnavailable], tuple[str, str]]:
        return type(self), (self.cluster, self.reason)


# -- client construction -------------------------------------------------------------------------------


def build_api_client(cluster: ClusterConfig) -> ApiClient:
    """An ``ApiClient`` of its own for ``cluster``: its kubeconfig (and context), else ``$KUBECONFIG`` or
    ``~/.kube/config`` when one exists, else the pod's service account. Raises ``ClusterUnavailable``."""
    configuration = Configuration()
    kubeconfig = _kubeconfig_for(cluster)
    try:
        if kubeconfig is not None:
            kube_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=kubeconfig,
                context=cluster.context,
                client_configuration=configuration,
                persist_config=False,
            )
        else:
            kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except Exception as error:  # the loaders raise ConfigException, YAML, OS and plain KeyError/TypeError alike
        source = f"kubeconfig {kubeconfig}" if kubeconfig is not None else "the in-cluster service account"
        detail = _clean(_first_line(str(error)) or type(error).__name__, _secrets_of(configuration))
        if kubeconfig is None:
            detail += " (no kubeconfig found in $KUBECONFIG or ~/.kube/config, and not running in a pod)"
        raise ClusterUnavailable(cluster.name, f"cannot load {source}: {detail}") from None
    if not cluster.verify_tls:
        configuration.verify_ssl = False
    # Retries belong to the lister (tenacity, with backoff and logging): without this urllib3 would retry
    # connection and read errors 3 more times itself, so a hung server would cost 4 read timeouts per attempt.
    configuration.retries = urllib3.Retry(
        total=2, connect=0, read=0, other=0, status=0, redirect=2, respect_retry_after_header=False
    )
    return ApiClient(configuration=configuration)


def _kubeconfig_for(cluster: ClusterConfig) -> str | None:
    """The kubeconfig to load (possibly a ``:``-separated ``$KUBECONFIG`` list), or ``None`` for in-cluster."""
    if cluster.kubeconfig:
        path = Path(cluster.kubeconfig).expanduser()
        if not path.is_file():
            raise ClusterUnavailable(cluster.name, f"kubeconfig {path} does not exist")
        return str(path)
    environment = os.environ.get("KUBECONFIG", "")
    paths = [Path(part).expanduser() for part in environment.split(os.pathsep) if part]
    if any(path.is_file() for path in paths):
        return os.pathsep.join(str(path) for path in paths if path.is_file())
    default = Path("~/.kube/config").expanduser()
    if default.is_file():
        return str(default)
    if cluster.context:
        raise ClusterUnavailable(
            cluster.name,
            f"context {cluster.context!r} is configured but no kubeconfig was found "
            "(set kubeconfig, $KUBECONFIG or ~/.kube/config)",
        )
    return None


# -- listing -----------------------------------------------------------------------------------------


class _Expired(Exception):
    """The list's continue token expired (410 Gone)."""


class ClusterLister:
    """Lists the Argo CD Applications of one cluster, page by page.

    ``pages()`` yields each page's items as soon as it arrives, so memory stays at about one page. Without an
    injected ``api_client`` each ``pages()`` call builds its own from the cluster config (picking up rotated
    credentials) and closes it when the iteration ends.
    """

    def __init__(
        self,
        cluster: ClusterConfig,
        api_client: ApiClient | None = None,
        *,
        sleep: Callable[[float], None] = time.sleep,
        attempts: int = ATTEMPTS,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.cluster = cluster
        self._api_client = api_client
        self._sleep = sleep
        self._attempts = max(1, attempts)
        self._max_restarts = max(0, max_restarts)
        read = max(cluster.request_timeout.total_seconds(), MIN_READ_TIMEOUT_SECONDS)
        self._timeout = (min(CONNECT_TIMEOUT_SECONDS, read), read)
        self._secrets: tuple[str, ...] = ()
        self._host = "the API server"
        self.requests = 0
        """List requests sent (attempts included) over this lister's lifetime."""
        self.restarts = 0
        """Listings restarted after an expired continue token."""
        self.expected: int | None = None
        """How many Applications the listing in hand holds, by the API server's count (the first page's items plus
        its ``remainingItemCount``); ``None`` when it gives none (a label selector, one page) or for several
        namespaces listed in turn."""

    @property
    def name(self) -> str:
        return self.cluster.name

    def pages(self) -> Iterator[list[dict[str, Any]]]:
        """Raw Application dicts, page by page: every namespace (or each configured one in turn).

        An Application is yielded once per listing even when an expired continue token forces a restart.
        Items are passed on as the server sent them, malformed ones included. Raises ``ClusterUnavailable``.
        """
        seen: set[tuple[str, str]] = set()
        for listed in self.listed_pages():
            page = []
            for item in listed.items():
                identity = _identity(item, listed.namespace)
                if identity in seen:
                    continue
                seen.add(identity)
                page.append(item)
            if page:
                yield page

    def listed_pages(self) -> Iterator[ListedPage]:
        """Every page as the API server sent it (``ListedPage``), empty ones included.

        Unlike ``pages()``, nothing is left out: after an expired continue token forced a restart, the Applications
        already yielded come again, and the caller skips those it has seen. Raises ``ClusterUnavailable``, also
        from ``ListedPage.items()``.
        """
        owned = self._api_client is None
        api_client = build_api_client(self.cluster) if self._api_client is None else self._api_client
        try:
            self._secrets = _secrets_of(api_client.configuration)
            self._host = str(api_client.configuration.host or self._host)
            api = CustomObjectsApi(api_client)
            namespaces: list[str | None] = list(dict.fromkeys(self.cluster.namespaces)) or [None]
            for namespace in namespaces:
                yield from self._listing(api, namespace)
        finally:
            if owned:
                api_client.close()  # type: ignore[no-untyped-call]

    def _listing(self, api: CustomObjectsApi, namespace: str | None) -> Iterator[ListedPage]:
        restarts = 0
        token: str | None = None
        single = len(self.cluster.namespaces) <= 1
        while True:
            try:
                response = self._fetch(api, namespace, token)
            except _Expired:
                if restarts >= self._max_restarts:
                    raise ClusterUnavailable(
                        self.name,
                        f"the continue token of the Application list {_scope(namespace)} kept expiring; "
                        f"gave up after {restarts} restarts (is the reconciler too slow between pages?)",
                    ) from None
                restarts += 1
                self.restarts += 1
                log.warning(
                    "continue token expired; restarting the list",
                    extra={"cluster": self.name, "namespace": namespace, "restart": restarts},
                )
                token = None
                continue
            first = token is None
            page, token, remaining = self._page(response, namespace, restarted=first and restarts > 0)
            if first and single:
                self.expected = None if remaining is None else page.count() + remaining
            yield page
            if not token:
                return

    def _page(
        self, body: bytes, namespace: str | None, *, restarted: bool
    ) -> tuple[ListedPage, str | None, int | None]:
        """The page, its continue token and the list's ``remainingItemCount``."""
        metadata: Any
        cut = cut_list(body)
        if cut is not None:
            encoded, metadata = cut
            page = ListedPage(namespace, lambda: self._decoded(body, namespace)[0], encoded, restarted=restarted)
        else:
            items, metadata = self._decoded(body, namespace)
            page = ListedPage(namespace, lambda: items, restarted=restarted)
        return page, _continue_token(metadata), _remaining_items(metadata)

    def _decoded(self, body: bytes, namespace: str | None) -> tuple[list[Any], Any]:
        """The page's items and the list's metadata, decoded."""
        try:
            response = decode_page(body)
        except ValueError as error:
            detail = self._clean(_first_line(str(error)))
            raise ClusterUnavailable(self.name, f"the API server's answer could not be read: {detail}") from None
        return self._unpack(response, namespace)

    def _fetch(self, api: CustomObjectsApi, namespace: str | None, token: str | None) -> bytes:
        retrying = Retrying(
            retry=retry_if_exception(_transient),
            stop=stop_after_attempt(self._attempts),
            wait=_wait,
            sleep=self._sleep,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._request, api, namespace, token)
        except Stopping:
            raise ClusterUnavailable(self.name, "the process is stopping: listing left for the next run") from None
        except ApiException as error:
            if error.status == 410:
                raise _Expired from None
            raise ClusterUnavailable(self.name, self._api_reason(error, namespace)) from None
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise ClusterUnavailable(self.name, self._connection_reason(error)) from None
        except ValueError as error:  # the client's own argument validation
            detail = self._clean(_first_line(str(error)))
            raise ClusterUnavailable(self.name, f"the API server's answer could not be read: {detail}") from None

    def _request(self, api: CustomObjectsApi, namespace: str | None, token: str | None) -> bytes:
        """One page's body, decoded here rather than by the client (see :func:`cut_list`, :func:`decode_page`)."""
        self.requests += 1
        kwargs: dict[str, Any] = {
            "limit": self.cluster.page_size,
            "_request_timeout": self._timeout,
            "_preload_content": False,
        }
        if token:
            kwargs["_continue"] = token
        if self.cluster.label_selector:
            kwargs["label_selector"] = self.cluster.label_selector
        if namespace is None:
            answer = api.list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)
        else:
            answer = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kwargs)
        response = cast(urllib3.BaseHTTPResponse, answer)
        try:
            body = response.data
        finally:
            response.release_conn()
        return body if isinstance(body, bytes) else bytes(body)

    def _unpack(self, response: Any, namespace: str | None) -> tuple[list[Any], Any]:
        if not isinstance(response, dict):
            raise ClusterUnavailable(self.name, f"the API server's answer {_scope(namespace)} is not a Kubernetes list")
        items = response.get("items") or []
        if not isinstance(items, list):
            raise ClusterUnavailable(self.name, f"the API server's list {_scope(namespace)} has no items array")
        return items, response.get("metadata")

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        reason = self._describe(error) if error is not None else "unknown"
        log.warning(
            "listing Applications failed; retrying",
            extra={"cluster": self.name, "reason": reason, "attempt": state.attempt_number},
        )

    # -- reasons -------------------------------------------------------------------------------------

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, ApiException):
            return self._clean(f"HTTP {error.status} {error.reason or ''}".strip())
        return self._connection_reason(error)

    def _api_reason(self, error: ApiException, namespace: str | None) -> str:
        status = error.status
        message = self._clean(_status_message(error.body))
        suffix = f" ({message})" if message else ""
        if status == 401:
            return (
                "unauthorized (401): the API server rejected the credentials; the token may be expired or revoked"
                + suffix
            )
        if status == 403:
            return (
                f"forbidden (403): the service account needs list on applications.argoproj.io {_scope(namespace)}"
                + suffix
            )
        if status == 404:
            return (
                "not found (404): the API server does not serve applications.argoproj.io/v1alpha1 "
                "(is Argo CD's Application CRD installed?)" + suffix
            )
        if _transient(error):
            return f"HTTP {status} from the API server after {self._attempts} attempts{suffix}"
        if not status:
            return f"TLS or protocol error: {self._clean(_first_line(str(error.reason or '')))}"
        return f"HTTP {status} {error.reason or ''}".rstrip() + suffix

    def _connection_reason(self, error: BaseException) -> str:
        cause = error.reason if isinstance(error, urllib3.exceptions.MaxRetryError) and error.reason else error
        host = self._host
        if isinstance(cause, urllib3.exceptions.SSLError):
            detail = self._clean(_first_line(str(cause)))
            return f"TLS handshake with {host} failed: {detail} (check the cluster CA, or set verify_tls: false)"
        timed_out = isinstance(cause, urllib3.exceptions.TimeoutError | TimeoutError) and not isinstance(
            cause, urllib3.exceptions.NewConnectionError
        )
        kind = "timed out" if timed_out else "failed"
        detail = self._clean(_first_line(_strip_pool(str(cause))) or type(cause).__name__)
        if not _transient(error):
            return f"connection to {host} failed: {detail}"
        return f"connection to {host} {kind} after {self._attempts} attempts: {detail}"

    def _clean(self, text: str) -> str:
        return _clean(text, self._secrets)


def _continue_token(metadata: Any) -> str | None:
    """The continue token of a list's ``metadata``; ``None`` on the last page."""
    token = metadata.get("continue") if isinstance(metadata, dict) else None
    return token if isinstance(token, str) and token else None


def _remaining_items(metadata: Any) -> int | None:
    """The ``remainingItemCount`` of a list's ``metadata``, when the API server gives one."""
    value = metadata.get("remainingItemCount") if isinstance(metadata, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _transient(error: BaseException) -> bool:
    if isinstance(error, ApiException):
        status = error.status if isinstance(error.status, int) else 0
        return status in (408, 429) or 500 <= status <= 599
    permanent = (urllib3.exceptions.SSLError, urllib3.exceptions.LocationValueError)
    if isinstance(error, urllib3.exceptions.MaxRetryError):
        return not isinstance(error.reason, permanent)
    return isinstance(error, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError) and not isinstance(
        error, permanent
    )


_backoff = wait_exponential_jitter(multiplier=0.5, max=5, jitter=0.5)


def _wait(state: RetryCallState) -> float:
    """Exponential backoff, or the server's ``Retry-After`` (capped) when it sent one."""
    error = state.outcome.exception() if state.outcome is not None else None
    if isinstance(error, ApiException) and error.headers:
        retry_after = error.headers.get("Retry-After")
        try:
            return min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_SECONDS)
        except (TypeError, ValueError):
            pass
    return float(_backoff(state))


class EncodedItem(NamedTuple):
    """One item of a page as the API server sent it: its JSON, its ``metadata`` decoded alone and the offset in
    ``body`` where that ends (both ``None`` when it cannot be read)."""

    metadata: Any
    body: bytes
    metadata_end: int | None


class ListedPage:
    """One page of a listing. ``items()`` decodes it (once): what ``pages()`` yields. ``encoded`` is each item
    cut out of the page without decoding it, when the page is laid out the way the API server writes lists
    (:func:`cut_list`), else ``None``. ``restarted``: the first page of a listing started again after an expired
    continue token (the Applications read before come again)."""

    def __init__(
        self,
        namespace: str | None,
        decode: Callable[[], list[Any]],
        encoded: list[bytes] | None = None,
        *,
        restarted: bool = False,
    ) -> None:
        self.namespace = namespace
        self.restarted = restarted
        self._decode = decode
        self._items: list[Any] | None = None
        self._encoded = encoded

    @classmethod
    def decoded(cls, items: list[Any], namespace: str | None = None) -> ListedPage:
        """A page whose items are already decoded (nothing to cut)."""
        return cls(namespace, lambda: items)

    def items(self) -> list[Any]:
        if self._items is None:
            self._items = self._decode()
        return self._items

    def count(self) -> int:
        """How many items the page holds: the pieces it was cut into, unless it was decoded (a wrong cut makes more
        pieces than items, and is then decoded)."""
        if self._items is None and self._encoded is not None:
            return len(self._encoded)
        return len(self.items())

    @cached_property
    def encoded(self) -> list[EncodedItem] | None:
        if self._encoded is None:
            return None
        return [encoded_item(body) for body in self._encoded]


# -- decoding a page ---------------------------------------------------------------------------------

_LIST_HEAD = b'{"apiVersion":"argoproj.io/v1alpha1","items":['
_LIST_TAIL = b'],"kind":"ApplicationList","metadata":'
_ITEM_HEAD = b'{"apiVersion":"argoproj.io/v1alpha1","kind":"Application","metadata":'
_ITEM_SEPARATOR = b"," + _ITEM_HEAD
_DECODER = json.JSONDecoder()


def cut_list(body: bytes) -> tuple[list[bytes], dict[str, Any]] | None:
    """The items of a list answer, each as the JSON the API server wrote, cut apart without decoding them, and the
    list's ``metadata`` (continue token, ``remainingItemCount``); ``None`` when the answer is not laid out the way
    the API server writes lists of Applications (the keys of every object in order: ``apiVersion``, ``items``,
    ``kind``, ``metadata`` for the list, ``apiVersion``, ``kind``, ``metadata``, ... for each item), which is then
    decoded as a whole.

    Each item starts with the same bytes, and the page is cut wherever a comma and those bytes appear. An object
    shaped like an Application nested inside an item (a Helm value holding manifests, say) makes a wrong cut:
    then at least one of the pieces is not a JSON value on its own, which whoever decodes the pieces notices.
    """
    if not body.startswith(_LIST_HEAD):
        return None
    tail = body.rfind(_LIST_TAIL)
    if tail < len(_LIST_HEAD) - 1:
        return None
    try:
        text = body[tail + len(_LIST_TAIL) :].decode()
        metadata, end = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        return None
    if text[end:] != "}" or not isinstance(metadata, dict):
        return None
    items = body[len(_LIST_HEAD) : tail]
    if not items:
        return [], metadata
    if not items.startswith(_ITEM_HEAD):
        return None
    first, *rest = items.split(_ITEM_SEPARATOR)
    return [first, *(_ITEM_HEAD + piece for piece in rest)], metadata


def encoded_item(body: bytes) -> EncodedItem:
    """An item cut by :func:`cut_list`, with its metadata decoded alone (``None`` when it cannot be)."""
    try:
        text = body.decode()
        metadata, end = _DECODER.raw_decode(text, len(_ITEM_HEAD))
    except (ValueError, RecursionError):
        return EncodedItem(None, body, None)
    return EncodedItem(metadata, body, end if len(text) == len(body) else len(text[:end].encode()))


DEEPEST_PATH_PARTS = 4
"""How much of the path to the deepest point of an unreadable item its reason names."""
SPEC_MIRROR_LEVELS = 8
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_SCALAR = re.compile(r"[^\s,\]}]+")
_STRUCTURAL = re.compile(r'["\[\]{}]')


def decode_page(body: bytes | str) -> Any:
    """A list response's JSON, where one item too deeply nested to decode does not lose the page.

    ``json.loads`` recurses once per nesting level, so an object nested ~1,000 levels (the API server allows
    10,000, in free-form fields such as ``spec.source.helm.valuesObject``) raises ``RecursionError`` for the
    whole page. Then the page is walked without recursion and its items are decoded one by one: each one
    that still cannot be decoded becomes an :class:`UnreadableApplication` naming how deep it goes and where.
    Raises ``ValueError`` when the body is not JSON, or the list itself cannot be decoded.
    """
    try:
        return json.loads(body)
    except RecursionError:
        pass
    text = body.decode("utf-8") if isinstance(body, bytes) else body
    try:
        return _decode_item_by_item(text)
    except (RecursionError, IndexError) as error:
        raise ValueError(f"the list could not be decoded ({type(error).__name__})") from None


def _decode_item_by_item(text: str) -> Any:
    start = _skip_whitespace(text, 0)
    if text[start] != "{":
        raise ValueError("not a JSON object")
    page: dict[str, Any] = {}
    for key, value_start, value_end in _members(text, start):
        if key != "items" or text[value_start] != "[":
            page[key] = json.loads(text[value_start:value_end])
            continue
        page[key] = [_decode_item(text, item_start, item_end) for item_start, item_end in _elements(text, value_start)]
    return page


def _decode_item(text: str, start: int, end: int) -> Any:
    try:
        return json.loads(text[start:end])
    except RecursionError:
        pass
    depth, path = _deepest(text, start)
    where = f" (deepest under {path})" if path else ""
    reason = f"nested {depth} levels deep{where}: too deep to be read"
    namespace = name = None
    if text[start] == "{":
        metadata = next((value for key, value, _ in _members(text, start) if key == "metadata"), None)
        if metadata is not None and text[metadata] == "{":
            for key, value_start, value_end in _members(text, metadata):
                if key in ("namespace", "name") and text[value_start] == '"':
                    found = json.loads(text[value_start:value_end])
                    namespace, name = (found, name) if key == "namespace" else (namespace, found)
    return UnreadableApplication(reason, namespace, name)


def _deepest(text: str, start: int) -> tuple[int, str]:
    """How many levels the value at ``start`` nests, and the path to its deepest point (a few parts of it).

    The ``spec`` is named when it is about as deep as the deepest part: ``status`` (history, comparedTo) and
    ``metadata.managedFields`` mirror it a few levels deeper, but the spec is what someone wrote."""
    depth = _value_end(text, start)[1]
    parts: list[str] = []
    position = start
    while len(parts) < DEEPEST_PATH_PARTS and text[position] in "[{":
        if text[position] == "{":
            children = [(key, value) for key, value, _ in _members(text, position)]
        else:
            children = [(f"[{index}]", item) for index, (item, _) in enumerate(_elements(text, position))]
        depths = [(_value_end(text, value)[1], key, value) for key, value in children]
        if not depths:
            break
        deepest = max(depths, key=lambda child: child[0])
        spec = next((child for child in depths if child[1] == "spec"), None) if not parts else None
        if spec is not None and spec[0] >= deepest[0] - SPEC_MIRROR_LEVELS:
            deepest = spec
        parts.append(deepest[1])
        position = deepest[2]
    path = ".".join(parts).replace(".[", "[")
    return depth, path + ("…" if path and text[position] in "[{" else "")


def _skip_whitespace(text: str, position: int) -> int:
    match = _WHITESPACE.match(text, position)
    return match.end() if match else position


def _value_end(text: str, start: int) -> tuple[int, int]:
    """Where the JSON value at ``start`` ends, and how many levels of arrays and objects it nests (no recursion)."""
    first = text[start]
    if first == '"':
        string = _STRING.match(text, start)
        if string is None:
            raise ValueError("unterminated string")
        return string.end(), 0
    if first not in "[{":
        scalar = _SCALAR.match(text, start)
        if scalar is None:
            raise ValueError(f"unexpected {first!r}")
        return scalar.end(), 0
    depth = deepest = 0
    position = start
    while True:
        found = _STRUCTURAL.search(text, position)
        if found is None:
            raise ValueError("unterminated array or object")
        mark = found.group()
        if mark == '"':
            string = _STRING.match(text, found.start())
            if string is None:
                raise ValueError("unterminated string")
            position = string.end()
            continue
        position = found.end()
        if mark in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
            if depth == 0:
                return position, deepest


def _members(text: str, start: int) -> Iterator[tuple[str, int, int]]:
    """``(key, value start, value end)`` of the object at ``start``."""
    position = _skip_whitespace(text, start + 1)
    if text[position] == "}":
        return
    while True:
        key = _STRING.match(text, position)
        if key is None:
            raise ValueError("expected an object key")
        position = _skip_whitespace(text, key.end())
        if text[position] != ":":
            raise ValueError("expected ':'")
        value_start = _skip_whitespace(text, position + 1)
        value_end = _value_end(text, value_start)[0]
        yield json.loads(key.group()), value_start, value_end
        position = _skip_whitespace(text, value_end)
        if text[position] == "}":
            return
        if text[position] != ",":
            raise ValueError("expected ',' or '}'")
        position = _skip_whitespace(text, position + 1)


def _elements(text: str, start: int) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each element of the array at ``start``."""
    position = _skip_whitespace(text, start + 1)
    if text[position] == "]":
        return
    while True:
        end = _value_end(text, position)[0]
        yield position, end
        position = _skip_whitespace(text, end)
        if text[position] == "]":
            return
        if text[position] != ",":
            raise ValueError("expected ',' or ']'")
        position = _skip_whitespace(text, position + 1)


def _identity(item: Any, namespace: str | None) -> tuple[str, str]:
    """``(namespace, name)``; a digest of the item for malformed ones so they are still deduplicated."""
    metadata = item.get("metadata") if isinstance(item, dict) else None
    if isinstance(metadata, dict):
        name = metadata.get("name")
        item_namespace = metadata.get("namespace")
        if isinstance(name, str) and name:
            return (item_namespace if isinstance(item_namespace, str) else namespace or "", name)
    digest = hashlib.sha256(json.dumps(item, sort_keys=True, default=repr).encode()).hexdigest()
    return ("\0malformed", digest)


def _scope(namespace: str | None) -> str:
    return f"in namespace {namespace}" if namespace else "at cluster scope"


def _status_message(body: Any) -> str:
    """The ``message`` of a Kubernetes Status body, if the body is one."""
    if not isinstance(body, str | bytes) or not body:
        return ""
    try:
        status = json.loads(body)
    except ValueError:
        return ""
    message = status.get("message") if isinstance(status, dict) else None
    return _first_line(message) if isinstance(message, str) else ""


def _secrets_of(configuration: Configuration) -> tuple[str, ...]:
    values: list[str] = []
    for value in (getattr(configuration, "api_key", None) or {}).values():
        if isinstance(value, str):
            values.append(_BEARER.sub("", value).strip())
    password = getattr(configuration, "password", None)
    if isinstance(password, str):
        values.append(password)
    return tuple(value for value in values if len(value) >= 4)


def _clean(text: str, secrets: tuple[str, ...]) -> str:
    """Short, one line, with bearer tokens and known secrets masked."""
    for secret in secrets:
        text = text.replace(secret, "***")
    text = _BEARER.sub(r"\1***", text)
    return text if len(text) <= _REASON_LIMIT else text[: _REASON_LIMIT - 1] + "…"


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def _strip_pool(text: str) -> str:
    """``HTTPConnection(host=..., port=...): Failed to establish ...`` -> the part after the pool repr."""
    match = re.match(r"^(?:<[\w.]+ object at 0x[0-9a-f]+>|\w+\([^)]*\)): (.*)$", text)
    return match.group(1) if match else text


# -- one lister or the other -------------------------------------------------------------------------


class ApplicationLister(Protocol):
    """What the reconciler needs of a lister: the cluster's name and its Applications, page by page."""

    @property
    def name(self) -> str: ...

    @property
    def expected(self) -> int | None:
        """How many Applications the listing holds, when known (after its first page)."""

    def pages(self) -> Iterator[list[dict[str, Any]]]:
        """The Applications, decoded, page by page, each once."""

    def listed_pages(self) -> Iterator[ListedPage]:
        """The pages as listed (``ClusterLister.listed_pages``): what the reconciler reads."""


def open_lister(
    cluster: ClusterConfig, *, sleep: Callable[[float], None] = time.sleep, attempts: int = ATTEMPTS
) -> ClusterLister | FileLister:
    """The lister of a cluster entry: its ``applications_file`` when it has one, else the Kubernetes API."""
    if cluster.applications_file is not None:
        return FileLister(cluster)
    return ClusterLister(cluster, sleep=sleep, attempts=attempts)


# -- Applications from a file ------------------------------------------------------------------------

LIST_KINDS = ("ApplicationList", "List")
"""``kubectl get applications.argoproj.io -A -o json`` writes a ``List``; the API server an ``ApplicationList``."""


if yaml.__with_libyaml__:  # libyaml: fast, and it refuses nesting deeper than 1,000 levels instead of recursing

    class _ExportLoader(yaml.CSafeLoader):
        """YAML read the way JSON is: an unquoted timestamp stays the text Argo CD wrote, not a ``datetime``."""

else:  # pragma: no cover - PyYAML's wheels ship libyaml

    class _ExportLoader(yaml.SafeLoader):  # type: ignore[no-redef]
        """YAML read the way JSON is: an unquoted timestamp stays the text Argo CD wrote, not a ``datetime``."""


_ExportLoader.add_constructor(
    "tag:yaml.org,2002:timestamp", lambda loader, node: loader.construct_scalar(cast(yaml.ScalarNode, node))
)


class FileLister:
    """Lists the Applications of one cluster entry from a file exported with
    ``kubectl get applications.argoproj.io -A -o json`` (or ``-o yaml``).

    Accepted: an ``ApplicationList`` or a ``List`` (JSON or YAML, YAML possibly in several documents), a JSON
    array of Applications, or one ``Application``. The items go through the same decoding as an API page
    (:func:`decode_page`: one item nested too deeply to decode does not lose the others) and are selected as the
    API server would select them: ``namespaces`` and ``label_selector``. Items of another kind (an AppProject in
    a mixed export) are left out; an Application present twice is listed once (the first). The file is read
    whole on each ``pages()`` call; pages of ``page_size`` items follow. Raises ``ClusterUnavailable`` when the
    file cannot be read or is not a list of Applications.
    """

    def __init__(self, cluster: ClusterConfig) -> None:
        if cluster.applications_file is None:
            raise ValueError(f"cluster {cluster.name} has no applications_file")
        self.cluster = cluster
        self.path = Path(cluster.applications_file).expanduser()
        self.expected: int | None = None
        """How many Applications the listing holds, once the file is read (for progress lines)."""

    @property
    def name(self) -> str:
        return self.cluster.name

    def pages(self) -> Iterator[list[dict[str, Any]]]:
        selected = self.selected(self.read())
        self.expected = len(selected)
        size = self.cluster.page_size
        for start in range(0, len(selected), size):
            yield selected[start : start + size]

    def listed_pages(self) -> Iterator[ListedPage]:
        """``pages()``, already decoded: an export is not laid out the way the API server writes lists, so there is
        nothing to cut (a quiet file is recognised by the settled digest, after decoding)."""
        for page in self.pages():
            yield ListedPage.decoded(page)

    def read(self) -> list[Any]:
        """Every Application item of the file, in file order, before any selection."""
        try:
            body = self.path.read_bytes()
        except OSError as error:
            raise self._unavailable(f"cannot read it: {error.strerror or error}") from None
        try:
            text = body.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            raise self._unavailable(f"not UTF-8 text (byte {error.start})") from None
        items: list[Any] = []
        other_kinds: dict[str, int] = {}
        for document in self._documents(text):
            for item in self._items_of(document):
                kind = item.get("kind") if isinstance(item, dict) else None
                if isinstance(kind, str) and kind != "Application":
                    other_kinds[kind] = other_kinds.get(kind, 0) + 1
                    continue
                items.append(item)
        if other_kinds:
            kinds = ", ".join(f"{count} {kind}" for kind, count in sorted(other_kinds.items()))
            log.warning(
                "the Applications file holds items that are not Applications; left out",
                extra={"cluster": self.name, "path": str(self.path), "reason": kinds},
            )
        return items

    def selected(self, items: list[Any]) -> list[dict[str, Any]]:
        """The items the API server would list for this cluster entry, each Application once."""
        namespaces = set(self.cluster.namespaces)
        try:
            selector = LabelSelector.parse(self.cluster.label_selector or "")
        except ValueError as error:
            raise ClusterUnavailable(self.name, f"label_selector {self.cluster.label_selector!r}: {error}") from None
        seen: set[tuple[str, str]] = set()
        chosen: list[dict[str, Any]] = []
        duplicates = 0
        for item in items:
            if not _in_scope(item, namespaces, selector):
                continue
            identity = _identity(item, None)
            if identity in seen:
                duplicates += 1
                continue
            seen.add(identity)
            chosen.append(item)
        if duplicates:
            log.warning(
                "the Applications file lists some Applications more than once; the first of each is read",
                extra={"cluster": self.name, "path": str(self.path), "apps": duplicates},
            )
        return chosen

    def _documents(self, text: str) -> list[Any]:
        """JSON (what ``-o json`` writes: it starts with ``{``) decoded as an API page is, else YAML documents."""
        stripped = text.lstrip()
        if stripped.startswith(("{", "[")):
            array = stripped.startswith("[")
            try:
                # An array (``jq .items``) is decoded as a page's items are: one item at a time if need be.
                page = decode_page('{"items":' + stripped + "}" if array else stripped)
            except ValueError as error:
                raise self._unavailable(f"not valid JSON: {_first_line(str(error))}") from None
            return [page["items"] if array else page]
        try:
            return [document for document in yaml.load_all(text, Loader=_ExportLoader) if document is not None]
        except (yaml.YAMLError, RecursionError) as error:
            if isinstance(error, RecursionError) or "nesting depth" in str(error):
                raise self._unavailable(
                    "nested too deeply to be read as YAML; export it as JSON (-o json), where an Application too "
                    "deep to read is skipped on its own"
                ) from None
            raise self._unavailable(f"not valid YAML: {' '.join(str(error).split())}") from None

    def _items_of(self, document: Any) -> list[Any]:
        if isinstance(document, list):
            return document
        if isinstance(document, dict):
            kind = document.get("kind")
            if kind == "Application":
                return [document]
            if "items" in document and (kind is None or kind in LIST_KINDS):
                items = document["items"]
                if isinstance(items, list):
                    return items
                raise self._unavailable(f"its {kind or 'list'} has no items array")
            if kind is not None:
                raise self._unavailable(
                    f"it holds a {kind}, not Applications (export them with "
                    "kubectl get applications.argoproj.io -A -o json)"
                )
        raise self._unavailable(
            "not a list of Applications (expected an ApplicationList or a List with items, or one Application)"
        )

    def _unavailable(self, reason: str) -> ClusterUnavailable:
        return ClusterUnavailable(self.name, f"Applications file {self.path}: {reason}")


def _in_scope(item: Any, namespaces: set[str], selector: LabelSelector) -> bool:
    """Whether the API server would list ``item`` for these namespaces and this label selector. An item whose
    namespace or labels cannot be read is kept: it is then reported as malformed rather than silently hidden."""
    metadata = item.get("metadata") if isinstance(item, dict) else None
    if not isinstance(metadata, dict):
        return True
    namespace = metadata.get("namespace")
    if namespaces and isinstance(namespace, str) and namespace not in namespaces:
        return False
    if isinstance(item, UnreadableApplication) or not selector:
        return True
    labels = metadata.get("labels")
    if labels is None:
        labels = {}
    if not isinstance(labels, dict):
        return True
    return selector.matches(labels)


# -- label selectors, as the API server reads them ------------------------------------------------------

_SET_REQUIREMENT = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_COMPARISON = re.compile(r"^(?P<key>[^\s!=<>(),]+)\s*(?P<op>==|!=|=|>|<)\s*(?P<value>[^\s!=<>(),]*)$")
_EXISTENCE = re.compile(r"^(?P<negated>!)?\s*(?P<key>[^\s!=<>(),]+)$")


class LabelSelector:
    """A Kubernetes label selector (``labels.Parse``): ``k=v``, ``k==v``, ``k!=v``, ``k in (a,b)``,
    ``k notin (a,b)``, ``k``, ``!k``, ``k>1``, ``k<1``, separated by commas; every requirement must hold.
    ``!=`` and ``notin`` also hold when the label is absent."""

    def __init__(self, requirements: list[tuple[str, str, tuple[str, ...]]]) -> None:
        self.requirements = requirements

    def __bool__(self) -> bool:
        return bool(self.requirements)

    @classmethod
    def parse(cls, text: str) -> LabelSelector:
        """Raises ``ValueError`` naming the requirement that cannot be read."""
        requirements: list[tuple[str, str, tuple[str, ...]]] = []
        for part in _split_requirements(text):
            requirement = part.strip()
            if not requirement:
                raise ValueError("empty requirement")
            if found := _SET_REQUIREMENT.match(requirement):
                values = tuple(value.strip() for value in found["values"].split(","))
                requirements.append((found["key"], found["op"], tuple(value for value in values if value)))
            elif found := _COMPARISON.match(requirement):
                op = "=" if found["op"] == "==" else found["op"]
                value = found["value"]
                if op in "<>" and not re.fullmatch(r"-?\d+", value):
                    raise ValueError(f"{requirement!r}: {op} needs an integer")
                requirements.append((found["key"], op, (value,)))
            elif found := _EXISTENCE.match(requirement):
                requirements.append((found["key"], "!" if found["negated"] else "exists", ()))
            else:
                raise ValueError(f"cannot read the requirement {requirement!r}")
        return cls(requirements)

    def matches(self, labels: dict[str, Any]) -> bool:
        return all(_holds(op, labels.get(key), values) for key, op, values in self.requirements)


def _split_requirements(text: str) -> list[str]:
    """Split on the commas outside parentheses (``a in (x,y),b`` is two requirements)."""
    if not text.strip():
        return []
    parts: list[str] = []
    depth = 0
    current = ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return parts


def _holds(op: str, value: Any, values: tuple[str, ...]) -> bool:
    present = isinstance(value, str)
    if op == "exists":
        return present
    if op == "!":
        return not present
    if op == "=":
        return present and value == values[0]
    if op == "!=":
        return not present or value != values[0]
    if op == "in":
        return present and value in values
    if op == "notin":
        return not present or value not in values
    if not present or not re.fullmatch(r"-?\d+", value):
        return False
    return int(value) > int(values[0]) if op == ">" else int(value) < int(values[0])
