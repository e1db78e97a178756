"""GitHub: commit lookup, short-SHA expansion, paginated compare and commit search, cached and counted.

Commits and compares of two full SHAs are immutable, so they are cached in the state store forever and a
second tick that needs them sends nothing. Within one tick each distinct lookup runs once even when many
threads ask for it at the same time (a single-flight memo of futures), and every commit a compare returned
answers a later lookup of that commit without a request.

A 404 is not "commit not found" until GitHub has shown it can read the repository (one ``GET /repos/{o}/{r}``
per repository and tick): a repository the token cannot see raises ``RepositoryNotReadable``, named once per
tick. GitHub failing ``OUTAGE_ATTEMPTS`` attempts in a row (timeouts, connection errors, 5xx) opens a circuit
breaker for the rest of the tick: every later lookup fails at once with ``GitHubUnavailable``.

PyGithub's ``Github`` object is not thread-safe (its connection object keeps the URL of the request in
flight in instance attributes, PyGithub PR #2052), so the client keeps a small pool of ``Github`` instances
and lends each to one thread at a time. Every instance's ``requests`` session gets a counting adapter, so
``requests`` is the exact number of HTTP requests sent, retries included.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Protocol, TypeVar, cast
from urllib.parse import urlsplit

import requests
import urllib3
from github import Auth, Github, GithubException, GithubIntegration, GithubRetry
from github.GithubException import (
    BadCredentialsException,
    RateLimitExceededExceedsMaxWait,
    RateLimitExceededException,
    UnknownObjectException,
)
from github.Requester import Requester
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from reconciler import __version__
from reconciler.config import GitHubConfig
from reconciler.model import FULL_SHA, OWNER_REPO, Commit, parse_time
from reconciler.run import Stopping

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = f"dora-reconciler/{__version__}"
PER_PAGE = 100
SECONDARY_RATE_WAIT = 60.0
"""GitHub: without ``Retry-After`` wait at least a minute after a secondary rate limit."""
TOKEN_REFRESH_MARGIN = timedelta(minutes=2)
CACHE_VERSION = 1
OUTAGE_ATTEMPTS = 6
"""Failed attempts in a row (timeouts, connection errors, HTTP 5xx), spread over at least two different
requests, after which GitHub counts as down for the rest of the tick: what is left of the tick's GitHub work is
deferred to the next run at once instead of waiting out every attempt (6 attempts x ``github.timeout`` per
commit). Six is one request's attempts (the first and its five retries), so one request that always fails (a
compare GitHub cannot compute in time) never opens the breaker alone and cannot hold back everything else."""
UNREADABLE_CAUSE = (
    "GitHub answers 404: the repository does not exist or the token cannot read it (a private repository "
    "outside the token's or the GitHub App installation's access, or an images.repositories rule or a repoURL "
    "naming the wrong repository; devlake.include_gitops_commit: false leaves GitOps commits out)"
)

_SHA_PREFIX = re.compile(r"[0-9a-f]{4,40}")
_SCP_LIKE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*)$")


class GitHubError(Exception):
    """Base of the errors this module raises. Messages never contain credentials."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CommitNotFound(GitHubError):
    """The repository, which GitHub can read, does not have this commit; or ``ref`` is not a commit SHA at all.

    ``status`` is GitHub's answer (422 "No commit found for SHA", 404 while the repository is readable, ...);
    ``None`` when nothing was asked because the reference or the repository name is not valid."""

    def __init__(self, repo: str, ref: str, reason: str, status: int | None = None) -> None:
        super().__init__(f"{repo}@{ref}: {reason}")
        self.repo = repo
        self.ref = ref
        self.status = status


class RepositoryNotReadable(GitHubError):
    """GitHub answers 404 for the repository itself: it does not exist or the token cannot read it. Fixing the
    access (or the mapping) makes the same lookups work, so what needs them waits instead of losing commits."""

    def __init__(self, repo: str) -> None:
        super().__init__(f"repository {repo}: {UNREADABLE_CAUSE}")
        self.repo = repo


class RateLimited(GitHubError):
    """GitHub's rate limit is spent; ``reset_at`` is when it comes back, when GitHub said."""

    def __init__(self, reason: str, reset_at: datetime | None = None) -> None:
        super().__init__(reason)
        self.reset_at = reset_at


class GitHubUnavailable(GitHubError):
    """GitHub cannot be used right now: server errors after retries, timeouts, bad credentials."""


