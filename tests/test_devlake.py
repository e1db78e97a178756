"""The DevLake payload, routing and delivery, against a fake DevLake that validates like the real one."""

from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.config import Config, validate_config
from reconciler.dedupe import change_fingerprint
from reconciler.devlake import (
    MAX_ATTEMPTS,
    Delivery,
    DeliveryOutcome,
    DevLakeClient,
    PayloadError,
    Router,
    build_payload,
)
from reconciler.model import (
    AppKey,
    Commit,
    Deployment,
    DeploymentClass,
    DeploymentKind,
    EnrichedDeployment,
    Result,
    Snapshot,
    SourceRef,
)
from reconciler.run import STOPPING_REQUEST_TIMEOUT, StopFlag
from tests.fakes.devlake import DEVLAKE_TIME, ENVIRONMENTS, FakeDevLake, parse_devlake_time

T0 = datetime(2026, 5, 4, 9, 12, tzinfo=UTC)
KEY = AppKey("prod-east", "argocd", "payments-api-prod")
UID = "0f1e2d3c-4b5a-6978-8899-aabbccddeeff"
APP_SHA = "1a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d"
APP_PARENT = "77aa88bb99cc00dd11ee22ff33aa44bb55cc66dd"
GITOPS_SHA = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c"
API_KEY = "k" * 128
KEY_ENV = "DEVLAKE_TEST_KEY"

# -- builders ----------------------------------------------------------------------------------------


def make_commit(repo: str, sha: str, date: datetime | None, message: str = "Fix the thing\n\nLonger body") -> Commit:
    return Commit(repo=repo, repo_url=f"https://github.com/{repo}", sha=sha, message=message, date=date)


APP_HEAD = make_commit("acme/payments-api", APP_SHA, T0 - timedelta(hours=2), "Merge pull request #12 from acme/x")
APP_OLDER = make_commit("acme/payments-api", APP_PARENT, T0 - timedelta(hours=5), "Add retries")
GITOPS = make_commit("acme/gitops", GITOPS_SHA, T0 - timedelta(minutes=10), "payments-api: bump to 1a2b3c4")


def make_deployment(
    *,
    result: Result = Result.SUCCESS,
    deployment_class: DeploymentClass = DeploymentClass.NEW_REVISION,
    key: AppKey = KEY,
    ref: str = "h12",
    sources: tuple[SourceRef, ...] = (
        SourceRef("https://github.com/acme/gitops.git", path="apps/payments/prod", target_revision="main"),
    ),
    images: tuple[str, ...] = (f"quay.io/acme/payments-api:{APP_SHA[:7]}",),
) -> Deployment:
    return Deployment(
        key=key,
        uid=UID,
        kind=DeploymentKind.HISTORY,
        ref=ref,
        result=result,
        deployment_class=deployment_class,
        started_at=T0,
        finished_at=T0 + timedelta(minutes=3, seconds=30),
        revisions=(GITOPS_SHA,),
        sources=sources,
        snapshot_after=Snapshot(uid=UID, last_seen=T0),
        images=images,
        history_id=12,
    )


def make_enriched(
    deployment: Deployment | None = None,
    heads: tuple[Commit, ...] = (APP_HEAD, GITOPS),
    history: tuple[Commit, ...] = (APP_OLDER, APP_HEAD, GITOPS),
    rollback: bool = False,
) -> EnrichedDeployment:
    return EnrichedDeployment(
        deployment=deployment or make_deployment(), heads=heads, history=history, rollback=rollback
    )


