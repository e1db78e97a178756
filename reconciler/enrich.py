"""Resolve each planned deployment's images and GitOps revision to GitHub commits.

For every commit-tagged image the GitHub repository comes from ``images.repositories`` (or commit search), and
the history since the previous deployment of that repository is a GitHub compare ``previous...tag``, which also
returns the deployed commit itself (full SHA, message, dates), so no separate lookup is needed for it. A commit
is looked up on its own only when no compare returns it: an image without a previous SHA, a rollback (GitHub
returns no commit for a head behind its base), and the GitOps revision. The previous head per repository comes
from the snapshot and is carried forward through the Application's deployments of this tick, so deployment k's
heads are deployment k+1's bases.

What GitHub cannot give yet holds the deployment back (``Deferred``: it and the Application's later deployments
wait for the next run): rate limits, outages, a repository the token cannot read, and, for ``MISSING_COMMIT_GRACE``
after the deployment finished, a commit GitHub does not have in a repository it can read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import ParamSpec, TypeVar

from reconciler.config import Config, GitOpsCommit
from reconciler.github import (
    CommitNotFound,
    Comparison,
    GitHubClient,
    GitHubDown,
    GitHubUnavailable,
    RateLimited,
    RepositoryNotReadable,
    repository_from_url,
)
from reconciler.images import CommitTagRule, InvalidImageReference, RepositoryMapper, parse_image
from reconciler.model import FULL_SHA, Commit, Deployment, EnrichedDeployment, format_time

log = logging.getLogger(__name__)


P = ParamSpec("P")
T = TypeVar("T")

MISSING_COMMIT_GRACE = timedelta(hours=1)
"""How long after a deployment finished a commit GitHub does not have (422 "No commit found", or 404 in a
repository it can read) holds the deployment back: a commit pushed a little after its image was built or
deployed, or not yet replicated, then arrives with its deployment. Past it the commit is dropped with a warning
(a tag never pushed, a force-push that dropped it, a mapping to the wrong repository) and the deployment goes out
with the commits it has; holding it longer would hold every later deployment of the Application with it."""


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
    """GitHub cannot give this deployment's commits now (rate limit, outage, a repository it cannot read, a commit
    it does not have yet): this deployment and the later ones of its Application wait a tick."""

    reason: str
    reset_at: datetime | None = None
    deployment: Deployment | None = None
    unreadable: str | None = None
    """The repository GitHub cannot read, when that is why."""
    reported: bool = False
    """The cause was logged once for the run (unreadable repository, GitHub down): no need to repeat it loudly."""


EnrichOutcome = EnrichedDeployment | Skipped | Deferred


class _Defer(Exception):
    def __init__(
        self, reason: str, reset_at: datetime | None, *, unreadable: str | None = None, reported: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.reset_at = reset_at
        self.unreadable = unreadable
        self.reported = reported


@dataclass(frozen=True)
class _Image:
    """The commit tags of one GitHub repository among a deployment's images, each with the image that names it."""

    repo: str
    tags: dict[str, str]
    """Commit tag (full or short SHA, lower case) -> ``image:tag`` for messages."""