class GitHubDown(GitHubUnavailable):
    """GitHub failed ``OUTAGE_ATTEMPTS`` attempts in a row: nothing more is asked of it this tick (logged once)."""


class CommitCache(Protocol):
    """The part of the state store this module uses (``Store`` satisfies it)."""

    def cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]: ...

    def cache_put(self, kind: str, items: Mapping[str, str]) -> None: ...


@dataclass(frozen=True)
class Comparison:
    """``base...head``: ``commits`` are oldest first, at most ``limit`` of the ``total`` GitHub reports."""

    status: str
    """``ahead``, ``behind`` (a rollback: no commits), ``identical`` or ``diverged``."""
    commits: tuple[Commit, ...]
    total: int
    truncated: bool

    def find(self, ref: str) -> Commit | None:
        """The commit ``ref`` (the compare's head, full or short SHA) among ``commits``, when it is certainly there:
        a full SHA by equality, a short one only when the list is complete and exactly one commit starts with it."""
        ref = ref.lower()
        if FULL_SHA.fullmatch(ref):
            return next((commit for commit in self.commits if commit.sha == ref), None)
        if self.truncated:
            return None
        matches = [commit for commit in self.commits if commit.sha.startswith(ref)]
        return matches[0] if len(matches) == 1 else None


def repository_from_url(url: str, web_url: str) -> str | None:
    """``owner/repo`` (lower case, so every spelling of one repository gives one ``repoUrl``) of a git URL on
    the GitHub host of ``web_url``, else ``None``.

    Accepts ``https://HOST/o/r(.git)(/)``, ``http://``, ``ssh://git@HOST/o/r.git`` and ``git@HOST:o/r.git``.
    """
    want = urlsplit(web_url).hostname
    text = url.strip()
    host: str | None
    if "://" in text:
        try:
            parts = urlsplit(text)
            host = parts.hostname
        except ValueError:
            return None
        if parts.scheme.lower() not in ("http", "https", "ssh", "git"):
            return None
        path = parts.path
    elif match := _SCP_LIKE.match(text):
        host, path = match.group("host"), match.group("path")
    else:
        return None
    if not host or not want or host.lower() != want.lower():
        return None
    path = path.strip("/")
    path = path.removesuffix(".git")
    if not OWNER_REPO.fullmatch(path):
        return None
    return path.lower()


