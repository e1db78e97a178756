"""The planner's rules (``docs/design.md`` §3), one test per case, on Application dicts built like the real ones."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.application import parse_application
from reconciler.config import ImagesConfig
from reconciler.images import CommitImages
from reconciler.model import (
    RECENT_ENTRIES_KEPT,
    AppObservation,
    Deployment,
    DeploymentClass,
    DeploymentKind,
    PendingVerdict,
    Result,
    Snapshot,
    format_time,
)
from reconciler.planner import (
    CLOCK_SKEW_ALLOWANCE,
    Plan,
    PlannerPolicy,
    initialization_cutoff,
    newest_argocd_time,
    plan,
)
from tests.factories import (
    OMIT,
    append_history,
    at,
    fake_sha,
    fake_uid,
    git_source,
    helm_source,
    history_entry,
    make_app,
    mark_deleting,
    operation_state,
    set_health,
    set_reconciled,
    set_summary_images,
    set_sync,
    values_source,
    with_history,
    with_operation,
    with_operation_state,
)

IMAGE = "quay.io/acme/payments-api"
INIT = at(-24 * 60)
"""The cluster was initialised a day before T0."""

_HEX = re.compile(r"(?=.*[a-f])[0-9a-f]{7,40}")


def commit_images(refs: Sequence[str]) -> Mapping[str, str]:
    """A tiny stand-in for ``reconciler.images.commit_images``: ``repo:<hex tag>`` -> ``{repo: tag}``."""
    found: dict[str, str] = {}
    for ref in refs:
        repository, _, tag = ref.rpartition(":")
        if repository and "/" not in tag and _HEX.fullmatch(tag):
            found[repository] = min(tag, found.get(repository, tag))
    return found


def policy(**changes: Any) -> PlannerPolicy:
    base = PlannerPolicy(initialized_at=INIT, commit_images=commit_images)
    return dataclasses.replace(base, **changes)


def observe(app: Mapping[str, Any]) -> AppObservation:
    return parse_application(app, cluster="prod")


def tick(app: Mapping[str, Any], snapshot: Snapshot | None, now: datetime, **changes: Any) -> Plan:
    return plan(observe(app), snapshot, now, policy(**changes))


def sha(n: int | str) -> str:
    return fake_sha(f"commit-{n}")


def image(n: int | str) -> str:
    return f"{IMAGE}:{sha(n)[:12]}"


def entry(id: int, rev: int | str, minute: float, **kwargs: Any) -> dict[str, Any]:
    """History entry ``id`` at revision ``sha(rev)`` deployed at ``at(minute)``, started six seconds earlier."""
    return history_entry(id, sha(rev), at(minute), **kwargs)


def synced_app(
    entries: Sequence[Mapping[str, Any]],
    *,
    images: Sequence[str] | None = None,
    health: str = "Healthy",
    transition: datetime | None = None,
    summary: Sequence[str] | None = None,
    sync_status: str = "Synced",
    **kwargs: Any,
) -> dict[str, Any]:
    """An app whose newest entry was produced by the (completed, Succeeded) operation in its status."""
    newest = entries[-1]
    op = operation_state(
        "Succeeded",
        newest["deployStartedAt"],
        newest["deployedAt"],
        revision=newest.get("revision"),
        revisions=newest.get("revisions"),
        sources=newest.get("sources"),
        images=images,
    )
    live = summary if summary is not None else (images or ())
    return make_app(
        history=entries,
        operation_state=op,
        health_status=health,
        health_transition_at=transition,
        summary_images=live,
        sync_status=sync_status,
        **kwargs,
    )


BASELINE_AT = at(-30)


def baseline(app: Mapping[str, Any], now: datetime = BASELINE_AT) -> Snapshot:
    """The snapshot a first run (``first_run: baseline``) records for ``app``."""
    result = tick(app, None, now, initialized_at=None)
    assert result.deployments == ()
    return result.snapshot


def refs(result: Plan) -> list[str]:
    return [d.ref for d in result.deployments]


def assert_chain(result: Plan) -> None:
    """The last deployment's snapshot is the plan's snapshot: nothing is left to store after delivery."""
    if result.deployments:
        assert result.deployments[-1].snapshot_after == result.snapshot


# -- rule 3: new history entries ---------------------------------------------------------------------------


def test_three_history_entries_between_two_ticks_are_three_deployments_oldest_first() -> None:
    first = synced_app([entry(10, 10, -20)], images=[image(10)])
    snapshot = baseline(first).evolve(commits={"acme/payments-api": sha(10)})
    entries = [entry(10, 10, -20), entry(11, 11, 1), entry(12, 12, 2), entry(13, 13, 3)]
    app = synced_app(entries, images=[image(13)], transition=at(4))

    result = tick(app, snapshot, at(5))

    assert refs(result) == ["h11", "h12", "h13"]
    assert [d.result for d in result.deployments] == [Result.SUCCESS] * 3
    assert [d.deployment_class for d in result.deployments] == [DeploymentClass.NEW_REVISION] * 3
    h11, h12, h13 = result.deployments
    assert (h11.started_at, h11.finished_at) == (at(1, seconds=-6), at(1))
    assert h11.revisions == (sha(11),) and h11.history_id == 11 and h11.kind is DeploymentKind.HISTORY
    assert h11.id == f"argocd:prod:argocd:payments-api:{fake_uid('argocd/payments-api')[:8]}:h11"
    assert h11.images == () and h12.images == ()
    assert h13.images == (image(13),)
    assert [d.snapshot_after.last_history_id for d in result.deployments] == [11, 12, 13]
    assert h11.snapshot_after.images == {} and h13.snapshot_after.images == {IMAGE: sha(13)[:12]}
    assert [d.snapshot_after.recent[-1][0] for d in result.deployments] == [(sha(11),), (sha(12),), (sha(13),)]
    assert h13.snapshot_after.last_deployment_started_at == at(3, seconds=-6)
    assert all(d.snapshot_after.commits == {"acme/payments-api": sha(10)} for d in result.deployments)
    assert all(d.snapshot_after.last_seen == at(5) for d in result.deployments)
    assert result.snapshot.pending is None
    assert_chain(result)


def test_progressing_then_healthy_on_the_next_tick_is_exactly_one_success() -> None:
    old = synced_app([entry(12, 12, -60)], images=[image(12)])
    snapshot = baseline(old)
    entries = [entry(12, 12, -60), entry(13, 13, 0)]
    rolling = synced_app(entries, images=[image(13)], health="Progressing", transition=at(0, seconds=2))
    rolling = set_summary_images(rolling, [image(12), image(13)])

    first = tick(rolling, snapshot, at(1))
    assert first.deployments == ()
    assert first.snapshot.pending == PendingVerdict(history_id=13, since=at(1))
    assert first.snapshot.last_history_id == 12, "a pending entry must stay above the high-water mark"
    assert any("pending verdict for h13: Progressing" in note for note in first.notes)

    healthy = set_summary_images(set_health(rolling, "Healthy", at(3)), [image(13)])
    second = tick(healthy, first.snapshot, at(6))
    assert refs(second) == ["h13"]
    (h13,) = second.deployments
    assert h13.result is Result.SUCCESS and h13.finished_at == at(0)
    assert h13.images == (image(13),)
    assert second.snapshot.pending is None and second.snapshot.last_history_id == 13
    assert_chain(second)

    third = tick(healthy, second.snapshot, at(11))
    assert third.deployments == ()
    assert third.snapshot is second.snapshot, "a quiet tick changes nothing to store"


def test_degraded_ten_minutes_after_a_succeeded_sync_is_a_failed_deployment() -> None:
    """Progressing until the progress deadline, then Degraded."""
    snapshot = baseline(synced_app([entry(30, 30, -60)], images=[image(30)]))
    entries = [entry(30, 30, -60), entry(31, 31, 0)]
    rolling = synced_app(entries, images=[image(31)], health="Progressing", transition=at(0, seconds=3))

    first = tick(rolling, snapshot, at(5))
    assert first.deployments == () and first.snapshot.pending is not None

    degraded = set_health(rolling, "Degraded", at(10, seconds=5))
    second = tick(degraded, first.snapshot, at(15))
    (h31,) = second.deployments
    assert h31.result is Result.FAILED and h31.ref == "h31"
    assert (h31.started_at, h31.finished_at) == (at(0, seconds=-6), at(0))
    assert "Degraded at 2025-06-03T09:10:05Z" in h31.message
    assert h31.images == (image(31),), "the failed change's images come from the sync that applied them"
    assert h31.snapshot_after.last_history_id == 31 and h31.snapshot_after.pending is None
    assert_chain(second)


def test_degraded_since_before_the_sync_is_not_caused_by_it() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 1, 0)], health="Degraded", transition=at(-30))
    (h2,) = tick(app, snapshot, at(2)).deployments
    assert h2.result is Result.SUCCESS and "before this sync" in h2.message


def test_missing_after_a_sync_is_a_failed_deployment() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Missing", transition=at(0, seconds=1))
    (h2,) = tick(app, snapshot, at(2)).deployments
    assert h2.result is Result.FAILED and "Missing" in h2.message


def test_healthy_without_last_transition_time_is_accepted_once_fresh() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], transition=None)
    (h2,) = tick(app, snapshot, at(2)).deployments
    assert h2.result is Result.SUCCESS


def test_health_not_refreshed_since_the_entry_waits() -> None:
    """No operation to gate on (pre-v1.7 style): the status must still be reconciled after ``deployedAt``."""
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = make_app(history=[entry(1, 1, -60), entry(2, 2, 0)], reconciled_at=at(-1))
    result = tick(app, snapshot, at(2))
    assert result.deployments == () and result.snapshot.pending == PendingVerdict(2, at(2))
    assert any("not refreshed" in note for note in result.notes)


def test_verdict_timeout_turns_a_pending_entry_into_a_failure() -> None:
    snapshot = baseline(synced_app([entry(4, 4, -60)]))
    stuck = synced_app([entry(4, 4, -60), entry(5, 5, 0)], health="Progressing", transition=at(0, seconds=1))

    first = tick(stuck, snapshot, at(1))
    assert first.snapshot.pending == PendingVerdict(5, at(1))
    almost = tick(stuck, first.snapshot, at(60, seconds=59))
    assert almost.deployments == ()
    assert almost.snapshot.pending == PendingVerdict(5, at(1)), "the wait is measured from when it began"

    late = tick(stuck, almost.snapshot, at(61))
    (h5,) = late.deployments
    assert h5.result is Result.FAILED and h5.finished_at == at(0)
    assert "no health verdict within 1h" in h5.message and "Progressing" in h5.message
    assert late.snapshot.pending is None and late.snapshot.last_history_id == 5


def test_a_newer_entry_settles_the_pending_one_as_success() -> None:
    snapshot = baseline(synced_app([entry(7, 7, -60)]))
    rolling = synced_app([entry(7, 7, -60), entry(8, 8, 0)], health="Progressing", transition=at(0, seconds=1))
    first = tick(rolling, snapshot, at(1))
    assert first.snapshot.pending == PendingVerdict(8, at(1))

    entries = [entry(7, 7, -60), entry(8, 8, 0), entry(9, 9, 3)]
    rolling_again = synced_app(entries, images=[image(9)], health="Progressing", transition=at(3, seconds=1))
    second = tick(rolling_again, first.snapshot, at(5))
    (h8,) = second.deployments
    assert h8.result is Result.SUCCESS
    assert second.snapshot.pending == PendingVerdict(9, at(5)), "the newer entry is pending in turn"
    assert h8.snapshot_after.pending == PendingVerdict(9, at(5))
    assert any("h8 was pending and is superseded by h9" in note for note in second.notes)

    done = tick(set_health(rolling_again, "Healthy", at(6)), second.snapshot, at(10))
    assert refs(done) == ["h9"] and done.deployments[0].result is Result.SUCCESS


def test_a_later_failed_sync_settles_the_pending_entry() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    rolling = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Progressing", transition=at(0, seconds=1))
    first = tick(rolling, snapshot, at(1))
    failed = with_operation_state(
        rolling, operation_state("Failed", at(3), at(4), revision=sha(3)), reconciled_at=at(5)
    )
    result = tick(failed, first.snapshot, at(6))
    assert refs(result) == ["h2", f"op-{int(at(3).timestamp())}"]
    assert [d.result for d in result.deployments] == [Result.SUCCESS, Result.FAILED]
    assert_chain(result)


@pytest.mark.parametrize("health", ["Progressing", "Suspended", "Unknown", None])
def test_undecided_health_is_pending_not_emitted(health: str | None) -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], transition=at(0, seconds=2))
    result = tick(set_health(app, health, at(0, seconds=2)), snapshot, at(1))
    assert result.deployments == ()
    assert result.snapshot.pending == PendingVerdict(2, at(1)) and result.snapshot.last_history_id == 1


def test_a_newer_sync_running_settles_the_entry_as_superseded() -> None:
    """The newer sync owns the live health; waiting for it would turn h2 into FAILED if that sync hangs."""
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Progressing", transition=at(0, seconds=2))
    running = with_operation(
        with_operation_state(app, operation_state("Running", at(2), None, revision=sha(3))), sha(3)
    )
    result = tick(set_health(running, "Progressing", at(2, seconds=5)), snapshot, at(4))
    (h2,) = result.deployments
    assert h2.ref == "h2" and h2.result is Result.SUCCESS
    assert result.snapshot.pending is None and result.snapshot.last_history_id == 2
    assert any("in progress" in note for note in result.notes)

    hours_later = tick(set_health(running, "Progressing", at(2, seconds=5)), result.snapshot, at(240))
    assert hours_later.deployments == (), "a newer sync that hangs never turns h2 into a failure"


def test_an_entry_degraded_before_the_newer_sync_started_is_a_failure() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Degraded", transition=at(1))
    running = with_operation(
        with_operation_state(app, operation_state("Running", at(2), None, revision=sha(3))), sha(3)
    )
    (h2,) = tick(running, snapshot, at(4)).deployments
    assert h2.result is Result.FAILED and "before the next sync" in h2.message


# -- classification ----------------------------------------------------------------------------------------


def test_rollback_is_a_new_id_with_an_older_revision() -> None:
    """Ids 5, 6, 7 with revisions A, B, A; OutOfSync after the rollback."""
    a, b = "1f99ebc", "b2316b0"
    before = synced_app([entry(5, a, -40), entry(6, b, -25)])
    snapshot = baseline(before)
    entries = [entry(5, a, -40), entry(6, b, -25), entry(7, a, 0, initiated_by="jane.doe@acme.io")]
    app = synced_app(entries, images=[image(a)], sync_status="OutOfSync", transition=at(2))
    app = set_sync(app, "OutOfSync", sha(b))

    result = tick(app, snapshot, at(3))
    (h7,) = result.deployments
    assert h7.deployment_class is DeploymentClass.ROLLBACK and h7.result is Result.SUCCESS
    assert h7.revisions == (sha(a),) and h7.ref == "h7"
    assert h7.images == (image(a),), "OutOfSync: the sync's own images, not the live view"


def test_rollback_to_an_entry_only_the_snapshot_still_remembers() -> None:
    """The older entry was truncated out of the CR (revisionHistoryLimit 2) but is in ``snapshot.recent``."""
    snapshot = baseline(synced_app([entry(5, "a", -40), entry(6, "b", -25)]))
    app = synced_app([entry(6, "b", -25), entry(7, "a", 0)])
    (h7,) = tick(app, snapshot, at(3)).deployments
    assert h7.deployment_class is DeploymentClass.ROLLBACK


def test_config_only_same_revision_different_source() -> None:
    """Image Updater's argocd write-back changes a Helm parameter."""
    rev = "75d2700"
    source_old = git_source(helm_parameters={"image.tag": "1.8.2"})
    source_new = git_source(helm_parameters={"image.tag": "1.8.3"})
    snapshot = baseline(synced_app([entry(11, rev, -30, source=source_old)]))
    app = synced_app([entry(11, rev, -30, source=source_old), entry(12, rev, 0, source=source_new)])
    (h12,) = tick(app, snapshot, at(2)).deployments
    assert h12.deployment_class is DeploymentClass.CONFIG_ONLY and h12.revisions == (sha(rev),)


