"""How requests reach GitHub: PyGithub instances, authentication, retries, rate limits and the circuit breaker.

PyGithub's ``Github`` object is not thread-safe (its connection object keeps the URL of the request in flight in
instance attributes, PyGithub PR #2052), so the transport keeps a small pool of ``Github`` instances and lends
each to one thread at a time. Every instance's ``requests`` session gets a counting adapter, so ``requests`` is
the exact number of HTTP requests sent, retries included. Whatever PyGithub, ``requests`` or ``urllib3`` raise is
translated into this package's errors (``translate``).

PyGithub is imported with the first request, not with this module: its import (with jwt, cryptography and nacl)
costs about as much as a quiet run's whole work for a thousand Applications, and a run with nothing new to deploy
asks GitHub nothing. The two classes built on PyGithub's (``CountingRetry``, the installation token) are made
then (``counting_retry_class()``, ``_installation_token_class()``).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from reconciler import __version__
from reconciler.config import GitHubConfig
from reconciler.github.breaker import OUTAGE_ATTEMPTS, Breaker
from reconciler.github.errors import CommitNotFound, GitHubDown, GitHubError, GitHubUnavailable, RateLimited
from reconciler.run import Stopping

if TYPE_CHECKING:
    from github import Auth, Github, GithubException
    from github.GithubRetry import GithubRetry as _RetryBase
    from github.Requester import Requester

    _AuthBase = Auth.Auth
else:
    _RetryBase = _AuthBase = object

log = logging.getLogger("reconciler.github")

USER_AGENT = f"dora-reconciler/{__version__}"
PER_PAGE = 100
SECONDARY_RATE_WAIT = 60.0
"""GitHub: without ``Retry-After`` wait at least a minute after a secondary rate limit."""
TOKEN_REFRESH_MARGIN = timedelta(minutes=2)


class Transport:
    """PyGithub instances to send requests with, counted and guarded. Thread-safe; ``reset_tick()`` between ticks."""

    def __init__(
        self,
        config: GitHubConfig,
        *,
        sleep: Callable[[float], None] = time.sleep,
        backoff_factor: float = 1.0,
        retries: int = 5,
        seconds_between_requests: float | None = None,
        bound_timeout: Callable[[float], float] | None = None,
    ) -> None:
        """``sleep`` is every wait between retries; one that raises ``Stopping`` ends the lookup as unavailable
        (deferred to the next run). ``bound_timeout`` may shorten each request's timeout (a stopping process)."""
        self.config = config
        self._sleep = sleep
        self._bound_timeout = bound_timeout
        self._backoff_factor = backoff_factor
        self._retries = retries
        self._seconds_between_requests = seconds_between_requests
        self._max_wait = config.max_rate_limit_wait.total_seconds()
        self._timeout = max(1, round(config.timeout.total_seconds()))
        self._timeout_seconds = config.timeout.total_seconds() or float(self._timeout)
        """What each request waits for; PyGithub only takes whole seconds, so it is set on its connection."""
        self._lock = threading.Lock()
        self._idle: list[Github] = []
        self._requests = 0
        self._total_requests = 0
        self._remaining: int | None = None
        self._reset: datetime | None = None
        self._blocked: RateLimited | None = None
        """After a rate limit: no request is sent until its reset (or, when unknown, until the next tick)."""
        self.breaker = Breaker(OUTAGE_ATTEMPTS)
        self._app = config.enabled and config.app_id is not None and config.app_installation_id is not None
        self._token = config.token() if config.enabled and not self._app else None
        self._auth: tuple[Auth.Auth | None] | None = None
        """Built with the first request (``_authentication``): building it imports PyGithub."""
        if config.enabled and not self._app and not self._token:
            log.warning(
                "no GitHub token: unauthenticated requests (60 per hour)",
                extra={"reason": f"${config.token_env or 'GITHUB_TOKEN'} is not set"},
            )

    # -- counters ------------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """HTTP requests sent to GitHub since the last ``reset_tick()`` (retries included)."""
        return self._requests

    @property
    def total_requests(self) -> int:
        """HTTP requests sent to GitHub since the transport was created."""
        return self._total_requests

    @property
    def rate_limit_remaining(self) -> int | None:
        """``X-RateLimit-Remaining`` of the last core API response, ``None`` before any."""
        return self._remaining

    @property
    def rate_limit_reset(self) -> datetime | None:
        """``X-RateLimit-Reset`` of the last core API response."""
        return self._reset

    def reset_tick(self) -> None:
        """Forget this tick's request count and outage, and a rate limit whose reset is unknown."""
        with self._lock:
            self._requests = 0
            if self._blocked is not None and self._blocked.reset_at is None:
                self._blocked = None
        self.breaker.reset()

    def _count_request(self) -> None:
        with self._lock:
            self._requests += 1
            self._total_requests += 1

    def _observe_headers(self, headers: Mapping[str, Any] | None) -> None:
        if not headers:
            return
        resource = _header(headers, "x-ratelimit-resource")
        if resource not in (None, "core"):
            return
        remaining = _header(headers, "x-ratelimit-remaining")
        reset = _header(headers, "x-ratelimit-reset")
        with self._lock:
            if remaining is not None and remaining.isdigit():
                self._remaining = int(remaining)
            if reset is not None and reset.isdigit():
                self._reset = datetime.fromtimestamp(int(reset), UTC)

    # -- requests ------------------------------------------------------------------------------------

    def rate_limit(self) -> tuple[int, int, datetime]:
        """``(remaining, limit, reset)`` of the core API from ``GET /rate_limit``; ``(-1, -1, now)`` when
        rate limiting is disabled (GitHub Enterprise Server's default)."""
        from github import GithubException

        try:
            with self.github(guard=False) as gh:
                data = gh.get_rate_limit().raw_data
        except GithubException as error:
            if error.status == 404:
                return -1, -1, datetime.now(UTC)
            raise self.translate(error, None, None) from None
        except Exception as error:
            raise self.translate(error, None, None) from None
        try:
            core = data["resources"]["core"]
            return int(core["remaining"]), int(core["limit"]), datetime.fromtimestamp(int(core["reset"]), UTC)
        except (KeyError, TypeError, ValueError):
            raise GitHubUnavailable("unexpected /rate_limit response") from None

    @property
    def authenticated(self) -> bool:
        """A token or a GitHub App is configured (and GitHub is enabled)."""
        return self._app or bool(self._token)

    def unreachable(self) -> str | None:
        """Why GitHub cannot be reached at all (no route, no name resolution, no answer in ``github.timeout``), from
        one ``GET /rate_limit`` sent once, without retries; ``None`` when GitHub answered anything."""
        from github import GithubException

        gh = self._new_github(self._authentication(), retries=0)
        try:
            gh.get_rate_limit()
        except GithubException:
            return None
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            host = urlsplit(self.config.url).hostname or self.config.url
            return f"no GitHub token is set and {host} cannot be reached ({type(error).__name__})"
        return None

    @contextmanager
    def github(self, *, guard: bool = True) -> Iterator[Github]:
        """Lend a pooled ``Github`` instance to this thread. ``guard``: refuse while rate limited or down."""
        if guard:
            self._check_blocked()
        with self._lock:
            gh = self._idle.pop() if self._idle else None
        if gh is None:
            gh = self._new_github(self._authentication())
        try:
            yield gh
        finally:
            with self._lock:
                self._idle.append(gh)

    # -- errors --------------------------------------------------------------------------------------

    def translate(self, error: BaseException, repo: str | None, ref: str | None) -> GitHubError:
        """Map whatever PyGithub, requests or urllib3 raised to one of this package's errors."""
        if isinstance(error, GitHubError):
            return error
        from github.GithubException import (
            BadCredentialsException,
            GithubException,
            RateLimitExceededExceedsMaxWait,
            RateLimitExceededException,
            UnknownObjectException,
        )

        if isinstance(error, Stopping):
            return GitHubUnavailable(f"{error}; the GitHub work in hand is left for the next run")
        outage = self.breaker.reason
        if outage is not None and not isinstance(error, GithubException):
            return GitHubDown(outage)
        if isinstance(error, GithubException):
            headers = error.headers or {}
            self._observe_headers(headers)
            status = error.status
            message = _github_message(error)
            if isinstance(error, RateLimitExceededException) or _is_rate_limit(status, headers):
                wait = error.wait if isinstance(error, RateLimitExceededExceedsMaxWait) else None
                return self._block(RateLimited(f"GitHub rate limit exceeded (HTTP {status})", _reset_at(headers, wait)))
            if isinstance(error, BadCredentialsException) or status == 401:
                return GitHubUnavailable("bad credentials (HTTP 401)")
            if status == 403:
                return GitHubUnavailable(f"forbidden (HTTP 403): {message}")
            if (
                repo is not None
                and ref is not None
                and (isinstance(error, UnknownObjectException) or 400 <= status < 500)
            ):
                return CommitNotFound(repo, ref, f"HTTP {status}: {message}", status)
            return GitHubUnavailable(f"HTTP {status}: {message}")
        if isinstance(error, requests.exceptions.RetryError):
            text = str(error)
            if "too many 403" in text or "too many 429" in text:
                return self._block(RateLimited("GitHub rate limit: retries exhausted", None))
            return GitHubUnavailable("GitHub kept failing after retries (server errors)")
        if isinstance(error, requests.exceptions.Timeout | urllib3.exceptions.TimeoutError):
            return GitHubUnavailable(f"GitHub request timed out ({type(error).__name__})")
        if isinstance(error, requests.exceptions.RequestException | urllib3.exceptions.HTTPError | OSError):
            return GitHubUnavailable(f"cannot reach GitHub ({type(error).__name__})")
        if isinstance(error, RuntimeError | ValueError | KeyError | TypeError | AttributeError):
            return GitHubUnavailable(f"unexpected response from GitHub ({type(error).__name__})")
        raise error

    def _block(self, limited: RateLimited) -> RateLimited:
        with self._lock:
            self._blocked = limited
        return limited

    def _check_blocked(self) -> None:
        outage = self.breaker.reason
        if outage is not None:
            raise GitHubDown(outage)
        with self._lock:
            blocked = self._blocked
            if blocked is not None and blocked.reset_at is not None and blocked.reset_at <= datetime.now(UTC):
                self._blocked = blocked = None
        if blocked is not None:
            raise RateLimited(f"{blocked.reason}; not asking again before the reset", blocked.reset_at)

    # -- PyGithub instances --------------------------------------------------------------------------

    def _retry(self, retries: int | None = None) -> CountingRetryBase:
        return counting_retry_class()(
            on_attempt=self._count_request,
            on_response=self._observe_headers,
            sleep=self._sleep,
            max_wait=self._max_wait,
            total=self._retries if retries is None else retries,
            backoff_factor=self._backoff_factor,
            breaker=self.breaker,
            secondary_rate_wait=SECONDARY_RATE_WAIT,
            max_rate_limit_wait=self._max_wait,
        )

    def _new_github(self, auth: Auth.Auth | None, *, retries: int | None = None) -> Github:
        from github import Github

        gh = Github(
            auth=auth,
            base_url=self.config.url,
            timeout=self._timeout,
            user_agent=USER_AGENT,
            per_page=PER_PAGE,
            verify=self.config.verify_tls,
            retry=self._retry(retries),
            seconds_between_requests=self._seconds_between_requests,
            seconds_between_writes=None,
            lazy=True,
        )
        self._instrument(gh.requester)
        return gh

    def _instrument(self, requester: Requester) -> None:
        """Swap the requests adapter of PyGithub's (persistent, per-``Requester``) connection for a counting one."""
        connection = getattr(requester, "_Requester__createConnection")()  # noqa: B009 (private, mangled)
        adapter = _CountingAdapter(
            on_attempt=self._count_request,
            on_response=self._observe_headers,
            breaker=self.breaker,
            bound_timeout=self._bound_timeout,
            max_retries=connection.retry,
            pool_connections=connection.pool_size,
            pool_maxsize=connection.pool_size,
        )
        connection.session.mount("https://", adapter)
        connection.session.mount("http://", adapter)
        connection.adapter = adapter
        connection.timeout = self._timeout_seconds

    # -- authentication ------------------------------------------------------------------------------

    def _authentication(self) -> Auth.Auth | None:
        with self._lock:
            if self._auth is None:
                self._auth = (self._build_auth(),)
            return self._auth[0]

    def _build_auth(self) -> Auth.Auth | None:
        from github import Auth

        if self._app:
            return _installation_token_class()(self._fetch_installation_token)
        return Auth.Token(self._token) if self._token else None

    def _fetch_installation_token(self) -> tuple[str, datetime]:
        from github import Auth, GithubException, GithubIntegration

        config = self.config
        key = config.app_private_key()
        if not key or config.app_id is None or config.app_installation_id is None:
            raise GitHubUnavailable(f"GitHub App private key: ${config.app_private_key_env} is not set")
        try:
            app_auth = Auth.AppAuth(config.app_id, key)
            integration = GithubIntegration(
                auth=app_auth,
                base_url=config.url,
                timeout=self._timeout,
                user_agent=USER_AGENT,
                per_page=PER_PAGE,
                verify=config.verify_tls,
                retry=self._retry(),
                seconds_between_requests=None,
                seconds_between_writes=None,
            )
            self._instrument(integration.requester)
            authorization = integration.get_access_token(config.app_installation_id)
            return str(authorization.token), authorization.expires_at
        except GithubException as error:
            translated = self.translate(error, None, None)
            if isinstance(translated, RateLimited):
                raise translated from None
            raise GitHubUnavailable(f"GitHub App installation token: HTTP {error.status}") from None
        except GitHubError:
            raise
        except Exception as error:
            why = self._translate_quietly(error)
            raise GitHubUnavailable(f"GitHub App installation token: {why}") from None

    def _translate_quietly(self, error: Exception) -> str:
        try:
            return self.translate(error, None, None).reason
        except Exception:
            return f"cannot create the GitHub App token ({type(error).__name__})"


