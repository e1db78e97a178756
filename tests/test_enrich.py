"""Enricher: images and GitOps revisions -> GitHub commits, against the fake GitHub."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import responses
from freezegun import freeze_time

from reconciler.config import Config, validate_config
from reconciler.enrich import MISSING_COMMIT_GRACE, Deferred, Enricher, EnrichOutcome, Skipped
from reconciler.github import GitHubClient
from reconciler.model import (
    AppKey,
    Deployment,
    DeploymentClass,
    DeploymentKind,
    EnrichedDeployment,
    Result,
    Snapshot,
    SourceRef,
)
from tests.fakes.github import START, FakeGitHub, InMemoryCache

TOKEN = "ghp_enrichTESTtoken000000000000000000000"
FINISHED = START + timedelta(days=1)
GITOPS = SourceRef("https://github.com/acme/gitops.git", path="apps/api/overlays/prod", target_revision="main")


def make_config(**sections: Any) -> Config:
    data: dict[str, Any] = {
        "clusters": [{"name": "prod"}],
        "images": {"repositories": [{"image": r"quay\.io/acme/(?P<name>[a-z0-9-]+)", "repo": "acme/{name}"}]},
        "github": {"max_rate_limit_wait": "0s", "max_concurrency": 8},
        "devlake": {"url": "https://devlake.example.com", "connections": [{"id": 1, "api_key_env": "K"}]},
    }
    for name, value in sections.items():
        data[name] = {**data.get(name, {}), **value}
    return validate_config(data)


def deploy(
    ref: str = "h1",
    *,
    images: Sequence[str] = (),
    revisions: Sequence[str] = (),
    sources: Sequence[SourceRef] = (GITOPS,),
    finished_at: datetime = FINISHED,
    app: str = "api-prod",
) -> Deployment:
    key = AppKey("prod", "apps", app)
    return Deployment(
        key=key,
        uid=f"uid-{app}-0000",
        kind=DeploymentKind.HISTORY,
        ref=ref,
        result=Result.SUCCESS,
        deployment_class=DeploymentClass.NEW_REVISION,
        started_at=finished_at - timedelta(minutes=2),
        finished_at=finished_at,
        revisions=tuple(revisions),
        sources=tuple(sources),
        snapshot_after=Snapshot(uid=f"uid-{app}-0000", last_seen=finished_at),
        images=tuple(images),
        history_id=int(ref[1:]) if ref.startswith("h") else None,
    )


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield FakeGitHub(rsps, token=TOKEN)


@pytest.fixture
def cache() -> InMemoryCache:
    return InMemoryCache()


LATER = FINISHED + MISSING_COMMIT_GRACE + timedelta(minutes=1)
"""The enricher's clock unless a test says otherwise: past the grace for commits GitHub does not have."""


def enricher_for(cache: InMemoryCache, *, now: datetime = LATER, **sections: Any) -> tuple[Enricher, GitHubClient]:
    config = make_config(**sections)
    client = GitHubClient(config.github, cache, sleep=lambda seconds: None, backoff_factor=0)
    return Enricher(config, client, clock=lambda: now), client


def only(outcomes: list[EnrichOutcome]) -> EnrichedDeployment:
    assert len(outcomes) == 1
    outcome = outcomes[0]
    assert isinstance(outcome, EnrichedDeployment), outcome
    return outcome


# -- heads and history ---------------------------------------------------------------------------------


def test_first_deployment_has_the_image_head_and_the_gitops_commit(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 3)
    gitops = fake.add_commit("acme/gitops")
    enricher, client = enricher_for(cache, devlake={"include_gitops_commit": True})
    enriched = only(
        enricher.enrich_app(
            [deploy(images=[f"quay.io/acme/api:{api[2]}", "nginx:1.25"], revisions=[gitops])],
            {},
        )
    )
    assert [(c.repo, c.sha) for c in enriched.heads] == [("acme/api", api[2]), ("acme/gitops", gitops)]
    assert {(c.repo, c.sha) for c in enriched.history} == {("acme/api", api[2]), ("acme/gitops", gitops)}
    assert enriched.deployed_commits == {"acme/api": api[2]}
    assert all(c.repo_url == f"https://github.com/{c.repo}" for c in enriched.heads)
    assert not enriched.rollback and fake.count("compare") == 0
    assert client.requests == 2