def test_redeploy_same_revision_and_source() -> None:
    snapshot = baseline(synced_app([entry(3, "r", -30)]))
    app = synced_app([entry(3, "r", -30), entry(4, "r", 0, initiated_by="alice")])
    (h4,) = tick(app, snapshot, at(2)).deployments
    assert h4.deployment_class is DeploymentClass.REDEPLOY and h4.result is Result.SUCCESS


def test_first_entry_of_an_app_is_initial() -> None:
    snapshot = baseline(make_app(sync_status="OutOfSync", health_status="Missing"))
    app = synced_app([entry(0, 0, 0)], images=[image(0)])
    (h0,) = tick(app, snapshot, at(2)).deployments
    assert h0.deployment_class is DeploymentClass.INITIAL and h0.images == (image(0),)


def test_multi_source_helm_chart_version_and_git_sha() -> None:
    """Revisions ["3.4.2", sha]; syncResult.revision is empty."""
    sources = [helm_source(), values_source()]
    old = history_entry(8, revisions=["3.4.1", sha("v1")], deployed_at=at(-30), sources=sources)
    new = history_entry(9, revisions=["3.4.2", sha("v2")], deployed_at=at(0), sources=sources)
    digest_image = "ghcr.io/acme/search@sha256:" + "4" * 64
    snapshot = baseline(synced_app([old], sources=sources))
    app = synced_app([old, new], images=[digest_image], sources=sources, transition=at(2))

    result = tick(app, snapshot, at(3))
    (h9,) = result.deployments
    assert h9.revisions == ("3.4.2", sha("v2"))
    assert h9.deployment_class is DeploymentClass.NEW_REVISION and h9.result is Result.SUCCESS
    assert [s.chart for s in h9.sources] == ["search-platform", None]
    assert result.snapshot.recent[-1][0] == ("3.4.2", sha("v2"))


# -- images ------------------------------------------------------------------------------------------------


def test_sync_result_images_are_preferred_over_summary_images() -> None:
    """``summary.images`` mixes old pods, init containers and sidecars; the sync's own images do not."""
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image(1)]))
    live = [image(1), image(2), "busybox:1.36.1", "docker.io/istio/proxyv2:1.22.0"]
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], images=[image(2)], summary=live, transition=at(1))
    (h2,) = tick(app, snapshot, at(2)).deployments
    assert h2.images == (image(2),)


def test_summary_images_are_used_only_once_settled_when_the_operation_is_not_the_entrys() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image(1)]))
    entries = [entry(1, 1, -60), entry(2, 2, 0)]
    self_heal = operation_state(
        "Succeeded", at(1), at(1, seconds=4), revision=sha(2), images=[image(2)], resources=[{"kind": "Deployment"}]
    )
    settled = make_app(history=entries, operation_state=self_heal, summary_images=[image(2)])
    (h2,) = tick(settled, snapshot, at(3)).deployments
    assert h2.images == (image(2),)

    in_flight = with_operation(settled, sha(3))
    (h2_busy,) = tick(in_flight, snapshot, at(3)).deployments
    assert h2_busy.images == (), "the live view is not trusted while a sync is requested"


def test_older_controller_without_sync_result_images_falls_back_to_summary() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], images=None, summary=[image(2)])
    (h2,) = tick(app, snapshot, at(3)).deployments
    assert h2.images == (image(2),)


