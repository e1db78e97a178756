"""Image references, commit tags and image -> repository mapping (pure)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reconciler.config import ImagesConfig
from reconciler.images import (
    CommitImages,
    CommitTagRule,
    InvalidImageReference,
    RepositoryMapper,
    commit_images,
    parse_image,
)

SHA = "0f1e2d3c4b5a69788796a5b4c3d2e1f0a1b2c3d4"
DIGEST = "sha256:" + "ab" * 32

VALID = [
    # (reference, registry, path, tag, digest)
    ("nginx", "docker.io", "library/nginx", None, None),
    ("nginx:1.25", "docker.io", "library/nginx", "1.25", None),
    ("nginx:latest", "docker.io", "library/nginx", "latest", None),
    ("nginx:1.25-alpine", "docker.io", "library/nginx", "1.25-alpine", None),
    ("bitnami/redis:7.2.4", "docker.io", "bitnami/redis", "7.2.4", None),
    ("docker.io/nginx", "docker.io", "library/nginx", None, None),
    ("docker.io/library/nginx:1.25", "docker.io", "library/nginx", "1.25", None),
    ("docker.io/grafana/grafana:10.4.1", "docker.io", "grafana/grafana", "10.4.1", None),
    ("index.docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", None),
    ("localhost/app", "localhost", "app", None, None),
    ("localhost:5000/app:dev", "localhost:5000", "app", "dev", None),
    ("localhost:5000/team/app:" + SHA, "localhost:5000", "team/app", SHA, None),
    ("localhost:5000", "docker.io", "library/localhost", "5000", None),
    ("127.0.0.1:5000/x/y:v1", "127.0.0.1:5000", "x/y", "v1", None),
    ("[::1]:5000/x/y:v1", "[::1]:5000", "x/y", "v1", None),
    ("registry.example.com:443/team/app:v1.2.3", "registry.example.com:443", "team/app", "v1.2.3", None),
    ("Registry.Example.com/team/app:v1", "registry.example.com", "team/app", "v1", None),
    ("quay.io/konflux-ci/build-service:" + SHA, "quay.io", "konflux-ci/build-service", SHA, None),
    ("quay.io/org/img:abc1234", "quay.io", "org/img", "abc1234", None),
    ("quay.io/org/img:1234567", "quay.io", "org/img", "1234567", None),
    ("quay.io/org/img:on-pr-" + SHA, "quay.io", "org/img", "on-pr-" + SHA, None),
    ("quay.io/org/img@" + DIGEST, "quay.io", "org/img", None, DIGEST),
    ("quay.io/org/img:" + SHA + "@" + DIGEST, "quay.io", "org/img", SHA, DIGEST),
    ("nginx:1.25@" + DIGEST, "docker.io", "library/nginx", "1.25", DIGEST),
    ("nginx@" + DIGEST, "docker.io", "library/nginx", None, DIGEST),
    ("ghcr.io/acme/api:sha-abc1234", "ghcr.io", "acme/api", "sha-abc1234", None),
    ("ghcr.io/acme/platform/services/api:main", "ghcr.io", "acme/platform/services/api", "main", None),
    ("gcr.io/distroless/static-debian12:nonroot", "gcr.io", "distroless/static-debian12", "nonroot", None),
    (
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com/team/svc:2024.05.01",
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        "team/svc",
        "2024.05.01",
        None,
    ),
    ("europe-docker.pkg.dev/proj/repo/img:v2", "europe-docker.pkg.dev", "proj/repo/img", "v2", None),
    (
        "registry.k8s.io/ingress-nginx/controller:v1.10.0",
        "registry.k8s.io",
        "ingress-nginx/controller",
        "v1.10.0",
        None,
    ),
    ("mcr.microsoft.com/dotnet/aspnet:8.0", "mcr.microsoft.com", "dotnet/aspnet", "8.0", None),
    ("quay.io/org/my_image__x:tag_With.CAPS-1", "quay.io", "org/my_image__x", "tag_With.CAPS-1", None),
    ("quay.io/org/img:" + "a" * 128, "quay.io", "org/img", "a" * 128, None),
    ("quay.io/org/img@sha512:" + "c" * 128, "quay.io", "org/img", None, "sha512:" + "c" * 128),
    ("host.example/a/b/c/d/e:1", "host.example", "a/b/c/d/e", "1", None),
    ("a/b", "docker.io", "a/b", None, None),
]

INVALID = [
    ("", "empty"),
    (":::", "tag"),
    (" nginx", "whitespace"),
    ("nginx latest", "whitespace"),
    ("nginx:1.25\n", "whitespace"),
    ("quay.io/Org/img:v1", "lowercase"),
    ("Nginx", "lowercase"),
    ("quay.io/org/img@sha256:abc", "digest"),
    ("quay.io/org/img@sha256:" + "AB" * 32, "digest"),
    ("quay.io/org/img@sha256", "digest"),
    ("quay.io/org/img@", "digest"),
    ("quay.io/org/img:", "tag"),
    ("quay.io/org/img:-leading-dash", "tag"),
    ("quay.io/org/img:" + "a" * 129, "tag"),
    ("quay.io/org//img", "component"),
    ("quay.io/org/img/", "component"),
    ("quay.io/", "missing"),
    ("registry:99999/x", "port"),
    ("registry:/x", "port"),
    ("-bad.example.com/x", "registry"),
    ("quay.io/org/-img", "component"),
    ("quay.io/org/img..x", "component"),
    ("my_registry.local/a/b", "registry"),
    ("a" * 10_000, "longer than 4096"),
    ("quay.io/" + "a/" * 200 + "b", "longer than 255"),
    ("@" + DIGEST, "missing"),
    ("nginx:1.25:extra", "component"),
]


@pytest.mark.parametrize(("ref", "registry", "path", "tag", "digest"), VALID, ids=[row[0][:60] for row in VALID])
def test_parse_valid_references(ref: str, registry: str, path: str, tag: str | None, digest: str | None) -> None:
    image = parse_image(ref)
    assert (image.registry, image.path, image.tag, image.digest) == (registry, path, tag, digest)
    assert image.raw == ref
    assert image.repository == f"{registry}/{path}"


@pytest.mark.parametrize(("ref", "reason"), INVALID, ids=[row[0][:40] or "empty" for row in INVALID])
def test_parse_rejects_garbage_with_a_reason(ref: str, reason: str) -> None:
    with pytest.raises(InvalidImageReference) as caught:
        parse_image(ref)
    assert reason in caught.value.reason
    assert len(str(caught.value)) < 300, "the reason must not echo a huge input back"


def test_reference_table_is_big_enough() -> None:
    assert len(VALID) + len(INVALID) >= 60


def test_tag_and_digest_are_both_kept() -> None:
    """``name:sha@digest`` keeps its SHA tag: the digest does not replace it."""
    image = parse_image(f"quay.io/org/img:{SHA}@{DIGEST}")
    assert CommitTagRule().commit_of(image.tag or "") == SHA
    assert image.digest == DIGEST


@given(st.text(max_size=300))
@example("a" * 5000)
@example("[" * 3 + "]/x")
@example("[::1/x")
@example("host:0/x")
@example("a@b@c")
@example("\x00")
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_parse_image_only_raises_invalid_image_reference(text: str) -> None:
    try:
        image = parse_image(text)
    except InvalidImageReference as error:
        assert error.reason
    else:
        assert image.repository and image.raw == text


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)


@given(
    registry=st.sampled_from(["quay.io", "ghcr.io", "localhost:5000", "registry.example.com:8443"]),
    components=st.lists(_component, min_size=1, max_size=4),
    tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True),
    digest=st.none() | st.from_regex(r"[a-f0-9]{64}", fullmatch=True),
)
def test_parse_image_round_trips_generated_references(
    registry: str, components: list[str], tag: str | None, digest: str | None
) -> None:
    path = "/".join(components)
    ref = f"{registry}/{path}" + (f":{tag}" if tag else "") + (f"@sha256:{digest}" if digest else "")
    image = parse_image(ref)
    assert (image.registry, image.path, image.tag) == (registry, path, tag)
    assert image.digest == (f"sha256:{digest}" if digest else None)


# -- commit tags ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "commit"),
    [
        (SHA, SHA),
        ("abc1234", "abc1234"),
        ("deadbeef", "deadbeef"),
        ("on-pr-" + SHA, SHA),
        ("sha-abc1234", "abc1234"),
        ("main-0a1b2c3d", "0a1b2c3d"),
        ("v1.2.3-abc1234", "abc1234"),
        ("1234567890123456789012345678901234567890", "1234567890123456789012345678901234567890"),
        ("1234567", None),  # a build number, not a SHA
        ("main-1234567", None),
        ("20240501", None),
        ("latest", None),
        ("v1.2.3", None),
        ("1.25-alpine", None),
        ("abc123", None),  # 6 characters: too short
        ("ABC1234", None),  # uppercase is not how git prints SHAs
        (SHA + "0", None),  # 41 characters
        ("v1.2.3-4-gabc1234", None),  # git describe: the "g" prefix is not hex
        ("cafe", None),
    ],
)
def test_default_commit_tag_rule(tag: str, commit: str | None) -> None:
    assert CommitTagRule().commit_of(tag) == commit


def test_configured_commit_tag_pattern_uses_the_sha_group() -> None:
    rule = CommitTagRule(r"build-(?P<sha>[0-9a-f]{7,40})-\d+")
    assert rule.commit_of(f"build-{SHA}-17") == SHA
    assert rule.commit_of(f"prefix-build-{SHA}-17") is None, "the pattern must match the whole tag"
    assert rule.commit_of(SHA) is None


def test_configured_pattern_without_group_takes_the_whole_match_and_accepts_digits() -> None:
    rule = CommitTagRule(r"[0-9A-F]{7}")
    assert rule.commit_of("1234567") == "1234567"
    assert rule.commit_of("ABCDEF0") == "abcdef0"
    assert rule.commit_of("release") is None


def test_configured_pattern_capturing_something_that_is_not_hex_is_not_a_commit() -> None:
    assert CommitTagRule(r"(?P<sha>.+)").commit_of("release-candidate") is None


# -- repository mapping ---------------------------------------------------------------------------------


def _images(**values: object) -> ImagesConfig:
    return ImagesConfig.model_validate(values)


def test_first_matching_rule_fills_the_template() -> None:
    mapper = RepositoryMapper(
        _images(
            repositories=[
                {"image": r"quay\.io/acme/legacy-(?P<name>[^/]+)", "repo": "acme-legacy/{name}"},
                {"image": r"quay\.io/(?P<org>[^/]+)/(?P<name>[^/]+)", "repo": "{org}/{name}"},
                {"image": r"quay\.io/acme/.*", "repo": "acme/never"},
            ]
        )
    )
    assert mapper.repository_for(parse_image("quay.io/acme/legacy-api:" + SHA)) == "acme-legacy/api"
    assert mapper.repository_for(parse_image("quay.io/acme/Web-UI".lower())) == "acme/web-ui"
    assert mapper.repository_for(parse_image("ghcr.io/acme/api")) is None


def test_rule_regex_must_match_the_whole_repository() -> None:
    mapper = RepositoryMapper(_images(repositories=[{"image": r"acme/(?P<name>\w+)", "repo": "acme/{name}"}]))
    assert mapper.repository_for(parse_image("quay.io/acme/api")) is None
    mapper = RepositoryMapper(_images(repositories=[{"image": r".*/acme/(?P<name>\w+)", "repo": "acme/{name}"}]))
    assert mapper.repository_for(parse_image("quay.io/acme/api")) == "acme/api"


def test_docker_hub_short_names_are_matched_in_full_form() -> None:
    mapper = RepositoryMapper(
        _images(repositories=[{"image": r"docker\.io/library/(?P<name>.+)", "repo": "docker-library/{name}"}])
    )
    assert mapper.repository_for(parse_image("nginx:1.25")) == "docker-library/nginx"


def test_result_that_is_not_owner_repo_is_rejected() -> None:
    mapper = RepositoryMapper(
        _images(
            repositories=[
                {"image": r"quay\.io/(?P<path>.+)", "repo": "{path}"},
                {"image": r"ghcr\.io/(?P<name>.+)", "repo": "acme/{missing}"},
            ]
        )
    )
    assert mapper.repository_for(parse_image("quay.io/a/b/c")) is None
    assert mapper.repository_for(parse_image("quay.io/a/b")) == "a/b"
    assert mapper.repository_for(parse_image("ghcr.io/x")) is None


def test_optional_group_that_did_not_match_is_not_filled_with_none() -> None:
    mapper = RepositoryMapper(
        _images(repositories=[{"image": r"quay\.io/acme/(?P<name>[a-z]+)(?P<suffix>-v2)?", "repo": "acme/{suffix}"}])
    )
    assert mapper.repository_for(parse_image("quay.io/acme/api")) is None


def test_ignore_globs_match_the_raw_reference_or_the_repository() -> None:
    mapper = RepositoryMapper(_images(ignore=["*/istio/proxyv2*", "docker.io/library/*", "*:debug-*"]))
    assert mapper.ignored(parse_image("docker.io/istio/proxyv2:1.21.0"))
    assert mapper.ignored(parse_image("busybox:1.36"))
    assert mapper.ignored(parse_image("quay.io/acme/api:debug-abc1234"))
    assert not mapper.ignored(parse_image("quay.io/acme/api:abc1234"))


def test_commit_images_keeps_only_commit_tagged_not_ignored_parseable_images() -> None:
    images = _images(ignore=["quay.io/acme/sidecar"])
    refs = [
        "quay.io/acme/api:" + SHA,
        "quay.io/acme/web:on-pr-abc1234",
        "quay.io/acme/sidecar:deadbeef",
        "quay.io/acme/worker:1234567",
        "nginx:1.25",
        "quay.io/acme/db@" + DIGEST,
        "NOT A REF",
        "",
    ]
    assert commit_images(refs, images) == {
        "quay.io/acme/api": SHA,
        "quay.io/acme/web": "on-pr-abc1234",
    }


def test_commit_images_does_not_depend_on_image_order() -> None:
    refs = ["quay.io/acme/api:bbbbbbb", "quay.io/acme/api:aaaaaaa"]
    assert commit_images(refs, _images()) == commit_images(list(reversed(refs)), _images())


def test_commit_images_honours_a_configured_pattern() -> None:
    images = _images(commit_tag_pattern=r"git-(?P<sha>[0-9a-f]{40})")
    refs = ["quay.io/acme/api:git-" + SHA, "quay.io/acme/web:" + SHA]
    assert commit_images(refs, images) == {"quay.io/acme/api": "git-" + SHA}


def test_commit_images_for_comparisons_leaves_out_images_no_rule_maps_unless_search_may_find_them() -> None:
    rules = [{"image": r"quay\.io/acme/(?P<name>[^/]+)", "repo": "acme/{name}"}]
    refs = ["quay.io/acme/api:" + SHA, "registry.acme.io/platform/log-agent:3f9c2ab", "quay.io/acme/web:abc1234"]
    assert CommitImages(_images(repositories=rules), mapped_only=True)(refs) == {
        "quay.io/acme/api": SHA,
        "quay.io/acme/web": "abc1234",
    }
    searched = CommitImages(_images(repositories=rules, search_fallback=True), mapped_only=True)(refs)
    assert searched["registry.acme.io/platform/log-agent"] == "3f9c2ab"
    assert len(CommitImages(_images(repositories=rules))(refs)) == 3, "every commit-tagged image by default"
