"""DevLake webhook deployments: the POST body, routing to connections, and delivery with retries.

The body is DevLake's webhook deployment body (``docs/design.md`` §5) in a strict profile: full lowercase SHAs,
one canonical ``repoUrl`` per repository, UTC ``Z`` dates, an explicit ``environment``, and ``result`` on the
deployment *and* on every commit (DevLake defaults a commit's result to ``SUCCESS`` whatever the top level says).
"""

from __future__ import annotations

import email.utils
import logging
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from types import TracebackType
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from requests.adapters import HTTPAdapter
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from tenacity.stop import stop_base

from reconciler.config import Config, ConnectionConfig, DevLakeConfig
from reconciler.model import FULL_SHA, AppKey, Commit, Deployment, EnrichedDeployment, Result, format_time
from reconciler.run import Stopping

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 6
CONNECT_TIMEOUT = 5.0
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 1.0
MAX_RETRY_AFTER = 300.0
RETRYABLE_STATUSES = frozenset({408, 425, 428, 429})
"""Besides every 5xx. 428 is DevLake waiting for a database migration to be confirmed: it clears on its own."""

MAX_NAME_LENGTH = 255
MAX_COMMIT_MESSAGE_LENGTH = 255
MAX_DELIVERY_MESSAGE_LENGTH = 2000
MAX_UNEXPECTED_BODY_LENGTH = 300
TITLE_SHAS = 5

_HEX_RUN = re.compile(r"[0-9a-f]{7,40}")


CONFIGURATION_STATUSES = frozenset({401, 403, 404, *range(300, 400)})
"""A wrong API key, connection id or URL is an operator's fix, not a bad payload: hold the deployment back
(the run exits 1) rather than dead-letter every deployment until someone notices. A redirect (3xx) is never
followed: DevLake's webhook does not redirect, so it comes from something in front of it (an SSO proxy, an
``http://`` to ``https://`` redirect), and following it would turn the POST into a GET that some login page
answers with 200."""