def make_config(url: str = "https://devlake.example.com", **overrides: Any) -> Config:
    data: dict[str, Any] = {
        "clusters": [{"name": "prod-east"}, {"name": "stage-1", "environment": "STAGING"}],
        "devlake": {"url": url, "connections": [{"id": 1, "api_key_env": KEY_ENV}]},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return validate_config(data)


def payload_for(enriched: EnrichedDeployment | None = None, config: Config | None = None, **kwargs: Any) -> Any:
    arguments: dict[str, Any] = {"component": "payments-api", "destination": "in-cluster", "source_paths": []}
    arguments.update(kwargs)
    return build_payload(enriched or make_enriched(), config=config or make_config(), **arguments)


Z_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
CANONICAL_REPO = re.compile(r"^https://[a-z0-9.-]+/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")


def assert_sender_profile(payload: dict[str, Any]) -> None:
    """What DevLake validates (required keys, dates, environment) plus the stricter sender profile under it."""
    for field in ("id", "startedDate", "finishedDate", "deploymentCommits"):
        assert field in payload, field
    assert isinstance(payload["id"], str) and 1 <= len(payload["id"]) <= 150
    for field in ("startedDate", "finishedDate", "createdDate"):
        assert Z_DATE.match(payload[field]) and DEVLAKE_TIME.match(payload[field]), (field, payload[field])
    assert payload["environment"] in ENVIRONMENTS
    assert payload["result"] in ("SUCCESS", "FAILURE")
    assert len(payload["name"]) <= 255
    commits = payload["deploymentCommits"]
    assert commits
    pairs = [(c["repoUrl"], c["commitSha"]) for c in commits]
    assert len(pairs) == len(set(pairs)), "one item per (repoUrl, commitSha)"
    for commit in commits:
        assert CANONICAL_REPO.match(commit["repoUrl"]) and not commit["repoUrl"].endswith(".git")
        assert re.fullmatch(r"[0-9a-f]{40}", commit["commitSha"])
        for field in ("startedDate", "finishedDate", "createdDate"):
            assert Z_DATE.match(commit[field]), (field, commit[field])
        assert commit["finishedDate"] == payload["finishedDate"]
        assert commit["result"] == payload["result"], "result must be on every commit"
        assert len(commit["name"]) <= 255 and len(commit["refName"]) <= 255 and len(commit["repoUrl"]) <= 500
        assert "\n" not in commit["commitMsg"]


class FakeClock:
    """A monotonic clock that only moves when the client sleeps: retries run instantly and deterministically."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


@pytest.fixture
def fake() -> Iterator[FakeDevLake]:
    with FakeDevLake() as server:
        server.add_connection(1, API_KEY)
        yield server


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    return API_KEY


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def client_for(fake: FakeDevLake, clock: FakeClock, timeout: str = "30s") -> DevLakeClient:
    config = make_config(fake.url, devlake={"timeout": timeout})
    return DevLakeClient(config.devlake, sleep=clock.sleep, clock=clock)


def deliver(
    fake: FakeDevLake, clock: FakeClock, payload: dict[str, Any], budget: float = 120.0, timeout: str = "30s"
) -> Delivery:
    config = make_config(fake.url)
    with client_for(fake, clock, timeout) as client:
        return client.deliver(config.devlake.connections[0], payload, clock() + budget)


# -- the payload -------------------------------------------------------------------------------------


def test_head_payload_is_accepted_by_devlake_and_follows_the_sender_profile(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    payload = payload_for()

    assert_sender_profile(payload)
    assert payload["id"] == f"argocd:prod-east:argocd:payments-api-prod:{UID[:8]}:h12"
    assert payload["displayTitle"] == "payments-api → prod-east/in-cluster: new-revision 1a2b3c4, 9f8e7d6"
    assert payload["startedDate"] == "2026-05-04T09:12:00Z"
    assert payload["finishedDate"] == "2026-05-04T09:15:30Z"
    assert [(c["repoUrl"], c["commitSha"]) for c in payload["deploymentCommits"]] == [
        ("https://github.com/acme/payments-api", APP_SHA),
        ("https://github.com/acme/gitops", GITOPS_SHA),
    ]
    app, gitops = payload["deploymentCommits"]
    assert app["startedDate"] == app["createdDate"] == gitops["startedDate"] == "2026-05-04T09:12:00Z"
    assert app["commitMsg"] == "Merge pull request #12 from acme/x"
    assert app["refName"] == APP_SHA[:7]
    assert gitops["refName"] == "main"

    delivery = deliver(fake, clock, payload)

    assert delivery == Delivery(DeliveryOutcome.DELIVERED, 200, "success", 1)
    assert fake.deployments(1) == {payload["id"]: payload}
    rows = fake.commit_rows(1)
    assert [(r["commit_sha"], r["result"], r["environment"]) for r in rows] == [
        (APP_SHA, "SUCCESS", "PRODUCTION"),
        (GITOPS_SHA, "SUCCESS", "PRODUCTION"),
    ]


def test_failed_deployment_is_failure_on_every_commit_row(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    enriched = make_enriched(make_deployment(result=Result.FAILED, deployment_class=DeploymentClass.FAILED_SYNC))
    payload = payload_for(enriched)

    assert_sender_profile(payload)
    assert payload["result"] == "FAILURE"
    assert payload["displayTitle"].endswith("(FAILED)")
    assert deliver(fake, clock, payload).outcome is DeliveryOutcome.DELIVERED
    # DevLake would store SUCCESS for a commit without its own result: every row must say FAILURE.
    assert {row["result"] for row in fake.commit_rows(1)} == {"FAILURE"}
    assert fake.deployment_rows(1)[payload["id"]]["result"] == "FAILURE"


def test_every_date_is_the_deployments_not_a_commits() -> None:
    """A commit's ``startedDate`` is when the deployment carrying it started: DevLake credits a pull request to the
    earliest row by ``started_date``, so a commit date (07:12, 04:12) would rank this deployment by how old its
    commits are. ``createdDate`` is the start too, DevLake's own default."""
    payload = payload_for(make_enriched(history=(APP_OLDER, APP_HEAD, GITOPS)))

    assert payload["createdDate"] == payload["startedDate"] == "2026-05-04T09:12:00Z"
    for item in payload["deploymentCommits"]:
        assert item["startedDate"] == item["createdDate"] == "2026-05-04T09:12:00Z"
        assert item["finishedDate"] == "2026-05-04T09:15:30Z"


def test_created_date_falls_back_to_started_date_without_commit_dates() -> None:
    undated = make_commit("acme/gitops", GITOPS_SHA, None)

    payload = payload_for(make_enriched(heads=(undated,), history=(undated,)))

    assert payload["createdDate"] == payload["startedDate"] == "2026-05-04T09:12:00Z"
    assert payload["deploymentCommits"][0]["startedDate"] == "2026-05-04T09:12:00Z"


def test_range_mode_sends_every_commit_of_the_history_once(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    config = make_config(devlake={"commits": "range"})
    enriched = make_enriched(history=(APP_OLDER, APP_HEAD, GITOPS, APP_HEAD))

    payload = payload_for(enriched, config)

    assert_sender_profile(payload)
    assert [c["commitSha"] for c in payload["deploymentCommits"]] == [APP_PARENT, APP_SHA, GITOPS_SHA]
    assert [c["startedDate"] for c in payload["deploymentCommits"]] == ["2026-05-04T09:12:00Z"] * 3
    assert payload["displayTitle"].endswith("new-revision 1a2b3c4, 9f8e7d6")
    assert deliver(fake, clock, payload).outcome is DeliveryOutcome.DELIVERED
    assert len(fake.commit_rows(1)) == 3


def test_head_mode_ignores_the_rest_of_the_history() -> None:
    payload = payload_for(make_enriched(history=(APP_OLDER, APP_HEAD, GITOPS)))

    assert len(payload["deploymentCommits"]) == 2


def test_shas_are_lowercased_short_ones_dropped_and_duplicates_sent_once() -> None:
    upper = make_commit("acme/payments-api", APP_SHA.upper(), APP_HEAD.date)
    short = make_commit("acme/other", "abcdef1", T0)

    payload = payload_for(make_enriched(heads=(upper, APP_HEAD, short, GITOPS)))

    assert [c["commitSha"] for c in payload["deploymentCommits"]] == [APP_SHA, GITOPS_SHA]


def test_no_usable_commit_raises_payload_error() -> None:
    with pytest.raises(PayloadError, match="no commit"):
        payload_for(make_enriched(heads=(), history=()))
    with pytest.raises(PayloadError, match="full 40-hex"):
        payload_for(make_enriched(heads=(make_commit("acme/x", "abcdef1", T0),)))


def test_unknown_cluster_is_a_payload_error_not_a_crash() -> None:
    enriched = make_enriched(make_deployment(key=AppKey("gone", "argocd", "app")))

    with pytest.raises(PayloadError, match="gone"):
        payload_for(enriched)


@pytest.mark.parametrize(
    ("key", "source_paths", "expected"),
    [
        (KEY, [], "PRODUCTION"),  # top level
        (AppKey("stage-1", "argocd", "payments-api-stage"), [], "STAGING"),  # the cluster's
        (AppKey("prod-east", "argocd", "payments-api-dev"), [], "DEVELOPMENT"),  # rule on the name
        (KEY, ["apps/payments/testing"], "TESTING"),  # rule on a source path
    ],
)
def test_environment_comes_from_rules_then_cluster_then_top_level(
    key: AppKey, source_paths: list[str], expected: str
) -> None:
    config = make_config(
        applications={
            "environment_rules": [
                {"match": "*/*-dev", "environment": "DEVELOPMENT"},
                {"source_path": "*/testing", "environment": "TESTING"},
            ]
        }
    )

    payload = payload_for(make_enriched(make_deployment(key=key)), config, source_paths=source_paths)

    assert payload["environment"] == expected


def test_long_names_keep_the_id_within_150_and_titles_within_255(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    key = AppKey("prod-east", "n" * 63, "a" * 200)
    message = "x" * 5000 + "\nsecond line"

    payload = payload_for(
        make_enriched(make_deployment(key=key), heads=(make_commit("acme/gitops", GITOPS_SHA, T0, message),)),
        component="c" * 300,
        destination="https://" + "d" * 300,
    )

    assert_sender_profile(payload)
    assert len(payload["deploymentCommits"][0]["commitMsg"]) <= 255
    assert len(payload["displayTitle"]) <= 255
    assert deliver(fake, clock, payload).outcome is DeliveryOutcome.DELIVERED


def test_title_names_a_rollback_and_a_missing_destination() -> None:
    payload = payload_for(make_enriched(rollback=True), destination="")

    assert payload["displayTitle"] == "payments-api → prod-east: rollback 1a2b3c4, 9f8e7d6"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["acme/a", "acme/b", "acme/c"]),
            st.text("0123456789abcdefABCDEF", min_size=6, max_size=41),
            st.booleans(),
        ),
        max_size=8,
    ),
    st.sampled_from(["head", "range"]),
    st.sampled_from([Result.SUCCESS, Result.FAILED]),
)
def test_any_commit_mix_gives_a_valid_body_or_a_payload_error(
    raw: list[tuple[str, str, bool]], mode: str, result: Result
) -> None:
    commits = tuple(make_commit(repo, sha, T0 if dated else None) for repo, sha, dated in raw)
    enriched = make_enriched(make_deployment(result=result), heads=commits, history=commits)

    try:
        payload = payload_for(enriched, make_config(devlake={"commits": mode}))
    except PayloadError:
        assert not any(len(sha) == 40 for _, sha, _ in raw)
        return
    assert_sender_profile(payload)
    assert payload["result"] == result.devlake