@pytest.mark.parametrize(
    ("api_url", "web_url", "web"),
    [
        ("https://api.octocorp.ghe.com", None, "https://octocorp.ghe.com"),  # GHE.com with data residency
        ("https://gh-proxy.acme.io/api/v3", "https://github.com", "https://github.com"),  # a proxy to github.com
    ],
)
def test_repo_urls_and_gitops_repositories_are_on_the_github_web_host(
    monkeypatch: pytest.MonkeyPatch, cache: InMemoryCache, api_url: str, web_url: str | None, web: str
) -> None:
    """``repoUrl`` is on the web host of ``github.web_url`` (derived from the API URL when left out), and a GitOps
    ``repoURL`` on that host is a GitHub repository: neither is the API host."""
    monkeypatch.setenv("GITHUB_TOKEN", TOKEN)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        fake = FakeGitHub(rsps, api_url=api_url, token=TOKEN)
        api = fake.add_commits("acme/api", 2)
        gitops = fake.add_commit("acme/gitops")
        github = {"url": api_url, **({"web_url": web_url} if web_url else {})}
        enricher, _ = enricher_for(cache, github=github, devlake={"include_gitops_commit": True})
        source = SourceRef(f"{web}/acme/gitops.git", path="apps/api/overlays/prod", target_revision="main")
        enriched = only(
            enricher.enrich_app(
                [deploy(images=[f"quay.io/acme/api:{api[1]}"], revisions=[gitops], sources=[source])], {}
            )
        )
    assert [(c.repo_url, c.sha) for c in enriched.heads] == [
        (f"{web}/acme/api", api[1]),
        (f"{web}/acme/gitops", gitops),
    ]


def test_history_is_the_range_since_the_previous_deployment(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 6)
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[5]}"], sources=())], {"acme/api": api[1]})
    )
    assert [c.sha for c in enriched.history] == api[2:6]
    assert [c.sha for c in enriched.heads] == [api[5]]
    assert enriched.deployed_commits == {"acme/api": api[5]}


def test_previous_heads_are_carried_through_the_batch(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 7)
    enricher, _ = enricher_for(cache)
    outcomes = enricher.enrich_app(
        [
            deploy("h1", images=[f"quay.io/acme/api:{api[3]}"], sources=()),
            deploy("h2", images=[f"quay.io/acme/api:{api[6]}"], sources=()),
        ],
        {"acme/api": api[0], "acme/other": "b" * 40},
    )
    first, second = outcomes
    assert isinstance(first, EnrichedDeployment) and isinstance(second, EnrichedDeployment)
    assert [c.sha for c in first.history] == api[1:4]
    assert [c.sha for c in second.history] == api[4:7], "deployment 1's head is deployment 2's base"
    assert fake.paths("compare") == [
        f"/repos/acme/api/compare/{api[0]}...{api[3]}",
        f"/repos/acme/api/compare/{api[3]}...{api[6]}",
    ]
    assert second.deployed_commits == {"acme/api": api[6], "acme/other": "b" * 40}


def test_unchanged_image_is_head_only_without_a_compare(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 2)
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[1]}"], sources=())], {"acme/api": api[1]})
    )
    assert [c.sha for c in enriched.history] == [api[1]]
    assert fake.count("compare") == 0


def test_rollback_is_marked_and_keeps_only_the_head(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 5)
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[1]}"], sources=())], {"acme/api": api[4]})
    )
    assert enriched.rollback
    assert [c.sha for c in enriched.history] == [api[1]]
    assert enriched.deployed_commits == {"acme/api": api[1]}


def test_short_sha_tag_is_expanded(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 3)
    enricher, _ = enricher_for(cache)
    enriched = only(enricher.enrich_app([deploy(images=[f"quay.io/acme/api:on-pr-{api[2][:7]}"], sources=())], {}))
    assert enriched.heads[0].sha == api[2]
    assert enriched.deployed_commits == {"acme/api": api[2]}


