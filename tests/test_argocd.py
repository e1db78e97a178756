"""The Application lister against a fake Kubernetes API, through the real ``kubernetes`` client and a kubeconfig."""

from __future__ import annotations

import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import Configuration

from reconciler.application import MalformedApplication, UnreadableApplication, parse_application
from reconciler.argocd import (
    ATTEMPTS,
    MAX_RESTARTS,
    ClusterLister,
    ClusterUnavailable,
    build_api_client,
    cut_list,
    decode_page,
)
from reconciler.config import ClusterConfig
from reconciler.run import StopFlag
from tests.fakes.kube_api import EncodedApp, FakeKubeAPI

SECRET_TOKEN = "s3cr3t-bearer-0123456789abcdef"


def app(name: str, namespace: str = "argocd", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}", "labels": labels or {}},
        "spec": {"destination": {"server": "https://kubernetes.default.svc", "namespace": name}},
        "status": {"sync": {"status": "Synced"}, "health": {"status": "Healthy"}},
    }


def names(pages: list[list[dict[str, Any]]]) -> list[str]:
    return [item["metadata"]["name"] for page in pages for item in page]


@pytest.fixture
def api() -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        yield server


@pytest.fixture
def kubeconfig(api: FakeKubeAPI, tmp_path: Path) -> Path:
    return api.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def sleeps() -> list[float]:
    return []


def make_cluster(kubeconfig: Path | None, **overrides: Any) -> ClusterConfig:
    data: dict[str, Any] = {"name": "prod-east", "kubeconfig": str(kubeconfig) if kubeconfig else None}
    data.update(overrides)
    return ClusterConfig.model_validate(data)


def make_lister(kubeconfig: Path, sleeps: list[float], **overrides: Any) -> ClusterLister:
    return ClusterLister(make_cluster(kubeconfig, context="fake", **overrides), sleep=sleeps.append)


def list_requests(api: FakeKubeAPI) -> list[dict[str, str]]:
    return [request.query for request in api.requests]


# -- paging ------------------------------------------------------------------------------------------


def test_pages_follow_continue_tokens_and_return_every_app_once(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i:02d}", namespace="argocd" if i % 2 else "team-a") for i in range(7)])
    lister = make_lister(kubeconfig, sleeps, page_size=3)

    pages = list(lister.pages())

    assert [len(page) for page in pages] == [3, 3, 1]
    assert sorted(names(pages)) == [f"app-{i:02d}" for i in range(7)]
    queries = list_requests(api)
    assert [query["limit"] for query in queries] == ["3", "3", "3"]
    assert "continue" not in queries[0]
    tokens = [query["continue"] for query in queries[1:]]
    assert all(tokens) and len(set(tokens)) == 2
    assert all(request.path == "/apis/argoproj.io/v1alpha1/applications" for request in api.requests)
    assert all(request.authorization == "Bearer test-token" for request in api.requests)
    assert sleeps == []


