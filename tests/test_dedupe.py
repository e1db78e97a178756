"""Component dedupe (``dedupe.assign``), one test per rule, on the markers the store would hold."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.dedupe import (
    OCCURRENCES_PROBED,
    AppSteps,
    Claims,
    Step,
    Target,
    assign,
    change_fingerprint,
    change_marker,
    claim_key,
    component_marker,
    intended_claims,
    markers_to_read,
    settle_claims,
    shipped_fingerprint,
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
    deployment_id,
)
from tests.factories import at, fake_sha, fake_uid

COMPONENT = "payments-api"
CHANGE = "f" * 32
"""A change fingerprint (``change_fingerprint``)."""
OTHER_CHANGE = "e" * 32
IMAGE = "d" * 32
"""An alias: the commits a payload ships (``shipped_fingerprint``)."""
OTHER_IMAGE = "c" * 32


def key(name: str) -> AppKey:
    return AppKey("prod-east", "argocd", name)


def uid(name: str) -> str:
    return fake_uid(f"argocd/{name}")


def id_of(name: str, ref: str) -> str:
    return deployment_id(key(name), uid(name), ref)


def app(name: str, *steps: tuple[str, str | None], connections: Sequence[int] = (1,)) -> AppSteps:
    """``name`` deploying ``(ref, fingerprint)`` after ``(ref, fingerprint)``, to ``connections``."""
    return AppSteps(
        key(name),
        uid(name),
        COMPONENT,
        [Step(id_of(name, ref), fingerprint, tuple(connections)) for ref, fingerprint in steps],
    )


def aliased(name: str, ref: str, fingerprint: str, *aliases: str, connections: Sequence[int] = (1,)) -> AppSteps:
    """``name`` deploying one change known by ``fingerprint`` and by ``aliases``."""
    return AppSteps(key(name), uid(name), COMPONENT, [Step(id_of(name, ref), fingerprint, tuple(connections), aliases)])


def changed(name: str, occurrence: int, fingerprint: str = CHANGE) -> str:
    """``name`` recorded its ``occurrence``-th making of the change."""
    return change_marker(key(name), uid(name), fingerprint, occurrence)


def in_devlake(occurrence: int, fingerprint: str = CHANGE, connection: int = 1) -> str:
    """The component's ``occurrence``-th making of the change was delivered to ``connection``."""
    return component_marker(connection, COMPONENT, fingerprint, occurrence)


def sent(name: str, ref: str, connection: int = 1) -> str:
    return Target(connection, id_of(name, ref)).sent


def decide(*apps: AppSteps, existing: Sequence[str] = (), claimed: dict[str, str] | None = None) -> Claims:
    return assign(apps, set(existing), "component", claimed)


# -- who sends a shared change ---------------------------------------------------------------------------


def test_the_first_application_in_listing_order_sends_a_change_its_twin_makes_too() -> None:
    claims = decide(app("payments-api-eu", ("h1", CHANGE)), app("payments-api-us", ("h1", CHANGE)))
    eu, us = claims.of(id_of("payments-api-eu", "h1")), claims.of(id_of("payments-api-us", "h1"))
    assert eu.duplicates == {}
    assert us.duplicates == {1: f"sent as {id_of('payments-api-eu', 'h1')}"}
    assert eu.components == us.components == {1: in_devlake(1)}
    assert (eu.change, us.change) == (changed("payments-api-eu", 1), changed("payments-api-us", 1))
    assert claims.holders == {in_devlake(1): id_of("payments-api-eu", "h1")}


def test_listing_order_not_names_decides_the_sender() -> None:
    claims = decide(app("payments-api-us", ("h1", CHANGE)), app("payments-api-eu", ("h1", CHANGE)))
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {}
    assert claims.of(id_of("payments-api-eu", "h1")).duplicates == {1: f"sent as {id_of('payments-api-us', 'h1')}"}


def test_a_change_delivered_on_an_earlier_run_is_not_sent_again_by_a_twin() -> None:
    claims = decide(app("payments-api-us", ("h1", CHANGE)), existing=[in_devlake(1), changed("payments-api-eu", 1)])
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {1: "already in DevLake"}
    assert claims.holders == {}


def test_a_change_claimed_on_an_earlier_page_stays_with_its_holder() -> None:
    """The holder may be held back (DevLake down): it sends on the next run, and the twin still must not."""
    holder = id_of("payments-api-eu", "h1")
    claims = decide(app("payments-api-us", ("h1", CHANGE)), claimed={in_devlake(1): holder})
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {1: f"sent as {holder}"}
    assert claims.holders == {in_devlake(1): holder}


def test_different_changes_of_one_component_are_each_sent() -> None:
    claims = decide(app("payments-api-eu", ("h1", CHANGE)), app("payments-api-us", ("h1", OTHER_CHANGE)))
    assert claims.of(id_of("payments-api-eu", "h1")).duplicates == {}
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {}


