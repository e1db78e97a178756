"""GitHub: commit lookup, short-SHA expansion, paginated compare and commit search, cached and counted.

One job per module: ``client`` (the lookups and their per-tick single flight), ``transport`` (PyGithub
instances, authentication, retries, rate limits), ``breaker`` (the per-tick circuit breaker), ``cache`` (what
GitHub answered, kept in the state store), ``urls`` (recognising a repository URL of the GitHub host) and
``errors``. This package knows nothing of Argo CD, DevLake or the state store's other contents.

Importing it does not import PyGithub: the first request does (``transport``). ``CountingRetry``, the retry every
request goes through, is built on PyGithub's ``GithubRetry`` then: ``counting_retry_class()`` returns it.
"""

from reconciler.github.breaker import OUTAGE_ATTEMPTS
from reconciler.github.cache import CommitCache, Comparison
from reconciler.github.client import WITHOUT_GITHUB, GitHubClient
from reconciler.github.errors import (
    UNREADABLE_CAUSE,
    CommitNotFound,
    GitHubDown,
    GitHubError,
    GitHubUnavailable,
    RateLimited,
    RepositoryNotReadable,
)
from reconciler.github.transport import counting_retry_class
from reconciler.github.urls import repository_from_url

__all__ = [
    "OUTAGE_ATTEMPTS",
    "UNREADABLE_CAUSE",
    "WITHOUT_GITHUB",
    "CommitCache",
    "CommitNotFound",
    "Comparison",
    "GitHubClient",
    "GitHubDown",
    "GitHubError",
    "GitHubUnavailable",
    "RateLimited",
    "RepositoryNotReadable",
    "counting_retry_class",
    "repository_from_url",
]