def test_image_only_change_is_a_success_keyed_by_the_image_set() -> None:
    app = synced_app([entry(3, 3, -60)], images=[image("aaa1")], transition=at(-59))
    snapshot = baseline(app)
    assert snapshot.images == {IMAGE: sha("aaa1")[:12]}
    changed = set_health(set_summary_images(app, [image("bbb2")]), "Healthy", at(4))

    result = tick(changed, snapshot, at(5))
    (img,) = result.deployments
    assert img.kind is DeploymentKind.IMAGE and img.deployment_class is DeploymentClass.IMAGE_CHANGE
    assert img.result is Result.SUCCESS
    assert re.fullmatch(r"img-[0-9a-f]{12}", img.ref)
    assert img.started_at == img.finished_at == at(4), "the health transition that settled the new images"
    assert img.revisions == (sha(3),) and img.images == (image("bbb2"),)
    assert img.snapshot_after.images == {IMAGE: sha("bbb2")[:12]}
    assert img.snapshot_after.last_history_id == 3
    assert_chain(result)
    assert tick(changed, result.snapshot, at(10)).deployments == ()
    assert tick(changed, snapshot, at(7)).deployments[0].ref == img.ref, "the id survives a failed delivery"

    disabled = tick(changed, snapshot, at(5), detect_image_only_changes=False)
    assert disabled.deployments == ()


def test_image_change_back_to_an_earlier_set_gets_a_new_id() -> None:
    app = synced_app([entry(3, 3, -60)], images=[image("aaa1")], transition=at(-59))
    snapshot = baseline(app)
    to_b = set_health(set_summary_images(app, [image("bbb2")]), "Healthy", at(4))
    first = tick(to_b, snapshot, at(5))
    back_to_a = set_health(set_summary_images(app, [image("aaa1")]), "Healthy", at(20))
    second = tick(back_to_a, first.snapshot, at(21))
    to_b_again = set_health(set_summary_images(app, [image("bbb2")]), "Healthy", at(40))
    third = tick(to_b_again, second.snapshot, at(41))
    ids = [p.deployments[0].id for p in (first, second, third)]
    assert len(set(ids)) == 3


def test_images_only_appearing_or_disappearing_are_not_a_deployment() -> None:
    app = synced_app([entry(3, 3, -60)], images=[image("aaa1")])
    snapshot = baseline(app)
    with_init = set_summary_images(app, [image("aaa1"), "quay.io/acme/migrations:" + sha("aaa1")[:12]])
    result = tick(with_init, snapshot, at(5))
    assert result.deployments == ()
    assert result.snapshot.images == {IMAGE: sha("aaa1")[:12], "quay.io/acme/migrations": sha("aaa1")[:12]}


def test_image_change_is_not_read_while_not_settled() -> None:
    app = synced_app([entry(3, 3, -60)], images=[image("aaa1")])
    snapshot = baseline(app)
    rolling = set_health(set_summary_images(app, [image("aaa1"), image("bbb2")]), "Progressing", at(4))
    assert tick(rolling, snapshot, at(5)).deployments == ()
    out_of_sync = set_sync(set_summary_images(app, [image("bbb2")]), "OutOfSync")
    assert tick(out_of_sync, snapshot, at(5)).deployments == ()


# -- rule 4: failed operations -----------------------------------------------------------------------------


def _failing(app: Mapping[str, Any], phase: str, retry: int, finished: datetime | None) -> dict[str, Any]:
    state = operation_state(
        phase, at(0), finished, revision=sha("dc43d94"), images=[image("dc43d94")], retry_count=retry
    )
    reconciled = finished + timedelta(seconds=2) if finished is not None else at(0, seconds=1)
    failing = with_operation_state(app, state, reconciled_at=reconciled)
    return set_sync(failing, "OutOfSync", sha("dc43d94"))


def test_a_sync_failed_after_two_retries_is_one_failure() -> None:
    """Retries keep startedAt; only the final Failed is a deployment."""
    app = synced_app([entry(22, 22, -60)], images=[image(22)])
    snapshot = baseline(app)
    states = [
        _failing(app, "Running", 0, None),
        _failing(app, "Running", 1, at(0, seconds=20)),
        _failing(app, "Running", 2, at(0, seconds=45)),
        _failing(app, "Failed", 2, at(1, seconds=30)),
        _failing(app, "Failed", 2, at(1, seconds=30)),
    ]
    emitted: list[Deployment] = []
    for minute, state in enumerate(states, start=1):
        result = tick(state, snapshot, at(minute * 5))
        emitted += result.deployments
        assert_chain(result)
        snapshot = result.snapshot

    (failure,) = emitted
    assert failure.ref == f"op-{int(at(0).timestamp())}" and failure.kind is DeploymentKind.OPERATION
    assert failure.result is Result.FAILED and failure.deployment_class is DeploymentClass.FAILED_SYNC
    assert (failure.started_at, failure.finished_at) == (at(0), at(1, seconds=30))
    assert failure.revisions == (sha("dc43d94"),) and failure.images == (image("dc43d94"),)
    assert "retried 2 times" in failure.message
    assert snapshot.last_failed_operation == format_time(at(0))
    assert snapshot.last_history_id == 22 and snapshot.images == {IMAGE: sha(22)[:12]}, "nothing was deployed"


def test_running_with_finished_at_is_retrying_not_a_verdict() -> None:
    app = synced_app([entry(22, 22, -60)])
    snapshot = baseline(app)
    result = tick(_failing(app, "Running", 1, at(0, seconds=20)), snapshot, at(1))
    assert result.deployments == () and not result.deferred
    assert any("retrying" in note for note in result.notes)
    assert result.snapshot.last_failed_operation is None


def test_error_with_an_empty_revision_is_a_failure_with_no_revisions() -> None:
    app = synced_app([entry(22, 22, -60)])
    snapshot = baseline(app)
    state = operation_state("Error", at(0), at(0, seconds=2), sync_result=False)
    result = tick(with_operation_state(app, state, reconciled_at=at(1)), snapshot, at(2))
    (failure,) = result.deployments
    assert failure.result is Result.FAILED and failure.revisions == () and failure.images == ()


def test_a_failed_dry_run_is_not_a_deployment() -> None:
    app = synced_app([entry(22, 22, -60)])
    snapshot = baseline(app)
    state = operation_state("Failed", at(0), at(0, seconds=2), revision=sha(23), dry_run=True)
    result = tick(with_operation_state(app, state, reconciled_at=at(1)), snapshot, at(2))
    assert result.deployments == ()


# -- rule 5: OutOfSync + Missing ---------------------------------------------------------------------------


def test_never_synced_out_of_sync_missing_app_is_nothing() -> None:
    """Created by an ApplicationSet, no operation, no history."""
    app = make_app("billing-worker-eu-west-1", sync_status="OutOfSync", health_status="Missing")
    first_seen = tick(app, None, at(0))
    assert first_seen.deployments == ()
    assert first_seen.snapshot.last_history_id is None
    again = tick(app, first_seen.snapshot, at(5))
    assert again.deployments == ()
    assert any("never synced" in note for note in again.notes)


def test_app_emptied_out_of_band_after_its_last_deployment_is_nothing() -> None:
    """History 7-8, the old op Succeeded, now OutOfSync + Missing."""
    app = synced_app([entry(7, 7, -60 * 24 * 40), entry(8, 8, -60 * 24 * 30)], automated=False)
    snapshot = baseline(app)
    emptied = set_summary_images(set_health(set_sync(app, "OutOfSync"), "Missing", at(-10)), [])
    result = tick(emptied, snapshot, at(0))
    assert result.deployments == ()
    assert result.snapshot is snapshot


def test_out_of_sync_missing_after_a_new_failed_sync_is_one_failure() -> None:
    app = synced_app([entry(7, 7, -60)])
    snapshot = baseline(app)
    state = operation_state("Failed", at(0), at(0, seconds=30), revision=sha(9), message="namespace not found")
    broken = set_health(set_sync(with_operation_state(app, state, reconciled_at=at(1)), "OutOfSync"), "Missing", at(1))
    result = tick(broken, snapshot, at(2))
    assert refs(result) == [f"op-{int(at(0).timestamp())}"]
    assert tick(broken, result.snapshot, at(7)).deployments == ()


def test_out_of_sync_missing_after_a_sync_without_history_entry_is_one_failure() -> None:
    """``revisionHistoryLimit: 0``: a Succeeded sync records no entry; the app then shows nothing live."""
    app = make_app(revision_history_limit=0, sync_status="OutOfSync", health_status="Missing")
    snapshot = baseline(app)
    state = operation_state("Succeeded", at(0), at(0, seconds=8), revision=sha(1))
    broken = with_operation_state(app, state, reconciled_at=at(1))

    result = tick(broken, snapshot, at(2))
    (failure,) = result.deployments
    assert failure.ref == f"op-{int(at(0).timestamp())}" and failure.result is Result.FAILED
    assert "OutOfSync and Missing" in failure.message
    assert result.snapshot.last_failed_operation == format_time(at(0))
    assert tick(broken, result.snapshot, at(7)).deployments == ()
    assert tick(broken, snapshot, at(2), failure_on_out_of_sync_missing=False).deployments == ()


# -- rules 1 and 2: deletion, stale status -----------------------------------------------------------------


def test_stale_status_defers_and_changes_nothing() -> None:
    app = synced_app([entry(1, 1, -60)])
    snapshot = baseline(app)
    entries = [entry(1, 1, -60), entry(2, 2, 0)]
    stale = set_reconciled(synced_app(entries, images=[image(2)]), at(-2))

    result = tick(stale, snapshot, at(1))
    assert result.deferred and result.deployments == ()
    assert result.snapshot is snapshot
    assert any(note.startswith("stale status") for note in result.notes)

    unknown = tick(stale, None, at(1))
    assert unknown.deferred and unknown.deployments == ()
    never = tick(set_reconciled(stale, None), snapshot, at(1))
    assert never.deferred