def test_range_is_capped_by_max_commits_per_range(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 301)
    enricher, _ = enricher_for(cache, github={"max_commits_per_range": 50})
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[300]}"], sources=())], {"acme/api": api[0]})
    )
    assert len(enriched.history) == 51, "the first 50 of the range, plus the deployed head"
    assert enriched.history[-1].sha == api[300]
    assert any("only the first 50" in warning for warning in enriched.warnings)


def test_history_merges_repositories_oldest_first_without_duplicates(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 3)
    web = fake.add_commits("acme/web", 3)
    gitops = fake.add_commit("acme/gitops")
    enricher, _ = enricher_for(cache, devlake={"include_gitops_commit": True})
    enriched = only(
        enricher.enrich_app(
            [
                deploy(
                    images=[f"quay.io/acme/web:{web[2]}", f"quay.io/acme/api:{api[2]}", f"quay.io/acme/api:{api[2]}"],
                    revisions=[gitops],
                )
            ],
            {"acme/api": api[0], "acme/web": web[0]},
        )
    )
    dates = [c.date for c in enriched.history]
    assert dates == sorted(d for d in dates if d is not None)
    assert len({(c.repo, c.sha) for c in enriched.history}) == len(enriched.history) == 5
    assert [c.repo for c in enriched.heads] == ["acme/web", "acme/api", "acme/gitops"]


def test_two_images_of_one_repository_at_different_commits(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 3)
    enricher, _ = enricher_for(
        cache, images={"repositories": [{"image": r"quay\.io/acme/(?:api|api-worker)", "repo": "acme/api"}]}
    )
    enriched = only(
        enricher.enrich_app(
            [deploy(images=[f"quay.io/acme/api:{api[1]}", f"quay.io/acme/api-worker:{api[2]}"], sources=())], {}
        )
    )
    assert [c.sha for c in enriched.heads] == [api[2]], "one head per repository: the newest"
    assert enriched.deployed_commits == {"acme/api": api[2]}
    assert any("several commits" in warning for warning in enriched.warnings)


# -- what is not a commit ------------------------------------------------------------------------------


def test_non_commit_tags_ignored_and_unmapped_images_cost_no_request(fake: FakeGitHub, cache: InMemoryCache) -> None:
    gitops = fake.add_commit("acme/gitops")
    enricher, client = enricher_for(cache, images={"ignore": ["quay.io/acme/sidecar"]})
    enriched = only(
        enricher.enrich_app(
            [
                deploy(
                    images=[
                        "quay.io/acme/api:latest",
                        "quay.io/acme/api:v1.2.3",
                        "quay.io/acme/api:1234567",
                        "quay.io/acme/sidecar:abcdef1",
                        "quay.io/acme/db@sha256:" + "a" * 64,
                        "ghcr.io/elsewhere/tool:abcdef1",
                        "Not An Image",
                    ],
                    revisions=[gitops],
                )
            ],
            {},
        )
    )
    assert [c.repo for c in enriched.heads] == ["acme/gitops"]
    assert client.requests == 1
    assert any("ghcr.io/elsewhere/tool" in w and "no GitHub repository" in w for w in enriched.warnings)
    assert any("Not An Image" in w for w in enriched.warnings)


@pytest.mark.parametrize(
    ("source", "revision"),
    [
        (SourceRef("https://charts.bitnami.com/bitnami", chart="redis", target_revision="18.1.0"), "18.1.0"),
        (SourceRef("ghcr.io/acme/charts", chart="api", target_revision="1.0.0"), "a" * 40),
        (SourceRef("https://gitlab.com/acme/gitops.git", path="x"), "a" * 40),
        (SourceRef("https://github.com/acme/gitops.git", path="x"), "main"),
        (SourceRef("https://github.com/acme/gitops.git", path="x"), "v1.2.3"),
    ],
)
def test_helm_charts_oci_other_hosts_and_branch_revisions_are_not_commits(
    fake: FakeGitHub, cache: InMemoryCache, source: SourceRef, revision: str
) -> None:
    enricher, client = enricher_for(cache)
    [outcome] = enricher.enrich_app([deploy(revisions=[revision], sources=[source])], {})
    assert isinstance(outcome, Skipped)
    assert client.requests == 0