class GitHubClient:
    """GitHub access for one process; ``reset_tick()`` between ticks. Thread-safe."""

    def __init__(
        self,
        config: GitHubConfig,
        cache: CommitCache,
        *,
        per_tick_memo: bool = True,
        sleep: Callable[[float], None] = time.sleep,
        backoff_factor: float = 1.0,
        retries: int = 5,
        seconds_between_requests: float | None = None,
        bound_timeout: Callable[[float], float] | None = None,
    ) -> None:
        """``sleep`` is every wait between retries; one that raises ``Stopping`` ends the lookup as unavailable
        (deferred to the next run). ``bound_timeout`` may shorten each request's timeout (a stopping process)."""
        self.config = config
        self._bound_timeout = bound_timeout
        self.cache = cache
        self.web_url = config.web_url
        self._per_tick_memo = per_tick_memo
        self._sleep = sleep
        self._backoff_factor = backoff_factor
        self._retries = retries
        self._seconds_between_requests = seconds_between_requests
        self._max_wait = config.max_rate_limit_wait.total_seconds()
        self._timeout = max(1, round(config.timeout.total_seconds()))
        self._timeout_seconds = config.timeout.total_seconds() or float(self._timeout)
        """What each request waits for; PyGithub only takes whole seconds, so it is set on its connection."""
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, ...], Future[Any]] = {}
        self._idle: list[Github] = []
        self._requests = 0
        self._total_requests = 0
        self._remaining: int | None = None
        self._reset: datetime | None = None
        self._blocked: RateLimited | None = None
        """After a rate limit: no request is sent until its reset (or, when unknown, until the next tick)."""
        self._breaker = _Breaker(OUTAGE_ATTEMPTS)
        self._unreadable: dict[str, None] = {}
        """Repositories GitHub answered 404 for this tick, in the order found."""
        self._auth = self._build_auth()

    # -- counters ------------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """HTTP requests sent to GitHub since the last ``reset_tick()`` (retries included)."""
        return self._requests

    @property
    def total_requests(self) -> int:
        """HTTP requests sent to GitHub by this client since it was created."""
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
        """Forget this tick's lookups, request count, unreadable repositories and outage; the store's caches stay."""
        with self._lock:
            self._memo.clear()
            self._requests = 0
            self._unreadable.clear()
            if self._blocked is not None and self._blocked.reset_at is None:
                self._blocked = None
        self._breaker.reset()

    def tick_problems(self) -> list[str]:
        """What stopped GitHub work this tick and needs telling once: unreadable repositories, an outage."""
        with self._lock:
            problems = [f"GitHub repository {repo}: {UNREADABLE_CAUSE}" for repo in self._unreadable]
        outage = self._breaker.reason
        if outage is not None:
            problems.append(outage)
        return problems

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

    # -- public lookups ------------------------------------------------------------------------------

    def commit(self, repo: str, ref: str) -> Commit:
        """The commit ``ref`` (a full or short SHA) of ``owner/repo``. Raises ``CommitNotFound``,
        ``RateLimited`` or ``GitHubUnavailable``."""
        repo = _check_repo(repo)
        sha = ref.strip().lower()
        if not _SHA_PREFIX.fullmatch(sha):
            raise CommitNotFound(repo, ref[:80], "not a commit SHA")
        if len(sha) == 40:
            return self._once(("commit", repo, sha), lambda: self._commit_full(repo, sha))
        return self._once(("short", repo, sha), lambda: self._commit_short(repo, sha))

    def compare(self, repo: str, base: str, head: str, limit: int) -> Comparison:
        """Commits in ``head`` and not in ``base``, oldest first, at most ``limit`` of them; ``head`` included when
        it is ahead. ``head`` may be a short SHA: GitHub resolves it, and when the answer shows its full SHA the
        comparison is cached as that of the full SHA. Every commit returned answers later ``commit()`` calls of
        this tick without a request."""
        repo = _check_repo(repo)
        base, head = base.strip().lower(), head.strip().lower()
        for ref in (base, head):
            if not _SHA_PREFIX.fullmatch(ref):
                raise CommitNotFound(repo, ref[:80], "not a commit SHA")
        limit = max(1, limit)
        return self._once(("compare", repo, base, head, str(limit)), lambda: self._compare(repo, base, head, limit))

    def find_repository(self, sha: str) -> str | None:
        """``owner/repo`` holding ``sha`` according to GitHub commit search (default branches only)."""
        sha = sha.strip().lower()
        if not _SHA_PREFIX.fullmatch(sha) or len(sha) < 7:
            return None
        return self._once(("search", sha), lambda: self._find_repository(sha))

    def probe_repository(self, repo: str) -> str | None:
        """For ``check``: read the newest commit of ``owner/repo``, one request. Returns its SHA (``None`` for an
        empty repository); raises ``RepositoryNotReadable`` (404: it does not exist or the token cannot read it),
        ``RateLimited`` or ``GitHubUnavailable``."""
        repo = _check_repo(repo)
        try:
            with self._github() as gh:
                _, data = gh.requester.requestJsonAndCheck("GET", f"/repos/{repo}/commits", parameters={"per_page": 1})
        except GithubException as error:
            if error.status == 404:
                raise RepositoryNotReadable(repo) from None
            if error.status == 409:  # "Git Repository is empty."
                return None
            raise self._translate(error, None, None) from None
        except GitHubError:
            raise
        except Exception as error:
            raise self._translate(error, None, None) from None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return str(data[0].get("sha") or "") or None
        return None

    def rate_limit(self) -> tuple[int, int, datetime]:
        """``(remaining, limit, reset)`` of the core API from ``GET /rate_limit``; ``(-1, -1, now)`` when
        rate limiting is disabled (GitHub Enterprise Server's default)."""
        try:
            with self._github(guard=False) as gh:
                data = gh.get_rate_limit().raw_data
        except GithubException as error:
            if error.status == 404:
                return -1, -1, datetime.now(UTC)
            raise self._translate(error, None, None) from None
        except Exception as error:
            raise self._translate(error, None, None) from None
        try:
            core = data["resources"]["core"]
            return int(core["remaining"]), int(core["limit"]), datetime.fromtimestamp(int(core["reset"]), UTC)
        except (KeyError, TypeError, ValueError):
            raise GitHubUnavailable("unexpected /rate_limit response") from None

    # -- single flight -------------------------------------------------------------------------------

    def _known(self, key: tuple[str, ...]) -> Any:
        """The value the memo already holds for ``key``, else ``None``."""
        with self._lock:
            future = self._memo.get(key)
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def _once(self, key: tuple[str, ...], compute: Callable[[], T]) -> T:
        if not self._per_tick_memo:
            return compute()
        with self._lock:
            future = self._memo.get(key)
            owner = future is None
            if future is None:
                future = Future()
                self._memo[key] = future
        if not owner:
            return cast(T, future.result())
        try:
            result = compute()
        except BaseException as error:
            future.set_exception(error)
            raise
        future.set_result(result)
        return result

    def _remember(self, key: tuple[str, ...], value: Any) -> None:
        """Seed the memo with a value learnt as a side effect (a short SHA's full commit)."""
        if not self._per_tick_memo:
            return
        with self._lock:
            if key not in self._memo:
                future: Future[Any] = Future()
                future.set_result(value)
                self._memo[key] = future

    # -- commits -------------------------------------------------------------------------------------

    def _commit_full(self, repo: str, sha: str) -> Commit:
        key = f"{repo}@{sha}"
        cached = self._cache_get("commit", [key]).get(key)
        if cached is not None:
            commit = self._decode_commit(cached, repo)
            if commit is not None:
                return commit
        self._check_readable(repo)
        commit = self._to_commit(repo, self._fetch_commit(repo, sha), sha)
        self._cache_put("commit", {key: commit.to_json()})
        return commit

    def _commit_short(self, repo: str, short: str) -> Commit:
        key = f"{repo}@{short}"
        full = self._cache_get("short_sha", [key]).get(key)
        if full is not None and FULL_SHA.fullmatch(full):
            return self._once(("commit", repo, full), lambda: self._commit_full(repo, full))
        self._check_readable(repo)
        commit = self._to_commit(repo, self._fetch_commit(repo, short), short)
        if not commit.sha.startswith(short):
            raise CommitNotFound(repo, short, f"GitHub answered with commit {commit.sha}")
        self._cache_put("commit", {f"{repo}@{commit.sha}": commit.to_json()})
        self._cache_put("short_sha", {key: commit.sha})
        self._remember(("commit", repo, commit.sha), commit)
        return commit

    def _fetch_commit(self, repo: str, ref: str) -> dict[str, Any]:
        try:
            with self._github() as gh:
                # Lazy objects send nothing until completed: ``.sha`` would just echo ``ref`` back.
                fetched = gh.get_repo(repo).get_commit(ref)
                fetched.complete()
                raw: dict[str, Any] = fetched.raw_data
                return raw
        except Exception as error:
            translated = self._translate(error, repo, ref)
        raise self._confirm_missing(translated) from None

    def _to_commit(self, repo: str, raw: Any, ref: str) -> Commit:
        try:
            sha = str(raw["sha"]).lower()
            git = raw.get("commit") or {}
            message = str(git.get("message") or "")
            date = _commit_date(git)
        except (KeyError, TypeError, AttributeError):
            raise GitHubUnavailable(f"unexpected commit JSON for {repo}@{ref}") from None
        if not FULL_SHA.fullmatch(sha):
            raise GitHubUnavailable(f"unexpected commit JSON for {repo}@{ref}: bad sha")
        return Commit(repo=repo, repo_url=f"{self.web_url}/{repo}", sha=sha, message=message, date=date)

    def _decode_commit(self, text: str, repo: str) -> Commit | None:
        try:
            commit = Commit.from_json(text)
        except (ValueError, KeyError, TypeError):
            log.warning("corrupt commit cache entry ignored", extra={"reason": f"{repo}"})
            return None
        return replace(commit, repo=repo, repo_url=f"{self.web_url}/{repo}")

    # -- compare -------------------------------------------------------------------------------------

    def _compare(self, repo: str, base: str, head: str, limit: int) -> Comparison:
        if not FULL_SHA.fullmatch(head):
            full = self._full_sha_of(repo, head)
            if full is not None:
                return self._once(
                    ("compare", repo, base, full, str(limit)), lambda: self._compare(repo, base, full, limit)
                )
        cacheable = bool(FULL_SHA.fullmatch(base) and FULL_SHA.fullmatch(head))
        key = f"{repo}:{base}...{head}"
        if cacheable:
            cached = self._cached_comparison(repo, key, limit)
            if cached is not None:
                self._remember_commits(repo, cached.commits)
                return cached
        self._check_readable(repo)
        try:
            with self._github() as gh:
                comparison = gh.get_repo(repo).compare(base, head)
                # Read these first: the request that answers them also carries the first page of commits.
                status = str(comparison.status)
                total = int(comparison.total_commits)
                commits: list[Commit] = []
                for item in comparison.commits:
                    if len(commits) >= limit:
                        break
                    # ``_rawData``: ``raw_data`` would "complete" each lazy list item with one request apiece.
                    commits.append(self._to_commit(repo, item._rawData, head))
        except GitHubError:
            raise
        except Exception as error:
            translated = self._translate(error, repo, f"{base}...{head}")
            raise self._confirm_missing(translated) from None
        result = Comparison(status=status, commits=tuple(commits), total=total, truncated=len(commits) < total)
        if status == "diverged":
            log.warning(
                "compare: the deployed commit is not a descendant of the previous one (diverged)",
                extra={"reason": f"{repo} {base[:12]}...{head[:12]}"},
            )
        if commits:
            self._cache_put("commit", {f"{repo}@{c.sha}": c.to_json() for c in commits})
            self._remember_commits(repo, commits)
        if not cacheable and FULL_SHA.fullmatch(base) and (found := result.find(head)) is not None:
            # A short head GitHub resolved: remember its full SHA, and this comparison as that of the full SHA.
            self._cache_put("short_sha", {f"{repo}@{head}": found.sha})
            self._remember(("short", repo, head), found)
            self._remember(("compare", repo, base, found.sha, str(limit)), result)
            key, cacheable = f"{repo}:{base}...{found.sha}", True
        if cacheable:
            entry = {"v": CACHE_VERSION, "status": status, "total": total, "shas": [c.sha for c in commits]}
            self._cache_put("compare", {key: json.dumps(entry, separators=(",", ":"))})
        return result

    def _full_sha_of(self, repo: str, short: str) -> str | None:
        """The full SHA of ``short`` already learnt (this tick, or cached), else ``None``."""
        known = self._known(("short", repo, short))
        if isinstance(known, Commit):
            return known.sha
        key = f"{repo}@{short}"
        full = self._cache_get("short_sha", [key]).get(key)
        return full if full is not None and FULL_SHA.fullmatch(full) else None

    def _remember_commits(self, repo: str, commits: Sequence[Commit]) -> None:
        for commit in commits:
            self._remember(("commit", repo, commit.sha), commit)

    def _cached_comparison(self, repo: str, key: str, limit: int) -> Comparison | None:
        text = self._cache_get("compare", [key]).get(key)
        if text is None:
            return None
        try:
            entry = json.loads(text)
            if entry.get("v") != CACHE_VERSION:
                return None
            status, total, shas = str(entry["status"]), int(entry["total"]), [str(s) for s in entry["shas"]]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if len(shas) < min(limit, total):
            return None
        shas = shas[:limit]
        keys = [f"{repo}@{sha}" for sha in shas]
        found = self._cache_get("commit", keys)
        commits = [self._decode_commit(found[k], repo) if k in found else None for k in keys]
        if any(commit is None for commit in commits):
            return None
        complete = tuple(commit for commit in commits if commit is not None)
        return Comparison(status=status, commits=complete, total=total, truncated=len(complete) < total)

    # -- search --------------------------------------------------------------------------------------

    def _find_repository(self, sha: str) -> str | None:
        cached = self._cache_get("repo_of", [sha]).get(sha)
        if cached is not None and OWNER_REPO.fullmatch(cached):
            return cached
        try:
            with self._github() as gh:
                items = [item._rawData for item in gh.search_commits(f"hash:{sha}").get_page(0)]
        except Exception as error:
            raise self._translate(error, None, None) from None
        candidates: list[tuple[str, bool]] = []
        for item in items:
            try:
                if not str(item["sha"]).lower().startswith(sha):
                    continue
                repository = item["repository"]
                candidates.append((str(repository["full_name"]), bool(repository.get("fork"))))
            except (KeyError, TypeError, AttributeError):
                continue
        originals = [name for name, fork in candidates if not fork and OWNER_REPO.fullmatch(name)]
        found = originals or [name for name, _ in candidates if OWNER_REPO.fullmatch(name)]
        if not found:
            return None
        if len(set(originals)) > 1:
            log.info(
                "commit search found the commit in several repositories; using the first",
                extra={"reason": f"{sha[:12]}: {sorted(set(originals))[:5]}"},
            )
        self._cache_put("repo_of", {sha: found[0]})
        return found[0]

    # -- readable repositories -----------------------------------------------------------------------

    def _check_readable(self, repo: str) -> None:
        """Refuse at once, without a request, a repository already found unreadable this tick."""
        with self._lock:
            unreadable = repo in self._unreadable
        if unreadable:
            raise RepositoryNotReadable(repo)

    def _confirm_missing(self, error: GitHubError) -> GitHubError:
        """A 404 for a commit or a compare is "not found" only if GitHub can read the repository itself."""
        if not isinstance(error, CommitNotFound) or error.status != 404:
            return error
        repo = error.repo
        if self._once(("repository", repo), lambda: self._readable(repo)):
            return error
        return RepositoryNotReadable(repo)

    def _readable(self, repo: str) -> bool:
        try:
            with self._github() as gh:
                gh.get_repo(repo).complete()
        except GithubException as error:
            if error.status != 404:
                raise self._translate(error, None, None) from None
        except GitHubError:
            raise
        except Exception as error:
            raise self._translate(error, None, None) from None
        else:
            return True
        with self._lock:
            first = repo not in self._unreadable
            self._unreadable[repo] = None
        if first:
            log.error(
                "GitHub cannot read a repository; what needs it is held back until it can",
                extra={"repository": repo, "reason": UNREADABLE_CAUSE},
            )
        return False

    # -- errors --------------------------------------------------------------------------------------

    def _translate(self, error: BaseException, repo: str | None, ref: str | None) -> GitHubError:
        """Map whatever PyGithub, requests or urllib3 raised to one of this module's errors."""
        if isinstance(error, GitHubError):
            return error
        if isinstance(error, Stopping):
            return GitHubUnavailable(f"{error}; the GitHub work in hand is left for the next run")
        outage = self._breaker.reason
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

    # -- PyGithub instances --------------------------------------------------------------------------

    def _block(self, limited: RateLimited) -> RateLimited:
        with self._lock:
            self._blocked = limited
        return limited

    def _check_blocked(self) -> None:
        outage = self._breaker.reason
        if outage is not None:
            raise GitHubDown(outage)
        with self._lock:
            blocked = self._blocked
            if blocked is not None and blocked.reset_at is not None and blocked.reset_at <= datetime.now(UTC):
                self._blocked = blocked = None
        if blocked is not None:
            raise RateLimited(f"{blocked.reason}; not asking again before the reset", blocked.reset_at)

    @contextmanager
    def _github(self, *, guard: bool = True) -> Iterator[Github]:
        """Lend a pooled ``Github`` instance to this thread. ``guard``: refuse while rate limited."""
        if guard:
            self._check_blocked()
        with self._lock:
            gh = self._idle.pop() if self._idle else None
        if gh is None:
            gh = self._new_github(self._auth)
        try:
            yield gh
        finally:
            with self._lock:
                self._idle.append(gh)

    def _retry(self) -> _CountingRetry:
        return _CountingRetry(
            on_attempt=self._count_request,
            on_response=self._observe_headers,
            sleep=self._sleep,
            max_wait=self._max_wait,
            total=self._retries,
            backoff_factor=self._backoff_factor,
            breaker=self._breaker,
            secondary_rate_wait=SECONDARY_RATE_WAIT,
            max_rate_limit_wait=self._max_wait,
        )

    def _new_github(self, auth: Auth.Auth | None) -> Github:
        gh = Github(
            auth=auth,
            base_url=self.config.url,
            timeout=self._timeout,
            user_agent=USER_AGENT,
            per_page=PER_PAGE,
            verify=self.config.verify_tls,
            retry=self._retry(),
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
            breaker=self._breaker,
            bound_timeout=self._bound_timeout,
            max_retries=connection.retry,
            pool_connections=connection.pool_size,
            pool_maxsize=connection.pool_size,
        )
        connection.session.mount("https://", adapter)
        connection.session.mount("http://", adapter)
        connection.adapter = adapter
        connection.timeout = self._timeout_seconds

    def _build_auth(self) -> Auth.Auth | None:
        config = self.config
        if config.app_id is not None and config.app_installation_id is not None:
            return _InstallationToken(self._fetch_installation_token)
        token = config.token()
        if token:
            return Auth.Token(token)
        log.warning(
            "no GitHub token: unauthenticated requests (60 per hour)",
            extra={"reason": f"${config.token_env or 'GITHUB_TOKEN'} is not set"},
        )
        return None

    def _fetch_installation_token(self) -> tuple[str, datetime]:
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
            translated = self._translate(error, None, None)
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
            return self._translate(error, None, None).reason
        except Exception:
            return f"cannot create the GitHub App token ({type(error).__name__})"

    # -- cache ---------------------------------------------------------------------------------------

    def _cache_get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        try:
            return self.cache.cache_get(kind, keys)
        except Exception as error:
            log.warning("commit cache unavailable; asking GitHub", extra={"reason": f"{type(error).__name__}: {error}"})
            return {}

    def _cache_put(self, kind: str, items: Mapping[str, str]) -> None:
        try:
            self.cache.cache_put(kind, items)
        except Exception as error:
            log.warning("commit cache unavailable; not cached", extra={"reason": f"{type(error).__name__}: {error}"})