# -- the fingerprint ---------------------------------------------------------------------------------


def test_fingerprint_depends_on_what_is_deployed_environment_and_result_only() -> None:
    """A history entry is its GitOps revisions (Argo CD keeps no images for an entry once it is superseded, so a
    twin catching up knows none); an image-only change is the commits its images name."""
    base = change_fingerprint(make_enriched(), environment="PRODUCTION")

    reordered = make_enriched(heads=(GITOPS, APP_HEAD), history=(GITOPS,))
    assert change_fingerprint(reordered, environment="PRODUCTION") == base
    other_app = make_enriched(make_deployment(key=AppKey("prod-west", "argocd", "payments-api"), ref="h3"))
    assert change_fingerprint(other_app, environment="PRODUCTION") == base
    superseded = make_enriched(make_deployment(images=()), heads=(GITOPS,), history=(GITOPS,))
    assert change_fingerprint(superseded, environment="PRODUCTION") == base, "the same sync, caught up"
    own_path = SourceRef("https://github.com/acme/gitops", path="apps/payments/eu", target_revision="main")
    twin = make_enriched(make_deployment(sources=(own_path,)))
    assert change_fingerprint(twin, environment="PRODUCTION") == base, "its own path in the same repository"

    assert change_fingerprint(make_enriched(), environment="STAGING") != base
    failed = make_enriched(make_deployment(result=Result.FAILED))
    assert change_fingerprint(failed, environment="PRODUCTION") != base
    other_revision = replace(make_deployment(), revisions=(APP_PARENT,))
    assert change_fingerprint(make_enriched(other_revision), environment="PRODUCTION") != base
    other_repo = make_deployment(sources=(SourceRef("https://github.com/acme/other-gitops", target_revision="main"),))
    assert change_fingerprint(make_enriched(other_repo), environment="PRODUCTION") != base
    assert re.fullmatch(r"[0-9a-f]{32}", base)