def test_multi_source_gitops_commits_by_index_and_ssh_urls(fake: FakeGitHub, cache: InMemoryCache) -> None:
    values = fake.add_commit("acme/values")
    gitops = fake.add_commit("acme/gitops")
    sources = [
        SourceRef("https://charts.example.com", chart="api", target_revision="1.4.0"),
        SourceRef("git@github.com:acme/values.git", path=None, target_revision="main"),
        SourceRef("https://github.com/acme/gitops", path="apps/api"),
    ]
    enricher, _ = enricher_for(cache)
    enriched = only(enricher.enrich_app([deploy(revisions=["1.4.0", values, gitops], sources=sources)], {}))
    assert [(c.repo, c.sha) for c in enriched.heads] == [("acme/values", values), ("acme/gitops", gitops)]
    assert enriched.deployed_commits == {}, "GitOps commits are not image heads"


def test_gitops_commit_can_be_switched_off(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commit("acme/api")
    gitops = fake.add_commit("acme/gitops")
    enricher, _ = enricher_for(cache, devlake={"include_gitops_commit": False})
    enriched = only(enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api}"], revisions=[gitops])], {}))
    assert [c.repo for c in enriched.heads] == ["acme/api"]


def test_by_default_the_gitops_commit_stands_in_only_when_no_image_commit_changed(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    """``include_gitops_commit: fallback``: a deployment that shipped app code carries its image commits; one that
    shipped a config change (image unchanged), or has no commit-tagged image, carries the GitOps commit; and an
    image commit GitHub does not have leaves the GitOps commit to stand in (DevLake rejects an empty list)."""
    api = fake.add_commits("acme/api", 3)
    gitops = fake.add_commits("acme/gitops", 4)
    enricher, _ = enricher_for(cache)
    new_image, config_only, no_image, image_gone = enricher.enrich_app(
        [
            deploy("h1", images=[f"quay.io/acme/api:{api[1]}"], revisions=[gitops[0]]),
            deploy("h2", images=[f"quay.io/acme/api:{api[1]}"], revisions=[gitops[1]]),
            deploy("h3", images=["quay.io/acme/api:v2.4.1"], revisions=[gitops[2]]),
            deploy("h4", images=[f"quay.io/acme/api:{'e' * 40}"], revisions=[gitops[3]]),
        ],
        {"acme/api": api[0]},
    )
    heads = {
        name: [(c.repo, c.sha) for c in outcome.heads]
        for name, outcome in (("new", new_image), ("config", config_only), ("none", no_image), ("gone", image_gone))
        if isinstance(outcome, EnrichedDeployment)
    }
    assert heads == {
        "new": [("acme/api", api[1])],
        "config": [("acme/api", api[1]), ("acme/gitops", gitops[1])],
        "none": [("acme/gitops", gitops[2])],
        "gone": [("acme/gitops", gitops[3])],
    }
    assert f"/repos/acme/gitops/commits/{gitops[0]}" not in fake.paths("commit"), "not even looked up"


@pytest.mark.parametrize(("value", "repos"), [(True, ["acme/api", "acme/gitops"]), ("never", ["acme/api"])])
def test_gitops_commit_modes_always_and_never(
    fake: FakeGitHub, cache: InMemoryCache, value: object, repos: list[str]
) -> None:
    api = fake.add_commits("acme/api", 2)
    gitops = fake.add_commit("acme/gitops")
    enricher, _ = enricher_for(cache, devlake={"include_gitops_commit": value})
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[1]}"], revisions=[gitops])], {"acme/api": api[0]})
    )
    assert [c.repo for c in enriched.heads] == repos