def test_deletion_in_progress_emits_nothing_and_records_it() -> None:
    """A PR preview being torn down, health swinging to Progressing."""
    app = synced_app([entry(0, 0, -60), entry(1, 1, -30)], images=[image(1)])
    snapshot = baseline(app)
    entries = [entry(0, 0, -60), entry(1, 1, -30), entry(2, 2, 0)]
    deleting = mark_deleting(synced_app(entries, images=[image(2)], health="Progressing", transition=at(1)), at(0))

    result = tick(deleting, snapshot, at(2))
    assert result.deployments == ()
    assert result.snapshot.deleting_since == at(2) and result.snapshot.last_history_id == 1
    later = tick(deleting, result.snapshot, at(7))
    assert later.deployments == () and later.snapshot.deleting_since == at(2)


# -- history truncation ------------------------------------------------------------------------------------


def test_history_truncated_between_ticks_emits_what_is_left_and_names_the_lost_ids() -> None:
    snapshot = baseline(synced_app([entry(i, i, -100 + i) for i in range(0, 4)]))
    entries = [entry(i, i, i) for i in range(7, 17)]
    app = synced_app(entries, images=[image(16)], transition=at(17))

    result = tick(app, snapshot, at(20))
    assert refs(result) == [f"h{i}" for i in range(7, 17)]
    assert any("ids 4-6 lost to revisionHistoryLimit" in note and "unrecoverable" in note for note in result.notes)
    assert result.deployments[0].deployment_class is DeploymentClass.NEW_REVISION
    assert len(result.snapshot.recent) == min(RECENT_ENTRIES_KEPT, 14)


def test_a_huge_gap_in_history_ids_is_named_without_walking_it() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(2**62, 2, 0)], transition=at(1))
    result = tick(app, snapshot, at(2))
    assert refs(result) == [f"h{2**62}"]
    assert any(f"ids 2-{2**62 - 1} lost" in note for note in result.notes)


# -- rule 7: first run, first sight, new uid ---------------------------------------------------------------


def test_first_run_baseline_records_the_state_and_emits_nothing() -> None:
    entries = [entry(44, 44, -300), entry(45, 45, -200, initiated_by="bob"), entry(46, 46, -100)]
    app = synced_app(entries, images=[image(46)], revision_history_limit=3)
    result = tick(app, None, at(0), initialized_at=None)
    assert result.deployments == ()
    assert result.snapshot.last_history_id == 46
    assert [r for r, _ in result.snapshot.recent] == [(sha(44),), (sha(45),), (sha(46),)]
    assert result.snapshot.images == {IMAGE: sha(46)[:12]}
    assert result.snapshot.last_deployment_started_at == at(-100, seconds=-6)
    assert tick(app, result.snapshot, at(5)).deployments == ()


def test_first_run_backfill_emits_every_entry_present_and_respects_since() -> None:
    entries = [entry(44, 44, -300), entry(45, 45, -200), entry(46, 46, -100)]
    app = synced_app(entries, images=[image(46)])

    full = tick(app, None, at(0), initialized_at=None, first_run="backfill")
    assert refs(full) == ["h44", "h45", "h46"]
    assert full.deployments[0].deployment_class is DeploymentClass.NEW_REVISION
    assert full.deployments[-1].images == (image(46),)
    assert full.snapshot.last_history_id == 46
    assert_chain(full)

    recent = tick(app, None, at(0), initialized_at=None, first_run="backfill", since=at(-200))
    assert refs(recent) == ["h45", "h46"]
    assert recent.deployments[0].deployment_class is DeploymentClass.NEW_REVISION


def test_backfill_command_on_a_cluster_never_run_emits_the_history_whatever_first_run_says() -> None:
    entries = [entry(44, 44, -300), entry(45, 45, -200), entry(46, 46, -100)]
    app = synced_app(entries, images=[image(46)])
    result = tick(app, None, at(0), initialized_at=None, first_run="baseline", backfill=True, since=at(-250))
    assert refs(result) == ["h45", "h46"]
    assert result.snapshot.last_history_id == 46


def test_backfill_command_resends_recorded_entries_without_moving_the_snapshot_back() -> None:
    entries = [entry(44, 44, -300), entry(45, 45, -200), entry(46, 46, -100)]
    app = synced_app(entries, images=[image(46)])
    snapshot = baseline(app).evolve(commits={"acme/payments-api": sha(46)})
    result = tick(app, snapshot, at(0), backfill=True, since=at(-250))
    assert refs(result) == ["h45", "h46"]
    assert all(d.snapshot_after.last_history_id == 46 for d in result.deployments)
    assert result.snapshot.commits == snapshot.commits


def test_app_first_seen_after_initialisation_emits_only_what_came_after() -> None:
    entries = [entry(1, 1, -3 * 24 * 60), entry(2, 2, -2 * 24 * 60), entry(3, 3, -60), entry(4, 2, -30)]
    app = synced_app(entries, images=[image(2)])
    result = tick(app, None, at(0))
    assert refs(result) == ["h3", "h4"]
    assert [d.deployment_class for d in result.deployments] == [DeploymentClass.NEW_REVISION, DeploymentClass.ROLLBACK]
    assert result.deployments[0].snapshot_after.last_history_id == 3
    assert_chain(result)


def test_app_first_seen_with_a_failed_sync_after_initialisation_reports_it_once() -> None:
    app = synced_app([entry(1, 1, -3 * 24 * 60)])
    failed = with_operation_state(
        app, operation_state("Failed", at(-10), at(-9), revision=sha(2)), reconciled_at=at(-8)
    )
    result = tick(failed, None, at(0))
    assert refs(result) == [f"op-{int(at(-10).timestamp())}"]
    assert tick(failed, result.snapshot, at(5)).deployments == ()


def test_app_first_seen_with_a_failed_sync_before_initialisation_is_baseline() -> None:
    app = synced_app([entry(1, 1, -3 * 24 * 60)])
    state = operation_state("Failed", at(-2 * 24 * 60), at(-2 * 24 * 60 + 1), revision=sha(2))
    failed = with_operation_state(app, state, reconciled_at=at(-1))
    failed = set_health(set_sync(failed, "OutOfSync"), "Missing")
    result = tick(failed, None, at(0))
    assert result.deployments == () and not result.deferred
    assert result.snapshot.last_failed_operation == format_time(at(-2 * 24 * 60))
    assert tick(failed, result.snapshot, at(5)).deployments == ()


def test_new_uid_under_an_old_name_is_a_new_application() -> None:
    old = synced_app([entry(i, i, -200 + i) for i in range(20, 30)], images=[image(29)], uid=fake_uid("old"))
    snapshot = baseline(old).evolve(commits={"acme/payments-api": sha(29)}, last_failed_operation=format_time(at(-100)))
    recreated = synced_app([entry(0, 29, 0), entry(1, 30, 1)], images=[image(30)], uid=fake_uid("new"))

    result = tick(recreated, snapshot, at(3))
    assert refs(result) == ["h0", "h1"]
    assert result.deployments[0].deployment_class is DeploymentClass.INITIAL
    assert all(fake_uid("new")[:8] in d.id for d in result.deployments)
    assert result.snapshot.uid == fake_uid("new") and result.snapshot.last_history_id == 1
    assert result.snapshot.last_failed_operation is None
    assert result.snapshot.commits == snapshot.commits, "commits belong to the reconciler"


def test_history_ids_restarted_under_the_same_uid_are_new() -> None:
    snapshot = baseline(synced_app([entry(8, 8, -60), entry(9, 9, -50)]))
    app = synced_app([entry(0, 10, 0)], images=[image(10)])
    result = tick(app, snapshot, at(2))
    assert refs(result) == [f"h0-{epoch(0)}"] and result.snapshot.last_history_id == 0


# -- partial and self-heal syncs ---------------------------------------------------------------------------


def test_partial_self_heal_sync_is_not_a_deployment() -> None:
    app = synced_app([entry(5, 5, -60)], images=[image(5)])
    snapshot = baseline(app)
    heal = operation_state(
        "Succeeded",
        at(0),
        at(0, seconds=3),
        revision=sha(5),
        images=[image(5)],
        resources=[{"group": "apps", "kind": "Deployment", "name": "payments-api"}],
    )
    healed = with_operation_state(app, heal, reconciled_at=at(1))
    assert tick(healed, snapshot, at(2)).deployments == ()

    heal_failed = operation_state(
        "Failed", at(5), at(5, seconds=3), revision=sha(5), resources=[{"kind": "Deployment"}]
    )
    result = tick(with_operation_state(app, heal_failed, reconciled_at=at(6)), snapshot, at(7))
    assert result.deployments == ()


def test_entry_without_deploy_started_at_uses_deployed_at() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = make_app(history=[entry(1, 1, -60), history_entry(2, sha(2), at(0), started_at=OMIT, initiated_by=None)])
    (h2,) = tick(app, snapshot, at(1)).deployments
    assert h2.started_at == h2.finished_at == at(0)


def test_snapshot_round_trips_through_json_between_ticks() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    rolling = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Progressing", transition=at(0, seconds=1))
    first = tick(rolling, snapshot, at(1))
    stored = Snapshot.from_json(first.snapshot.to_json())
    assert stored == first.snapshot
    result = tick(set_health(rolling, "Healthy", at(2)), stored, at(6))
    assert refs(result) == ["h2"]


def test_append_history_truncates_like_revision_history_limit() -> None:
    app = make_app()
    for i in range(5):
        app = append_history(app, entry(i, i, i), limit=3)
    assert [e.id for e in observe(app).history] == [2, 3, 4]
    assert observe(with_history(app, [])).history == ()


