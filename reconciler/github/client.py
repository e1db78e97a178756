"""The lookups the reconciler asks GitHub for: commits, short-SHA expansion, paginated compares, commit search.

Commits and compares of two full SHAs are immutable, so they are cached in the state store forever
(``cache.LookupCache``) and a second tick that needs them sends nothing. Within one tick each distinct lookup
runs once even when many threads ask for it at the same time (``SingleFlight``), and every commit a compare
returned answers a later lookup of that commit without a request.

A 404 is not "commit not found" until GitHub has shown it can read the repository (one ``GET /repos/{o}/{r}``
per repository and tick): a repository the token cannot see raises ``RepositoryNotReadable``, named once per
tick. How requests are sent, counted, retried and stopped when GitHub is down is ``transport.Transport``'s job.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import datetime
from typing import Any, TypeVar, cast

from reconciler.config import GitHubConfig
from reconciler.github.cache import CommitCache, Comparison, LookupCache
from reconciler.github.errors import (
    UNREADABLE_CAUSE,
    CommitNotFound,
    GitHubError,
    GitHubUnavailable,
    RepositoryNotReadable,
)
from reconciler.github.transport import Transport
from reconciler.model import FULL_SHA, OWNER_REPO, Commit, parse_time

log = logging.getLogger("reconciler.github")

T = TypeVar("T")

_SHA_PREFIX = re.compile(r"[0-9a-f]{4,40}")

WITHOUT_GITHUB = (
    "commits are sent with their repository and SHA only: no commit message and no range since the previous "
    "deployment; short-SHA image tags cannot be expanded and commit search is off"
)


class SingleFlight:
    """A per-tick memo of futures: the first caller of a key computes it, the others wait for its answer (or its
    error). ``enabled=False`` computes every call (a process that must not share answers between callers)."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._lock = threading.Lock()
        self._memo: dict[tuple[str, ...], Future[Any]] = {}

    def clear(self) -> None:
        with self._lock:
            self._memo.clear()

    def known(self, key: tuple[str, ...]) -> Any:
        """The value already held for ``key``, else ``None``."""
        with self._lock:
            future = self._memo.get(key)
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def once(self, key: tuple[str, ...], compute: Callable[[], T]) -> T:
        if not self.enabled:
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

    def remember(self, key: tuple[str, ...], value: Any) -> None:
        """Seed the memo with a value learnt as a side effect (a short SHA's full commit)."""
        if not self.enabled:
            return
        with self._lock:
            if key not in self._memo:
                future: Future[Any] = Future()
                future.set_result(value)
                self._memo[key] = future


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
        self.web_url = config.web_url
        self.cache = LookupCache(cache, self.web_url)
        self.transport = Transport(
            config,
            sleep=sleep,
            backoff_factor=backoff_factor,
            retries=retries,
            seconds_between_requests=seconds_between_requests,
            bound_timeout=bound_timeout,
        )
        self._lock = threading.Lock()
        self._flight = SingleFlight(enabled=per_tick_memo)
        self._unreadable: dict[str, None] = {}
        """Repositories GitHub answered 404 for this tick, in the order found."""
        self._offline_lock = threading.Lock()
        self._offline: tuple[str | None] | None = None
        """Why GitHub is not used this tick, once known: ``(None,)`` while it is used."""

    # -- counters ------------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """HTTP requests sent to GitHub since the last ``reset_tick()`` (retries included)."""
        return self.transport.requests

    @property
    def total_requests(self) -> int:
        """HTTP requests sent to GitHub by this client since it was created."""
        return self.transport.total_requests

    @property
    def rate_limit_remaining(self) -> int | None:
        """``X-RateLimit-Remaining`` of the last core API response, ``None`` before any."""
        return self.transport.rate_limit_remaining

    @property
    def rate_limit_reset(self) -> datetime | None:
        """``X-RateLimit-Reset`` of the last core API response."""
        return self.transport.rate_limit_reset

    def reset_tick(self) -> None:
        """Forget this tick's lookups, request count, unreadable repositories, outage and whether GitHub can be
        reached; the store's caches stay."""
        self._flight.clear()
        with self._lock:
            self._unreadable.clear()
        with self._offline_lock:
            self._offline = None
        self.transport.reset_tick()

    def offline(self) -> str | None:
        """Why GitHub is not used this tick, ``None`` while it is: ``github.enabled: false``, or no token (nor
        GitHub App) is set and GitHub cannot be reached (one quick probe per tick). Logged once per tick.

        Without GitHub, ``commit()`` knows a full SHA by its repository alone (no message, no date, never cached),
        a short SHA cannot be expanded, ``compare()`` has no range and ``find_repository()`` finds nothing. A token
        that is set means GitHub is wanted: an unreachable GitHub then holds the deployments back as before."""
        if self.config.enabled and self.transport.authenticated:
            return None
        with self._offline_lock:
            if self._offline is None:
                reason = "github.enabled is false" if not self.config.enabled else self.transport.unreachable()
                self._offline = (reason,)
                if reason is not None:
                    chosen = not self.config.enabled
                    log.log(
                        logging.INFO if chosen else logging.WARNING,
                        "GitHub is not used this run",
                        extra={"reason": f"{reason}: {WITHOUT_GITHUB}"},
                    )
            return self._offline[0]

    def tick_problems(self) -> list[str]:
        """What stopped GitHub work this tick and needs telling once: unreadable repositories, an outage."""
        with self._lock:
            problems = [f"GitHub repository {repo}: {UNREADABLE_CAUSE}" for repo in self._unreadable]
        outage = self.transport.breaker.reason
        if outage is not None:
            problems.append(outage)
        return problems

    # -- public lookups ------------------------------------------------------------------------------

    def commit(self, repo: str, ref: str) -> Commit:
        """The commit ``ref`` (a full or short SHA) of ``owner/repo``. Raises ``CommitNotFound``,
        ``RateLimited`` or ``GitHubUnavailable``."""
        repo = _check_repo(repo)
        sha = ref.strip().lower()
        if not _SHA_PREFIX.fullmatch(sha):
            raise CommitNotFound(repo, ref[:80], "not a commit SHA")
        if (offline := self.offline()) is not None:
            if len(sha) < 40:
                raise CommitNotFound(repo, sha, f"a short SHA cannot be expanded without GitHub ({offline})")
            return Commit(repo=repo, repo_url=f"{self.web_url}/{repo}", sha=sha, message="", date=None)
        if len(sha) == 40:
            return self._flight.once(("commit", repo, sha), lambda: self._commit_full(repo, sha))
        return self._flight.once(("short", repo, sha), lambda: self._commit_short(repo, sha))

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
        if (offline := self.offline()) is not None:
            raise CommitNotFound(repo, f"{base[:12]}...{head[:12]}", f"no commit range without GitHub ({offline})")
        return self._flight.once(
            ("compare", repo, base, head, str(limit)), lambda: self._compare(repo, base, head, limit)
        )

    def find_repository(self, sha: str) -> str | None:
        """``owner/repo`` holding ``sha`` according to GitHub commit search (default branches only)."""
        sha = sha.strip().lower()
        if not _SHA_PREFIX.fullmatch(sha) or len(sha) < 7 or self.offline() is not None:
            return None
        return self._flight.once(("search", sha), lambda: self._find_repository(sha))

    def rate_limit(self) -> tuple[int, int, datetime]:
        """``(remaining, limit, reset)`` of the core API from ``GET /rate_limit``; ``(-1, -1, now)`` when
        rate limiting is disabled (GitHub Enterprise Server's default)."""
        return self.transport.rate_limit()

    def probe_repository(self, repo: str) -> str | None:
        """For ``check``: read the newest commit of ``owner/repo``, one request. Returns its SHA (``None`` for an
        empty repository); raises ``RepositoryNotReadable`` (404: it does not exist or the token cannot read it),
        ``RateLimited`` or ``GitHubUnavailable``."""
        from github import GithubException

        repo = _check_repo(repo)
        try:
            with self.transport.github() as gh:
                _, data = gh.requester.requestJsonAndCheck("GET", f"/repos/{repo}/commits", parameters={"per_page": 1})
        except GithubException as error:
            if error.status == 404:
                raise RepositoryNotReadable(repo) from None
            if error.status == 409:  # "Git Repository is empty."
                return None
            raise self.transport.translate(error, None, None) from None
        except GitHubError:
            raise
        except Exception as error:
            raise self.transport.translate(error, None, None) from None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return str(data[0].get("sha") or "") or None
        return None

    # -- commits -------------------------------------------------------------------------------------

    def _commit_full(self, repo: str, sha: str) -> Commit:
        cached = self.cache.commit(repo, sha)
        if cached is not None:
            return cached
        self._check_readable(repo)
        commit = self._to_commit(repo, self._fetch_commit(repo, sha), sha)
        self.cache.put_commit(repo, commit)
        return commit

    def _commit_short(self, repo: str, short: str) -> Commit:
        full = self.cache.full_sha(repo, short)
        if full is not None:
            return self._flight.once(("commit", repo, full), lambda: self._commit_full(repo, full))
        self._check_readable(repo)
        commit = self._to_commit(repo, self._fetch_commit(repo, short), short)
        if not commit.sha.startswith(short):
            raise CommitNotFound(repo, short, f"GitHub answered with commit {commit.sha}")
        self.cache.put_commit(repo, commit)
        self.cache.put_full_sha(repo, short, commit.sha)
        self._flight.remember(("commit", repo, commit.sha), commit)
        return commit

    def _fetch_commit(self, repo: str, ref: str) -> dict[str, Any]:
        try:
            with self.transport.github() as gh:
                # Lazy objects send nothing until completed: ``.sha`` would just echo ``ref`` back.
                fetched = gh.get_repo(repo).get_commit(ref)
                fetched.complete()
                raw: dict[str, Any] = fetched.raw_data
                return raw
        except Exception as error:
            translated = self.transport.translate(error, repo, ref)
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

    # -- compare -------------------------------------------------------------------------------------

    def _compare(self, repo: str, base: str, head: str, limit: int) -> Comparison:
        if not FULL_SHA.fullmatch(head):
            full = self._full_sha_of(repo, head)
            if full is not None:
                return self._flight.once(
                    ("compare", repo, base, full, str(limit)), lambda: self._compare(repo, base, full, limit)
                )
        cacheable = bool(FULL_SHA.fullmatch(base) and FULL_SHA.fullmatch(head))
        key = f"{repo}:{base}...{head}"
        if cacheable:
            cached = self.cache.comparison(repo, key, limit)
            if cached is not None:
                self._remember_commits(repo, cached.commits)
                return cached
        self._check_readable(repo)
        try:
            with self.transport.github() as gh:
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
            translated = self.transport.translate(error, repo, f"{base}...{head}")
            raise self._confirm_missing(translated) from None
        result = Comparison(status=status, commits=tuple(commits), total=total, truncated=len(commits) < total)
        if status == "diverged":
            log.warning(
                "compare: the deployed commit is not a descendant of the previous one (diverged)",
                extra={"reason": f"{repo} {base[:12]}...{head[:12]}"},
            )
        if commits:
            self.cache.put_commits(repo, commits)
            self._remember_commits(repo, commits)
        if not cacheable and FULL_SHA.fullmatch(base) and (found := result.find(head)) is not None:
            # A short head GitHub resolved: remember its full SHA, and this comparison as that of the full SHA.
            self.cache.put_full_sha(repo, head, found.sha)
            self._flight.remember(("short", repo, head), found)
            self._flight.remember(("compare", repo, base, found.sha, str(limit)), result)
            key, cacheable = f"{repo}:{base}...{found.sha}", True
        if cacheable:
            self.cache.put_comparison(key, result)
        return result

    def _full_sha_of(self, repo: str, short: str) -> str | None:
        """The full SHA of ``short`` already learnt (this tick, or cached), else ``None``."""
        known = self._flight.known(("short", repo, short))
        if isinstance(known, Commit):
            return known.sha
        return self.cache.full_sha(repo, short)

    def _remember_commits(self, repo: str, commits: Sequence[Commit]) -> None:
        for commit in commits:
            self._flight.remember(("commit", repo, commit.sha), commit)

    # -- search --------------------------------------------------------------------------------------

    def _find_repository(self, sha: str) -> str | None:
        cached = self.cache.repository_of(sha)
        if cached is not None:
            return cached
        try:
            with self.transport.github() as gh:
                items = [item._rawData for item in gh.search_commits(f"hash:{sha}").get_page(0)]
        except Exception as error:
            raise self.transport.translate(error, None, None) from None
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
        self.cache.put_repository(sha, found[0])
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
        if self._flight.once(("repository", repo), lambda: self._readable(repo)):
            return error
        return RepositoryNotReadable(repo)

    def _readable(self, repo: str) -> bool:
        from github import GithubException

        try:
            with self.transport.github() as gh:
                gh.get_repo(repo).complete()
        except GithubException as error:
            if error.status != 404:
                raise self.transport.translate(error, None, None) from None
        except GitHubError:
            raise
        except Exception as error:
            raise self.transport.translate(error, None, None) from None
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