def test_gitops_repo_that_is_also_an_image_repo_gives_one_head(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = fake.add_commits("acme/gitops", 2)
    enricher, _ = enricher_for(
        cache,
        images={"repositories": [{"image": r"quay\.io/acme/.+", "repo": "acme/gitops"}]},
        devlake={"include_gitops_commit": True},
    )
    enriched = only(enricher.enrich_app([deploy(images=[f"quay.io/acme/x:{shas[0]}"], revisions=[shas[1]])], {}))
    assert [(c.repo, c.sha) for c in enriched.heads] == [("acme/gitops", shas[0])]
    assert [c.sha for c in enriched.history] == shas


# -- dropping and skipping -----------------------------------------------------------------------------


def test_unknown_image_sha_is_dropped_with_a_reason(
    fake: FakeGitHub, cache: InMemoryCache, caplog: pytest.LogCaptureFixture
) -> None:
    api = fake.add_commit("acme/api")
    fake.add_commit("acme/web")
    caplog.set_level(logging.WARNING, logger="reconciler.enrich")
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app(
            [deploy(images=[f"quay.io/acme/web:{'e' * 40}", f"quay.io/acme/api:{api}"], sources=())], {}
        )
    )
    assert [c.repo for c in enriched.heads] == ["acme/api"]
    assert any("acme/web" in w and "No commit found" in w for w in enriched.warnings)
    assert "quay.io/acme/web" in caplog.text
    assert all(record.__dict__.get("deployment_id") for record in caplog.records)


def test_no_commit_at_all_is_skipped_with_the_reasons(fake: FakeGitHub, cache: InMemoryCache) -> None:
    fake.add_commit("acme/api")
    enricher, _ = enricher_for(cache)
    [outcome] = enricher.enrich_app(
        [deploy(images=[f"quay.io/acme/api:{'e' * 40}"], sources=())], {"acme/api": "d" * 40}
    )
    assert isinstance(outcome, Skipped)
    assert "No commit found" in outcome.reason
    assert outcome.deployed_commits == {"acme/api": "d" * 40}


def test_skipped_deployment_does_not_move_the_base(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 4)
    enricher, _ = enricher_for(cache)
    outcomes = enricher.enrich_app(
        [
            deploy("h1", images=[f"quay.io/acme/api:{'e' * 40}"], sources=()),
            deploy("h2", images=[f"quay.io/acme/api:{api[3]}"], sources=()),
        ],
        {"acme/api": api[0]},
    )
    assert isinstance(outcomes[0], Skipped)
    assert isinstance(outcomes[1], EnrichedDeployment)
    assert [c.sha for c in outcomes[1].history] == api[1:4]


def test_a_commit_without_a_date_is_kept_and_one_after_the_deployment_is_kept_with_a_warning(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    """The payload carries the deployment's dates, never a commit's: a commit GitHub gives no date is still the
    commit DevLake needs for lead time."""
    api = fake.add_commit("acme/api", author_date=FINISHED + timedelta(hours=2))
    web = fake.add_commit("acme/web", dated=False)
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api}", f"quay.io/acme/web:{web}"], sources=())], {})
    )
    assert [c.repo for c in enriched.heads] == ["acme/api", "acme/web"]
    assert {c.repo for c in enriched.history} == {"acme/api", "acme/web"}
    assert not any("acme/web" in w for w in enriched.warnings)
    assert any("acme/api" in w and "after the deployment" in w for w in enriched.warnings)
    assert enriched.deployed_commits == {"acme/api": api, "acme/web": web}


def test_previous_commit_gone_from_github_keeps_the_head(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 2)
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[1]}"], sources=())], {"acme/api": "f" * 40})
    )
    assert [c.sha for c in enriched.history] == [api[1]]
    assert any("no history" in w for w in enriched.warnings)