# -- health that predates the sync -------------------------------------------------------------------------


@pytest.mark.parametrize("health", ["Suspended", "Progressing"])
def test_a_health_state_older_than_the_sync_is_not_its_verdict(health: str) -> None:
    """A paused CronJob or Rollout, a KEDA-scaled object, a LoadBalancer that never gets an address."""
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health=health, transition=at(-30))
    result = tick(app, snapshot, at(2))
    (h2,) = result.deployments
    assert h2.result is Result.SUCCESS and h2.ref == "h2"
    assert h2.message == f"{health} since 2025-06-03T08:30:00Z, before this sync: not caused by it"
    assert result.snapshot.pending is None and result.snapshot.last_history_id == 2


def test_an_app_unhealthy_since_before_its_baseline_gets_success_for_its_next_sync() -> None:
    """Recorded while Progressing (its Ingress never got an address): the next sync does not change that."""
    before = synced_app([entry(1, 1, -60)], health="Progressing", transition=at(-90))
    snapshot = baseline(before)
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Progressing", transition=at(-90))
    (h2,) = tick(app, snapshot, at(2)).deployments
    assert h2.result is Result.SUCCESS and "before this sync" in h2.message


def test_without_last_transition_time_a_suspended_app_waits_for_the_timeout_as_before() -> None:
    """Controllers before v2.14 say nothing of when the health changed: nothing tells it predates the sync."""
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Suspended", transition=None)
    first = tick(app, snapshot, at(2))
    assert first.deployments == () and first.snapshot.pending == PendingVerdict(2, at(2))
    (h2,) = tick(app, first.snapshot, at(62)).deployments
    assert h2.result is Result.FAILED and "no health verdict within 1h" in h2.message


def test_progressing_since_an_earlier_sync_whose_rollout_never_ended_is_still_pending() -> None:
    """Two syncs a minute apart: the second one's rollout continues the first one's, so it may still fail."""
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    rolling = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Progressing", transition=at(0, seconds=1))
    first = tick(rolling, snapshot, at(1))
    assert first.snapshot.pending == PendingVerdict(2, at(1))

    entries = [entry(1, 1, -60), entry(2, 2, 0), entry(3, 3, 2)]
    again = synced_app(entries, health="Progressing", transition=at(0, seconds=1))
    second = tick(again, first.snapshot, at(3))
    assert refs(second) == ["h2"] and second.deployments[0].result is Result.SUCCESS
    assert second.snapshot.pending == PendingVerdict(3, at(3)), "h3 may still end Degraded"
    assert second.snapshot.rollout_since == at(0, seconds=-6)

    degraded = tick(set_health(again, "Degraded", at(12)), second.snapshot, at(13))
    assert refs(degraded) == ["h3"] and degraded.deployments[0].result is Result.FAILED
    assert degraded.snapshot.rollout_since is None


def test_the_rollout_window_is_the_earliest_unobserved_start_so_a_re_plan_decides_alike() -> None:
    snapshot = baseline(synced_app([entry(0, 0, -60)])).evolve(rollout_since=at(-20))
    app = synced_app([entry(0, 0, -60), entry(1, 1, -30), entry(2, 2, -10)], health="Progressing", transition=at(-25))
    first = tick(app, snapshot, at(0))
    assert refs(first) == ["h1"] and first.snapshot.pending == PendingVerdict(2, at(0))
    assert first.snapshot.rollout_since == at(-30, seconds=-6)
    assert tick(app, first.snapshot, at(0)).deployments == ()


def test_a_sync_superseded_by_a_running_one_leaves_its_rollout_open_for_the_next_entry() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    app = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Progressing", transition=at(0, seconds=2))
    running = with_operation(
        with_operation_state(app, operation_state("Running", at(2), None, revision=sha(3))), sha(3)
    )
    first = tick(running, snapshot, at(3))
    assert refs(first) == ["h2"] and first.snapshot.rollout_since == at(0, seconds=-6)

    h3 = synced_app(
        [entry(1, 1, -60), entry(2, 2, 0), history_entry(3, sha(3), at(4), at(2))],
        health="Progressing",
        transition=at(0, seconds=2),
    )
    second = tick(h3, first.snapshot, at(5))
    assert second.deployments == () and second.snapshot.pending == PendingVerdict(3, at(5))


# -- images of a sync whose old pods are still terminating --------------------------------------------------


def test_old_pods_still_listed_when_the_sync_turns_healthy_are_not_a_second_deployment() -> None:
    """The new ReplicaSet is ready, the old one's pods are terminating: summary.images lists both tags."""
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image("aaa1")]))
    entries = [entry(1, 1, -60), entry(2, 2, 0)]
    healthy = synced_app(entries, images=[image("bbb2")], summary=[image("aaa1"), image("bbb2")], transition=at(1))

    first = tick(healthy, snapshot, at(2))
    (h2,) = first.deployments
    assert h2.images == (image("bbb2"),)
    assert first.snapshot.images == {IMAGE: sha("bbb2")[:12]}, "never the tag the sync replaced"

    old_pods_gone = set_summary_images(healthy, [image("bbb2")])
    assert tick(old_pods_gone, first.snapshot, at(7)).deployments == ()


def test_old_pods_still_listed_without_sync_result_images_the_replaced_tag_is_set_aside() -> None:
    """Before v3.1 there is no syncResult images: the live view is all there is."""
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image("aaa1")]))
    entries = [entry(1, 1, -60), entry(2, 2, 0)]
    healthy = synced_app(entries, images=None, summary=[image("aaa1"), image("bbb2")], transition=at(1))

    first = tick(healthy, snapshot, at(2))
    (h2,) = first.deployments
    assert h2.images == (image("bbb2"),), "the old pods' tag is not what this deployment deployed"
    assert first.snapshot.images == {IMAGE: sha("bbb2")[:12]}
    assert tick(set_summary_images(healthy, [image("bbb2")]), first.snapshot, at(7)).deployments == ()


def test_old_pods_still_listed_after_several_syncs_in_one_tick_set_aside_the_tag_recorded_before() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image("aaa1")]))
    entries = [entry(1, 1, -60), entry(2, 2, -5), entry(3, 3, 0)]
    healthy = synced_app(entries, images=None, summary=[image("aaa1"), image("bbb2")], transition=at(1))
    result = tick(healthy, snapshot, at(2))
    assert refs(result) == ["h2", "h3"] and result.deployments[-1].images == (image("bbb2"),)
    assert result.snapshot.images == {IMAGE: sha("bbb2")[:12]}


def test_two_tags_of_one_repository_without_a_sync_are_a_rollout_in_flight_not_a_change() -> None:
    app = synced_app([entry(3, 3, -60)], images=[image("old1")], transition=at(-59))
    snapshot = baseline(app)
    rolling = set_health(set_summary_images(app, [image("old1"), image("new1")]), "Healthy", at(4))

    during = tick(rolling, snapshot, at(5))
    assert during.deployments == ()
    assert during.snapshot.images == {IMAGE: sha("old1")[:12]}, "the baseline does not move to either tag yet"

    done = set_summary_images(rolling, [image("new1")])
    after = tick(done, during.snapshot, at(10))
    (img,) = after.deployments
    assert img.kind is DeploymentKind.IMAGE and img.images == (image("new1"),)
    assert after.snapshot.images == {IMAGE: sha("new1")[:12]}


# -- commit-tagged images no rule maps ------------------------------------------------------------------


SIDECAR = "registry.acme.io/platform/log-agent"


def mapped_images(search_fallback: bool = False) -> CommitImages:
    rules = [{"image": r"quay\.io/acme/(?P<name>[^/]+)", "repo": "acme/{name}"}]
    config = ImagesConfig.model_validate({"repositories": rules, "search_fallback": search_fallback})
    return CommitImages(config, mapped_only=True)


def test_a_commit_tagged_sidecar_no_rule_maps_changing_its_tag_is_not_a_deployment() -> None:
    app = synced_app([entry(3, 3, -60)], summary=[image("aaa1"), f"{SIDECAR}:3f9c2ab"], transition=at(-59))
    snapshot = tick(app, None, BASELINE_AT, initialized_at=None, commit_images=mapped_images()).snapshot
    assert snapshot.images == {IMAGE: sha("aaa1")[:12]}
    bumped = set_health(set_summary_images(app, [image("aaa1"), f"{SIDECAR}:5d1e0c4"]), "Healthy", at(4))

    assert tick(bumped, snapshot, at(5), commit_images=mapped_images()).deployments == ()
    searched = tick(app, None, BASELINE_AT, initialized_at=None, commit_images=mapped_images(search_fallback=True))
    assert searched.snapshot.images[SIDECAR] == "3f9c2ab", "commit search may still find its repository"
    (img,) = tick(bumped, searched.snapshot, at(5), commit_images=mapped_images(search_fallback=True)).deployments
    assert img.kind is DeploymentKind.IMAGE


# -- decided verdicts survive a failed delivery -------------------------------------------------------------