class PayloadError(ValueError):
    """No DevLake body can be built for this deployment (e.g. no commit with a full SHA); the caller skips it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- the payload -----------------------------------------------------------------------------------


def build_payload(
    enriched: EnrichedDeployment,
    *,
    config: Config,
    component: str,
    destination: str,
    source_paths: list[str],
) -> dict[str, Any]:
    """The webhook body for one deployment (``docs/design.md`` §5).

    Every date is the deployment's: a commit's ``startedDate`` is when the deployment that carries it started, not
    when the commit was written. DevLake credits a pull request to the earliest commit row by ``started_date``
    whose range contains it (``change_lead_time_calculator.go``), so a commit date would make every row of one
    SHA tie (decided by row id) and let a later deployment of an older commit win over an earlier deployment
    that already shipped it. No DORA computation reads ``createdDate``; it is the start too (DevLake's default).

    Raises ``PayloadError`` when there is no commit to send."""
    deployment = enriched.deployment
    key = deployment.key
    head_mode = config.devlake.commits == "head"
    heads = _deliverable(enriched.heads, deployment, quiet=not head_mode)
    commits = heads if head_mode else _deliverable(enriched.history, deployment)
    if not commits:
        raise PayloadError(f"deployment {deployment.id} has no commit with a full 40-hex SHA")
    try:
        environment = config.environment_for(key.cluster, key.qualified_name, source_paths)
    except KeyError:
        raise PayloadError(f"cluster {key.cluster!r} is not in the configuration") from None

    result = deployment.result.devlake
    where = f"{key.cluster}/{destination}" if destination else key.cluster
    label = "rollback" if enriched.rollback else deployment.deployment_class.value
    failed = " (FAILED)" if deployment.result is Result.FAILED else ""
    started = format_time(deployment.started_at)
    finished = format_time(deployment.finished_at)

    items: list[dict[str, Any]] = []
    for commit in commits:
        short = f"{commit.repo}@{commit.sha[:7]}"
        items.append(
            {
                "repoUrl": commit.repo_url,
                "refName": _ref_name(commit.sha, deployment),
                "commitSha": commit.sha,
                "commitMsg": _bounded(_first_line(commit.message), MAX_COMMIT_MESSAGE_LENGTH),
                "createdDate": started,
                "startedDate": started,
                "finishedDate": finished,
                "result": result,
                "displayTitle": _bounded(f"{component} → {where}: {label} {short}{failed}", MAX_NAME_LENGTH),
                "name": _bounded(f"{short} → {where}", MAX_NAME_LENGTH),
            }
        )
    return {
        "id": deployment.id,
        "displayTitle": _bounded(
            f"{component} → {where}: {label} {_short_shas(heads or commits)}{failed}", MAX_NAME_LENGTH
        ),
        "name": _bounded(f"{key} {deployment.ref}", MAX_NAME_LENGTH),
        "environment": environment.value,
        "result": result,
        "createdDate": started,
        "startedDate": started,
        "finishedDate": finished,
        "deploymentCommits": items,
    }


def _deliverable(commits: Iterable[Commit], deployment: Deployment, *, quiet: bool = False) -> list[Commit]:
    """Full-SHA commits, lowercased, at most one per (repoUrl, SHA): DevLake needs 40 hex for lead time."""
    seen: set[tuple[str, str]] = set()
    kept: list[Commit] = []
    for commit in commits:
        sha = commit.sha.lower()
        if not FULL_SHA.fullmatch(sha):
            if not quiet:
                log.warning(
                    "commit without a full SHA left out of the DevLake payload",
                    extra={"deployment_id": deployment.id, "reason": f"{commit.repo}@{commit.sha}"},
                )
            continue
        if (commit.repo_url, sha) in seen:
            continue
        seen.add((commit.repo_url, sha))
        kept.append(commit if sha == commit.sha else replace(commit, sha=sha))
    return kept


def _ref_name(sha: str, deployment: Deployment) -> str:
    """The GitOps source's target revision, or the image tag that named this commit; empty when neither."""
    for index, revision in enumerate(deployment.revisions):
        if revision.lower() == sha and index < len(deployment.sources):
            return deployment.sources[index].target_revision or ""
    for image in deployment.images:
        tag = _tag_of(image)
        if tag and any(sha.startswith(run) for run in _HEX_RUN.findall(tag.lower())):
            return tag
    return ""


def _tag_of(image: str) -> str | None:
    name = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else None


def _short_shas(commits: list[Commit]) -> str:
    shown = ", ".join(commit.sha[:7] for commit in commits[:TITLE_SHAS])
    hidden = len(commits) - TITLE_SHAS
    return f"{shown} +{hidden} more" if hidden > 0 else shown


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0].strip() if lines else ""