class _InstallationToken(Auth.Auth):
    """One GitHub App installation token shared by every pooled ``Github`` instance, refreshed when close to expiry."""

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


class _Breaker:
    """The per-tick circuit breaker: opens after ``threshold`` failed attempts in a row over at least two
    different requests, and stays open until ``reset()``. Thread-safe; logs once when it opens."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._lock = threading.Lock()
        self._streak = 0
        self._requests: set[str] = set()
        self._reason: str | None = None
        self._local = threading.local()

    @property
    def reason(self) -> str | None:
        """Why GitHub counts as down for the rest of the tick, or ``None`` while it does not."""
        return self._reason

    def begin(self) -> None:
        """A request starts on this thread."""
        self._local.failures = 0

    def recorded(self) -> bool:
        """Whether an attempt of this thread's current request was already counted as failed."""
        return bool(getattr(self._local, "failures", 0))

    def failure(self, request: str, why: str) -> None:
        self._local.failures = getattr(self._local, "failures", 0) + 1
        with self._lock:
            self._streak += 1
            self._requests.add(request)
            if self._reason is not None or self._streak < self.threshold or len(self._requests) < 2:
                return
            self._reason = (
                f"GitHub is not answering ({self._streak} attempts in a row failed, the last: {why}); "
                "the rest of this run's GitHub work waits for the next run"
            )
        log.error("GitHub is down for the rest of this run", extra={"reason": self._reason})

    def success(self) -> None:
        with self._lock:
            self._streak = 0
            self._requests.clear()

    def reset(self) -> None:
        with self._lock:
            self._streak = 0
            self._requests.clear()
            self._reason = None