def test_different_components_never_share_a_change() -> None:
    search = AppSteps(
        key("search-api"), uid("search-api"), "search-api", [Step(id_of("search-api", "h1"), CHANGE, (1,))]
    )
    claims = decide(app("payments-api", ("h1", CHANGE)), search)
    assert claims.of(id_of("search-api", "h1")).duplicates == {}
    assert claims.of(id_of("search-api", "h1")).components == {1: component_marker(1, "search-api", CHANGE, 1)}


# -- aliases: one change known by what it deploys and by what its payload ships ---------------------------------


def test_twins_deploying_one_image_through_two_gitops_commits_make_one_change() -> None:
    """Their revisions differ (CHANGE, OTHER_CHANGE); their payloads ship the same image commit (IMAGE)."""
    claims = decide(
        aliased("payments-api-eu", "h1", CHANGE, IMAGE), aliased("payments-api-us", "h1", OTHER_CHANGE, IMAGE)
    )
    eu, us = claims.of(id_of("payments-api-eu", "h1")), claims.of(id_of("payments-api-us", "h1"))
    assert eu.duplicates == {}
    assert us.duplicates == {1: f"sent as {id_of('payments-api-eu', 'h1')}"}
    assert eu.markers(1) == (in_devlake(1), in_devlake(1, IMAGE))
    assert us.markers(1) == (in_devlake(1, OTHER_CHANGE), in_devlake(1, IMAGE))
    assert eu.changes == (changed("payments-api-eu", 1), changed("payments-api-eu", 1, IMAGE))
    assert claims.holders == {
        marker: id_of("payments-api-eu", "h1") for marker in (*eu.markers(1), in_devlake(1, OTHER_CHANGE))
    }, "us's own fingerprint goes to eu too: a third Application knowing the change only by it matches"


def test_a_change_in_devlake_under_an_alias_is_not_sent_again() -> None:
    existing = [in_devlake(1, IMAGE), changed("payments-api-eu", 1, IMAGE)]
    claims = decide(aliased("payments-api-us", "h1", OTHER_CHANGE, IMAGE), existing=existing)
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {1: "already in DevLake"}


def test_a_duplicate_by_one_fingerprint_passes_its_sender_on_to_the_others() -> None:
    """us matches eu by the image; ap, catching up, knows no image and matches us by the revision only."""
    claims = decide(
        aliased("payments-api-eu", "h1", CHANGE, IMAGE),
        aliased("payments-api-us", "h1", OTHER_CHANGE, IMAGE),
        aliased("payments-api-ap", "h1", OTHER_CHANGE, OTHER_IMAGE),
    )
    sender = f"sent as {id_of('payments-api-eu', 'h1')}"
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {1: sender}
    assert claims.of(id_of("payments-api-ap", "h1")).duplicates == {1: sender}


def test_aliases_are_counted_per_application_like_the_fingerprint() -> None:
    """eu shipped the image once before: this is its second time, which matches only another's second."""
    existing = [changed("payments-api-eu", 1, IMAGE), in_devlake(1, IMAGE)]
    claims = decide(aliased("payments-api-eu", "h3", CHANGE, IMAGE), existing=existing)
    decision = claims.of(id_of("payments-api-eu", "h3"))
    assert decision.duplicates == {}
    assert decision.markers(1) == (in_devlake(1), in_devlake(2, IMAGE))


def test_every_key_of_a_change_is_claimed_at_once_and_one_held_elsewhere_makes_it_a_duplicate() -> None:
    claims = decide(aliased("payments-api-us", "h1", OTHER_CHANGE, IMAGE))
    us = id_of("payments-api-us", "h1")
    assert intended_claims(claims) == [(us, 1, (in_devlake(1, OTHER_CHANGE), in_devlake(1, IMAGE)))]
    eu = id_of("payments-api-eu", "h1")
    settled = settle_claims(claims, {claim_key(in_devlake(1, OTHER_CHANGE)): eu, claim_key(in_devlake(1, IMAGE)): eu})
    assert settled.of(us).duplicates == {1: f"sent as {eu}"}
    won = settle_claims(claims, {claim_key(in_devlake(1, OTHER_CHANGE)): us, claim_key(in_devlake(1, IMAGE)): us})
    assert won.of(us).duplicates == {}