class Enricher:
    """Turns ``Deployment`` plans into ``EnrichedDeployment`` (or ``Skipped`` / ``Deferred``)."""

    def __init__(
        self, config: Config, github: GitHubClient, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.config = config
        self.github = github
        self.clock = clock
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
        """Send the GitHub requests of every Application side by side, before any Application starts, in two
        waves: first every compare, then the commit lookups that no compare answered.

        Each Application resolves its commits one round trip after another, and Applications of one component wait
        on the same lookups, so without this a burst costs a chain of round trips per component. Sending the
        compares first means a commit that any compare returns (another Application's range passing through a
        rollback's head, say) is never looked up on its own. The GitHub client's per-tick memo makes this
        transparent: the Applications then get these very answers (or errors), and nothing is sent twice.
        Covered: the compares and lookups of each Application's first deployment with commit-tagged images (its
        bases are the snapshot's), and the GitOps lookups of every deployment that will carry its GitOps commit
        (with ``include_gitops_commit: fallback``, as far as its image tags tell).
        """
        if self.github.offline() is not None:
            return  # nothing to ask: commits are known by their SHA alone
        firsts: list[tuple[Deployment, Mapping[str, str], list[_Image]]] = []
        for deployments, previous in batches:
            for deployment in deployments:
                if images := self._images(deployment, [], search=False):
                    firsts.append((deployment, previous, images))
                    break
        limit = self.config.github.max_commits_per_range
        compares: set[tuple[str, str, str]] = set()
        for _deployment, previous, images in firsts:
            for image in images:
                base, tags = previous.get(image.repo), list(image.tags)
                if len(tags) == 1 and base is not None and not _same_commit(base, tags[0]):
                    compares.add((image.repo, base, tags[0]))
        list(pool.map(lambda c: self._quietly(self.github.compare, c[0], c[1], c[2], limit), compares))
        gitops: set[tuple[str, str]] = set()
        for deployments, previous in batches:
            carried = dict(previous)
            for deployment in deployments:
                images = self._images(deployment, [], search=False)
                if self._carries_gitops(images, carried):
                    gitops.update(self._gitops_lookups(deployment))
                carried.update({image.repo: next(iter(image.tags)) for image in images if len(image.tags) == 1})
        work: list[Callable[[], object]] = [partial(self._heads, d, p, images) for d, p, images in firsts]
        work += [partial(self.github.commit, repo, revision) for repo, revision in gitops]
        list(pool.map(self._quietly, work))

    def _heads(self, deployment: Deployment, previous: Mapping[str, str], images: Sequence[_Image]) -> None:
        """Resolve a deployment's image heads as ``_enrich_one`` will (its compares are memoised by then)."""
        for image in images:
            self._resolve(deployment, image, previous.get(image.repo), [])

    @staticmethod
    def _quietly(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T | None:
        try:
            return function(*args, **kwargs)
        except Exception:  # remembered by the client's memo; the Application's own call gets the same error
            return None

    def _carries_gitops(self, images: Sequence[_Image], previous: Mapping[str, str]) -> bool:
        """Whether a deployment with these images will carry its GitOps commit, judged by the tags alone."""
        mode = self.config.devlake.include_gitops_commit
        if mode is not GitOpsCommit.FALLBACK:
            return mode is GitOpsCommit.ALWAYS
        return all(
            image.repo in previous and all(_same_commit(previous[image.repo], tag) for tag in image.tags)
            for image in images
        )

    def _gitops_lookups(self, deployment: Deployment) -> list[tuple[str, str]]:
        """``(repo, revision)`` of each Git source's commit, as ``_gitops_commits`` looks them up."""
        if self.config.devlake.include_gitops_commit is GitOpsCommit.NEVER:
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
                log.log(
                    logging.INFO if defer.reported else logging.WARNING,
                    "GitHub cannot give this deployment's commits now; deployment deferred",
                    extra=_fields(deployment, defer.reason),
                )
                outcomes.extend(
                    Deferred(defer.reason, defer.reset_at, later, defer.unreadable, defer.reported)
                    for later in deployments[index:]
                )
                return outcomes
            if isinstance(outcome, EnrichedDeployment):
                carried = dict(outcome.deployed_commits)
            outcomes.append(outcome)
        return outcomes

    # -- one deployment ------------------------------------------------------------------------------

    def _enrich_one(self, deployment: Deployment, previous: Mapping[str, str]) -> EnrichedDeployment | Skipped:
        warnings: list[str] = []
        heads: dict[str, Commit] = {}
        history: list[Commit] = []
        deployed = dict(previous)
        rollback = False
        changed = False  # an image's head is not the one deployed before (or none is known): app code shipped
        for image in self._images(deployment, warnings):
            base = previous.get(image.repo)
            resolved = self._resolve(deployment, image, base, warnings)
            if resolved is None:
                continue
            head, comparison = resolved
            repo = image.repo
            heads[repo] = head
            deployed[repo] = head.sha
            changed = changed or base is None or base.lower() != head.sha
            if comparison is not None and base is not None:
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
        mode = self.config.devlake.include_gitops_commit
        if mode is GitOpsCommit.ALWAYS or (mode is GitOpsCommit.FALLBACK and not changed):
            for gitops in self._gitops_commits(deployment, warnings):
                heads.setdefault(gitops.repo, gitops)
                history.append(gitops)

        self._check_dates(deployment, _unique([*heads.values(), *history]), warnings)
        kept_heads = list(heads.values())
        kept_history = sorted(_unique(history), key=lambda commit: commit.date or deployment.finished_at)
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

    def _images(self, deployment: Deployment, warnings: list[str], *, search: bool = True) -> list[_Image]:
        """The commit tags of the deployment's images per GitHub repository, in image order. ``search``: ask
        GitHub commit search for images no rule maps (``images.search_fallback``)."""
        found: dict[str, _Image] = {}
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
            if repo is None and search and self.config.images.search_fallback:
                repo = _call(self.github.find_repository, sha)
            if repo is None:
                if search:
                    warnings.append(f"image {image.repository}:{image.tag}: no GitHub repository (images.repositories)")
                continue
            found.setdefault(repo, _Image(repo, {})).tags.setdefault(sha.lower(), f"{image.repository}:{image.tag}")
        return list(found.values())

    def _resolve(
        self, deployment: Deployment, image: _Image, base: str | None, warnings: list[str]
    ) -> tuple[Commit, Comparison | None] | None:
        """The deployed head of one repository and the comparison from ``base`` (``None``: no range, the history
        is the head alone), or ``None`` when the head was dropped. The compare returns the head with the range, so
        the head is looked up on its own only when no compare returns it."""
        repo = image.repo
        limit = self.config.github.max_commits_per_range
        without_range = self.github.offline() is not None  # without GitHub the history is the head alone
        if len(image.tags) > 1:
            head = self._newest(deployment, image, warnings)
            if head is None or base is None or base.lower() == head.sha or without_range:
                return (head, None) if head is not None else None
            return head, self._compare_or_warn(repo, base, head.sha, warnings)
        tag, label = next(iter(image.tags.items()))
        if base is None or _same_commit(base, tag) or without_range:
            known = base.lower() if base is not None and _same_commit(base, tag) else tag
            head = self._lookup(deployment, repo, known, f"image {label}", warnings)
            return (head, None) if head is not None else None
        try:
            comparison = _call(self.github.compare, repo, base, tag, limit)
        except CommitNotFound as error:
            # GitHub has not got the base or the head: the head decides whether there is a deployment to tell.
            head = self._lookup(deployment, repo, tag, f"image {label}", warnings)
            if head is None:
                return None
            if FULL_SHA.fullmatch(tag):
                warnings.append(f"{repo}: no history from the previous deployment's {base[:12]} ({error.reason})")
                return head, None
            return head, self._compare_or_warn(repo, base, head.sha, warnings)  # the short tag was the trouble
        head = comparison.find(tag) or self._lookup(deployment, repo, tag, f"image {label}", warnings)
        return (head, comparison) if head is not None else None

    def _newest(self, deployment: Deployment, image: _Image, warnings: list[str]) -> Commit | None:
        """Images of one repository at several commits: the newest is the head."""
        commits: list[Commit] = []
        for tag, label in image.tags.items():
            commit = self._lookup(deployment, image.repo, tag, f"image {label}", warnings)
            if commit is not None and all(existing.sha != commit.sha for existing in commits):
                commits.append(commit)
        if not commits:
            return None
        head = max(commits, key=lambda c: (c.date is not None, c.date or deployment.finished_at))
        if len(commits) > 1:
            shas = ", ".join(c.sha[:12] for c in commits)
            warnings.append(
                f"{image.repo}: images at several commits ({shas}); the newest, {head.sha[:12]}, is the head"
            )
        return head

    def _compare_or_warn(self, repo: str, base: str, head: str, warnings: list[str]) -> Comparison | None:
        try:
            return _call(self.github.compare, repo, base, head, self.config.github.max_commits_per_range)
        except CommitNotFound as error:
            warnings.append(f"{repo}: no history from the previous deployment's {base[:12]} ({error.reason})")
            return None

    def _lookup(self, deployment: Deployment, repo: str, ref: str, label: str, warnings: list[str]) -> Commit | None:
        """One commit, or ``None`` when GitHub does not have it and the grace is over (a warning says so)."""
        try:
            return _call(self.github.commit, repo, ref)
        except CommitNotFound as error:
            self._missing(deployment, label, error)
            warnings.append(f"{label}: commit dropped ({error.reason})")
            return None

    def _missing(self, deployment: Deployment, label: str, error: CommitNotFound) -> None:
        """Within ``MISSING_COMMIT_GRACE`` of the deployment, a commit GitHub says it does not have holds it back."""
        if error.status is None:
            return  # not a commit reference at all: waiting cannot help
        until = deployment.finished_at + MISSING_COMMIT_GRACE
        if self.clock() < until:
            raise _Defer(
                f"{label}: GitHub does not have this commit ({error.reason}); held back until {format_time(until)}, "
                "then sent without it",
                None,
            )

    def _gitops_commits(self, deployment: Deployment, warnings: list[str]) -> list[Commit]:
        """The GitOps repository commit of each Git source (Helm chart versions and OCI digests are not commits)."""
        commits: list[Commit] = []
        for repo, revision in self._gitops_lookups(deployment):
            commit = self._lookup(deployment, repo, revision, f"GitOps commit {repo}@{revision[:12]}", warnings)
            if commit is not None:
                commits.append(commit)
        return commits

    @staticmethod
    def _check_dates(deployment: Deployment, commits: Iterable[Commit], warnings: list[str]) -> None:
        """A commit dated after the deployment finished is kept with a warning (clock skew, or a mapping to the
        wrong repository). A commit without a date is kept as it is: the payload carries the deployment's dates."""
        for commit in commits:
            if commit.date is not None and commit.date > deployment.finished_at:
                warnings.append(
                    f"{commit.repo}@{commit.sha[:12]} is dated {format_time(commit.date)}, after the deployment "
                    f"finished ({format_time(deployment.finished_at)})"
                )


def _same_commit(base: str, tag: str) -> bool:
    """``tag`` (a full or short SHA) names the commit ``base`` (a full SHA)."""
    base, tag = base.lower(), tag.lower()
    return base == tag or (len(tag) < 40 and base.startswith(tag))


def _call(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a GitHub lookup; rate limits, outages and unreadable repositories become ``_Defer`` (the rest of the
    app waits a tick)."""
    try:
        return function(*args, **kwargs)
    except RateLimited as error:
        raise _Defer(f"GitHub rate limited: {error.reason}", error.reset_at) from None
    except RepositoryNotReadable as error:
        raise _Defer(error.reason, None, unreadable=error.repo, reported=True) from None
    except GitHubUnavailable as error:
        down = isinstance(error, GitHubDown)
        raise _Defer(f"GitHub unavailable: {error.reason}", None, reported=down) from None


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
