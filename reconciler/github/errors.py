"""The errors the GitHub client raises. Messages never contain credentials."""

from __future__ import annotations

from datetime import datetime

UNREADABLE_CAUSE = (
    "GitHub answers 404: the repository does not exist or the token cannot read it (a private repository "
    "outside the token's or the GitHub App installation's access, or an images.repositories rule or a repoURL "
    "naming the wrong repository; devlake.include_gitops_commit: false leaves GitOps commits out)"
)


class GitHubError(Exception):
    """Base of the errors this package raises. Messages never contain credentials."""

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
