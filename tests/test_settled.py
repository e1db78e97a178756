"""The steady-state fast path: an Application unchanged since a settled tick is neither parsed nor planned."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from reconciler import argocd
from reconciler.application import parse_application
from reconciler.argocd import encoded_item
from reconciler.config import ImagesConfig, load_config
from reconciler.images import CommitImages
from reconciler.model import AppKey, Snapshot
from reconciler.planner import PlannerPolicy, plan
from reconciler.settled import (
    PASS_GC_THRESHOLD,
    encoded_digest,
    for_planning,
    settle,
    settled_digest,
    split_page,
    stored_digests,
)
from reconciler.store import open_store
from tests.factories import (
    SIDECAR,
    append_history,
    at,
    fake_sha,
    fake_uid,
    history_entry,
    make_app,
    mark_deleting,
    operation_state,
    redeployed,
    set_health,
    set_reconciled,
    set_summary_images,
    set_sync,
    settled_app,
    ts,
    with_history,
    with_operation,
    with_operation_state,
)
from tests.world import IMAGE_REPO, World

GITOPS, IMAGE = fake_sha("gitops-0"), fake_sha("image-0")


def base() -> dict[str, Any]:
    return settled_app("payments-api", GITOPS, f"{IMAGE_REPO}:{IMAGE}")


def bump_metadata(app: dict[str, Any]) -> dict[str, Any]:
    app = set_reconciled(app, at(90))
    app["metadata"]["resourceVersion"] = "99999999"
    app["metadata"]["generation"] += 7
    return app


CHANGES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "new history entry": lambda app: redeployed(app, 1, fake_sha("gitops-1"), f"{IMAGE_REPO}:{IMAGE}", 30),
    "health": lambda app: set_health(app, "Degraded", at(1)),
    "health transition": lambda app: set_health(app, "Healthy", at(20)),
    "live images": lambda app: set_summary_images(app, [f"{IMAGE_REPO}:{fake_sha('image-1')}"]),
    "failed operation": lambda app: with_operation_state(app, operation_state("Failed", at(40), at(41))),
    "sync requested": lambda app: with_operation(app, fake_sha("gitops-2")),
    "deletion": lambda app: mark_deleting(app, at(50)),
}


def test_the_digest_ignores_refreshes_and_sees_every_change_the_planner_reads() -> None:
    app = base()
    digest = settled_digest(app, "salt")
    assert digest is not None
    assert settled_digest(bump_metadata(app), "salt") == digest, "refreshes move reconciledAt and resourceVersion"
    for change, apply in CHANGES.items():
        assert settled_digest(apply(base()), "salt") != digest, change
    recreated = base()
    recreated["metadata"]["uid"] = "another-uid"
    assert settled_digest(recreated, "salt") != digest
    assert settled_digest(app, "other configuration") != digest


@pytest.mark.parametrize("garbage", [None, [], "app", {"metadata": None}, {"metadata": {}}, {"status": []}])
def test_the_digest_of_garbage_is_none_so_it_is_parsed_and_reported(garbage: Any) -> None:
    assert settled_digest(garbage) is None


@pytest.fixture
def parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Applications the tick parsed."""
    seen: list[str] = []

    def counting(raw: Any, cluster: str) -> Any:
        seen.append(raw["metadata"]["name"])
        return parse_application(raw, cluster)

    monkeypatch.setattr("reconciler.settled.parse_application", counting)
    return seen