def test_an_image_only_change_is_the_commits_its_images_name() -> None:
    image_change = replace(make_deployment(), kind=DeploymentKind.IMAGE, ref="img-1a2b3c4d5e6f")
    base = change_fingerprint(make_enriched(image_change), environment="PRODUCTION")
    assert change_fingerprint(make_enriched(image_change, heads=(GITOPS, APP_HEAD)), environment="PRODUCTION") == base
    other_heads = make_enriched(image_change, heads=(APP_OLDER, GITOPS))
    assert change_fingerprint(other_heads, environment="PRODUCTION") != base
    assert change_fingerprint(make_enriched(), environment="PRODUCTION") != base, "not the history entry's change"


# -- routing -----------------------------------------------------------------------------------------


def test_router_sends_to_the_global_connection_and_to_every_matching_one() -> None:
    config = make_config(
        devlake={
            "connections": [
                {"id": 1, "api_key_env": "K1"},
                {"id": 2, "api_key_env": "K2", "match": {"components": ["payments-*"]}},
                {"id": 3, "api_key_env": "K3", "match": {"components": ["payments-*"], "clusters": ["stage-*"]}},
                {"id": 4, "api_key_env": "K4", "match": {"applications": ["team-b/*"]}},
                {"id": 5, "api_key_env": "K5", "match": {"namespaces": ["argocd"], "clusters": ["prod-*"]}},
            ]
        }
    )
    router = Router(config.devlake)

    def ids(key: AppKey, component: str) -> list[int]:
        return [connection.id for connection in router.connections_for(key, component)]

    assert ids(KEY, "payments-api") == [1, 2, 5]
    assert ids(AppKey("stage-1", "argocd", "p"), "payments-api") == [1, 2, 3]
    assert ids(AppKey("stage-1", "team-b", "web"), "web") == [1, 4]
    assert ids(AppKey("dev", "other", "x"), "x") == [1]


# -- the fake validates like DevLake (so the tests above can trust it) ------------------------------------

MINIMAL: dict[str, Any] = {
    "id": "payments-prod-1842",
    "startedDate": "2026-05-04T09:12:00Z",
    "finishedDate": "2026-05-04T09:15:30Z",
    "deploymentCommits": [
        {
            "repoUrl": "https://github.com/acme/payments",
            "commitSha": "4f1c2b9e7d0a5c3b8e6f1a2d9c7b5e3f0a1d2c4b",
            "startedDate": "2026-05-04T09:12:00Z",
            "finishedDate": "2026-05-04T09:15:30Z",
        }
    ],
}
MINIMAL_SHA = MINIMAL["deploymentCommits"][0]["commitSha"]
_REMOVE = object()


def changed(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(MINIMAL))
    for name, value in changes.items():
        if value is _REMOVE:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def commit_changed(**changes: Any) -> dict[str, Any]:
    commit = dict(MINIMAL["deploymentCommits"][0])
    for name, value in changes.items():
        if value is _REMOVE:
            commit.pop(name, None)
        else:
            commit[name] = value
    return changed(deploymentCommits=[commit])


_FIELD = "Key: 'WebhookDeploymentReq.{0}' Error:Field validation for '{1}' failed on the '{2}' tag"


def post(fake: FakeDevLake, body: Any, key: str | None = API_KEY, path: str | None = None) -> requests.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    data = body if isinstance(body, str) else json.dumps(body)
    url = fake.url + (path or "/api/rest/plugins/webhook/connections/1/deployments")
    return requests.post(url, data=data, headers=headers, timeout=5)


def test_fake_accepts_the_minimal_body_and_applies_devlake_defaults(fake: FakeDevLake) -> None:
    response = post(fake, MINIMAL)

    assert response.status_code == 200
    assert response.json() == {"code": 0, "success": True, "message": "success", "causes": None, "data": None}
    (row,) = fake.commit_rows(1)
    assert row["result"] == "SUCCESS" and row["environment"] == "PRODUCTION" and row["status"] == "DONE"
    assert row["id"].startswith("webhook:1:payments-prod-1842:") and row["id"].endswith(MINIMAL_SHA)
    assert row["duration_sec"] == 210
    assert fake.deployment_rows(1)["payments-prod-1842"]["name"] == f"deploy {MINIMAL_SHA} to PRODUCTION"