def test_a_failure_decided_but_not_delivered_is_delivered_as_decided_after_the_fix() -> None:
    """Degraded after the sync: FAILED. DevLake is down; a fix is deployed; the failure must not become SUCCESS."""
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image(1)]))
    broken = synced_app([entry(1, 1, -60), entry(2, 2, 0)], images=[image(2)], health="Degraded", transition=at(5))
    decided = tick(broken, snapshot, at(6))
    (h2,) = decided.deployments
    assert h2.result is Result.FAILED
    stored = decided.decided_snapshot
    assert stored is not None and stored.last_history_id == 1, "nothing is marked delivered"
    assert stored.last_seen == snapshot.last_seen and stored.images == snapshot.images
    assert [(d.entry.ref, d.result) for d in stored.decided] == [("h2", Result.FAILED)]
    assert stored.decided[0].entry.images == (image(2),)
    assert Snapshot.from_json(stored.to_json()) == stored

    fixed = synced_app([entry(1, 1, -60), entry(2, 2, 0), entry(3, 3, 20)], images=[image(3)], transition=at(21))
    later = tick(fixed, stored, at(22))
    assert [(d.ref, d.result) for d in later.deployments] == [("h2", Result.FAILED), ("h3", Result.SUCCESS)]
    assert later.deployments[0].message == h2.message
    assert [d.entry.ref for d in later.deployments[0].snapshot_after.decided] == ["h3"], "h3 is not delivered yet"
    assert later.deployments[0].images == (image(2),)
    assert later.snapshot.decided == () and later.snapshot.last_history_id == 3
    assert_chain(later)

    replanned = tick(fixed, snapshot, at(22))
    assert replanned.deployments[0].result is Result.SUCCESS, "without the stored verdict it would flip"


def test_a_success_decided_but_not_delivered_stays_a_success_when_the_app_degrades_later() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    healthy = synced_app([entry(1, 1, -60), entry(2, 2, 0)], transition=at(2))
    decided = tick(healthy, snapshot, at(3))
    stored = decided.decided_snapshot
    assert stored is not None
    degraded = set_health(healthy, "Degraded", at(30))
    (h2,) = tick(degraded, stored, at(31)).deployments
    assert h2.result is Result.SUCCESS and h2.message == "Healthy"


def test_each_snapshot_after_keeps_the_verdicts_of_the_deployments_after_it() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    entries = [entry(1, 1, -60), entry(2, 2, 0), entry(3, 3, 5)]
    result = tick(synced_app(entries, health="Degraded", transition=at(6)), snapshot, at(7))
    h2, h3 = result.deployments
    assert [d.entry.ref for d in h2.snapshot_after.decided] == ["h3"]
    assert h2.snapshot_after.decided[0].result is Result.FAILED
    assert h3.snapshot_after.decided == ()

    crashed_after_h2 = tick(set_health(synced_app(entries), "Healthy", at(8)), h2.snapshot_after, at(9))
    assert [(d.ref, d.result) for d in crashed_after_h2.deployments] == [("h3", Result.FAILED)]


def test_a_backfill_honours_a_decided_verdict_not_delivered_yet() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    broken = synced_app([entry(1, 1, -60), entry(2, 2, 0)], health="Degraded", transition=at(5))
    stored = tick(broken, snapshot, at(6)).decided_snapshot
    assert stored is not None
    fixed = synced_app([entry(1, 1, -60), entry(2, 2, 0), entry(3, 3, 20)], transition=at(21))
    result = tick(fixed, stored, at(22), backfill=True)
    assert [(d.ref, d.result) for d in result.deployments] == [
        ("h1", Result.SUCCESS),
        ("h2", Result.FAILED),
        ("h3", Result.SUCCESS),
    ]


def test_a_decided_verdict_whose_entry_left_the_history_is_delivered_from_the_snapshot() -> None:
    """DevLake down while more syncs push the failed entry out of a short history (revisionHistoryLimit 2)."""
    snapshot = baseline(synced_app([entry(1, 1, -60)]))
    broken = synced_app([entry(1, 1, -60), entry(2, 2, 0)], images=[image(2)], health="Degraded", transition=at(5))
    stored = tick(broken, snapshot, at(6)).decided_snapshot
    assert stored is not None
    later = synced_app([entry(3, 3, 20), entry(4, 4, 30)], images=[image(4)], transition=at(31))
    result = tick(later, stored, at(32))
    assert [(d.ref, d.result) for d in result.deployments] == [
        ("h2", Result.FAILED),
        ("h3", Result.SUCCESS),
        ("h4", Result.SUCCESS),
    ]
    assert result.deployments[0].images == (image(2),) and result.deployments[0].revisions == (sha(2),)
    assert result.deployments[0].finished_at == at(0)
    assert not any("lost to revisionHistoryLimit" in note for note in result.notes)


def test_a_first_seen_apps_decided_snapshot_replans_to_the_same_deployments() -> None:
    entries = [entry(1, 1, -3 * 24 * 60), entry(2, 2, -30), entry(3, 3, -10)]
    app = synced_app(entries, health="Degraded", transition=at(-9))
    first = tick(app, None, at(0))
    assert refs(first) == ["h2", "h3"]
    stored = first.decided_snapshot
    assert stored is not None and stored.last_history_id == 1, "h1 predates the cluster: part of the baseline"
    again = tick(set_health(app, "Healthy", at(1)), stored, at(2))
    assert [(d.ref, d.result) for d in again.deployments] == [(d.ref, d.result) for d in first.deployments]


# -- pending entries leaving a short history -------------------------------------------------------------


def test_a_pending_entry_pushed_out_of_the_history_before_its_verdict_is_still_delivered() -> None:
    """revisionHistoryLimit 2: h2 is pending, then two more syncs leave only h3 and h4 in the CR."""
    snapshot = baseline(synced_app([entry(1, 1, -60)], images=[image(1)]))
    rolling = synced_app([entry(1, 1, -60), entry(2, 2, 0)], images=[image(2)], health="Progressing")
    rolling = set_health(rolling, "Progressing", at(0, seconds=2))
    first = tick(rolling, snapshot, at(1))
    assert first.deployments == () and first.snapshot.pending == PendingVerdict(2, at(1))
    kept = first.snapshot.pending_entry
    assert kept is not None and kept.ref == "h2" and kept.images == (image(2),)
    assert Snapshot.from_json(first.snapshot.to_json()) == first.snapshot

    pushed_out = synced_app([entry(3, 3, 5), entry(4, 4, 10)], images=[image(4)], transition=at(11))
    result = tick(pushed_out, first.snapshot, at(12))
    assert refs(result) == ["h2", "h3", "h4"]
    h2 = result.deployments[0]
    assert h2.result is Result.SUCCESS and h2.message == "superseded by a newer history entry"
    assert (h2.started_at, h2.finished_at, h2.revisions) == (at(0, seconds=-6), at(0), (sha(2),))
    assert h2.images == (image(2),), "what its sync applied, kept while it was pending"
    assert h2.deployment_class is DeploymentClass.NEW_REVISION
    assert h2.snapshot_after.last_history_id == 2 and h2.snapshot_after.pending is None
    assert not any("lost to revisionHistoryLimit" in note for note in result.notes)
    assert result.snapshot.pending_entry is None
    assert_chain(result)
    assert tick(pushed_out, result.snapshot, at(17)).deployments == ()


def test_a_pending_entry_superseded_in_the_history_carries_the_images_its_sync_applied() -> None:
    snapshot = baseline(synced_app([entry(7, 7, -60)], images=[image(7)]))
    rolling = synced_app([entry(7, 7, -60), entry(8, 8, 0)], images=[image(8)], health="Progressing")
    first = tick(set_health(rolling, "Progressing", at(0, seconds=1)), snapshot, at(1))
    entries = [entry(7, 7, -60), entry(8, 8, 0), entry(9, 9, 3)]
    second = tick(synced_app(entries, images=[image(9)], transition=at(4)), first.snapshot, at(5))
    h8, h9 = second.deployments
    assert h8.images == (image(8),) and h9.images == (image(9),)


# -- history ids restarting under the same uid ---------------------------------------------------------------


def epoch(minute: float) -> int:
    return int(at(minute).timestamp())


def test_history_restarted_with_two_syncs_before_the_next_run_is_detected() -> None:
    """History emptied (revisionHistoryLimit 0 then raised) and two syncs before the next run: ids 0 and 1 again."""
    snapshot = baseline(synced_app([entry(0, 0, -60), entry(1, 1, -50)], images=[image(1)]))
    restarted = synced_app([entry(0, 2, 0), entry(1, 3, 5)], images=[image(3)], transition=at(6))

    result = tick(restarted, snapshot, at(7))
    assert refs(result) == [f"h0-{epoch(0)}", f"h1-{epoch(5)}"], "ids distinct from the h0 and h1 already sent"
    assert [d.history_id for d in result.deployments] == [0, 1]
    assert result.deployments[0].deployment_class is DeploymentClass.INITIAL
    assert result.snapshot.history_restarts == 1 and result.snapshot.last_history_id == 1
    assert result.snapshot.covered_until == at(5)
    assert any("history ids restarted" in note for note in result.notes)
    assert_chain(result)

    crashed = tick(restarted, result.deployments[0].snapshot_after, at(8))
    assert refs(crashed) == [f"h1-{epoch(5)}"], "the same ids on a re-plan after a partial delivery"
    assert tick(restarted, result.snapshot, at(9)).deployments == ()
    entries = [entry(0, 2, 0), entry(1, 3, 5), entry(2, 4, 20)]
    (h2,) = tick(synced_app(entries, images=[image(4)], transition=at(21)), result.snapshot, at(22)).deployments
    assert h2.ref == f"h2-{epoch(20)}"


def test_history_restarted_past_the_recorded_id_is_detected_by_deployed_at() -> None:
    snapshot = baseline(synced_app([entry(0, 0, -60), entry(1, 1, -50)]))
    restarted = synced_app([entry(0, 2, 0), entry(1, 3, 2), entry(2, 4, 4)], transition=at(5))
    result = tick(restarted, snapshot, at(6))
    assert refs(result) == [f"h0-{epoch(0)}", f"h1-{epoch(2)}", f"h2-{epoch(4)}"]