def test_a_steady_tick_parses_nothing_and_a_change_is_still_seen(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, parses: list[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        apps = [settled_app(name, gitops[0], f"{IMAGE_REPO}:{images[0]}") for name in ("a", "b", "c")]
        world.set_apps(apps)
        assert world.run() == 0
        assert sorted(parses) == ["a", "b", "c"]

        parses.clear()
        world.set_apps([bump_metadata(app) for app in apps])
        assert world.run() == 0
        assert parses == [], "refreshed but unchanged Applications are not parsed"

        world.set_apps([apps[0], redeployed(apps[1], 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", 30), apps[2]])
        assert world.run() == 0
        assert parses == ["b"]
        assert [p["id"].rsplit(":", 1)[1] for p in world.posts()] == ["h1"]

        parses.clear()
        assert world.run() == 0
        assert parses == ["b"], "after a deployment one full tick settles it again"
        parses.clear()
        assert world.run() == 0
        assert parses == []


def test_changing_the_decision_config_parses_everything_again(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, parses: list[str]
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        world.set_apps([base()])
        assert world.run() == 0
        parses.clear()
        monkeypatch.setenv("DORA__DETECTION__DETECT_IMAGE_ONLY_CHANGES", "false")
        assert world.run() == 0
        assert parses == ["payments-api"]


def test_an_application_listed_again_after_going_missing_is_not_forgotten(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, state_url, monkeypatch) as world:
        world.set_apps([base()])
        assert world.run() == 0
        world.set_apps([])
        assert world.run() == 0
        world.set_apps([base()])
        assert world.run() == 0

        store = open_store(load_config(world.config_path).state)
        try:
            key = AppKey("prod-east", "argocd", "payments-api")
            snapshot = store.load_snapshots([key])[key]
        finally:
            store.close()
        assert snapshot.deleting_since is None, "a stale 'missing since' would drop it after the grace period"
        assert snapshot.settled_digest is not None


def test_the_store_reads_the_settled_digest_without_decoding_the_snapshot(store: Any) -> None:
    from datetime import UTC, datetime

    from reconciler.model import Snapshot
    from reconciler.settled import stored_settled_digest

    key, other = AppKey("prod", "argocd", "settled"), AppKey("prod", "argocd", "busy")
    settled = Snapshot(uid="u1", last_seen=datetime(2026, 1, 1, tzinfo=UTC), settled_digest="0123abcd" * 4)
    busy = Snapshot(uid="u2", last_seen=datetime(2026, 1, 1, tzinfo=UTC), last_history_id=3)
    store.save_snapshots({key: settled, other: busy})

    loaded = store.load_stored([key, other, AppKey("prod", "argocd", "absent")])
    assert set(loaded) == {key, other}
    assert loaded[key].settled_digest == settled.settled_digest
    assert loaded[other].settled_digest is None
    assert loaded[key].snapshot() == settled and loaded[other].snapshot() == busy
    assert stored_settled_digest(settled.to_json()) == settled.settled_digest
    assert stored_settled_digest('{"uid":"x"}') is None


def test_a_run_leaves_nothing_frozen_out_of_the_collectors_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """serve runs pass after pass in one process: what a pass freezes must be handed back to the collector, and
    the collector's thresholds, raised while pages are decoded, restored."""
    import gc

    thresholds = gc.get_threshold()
    during: list[tuple[int, int, int]] = []
    real_split = split_page

    def spying(*args: Any, **kwargs: Any) -> Any:
        during.append(gc.get_threshold())
        return real_split(*args, **kwargs)

    monkeypatch.setattr("reconciler.reconcile.split_page", spying)
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        world.set_apps([base()])
        for _ in range(3):
            assert world.run() == 0
            assert gc.get_freeze_count() == 0
            assert gc.get_threshold() == thresholds
    assert during and all(seen[0] >= PASS_GC_THRESHOLD for seen in during)


def test_runs_of_another_shard_layout_are_kept_out_while_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with World(tmp_path, f"sqlite:///{tmp_path / 'state.db'}", monkeypatch) as world:
        world.set_apps([base()])
        store = open_store(load_config(world.config_path).state)
        try:
            assert store.acquire_shared_lock("layout:prod-east", "layout-2", "shard-0", 60), "a 2-shard run is working"
            assert world.run() == 3, "an unsharded run would work the same Applications"
            assert world.run("--shard", "1/2") == 0, "another shard of the same layout goes ahead"
            assert world.run("--shard", "0/3") == 3
        finally:
            store.close()


# -- the digest sees every change that changes the plan ----------------------------------------------------

T = TypeVar("T")
POLICY = PlannerPolicy(initialized_at=at(-24 * 60), commit_images=CommitImages(ImagesConfig()))
HEALTHS = ["Healthy", "Missing", "Degraded", "Progressing", None]
PHASES = ["Succeeded", "Failed", "Error", "Running"]
"""Phases of an operation; a generated one succeeded as often as not."""
IMAGES = [f"{IMAGE_REPO}:{fake_sha(f'image-{n}')}" for n in range(3)]
"""Three tags of one image repository: live images that differ from the recorded ones are an image change."""


def image_sets() -> st.SearchStrategy[list[str]]:
    return st.sampled_from([[], [IMAGES[0]], [IMAGES[1]], [IMAGES[2]], [IMAGES[1], SIDECAR]])


def times(low: int, high: int) -> st.SearchStrategy[datetime]:
    return st.integers(low, high).map(lambda minute: at(minute))


@st.composite
def operations(draw: st.DrawFn, after: int) -> dict[str, Any]:
    """An operation state started after minute ``after``: any phase, maybe a dry run or a partial sync."""
    started = draw(times(after + 1, after + 20))
    phase = draw(st.sampled_from(["Succeeded", "Succeeded", "Succeeded", *PHASES[1:]]))
    finished: datetime | None = started + timedelta(seconds=draw(st.integers(1, 300)))
    if phase == "Running" and draw(st.booleans()):
        finished = None
    return operation_state(
        phase,
        started,
        finished,
        revision=fake_sha(draw(st.sampled_from(["gitops-x", "gitops-y"]))),
        images=draw(st.none() | image_sets()),
        retry_count=draw(st.integers(0, 3)),
        dry_run=draw(st.booleans()),
        resources=[{"kind": "Deployment", "name": "app"}] if draw(st.booleans()) else None,
    )


@st.composite
def applications(draw: st.DrawFn) -> dict[str, Any]:
    """A well-formed Application in any state: history, the operation that produced it or a later one."""
    count = draw(st.integers(0, 2))
    entries = [history_entry(n, fake_sha(f"gitops-{n}"), at(10 * n)) for n in range(count)]
    kind = draw(st.sampled_from(["none", "producer", "later", "later"]))
    state: dict[str, Any] | None = None
    if kind == "producer" and entries:
        newest = entries[-1]
        images = draw(st.none() | image_sets())
        state = operation_state(
            "Succeeded", newest["deployStartedAt"], newest["deployedAt"], revision=newest["revision"], images=images
        )
    elif kind == "later":
        state = draw(operations(10 * count))
    app = make_app(
        "payments-api",
        history=entries,
        operation_state=state,
        sync_status=draw(st.sampled_from(["Synced", "OutOfSync"])),
        health_status=draw(st.sampled_from(HEALTHS)),
        health_transition_at=draw(st.none() | times(-30, 60)),
        summary_images=draw(image_sets()),
    )
    return with_operation(app, fake_sha("gitops-z")) if draw(st.integers(0, 3)) == 0 else app


class Draw(Protocol):
    def __call__(self, strategy: st.SearchStrategy[T], /) -> T: ...


def settled_snapshot(app: dict[str, Any]) -> Snapshot | None:
    """What the store holds once ticks have delivered everything the app had to give and one left nothing to
    decide; ``None`` when it never settles (a stale status, a verdict pending past the ticks tried)."""
    observation = parse_application(app, "prod-east")
    snapshot: Snapshot | None = None
    for tick in range(4):
        result = plan(observation, snapshot, at(100 + 70 * tick), POLICY)
        if result.deferred:
            return None
        if not result.deployments and result.snapshot.pending is None:
            return settle(result.snapshot, settled_digest(app))
        snapshot = result.snapshot
    return None


def _flip_operation(app: dict[str, Any], field: str, draw: Draw) -> dict[str, Any]:
    new = copy.deepcopy(app)
    state = new["status"].get("operationState")
    if state is None:
        return new
    sync = state["operation"]["sync"]
    if field == "operation phase":
        state["phase"] = draw(st.sampled_from([phase for phase in PHASES if phase != state["phase"]]))
    elif field == "operation finished":
        if state.pop("finishedAt", None) is None:
            state["finishedAt"] = ts(draw(times(30, 60)))
    elif field == "operation started":
        state["startedAt"] = ts(draw(times(-5, 60)))
    elif field == "operation dry run":
        sync["dryRun"] = not sync.get("dryRun")
    elif field == "operation partial":
        if sync.pop("resources", None) is None:
            sync["resources"] = [{"kind": "Deployment", "name": "app"}]
    else:
        state["message"] = "something else entirely"
        state["retryCount"] = 4
        state["syncResult"] = {"revision": fake_sha("other"), "resources": [{"kind": "Deployment", "images": IMAGES}]}
    return new


def _change_history(app: dict[str, Any], field: str, draw: Draw) -> dict[str, Any]:
    history = list(app["status"].get("history") or [])
    if field == "new history entry":
        number = history[-1]["id"] + 1 if history else 0
        return append_history(app, history_entry(number, fake_sha(f"gitops-{number}"), draw(times(40, 60))))
    new = copy.deepcopy(app)
    if not history:
        return new
    if field == "oldest entry truncated":
        return with_history(app, history[1:])
    newest = new["status"]["history"][-1]
    if field == "newest entry deployed":
        newest["deployedAt"] = ts(draw(times(-5, 60)))
    elif field == "newest entry started":
        newest["deployStartedAt"] = ts(draw(times(-5, 60)))
    else:
        newest["revision"] = fake_sha("rewritten")
        newest["source"]["targetRevision"] = "rewritten"
    return new


def _change_status(app: dict[str, Any], field: str, draw: Draw) -> dict[str, Any]:
    new = copy.deepcopy(app)
    health = app["status"].get("health") or {}
    if field == "health status":
        return set_health(
            app,
            draw(st.sampled_from([h for h in HEALTHS if h != health.get("status")])),
            health.get("lastTransitionTime"),
        )
    if field == "health transition" and health:
        return set_health(app, health.get("status"), draw(st.none() | times(-30, 90)))
    if field == "sync":
        return set_sync(app, "OutOfSync" if app["status"]["sync"]["status"] == "Synced" else "Synced")
    if field == "live images":
        return set_summary_images(app, draw(image_sets()))
    if field == "new operation":
        return with_operation_state(app, draw(operations(40)))
    if field == "operation requested or gone":
        return with_operation(app, fake_sha("gitops-requested")) if "operation" not in app else _without_request(app)
    if field == "refreshed":
        new = set_reconciled(app, at(draw(st.integers(200, 400))))
        new["metadata"]["resourceVersion"] = "99999999"
    elif field == "deleting":
        new = mark_deleting(app, at(300))
    elif field == "recreated":
        new["metadata"]["uid"] = fake_uid("another payments-api")
    else:
        new["metadata"]["labels"] = {"app.kubernetes.io/part-of": "payments"}
        new["spec"]["source"]["targetRevision"] = "release-2"
    return new


def _without_request(app: dict[str, Any]) -> dict[str, Any]:
    new = copy.deepcopy(app)
    new.pop("operation")
    return new


OPERATION_FIELDS = [
    "operation phase",
    "operation finished",
    "operation started",
    "operation dry run",
    "operation partial",
    "operation message and results",
]
HISTORY_FIELDS = [
    "new history entry",
    "oldest entry truncated",
    "newest entry deployed",
    "newest entry started",
    "recorded entry rewritten",
]
STATUS_FIELDS = [
    "health status",
    "health transition",
    "sync",
    "live images",
    "new operation",
    "operation requested or gone",
    "refreshed",
    "deleting",
    "recreated",
    "labels and spec",
]
FIELDS = [*OPERATION_FIELDS, *HISTORY_FIELDS, *STATUS_FIELDS]


def change(app: dict[str, Any], field: str, draw: Draw) -> dict[str, Any]:
    """``app`` with one field changed, as Argo CD (or a user) can change it; unchanged when it has no such field."""
    if field in OPERATION_FIELDS:
        return _flip_operation(app, field, draw)
    if field in HISTORY_FIELDS:
        return _change_history(app, field, draw)
    return _change_status(app, field, draw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.data())
def test_property_a_change_that_changes_the_plan_changes_the_digest(data: st.DataObject) -> None:
    """The fast path skips an Application whose digest (of the fields the planner reads, or of its JSON) equals
    the stored one, as if its plan were empty and its snapshot unchanged: that must be what planning it would
    decide. Changes add up between settled ticks, so
    each field is changed alone and then a few together."""
    app = data.draw(applications(), "app")
    stored = settled_snapshot(app)
    assume(stored is not None)
    assert stored is not None
    now = at(500)
    before = plan(parse_application(app, "prod-east"), for_planning(stored), now, POLICY)
    combined = data.draw(st.lists(st.sampled_from(FIELDS), min_size=2, max_size=4), "fields changed together")
    for fields in [*([field] for field in FIELDS), combined]:
        changed = app
        for field in fields:
            changed = change(changed, field, data.draw)
        after = plan(parse_application(changed, "prod-east"), for_planning(stored), now, POLICY)
        if (after.deployments, after.deferred, after.snapshot) != (
            before.deployments,
            before.deferred,
            before.snapshot,
        ):
            assert settled_digest(changed) != stored.settled_digest, f"{fields}: the plan changed, not the digest"
            assert encoded_digest_of(changed) != encoded_digest_of(app), (
                f"{fields}: the plan changed, not the digest of the Application's JSON"
            )


# -- the encoded digest: unchanged Applications are not even decoded ----------------------------------------


def go_json(value: Any) -> bytes:
    """An Application as the API server writes it (Go's encoding/json: compact, keys sorted)."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def managed(app: dict[str, Any], minute: float = 1) -> dict[str, Any]:
    """``app`` with the managed fields entry of Argo CD's controller, written at ``minute``."""
    app = copy.deepcopy(app)
    app["metadata"]["managedFields"] = [
        {"manager": "argocd-application-controller", "operation": "Update", "time": ts(at(minute))}
    ]
    return app


def encoded_digest_of(app: Any, salt: str = "") -> str:
    """The encoded digest of ``app`` as the API server writes it, as the listing computes it."""
    item = encoded_item(go_json(app))
    assert item.metadata is not None
    return encoded_digest(item.body, salt, item.metadata_end)


def refreshed(app: dict[str, Any]) -> dict[str, Any]:
    """What Argo CD changes on every refresh of an idle Application, and nothing else."""
    return managed(bump_metadata(app), 91)


def test_the_encoded_digest_ignores_refreshes_and_sees_any_other_change() -> None:
    app = managed(base())
    digest = encoded_digest_of(app, "salt")
    assert encoded_digest_of(refreshed(app), "salt") == digest
    for change, apply in CHANGES.items():
        assert encoded_digest_of(apply(copy.deepcopy(app)), "salt") != digest, change
    labelled = copy.deepcopy(app)
    labelled["metadata"]["labels"] = {"team": "payments"}
    assert encoded_digest_of(labelled, "salt") != digest, "any change the planner does not read too"
    assert encoded_digest_of(app, "other configuration") != digest
    body = go_json(app)
    assert encoded_digest(body, "salt") == digest, "the same without knowing where the metadata ends"
    elsewhere = body.replace(b'"spec":{', b'"spec":{"reconciledAt":"2026-01-01T00:00:00Z",', 1)
    assert encoded_digest_of(json.loads(elsewhere), "salt") != encoded_digest_of(
        json.loads(elsewhere.replace(b"2026-01-01", b"2027-01-01")), "salt"
    ), "only status.reconciledAt is left out"


class Decodes:
    """Counts what a tick decodes: single Applications, whole pages, and snapshot writes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.items = 0
        self.pages = 0
        self.writes = 0
        real_loads, real_decode_page = json.loads, argocd.decode_page
        counter = self

        class CountingJson:
            dumps = staticmethod(json.dumps)

            @staticmethod
            def loads(text: Any) -> Any:
                counter.items += 1
                return real_loads(text)

        def decode_page(body: bytes | str) -> Any:
            self.pages += 1
            return real_decode_page(body)

        real_open = open_store

        def counting_store(config: Any) -> Any:
            store = real_open(config)
            real_save = store.save_snapshots

            def save_snapshots(snapshots: Any) -> None:
                counter.writes += len(snapshots)
                real_save(snapshots)

            store.save_snapshots = save_snapshots  # type: ignore[method-assign]
            return store

        monkeypatch.setattr("reconciler.settled.json", CountingJson)
        monkeypatch.setattr("reconciler.argocd.decode_page", decode_page)
        monkeypatch.setattr("reconciler.runtime.open_store", counting_store)

    def clear(self) -> None:
        self.items = self.pages = self.writes = 0


def test_a_quiet_tick_decodes_no_application_and_a_change_decodes_only_its_own(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, parses: list[str]
) -> None:
    decodes = Decodes(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        apps = [managed(settled_app(name, gitops[0], f"{IMAGE_REPO}:{images[0]}")) for name in ("a", "b", "c")]
        world.set_apps(apps)
        assert world.run() == 0
        decodes.clear()
        parses.clear()

        world.set_apps([refreshed(app) for app in apps])
        assert world.run() == 0
        assert (decodes.items, decodes.pages, decodes.writes, parses) == (0, 0, 0, [])

        world.set_apps([apps[0], redeployed(apps[1], 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", 30), apps[2]])
        assert world.run() == 0
        assert (decodes.items, decodes.pages, parses) == (1, 0, ["b"])
        assert [p["id"].rsplit(":", 1)[1] for p in world.posts()] == ["h1"]


def test_a_change_the_planner_does_not_read_is_decoded_once_then_recognised_again(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch, parses: list[str]
) -> None:
    decodes = Decodes(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        app = base()
        world.set_apps([app])
        assert world.run() == 0
        decodes.clear()
        parses.clear()
        labelled = copy.deepcopy(app)
        labelled["metadata"]["labels"] = {"team": "payments"}
        world.set_apps([labelled])
        assert world.run() == 0
        assert (decodes.items, decodes.writes, parses) == (1, 1, []), "decoded, not parsed; the new JSON recorded"
        decodes.clear()
        assert world.run() == 0
        assert (decodes.items, decodes.pages, decodes.writes) == (0, 0, 0)
        assert world.posts() == []


def test_an_application_manifest_inside_an_application_does_not_fool_the_fast_path(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Helm value holding Application manifests makes the page cut wrongly: the page is then decoded whole, so
    the nested manifests are never taken for Applications and a change of the parent is still seen."""
    decodes = Decodes(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        gitops = world.github.add_commits("acme/gitops", 2)
        images = world.github.add_commits("acme/payments-api", 2)
        parent = settled_app("app-of-apps", gitops[0], f"{IMAGE_REPO}:{images[0]}")
        children = [settled_app(f"child-{i}", gitops[0], f"{IMAGE_REPO}:{images[0]}") for i in range(3)]
        parent["spec"]["source"]["helm"] = {"valuesObject": {"applications": children}}
        world.set_apps([parent, settled_app("z", gitops[0], f"{IMAGE_REPO}:{images[0]}")])
        assert world.run() == 0
        assert decodes.pages >= 1
        assert world.run() == 0
        world.set_apps(
            [
                redeployed(parent, 1, gitops[1], f"{IMAGE_REPO}:{images[1]}", 30),
                settled_app("z", gitops[0], f"{IMAGE_REPO}:{images[0]}"),
            ]
        )
        assert world.run() == 0
        posted = [p["id"] for p in world.posts()]
        assert len(posted) == 1 and "app-of-apps" in posted[0], posted
        store = open_store(load_config(world.config_path).state)
        try:
            keys = {key.name for key in store.snapshot_keys("prod-east")}
        finally:
            store.close()
        assert keys == {"app-of-apps", "z"}


def test_snapshots_settled_before_the_encoded_digest_get_it_with_one_write(
    tmp_path: Path, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    decodes = Decodes(monkeypatch)
    with World(tmp_path, state_url, monkeypatch) as world:
        world.set_apps([base()])
        assert world.run() == 0
        store = open_store(load_config(world.config_path).state)
        try:
            key = AppKey("prod-east", "argocd", "payments-api")
            snapshot = store.load_snapshots([key])[key]
            settled, encoded = stored_digests(snapshot.settled_digest)
            assert settled is not None and encoded is not None
            store.save_snapshots({key: snapshot.evolve(settled_digest=settled)})
        finally:
            store.close()
        decodes.clear()
        assert world.run() == 0
        assert (decodes.items, decodes.writes) == (1, 1)
        decodes.clear()
        assert world.run() == 0
        assert (decodes.items, decodes.writes) == (0, 0)