def test_pages_are_streamed_one_request_at_a_time(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps([app(f"app-{i}") for i in range(5)])
    pages = make_lister(kubeconfig, sleeps, page_size=2).pages()

    first = next(pages)

    assert names([first]) == ["app-0", "app-1"]
    assert api.list_calls == 1
    assert names(list(pages)) == ["app-2", "app-3", "app-4"]
    assert api.list_calls == 3


def test_an_empty_cluster_yields_no_pages(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    assert list(make_lister(kubeconfig, sleeps).pages()) == []
    assert api.list_calls == 1


def test_the_page_size_defaults_to_100(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps([app(f"app-{i:03d}") for i in range(150)])

    pages = list(make_lister(kubeconfig, sleeps).pages())

    assert [len(page) for page in pages] == [100, 50]
    assert [query["limit"] for query in list_requests(api)] == ["100", "100"]


def test_configured_namespaces_are_listed_in_turn(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps(
        [app("a1", "team-a"), app("a2", "team-a"), app("a3", "team-a"), app("b1", "team-b"), app("x1", "argocd")]
    )
    lister = make_lister(kubeconfig, sleeps, namespaces=["team-a", "team-b", "team-a"], page_size=2)

    pages = list(lister.pages())

    assert names(pages) == ["a1", "a2", "a3", "b1"]
    assert [request.namespace for request in api.requests] == ["team-a", "team-a", "team-b"]
    assert all("/namespaces/" in request.path for request in api.requests)


def test_the_label_selector_is_sent_and_applied(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps(
        [
            app("payments", labels={"team": "payments", "tier": "prod"}),
            app("payments-dev", labels={"team": "payments", "tier": "dev"}),
            app("search", labels={"team": "search", "tier": "prod"}),
        ]
    )
    lister = make_lister(kubeconfig, sleeps, label_selector="team=payments,tier=prod")

    pages = list(lister.pages())

    assert names(pages) == ["payments"]
    assert list_requests(api) == [{"labelSelector": "team=payments,tier=prod", "limit": "100"}]


def test_a_list_is_a_consistent_snapshot_while_it_pages(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"old-{i}") for i in range(4)])
    pages = make_lister(kubeconfig, sleeps, page_size=2).pages()
    first = next(pages)

    api.set_apps([app(f"new-{i}") for i in range(4)])

    assert names([first, *pages]) == ["old-0", "old-1", "old-2", "old-3"]


# -- expired continue tokens (410) -------------------------------------------------------------------


def test_an_expired_continue_token_restarts_the_list_without_duplicates(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(7)])
    lister = make_lister(kubeconfig, sleeps, page_size=3)
    api.expire_continue_tokens()

    pages = list(lister.pages())

    assert sorted(names(pages)) == [f"app-{i}" for i in range(7)]
    assert len(names(pages)) == 7
    assert [request.status for request in api.requests] == [200, 410, 200, 200, 200]
    assert "continue" not in list_requests(api)[2]
    assert lister.restarts == 1
    assert sleeps == []


def test_after_a_restart_only_apps_not_yet_yielded_are_returned(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(6)])
    pages = make_lister(kubeconfig, sleeps, page_size=2).pages()
    first = next(pages)
    assert names([first]) == ["app-0", "app-1"]

    # While the reconciler works on the first page, an app appears, one is deleted and the token expires.
    api.set_apps([app("app-0"), app("app-1"), app("app-1a"), app("app-2"), app("app-4"), app("app-5")])
    api.expire_continue_tokens()
    rest = list(pages)

    assert names(rest) == ["app-1a", "app-2", "app-4", "app-5"]


def test_a_continue_token_that_keeps_expiring_makes_the_cluster_unavailable(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(5)])
    api.expire_continue_tokens(count=100)
    lister = make_lister(kubeconfig, sleeps, page_size=2)

    with pytest.raises(ClusterUnavailable) as raised:
        list(lister.pages())

    assert raised.value.cluster == "prod-east"
    assert "continue token" in raised.value.reason and "expir" in raised.value.reason
    assert api.list_calls == 2 * (MAX_RESTARTS + 1)
    assert lister.restarts == MAX_RESTARTS


# -- transient failures ------------------------------------------------------------------------------


def test_a_server_error_is_retried_then_the_list_goes_on(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(3)])
    api.fail_next(2, status=500)

    with caplog.at_level(logging.WARNING, logger="reconciler.argocd"):
        pages = list(make_lister(kubeconfig, sleeps).pages())

    assert names(pages) == ["app-0", "app-1", "app-2"]
    assert [request.status for request in api.requests] == [500, 500, 200]
    assert len(sleeps) == 2 and all(0 < seconds <= 6 for seconds in sleeps)
    retries = [record for record in caplog.records if "retrying" in record.getMessage()]
    assert len(retries) == 2
    assert all(getattr(record, "cluster", None) == "prod-east" for record in retries)


def test_a_failure_in_the_middle_of_the_list_retries_that_page_only(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(4)])
    pages = make_lister(kubeconfig, sleeps, page_size=2).pages()
    first = next(pages)
    api.fail_next(1, status=503)

    rest = list(pages)

    assert names([first, *rest]) == ["app-0", "app-1", "app-2", "app-3"]
    assert [request.status for request in api.requests] == [200, 503, 200]
    assert list_requests(api)[1]["continue"] == list_requests(api)[2]["continue"]


def test_too_many_requests_waits_for_retry_after(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps([app("app-0")])
    api.fail_next(1, status=429, retry_after=3)

    pages = list(make_lister(kubeconfig, sleeps).pages())

    assert names(pages) == ["app-0"]
    assert sleeps == [3.0]


def test_a_persistent_server_error_makes_the_cluster_unavailable(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app("app-0")])
    api.fail_next(50, status=500)

    with pytest.raises(ClusterUnavailable) as raised:
        list(make_lister(kubeconfig, sleeps).pages())

    assert "500" in raised.value.reason and f"{ATTEMPTS} attempts" in raised.value.reason
    assert api.list_calls == ATTEMPTS
    assert len(sleeps) == ATTEMPTS - 1