def test_a_pending_entry_of_the_generation_before_a_restart_keeps_its_id() -> None:
    snapshot = baseline(synced_app([entry(4, 4, -60)]))
    rolling = synced_app([entry(4, 4, -60), entry(5, 5, -50)], health="Progressing", transition=at(-49))
    first = tick(rolling, snapshot, at(-48))
    assert first.snapshot.pending == PendingVerdict(5, at(-48))
    restarted = synced_app([entry(0, 6, 0), entry(1, 7, 2)], transition=at(3))
    result = tick(restarted, first.snapshot, at(4))
    assert refs(result) == ["h5", f"h0-{epoch(0)}", f"h1-{epoch(2)}"]
    assert result.deployments[0].result is Result.SUCCESS


def test_history_ids_going_down_in_an_older_snapshot_are_still_a_restart() -> None:
    """A snapshot stored before ``covered_until`` existed: its last deployment's start stands in for it."""
    stored = Snapshot.from_json(V1_SNAPSHOT)
    assert stored.covered_until is None
    restarted = synced_app([entry(0, 2, 0), entry(1, 3, 5)], transition=at(6))
    assert refs(tick(restarted, stored, at(7))) == [f"h0-{epoch(0)}", f"h1-{epoch(5)}"]


def test_an_app_that_never_restarted_keeps_plain_history_ids() -> None:
    snapshot = baseline(synced_app([entry(0, 0, -60), entry(1, 1, -50)]))
    app = synced_app([entry(0, 0, -60), entry(1, 1, -50), entry(2, 2, 0)], transition=at(1))
    result = tick(app, snapshot, at(2))
    assert refs(result) == ["h2"] and result.snapshot.history_restarts == 0


# -- an Application re-applied under a new uid -------------------------------------------------------------


def test_an_application_re_applied_with_its_history_does_not_send_it_again() -> None:
    """Deleted and re-applied from an export: a new uid, and status.history comes back with it."""
    entries = [entry(i, i, -200 + i) for i in range(20, 30)]
    old = synced_app(entries, images=[image(29)], uid=fake_uid("old"))
    snapshot = baseline(old)
    assert snapshot.covered_until == at(-171)
    re_applied = synced_app(entries, images=[image(29)], uid=fake_uid("new"))

    result = tick(re_applied, snapshot, at(3))
    assert result.deployments == ()
    assert result.snapshot.uid == fake_uid("new") and result.snapshot.last_history_id == 29
    assert any("re-applied" in note for note in result.notes)

    (h30,) = tick(synced_app([*entries, entry(30, 30, 5)], uid=fake_uid("new")), result.snapshot, at(6)).deployments
    assert h30.ref == "h30" and fake_uid("new")[:8] in h30.id


def test_a_re_applied_application_sends_only_what_was_not_recorded_under_the_old_uid() -> None:
    entries = [entry(i, i, -200 + i) for i in range(20, 25)]
    snapshot = baseline(synced_app(entries, uid=fake_uid("old")))
    re_applied = synced_app([*entries, entry(25, 25, 0)], uid=fake_uid("new"), transition=at(1))
    result = tick(re_applied, snapshot, at(2))
    assert refs(result) == ["h25"] and result.deployments[0].uid == fake_uid("new")


def test_a_re_applied_application_does_not_resend_its_recorded_failed_sync() -> None:
    app = synced_app([entry(1, 1, -60)], uid=fake_uid("old"))
    failed = with_operation_state(
        app, operation_state("Failed", at(-10), at(-9), revision=sha(2)), reconciled_at=at(-8)
    )
    first = tick(failed, baseline(app), at(-7))
    assert refs(first) == [f"op-{epoch(-10)}"]
    re_applied = with_operation_state(
        synced_app([entry(1, 1, -60)], uid=fake_uid("new")),
        operation_state("Failed", at(-10), at(-9), revision=sha(2)),
        reconciled_at=at(-8),
    )
    assert tick(re_applied, first.snapshot, at(0)).deployments == ()


def test_an_old_uids_undelivered_verdict_is_still_delivered_under_the_old_uid() -> None:
    snapshot = baseline(synced_app([entry(1, 1, -60)], uid=fake_uid("old")))
    broken = synced_app(
        [entry(1, 1, -60), entry(2, 2, -30)], health="Degraded", transition=at(-29), uid=fake_uid("old")
    )
    stored = tick(broken, snapshot, at(-28)).decided_snapshot
    assert stored is not None
    new_app = synced_app([entry(0, 9, 0)], uid=fake_uid("new"), transition=at(1))
    result = tick(new_app, stored, at(2))
    assert [(d.ref, d.uid, d.result) for d in result.deployments] == [
        ("h2", fake_uid("old"), Result.FAILED),
        ("h0", fake_uid("new"), Result.SUCCESS),
    ]


# -- image flip-flops ---------------------------------------------------------------------------------------


def test_image_flip_flop_without_a_usable_transition_time_gets_an_id_per_occurrence() -> None:
    """No lastTransitionTime (or one older than the snapshot): A -> B -> A -> B must give three ids, not two."""
    app = synced_app([entry(3, 3, -60)], images=[image("A")], transition=None)
    snapshot = baseline(app)
    ids: list[str] = []
    for minute, tag in ((5, "B"), (10, "A"), (15, "B")):
        result = tick(set_summary_images(app, [image(tag)]), snapshot, at(minute))
        (img,) = result.deployments
        assert tick(set_summary_images(app, [image(tag)]), snapshot, at(minute + 1)).deployments[0].ref == img.ref, (
            "a re-plan of the same occurrence keeps its id"
        )
        ids.append(img.ref)
        snapshot = result.snapshot
    assert len(set(ids)) == 3
    assert snapshot.last_image_change == ids[-1]


# -- the cluster's cut-off ----------------------------------------------------------------------------------


def test_the_cluster_cut_off_is_read_off_argo_cds_clock() -> None:
    app = synced_app([entry(1, 1, -60)], transition=at(-58))
    newest = newest_argocd_time(observe(app))
    assert newest == at(-58, seconds=5), "reconciledAt: the newest time the controller wrote"
    assert initialization_cutoff(at(10), newest) == newest, "a reconciler clock ahead does not move it later"
    assert initialization_cutoff(at(-70), newest) == at(-70), "a reconciler clock behind is the earlier reading"
    assert initialization_cutoff(at(10), None) == at(10) - CLOCK_SKEW_ALLOWANCE


# -- snapshots stored by the previous version ----------------------------------------------------------------


V1_SNAPSHOT = (
    '{"version":1,"settled_digest":null,"uid":"'
    + fake_uid("argocd/payments-api")
    + '","last_seen":"2025-06-03T08:30:00Z","last_history_id":1,"recent":[],'
    + '"images":{"quay.io/acme/payments-api":"'
    + sha(1)[:12]
    + '"},"commits":{"acme/payments-api":"'
    + sha(1)
    + '"},"last_failed_operation":null,"last_deployment_started_at":"2025-06-03T08:09:54Z",'
    + '"pending":{"history_id":2,"since":"2025-06-03T08:31:00Z"},"deleting_since":null}'
)
"""A snapshot exactly as the version before pending entries, decided verdicts and coverage stored it: h1 delivered,
h2 pending."""


def test_a_snapshot_stored_by_the_previous_version_loads_and_is_planned_from() -> None:
    stored = Snapshot.from_json(V1_SNAPSHOT)
    assert stored.last_history_id == 1 and stored.pending == PendingVerdict(2, at(-29))
    assert stored.pending_entry is None and stored.decided == () and stored.covered_until is None
    assert stored.to_json() == V1_SNAPSHOT, "a snapshot using none of the new fields is written as before"

    entries = [entry(1, 1, -50), entry(2, 2, -30)]
    result = tick(synced_app(entries, images=[image(2)], transition=at(-28)), stored, at(0))
    (h2,) = result.deployments
    assert h2.ref == "h2" and h2.result is Result.SUCCESS
    assert result.snapshot.covered_until == at(-30) and result.snapshot.pending is None


# -- properties ----------------------------------------------------------------------------------------------


HEALTHS = ["Healthy", "Progressing", "Degraded", "Missing", "Suspended", "Unknown", None]
PHASES = ["Succeeded", "Failed", "Error", "Running", "Terminating"]


@st.composite
def applications(draw: st.DrawFn, uid: str | None = None) -> dict[str, Any]:
    """A random but well-formed Application: contiguous history, an operation, health, sync, images."""
    first_id = draw(st.integers(0, 5))
    count = draw(st.integers(0, 6))
    minute = -draw(st.integers(30, 3000))
    entries = []
    for offset in range(count):
        minute += draw(st.integers(1, 600))
        source = git_source(helm_parameters={"image.tag": draw(st.sampled_from(["1", "2"]))})
        revision = sha(draw(st.sampled_from("abc")))
        entries.append(history_entry(first_id + offset, revision, at(min(minute, 0)), source=source))
    op_kind = draw(st.sampled_from(["none", "producer", "later"]))
    state = None
    if op_kind == "producer" and entries:
        newest = entries[-1]
        state = operation_state(
            "Succeeded",
            newest["deployStartedAt"],
            newest["deployedAt"],
            revision=newest["revision"],
            images=draw(st.none() | st.just([image(newest["revision"][:4])])),
        )
    elif op_kind == "later":
        started = at(draw(st.integers(-120, 0)))
        phase = draw(st.sampled_from(PHASES))
        finished: datetime | None = started + timedelta(seconds=draw(st.integers(1, 300)))
        if phase == "Running" and not draw(st.booleans()):
            finished = None
        state = operation_state(
            phase,
            started,
            finished,
            revision=sha(draw(st.sampled_from("abcd"))),
            images=[image(draw(st.sampled_from("abcd")))],
            retry_count=draw(st.integers(0, 3)),
            dry_run=draw(st.booleans()) and draw(st.booleans()),
            resources=[{"kind": "Deployment"}] if draw(st.booleans()) and draw(st.booleans()) else None,
        )
    summary = draw(st.lists(st.sampled_from([image("a"), image("b"), image("c"), "busybox:1.36.1"]), max_size=3))
    app = make_app(
        uid=uid or draw(st.sampled_from([fake_uid("one"), fake_uid("two")])),
        history=entries,
        operation_state=state,
        sync_status=draw(st.sampled_from(["Synced", "OutOfSync", "Unknown"])),
        health_status=draw(st.sampled_from(HEALTHS)),
        health_transition_at=draw(st.none() | st.integers(-600, 0).map(at)),
        summary_images=summary,
        deletion_timestamp=at(0) if draw(st.integers(0, 9)) == 0 else None,
    )
    if draw(st.integers(0, 4)) == 0:
        app = set_reconciled(app, at(draw(st.integers(-700, 0))))
    if draw(st.integers(0, 4)) == 0:
        app = with_operation(app, sha("d"))
    return app