def test_the_alias_is_the_commits_the_payload_ships() -> None:
    assert shipped_fingerprint(_enriched("payments-api-eu"), environment="PRODUCTION") == shipped_fingerprint(
        _enriched("payments-api-us"), environment="PRODUCTION"
    )
    assert shipped_fingerprint(_enriched("payments-api-eu"), environment="STAGING") != shipped_fingerprint(
        _enriched("payments-api-eu"), environment="PRODUCTION"
    )
    failed = shipped_fingerprint(_enriched("payments-api-eu", Result.FAILED), environment="PRODUCTION")
    assert failed != shipped_fingerprint(_enriched("payments-api-eu"), environment="PRODUCTION")
    nothing = EnrichedDeployment(_enriched("payments-api-eu").deployment, heads=(), history=())
    assert shipped_fingerprint(nothing, environment="PRODUCTION") is None


# -- occurrences: rollbacks and roll-forwards ------------------------------------------------------------


def test_making_a_change_again_after_a_rollback_is_a_new_occurrence_and_goes_out() -> None:
    """eu went 1 -> 0 -> 1: the second forward is eu's second making of the change, not in DevLake yet."""
    claims = decide(app("payments-api-eu", ("h3", CHANGE)), existing=[changed("payments-api-eu", 1), in_devlake(1)])
    decision = claims.of(id_of("payments-api-eu", "h3"))
    assert decision.duplicates == {}
    assert decision.change == changed("payments-api-eu", 2)
    assert decision.components == {1: in_devlake(2)}


def test_a_twins_nth_making_of_a_change_matches_only_the_others_nth() -> None:
    existing = [changed("payments-api-eu", 1), changed("payments-api-eu", 2), in_devlake(1), in_devlake(2)]
    first = decide(app("payments-api-us", ("h1", CHANGE)), existing=existing)
    assert first.of(id_of("payments-api-us", "h1")).duplicates == {1: "already in DevLake"}
    third = decide(
        app("payments-api-us", ("h3", CHANGE)),
        existing=[*existing, changed("payments-api-us", 1), changed("payments-api-us", 2)],
    )
    assert third.of(id_of("payments-api-us", "h3")).duplicates == {}, "eu never made it a third time"
    assert third.of(id_of("payments-api-us", "h3")).components == {1: in_devlake(3)}


def test_one_application_making_a_change_twice_in_one_run_counts_both() -> None:
    claims = decide(app("payments-api-eu", ("h1", CHANGE), ("h2", OTHER_CHANGE), ("h3", CHANGE)))
    assert claims.of(id_of("payments-api-eu", "h1")).change == changed("payments-api-eu", 1)
    assert claims.of(id_of("payments-api-eu", "h3")).change == changed("payments-api-eu", 2)
    assert claims.of(id_of("payments-api-eu", "h3")).components == {1: in_devlake(2)}
    assert all(not claims.of(id_of("payments-api-eu", ref)).duplicates for ref in ("h1", "h2", "h3"))


def test_past_the_occurrences_looked_up_a_change_is_sent_anyway() -> None:
    existing = [changed("payments-api-us", n) for n in range(1, OCCURRENCES_PROBED + 1)]
    claims = decide(app("payments-api-us", ("h9", CHANGE)), existing=[*existing, in_devlake(OCCURRENCES_PROBED + 1)])
    assert claims.of(id_of("payments-api-us", "h9")).duplicates == {}
    assert claims.of(id_of("payments-api-us", "h9")).change is None, "not deduplicated: a duplicate beats a loss"


# -- environments and results ----------------------------------------------------------------------------


def _enriched(name: str, result: Result = Result.SUCCESS) -> EnrichedDeployment:
    sha = fake_sha("payments-api-2")
    head = Commit("acme/payments-api", "https://github.com/acme/payments-api", sha, "Fix", at(0))
    deployment = Deployment(
        key=key(name),
        uid=uid(name),
        kind=DeploymentKind.HISTORY,
        ref="h1",
        result=result,
        deployment_class=DeploymentClass.NEW_REVISION,
        started_at=at(1),
        finished_at=at(2),
        revisions=(sha,),
        sources=(),
        snapshot_after=Snapshot(uid=uid(name), last_seen=at(2)),
    )
    return EnrichedDeployment(deployment, heads=(head,), history=(head,))


def test_a_staging_deployment_never_hides_the_production_one() -> None:
    staging = change_fingerprint(_enriched("payments-api-staging"), environment="STAGING")
    production = change_fingerprint(_enriched("payments-api-prod"), environment="PRODUCTION")
    claims = decide(app("payments-api-staging", ("h1", staging)), app("payments-api-prod", ("h1", production)))
    assert claims.of(id_of("payments-api-prod", "h1")).duplicates == {}


def test_a_success_after_a_failure_of_the_same_commits_is_not_a_duplicate() -> None:
    failed = change_fingerprint(_enriched("payments-api-eu", Result.FAILED), environment="PRODUCTION")
    succeeded = change_fingerprint(_enriched("payments-api-us"), environment="PRODUCTION")
    claims = decide(app("payments-api-eu", ("h1", failed)), app("payments-api-us", ("h1", succeeded)))
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {}