def _bounded(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- routing ---------------------------------------------------------------------------------------


class Router:
    """Which DevLake connections receive an Application's deployments."""

    def __init__(self, devlake: DevLakeConfig) -> None:
        self._connections = tuple(devlake.connections)

    def connections_for(self, key: AppKey, component: str) -> list[ConnectionConfig]:
        """Connections without ``match`` get everything; the others when every match key given matches."""
        return [
            connection
            for connection in self._connections
            if connection.match is None
            or connection.match.matches(
                component=component,
                application=key.qualified_name,
                cluster=key.cluster,
                namespace=key.namespace,
            )
        ]


# -- delivery --------------------------------------------------------------------------------------


class DeliveryOutcome(StrEnum):
    DELIVERED = "DELIVERED"
    RETRY_LATER = "RETRY_LATER"
    """Not delivered this time, nothing lost: keep the snapshot where it is and send again next tick."""
    REJECTED = "REJECTED"
    """DevLake refused the body or the key (4xx): sending it again will not help."""


@dataclass(frozen=True)
class Delivery:
    outcome: DeliveryOutcome
    status: int | None
    """The last HTTP status, ``None`` when no response came back."""
    message: str
    attempts: int
    cause: str | None = None
    """The message without what differs between deliveries (the attempt count): what run summaries group by."""


def _unbounded(seconds: float) -> float:
    return seconds


class _Retryable(Exception):
    def __init__(self, status: int | None, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class _StopAtDeadline(stop_base):
    """Stop rather than start a sleep that would end past the deadline."""

    def __init__(self, deadline: float, clock: Callable[[], float]) -> None:
        self.deadline = deadline
        self.clock = clock

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.clock() + retry_state.upcoming_sleep > self.deadline


class DevLakeClient:
    """POSTs deployments to DevLake's webhook, one shared ``requests.Session``.

    Connection errors, timeouts, 429 and 5xx are retried with exponential backoff and jitter (honouring
    ``Retry-After``) until ``MAX_ATTEMPTS`` or until the next sleep would pass the caller's deadline. Re-POSTing is
    safe because DevLake upserts by ``id``. ``sleep`` and ``clock`` are injectable so tests never sleep; a ``sleep``
    that raises ``Stopping`` (the process is stopping) ends the retries at once: the deployment is left for the next
    run. ``bound_timeout`` may shorten the read timeout of each attempt (to a stopping process's remaining time).
    """

    def __init__(
        self,
        devlake: DevLakeConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
        bound_timeout: Callable[[float], float] = _unbounded,
    ) -> None:
        self._devlake = devlake
        self._sleep = sleep
        self._clock = clock
        self._bound_timeout = bound_timeout
        self._owns_session = session is None
        if session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_maxsize=devlake.max_concurrency)
            session.mount("https://", adapter)
            session.mount("http://", adapter)
        self._session = session
        self._timeout = (CONNECT_TIMEOUT, devlake.timeout.total_seconds())
        self._backoff = wait_exponential_jitter(multiplier=1, max=BACKOFF_MAX, jitter=BACKOFF_JITTER)

    def __repr__(self) -> str:
        return f"DevLakeClient(url={self._devlake.url!r})"

    def __enter__(self) -> DevLakeClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._owns_session:
            self._session.close()

    def url_for(self, connection: ConnectionConfig) -> str:
        return f"{self._devlake.url}/api/rest/plugins/webhook/connections/{connection.id}/deployments"

    def _request_timeout(self) -> tuple[float, float]:
        connect, read = self._timeout
        return min(connect, self._bound_timeout(connect)), self._bound_timeout(read)

    def probe(self, connection: ConnectionConfig) -> tuple[bool, str]:
        """For ``check``: POST an empty body. DevLake authenticates before it validates, so a 400 proves the
        URL, the route and the API key without storing anything."""
        key = connection.api_key()
        if key is None:
            return False, f"api key env var {connection.api_key_env} is not set"
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            response = self._session.post(
                self.url_for(connection),
                json={},
                headers=headers,
                timeout=self._request_timeout(),
                verify=self._devlake.verify_tls,
                allow_redirects=False,
            )
        except requests.RequestException as error:
            return False, _redact(f"unreachable: {_connection_problem(error, self.url_for(connection))}", key)
        status = response.status_code
        if response.is_redirect or 300 <= status < 400:
            return False, _redact(_redirect_message(response), key)
        message = _response_message(response, key)
        if status == 400 and _envelope_success(response) is False:
            return True, f"reachable at {self._devlake.url}, API key accepted"
        if status in (401, 403):
            return False, f"API key refused (HTTP {status}: {message}): {_refusal_hint(status, message, connection)}"
        if status == 404:
            return False, _not_found(message, connection, self._devlake.url)
        return False, f"unexpected answer HTTP {status}: {message}"

    def deliver(self, connection: ConnectionConfig, payload: Mapping[str, Any], deadline: float) -> Delivery:
        """POST one payload to one connection. ``deadline`` is a ``time.monotonic()`` value; one attempt is
        always made, retries only while their wait ends before it."""
        deployment_id = payload.get("id")
        key = connection.api_key()
        if key is None:
            message = f"api key env var {connection.api_key_env} is not set"
            log.error(message, extra={"connection": connection.id, "deployment_id": deployment_id})
            return Delivery(DeliveryOutcome.RETRY_LATER, None, message, 0)

        url = self.url_for(connection)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        attempts = 0
        failures: list[_Retryable] = []

        def post() -> requests.Response:
            nonlocal attempts
            attempts += 1
            try:
                return attempt()
            except _Retryable as failure:
                failures.append(failure)
                raise

        def attempt() -> requests.Response:
            try:
                response = self._session.post(
                    url,
                    json=payload,
                    headers=headers,
                    timeout=self._request_timeout(),
                    verify=self._devlake.verify_tls,
                    allow_redirects=False,
                )
            except requests.Timeout as error:
                raise _Retryable(None, _redact(_connection_problem(error, url), key)) from None
            except requests.ConnectionError as error:
                raise _Retryable(None, _redact(_connection_problem(error, url), key)) from None
            status = response.status_code
            if status in RETRYABLE_STATUSES or status >= 500:
                raise _Retryable(status, _response_message(response, key), _retry_after(response))
            if 200 <= status < 300 and _envelope_success(response) is not True:
                excerpt = _bounded(_response_message(response, key), MAX_UNEXPECTED_BODY_LENGTH)
                raise _Retryable(status, f"HTTP {status} without DevLake's success answer: {excerpt}")
            return response

        def before_sleep(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome is not None else None
            log.warning(
                "DevLake delivery failed; retrying",
                extra={
                    "connection": connection.id,
                    "deployment_id": deployment_id,
                    "status": getattr(error, "status", None),
                    "reason": str(error),
                    "attempt": state.attempt_number,
                    "wait": round(state.upcoming_sleep, 3),
                },
            )

        retrying = Retrying(
            sleep=self._sleep,
            retry=retry_if_exception_type(_Retryable),
            wait=self._wait,
            stop=stop_after_attempt(MAX_ATTEMPTS) | _StopAtDeadline(deadline, self._clock),
            before_sleep=before_sleep,
            reraise=True,
        )
        try:
            response = retrying(post)
        except _Retryable as failure:
            plural = "" if attempts == 1 else "s"
            message = f"{failure.message} (gave up after {attempts} attempt{plural})"
            return Delivery(DeliveryOutcome.RETRY_LATER, failure.status, message, attempts, failure.message)
        except Stopping:
            last = failures[-1]
            message = f"{last.message} (retries cut short after {attempts} attempt(s): the process is stopping)"
            return Delivery(DeliveryOutcome.RETRY_LATER, last.status, message, attempts, last.message)
        except requests.RequestException as error:
            message = _redact(_bounded(f"request failed: {error}", MAX_DELIVERY_MESSAGE_LENGTH), key)
            return Delivery(DeliveryOutcome.RETRY_LATER, None, message, attempts)

        status = response.status_code
        message = _response_message(response, key)
        if 200 <= status < 300:
            outcome = DeliveryOutcome.DELIVERED
        elif 300 <= status < 400:
            outcome = DeliveryOutcome.RETRY_LATER
            message = _redact(_redirect_message(response), key)
        elif status == 404:
            outcome = DeliveryOutcome.RETRY_LATER
            message = _not_found(message, connection, self._devlake.url)
        elif status in CONFIGURATION_STATUSES:
            outcome = DeliveryOutcome.RETRY_LATER
            message = (
                f"DevLake refused the connection's configuration (HTTP {status}): {message}: "
                f"{_refusal_hint(status, message, connection)}"
            )
        elif 400 <= status < 500:
            outcome = DeliveryOutcome.REJECTED
        else:
            outcome = DeliveryOutcome.RETRY_LATER
        return Delivery(outcome, status, message, attempts)

    def _wait(self, state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome is not None and state.outcome.failed else None
        if isinstance(error, _Retryable) and error.retry_after is not None:
            return min(error.retry_after, MAX_RETRY_AFTER)
        return float(self._backoff(state))


def _refusal_hint(status: int, message: str, connection: ConnectionConfig) -> str:
    """What a 401/403 from DevLake's API-key check most likely means, for the operator who has to fix it."""
    variable = f"${connection.api_key_env}"
    if "scope" in message:
        return (
            f"the key in {variable} belongs to another connection (a connection's key is valid only for its own "
            f"id, {connection.id} here): use the key DevLake generated for connection {connection.id}"
        )
    if "expired" in message:
        return f"the key in {variable} has expired: generate a new one in DevLake"
    if status == 401:
        return "the request reached DevLake without the API key: is a proxy in front of it dropping the header?"
    return (
        f"DevLake does not know the key in {variable} (revoked or rotated, or DevLake's ENCRYPTION_SECRET "
        "changed): put the connection's current key there"
    )


def _not_found(message: str, connection: ConnectionConfig, url: str) -> str:
    """A 404: DevLake's "record not found" names a connection id it does not have; any other 404 comes from no
    route at all, which is a ``devlake.url`` that is not the Config UI's address (the usual mistake: ``…/api``)."""
    if "record not found" in message:
        return (
            f"connection {connection.id} not found (HTTP 404: {message}): no webhook connection with this id "
            "in this DevLake: check devlake.connections[].id"
        )
    return (
        f"connection {connection.id} not found (HTTP 404: {_bounded(message, MAX_UNEXPECTED_BODY_LENGTH)}): "
        f"DevLake has no webhook route under {url}: is devlake.url the Config UI address, without /api?"
    )


def _connection_problem(error: requests.RequestException, url: str) -> str:
    """Host, port and what went wrong, in words: never urllib3's pool and object dump."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        port = 443 if parts.scheme == "https" else 80
    where = f"{parts.hostname or '?'}:{port}"
    cause = _root_cause(error)
    if isinstance(error, requests.exceptions.SSLError) or isinstance(cause, ssl.SSLError):
        detail = getattr(cause, "reason", None) or type(cause).__name__
        return f"TLS handshake with {where} failed ({detail}): check the certificate, or devlake.verify_tls"
    if isinstance(error, requests.exceptions.ReadTimeout):
        return f"no answer from {where} within the read timeout (devlake.timeout): timed out"
    if isinstance(error, requests.Timeout) or isinstance(cause, TimeoutError):
        return f"cannot connect to {where}: timed out (a firewall, or the wrong host?)"
    if isinstance(cause, ConnectionRefusedError):
        return f"cannot connect to {where}: connection refused (is DevLake running, and is this its address?)"
    if isinstance(cause, socket.gaierror):
        return f"cannot connect to {where}: the host name does not resolve"
    if isinstance(cause, ConnectionResetError | BrokenPipeError):
        return f"connection to {where} failed: reset by the other end"
    if isinstance(cause, OSError) and cause.strerror:
        return f"cannot connect to {where}: {cause.strerror.lower()}"
    return f"connection to {where} failed ({type(cause).__name__})"


def _root_cause(error: BaseException) -> BaseException:
    """The innermost error under requests' and urllib3's wrappers."""
    seen: set[int] = set()
    current = error
    while id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = current.__cause__ or current.__context__
        if inner is None and current.args and isinstance(current.args[0], BaseException):
            inner = current.args[0]
        if not isinstance(inner, BaseException):
            break
        current = inner
    return current


def _response_message(response: requests.Response, key: str) -> str:
    """DevLake's ``message`` from its JSON envelope, or the bare JSON string it sends for decode errors."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        message = body["message"]
    elif isinstance(body, str):
        message = body
    else:
        message = response.text.strip() or f"HTTP {response.status_code} {response.reason or ''}".strip()
    return _redact(_bounded(message, MAX_DELIVERY_MESSAGE_LENGTH), key)


def _envelope_success(response: requests.Response) -> bool | None:
    """The ``success`` of DevLake's answer envelope; ``None`` when the body is not one.

    Every DevLake version answers a stored deployment with ``200 {"code":0,"success":true,"message":"success",...}``
    (the handler returns no body and the API layer's ``ApiOutputSuccess`` writes that envelope); none answers
    with an empty body. So a 2xx is only DevLake's acknowledgement when it says so."""
    try:
        body = response.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("success"), bool):
        return None
    success: bool = body["success"]
    return success


def _redirect_message(response: requests.Response) -> str:
    """Where a redirect points, without what its URL may carry (credentials, a query with SSO state)."""
    location = response.headers.get("Location", "").strip()
    if not location:
        where = "nowhere (no Location header)"
    else:
        try:
            parts = urlsplit(urljoin(response.url or "", location))
            port = f":{parts.port}" if parts.port else ""
            where = f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}" if parts.scheme else parts.path
        except ValueError:
            where = "an unreadable address"
    return (
        f"DevLake's URL answered with a redirect (HTTP {response.status_code}) to {where}; redirects are not "
        "followed: set devlake.url to DevLake's own address (is a single-sign-on proxy or an http-to-https "
        "redirect in front of it?)"
    )


def _retry_after(response: requests.Response) -> float | None:
    """``Retry-After`` in seconds from now: a number of seconds or an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text