@st.composite
def situations(draw: st.DrawFn) -> tuple[AppObservation, Snapshot | None, PlannerPolicy]:
    app = draw(applications())
    snapshot: Snapshot | None = None
    if draw(st.booleans()):
        earlier = draw(applications())
        snapshot = plan(observe(earlier), None, at(-800), policy(initialized_at=None)).snapshot
        if draw(st.booleans()):
            snapshot = snapshot.evolve(pending=PendingVerdict(_next_id(snapshot), at(-90)))
    initialized = draw(st.sampled_from([INIT, None]))
    chosen = policy(
        initialized_at=initialized,
        first_run=draw(st.sampled_from(["baseline", "backfill"])),
        verdict_timeout=timedelta(minutes=draw(st.sampled_from([1, 60]))),
        since=draw(st.none() | st.integers(-3000, 0).map(at)),
    )
    return observe(app), snapshot, chosen


def _next_id(snapshot: Snapshot) -> int:
    return 0 if snapshot.last_history_id is None else snapshot.last_history_id + 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations())
def test_property_the_same_observation_twice_never_emits_twice(
    situation: tuple[AppObservation, Snapshot | None, PlannerPolicy],
) -> None:
    observation, snapshot, chosen = situation
    now = at(1)
    first = plan(observation, snapshot, now, chosen)
    assert_chain(first)
    stored = snapshot if first.deferred else first.snapshot
    initialised = dataclasses.replace(chosen, initialized_at=chosen.initialized_at or now)
    second = plan(observation, stored, now, initialised)
    assert second.deployments == (), [d.id for d in second.deployments]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations())
def test_property_ids_are_unique_and_stable(situation: tuple[AppObservation, Snapshot | None, PlannerPolicy]) -> None:
    observation, snapshot, chosen = situation
    first = plan(observation, snapshot, at(1), chosen)
    again = plan(observation, snapshot, at(1), chosen)
    assert first == again
    ids = [d.id for d in first.deployments]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"h\d+(-\d+)?|op-\d+|img-[0-9a-f]{12}", d.ref) for d in first.deployments)
    marks = [d.snapshot_after.last_history_id or -1 for d in first.deployments]
    assert marks == sorted(marks), "the high-water mark never moves back within a plan"
    finished = [d.finished_at for d in first.deployments if d.kind is DeploymentKind.HISTORY]
    assert finished == sorted(finished), "history deployments come oldest first"


ACTIONS = st.sampled_from(["deploy", "deploy", "health", "fail", "images", "tick", "tick", "stale"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(st.tuples(ACTIONS, st.integers(0, 3), st.sampled_from(HEALTHS[:4])), max_size=25),
    limit=st.sampled_from([3, 10]),
)
def test_property_ticks_with_partial_deliveries_lose_nothing_and_send_nothing_twice(
    actions: list[tuple[str, int, str]], limit: int
) -> None:
    """A life of deploys, health changes, failed syncs and image changes, with ticks that deliver only a
    prefix of their plan (a crash or DevLake outage): no id is ever delivered twice, and every entry still
    in the history at the end is delivered once the app settles."""
    uid = fake_uid("life")
    entries: list[dict[str, Any]] = [entry(0, "start", -1000)]
    op = operation_state("Succeeded", entries[0]["deployStartedAt"], entries[0]["deployedAt"], revision=sha("start"))
    health, transition, summary = "Healthy", at(-999), [image("start")]
    minute = 0
    stale = False

    def current() -> dict[str, Any]:
        app = make_app(
            uid=uid,
            history=entries,
            operation_state=op,
            health_status=health,
            health_transition_at=transition,
            summary_images=summary,
        )
        return set_reconciled(app, at(minute - 3)) if stale else app

    stored = tick(current(), None, at(minute), initialized_at=None).snapshot
    baseline_ids = {e["id"] for e in entries}
    delivered: list[str] = []
    for action, number, new_health in actions:
        minute += 7
        stale = False
        if action == "deploy":
            new = entry(entries[-1]["id"] + 1, f"r{minute}", minute)
            entries = [*entries, new][-limit:]
            op = operation_state(
                "Succeeded",
                new["deployStartedAt"],
                new["deployedAt"],
                revision=new["revision"],
                images=[image(f"r{minute}")],
            )
            health, transition, summary = "Progressing", at(minute, seconds=1), [image(f"r{minute}")]
        elif action == "health":
            health, transition = new_health, at(minute)
        elif action == "fail":
            op = operation_state("Failed", at(minute - 1), at(minute), revision=sha(f"f{minute}"), retry_count=number)
        elif action == "images":
            summary, transition, health = [image(f"i{minute}")], at(minute), "Healthy"
        elif action == "stale":
            stale = True
        if action in ("tick", "stale") or number == 0:
            result = tick(current(), stored, at(minute))
            for deployment in result.deployments:
                assert deployment.id not in delivered, f"{deployment.id} delivered twice"
            keep = len(result.deployments) if number >= 2 else min(number, len(result.deployments))
            delivered += [d.id for d in result.deployments[:keep]]
            if keep:
                stored = result.deployments[keep - 1].snapshot_after
            elif not result.deployments and not result.deferred:
                stored = result.snapshot

    minute += 120
    health, transition, stale = "Healthy", at(minute - 1), False
    final = tick(current(), stored, at(minute))
    for deployment in final.deployments:
        assert deployment.id not in delivered, f"{deployment.id} delivered twice"
    delivered += [d.id for d in final.deployments]
    assert final.snapshot.pending is None
    present = {e["id"] for e in entries} - baseline_ids
    delivered_history = {int(i.rsplit(":h", 1)[1]) for i in delivered if ":h" in i}
    assert present <= delivered_history
    assert tick(current(), final.snapshot, at(minute + 5)).deployments == ()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    actions=st.lists(st.tuples(ACTIONS, st.integers(0, 3), st.sampled_from(HEALTHS[:4])), max_size=25),
    limit=st.sampled_from([2, 3, 10]),
)
def test_property_stored_verdicts_never_change_and_nothing_seen_is_lost(
    actions: list[tuple[str, int, str]], limit: int
) -> None:
    """As the reconciler does: ``decided_snapshot`` is stored before each delivery, which then delivers only a
    prefix of the plan. A history id's result never changes once planned, no id is delivered twice, and every
    entry a tick saw is delivered by the end, even after leaving a short history."""
    uid = fake_uid("life")
    entries: list[dict[str, Any]] = [entry(0, "start", -1000)]
    op = operation_state("Succeeded", entries[0]["deployStartedAt"], entries[0]["deployedAt"], revision=sha("start"))
    health, transition, summary = "Healthy", at(-999), [image("start")]
    minute = 0

    def current() -> dict[str, Any]:
        return make_app(
            uid=uid,
            history=entries,
            operation_state=op,
            health_status=health,
            health_transition_at=transition,
            summary_images=summary,
        )

    stored = tick(current(), None, at(minute), initialized_at=None).snapshot
    seen: set[int] = set()
    results: dict[str, Result] = {}
    delivered: list[str] = []

    def run(number: int) -> Snapshot:
        result = tick(current(), stored, at(minute))
        seen.update(e["id"] for e in entries if e["id"] > 0)
        for deployment in result.deployments:
            assert deployment.id not in delivered, f"{deployment.id} delivered twice"
            assert results.setdefault(deployment.id, deployment.result) is deployment.result, deployment.id
        keep = len(result.deployments) if number >= 2 else min(number, len(result.deployments))
        delivered.extend(d.id for d in result.deployments[:keep])
        if keep:
            return result.deployments[keep - 1].snapshot_after
        if result.deployments:
            return result.decided_snapshot or stored
        return result.snapshot

    for action, number, new_health in actions:
        minute += 7
        if action == "deploy":
            new = entry(entries[-1]["id"] + 1, f"r{minute}", minute)
            entries = [*entries, new][-limit:]
            op = operation_state(
                "Succeeded",
                new["deployStartedAt"],
                new["deployedAt"],
                revision=new["revision"],
                images=[image(f"r{minute}")],
            )
            health, transition, summary = "Progressing", at(minute, seconds=1), [image(f"r{minute}")]
        elif action == "health":
            health, transition = new_health, at(minute)
        elif action == "fail":
            op = operation_state("Failed", at(minute - 1), at(minute), revision=sha(f"f{minute}"), retry_count=number)
        elif action == "images":
            summary, transition, health = [image(f"i{minute}")], at(minute), "Healthy"
        if action in ("tick", "stale") or number == 0:
            stored = run(number)

    minute += 120
    health, transition = "Healthy", at(minute - 1)
    stored = run(2)
    assert stored.pending is None and stored.decided == ()
    delivered_history = {int(i.rsplit(":h", 1)[1]) for i in delivered if ":h" in i}
    assert seen <= delivered_history, "an entry a tick saw is never lost"
    assert tick(current(), stored, at(minute + 5)).deployments == ()