class _CountingRetry(GithubRetry):
    """``GithubRetry`` that counts every retried attempt, sleeps through an injectable function and never waits
    longer than ``max_wait`` (a ``Retry-After`` above it raises ``RateLimitExceededExceedsMaxWait``)."""

    def __init__(
        self,
        *,
        on_attempt: Callable[[], None] | None = None,
        on_response: Callable[[Mapping[str, Any]], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        max_wait: float | None = None,
        breaker: _Breaker | None = None,
        **kwargs: Any,
    ) -> None:
        self._on_attempt = on_attempt
        self._on_response = on_response
        self._sleep_function = sleep
        self._max_wait = max_wait
        self._breaker = breaker
        super().__init__(**kwargs)

    def new(self, **kw: Any) -> _CountingRetry:
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


class _CountingAdapter(HTTPAdapter):
    """Counts each request handed to the transport, reads rate-limit headers off each response, and tells the
    breaker how each request ended (attempts that the retry already counted as failed are not counted twice)."""

    def __init__(
        self,
        *,
        on_attempt: Callable[[], None],
        on_response: Callable[[Mapping[str, Any]], None],
        breaker: _Breaker,
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


def _check_repo(repo: str) -> str:
    repo = repo.strip().strip("/")
    if not OWNER_REPO.fullmatch(repo):
        raise CommitNotFound(repo[:120], "", "not an owner/repo name")
    return repo.lower()


def _commit_date(git: Mapping[str, Any]) -> datetime | None:
    for who in ("author", "committer"):
        person = git.get(who) or {}
        value = person.get("date")
        if isinstance(value, str) and value:
            try:
                return parse_time(value)
            except ValueError:
                continue
    return None


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
