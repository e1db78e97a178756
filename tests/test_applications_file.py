"""Applications read from a file (``clusters[].applications_file``, ``--applications-file``): the output of
``kubectl get applications.argoproj.io -A -o json`` or ``-o yaml``, listed and selected as the API server lists
them, and reconciled exactly like a live cluster."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.application import MalformedApplication, UnreadableApplication, parse_application
from reconciler.argocd import ClusterLister, ClusterUnavailable, FileLister, LabelSelector, open_lister
from reconciler.config import ClusterConfig, ConfigError, load_config
from tests.factories import at
from tests.fakes.kube_api import EncodedApp, FakeKubeAPI
from tests.scenarios import deployed_app, new_deployment
from tests.world import World, log_lines


def app(name: str, namespace: str = "argocd", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Application",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{namespace}-{name}", "labels": labels or {}},
        "spec": {"destination": {"server": "https://kubernetes.default.svc", "namespace": name}},
        "status": {"sync": {"status": "Synced"}, "health": {"status": "Healthy"}},
    }


def kubectl_list(items: list[Any], kind: str = "List") -> dict[str, Any]:
    """What ``kubectl get applications.argoproj.io -A -o json`` writes (``ApplicationList``: the API server)."""
    return {"apiVersion": "v1", "items": items, "kind": kind, "metadata": {"resourceVersion": ""}}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, indent=4, sort_keys=True))
    return path


def file_cluster(path: Path, **overrides: Any) -> ClusterConfig:
    return ClusterConfig.model_validate({"name": "demo", "applications_file": str(path), **overrides})


def names(pages: list[list[dict[str, Any]]]) -> list[str]:
    return [item["metadata"]["name"] for page in pages for item in page]


# -- formats -----------------------------------------------------------------------------------------


def test_a_kubectl_export_is_listed_in_pages_of_page_size_as_it_was_written(tmp_path: Path) -> None:
    apps = [app(f"app-{i}", namespace="argocd" if i % 2 else "team-a") for i in range(5)]
    path = write_json(tmp_path / "apps.json", kubectl_list(apps))

    lister = open_lister(file_cluster(path, page_size=2))
    pages = list(lister.pages())

    assert isinstance(lister, FileLister) and lister.name == "demo"
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [item for page in pages for item in page] == apps


def test_the_reconciler_reads_the_same_pages_decoded_with_the_total_known(tmp_path: Path) -> None:
    apps = [app(f"app-{i}") for i in range(5)]
    lister = FileLister(file_cluster(write_json(tmp_path / "apps.json", kubectl_list(apps)), page_size=2))
    listed = list(lister.listed_pages())
    assert [page.items() for page in listed] == [apps[:2], apps[2:4], apps[4:]]
    assert [(page.encoded, page.count(), page.restarted) for page in listed] == [(None, 2, False)] * 2 + [
        (None, 1, False)
    ]
    assert lister.expected == 5


def test_an_api_server_application_list_a_json_array_and_one_application_are_read_too(tmp_path: Path) -> None:
    apps = [app("a"), app("b")]
    for data in (kubectl_list(apps, kind="ApplicationList"), apps):
        assert names(list(FileLister(file_cluster(write_json(tmp_path / "apps.json", data))).pages())) == ["a", "b"]
    one = write_json(tmp_path / "one.json", app("single"))
    assert names(list(FileLister(file_cluster(one)).pages())) == ["single"]


def test_a_yaml_export_keeps_timestamps_as_the_text_argo_cd_wrote(tmp_path: Path) -> None:
    """``kubectl -o yaml`` quotes timestamps; a hand-edited file may not, and YAML would read them as dates."""
    path = tmp_path / "apps.yaml"
    path.write_text(
        "apiVersion: v1\nkind: List\nitems:\n"
        "- apiVersion: argoproj.io/v1alpha1\n  kind: Application\n"
        "  metadata: {name: payments-api, namespace: argocd, uid: u-1, creationTimestamp: 2025-03-11T09:14:22Z}\n"
        "  status:\n    reconciledAt: 2025-06-03T12:58:40Z\n    history:\n"
        "    - {id: 5, revision: '0123456789abcdef0123456789abcdef01234567', deployedAt: 2025-06-03T09:00:12Z}\n"
        "---\n"
        "apiVersion: argoproj.io/v1alpha1\nkind: Application\nmetadata: {name: second, namespace: argocd}\n"
    )

    (first, second) = [item for page in FileLister(file_cluster(path)).pages() for item in page]

    assert first["metadata"]["creationTimestamp"] == "2025-03-11T09:14:22Z"
    assert first["status"]["history"][0]["deployedAt"] == "2025-06-03T09:00:12Z"
    assert parse_application(first, "demo").history[0].id == 5
    assert second["metadata"]["name"] == "second", "several YAML documents are read one after the other"


def test_items_that_are_not_applications_are_left_out_and_duplicates_listed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    project = {"apiVersion": "argoproj.io/v1alpha1", "kind": "AppProject", "metadata": {"name": "default"}}
    changed = app("a")
    changed["status"]["health"]["status"] = "Degraded"
    path = write_json(tmp_path / "apps.json", kubectl_list([app("a"), project, app("b"), changed]))

    with caplog.at_level(logging.WARNING):
        items = [item for page in FileLister(file_cluster(path)).pages() for item in page]

    assert items == [app("a"), app("b")], "the first of each Application"
    warnings = [record.getMessage() for record in caplog.records]
    assert any("not Applications" in message for message in warnings)
    assert any("more than once" in message for message in warnings)


# -- selection, as the API server does it ------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [
        {},
        {"namespaces": ["team-a"]},
        {"namespaces": ["team-b", "argocd"]},
        {"label_selector": "team=payments"},
        {"label_selector": "team=payments,tier=prod"},
        {"namespaces": ["argocd"], "label_selector": "tier=prod"},
    ],
)
def test_namespaces_and_the_label_selector_select_what_the_api_server_would_list(
    tmp_path: Path, selection: dict[str, Any]
) -> None:
    apps = [
        app("payments", "argocd", {"team": "payments", "tier": "prod"}),
        app("payments-dev", "team-a", {"team": "payments", "tier": "dev"}),
        app("search", "team-b", {"team": "search", "tier": "prod"}),
        app("ledger", "argocd", {"tier": "prod"}),
        app("no-labels", "team-a"),
    ]
    path = write_json(tmp_path / "apps.json", kubectl_list(apps))
    with FakeKubeAPI() as api:
        api.set_apps(apps)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        live = ClusterConfig.model_validate({"name": "demo", "kubeconfig": str(kubeconfig), **selection})
        listed = names(list(ClusterLister(live).pages()))

    from_file = names(list(FileLister(file_cluster(path, **selection)).pages()))

    assert sorted(from_file) == sorted(listed)
    assert from_file, "every case selects something"


@pytest.mark.parametrize(
    ("selector", "selected"),
    [
        ("", ["payments", "payments-dev", "search", "bare"]),
        ("team==payments", ["payments", "payments-dev"]),
        ("team!=payments", ["search", "bare"]),
        ("team in (payments, search),tier notin (dev)", ["payments", "search"]),
        ("tier", ["payments", "payments-dev", "search"]),
        ("!tier", ["bare"]),
        ("  team = search  ", ["search"]),
        ("shard>1", ["search"]),
        ("shard<2", ["payments", "payments-dev"]),
        ("tier=", []),
    ],
)
def test_label_selectors_hold_as_kubernetes_reads_them(selector: str, selected: list[str]) -> None:
    labels = {
        "payments": {"team": "payments", "tier": "prod", "shard": "0"},
        "payments-dev": {"team": "payments", "tier": "dev", "shard": "1"},
        "search": {"team": "search", "tier": "prod", "shard": "2"},
        "bare": {},
    }
    parsed = LabelSelector.parse(selector)
    assert [name for name, values in labels.items() if parsed.matches(values)] == selected


@pytest.mark.parametrize("selector", ["=x", "team in payments", "a,,b", "shard>x", "team=(x)"])
def test_a_label_selector_the_file_lister_cannot_read_makes_the_cluster_unavailable(
    tmp_path: Path, selector: str
) -> None:
    path = write_json(tmp_path / "apps.json", kubectl_list([app("a")]))
    with pytest.raises(ClusterUnavailable) as caught:
        list(FileLister(file_cluster(path, label_selector=selector)).pages())
    assert caught.value.reason.startswith(f"label_selector {selector!r}: ")


# -- bad items and bad files ---------------------------------------------------------------------------


def test_an_item_too_deep_to_decode_stands_in_as_unreadable_and_the_others_are_read(tmp_path: Path) -> None:
    deep = EncodedApp.nested(app("deep"), ["spec", "source", "helm", "valuesObject"], 5_000)
    text = json.dumps(kubectl_list([app("before"), "@", app("after")]))
    path = tmp_path / "apps.json"
    path.write_text(text.replace('"@"', deep.body.decode()))

    items = [item for page in FileLister(file_cluster(path, namespaces=["argocd"])).pages() for item in page]
    array = tmp_path / "items.json"
    array.write_text(json.dumps([app("before"), "@", app("after")]).replace('"@"', deep.body.decode()))
    assert [type(item) for page in FileLister(file_cluster(array)).pages() for item in page] == [
        dict,
        UnreadableApplication,
        dict,
    ], "a JSON array of Applications too"

    assert items[0] == app("before") and items[2] == app("after")
    unreadable = items[1]
    assert isinstance(unreadable, UnreadableApplication)
    with pytest.raises(MalformedApplication) as caught:
        parse_application(unreadable, "demo")
    assert caught.value.app == "argocd/deep"
    assert "too deep to be read" in caught.value.reason


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "cannot read it: No such file or directory"),
        (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
        (b'{"kind": "List", "items": [', "not valid JSON: "),
        (b"kind: List\nitems: [\n", "not valid YAML: "),
        (b'{"kind": "List", "items": {"a": 1}}', "its List has no items array"),
        (b'{"kind": "PodList", "items": []}', "it holds a PodList, not Applications"),
        (b"just text\n", "not a list of Applications"),
        (b'{"metadata": {}}', "not a list of Applications"),
    ],
)
def test_a_file_that_is_not_a_list_of_applications_makes_the_cluster_unavailable_with_a_reason(
    tmp_path: Path, content: bytes | None, reason: str
) -> None:
    path = tmp_path / "apps.json"
    if content is not None:
        path.write_bytes(content)

    with pytest.raises(ClusterUnavailable) as caught:
        list(FileLister(file_cluster(path)).pages())

    assert caught.value.cluster == "demo"
    assert caught.value.reason.startswith(f"Applications file {path}: {reason}")


def test_the_config_takes_either_a_file_or_a_kubeconfig_and_names_the_key(tmp_path: Path) -> None:
    def problems(cluster: dict[str, Any]) -> list[str]:
        path = tmp_path / "config.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "clusters": [cluster],
                    "devlake": {"url": "https://d.example", "connections": [{"id": 1, "api_key_env": "K"}]},
                }
            )
        )
        with pytest.raises(ConfigError) as caught:
            load_config(path, {})
        return caught.value.problems

    assert problems({"name": "demo", "applications_file": "a.json", "kubeconfig": "k", "context": "c"}) == [
        "clusters[0]: applications_file reads the Applications from a file: leave kubeconfig and context out"
    ]
    assert problems({"name": "demo", "applications_file": ""}) == [
        "clusters[0].applications_file: String should have at least 1 character"
    ]


# -- the whole job on a file ---------------------------------------------------------------------------


def test_a_file_cluster_is_reconciled_exactly_like_the_live_cluster_it_was_exported_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Baseline, then a new deployment and a malformed Application: the same DevLake records either way."""

    def scenario(root: Path, from_file: bool) -> list[dict[str, Any]]:
        root.mkdir()
        clusters = [{"name": "prod-east", "applications_file": "apps.json"}] if from_file else None
        with World(
            root, f"sqlite:///{root / 'state.db'}", monkeypatch, config={"clusters": clusters} if clusters else None
        ) as world:
            gitops = world.github.add_commits("acme/gitops", 2, parent=None)
            images = world.github.add_commits("acme/payments-api", 2, parent=None)
            baseline = deployed_app(world, gitops[0], images[0])
            malformed = {
                "apiVersion": "argoproj.io/v1alpha1",
                "kind": "Application",
                "metadata": {"name": "x", "namespace": "argocd"},
                "status": {"history": "oops"},
            }

            def publish(apps: list[dict[str, Any]]) -> None:
                world.set_apps(apps)
                write_json(root / "apps.json", kubectl_list(apps))

            publish([baseline])
            assert world.run() == 0
            publish([new_deployment(baseline, 1, gitops[1], images[1], minute=30), malformed])
            assert world.run() == 0
            assert world.run() == 0, "and a quiet run after it"
            return world.posts()

    live = scenario(tmp_path / "live", from_file=False)
    exported = scenario(tmp_path / "file", from_file=True)

    assert len(live) == 1
    assert exported == live