@pytest.mark.parametrize(
    ("row", "body", "status", "expected"),
    [
        (1, {}, 400, [_FIELD.format("Id", "Id", "required"), "'StartedDate' failed", "'FinishedDate' failed"]),
        (2, changed(id=_REMOVE), 400, [_FIELD.format("Id", "Id", "required")]),
        (2, changed(id=""), 400, [_FIELD.format("Id", "Id", "required")]),
        (3, changed(finishedDate=None), 400, [_FIELD.format("FinishedDate", "FinishedDate", "required")]),
        (4, changed(environment="production"), 400, [_FIELD.format("Environment", "Environment", "oneof")]),
        (4, changed(environment="PROD"), 400, [_FIELD.format("Environment", "Environment", "oneof")]),
        (5, changed(deploymentCommits=[]), 400, ["deployment_commits is empty (400)"]),
        (5, changed(deploymentCommits=None), 400, ["deployment_commits is empty (400)"]),
        (5, changed(deploymentCommits=_REMOVE), 400, ["deployment_commits is empty (400)"]),
        (
            6,
            commit_changed(startedDate=_REMOVE),
            400,
            [_FIELD.format("DeploymentCommits[0].StartedDate", "StartedDate", "required")],
        ),
        (
            7,
            changed(
                deploymentCommits=[
                    {"repo_url": "u", "commit_sha": "s", "started_date": "2026-05-04", "finished_date": "2026-05-04"}
                ]
            ),
            400,
            [f"DeploymentCommits[0].{f}' Error" for f in ("RepoUrl", "CommitSha", "StartedDate", "FinishedDate")],
        ),
        (
            8,
            {"pipeline_id": "1", "repo_url": "u", "commit_sha": "s", "start_time": "x", "end_time": "y"},
            400,
            ["'Id' failed on the 'required'", "'StartedDate' failed", "'FinishedDate' failed"],
        ),
        (
            9,
            changed(deploymentCommits=_REMOVE, commitSha=MINIMAL_SHA, repoUrl="https://github.com/acme/p"),
            400,
            ["deployment_commits is empty (400)"],
        ),
    ],
)
def test_fake_rejects_invalid_bodies_with_devlakes_envelope(
    fake: FakeDevLake, row: int, body: dict[str, Any], status: int, expected: list[str]
) -> None:
    response = post(fake, body)

    assert response.status_code == status, row
    envelope = response.json()
    assert envelope["success"] is False and envelope["code"] == 0
    for text in expected:
        assert text in envelope["message"], (row, envelope["message"])
    if "deployment_commits" not in expected[0]:
        assert envelope["message"].startswith("input json error (400)\nWraps: (2) ")
    assert fake.deployments(1) == {}


@pytest.mark.parametrize(
    ("row", "body", "expected"),
    [
        (
            10,
            changed(startedDate="2026-05-04T09:12:00"),
            'error decoding \'startedDate\': parsing time "2026-05-04T09:12:00" as "2006-01-02T15:04:05Z07:00": '
            'cannot parse "" as "Z07:00"',
        ),
        (
            11,
            changed(finishedDate="2026-05-04T09:15:30.1234567+00:00"),
            'as "2006-01-02T15:04:05.000000-07:00": cannot parse "7+00:00" as "-07:00"',
        ),
        (12, changed(startedDate=1777885920), "'startedDate' expected a map, got 'float64'"),
        (13, changed(startedDate="2026-05-04 09:12:00+02:00"), 'cannot parse " 09:12:00+02:00" as "T"'),
        (
            10,
            commit_changed(startedDate="2024-05-01T10:00:00"),
            "error decoding 'deploymentCommits[0].startedDate'",
        ),
    ],
)
def test_fake_answers_decode_errors_with_a_bare_json_string(
    fake: FakeDevLake, row: int, body: dict[str, Any], expected: str
) -> None:
    response = post(fake, body)

    assert response.status_code == 400, row
    message = response.json()
    assert isinstance(message, str), "decode errors are not wrapped in the envelope"
    assert message.startswith("1 error(s) decoding:\n\n* ")
    assert expected in message


@pytest.mark.parametrize("raw", ["[" + json.dumps(MINIMAL) + "]", json.dumps(MINIMAL)[:-5], "{not json"])
def test_fake_answers_500_to_malformed_json(fake: FakeDevLake, raw: str) -> None:  # row 14
    response = post(fake, raw)

    assert response.status_code == 500
    assert response.json()["success"] is False


@pytest.mark.parametrize(
    ("headers", "path", "status", "message"),
    [
        ({}, None, 401, "token is missing"),  # row 15
        ({"Authorization": f"Basic {API_KEY}"}, None, 401, "token is not present or malformed"),
        ({"Authorization": f"bearer {API_KEY}"}, None, 401, "token is not present or malformed"),
        ({"Authorization": "Bearer not-the-key"}, None, 403, "api key is invalid"),
        ({"Authorization": f"Bearer {API_KEY}"}, "/api/rest/plugins/webhook/1/deployments", 403, "path doesn't match"),
        ({"Authorization": f"Bearer {API_KEY}"}, "/api/rest/plugins/webhook/connections/2/deployments", 403, "scope"),
    ],
)
def test_fake_checks_api_keys_like_devlake(
    fake: FakeDevLake, headers: dict[str, str], path: str | None, status: int, message: str
) -> None:
    url = fake.url + (path or "/api/rest/plugins/webhook/connections/1/deployments")

    response = requests.post(url, json=MINIMAL, headers=headers, timeout=5)

    assert response.status_code == status
    assert response.json() == {"success": False, "message": response.json()["message"]}
    assert message in response.json()["message"]
    assert fake.deployments(1) == {}
    assert API_KEY not in json.dumps([r.headers for r in fake.requests])


def test_fake_answers_404_for_an_unknown_connection(fake: FakeDevLake) -> None:
    fake.add_api_key("general", ".*")

    response = post(fake, MINIMAL, key="general", path="/api/rest/plugins/webhook/connections/99/deployments")

    assert response.status_code == 404
    assert response.json()["message"].startswith("record not found (404)")


@pytest.mark.parametrize(
    "value",
    [
        "2024-05-01T10:00:00Z",
        "2024-05-01T10:00:00.123456789Z",
        "2024-05-01T12:00:00+02:00",
        "2024-05-01T10:00:00.123+00:00",
        "2024-05-01T10:00:00.123456+00:00",
        "2024-05-01T10:00:00+0200",
        "2024-05-01 10:00:00",
        "2024-05-01 10:00",
        "2024-05-01",
    ],
)
def test_fake_accepts_devlakes_date_forms(value: str) -> None:
    assert isinstance(parse_devlake_time(value), datetime)


