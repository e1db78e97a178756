"""The per-connection breaker of a tick (``delivery.ConnectionBreaker``), one test per rule."""

from __future__ import annotations

import pytest

from reconciler.delivery import OUTAGE_FAILURES, ConnectionBreaker
from reconciler.devlake import CONFIGURATION_STATUSES, Delivery, DeliveryOutcome

ACCEPTED = Delivery(DeliveryOutcome.DELIVERED, 200, "ok", 1)
DEAD_LETTERED = Delivery(DeliveryOutcome.REJECTED, 400, "deployment_commits is empty (400)", 1)
OUTAGE = Delivery(DeliveryOutcome.RETRY_LATER, 503, "service unavailable", 6)
UNREACHABLE = Delivery(DeliveryOutcome.RETRY_LATER, None, "connection refused", 6)


def fail(breaker: ConnectionBreaker, connection: int, times: int, delivery: Delivery = OUTAGE) -> list[str | None]:
    return [breaker.record(connection, delivery) for _ in range(times)]


def test_a_fresh_connection_is_tried() -> None:
    assert ConnectionBreaker().held_back(1) is None


def test_an_outage_holds_the_connection_back_at_the_threshold_and_says_so_once() -> None:
    breaker = ConnectionBreaker()
    assert fail(breaker, 1, OUTAGE_FAILURES - 1) == [None] * (OUTAGE_FAILURES - 1)
    assert breaker.held_back(1) is None, "below the threshold every delivery is still tried"
    reason = f"{OUTAGE_FAILURES} deliveries failed and none succeeded: service unavailable"
    assert breaker.record(1, OUTAGE) == reason
    assert breaker.held_back(1) == reason
    assert fail(breaker, 1, 3) == [None] * 3, "reported once"
    assert breaker.held_back(1) == reason


def test_failures_without_a_response_count_as_an_outage_too() -> None:
    breaker = ConnectionBreaker()
    assert fail(breaker, 1, OUTAGE_FAILURES, UNREACHABLE)[-1] is not None


def test_a_connection_that_accepted_a_delivery_is_never_held_back_for_failures() -> None:
    """One bad payload (or a few) among good ones must not stop the good ones."""
    breaker = ConnectionBreaker()
    assert breaker.record(1, ACCEPTED) is None
    assert fail(breaker, 1, OUTAGE_FAILURES * 3) == [None] * (OUTAGE_FAILURES * 3)
    assert breaker.held_back(1) is None


def test_an_answer_after_failures_keeps_the_connection_open() -> None:
    breaker = ConnectionBreaker()
    fail(breaker, 1, OUTAGE_FAILURES - 1)
    breaker.record(1, ACCEPTED)
    assert fail(breaker, 1, OUTAGE_FAILURES) == [None] * OUTAGE_FAILURES
    assert breaker.held_back(1) is None


def test_a_dead_lettered_payload_is_an_answer() -> None:
    breaker = ConnectionBreaker()
    breaker.record(1, DEAD_LETTERED)
    fail(breaker, 1, OUTAGE_FAILURES)
    assert breaker.held_back(1) is None


@pytest.mark.parametrize("status", sorted(CONFIGURATION_STATUSES))
def test_a_refused_key_or_connection_id_holds_the_connection_back_at_once(status: int) -> None:
    breaker = ConnectionBreaker()
    refused = Delivery(DeliveryOutcome.RETRY_LATER, status, "api key is invalid", 1)
    assert breaker.record(1, refused) == "configuration refused: api key is invalid"
    assert breaker.held_back(1) == "configuration refused: api key is invalid"


def test_a_key_refused_after_deliveries_were_accepted_still_holds_the_connection_back() -> None:
    """A key revoked during the run: every further delivery would be refused the same way."""
    breaker = ConnectionBreaker()
    breaker.record(1, ACCEPTED)
    assert breaker.record(1, Delivery(DeliveryOutcome.RETRY_LATER, 403, "api key is invalid", 1)) is not None
    assert breaker.held_back(1) is not None


def test_a_key_that_is_not_set_holds_the_connection_back_without_a_request() -> None:
    breaker = ConnectionBreaker()
    missing = Delivery(DeliveryOutcome.RETRY_LATER, None, "the environment variable DEVLAKE_KEY_1 is not set", 0)
    assert breaker.record(1, missing) == "configuration refused: the environment variable DEVLAKE_KEY_1 is not set"


def test_connections_are_held_back_independently() -> None:
    breaker = ConnectionBreaker()
    fail(breaker, 1, OUTAGE_FAILURES)
    fail(breaker, 6, OUTAGE_FAILURES - 1)
    assert breaker.held_back(1) is not None
    assert breaker.held_back(6) is None


def test_the_threshold_is_the_breakers_own() -> None:
    breaker = ConnectionBreaker(outage_failures=1)
    assert breaker.record(1, OUTAGE) == "1 deliveries failed and none succeeded: service unavailable"