def test_a_commit_github_does_not_have_holds_the_deployment_back_within_the_grace(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    api = fake.add_commits("acme/api", 2)
    gitops = fake.add_commit("acme/gitops")
    unpushed = "e" * 40
    batch = [deploy("h1", images=[f"quay.io/acme/api:{unpushed}"], revisions=[gitops]), deploy("h2", sources=())]
    enricher, _ = enricher_for(cache, now=FINISHED + MISSING_COMMIT_GRACE - timedelta(seconds=1))
    outcomes = enricher.enrich_app(batch, {"acme/api": api[0]})
    assert [type(o) for o in outcomes] == [Deferred, Deferred], "the Application's later deployments wait too"
    first = outcomes[0]
    assert isinstance(first, Deferred) and first.unreadable is None
    assert "does not have this commit" in first.reason and "held back until 2026-01-06T10:00:00Z" in first.reason

    fake.add_commit("acme/api", sha=unpushed)
    enricher.github.reset_tick()
    enriched = only(enricher.enrich_app(batch[:1], {"acme/api": api[0]}))
    assert [c.sha for c in enriched.history if c.repo == "acme/api"] == [api[1], unpushed], "pushed late: all there"


def test_past_the_grace_a_commit_github_does_not_have_is_dropped(fake: FakeGitHub, cache: InMemoryCache) -> None:
    gitops = fake.add_commit("acme/gitops")
    fake.add_commit("acme/api")
    enricher, _ = enricher_for(cache, now=FINISHED + MISSING_COMMIT_GRACE)
    enriched = only(enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{'e' * 40}"], revisions=[gitops])], {}))
    assert [c.repo for c in enriched.heads] == ["acme/gitops"]
    assert any("commit dropped" in w and "No commit found" in w for w in enriched.warnings)


def test_a_repository_github_cannot_read_defers_whatever_the_time(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 3)
    gitops = fake.add_commit("acme/gitops")
    fake.hide("acme/api")
    enricher, client = enricher_for(cache, devlake={"include_gitops_commit": True})
    outcomes = enricher.enrich_app(
        [deploy(images=[f"quay.io/acme/api:{api[2]}"], revisions=[gitops])], {"acme/api": api[0]}
    )
    [outcome] = outcomes
    assert isinstance(outcome, Deferred) and outcome.unreadable == "acme/api" and outcome.reported
    assert "acme/api" in outcome.reason and "images.repositories" in outcome.reason
    assert client.tick_problems() and "acme/api" in client.tick_problems()[0]

    fake.hide("acme/api", hidden=False)
    client.reset_tick()
    enriched = only(enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api[2]}"], revisions=[gitops])], {}))
    assert [c.sha for c in enriched.heads] == [api[2], gitops]


def test_a_hidden_gitops_repository_defers_too(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 2)
    gitops = fake.add_commit("acme/gitops")
    fake.hide("acme/gitops")
    enricher, _ = enricher_for(cache, devlake={"include_gitops_commit": True})
    [outcome] = enricher.enrich_app(
        [deploy(images=[f"quay.io/acme/api:{api[1]}"], revisions=[gitops])], {"acme/api": api[0]}
    )
    assert isinstance(outcome, Deferred) and outcome.unreadable == "acme/gitops"


# -- search fallback -----------------------------------------------------------------------------------


def test_search_fallback_only_when_enabled_and_cached(fake: FakeGitHub, cache: InMemoryCache) -> None:
    tool = fake.add_commits("elsewhere/tool", 2)
    image = f"ghcr.io/elsewhere/tool:{tool[1]}"
    enricher, client = enricher_for(cache)
    [outcome] = enricher.enrich_app([deploy(images=[image], sources=())], {})
    assert isinstance(outcome, Skipped) and fake.count("search") == 0

    enricher, client = enricher_for(cache, images={"search_fallback": True})
    enriched = only(enricher.enrich_app([deploy(images=[image], sources=())], {}))
    assert [(c.repo, c.sha) for c in enriched.heads] == [("elsewhere/tool", tool[1])]
    client.reset_tick()
    only(enricher.enrich_app([deploy(images=[image], sources=())], {}))
    assert fake.count("search") == 1 and client.requests == 0


# -- rate limits and outages ---------------------------------------------------------------------------


def test_rate_limit_defers_the_deployment_and_the_later_ones_then_recovers(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    api = fake.add_commits("acme/api", 4)
    gitops = fake.add_commit("acme/gitops")
    batch = [
        deploy("h1", images=[f"quay.io/acme/api:{api[1]}"], revisions=[gitops]),
        deploy("h2", images=[f"quay.io/acme/api:{api[3]}"], revisions=[gitops]),
    ]
    reset = datetime(2026, 1, 6, 10, 0, tzinfo=UTC)
    with freeze_time("2026-01-06 09:40:00") as clock:
        enricher, client = enricher_for(cache)
        fake.exhaust_rate_limit(reset)
        outcomes = enricher.enrich_app(batch, {"acme/api": api[0]})
        assert [type(o) for o in outcomes] == [Deferred, Deferred]
        assert all(isinstance(o, Deferred) and o.reset_at == reset and "rate limit" in o.reason for o in outcomes)
        assert [o.deployment for o in outcomes if isinstance(o, Deferred)] == batch
        assert client.requests == 1, "the first refusal stops the app: nothing more is asked"

        fake.restore_rate_limit(reset_at=reset + timedelta(hours=1))
        clock.move_to(reset + timedelta(seconds=1))
        client.reset_tick()
        outcomes = enricher.enrich_app(batch, {"acme/api": api[0]})
    first, second = outcomes
    assert isinstance(first, EnrichedDeployment) and isinstance(second, EnrichedDeployment)
    assert [c.sha for c in second.history if c.repo == "acme/api"] == api[2:4]


def test_rate_limit_in_one_app_spares_github_for_the_others(fake: FakeGitHub, cache: InMemoryCache) -> None:
    shas = {f"acme/svc{i}": fake.add_commit(f"acme/svc{i}") for i in range(10)}
    fake.exhaust_rate_limit(datetime(2030, 1, 1, tzinfo=UTC))
    enricher, client = enricher_for(cache)
    batches: list[tuple[list[Deployment], dict[str, str]]] = [
        ([deploy(images=[f"quay.io/{repo}:{sha}"], sources=(), app=repo[5:])], {}) for repo, sha in shas.items()
    ]
    results = enricher.enrich_many(batches)
    assert all(isinstance(outcomes[0], Deferred) for outcomes in results)
    assert client.requests <= enricher.config.github.max_concurrency, "only requests already in flight are sent"


def test_later_deployment_rate_limited_keeps_the_earlier_result(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 3)
    enricher, _ = enricher_for(cache)
    enricher.github.commit("acme/api", api[1])
    fake.exhaust_rate_limit(datetime(2030, 1, 1, tzinfo=UTC))
    outcomes = enricher.enrich_app(
        [
            deploy("h1", images=[f"quay.io/acme/api:{api[1]}"], sources=()),
            deploy("h2", images=[f"quay.io/acme/api:{api[2]}"], sources=()),
        ],
        {},
    )
    assert isinstance(outcomes[0], EnrichedDeployment)
    assert isinstance(outcomes[1], Deferred)


def test_github_down_defers(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commit("acme/api")
    fake.fail_next(6, 503)
    enricher, _ = enricher_for(cache)
    [outcome] = enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{api}"], sources=())], {})
    assert isinstance(outcome, Deferred)
    assert "unavailable" in outcome.reason and outcome.reset_at is None


# -- many applications ---------------------------------------------------------------------------------


def test_fifty_apps_deploying_the_same_image_cost_one_compare_and_no_lookup(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    api = fake.add_commits("acme/api", 12)
    enricher, client = enricher_for(cache, devlake={"include_gitops_commit": False})
    batches = [
        (
            [deploy("h7", images=[f"quay.io/acme/api:{api[11]}", "nginx:1.25"], sources=(), app=f"api-{i}")],
            {"acme/api": api[3]},
        )
        for i in range(50)
    ]
    results = enricher.enrich_many(batches)
    assert len(results) == 50
    for (deployments, _previous), outcomes in zip(batches, results, strict=True):
        enriched = only(outcomes)
        assert enriched.deployment is deployments[0], "results come back in input order"
        assert [c.sha for c in enriched.history] == api[4:12]
    assert fake.count("commit") == 0, "the compare returns the deployed commit"
    assert fake.count("compare") == 1
    assert client.requests == 1

    client.reset_tick()
    again = enricher.enrich_many(batches)
    assert client.requests == 0, "the second tick is served from the store's cache"
    assert [only(o).history for o in again] == [only(o).history for o in results]


def test_the_head_comes_with_the_range_and_is_looked_up_only_when_no_compare_returns_it(
    fake: FakeGitHub, cache: InMemoryCache
) -> None:
    api = fake.add_commits("acme/api", 6)
    gitops = fake.add_commits("acme/gitops", 2)
    enricher, client = enricher_for(cache, devlake={"include_gitops_commit": True})
    rollback = (
        [deploy(images=[f"quay.io/acme/api:{api[2]}"], revisions=[gitops[1]], app="rollback")],
        {"acme/api": api[5]},
    )
    forward = (
        [deploy(images=[f"quay.io/acme/api:{api[4]}"], revisions=[gitops[1]], app="forward")],
        {"acme/api": api[0]},
    )
    catching_up = (
        [
            deploy("h1", revisions=[gitops[0]], app="catching-up"),
            deploy("h2", images=[f"quay.io/acme/api:{api[4]}"], revisions=[gitops[1]], app="catching-up"),
        ],
        {"acme/api": api[0]},
    )
    results = enricher.enrich_many([rollback, forward, catching_up])
    back, ahead = only(results[0]), only(results[1])
    assert back.rollback and [c.sha for c in back.history if c.repo == "acme/api"] == [api[2]]
    assert [c.sha for c in ahead.history if c.repo == "acme/api"] == api[1:5]
    assert all(isinstance(outcome, EnrichedDeployment) for outcome in results[2])
    assert sorted(fake.paths("compare")) == sorted(
        [f"/repos/acme/api/compare/{api[5]}...{api[2]}", f"/repos/acme/api/compare/{api[0]}...{api[4]}"]
    )
    assert sorted(fake.paths("commit")) == sorted(f"/repos/acme/gitops/commits/{sha}" for sha in gitops), (
        "the rollback's head came with the other range; each GitOps revision once"
    )
    assert client.requests == 4


def test_a_short_tag_with_a_previous_sha_costs_one_compare(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 4)
    tag = next(f"pr-{api[3][:n]}" for n in range(7, 12) if not api[3][:n].isdigit())
    enricher, client = enricher_for(cache)
    enriched = only(enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{tag}"], sources=())], {"acme/api": api[0]}))
    assert [c.sha for c in enriched.heads] == [api[3]] and enriched.deployed_commits == {"acme/api": api[3]}
    assert [c.sha for c in enriched.history] == api[1:]
    assert client.requests == 1 == fake.count("compare")


def test_a_short_tag_github_cannot_compare_is_expanded_then_compared(fake: FakeGitHub, cache: InMemoryCache) -> None:
    api = fake.add_commits("acme/api", 4)
    short = next(api[3][:n] for n in range(7, 12) if not api[3][:n].isdigit())
    fake.reply_next(404, {"message": "Not Found"})  # as GitHub answers a compare to an ambiguous short SHA
    enricher, _ = enricher_for(cache)
    enriched = only(
        enricher.enrich_app([deploy(images=[f"quay.io/acme/api:{short}"], sources=())], {"acme/api": api[0]})
    )
    assert [c.sha for c in enriched.history] == api[1:]
    assert fake.paths() == [
        f"/repos/acme/api/compare/{api[0]}...{short}",
        "/repos/acme/api",
        f"/repos/acme/api/commits/{short}",
        f"/repos/acme/api/compare/{api[0]}...{api[3]}",
    ]


def test_enrich_many_isolates_an_unexpected_failure(
    fake: FakeGitHub, cache: InMemoryCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = fake.add_commit("acme/api")
    enricher, _ = enricher_for(cache)
    original = enricher._enrich_one

    def explode(deployment: Deployment, previous: Any) -> Any:
        if deployment.key.name == "bad":
            raise KeyError("bug")
        return original(deployment, previous)

    monkeypatch.setattr(enricher, "_enrich_one", explode)
    good = deploy(images=[f"quay.io/acme/api:{api}"], sources=(), app="good")
    bad = deploy(images=[f"quay.io/acme/api:{api}"], sources=(), app="bad")
    results = enricher.enrich_many([([bad, replace(bad, ref="h2")], {}), ([good], {})])
    assert [type(o) for o in results[0]] == [Deferred, Deferred]
    assert isinstance(results[1][0], EnrichedDeployment)
    assert enricher.enrich_many([]) == []
