"""Container image references, commit tags and image -> GitHub repository mapping. Pure: no I/O.

The grammar follows the distribution reference format used by Docker and containerd:
``[registry[:port]/]path[:tag][@algorithm:digest]``, with Docker Hub short names expanded the way
``docker pull`` does (``nginx`` is ``docker.io/library/nginx``).
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Iterable

from reconciler.config import ImagesConfig
from reconciler.model import OWNER_REPO, ImageRef

log = logging.getLogger(__name__)

MAX_REFERENCE_LENGTH = 4096
MAX_NAME_LENGTH = 255
DOCKER_HUB = "docker.io"

_DOMAIN_COMPONENT = r"(?:[A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9])"
_HOST = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9A-Fa-f:.]+\])")
_PORT = re.compile(r"[0-9]{1,5}")
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST_ALGORITHM = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*")
_DIGEST_HEX = {"sha256": re.compile(r"[a-f0-9]{64}"), "sha512": re.compile(r"[a-f0-9]{128}")}
_OTHER_DIGEST = re.compile(r"[a-zA-Z0-9=_-]{32,}")
_WHITESPACE = re.compile(r"\s")

_HEX = re.compile(r"[0-9a-f]{7,40}")
_HEX_ANY_CASE = re.compile(r"[0-9a-fA-F]{7,40}")


class InvalidImageReference(ValueError):
    """An image reference that cannot be parsed. ``reason`` says what is wrong with it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_image(ref: str) -> ImageRef:
    """Parse an image reference; raises ``InvalidImageReference`` (and nothing else) when it is not one."""
    if not isinstance(ref, str):
        raise InvalidImageReference(f"expected a string, got {type(ref).__name__}")
    if not ref:
        raise InvalidImageReference("empty image reference")
    if len(ref) > MAX_REFERENCE_LENGTH:
        raise InvalidImageReference(f"image reference longer than {MAX_REFERENCE_LENGTH} characters")
    if _WHITESPACE.search(ref):
        raise InvalidImageReference("image reference contains whitespace")

    name, at, digest = ref.partition("@")
    digest = _parse_digest(digest) if at else ""

    slash = name.rfind("/")
    colon = name.rfind(":")
    tag: str | None = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidImageReference(f"invalid tag {tag[:140]!r}")
    if not name:
        raise InvalidImageReference("missing repository name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidImageReference(f"repository name longer than {MAX_NAME_LENGTH} characters")

    registry, path = _split_registry(name)
    for component in path.split("/"):
        if not _PATH_COMPONENT.fullmatch(component):
            if component.lower() != component:
                raise InvalidImageReference(f"repository path must be lowercase: {path!r}")
            raise InvalidImageReference(f"invalid repository path component {component!r}")
    return ImageRef(raw=ref, registry=registry, path=path, tag=tag, digest=digest or None)


def _parse_digest(digest: str) -> str:
    algorithm, colon, encoded = digest.partition(":")
    if not colon or not algorithm or not encoded:
        raise InvalidImageReference("invalid digest: expected algorithm:hex after '@'")
    if not _DIGEST_ALGORITHM.fullmatch(algorithm):
        raise InvalidImageReference(f"invalid digest algorithm {algorithm[:40]!r}")
    pattern = _DIGEST_HEX.get(algorithm, _OTHER_DIGEST)
    if not pattern.fullmatch(encoded):
        raise InvalidImageReference(f"invalid {algorithm} digest")
    return f"{algorithm}:{encoded}"


def _split_registry(name: str) -> tuple[str, str]:
    """Split off the registry the way Docker does: the first component is a host when it has a dot,
    a port, is ``localhost`` or has uppercase letters; otherwise the image is on Docker Hub."""
    first, slash, rest = name.partition("/")
    is_host = slash and ("." in first or ":" in first or first == "localhost" or first.lower() != first)
    if not is_host:
        path = name if slash else f"library/{name}"
        return DOCKER_HUB, path
    host, port, has_port = first, "", False
    if first.startswith("["):
        end = first.find("]")
        host, after = (first, "") if end < 0 else (first[: end + 1], first[end + 1 :])
        if after and not after.startswith(":"):
            raise InvalidImageReference(f"invalid registry {first[:80]!r}")
        has_port, port = bool(after), after[1:]
    elif ":" in first:
        host, _, port = first.partition(":")
        has_port = True
    if not _HOST.fullmatch(host):
        raise InvalidImageReference(f"invalid registry host {first[:80]!r}")
    if has_port and not (_PORT.fullmatch(port) and 0 < int(port) < 65536):
        raise InvalidImageReference(f"invalid registry port in {first[:80]!r}")
    registry = host.lower() + (f":{port}" if port else "")
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if not rest:
        raise InvalidImageReference("missing repository path after the registry")
    if registry == DOCKER_HUB and "/" not in rest:
        rest = f"library/{rest}"
    return registry, rest


class CommitTagRule:
    """Recognises image tags that name a git commit.

    Without a pattern: the whole tag, or its last ``-``-separated part, is 7-40 lowercase hex characters
    and contains a letter a-f or is 40 long (``1234567`` is a build number, not a SHA). With a pattern:
    ``re.fullmatch`` against the tag, the ``sha`` group (or the whole match) is the commit.
    """

    def __init__(self, pattern: str | None = None) -> None:
        self.pattern = re.compile(pattern) if pattern is not None else None

    def commit_of(self, tag: str) -> str | None:
        """The commit named by ``tag`` (lowercase hex, possibly short), or ``None``."""
        if self.pattern is None:
            for candidate in (tag, tag.rsplit("-", 1)[-1]):
                if _HEX.fullmatch(candidate) and (len(candidate) == 40 or not candidate.isdigit()):
                    return candidate
            return None
        match = self.pattern.fullmatch(tag)
        if match is None:
            return None
        value = match.group("sha") if "sha" in self.pattern.groupindex else match.group(0)
        if value is None or not _HEX_ANY_CASE.fullmatch(value):
            return None
        return value.lower()


class RepositoryMapper:
    """``images.repositories`` (image repository regex -> ``owner/repo`` template) and ``images.ignore``."""

    def __init__(self, images: ImagesConfig) -> None:
        self._rules = [(re.compile(rule.image), rule.repo) for rule in images.repositories]
        self._ignore = list(images.ignore)

    def repository_for(self, image: ImageRef) -> str | None:
        """``owner/repo`` (lower case: GitHub names are case-insensitive, and DevLake needs one byte-identical
        ``repoUrl`` per repository) from the first rule whose regex matches the whole image repository."""
        for pattern, template in self._rules:
            match = pattern.fullmatch(image.repository)
            if match is None:
                continue
            groups = {name: value for name, value in match.groupdict().items() if value is not None}
            try:
                repo = template.format_map(groups)
            except (KeyError, IndexError, ValueError) as error:
                log.warning(
                    "images.repositories template cannot be filled",
                    extra={"reason": f"template {template!r} for {image.repository}: {error!r}"},
                )
                return None
            if not OWNER_REPO.fullmatch(repo) or repo.endswith(("/.", "/..")):
                log.warning(
                    "images.repositories rule produced something that is not owner/repo",
                    extra={"reason": f"{image.repository} -> {repo[:200]!r}"},
                )
                return None
            return repo.lower()
        return None

    def ignored(self, image: ImageRef) -> bool:
        """Whether an ``images.ignore`` glob matches the raw reference or the image repository."""
        return any(
            fnmatch.fnmatchcase(image.raw, glob) or fnmatch.fnmatchcase(image.repository, glob) for glob in self._ignore
        )


def commit_images(refs: Iterable[str], images: ImagesConfig) -> dict[str, str]:
    """Image repository -> commit tag for every parseable, not ignored, commit-tagged reference.

    When one repository appears with several commit tags the smallest tag wins, so the answer does not
    depend on the order Argo CD lists the images in.
    """
    return CommitImages(images)(refs)


class CommitImages:
    """``commit_images`` for one images configuration, remembering what each reference turned out to be.

    The planner asks this for every Application on every tick; sidecar and base images recur across most of
    them, so each distinct reference is parsed once (up to ``max_references``, then the rest are not kept).

    ``mapped_only``: leave out commit-tagged images no ``images.repositories`` rule maps to a GitHub repository,
    unless ``images.search_fallback`` may still find one. A changed image is one whose (GitHub repository -> SHA)
    changed (``docs/design.md`` §4): a platform sidecar's commit tag is not a deployment of the app.
    """

    def __init__(self, images: ImagesConfig, max_references: int = 20_000, *, mapped_only: bool = False) -> None:
        self._rule = CommitTagRule(images.commit_tag_pattern)
        self._mapper = RepositoryMapper(images)
        self._max = max_references
        self._known: dict[str, tuple[str, str] | None] = {}
        self._mapped_only = mapped_only and not images.search_fallback

    def __call__(self, refs: Iterable[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for ref in refs:
            if not isinstance(ref, str):
                continue
            if ref in self._known:
                tagged = self._known[ref]
            else:
                tagged = self._commit_tagged(ref)
                if len(self._known) < self._max:
                    self._known[ref] = tagged
            if tagged is None:
                continue
            repository, tag = tagged
            current = found.get(repository)
            if current is None or tag < current:
                found[repository] = tag
        return found

    def _commit_tagged(self, ref: str) -> tuple[str, str] | None:
        """``(image repository, tag)`` of a parseable, not ignored, commit-tagged reference, else ``None``."""
        try:
            image = parse_image(ref)
        except InvalidImageReference:
            return None
        if image.tag is None or self._mapper.ignored(image) or self._rule.commit_of(image.tag) is None:
            return None
        if self._mapped_only and self._mapper.repository_for(image) is None:
            return None
        return image.repository, image.tag