def test_a_backfill_from_a_dump_catches_up_history_the_cluster_has_lost_and_moves_nothing_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The reconciler was down while h1, h2 and h3 were deployed; the cluster keeps only the newest two
    (``revisionHistoryLimit: 2``), so h1 is gone from it. An export taken after h2 still has it."""
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 4)
        images = world.github.add_commits("acme/payments-api", 4)
        app0 = deployed_app(world, gitops[0], images[0])
        world.set_apps([app0])
        assert world.run() == 0, "baseline at h0"
        app2 = new_deployment(new_deployment(app0, 1, gitops[1], images[1], minute=30), 2, gitops[2], images[2], 60)
        write_json(tmp_path / "dump.json", kubectl_list([app2]))
        live = new_deployment(app2, 3, gitops[3], images[3], minute=90)
        live["status"]["history"] = live["status"]["history"][-2:]
        world.set_apps([live])
        assert world.run() == 0
        assert [p["id"].rsplit(":", 1)[1] for p in world.posts()] == ["h2", "h3"], "h1 is lost to the cluster"

        since = at(20).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert world.run("--since", since, "--applications-file", "dump.json", command="backfill") == 0

        posts = world.posts()
        assert [p["id"].rsplit(":", 1)[1] for p in posts] == ["h2", "h3", "h1"], "h1 caught up; h2 not sent again"
        assert posts[2]["id"].startswith("argocd:prod-east:argocd:payments-api:"), "the cluster's own ids"
        assert posts[2]["result"] == "SUCCESS"
        assert world.run() == 0
        assert len(world.posts()) == 3, "the live cluster's next run finds its snapshot where it was"

        capsys.readouterr()
        assert world.run("--applications-file", "dump.json", "argocd/payments-api", command="explain") == 0
        out = capsys.readouterr().out
        assert "Application argocd/payments-api in cluster prod-east" in out
        assert "history 1:" in out and "history 3:" not in out, "explain reads the dump"


def test_applications_file_needs_one_cluster_to_stand_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clusters = [
        {"name": "prod-east", "applications_file": "a.json"},
        {"name": "prod-west", "applications_file": "b.json"},
    ]
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch, config={"clusters": clusters}) as world:
        write_json(tmp_path / "dump.json", kubectl_list([app("a")]))
        assert world.run("--applications-file", "dump.json", command="backfill") == 2
        assert "say which with --cluster NAME (configured: prod-east, prod-west)" in capsys.readouterr().err
        assert world.run("--applications-file", "dump.json", "--cluster", "nope", command="backfill") == 2
        assert "unknown cluster(s): nope" in capsys.readouterr().err
        assert (
            world.run("--dry-run", "--applications-file", "dump.json", "--cluster", "prod-west", command="backfill")
            == 0
        )


def test_check_reads_the_file_and_says_how_many_applications_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clusters = [
        {"name": "prod-east", "applications_file": "apps.json", "namespaces": ["argocd"]},
        {"name": "prod-west", "applications_file": "missing.json"},
    ]
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch, config={"clusters": clusters}) as world:
        broken = {
            "apiVersion": "argoproj.io/v1alpha1",
            "kind": "Application",
            "metadata": {"name": "x", "namespace": "argocd"},
            "spec": "oops",
        }
        write_json(tmp_path / "apps.json", kubectl_list([app("a"), app("b", "team-a"), broken]))

        assert world.run(command="check") == 2
        lines = {line.split(":", 1)[0]: line for line in capsys.readouterr().out.splitlines()}

    assert lines["applications file prod-east"] == (
        "applications file prod-east: ok (apps.json: 3 Application(s), 2 selected by namespaces and label_selector, "
        "1 malformed, skipped by every run (explain names why))"
    )
    assert lines["applications file prod-west"] == (
        "applications file prod-west: FAILED (Applications file missing.json: cannot read it: "
        "No such file or directory)"
    )
    assert "kubernetes prod-east" not in lines


def test_a_run_on_an_unreadable_file_fails_that_cluster_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clusters = [
        {"name": "prod-east", "applications_file": "apps.json"},
        {"name": "prod-west", "applications_file": "gone.json"},
    ]
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch, config={"clusters": clusters}) as world:
        write_json(tmp_path / "apps.json", kubectl_list([app("a"), app("b")]))
        capsys.readouterr()
        assert world.run() == 1
        summary = log_lines(capsys.readouterr().err)[-1]["summary"]
    assert summary["apps_listed"] == 2
    assert summary["errors"] == [
        {
            "cause": "cluster prod-west: Applications file gone.json: cannot read it: No such file or directory",
            "count": 1,
        }
    ]