@pytest.mark.parametrize(
    "value",
    [
        "2024-05-01T10:00:00",
        "2024-05-01T10:00:00.1234+00:00",
        "2024-05-01T10:00:00.123456789+00:00",
        "2024-05-01 10:00:00+02:00",
        "2024-05-01T10:00:00+02",
        "2024-05-01t10:00:00z",
        "2024-05-01T10:00Z",
        "",
        "2024-02-30T10:00:00Z",
    ],
)
def test_fake_rejects_other_date_forms(value: str) -> None:
    assert isinstance(parse_devlake_time(value), str)


def test_fake_upserts_by_id_and_adds_a_row_for_a_new_sha(fake: FakeDevLake) -> None:
    assert post(fake, MINIMAL).status_code == 200
    assert post(fake, changed(result="FAILURE")).status_code == 200

    assert list(fake.deployments(1)) == ["payments-prod-1842"]
    assert fake.deployments(1)["payments-prod-1842"]["result"] == "FAILURE"
    assert len(fake.commit_rows(1)) == 1

    assert post(fake, commit_changed(commitSha="b" * 40)).status_code == 200

    assert list(fake.deployments(1)) == ["payments-prod-1842"]
    assert sorted(row["commit_sha"] for row in fake.commit_rows(1)) == sorted([MINIMAL_SHA, "b" * 40])


def test_fake_defaults_a_commit_result_to_success_whatever_the_top_level_says(fake: FakeDevLake) -> None:
    assert post(fake, changed(result="FAILURE")).status_code == 200

    assert fake.deployment_rows(1)["payments-prod-1842"]["result"] == "FAILURE"
    assert fake.commit_rows(1)[0]["result"] == "SUCCESS"


def test_fake_matches_keys_case_insensitively_and_ignores_snake_case(fake: FakeDevLake) -> None:
    body = changed(environment=_REMOVE, ENVIRONMENT="STAGING", deploymentcommits=MINIMAL["deploymentCommits"])
    body.pop("deploymentCommits")

    assert post(fake, body).status_code == 200
    assert fake.commit_rows(1)[0]["environment"] == "STAGING"


# -- delivery ----------------------------------------------------------------------------------------