def test_a_dropped_connection_is_retried(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps([app("app-0"), app("app-1")])
    api.disconnect_next(1)

    pages = list(make_lister(kubeconfig, sleeps).pages())

    assert names(pages) == ["app-0", "app-1"]
    assert api.list_calls == 2
    assert len(sleeps) == 1


def test_a_hung_server_times_out_and_is_retried(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps([app("app-0")])
    api.hang_next(1)

    pages = list(make_lister(kubeconfig, sleeps, request_timeout="100ms").pages())

    assert names(pages) == ["app-0"]
    assert api.list_calls == 2


def test_a_server_that_never_answers_makes_the_cluster_unavailable(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.hang_next(ATTEMPTS)

    with pytest.raises(ClusterUnavailable) as raised:
        list(make_lister(kubeconfig, sleeps, request_timeout="100ms").pages())

    assert "timed out" in raised.value.reason
    assert api.list_calls == ATTEMPTS


def test_an_unreachable_server_makes_the_cluster_unavailable(tmp_path: Path, sleeps: list[float]) -> None:
    with FakeKubeAPI() as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
    lister = make_lister(kubeconfig, sleeps)

    with pytest.raises(ClusterUnavailable) as raised:
        list(lister.pages())

    assert raised.value.cluster == "prod-east"
    assert "connection to http://127.0.0.1:" in raised.value.reason
    assert "refused" in raised.value.reason.lower()
    assert len(sleeps) == ATTEMPTS - 1


# -- permanent failures ------------------------------------------------------------------------------


def test_a_tls_failure_is_not_retried(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    https = kubeconfig.with_name("https-kubeconfig")
    https.write_text(kubeconfig.read_text(encoding="utf-8").replace("http://", "https://"), encoding="utf-8")

    with pytest.raises(ClusterUnavailable) as raised:
        list(make_lister(https, sleeps).pages())

    assert raised.value.reason.startswith(f"TLS handshake with {api.url.replace('http://', 'https://')} failed")
    assert "verify_tls" in raised.value.reason
    assert sleeps == []


def test_rejected_credentials_fail_at_once_without_revealing_the_token(
    api: FakeKubeAPI, tmp_path: Path, sleeps: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    api.set_apps([app("app-0")])
    api.require_token("the-right-token")
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token=SECRET_TOKEN)

    with caplog.at_level(logging.DEBUG), pytest.raises(ClusterUnavailable) as raised:
        list(make_lister(kubeconfig, sleeps).pages())

    assert "unauthorized (401)" in raised.value.reason
    assert api.list_calls == 1
    assert sleeps == []
    assert api.requests[0].authorization == f"Bearer {SECRET_TOKEN}"
    for text in (str(raised.value), repr(raised.value), raised.value.reason, caplog.text):
        assert SECRET_TOKEN not in text


def test_the_right_token_is_accepted(api: FakeKubeAPI, tmp_path: Path, sleeps: list[float]) -> None:
    api.set_apps([app("app-0")])
    api.require_token(SECRET_TOKEN)
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", token=SECRET_TOKEN)

    assert names(list(make_lister(kubeconfig, sleeps).pages())) == ["app-0"]


@pytest.mark.parametrize(
    ("status", "namespaces", "expected"),
    [
        (403, [], "forbidden (403): the service account needs list on applications.argoproj.io at cluster scope"),
        (403, ["team-a"], "needs list on applications.argoproj.io in namespace team-a"),
        (404, [], "is Argo CD's Application CRD installed?"),
    ],
)
def test_forbidden_and_not_found_fail_at_once_with_a_helpful_reason(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float], status: int, namespaces: list[str], expected: str
) -> None:
    api.fail_next(1, status=status)

    with pytest.raises(ClusterUnavailable) as raised:
        list(make_lister(kubeconfig, sleeps, namespaces=namespaces).pages())

    assert expected in raised.value.reason
    assert api.list_calls == 1
    assert sleeps == []


def test_a_selector_the_server_rejects_fails_at_once(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    with pytest.raises(ClusterUnavailable) as raised:
        list(make_lister(kubeconfig, sleeps, label_selector="team notin (a)").pages())

    assert "HTTP 400" in raised.value.reason
    assert api.list_calls == 1


def test_cluster_unavailable_keeps_its_fields_through_pickling() -> None:
    error = ClusterUnavailable("prod-east", "forbidden")

    copy = pickle.loads(pickle.dumps(error))

    assert (copy.cluster, copy.reason, str(copy)) == ("prod-east", "forbidden", "forbidden")


# -- raw items ----------------------------------------------------------------------------------------


def test_malformed_items_are_passed_on_raw(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    malformed: list[Any] = ["not-an-object", {"spec": {}}, {"metadata": "oops"}, {"metadata": {"namespace": "x"}}]
    api.set_apps([app("good"), *malformed])

    pages = list(make_lister(kubeconfig, sleeps, page_size=2).pages())

    items = [item for page in pages for item in page]
    assert len(items) == 5
    assert app("good") in items
    for bad in malformed:
        assert bad in items


def test_malformed_items_are_not_repeated_after_a_restart(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps(["junk", {"spec": {}}, app("a"), app("b")])
    api.expire_continue_tokens()

    items = [item for page in make_lister(kubeconfig, sleeps, page_size=2).pages() for item in page]

    assert len(items) == 4


def test_an_item_nested_too_deeply_stands_in_its_page_as_unreadable_and_paging_goes_on(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    deep = EncodedApp.nested(app("deep"), ["spec", "source", "helm", "valuesObject"], 5_000)
    api.set_apps([app("after"), app("before"), deep, app("last")])

    pages = list(make_lister(kubeconfig, sleeps, page_size=3).pages())

    assert [len(page) for page in pages] == [3, 1]
    assert names(pages) == ["after", "before", "deep", "last"]
    unreadable = pages[0][2]
    assert isinstance(unreadable, UnreadableApplication)
    assert unreadable == {"metadata": {"namespace": "argocd", "name": "deep"}}
    assert (
        unreadable.reason
        == "nested 5004 levels deep (deepest under spec.source.helm.valuesObject…): too deep to be read"
    )
    assert pages[0][:2] == [app("after"), app("before")], "the other items are decoded as they were"
    with pytest.raises(MalformedApplication) as raised:
        parse_application(unreadable, "prod-east")
    assert raised.value.app == "argocd/deep" and raised.value.reason == unreadable.reason


def test_decode_page_walks_without_recursion_and_names_what_it_can() -> None:
    deep = "[" * 3_000 + "]" * 3_000
    text = json.dumps({"kind": "ApplicationList", "metadata": {"continue": "t"}, "items": ["@", {"x": 1}, 7]})
    page = decode_page(text.replace('"@"', '{"spec": {"a": ' + deep + "}}").encode())

    assert page["kind"] == "ApplicationList" and page["metadata"] == {"continue": "t"}
    first, second, third = page["items"]
    assert isinstance(first, UnreadableApplication) and first == {}, "no metadata to keep"
    assert first.reason == "nested 3002 levels deep (deepest under spec.a[0][0]…): too deep to be read"
    assert (second, third) == ({"x": 1}, 7)
    escaped = r'{"items": [{"metadata": {"name": "q\"}[", "namespace": "n"}, "s": ' + deep + "}]}"
    (item,) = decode_page(escaped)["items"]
    assert item == {"metadata": {"name": 'q"}[', "namespace": "n"}}, "strings with brackets and escapes are skipped"


@pytest.mark.parametrize(
    "body",
    [
        '{"metadata": ' + "[" * 3_000 + "]" * 3_000 + ', "items": []}',
        '{"items": [' + "[" * 3_000,
        '{"items": [' + "[" * 3_000 + "]" * 3_000 + "}",
    ],
    ids=["list-metadata-too-deep", "truncated", "unbalanced"],
)
def test_decode_page_refuses_what_is_not_a_readable_list(body: str) -> None:
    with pytest.raises(ValueError):
        decode_page(body)


def test_a_page_that_is_not_json_makes_the_cluster_unavailable_with_a_reason(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app("a"), EncodedApp("argocd", "b", b'{"metadata": oops}')])

    with pytest.raises(ClusterUnavailable, match="the API server's answer could not be read: Expecting value"):
        list(make_lister(kubeconfig, sleeps).pages())
    assert sleeps == [], "not retried: the same answer would come back"


# -- client construction ------------------------------------------------------------------------------
# -- client construction ------------------------------------------------------------------------------


def test_each_cluster_gets_its_own_client_and_the_global_default_is_untouched(
    tmp_path: Path, sleeps: list[float]
) -> None:
    default_host = Configuration.get_default().host
    with FakeKubeAPI() as east, FakeKubeAPI() as west:
        east.set_apps([app("east-app")])
        west.set_apps([app("west-app")])
        east_config = east.write_kubeconfig(tmp_path / "east")
        west_config = west.write_kubeconfig(tmp_path / "west")

        east_pages = list(ClusterLister(make_cluster(east_config, name="east"), sleep=sleeps.append).pages())
        west_pages = list(ClusterLister(make_cluster(west_config, name="west"), sleep=sleeps.append).pages())

        assert names(east_pages) == ["east-app"]
        assert names(west_pages) == ["west-app"]
    assert Configuration.get_default().host == default_host


def test_the_configured_context_is_used(api: FakeKubeAPI, tmp_path: Path, sleeps: list[float]) -> None:
    api.set_apps([app("app-0")])
    kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig", context="prod-east-admin")

    client = build_api_client(make_cluster(kubeconfig, context="prod-east-admin"))

    assert client.configuration.host == api.url
    with pytest.raises(ClusterUnavailable) as raised:
        build_api_client(make_cluster(kubeconfig, context="staging"))
    assert "cannot load kubeconfig" in raised.value.reason and "staging" in raised.value.reason


def test_verify_tls_false_turns_verification_off_and_only_then(kubeconfig: Path) -> None:
    assert build_api_client(make_cluster(kubeconfig)).configuration.verify_ssl is True
    assert build_api_client(make_cluster(kubeconfig, verify_tls=False)).configuration.verify_ssl is False


def test_a_missing_kubeconfig_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "kubeconfig"
    lister = ClusterLister(make_cluster(missing))

    with pytest.raises(ClusterUnavailable) as raised:
        list(lister.pages())

    assert raised.value.reason == f"kubeconfig {missing} does not exist"


def test_a_broken_kubeconfig_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [oops\n", encoding="utf-8")

    with pytest.raises(ClusterUnavailable) as raised:
        build_api_client(make_cluster(broken))

    assert raised.value.reason.startswith(f"cannot load kubeconfig {broken}:")


def test_without_a_kubeconfig_the_environment_kubeconfig_is_used(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    api.set_apps([app("app-0")])
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    pages = list(ClusterLister(make_cluster(None), sleep=sleeps.append).pages())

    assert names(pages) == ["app-0"]


def test_without_any_kubeconfig_the_in_cluster_account_is_tried(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)

    with pytest.raises(ClusterUnavailable) as raised:
        build_api_client(make_cluster(None))

    assert raised.value.reason.startswith("cannot load the in-cluster service account:")
    assert "not running in a pod" in raised.value.reason


def test_a_context_without_any_kubeconfig_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    with pytest.raises(ClusterUnavailable) as raised:
        build_api_client(make_cluster(None, context="prod-east"))

    assert "context 'prod-east' is configured but no kubeconfig was found" in raised.value.reason


def test_an_injected_client_is_used_and_left_open(api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]) -> None:
    api.set_apps([app("app-0")])
    client = build_api_client(make_cluster(kubeconfig))
    lister = ClusterLister(make_cluster(None, context="ignored"), api_client=client, sleep=sleeps.append)

    assert names(list(lister.pages())) == ["app-0"]
    assert names(list(lister.pages())) == ["app-0"]
    assert lister.requests == 2


def test_a_stop_during_a_retry_wait_ends_the_listing_as_unavailable_at_once(api: FakeKubeAPI, kubeconfig: Path) -> None:
    """``serve`` on SIGTERM: the wait before the next attempt ends at once, and no attempt follows."""
    stop = StopFlag()
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        stop.set()
        stop.sleep(seconds)

    api.set_apps([app("app-0")])
    api.fail_next(50, status=500)
    lister = ClusterLister(make_cluster(kubeconfig, context="fake"), sleep=sleep)
    with pytest.raises(ClusterUnavailable) as raised:
        list(lister.pages())
    assert raised.value.reason == "the process is stopping: listing left for the next run"
    assert api.list_calls == 1 and len(waits) == 1


def test_the_listing_knows_its_total_from_the_api_servers_count(api: FakeKubeAPI, kubeconfig: Path) -> None:
    api.set_apps([app(f"app-{n}") for n in range(5)])
    lister = make_lister(kubeconfig, [], page_size=2)
    pages = lister.pages()
    assert len(next(pages)) == 2
    assert lister.expected == 5, "the first page's items and its remainingItemCount"
    assert sum(len(page) for page in pages) == 3
    selected = make_lister(kubeconfig, [], page_size=2, label_selector="team=none")
    assert list(selected.pages()) == [] and selected.expected is None, "no count with a label selector"


# -- the page cut apart undecoded ----------------------------------------------------------------------


def go_json(value: Any) -> bytes:
    """JSON as the API server writes it (Go's encoding/json: compact, keys sorted)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def test_a_list_as_the_api_server_writes_it_is_cut_into_its_items_without_decoding() -> None:
    items = [app("a"), app("b", labels={"team": "payments"}), app("c")]
    body = go_json(
        {
            "apiVersion": "argoproj.io/v1alpha1",
            "items": items,
            "kind": "ApplicationList",
            "metadata": {"continue": "t1"},
        }
    )
    cut = cut_list(body)
    assert cut is not None
    pieces, metadata = cut
    assert pieces == [go_json(item) for item in items]
    assert metadata == {"continue": "t1"}
    empty = go_json({"apiVersion": "argoproj.io/v1alpha1", "items": [], "kind": "ApplicationList", "metadata": {}})
    assert cut_list(empty) == ([], {})


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"apiVersion": "argoproj.io/v1alpha1", "kind": "ApplicationList", "metadata": {}, "items": []}),
        json.dumps({"apiVersion": "argoproj.io/v1alpha1", "items": [app("a")], "kind": "ApplicationList"}),
        '{"apiVersion":"argoproj.io/v1alpha1","items":[{"metadata":{"name":"a"}}],"kind":"ApplicationList","metadata":{}}',
        '{"apiVersion":"argoproj.io/v1alpha1","items":[],"kind":"ApplicationList","metadata":{}}trailing',
        "not json at all",
    ],
)
def test_any_other_layout_is_not_cut_but_decoded(body: str) -> None:
    assert cut_list(body.encode()) is None


def test_an_application_manifest_nested_in_an_item_makes_a_piece_that_is_not_json_alone() -> None:
    parent = app("app-of-apps")
    parent["spec"]["source"] = {"helm": {"valuesObject": {"apps": [app("child-1"), app("child-2")]}}}
    body = go_json(
        {"apiVersion": "argoproj.io/v1alpha1", "items": [parent, app("b")], "kind": "ApplicationList", "metadata": {}}
    )
    cut = cut_list(body)
    assert cut is not None
    undecodable = 0
    for piece in cut[0]:
        try:
            json.loads(piece)
        except ValueError:
            undecodable += 1
    assert undecodable >= 1, "the reader of the pieces must be able to tell the cut was wrong"


def test_listed_pages_hand_out_each_item_undecoded_with_its_metadata(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(5)])
    pages = list(make_lister(kubeconfig, sleeps, page_size=2).listed_pages())
    assert [len(page.encoded or []) for page in pages] == [2, 2, 1]
    first = pages[0].encoded
    assert first is not None
    assert [item.metadata["name"] for item in first] == ["app-0", "app-1"]
    assert [json.loads(item.body) for item in first] == pages[0].items() == [app("app-0"), app("app-1")]


def test_listed_pages_come_again_after_a_restart_and_pages_still_yields_each_app_once(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(5)])
    api.expire_continue_tokens(1)
    listed = [
        item["metadata"]["name"]
        for page in make_lister(kubeconfig, sleeps, page_size=2).listed_pages()
        for item in page.items()
    ]
    assert listed == ["app-0", "app-1", "app-0", "app-1", "app-2", "app-3", "app-4"]
    api.expire_continue_tokens(1)
    assert names(list(make_lister(kubeconfig, sleeps, page_size=2).pages())) == [f"app-{i}" for i in range(5)]


def test_the_first_page_of_a_listing_started_again_says_so(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    api.set_apps([app(f"app-{i}") for i in range(5)])
    api.expire_continue_tokens(1)
    pages = list(make_lister(kubeconfig, sleeps, page_size=2).listed_pages())
    assert [(page.restarted, page.count()) for page in pages] == [(False, 2), (True, 2), (False, 2), (False, 1)]


def test_a_page_that_cannot_be_cut_is_decoded_and_still_gives_its_count_token_and_total(
    api: FakeKubeAPI, kubeconfig: Path, sleeps: list[float]
) -> None:
    apps = [app(f"app-{i}") for i in range(5)]
    del apps[0]["apiVersion"]  # the first page is not laid out the way the API server writes Applications
    api.set_apps(apps)
    lister = make_lister(kubeconfig, sleeps, page_size=2)
    pages = list(lister.listed_pages())
    assert [page.encoded is None for page in pages] == [True, False, False]
    assert [page.count() for page in pages] == [2, 2, 1]
    assert [item["metadata"]["name"] for page in pages for item in page.items()] == [f"app-{i}" for i in range(5)]
    assert lister.expected == 5
