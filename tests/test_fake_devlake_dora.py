"""The fake DevLake's webhook issues routes, and DORA computed from its rows the way DevLake computes it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Any

import pytest
import requests

from tests.fakes.devlake import FakeDevLake
from tests.fakes.dora import (
    ChainKey,
    CommitGraph,
    DoraReport,
    devlake_median,
    timestampdiff_minutes,
)

KEY_1 = "a" * 128
KEY_2 = "b" * 128
T0 = datetime(2026, 5, 4, 9, 0, tzinfo=UTC)
REPO = "https://github.com/acme/payments"
INCIDENT: dict[str, Any] = {
    "issueKey": "payments-prod-1842",
    "title": "payments degraded after sync 1842",
    "type": "INCIDENT",
    "status": "TODO",
    "originalStatus": "Degraded",
    "createdDate": "2026-05-04T09:20:00Z",
}
_REMOVE = object()
_FIELD = "Key: 'WebhookIssueRequest.{0}' Error:Field validation for '{0}' failed on the '{1}' tag"


def incident(**changes: Any) -> dict[str, Any]:
    body = dict(INCIDENT)
    for name, value in changes.items():
        if value is _REMOVE:
            body.pop(name, None)
        else:
            body[name] = value
    return body


@pytest.fixture
def fake() -> Iterator[FakeDevLake]:
    with FakeDevLake() as server:
        server.add_connection(1, KEY_1)
        server.add_connection(2, KEY_2)
        yield server


def post(fake: FakeDevLake, body: Any, path: str = "/connections/1/issues", key: str | None = KEY_1) -> Any:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    data = body if isinstance(body, str) else json.dumps(body)
    url = f"{fake.url}/api/rest/plugins/webhook{path}"
    return requests.post(url, data=data, headers=headers, timeout=5)


def close(fake: FakeDevLake, key: str, connection: int = 1) -> Any:
    return post(fake, "", path=f"/connections/{connection}/issue/{key}/close", key=KEY_1 if connection == 1 else KEY_2)


def deploy(fake: FakeDevLake, deployment_id: str, sha: str, finished: datetime, connection: int = 1) -> None:
    started = finished - timedelta(minutes=5)
    dates = {"startedDate": started.isoformat(), "finishedDate": finished.isoformat()}
    commit = {"repoUrl": REPO, "commitSha": sha, "result": "SUCCESS", **dates}
    body = {
        "id": deployment_id,
        "environment": "PRODUCTION",
        "result": "SUCCESS",
        **dates,
        "deploymentCommits": [commit],
    }
    url = f"{fake.url}/api/rest/plugins/webhook/connections/{connection}/deployments"
    key = KEY_1 if connection == 1 else KEY_2
    answer = requests.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=5)
    assert answer.status_code == 200, answer.text


# -- the issues route ----------------------------------------------------------------------------------


def test_an_incident_is_stored_as_an_issue_and_an_incident_row(fake: FakeDevLake) -> None:
    response = post(fake, incident(severity="high", creatorId="argocd"))

    assert response.status_code == 200
    assert response.json() == {"code": 0, "success": True, "message": "success", "causes": None, "data": None}
    issue = fake.issues(1)["payments-prod-1842"]
    assert issue["id"] == "webhook:1:payments-prod-1842" and issue["board_id"] == "webhook:1"
    assert issue["status"] == "TODO" and issue["original_status"] == "Degraded" and issue["type"] == "INCIDENT"
    assert issue["created_date"] == datetime(2026, 5, 4, 9, 20, tzinfo=UTC) and issue["resolution_date"] is None
    assert issue["creator_id"] == "webhook:1:argocd" and issue["lead_time_minutes"] == 0
    row = fake.incidents(1)["payments-prod-1842"]
    assert row["id"] == issue["id"] and row["scope_id"] == "webhook:1" and row["table"] == "boards"
    assert row["incident_key"] == "payments-prod-1842" and row["severity"] == "high"
    assert fake.issues(2) == {} and fake.incidents(2) == {}


def test_an_issue_of_another_type_writes_no_incident_row(fake: FakeDevLake) -> None:
    assert post(fake, incident(type="BUG")).status_code == 200
    assert post(fake, incident(issueKey="lower", type="incident")).status_code == 200

    assert sorted(fake.issues(1)) == ["lower", "payments-prod-1842"]
    assert fake.incidents(1) == {}


@pytest.mark.parametrize(
    ("body", "failures"),
    [
        (
            {},
            [
                ("IssueKey", "required"),
                ("Title", "required"),
                ("Status", "oneof"),
                ("OriginalStatus", "required"),
                ("CreatedDate", "required"),
            ],
        ),
        (incident(issueKey=_REMOVE), [("IssueKey", "required")]),
        (incident(issueKey=""), [("IssueKey", "required")]),
        (incident(title=None), [("Title", "required")]),
        (incident(originalStatus=_REMOVE), [("OriginalStatus", "required")]),
        (incident(createdDate=_REMOVE), [("CreatedDate", "required")]),
        (incident(status=_REMOVE), [("Status", "oneof")]),
        (incident(status="done"), [("Status", "oneof")]),
        (incident(status="OPEN"), [("Status", "oneof")]),
        (incident(issueKey=_REMOVE, issue_key="snake"), [("IssueKey", "required")]),
    ],
)
def test_invalid_issues_get_a_bare_400_string_and_nothing_is_stored(
    fake: FakeDevLake, body: dict[str, Any], failures: list[tuple[str, str]]
) -> None:
    response = post(fake, body)

    assert response.status_code == 400
    message = response.json()
    assert isinstance(message, str), "issue validation errors are not wrapped in DevLake's envelope"
    for name, tag in failures:
        assert _FIELD.format(name, tag) in message
    assert message.count("Key: 'WebhookIssueRequest.") == 2 * len(failures)
    assert fake.issues(1) == {} and fake.incidents(1) == {}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"createdDate": "2026-05-04T09:20:00"},
            'error decoding \'createdDate\': parsing time "2026-05-04T09:20:00" as "2006-01-02T15:04:05Z07:00"',
        ),
        ({"resolutionDate": 1777886400}, "'resolutionDate' expected a map, got 'float64'"),
        ({"resolutionDate": "2026-05-04 10:00:00+02:00"}, 'cannot parse " 10:00:00+02:00" as "T"'),
        ({"leadTimeMinutes": "soon"}, "cannot parse 'leadTimeMinutes' as uint"),
        ({"title": {"text": "x"}}, "'title' expected type 'string', got unconvertible type 'map[string]interface {}'"),
    ],
)
def test_undecodable_issues_get_a_bare_400_string(fake: FakeDevLake, changes: dict[str, Any], expected: str) -> None:
    response = post(fake, incident(**changes))

    assert response.status_code == 400
    message = response.json()
    assert isinstance(message, str) and message.startswith("1 error(s) decoding:\n\n* ")
    assert expected in message
    assert fake.issues(1) == {}


def test_issue_keys_match_case_insensitively_and_values_decode_weakly(fake: FakeDevLake) -> None:
    body = incident(issueKey=_REMOVE, ISSUEKEY=1842, leadtimeminutes="90", storyPoint="2.5", createdDate="2026-05-04")

    assert post(fake, body).status_code == 200

    issue = fake.issues(1)["1842"]
    assert issue["lead_time_minutes"] == 90 and issue["story_point"] == 2.5
    assert issue["created_date"] == datetime(2026, 5, 4, tzinfo=UTC)


@pytest.mark.parametrize(
    ("path", "key", "status", "message"),
    [
        ("/connections/1/issues", None, 401, "token is missing"),
        ("/connections/1/issues", "not-a-key", 403, "api key is invalid"),
        ("/connections/2/issues", KEY_1, 403, "path doesn't match api key's scope"),
        ("/1/issues", KEY_1, 403, "path doesn't match api key's scope"),
        ("/connections/1/issue/payments-prod-1842/close", None, 401, "token is missing"),
        ("/connections/2/issue/payments-prod-1842/close", KEY_1, 403, "path doesn't match api key's scope"),
    ],
)
def test_the_issues_routes_take_the_connection_key_only(
    fake: FakeDevLake, path: str, key: str | None, status: int, message: str
) -> None:
    response = post(fake, INCIDENT, path=path, key=key)

    assert response.status_code == status
    assert response.json() == {"success": False, "message": message}
    assert fake.issues(1) == {} and fake.issues(2) == {}


def test_unknown_or_invalid_connections_and_malformed_json(fake: FakeDevLake) -> None:
    fake.add_api_key("general", ".*")

    unknown = post(fake, INCIDENT, path="/connections/9/issues", key="general")
    invalid = post(fake, INCIDENT, path="/connections/0/issues", key="general")
    malformed = post(fake, json.dumps(INCIDENT)[:-3])
    listed = post(fake, [INCIDENT])

    assert unknown.status_code == 404 and unknown.json()["message"].startswith("record not found (404)")
    assert invalid.status_code == 400 and invalid.json()["message"] == "invalid connectionId (400)"
    assert malformed.status_code == 500 and malformed.json()["success"] is False
    assert listed.status_code == 500 and "cannot unmarshal array" in listed.json()["message"]
    assert requests.get(f"{fake.url}/api/rest/plugins/webhook/connections/1/issues", timeout=5).status_code == 401
    got = requests.get(
        f"{fake.url}/api/rest/plugins/webhook/connections/1/issues",
        headers={"Authorization": f"Bearer {KEY_1}"},
        timeout=5,
    )
    assert got.status_code == 404
    assert fake.issues(1) == {}


def test_a_re_post_with_done_and_a_resolution_date_resolves_the_incident_in_place(fake: FakeDevLake) -> None:
    assert post(fake, INCIDENT).status_code == 200
    assert post(fake, incident(status="DONE", originalStatus="Healthy", resolutionDate="2026-05-04T10:05:30Z")).ok

    (issue,) = fake.issues(1).values()
    (row,) = fake.incidents(1).values()
    for stored in (issue, row):
        assert stored["status"] == "DONE" and stored["original_status"] == "Healthy"
        assert stored["resolution_date"] == datetime(2026, 5, 4, 10, 5, 30, tzinfo=UTC)
        assert stored["lead_time_minutes"] == 45  # resolution - creation, whole minutes, as the webhook derives it


def test_a_sent_lead_time_is_kept_and_a_re_post_overwrites_every_column(fake: FakeDevLake) -> None:
    resolved = incident(status="DONE", resolutionDate="2026-05-04T10:05:00Z", leadTimeMinutes=7, severity="high")
    assert post(fake, resolved).ok
    assert fake.incidents(1)["payments-prod-1842"]["lead_time_minutes"] == 7

    assert post(fake, INCIDENT).ok

    row = fake.incidents(1)["payments-prod-1842"]
    assert row["status"] == "TODO" and row["resolution_date"] is None and row["severity"] == ""
    assert row["lead_time_minutes"] == 0


def test_an_issue_re_posted_as_another_type_leaves_its_incident_row(fake: FakeDevLake) -> None:
    assert post(fake, INCIDENT).ok
    assert post(fake, incident(type="BUG", status="DONE", resolutionDate="2026-05-04T10:00:00Z")).ok

    assert fake.issues(1)["payments-prod-1842"]["type"] == "BUG"
    assert fake.incidents(1)["payments-prod-1842"]["status"] == "TODO"


def test_close_sets_done_without_a_resolution_date(fake: FakeDevLake) -> None:
    assert post(fake, INCIDENT).ok

    response = close(fake, "payments-prod-1842")

    assert response.status_code == 200 and response.json()["success"] is True
    for stored in (fake.issues(1)["payments-prod-1842"], fake.incidents(1)["payments-prod-1842"]):
        assert stored["status"] == "DONE" and stored["original_status"] == ""
        assert stored["resolution_date"] is None and stored["lead_time_minutes"] == 0


def test_close_finds_url_encoded_keys_and_answers_404_for_unknown_ones(fake: FakeDevLake) -> None:
    assert post(fake, incident(issueKey="INC 7")).ok

    assert close(fake, "INC%207").status_code == 200
    missing = close(fake, "INC-8")
    other_connection = close(fake, "INC%207", connection=2)

    assert fake.issues(1)["INC 7"]["status"] == "DONE"
    assert missing.status_code == 404 and missing.json()["message"].startswith("issue not found (404)")
    assert other_connection.status_code == 404
    assert "INC-8" not in fake.issues(1)


# -- the DORA calculator on hand-built rows ---------------------------------------------------------------------


def row(
    deployment: str,
    sha: str,
    finished: datetime,
    *,
    connection: int = 1,
    repo: str = REPO,
    environment: str = "PRODUCTION",
    result: str = "SUCCESS",
    started: datetime | None = None,
) -> dict[str, Any]:
    return {
        "id": f"webhook:{connection}:{deployment}:{repo}:{sha}",
        "cicd_deployment_id": deployment,
        "cicd_scope_id": f"webhook:{connection}",
        "repo_url": repo,
        "commit_sha": sha,
        "result": result,
        "environment": environment,
        "started_date": started or finished - timedelta(minutes=5),
        "finished_date": finished,
    }


def incident_row(
    key: str, created: datetime, resolved: datetime | None = None, connection: int = 1, lead_time: int | None = None
) -> dict[str, Any]:
    derived = 0 if resolved is None else int((resolved - created).total_seconds() // 60)
    return {
        "id": f"webhook:{connection}:{key}",
        "scope_id": f"webhook:{connection}",
        "created_date": created,
        "resolution_date": resolved,
        "lead_time_minutes": derived if lead_time is None else lead_time,
    }


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_a_chain_skips_failures_and_follows_finished_dates_not_insertion_order() -> None:
    rows = [
        row("d3", "c3", at(30)),
        row("d1", "c1", at(10)),
        row("d2", "c2", at(20), result="FAILURE"),
        row("d4", "c4", at(40), result="FAILED"),
    ]

    report = DoraReport.from_rows(rows)

    chain = report.chain(REPO, connection=1)
    assert [link.deployment_id for link in chain] == ["d1", "d3"]
    assert (chain[0].prev_row_id, chain[1].prev_row_id) == ("", rows[1]["id"])
    assert [(pair.old_sha, pair.new_sha) for pair in report.diff_pairs] == [("c1", "c3")]
    assert report.deployment_ids == ["d1", "d3"]


def test_url_variants_connections_and_environments_start_chains_of_their_own() -> None:
    rows = [
        row("d1", "c1", at(10)),
        row("d2", "c2", at(20), repo=REPO + ".git"),
        row("d3", "c3", at(30), repo=REPO.replace("acme", "Acme")),
        row("d4", "c4", at(40), connection=2),
        row("s5", "c5", at(50), environment="STAGING"),
        row("d6", "c6", at(60)),
    ]

    report = DoraReport.from_rows(rows)

    assert len(report.chains) == 5
    assert [link.commit_sha for link in report.chain(REPO, 1)] == ["c1", "c6"]
    assert report.chain(REPO, 1)[1].prev_commit_sha == "c1", "the later deployment diffs against the older SHA"
    for key in (
        ChainKey("webhook:1", REPO + ".git", "PRODUCTION"),
        ChainKey("webhook:1", REPO.replace("acme", "Acme"), "PRODUCTION"),
        ChainKey("webhook:2", REPO, "PRODUCTION"),
        ChainKey("webhook:1", REPO, "STAGING"),
    ):
        (only,) = report.chains[key]
        assert only.prev_row_id == ""
    shipped = report.first_shipped(CommitGraph.linear(["c1", "c2", "c3", "c4", "c5", "c6"]), ["c1", "c2", "c6"])
    assert shipped["c1"] is None
    assert shipped["c2"] is not None and shipped["c2"].deployment_id == "d6", "absorbed by the next original-URL run"
    assert shipped["c6"] is not None and shipped["c6"].deployment_id == "d6"


def test_equal_finished_dates_are_flagged_as_devlakes_choice() -> None:
    report = DoraReport.from_rows([row("d1", "c1", at(10)), row("d2", "c2", at(10)), row("d3", "c3", at(20))])

    assert [link.tied for link in report.chain(REPO, 1)] == [False, True, False]


def test_the_first_deployment_of_a_chain_ships_nothing_and_a_rollback_ships_nothing() -> None:
    history = ["c1", "c2", "c3", "c4"]
    rows = [row("d1", "c3", at(10)), row("d2", "c1", at(20)), row("d3", "c4", at(30))]

    shipped = DoraReport.from_rows(rows).first_shipped(CommitGraph.linear(history), history)

    assert shipped["c1"] is None and shipped["c3"] is not None
    assert {sha: link.deployment_id for sha, link in shipped.items() if link} == {"c2": "d3", "c3": "d3", "c4": "d3"}


def test_a_commit_goes_to_the_earliest_started_row_across_the_project() -> None:
    history = ["c1", "c2", "c3"]
    rows = [
        row("a1", "c1", at(0)),
        row("b1", "c1", at(1), connection=2),
        row("a2", "c3", at(30), started=at(5)),
        row("b2", "c2", at(20), connection=2, started=at(10)),
        row("a3", "c3", at(40), environment="STAGING", started=at(0)),
    ]

    shipped = DoraReport.from_rows(rows).first_shipped(CommitGraph.linear(history), history)

    assert shipped["c2"] is not None and shipped["c2"].deployment_id == "a2", "earlier start wins over earlier finish"
    assert shipped["c3"] is not None and shipped["c3"].deployment_id == "a2"


def test_commit_graph_diffs_like_refdiff() -> None:
    graph = CommitGraph({"m": ["c2", "f1"], "f1": ["c1"], "c2": ["c1"], "c1": []})

    assert graph.lost("c1", "m") == ["m", "c2", "f1"]
    assert graph.lost("m", "c2") == []
    assert graph.lost("unknown", "c2") == ["c2", "c1"], "an old SHA outside the graph excludes nothing"
    assert graph.lost("c1", "unknown") == ["unknown"], "a new SHA outside the graph is only itself"


def test_incidents_link_to_the_latest_production_success_finished_strictly_before() -> None:
    rows = [
        row("d1", "c1", at(0), connection=1),
        row("d2", "c2", at(60), connection=2),
        row("s3", "c3", at(70), environment="STAGING"),
        row("f4", "c4", at(80), result="FAILURE"),
    ]
    incidents = [
        incident_row("early", at(-5)),
        incident_row("at-d2", at(60)),
        incident_row("after", at(90), connection=1),
    ]

    report = DoraReport.from_rows(rows, incidents)

    assert report.unlinked_incidents == ("webhook:1:early",)
    assert report.incident_links["webhook:1:at-d2"].deployment_id == "d1", "finished_date < created_date, strictly"
    link = report.incident_links["webhook:1:after"]
    assert link.deployment_id == "d2" and link.row_finished_date == at(60), "any connection of the project"
    assert not link.ambiguous


def test_an_incident_after_two_deployments_finishing_together_is_ambiguous() -> None:
    report = DoraReport.from_rows([row("d1", "c1", at(0)), row("d2", "c2", at(0))], [incident_row("i", at(5))])

    assert report.incident_links["webhook:1:i"].ambiguous


def test_change_failure_rate_counts_deployments_with_an_incident_once() -> None:
    rows = [row(f"d{n}", f"c{n}", at(60 * n)) for n in range(1, 6)] + [row("d6", "c6", at(400), result="FAILURE")]
    incidents = [
        incident_row("i1", at(61), at(90)),
        incident_row("i2", at(62)),
        incident_row("i3", at(250), at(400)),
        incident_row("i4", at(410), at(420)),
    ]

    report = DoraReport.from_rows(rows, incidents)

    assert report.failed_deployments == ["d1", "d4", "d5"]
    assert report.change_failure_rate == Fraction(3, 5)
    assert DoraReport.from_rows([row("s", "c", at(0), environment="STAGING")]).change_failure_rate is None


def test_time_to_restore_is_devlakes_lower_median_over_resolved_incidents() -> None:
    rows = [row(f"d{n}", f"c{n}", at(1000 * n)) for n in range(1, 5)]
    incidents = [
        incident_row("i1", at(1010), at(1000 + 30)),
        incident_row("i2", at(2010), at(2000 + 90)),
        incident_row("i3", at(3010), at(3000 + 60)),
        incident_row("i4", at(4010), at(4000 + 240)),
        incident_row("open", at(4020)),
    ]

    report = DoraReport.from_rows(rows, incidents)

    assert sorted(report.recovery_minutes.values()) == [30, 60, 90, 240]
    assert report.time_to_restore == timedelta(minutes=60)
    assert report.time_to_restore_2021 == timedelta(minutes=50)  # lead times 20, 50, 80, 230
    three = DoraReport.from_rows(rows, incidents[1:4])
    assert three.time_to_restore == timedelta(minutes=90)


def test_a_deployment_of_several_rows_counts_once_at_its_latest_finish() -> None:
    rows = [
        row("d1", "c1", at(10), connection=1),
        row("d1", "w1", at(14), connection=2, repo="https://github.com/acme/web"),
        row("d2", "c2", at(100)),
    ]
    incidents = [incident_row("i", at(12), at(40))]

    report = DoraReport.from_rows(rows, incidents)

    assert [(d.deployment_id, d.finished_date) for d in report.deployments] == [("d1", at(14)), ("d2", at(100))]
    assert report.incident_links["webhook:1:i"].row_finished_date == at(10)
    assert report.recovery_minutes == {"webhook:1:i": 26}, "measured from the deployment's latest finish"


def test_a_window_selects_deployments_by_finish_and_incidents_by_resolution() -> None:
    day = timedelta(days=1)
    rows = [row("d1", "c1", T0), row("d2", "c2", T0 + day), row("d3", "c3", T0 + 3 * day)]
    incidents = [
        incident_row("i1", T0 + timedelta(hours=1), T0 + timedelta(hours=2)),
        incident_row("i2", T0 + day + timedelta(hours=1), T0 + 3 * day),
    ]

    report = DoraReport.from_rows(rows, incidents, window=(T0 + day, T0 + 2 * day))

    assert report.deployment_ids == ["d2"]
    assert report.change_failure_rate == Fraction(1, 1)
    assert report.recovery_minutes == {} and report.time_to_restore is None
    assert set(report.incident_links) == {"webhook:1:i1", "webhook:1:i2"}, "links ignore the window"
    assert report.deployment_days == [(T0 + day).date()]


@pytest.mark.parametrize(
    ("values", "median"),
    [([], None), ([5], 5), ([2, 1], 1), ([3, 1, 2], 2), ([10, 10, 30, 30], 10), ([1, 2, 3, 4, 5, 6], 3)],
)
def test_devlake_median(values: list[int], median: int | None) -> None:
    assert devlake_median(values) == median


def test_timestampdiff_truncates_toward_zero() -> None:
    assert timestampdiff_minutes(T0, T0 + timedelta(minutes=59, seconds=59)) == 59
    assert timestampdiff_minutes(T0, T0 - timedelta(seconds=90)) == -1


# -- end to end through the fake ------------------------------------------------------------------------------


def test_dora_of_a_project_from_what_was_posted(fake: FakeDevLake) -> None:
    deploy(fake, "d1", "c1", at(0))
    deploy(fake, "d2", "c2", at(60), connection=2)
    deploy(fake, "d3", "c3", at(120))
    opened = incident(createdDate=at(70).isoformat())
    assert post(fake, opened).ok
    assert post(fake, {**opened, "status": "DONE", "resolutionDate": at(100).isoformat()}).ok
    assert post(fake, incident(issueKey="closed", createdDate=at(130).isoformat())).ok
    assert close(fake, "closed").ok

    project = DoraReport.of(fake, connections=[1, 2])
    alone = DoraReport.of(fake, connections=[1])

    assert project.deployment_ids == ["d1", "d2", "d3"]
    assert project.failed_deployments == ["d2", "d3"] and project.change_failure_rate == Fraction(2, 3)
    assert project.recovery_minutes == {"webhook:1:payments-prod-1842": 40}, "a closed incident has no resolution"
    assert project.time_to_restore == timedelta(minutes=40) and project.time_to_restore_2021 == timedelta(minutes=30)
    assert alone.incident_links["webhook:1:payments-prod-1842"].deployment_id == "d1"
    assert [link.deployment_id for link in alone.chain(REPO, 1)] == ["d1", "d3"]
