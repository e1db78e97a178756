"""Resolve each planned deployment's images and GitOps revision to GitHub commits.

For every commit-tagged image the GitHub repository comes from ``images.repositories`` (or commit search),
the tag is expanded to a full SHA, and the history since the previous deployment of that repository is a
GitHub compare. The previous head per repository comes from the snapshot and is carried forward through
the Application's deployments of this tick, so deployment k's heads are deployment k+1's bases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import ParamSpec, TypeVar

from reconciler.config import Config
from reconciler.github import (
    CommitNotFound,
    GitHubClient,
    GitHubUnavailable,
    RateLimited,
    repository_from_url,
)
from reconciler.images import CommitTagRule, InvalidImageReference, RepositoryMapper, parse_image
from reconciler.model import FULL_SHA, Commit, Deployment, EnrichedDeployment, format_time

log = logging.getLogger(__name__)


P = ParamSpec("P")
T = TypeVar("T")


@dataclass(frozen=True)
class Skipped:
    """No commit could be resolved: DevLake rejects a deployment without commits, so it is recorded, not sent."""

    reason: str
    deployment: Deployment | None = None
    warnings: tuple[str, ...] = ()
    deployed_commits: Mapping[str, str] = field(default_factory=dict, hash=False)
    """The previous heads, unchanged: the base for the Application's next deployment."""


@dataclass(frozen=True)
class Deferred:
    """GitHub is rate limited or down: this deployment and the later ones of its Application wait a tick."""

    reason: str
    reset_at: datetime | None = None
    deployment: Deployment | None = None


EnrichOutcome = EnrichedDeployment | Skipped | Deferred