def test_two_503s_then_200_is_delivered_after_three_attempts_with_exponential_waits(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    fake.fail_next(2, status=503)

    delivery = deliver(fake, clock, payload_for())

    assert delivery.outcome is DeliveryOutcome.DELIVERED and delivery.status == 200 and delivery.attempts == 3
    assert fake.post_count == 3
    first, second = clock.waits
    assert 1.0 <= first <= 2.0 and 2.0 <= second <= 3.0
    assert len(fake.deployments(1)) == 1


def test_retry_after_seconds_is_honoured(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    fake.fail_next(1, status=429, retry_after=7)

    delivery = deliver(fake, clock, payload_for())

    assert delivery.outcome is DeliveryOutcome.DELIVERED
    assert clock.waits == [7.0]


def test_retry_after_http_date_is_honoured(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    when = datetime.now(UTC) + timedelta(seconds=30)
    fake.fail_next(1, status=503, retry_after=email.utils.format_datetime(when, usegmt=True))

    delivery = deliver(fake, clock, payload_for())

    assert delivery.outcome is DeliveryOutcome.DELIVERED
    (wait,) = clock.waits
    assert 25.0 <= wait <= 30.0


def test_persistent_503_gives_up_before_the_deadline(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    fake.fail_always(503)
    start = clock()

    delivery = deliver(fake, clock, payload_for(), budget=10.0)

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status == 503
    assert "fake failure 503" in delivery.message
    assert clock() <= start + 10.0, "never sleeps past the deadline"
    assert 2 <= delivery.attempts < MAX_ATTEMPTS
    assert fake.post_count == delivery.attempts
    assert fake.deployments(1) == {}


def test_persistent_503_stops_after_the_attempt_cap(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    fake.fail_always(502)

    delivery = deliver(fake, clock, payload_for(), budget=3600.0)

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.attempts == MAX_ATTEMPTS
    assert len(clock.waits) == MAX_ATTEMPTS - 1


def test_a_spent_budget_still_allows_one_attempt_and_no_sleep(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    fake.fail_always(503)

    delivery = deliver(fake, clock, payload_for(), budget=-1.0)

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.attempts == 1
    assert clock.waits == []


def test_a_retry_after_beyond_the_deadline_is_not_waited_for(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    fake.fail_always(429, retry_after=600)

    delivery = deliver(fake, clock, payload_for(), budget=60.0)

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status == 429 and delivery.attempts == 1
    assert clock.waits == []


def test_a_body_devlake_refuses_is_rejected_with_its_message(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    payload = payload_for()
    payload["environment"] = "production"

    delivery = deliver(fake, clock, payload)

    assert delivery.outcome is DeliveryOutcome.REJECTED and delivery.status == 400 and delivery.attempts == 1
    assert "'Environment' failed on the 'oneof' tag" in delivery.message
    assert delivery.message.startswith("input json error (400)")


def test_a_decode_error_is_rejected_with_the_bare_string_message(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    payload = payload_for()
    payload["startedDate"] = "2026-05-04T09:12:00"

    delivery = deliver(fake, clock, payload)

    assert delivery.outcome is DeliveryOutcome.REJECTED and delivery.status == 400
    assert delivery.message.startswith("1 error(s) decoding:")
    assert 'cannot parse "" as "Z07:00"' in delivery.message


def test_a_wrong_key_holds_the_deployment_back_and_the_key_appears_nowhere(
    fake: FakeDevLake, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "w" * 128
    monkeypatch.setenv(KEY_ENV, wrong)
    caplog.set_level(logging.DEBUG)

    with client_for(fake, clock) as client:
        delivery = client.deliver(make_config(fake.url).devlake.connections[0], payload_for(), clock() + 60)

    assert delivery == Delivery(
        DeliveryOutcome.RETRY_LATER,
        403,
        "DevLake refused the connection's configuration (HTTP 403): api key is invalid: DevLake does not know the "
        f"key in ${KEY_ENV} (revoked or rotated, or DevLake's ENCRYPTION_SECRET changed): put the connection's "
        "current key there",
        1,
    )
    assert wrong not in repr(delivery) and wrong not in repr(client)
    assert all(wrong not in repr(record.__dict__) for record in caplog.records)


class _ProxyDroppingAuth(requests.Session):
    """A proxy in front of DevLake that strips the Authorization header."""

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
        request.headers.pop("Authorization", None)
        return super().send(request, **kwargs)


def test_a_missing_token_holds_the_deployment_back_with_devlakes_401_message(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    config = make_config(fake.url)
    with _ProxyDroppingAuth() as session:
        client = DevLakeClient(config.devlake, sleep=clock.sleep, clock=clock, session=session)
        delivery = client.deliver(config.devlake.connections[0], payload_for(), clock() + 60)

    assert delivery == Delivery(
        DeliveryOutcome.RETRY_LATER,
        401,
        "DevLake refused the connection's configuration (HTTP 401): token is missing: the request reached DevLake "
        "without the API key: is a proxy in front of it dropping the header?",
        1,
    )
    assert api_key not in delivery.message


def test_a_missing_api_key_env_var_is_retried_later_without_sending(
    fake: FakeDevLake, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)

    delivery = deliver(fake, clock, payload_for())

    assert delivery == Delivery(DeliveryOutcome.RETRY_LATER, None, f"api key env var {KEY_ENV} is not set", 0)
    assert fake.post_count == 0


def test_a_slow_devlake_times_out_is_retried_then_left_for_later(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    fake.delay(1.0)

    delivery = deliver(fake, clock, payload_for(), budget=2.5, timeout="100ms")

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status is None
    assert delivery.attempts == 2
    assert "timed out" in delivery.message
    assert len(clock.waits) == 1


def test_an_unreachable_devlake_is_retried_then_left_for_later(api_key: str, clock: FakeClock) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = make_config(f"http://127.0.0.1:{port}")

    with DevLakeClient(config.devlake, sleep=clock.sleep, clock=clock) as client:
        delivery = client.deliver(config.devlake.connections[0], payload_for(), clock() + 2.5)

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status is None
    assert delivery.attempts == 2
    assert delivery.message == (
        f"cannot connect to 127.0.0.1:{port}: connection refused (is DevLake running, and is this its address?) "
        "(gave up after 2 attempts)"
    ), "host and port, not urllib3's pool and object dump"
    assert delivery.cause is not None and "gave up" not in delivery.cause, "what summaries group by"


def test_a_host_that_does_not_resolve_is_named_in_words(api_key: str, clock: FakeClock) -> None:
    config = make_config("http://devlake.invalid:8080")
    with DevLakeClient(config.devlake, sleep=clock.sleep, clock=clock) as client:
        delivery = client.deliver(config.devlake.connections[0], payload_for(), clock() + 0.5)
    assert delivery.message.startswith("cannot connect to devlake.invalid:8080: the host name does not resolve")
    assert "HTTPConnectionPool" not in delivery.message and "object at 0x" not in delivery.message


def test_a_key_of_another_connection_is_named_as_such(
    fake: FakeDevLake, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection's generated key is scoped to its own id: DevLake answers 403 "path doesn't match api key's
    scope" when it is used for another connection."""
    fake.add_connection(2, "k" * 128)
    monkeypatch.setenv(KEY_ENV, "k" * 128)
    delivery = deliver(fake, clock, payload_for())
    assert delivery.status == 403 and delivery.outcome is DeliveryOutcome.RETRY_LATER
    assert "path doesn't match api key's scope" in delivery.message
    assert f"the key in ${KEY_ENV} belongs to another connection" in delivery.message
    with client_for(fake, clock) as client:
        ok, message = client.probe(make_config(fake.url).devlake.connections[0])
    assert not ok and f"the key in ${KEY_ENV} belongs to another connection" in message


def test_a_devlake_url_ending_in_api_is_named_as_the_likely_mistake(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    """``devlake.url: …/api`` makes the path ``/api/api/rest/…``: DevLake has no such route and answers 404."""
    config = make_config(f"{fake.url}/api")
    with DevLakeClient(config.devlake, sleep=clock.sleep, clock=clock) as client:
        delivery = client.deliver(config.devlake.connections[0], payload_for(), clock() + 60)
        ok, message = client.probe(config.devlake.connections[0])
    assert delivery.status == 404 and delivery.outcome is DeliveryOutcome.RETRY_LATER
    assert "is devlake.url the Config UI address, without /api?" in delivery.message
    assert not ok and "is devlake.url the Config UI address, without /api?" in message


def test_an_unknown_connection_id_is_named_as_such(
    fake: FakeDevLake, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.add_api_key("general-key", ".*")
    monkeypatch.setenv(KEY_ENV, "general-key")
    fake.remove_connection(1)
    delivery = deliver(fake, clock, payload_for())
    assert delivery.status == 404
    assert delivery.message.startswith("connection 1 not found (HTTP 404: record not found (404)): ")
    assert "check devlake.connections[].id" in delivery.message and "/api?" not in delivery.message


def test_a_stop_cuts_a_long_retry_after_short_and_leaves_the_deployment_for_the_next_run(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    """A 429 asking for 100 s: the stop flag's wait ends at once (here: the stop came during the wait) and no
    further attempt is made."""
    stop = StopFlag()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        stop.set()  # SIGTERM arrives while the client waits
        stop.sleep(seconds)

    fake.fail_always(429, retry_after=100)
    config = make_config(fake.url)
    with DevLakeClient(config.devlake, sleep=sleep, clock=clock, bound_timeout=stop.timeout) as client:
        delivery = client.deliver(config.devlake.connections[0], payload_for(), clock() + 3600)
    assert waits == [100.0]
    assert fake.post_count == 1, "no attempt after the stop"
    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status == 429 and delivery.attempts == 1
    assert "retries cut short after 1 attempt(s): the process is stopping" in delivery.message


def test_requests_started_after_a_stop_have_a_bounded_timeout(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    timeouts: list[Any] = []

    class Recording(requests.Session):
        def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:
            timeouts.append(kwargs.get("timeout"))
            return super().send(request, **kwargs)

    stop = StopFlag()
    config = make_config(fake.url, devlake={"timeout": "60s"})
    with Recording() as session:
        client = DevLakeClient(
            config.devlake, sleep=clock.sleep, clock=clock, session=session, bound_timeout=stop.timeout
        )
        client.deliver(config.devlake.connections[0], payload_for(), clock() + 60)
        stop.set()
        client.deliver(config.devlake.connections[0], payload_for(), clock() + 60)
    assert timeouts == [(5.0, 60.0), (5.0, STOPPING_REQUEST_TIMEOUT)]


def test_sending_the_same_deployment_twice_is_one_deployment(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    payload = payload_for()
    config = make_config(fake.url)
    with client_for(fake, clock) as client:
        first = client.deliver(config.devlake.connections[0], payload, clock() + 60)
        second = client.deliver(config.devlake.connections[0], payload, clock() + 60)

    assert first.outcome is second.outcome is DeliveryOutcome.DELIVERED
    assert fake.post_count == 2
    assert list(fake.deployments(1)) == [payload["id"]]
    assert len(fake.commit_rows(1)) == 2


def test_the_request_carries_the_bearer_key_and_json(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    payload = payload_for()

    deliver(fake, clock, payload)

    (request,) = fake.requests
    assert request.path == "/api/rest/plugins/webhook/connections/1/deployments"
    assert request.connection == 1 and request.body == payload and request.status == 200
    assert request.headers["Authorization"] == "Bearer <redacted>"
    assert request.headers["Content-Type"] == "application/json"


def test_probe_proves_url_route_and_key_without_storing_anything(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    config = make_config(fake.url)
    with client_for(fake, clock) as client:
        ok, message = client.probe(config.devlake.connections[0])
    assert ok, message
    assert "API key accepted" in message
    assert fake.deployments(config.devlake.connections[0].id) == {}


def test_probe_reports_a_refused_key_and_an_unreachable_devlake(
    fake: FakeDevLake, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    wrong = "x" * 128
    monkeypatch.setenv(KEY_ENV, wrong)
    config = make_config(fake.url)
    with client_for(fake, clock) as client:
        ok, message = client.probe(config.devlake.connections[0])
    assert not ok
    assert "API key refused (HTTP 403" in message and wrong not in message

    unreachable = make_config("http://127.0.0.1:9")
    with DevLakeClient(unreachable.devlake, sleep=clock.sleep, clock=clock) as client:
        ok, message = client.probe(unreachable.devlake.connections[0])
    assert not ok
    assert message.startswith("unreachable:")


def test_a_redirect_is_not_followed_and_says_where_it_points_without_its_query(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    fake.sso_redirect("/oauth2/start")

    delivery = deliver(fake, clock, payload_for())

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status == 302 and delivery.attempts == 1
    assert [request.method for request in fake.requests] == ["POST"], "the POST is never replayed as a GET"
    assert f"redirect (HTTP 302) to {fake.url}/oauth2/start;" in delivery.message
    assert "rd=" not in delivery.message and "devlake.url" in delivery.message
    assert fake.deployments(1) == {}


def test_a_200_with_devlakes_failure_envelope_is_retried_like_a_5xx(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    refused = {"code": 0, "success": False, "message": "not stored", "causes": None, "data": None}
    fake.fail_next(2, status=200, body=refused)

    delivery = deliver(fake, clock, payload_for())

    assert delivery.outcome is DeliveryOutcome.DELIVERED and delivery.attempts == 3
    assert len(clock.waits) == 2
    assert len(fake.deployments(1)) == 1


def test_a_2xx_that_never_says_success_is_left_for_later(fake: FakeDevLake, api_key: str, clock: FakeClock) -> None:
    fake.fail_always(200, body=b"<html>" + b"x" * 5000 + b"</html>")

    delivery = deliver(fake, clock, payload_for(), budget=3600.0)

    assert delivery.outcome is DeliveryOutcome.RETRY_LATER and delivery.status == 200
    assert delivery.attempts == MAX_ATTEMPTS
    assert delivery.message.startswith("HTTP 200 without DevLake's success answer: <html>")
    assert len(delivery.message) < 400, "an unexpected page is not copied whole into the logs"


def test_probe_reports_a_redirect_and_an_answer_that_is_not_devlakes(
    fake: FakeDevLake, api_key: str, clock: FakeClock
) -> None:
    config = make_config(fake.url)
    fake.sso_redirect("/login")
    with client_for(fake, clock) as client:
        ok, message = client.probe(config.devlake.connections[0])
    assert not ok
    assert f"redirect (HTTP 302) to {fake.url}/login;" in message
    assert [request.method for request in fake.requests] == ["POST"]

    fake.sso_redirect(None)
    fake.fail_next(1, status=400, body=b"400 Bad Request")
    with client_for(fake, clock) as client:
        ok, message = client.probe(config.devlake.connections[0])
    assert not ok
    assert message == "unexpected answer HTTP 400: 400 Bad Request"
