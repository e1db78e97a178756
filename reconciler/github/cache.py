"""What GitHub answered, kept in the state store: commits by full SHA, short SHA -> full SHA, comparisons of two
full SHAs and SHA -> repository (commit search). Commits are immutable, so entries never expire. A cache that
fails is only a cost: a read that fails asks GitHub, a write that fails is skipped (both logged)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from reconciler.model import FULL_SHA, OWNER_REPO, Commit

log = logging.getLogger("reconciler.github")

CACHE_VERSION = 1


class CommitCache(Protocol):
    """The part of the state store this package uses (``Store`` satisfies it)."""

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


class LookupCache:
    """The store's GitHub caches, read and written in the shapes the client needs. ``web_url`` is the base of
    the ``repoUrl`` every commit read back gets (so changing ``github.web_url`` needs no cache flush)."""

    def __init__(self, cache: CommitCache, web_url: str) -> None:
        self.cache = cache
        self.web_url = web_url

    # -- commits -------------------------------------------------------------------------------------

    def commit(self, repo: str, sha: str) -> Commit | None:
        key = f"{repo}@{sha}"
        cached = self._get("commit", [key]).get(key)
        return self._decode_commit(cached, repo) if cached is not None else None

    def put_commit(self, repo: str, commit: Commit) -> None:
        self._put("commit", {f"{repo}@{commit.sha}": commit.to_json()})

    def put_commits(self, repo: str, commits: Sequence[Commit]) -> None:
        self._put("commit", {f"{repo}@{c.sha}": c.to_json() for c in commits})

    def full_sha(self, repo: str, short: str) -> str | None:
        """The full SHA a short one was found to be, when cached."""
        key = f"{repo}@{short}"
        full = self._get("short_sha", [key]).get(key)
        return full if full is not None and FULL_SHA.fullmatch(full) else None

    def put_full_sha(self, repo: str, short: str, full: str) -> None:
        self._put("short_sha", {f"{repo}@{short}": full})

    # -- comparisons ---------------------------------------------------------------------------------

    def comparison(self, repo: str, key: str, limit: int) -> Comparison | None:
        """The cached comparison ``key`` (``repo:base...head`` of two full SHAs) when it holds at least ``limit``
        commits (or all of them) and every one of them is cached too."""
        text = self._get("compare", [key]).get(key)
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
        found = self._get("commit", keys)
        commits = [self._decode_commit(found[k], repo) if k in found else None for k in keys]
        if any(commit is None for commit in commits):
            return None
        complete = tuple(commit for commit in commits if commit is not None)
        return Comparison(status=status, commits=complete, total=total, truncated=len(complete) < total)

    def put_comparison(self, key: str, comparison: Comparison) -> None:
        entry = {
            "v": CACHE_VERSION,
            "status": comparison.status,
            "total": comparison.total,
            "shas": [c.sha for c in comparison.commits],
        }
        self._put("compare", {key: json.dumps(entry, separators=(",", ":"))})

    # -- commit search -------------------------------------------------------------------------------

    def repository_of(self, sha: str) -> str | None:
        cached = self._get("repo_of", [sha]).get(sha)
        return cached if cached is not None and OWNER_REPO.fullmatch(cached) else None

    def put_repository(self, sha: str, repo: str) -> None:
        self._put("repo_of", {sha: repo})

    # -- the store -----------------------------------------------------------------------------------

    def _decode_commit(self, text: str, repo: str) -> Commit | None:
        try:
            commit = Commit.from_json(text)
        except (ValueError, KeyError, TypeError):
            log.warning("corrupt commit cache entry ignored", extra={"reason": f"{repo}"})
            return None
        return replace(commit, repo=repo, repo_url=f"{self.web_url}/{repo}")

    def _get(self, kind: str, keys: Sequence[str]) -> dict[str, str]:
        try:
            return self.cache.cache_get(kind, keys)
        except Exception as error:
            log.warning("commit cache unavailable; asking GitHub", extra={"reason": f"{type(error).__name__}: {error}"})
            return {}

    def _put(self, kind: str, items: Mapping[str, str]) -> None:
        try:
            self.cache.cache_put(kind, items)
        except Exception as error:
            log.warning("commit cache unavailable; not cached", extra={"reason": f"{type(error).__name__}: {error}"})