class _Defer(Exception):
    def __init__(self, reason: str, reset_at: datetime | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reset_at = reset_at


class Enricher:
    """Turns ``Deployment`` plans into ``EnrichedDeployment`` (or ``Skipped`` / ``Deferred``)."""

    def __init__(self, config: Config, github: GitHubClient) -> None:
        self.config = config
        self.github = github
        self.rule = CommitTagRule(config.images.commit_tag_pattern)
        self.mapper = RepositoryMapper(config.images)

    def enrich_many(
        self, batches: Sequence[tuple[Sequence[Deployment], Mapping[str, str]]]
    ) -> list[list[EnrichOutcome]]:
        """``enrich_app`` for many Applications in parallel (``github.max_concurrency``); results in input order."""
        if not batches:
            return []
        workers = min(self.config.github.max_concurrency, len(batches))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="enrich") as pool:
            if len(batches) > 1:
                try:
                    self._prefetch(pool, batches)
                except Exception:  # only an optimisation: each Application still resolves its own commits
                    log.exception("prefetching commit lookups failed unexpectedly")
            return list(pool.map(lambda batch: self._enrich_isolated(batch[0], batch[1]), batches))

    def _prefetch(
        self, pool: ThreadPoolExecutor, batches: Sequence[tuple[Sequence[Deployment], Mapping[str, str]]]
    ) -> None:
        """Send the lookups of every Application's first deployment side by side, before any Application starts.

        Each Application resolves its commits one round trip after another (head, then compare, then the GitOps
        commit), and Applications of one component wait on the same lookups, so without this a burst costs a
        chain of round trips per component. The GitHub client's per-tick memo makes this transparent: the
        Applications then get these very answers (or errors), and no lookup is sent twice. A compare is only
        sent once its head commit was found, as ``_enrich_one`` would.
        """
        firsts = [(deployments[0], previous) for deployments, previous in batches if deployments]
        wanted = {pair for deployment, _ in firsts for pair in self._image_lookups(deployment)}
        wanted.update(pair for deployment, _ in firsts for pair in self._gitops_lookups(deployment))
        lookups = list(wanted)
        commits = pool.map(lambda pair: self._quietly(self.github.commit, *pair), lookups)
        found = dict(zip(lookups, commits, strict=True))
        limit = self.config.github.max_commits_per_range
        compares: set[tuple[str, str, str]] = set()
        for deployment, previous in firsts:
            heads: dict[str, set[str]] = {}
            for repo, sha in self._image_lookups(deployment):
                commit = found.get((repo, sha))
                if commit is not None:
                    heads.setdefault(repo, set()).add(commit.sha)
            for repo, shas in heads.items():
                base = previous.get(repo)
                if len(shas) == 1 and base is not None and base.lower() not in shas:
                    compares.add((repo, base, next(iter(shas))))
        list(pool.map(lambda c: self._quietly(self.github.compare, c[0], c[1], c[2], limit), compares))

    @staticmethod
    def _quietly(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        try:
            return function(*args, **kwargs)
        except Exception:  # remembered by the client's memo; the Application's own call gets the same error
            return None

    def _image_lookups(self, deployment: Deployment) -> list[tuple[str, str]]:
        """``(repo, commit tag)`` of each mapped, commit-tagged image, as ``_image_heads`` looks them up."""
        lookups: list[tuple[str, str]] = []
        for raw in dict.fromkeys(deployment.images):
            try:
                image = parse_image(raw)
            except InvalidImageReference:
                continue
            if image.tag is None or self.mapper.ignored(image):
                continue
            sha = self.rule.commit_of(image.tag)
            repo = self.mapper.repository_for(image) if sha is not None else None
            if sha is not None and repo is not None:
                lookups.append((repo, sha))
        return lookups

    def _gitops_lookups(self, deployment: Deployment) -> list[tuple[str, str]]:
        """``(repo, revision)`` of each Git source's commit, as ``_gitops_commits`` looks them up."""
        if not self.config.devlake.include_gitops_commit:
            return []
        lookups: list[tuple[str, str]] = []
        for index, source in enumerate(deployment.sources):
            if source.chart or index >= len(deployment.revisions):
                continue
            revision = deployment.revisions[index]
            repo = (
                repository_from_url(source.repo_url, self.github.web_url)
                if FULL_SHA.fullmatch(revision.lower())
                else None
            )
            if repo is not None:
                lookups.append((repo, revision))
        return lookups

    def _enrich_isolated(self, deployments: Sequence[Deployment], previous: Mapping[str, str]) -> list[EnrichOutcome]:
        try:
            return self.enrich_app(deployments, previous)
        except Exception as error:
            app = str(deployments[0].key) if deployments else "?"
            log.exception("enrichment failed unexpectedly; retrying next run", extra={"app": app})
            reason = f"internal error while resolving commits: {type(error).__name__}"
            return [Deferred(reason, None, deployment) for deployment in deployments]

    def enrich_app(self, deployments: Sequence[Deployment], previous_commits: Mapping[str, str]) -> list[EnrichOutcome]:
        """One outcome per deployment, in order. After a ``Deferred`` every later deployment is ``Deferred`` too."""
        outcomes: list[EnrichOutcome] = []
        carried = dict(previous_commits)
        for index, deployment in enumerate(deployments):
            try:
                outcome = self._enrich_one(deployment, carried)
            except _Defer as defer:
                log.warning(
                    "GitHub cannot be used now; deployment deferred",
                    extra=_fields(deployment, defer.reason),
                )
                outcomes.extend(Deferred(defer.reason, defer.reset_at, later) for later in deployments[index:])
                return outcomes
            if isinstance(outcome, EnrichedDeployment):
                carried = dict(outcome.deployed_commits)
            outcomes.append(outcome)
        return outcomes

    # -- one deployment ------------------------------------------------------------------------------

    def _enrich_one(self, deployment: Deployment, previous: Mapping[str, str]) -> EnrichedDeployment | Skipped:
        warnings: list[str] = []
        image_heads = self._image_heads(deployment, warnings)
        heads: dict[str, Commit] = {}
        history: list[Commit] = []
        deployed = dict(previous)
        rollback = False
        limit = self.config.github.max_commits_per_range
        for repo, head in image_heads.items():
            heads[repo] = head
            deployed[repo] = head.sha
            base = previous.get(repo)
            if base is None or base.lower() == head.sha:
                history.append(head)
                continue
            try:
                comparison = _call(self.github.compare, repo, base, head.sha, limit)
            except CommitNotFound as error:
                warnings.append(f"{repo}: no history from the previous deployment's {base[:12]} ({error.reason})")
                history.append(head)
                continue
            if comparison.status == "behind":
                rollback = True
            elif comparison.status == "diverged":
                warnings.append(f"{repo}: {head.sha[:12]} diverged from the previous {base[:12]}")
            if comparison.truncated:
                warnings.append(
                    f"{repo}: {comparison.total} commits since {base[:12]}, "
                    f"only the first {len(comparison.commits)} kept"
                )
            history.extend(comparison.commits)
            history.append(head)
        if self.config.devlake.include_gitops_commit:
            for gitops in self._gitops_commits(deployment, warnings):
                heads.setdefault(gitops.repo, gitops)
                history.append(gitops)

        self._check_dates(deployment, _unique([*heads.values(), *history]), warnings)
        kept_heads = [commit for commit in heads.values() if commit.date is not None]
        kept_history = sorted(
            (commit for commit in _unique(history) if commit.date is not None),
            key=lambda commit: commit.date or deployment.finished_at,
        )
        for warning in warnings:
            log.warning(warning, extra=_fields(deployment, warning))
        if not kept_heads:
            reason = "no commit could be resolved" + (f": {'; '.join(warnings)}" if warnings else "")
            return Skipped(reason[:2000], deployment, tuple(warnings), dict(previous))
        return EnrichedDeployment(
            deployment=deployment,
            heads=tuple(kept_heads),
            history=tuple(kept_history),
            deployed_commits=deployed,
            rollback=rollback,
            warnings=tuple(warnings),
        )

    def _image_heads(self, deployment: Deployment, warnings: list[str]) -> dict[str, Commit]:
        """The deployed head commit per GitHub repository, in image order."""
        found: dict[str, list[Commit]] = {}
        for raw in dict.fromkeys(deployment.images):
            try:
                image = parse_image(raw)
            except InvalidImageReference as error:
                warnings.append(f"image {raw[:120]!r} ignored: {error.reason}")
                continue
            if image.tag is None or self.mapper.ignored(image):
                continue
            sha = self.rule.commit_of(image.tag)
            if sha is None:
                continue
            repo = self.mapper.repository_for(image)
            if repo is None and self.config.images.search_fallback:
                repo = _call(self.github.find_repository, sha)
            if repo is None:
                warnings.append(f"image {image.repository}:{image.tag}: no GitHub repository (images.repositories)")
                continue
            try:
                commit = _call(self.github.commit, repo, sha)
            except CommitNotFound as error:
                warnings.append(f"image {image.repository}:{image.tag}: commit dropped ({error.reason})")
                continue
            commits = found.setdefault(repo, [])
            if all(existing.sha != commit.sha for existing in commits):
                commits.append(commit)
        heads: dict[str, Commit] = {}
        for repo, commits in found.items():
            head = commits[0]
            if len(commits) > 1:
                head = max(commits, key=lambda c: (c.date is not None, c.date or deployment.finished_at))
                shas = ", ".join(c.sha[:12] for c in commits)
                warnings.append(f"{repo}: images at several commits ({shas}); the newest, {head.sha[:12]}, is the head")
            heads[repo] = head
        return heads

    def _gitops_commits(self, deployment: Deployment, warnings: list[str]) -> list[Commit]:
        """The GitOps repository commit of each Git source (Helm chart versions and OCI digests are not commits)."""
        commits: list[Commit] = []
        for index, source in enumerate(deployment.sources):
            if source.chart or index >= len(deployment.revisions):
                continue
            revision = deployment.revisions[index]
            if not FULL_SHA.fullmatch(revision.lower()):
                continue
            repo = repository_from_url(source.repo_url, self.github.web_url)
            if repo is None:
                continue
            try:
                commits.append(_call(self.github.commit, repo, revision))
            except CommitNotFound as error:
                warnings.append(f"GitOps commit {repo}@{revision[:12]} dropped ({error.reason})")
        return commits

    @staticmethod
    def _check_dates(deployment: Deployment, commits: Iterable[Commit], warnings: list[str]) -> None:
        """A commit without a date is dropped (DevLake needs one); one dated after the deployment is kept."""
        for commit in commits:
            if commit.date is None:
                warnings.append(f"{commit.repo}@{commit.sha[:12]} dropped: GitHub gives it no date")
            elif commit.date > deployment.finished_at:
                warnings.append(
                    f"{commit.repo}@{commit.sha[:12]} is dated {format_time(commit.date)}, after the deployment "
                    f"finished ({format_time(deployment.finished_at)})"
                )


def _call(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a GitHub lookup; rate limits and outages become ``_Defer`` (the rest of the app waits a tick)."""
    try:
        return function(*args, **kwargs)
    except RateLimited as error:
        raise _Defer(f"GitHub rate limited: {error.reason}", error.reset_at) from None
    except GitHubUnavailable as error:
        raise _Defer(f"GitHub unavailable: {error.reason}", None) from None


def _fields(deployment: Deployment, reason: str) -> dict[str, str]:
    key = deployment.key
    return {"app": str(key), "cluster": key.cluster, "deployment_id": deployment.id, "reason": reason}


def _unique(commits: Sequence[Commit]) -> list[Commit]:
    seen: set[tuple[str, str]] = set()
    unique: list[Commit] = []
    for commit in commits:
        key = (commit.repo.lower(), commit.sha)
        if key not in seen:
            seen.add(key)
            unique.append(commit)
    return unique