# -- what was recorded before ----------------------------------------------------------------------------


def test_a_backfill_seeing_recorded_deployments_does_not_count_them_again() -> None:
    """h1 was sent (its change counted as occurrence 1); the backfill's new h2 makes the change a second time."""
    claims = decide(
        app("payments-api-eu", ("h1", CHANGE), ("h2", CHANGE)),
        existing=[sent("payments-api-eu", "h1"), changed("payments-api-eu", 1), in_devlake(1)],
    )
    assert id_of("payments-api-eu", "h1") not in claims.decisions, "recorded: nothing to decide"
    assert claims.of(id_of("payments-api-eu", "h2")).change == changed("payments-api-eu", 2)
    assert claims.of(id_of("payments-api-eu", "h2")).duplicates == {}


def test_a_deployment_recorded_at_one_connection_is_decided_for_the_other_without_claiming_the_first() -> None:
    eu = app("payments-api-eu", ("h1", CHANGE), connections=(1, 6))
    claims = decide(eu, existing=[sent("payments-api-eu", "h1", connection=1)])
    decision = claims.of(id_of("payments-api-eu", "h1"))
    assert decision.components == {1: in_devlake(1, connection=1), 6: in_devlake(1, connection=6)}
    assert claims.holders == {in_devlake(1, connection=6): id_of("payments-api-eu", "h1")}
    assert decision.duplicates == {1: "already in DevLake"}, "connection 1 is skipped as sent before it gets here"


def test_each_connection_is_decided_on_its_own() -> None:
    existing = [in_devlake(1, connection=6), changed("payments-api-eu", 1)]
    claims = decide(app("payments-api-us", ("h1", CHANGE), connections=(1, 6)), existing=existing)
    assert claims.of(id_of("payments-api-us", "h1")).duplicates == {6: "already in DevLake"}


def test_a_deployment_without_a_change_fingerprint_is_not_deduplicated() -> None:
    claims = decide(app("payments-api-eu", ("h1", None)), app("payments-api-us", ("h1", None)))
    assert claims.decisions == {} and claims.holders == {}


def test_application_mode_decides_nothing_and_reads_only_the_delivery_markers() -> None:
    apps = [app("payments-api-eu", ("h1", CHANGE)), app("payments-api-us", ("h1", CHANGE))]
    claims = assign(apps, set(), "application")
    assert claims.decisions == {} and claims.holders == {}
    wanted = markers_to_read(apps, "application")
    targets = [Target(1, id_of(name, "h1")) for name in ("payments-api-eu", "payments-api-us")]
    assert wanted == [marker for t in targets for marker in (t.sent, t.deduped, t.rejected, t.queued)]


# -- the one store read ----------------------------------------------------------------------------------

NAMES = ("payments-api-eu", "payments-api-us", "payments-api-ap")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[AppSteps], set[str]]:
    """Apps of one component deploying a few changes to one or two connections, and markers in the store: each
    app's earlier occurrences of each change (up to past what is looked up), deliveries and component changes."""
    apps = []
    universe: list[str] = []
    existing: set[str] = set()
    for name in draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=3, unique=True)):
        refs = [f"h{n}" for n in range(draw(st.integers(1, 4)))]
        steps = [(ref, draw(st.sampled_from([CHANGE, OTHER_CHANGE, None]))) for ref in refs]
        aliases = [tuple(draw(st.lists(st.sampled_from([IMAGE, OTHER_IMAGE, CHANGE]), max_size=2))) for _ in refs]
        connections = draw(st.sampled_from([(1,), (1, 6)]))
        apps.append(
            AppSteps(
                key(name),
                uid(name),
                COMPONENT,
                [
                    Step(id_of(name, ref), fingerprint, connections, alias)
                    for (ref, fingerprint), alias in zip(steps, aliases, strict=True)
                ],
            )
        )
        for change in (CHANGE, OTHER_CHANGE, IMAGE, OTHER_IMAGE):
            earlier = draw(st.integers(0, OCCURRENCES_PROBED + 1))
            existing |= {changed(name, n, change) for n in range(1, earlier + 1)}
        for ref, fingerprint in steps:
            for connection in connections:
                target = Target(connection, id_of(name, ref))
                universe += [target.sent, target.deduped, target.rejected, target.queued]
                for change in (fingerprint or CHANGE, IMAGE, OTHER_IMAGE):
                    universe += [in_devlake(n, change, connection) for n in range(1, 14)]
    existing |= draw(st.sets(st.sampled_from(universe), max_size=30))
    return apps, existing


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_the_markers_read_are_all_the_decisions_depend_on(scenario: tuple[list[AppSteps], set[str]]) -> None:
    apps, existing = scenario
    read = set(markers_to_read(apps, "component"))
    assert assign(apps, existing & read, "component") == assign(apps, existing, "component")