class _InstallationTokenAuth(_AuthBase):
    """One GitHub App installation token shared by every pooled ``Github`` instance, refreshed when close to expiry.

    PyGithub's ``Auth.Auth`` is its base once PyGithub is imported: ``_installation_token_class()``."""

    def __init__(self, fetch: Callable[[], tuple[str, datetime]]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires_at = datetime.min.replace(tzinfo=UTC)

    @property
    def token_type(self) -> str:
        return "token"

    @property
    def token(self) -> str:
        with self._lock:
            if self._token is None or self._expires_at - TOKEN_REFRESH_MARGIN < datetime.now(UTC):
                self._token, self._expires_at = self._fetch()
            return self._token

    @property
    def _masked_token(self) -> str:
        return "token (removed)"

    def __repr__(self) -> str:
        return "_InstallationToken()"


@functools.cache
def _installation_token_class() -> type[_InstallationTokenAuth]:
    from github.Auth import Auth

    class _InstallationToken(_InstallationTokenAuth, Auth):
        pass

    return _InstallationToken


class CountingRetryBase(_RetryBase):
    """``GithubRetry`` that counts every retried attempt, sleeps through an injectable function and never waits
    longer than ``max_wait`` (a ``Retry-After`` above it raises ``RateLimitExceededExceedsMaxWait``).

    PyGithub's ``GithubRetry`` is its base once PyGithub is imported: ``counting_retry_class()`` builds the class
    that is (``CountingRetry``); this one alone cannot be instantiated usefully."""

    def __init__(
        self,
        *,
        on_attempt: Callable[[], None] | None = None,
        on_response: Callable[[Mapping[str, Any]], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_wait: float | None = None,
        breaker: Breaker | None = None,
        **kwargs: Any,
    ) -> None:
        self._on_attempt = on_attempt
        self._on_response = on_response
        self._sleep_function = sleep
        self._max_wait = max_wait
        self._breaker = breaker
        super().__init__(**kwargs)

    def new(self, **kw: Any) -> CountingRetryBase:
        kw.setdefault("on_attempt", self._on_attempt)
        kw.setdefault("on_response", self._on_response)
        kw.setdefault("sleep", self._sleep_function)
        kw.setdefault("max_wait", self._max_wait)
        kw.setdefault("breaker", self._breaker)
        return super().new(**kw)

    def increment(  # type: ignore[override]
        self,
        method: str | None = None,
        url: str | None = None,
        response: Any = None,
        error: Exception | None = None,
        _pool: Any = None,
        _stacktrace: TracebackType | None = None,
    ) -> Retry:
        if self._breaker is not None:
            if error is not None or (response is not None and response.status >= 500):
                self._breaker.failure(_request_path(url), _failure(error, response))
            if self._breaker.reason is not None:  # GitHub is down: no more attempts, no more waiting
                raise MaxRetryError(_pool, url or "", error or ResponseError(self._breaker.reason))
        from github.GithubException import RateLimitExceededExceedsMaxWait

        if response is not None:
            self._check_primary_limit(response)
        retry = super().increment(method, url, response, error, _pool, _stacktrace)
        if response is not None and self._max_wait is not None and retry.respect_retry_after_header:
            wait = retry.get_retry_after(response)
            if wait is not None and wait > self._max_wait:
                headers = dict(response.headers.items())
                raise RateLimitExceededExceedsMaxWait(response.status, None, headers, wait=wait)
        if self._on_attempt is not None:
            self._on_attempt()
        return retry

    def _check_primary_limit(self, response: Any) -> None:
        """Record the headers of a response about to be retried and give up at once on a spent primary limit
        whose reset is further away than ``max_wait`` (whatever the message says, 403 or 429)."""
        from github.GithubException import RateLimitExceededExceedsMaxWait

        headers: Mapping[str, Any] = response.headers
        if self._on_response is not None:
            self._on_response(headers)
        if self._max_wait is None or response.status not in (403, 429):
            return
        reset = _header(headers, "x-ratelimit-reset")
        if _header(headers, "x-ratelimit-remaining") != "0" or reset is None or not reset.isdigit():
            return
        wait = int(reset) - datetime.now(UTC).timestamp() + 1
        if wait > self._max_wait:
            raise RateLimitExceededExceedsMaxWait(response.status, None, dict(headers.items()), wait=wait)

    def sleep(self, response: Any = None) -> None:
        wait: float | None = None
        if self.respect_retry_after_header and response is not None:
            wait = self.get_retry_after(response)
        if not wait:
            wait = self.get_backoff_time()
        if wait > 0:
            self._sleep_function(wait)


@functools.cache
def counting_retry_class() -> type[CountingRetryBase]:
    """``CountingRetry``: ``CountingRetryBase`` on PyGithub's ``GithubRetry`` (imports PyGithub)."""
    from github.GithubRetry import GithubRetry

    class CountingRetry(CountingRetryBase, GithubRetry):
        pass

    return CountingRetry


class _CountingAdapter(HTTPAdapter):
    """Counts each request handed to the transport, reads rate-limit headers off each response, and tells the
    breaker how each request ended (attempts that the retry already counted as failed are not counted twice)."""

    def __init__(
        self,
        *,
        on_attempt: Callable[[], None],
        on_response: Callable[[Mapping[str, Any]], None],
        breaker: Breaker,
        bound_timeout: Callable[[float], float] | None = None,
        **kwargs: Any,
    ) -> None:
        self._on_attempt = on_attempt
        self._on_response = on_response
        self._breaker = breaker
        self._bound_timeout = bound_timeout
        super().__init__(**kwargs)

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        bound = self._bound_timeout
        timeout = kwargs.get("timeout")
        if bound is not None and isinstance(timeout, int | float):
            kwargs["timeout"] = bound(float(timeout))
        elif bound is not None and isinstance(timeout, tuple):
            kwargs["timeout"] = tuple(None if part is None else bound(float(part)) for part in timeout)
        self._on_attempt()
        self._breaker.begin()
        try:
            response = super().send(request, *args, **kwargs)
        except (requests.exceptions.RequestException, urllib3.exceptions.HTTPError, OSError) as error:
            if not self._breaker.recorded():
                self._breaker.failure(_request_path(request.path_url), _failure(error, None))
            raise
        self._on_response(response.headers)
        if response.status_code < 500:
            self._breaker.success()
        elif not self._breaker.recorded():
            self._breaker.failure(_request_path(request.path_url), f"HTTP {response.status_code}")
        return response


def _request_path(url: str | None) -> str:
    return urlsplit(url or "").path


def _failure(error: BaseException | None, response: Any) -> str:
    if error is not None:
        return type(error).__name__
    return f"HTTP {getattr(response, 'status', '?')}"


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    for key, value in headers.items():
        if str(key).lower() == name:
            return str(value)
    return None


def _is_rate_limit(status: int, headers: Mapping[str, Any]) -> bool:
    if status == 429:
        return True
    return status == 403 and (
        _header(headers, "x-ratelimit-remaining") == "0" or _header(headers, "retry-after") is not None
    )


def _reset_at(headers: Mapping[str, Any], wait: float | None) -> datetime | None:
    reset = _header(headers, "x-ratelimit-reset")
    if reset is not None and reset.isdigit() and _header(headers, "x-ratelimit-remaining") == "0":
        return datetime.fromtimestamp(int(reset), UTC)
    retry_after = _header(headers, "retry-after")
    if retry_after is not None and retry_after.isdigit():
        return datetime.now(UTC) + timedelta(seconds=int(retry_after))
    if wait is not None:
        return datetime.now(UTC) + timedelta(seconds=wait)
    if reset is not None and reset.isdigit():
        return datetime.fromtimestamp(int(reset), UTC)
    return None


def _github_message(error: GithubException) -> str:
    data = error.data
    message = data.get("message") if isinstance(data, dict) else None
    text = str(message or error.message or "no message")
    return text[:200]
