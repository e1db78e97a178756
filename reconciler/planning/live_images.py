"""The live images of an Application (``status.summary.images``) read per image repository.

``status.summary.images`` lists every pod: while a rollout's old pods are still terminating, one repository shows
two commit tags. These readings never pick the tag the last deployment replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

CommitImages = Callable[[Sequence[str]], Mapping[str, str]]
"""Raw image references -> ``{image repository: commit tag}`` (``PlannerPolicy.commit_images``)."""


class LiveImages:
    """``status.summary.images`` of one observation, with the policy's commit-image mapping."""

    def __init__(self, summary_images: Sequence[str], commit_images: CommitImages) -> None:
        self.summary_images = summary_images
        self.commit_images = commit_images
        self._tags: dict[str, frozenset[str]] | None = None

    def tags(self) -> dict[str, frozenset[str]]:
        """Image repository -> every commit tag live (two during a rollout)."""
        if self._tags is None:
            tags: dict[str, set[str]] = {}
            for ref in self.summary_images:
                for repository, tag in self.commit_images([ref]).items():
                    tags.setdefault(repository, set()).add(tag)
            self._tags = {repository: frozenset(found) for repository, found in tags.items()}
        return self._tags

    def baseline(self, previous: Mapping[str, str], prefer: Mapping[str, str] | None = None) -> dict[str, str]:
        """One tag per live repository: the only one; of two or more (a rollout's old pods still terminating), the
        one ``prefer`` names (what a sync applied), else the one left once ``previous`` (the tag the last deployment
        replaced) is set aside. A repository still ambiguous is left out: unknown, re-read at a later tick."""
        baseline: dict[str, str] = {}
        for repository, tags in self.tags().items():
            preferred = (prefer or {}).get(repository)
            if len(tags) > 1 and preferred in tags:
                baseline[repository] = preferred
                continue
            remaining = tags - {previous.get(repository)} if len(tags) > 1 else tags
            if len(remaining) == 1:
                baseline[repository] = next(iter(remaining))
        return baseline

    def refs(self, previous: Mapping[str, str], leave_out: Iterable[str] = ()) -> tuple[str, ...]:
        """The references without those of a rollout's old pods: in a repository showing two tags, the tag
        ``previous`` had; and without the repositories in ``leave_out``."""
        live, skip = self.tags(), set(leave_out)
        refs: list[str] = []
        for ref in self.summary_images:
            tagged = self.commit_images([ref])
            if any(
                repository in skip or (len(live.get(repository, ())) > 1 and previous.get(repository) == tag)
                for repository, tag in tagged.items()
            ):
                continue
            refs.append(ref)
        return tuple(refs)
