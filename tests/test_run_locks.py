"""The run locks with runs that really overlap: a run that does not get a lock never releases one it does not own,
and runs started at the same moment never all fail. Against a real Redis and SQLite; runs are threads started
together at a barrier (no sleeps)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from reconciler import exitcodes
from reconciler.devlake import Delivery, DevLakeClient
from reconciler.store import RedisStore, SQLiteStore, Store
from tests.scenarios import three_deployments_waiting
from tests.state import another_client
from tests.test_delivery import ids_of, open_state, open_world
from tests.world import World

LAYOUT = "layout:prod-east"


@contextmanager
def first_run_gated(world: World) -> Iterator[tuple[threading.Event, threading.Event, list[int]]]:
    """A run in a thread that stops at its first POST until released; yields (inside, release, its exit code)."""
    inside, release = threading.Event(), threading.Event()
    lock = threading.Lock()
    real_deliver = DevLakeClient.deliver

    def deliver(self: DevLakeClient, connection: Any, payload: Any, deadline: float) -> Delivery:
        with lock:
            first = not inside.is_set()
            inside.set()
        if first and not release.wait(30):
            raise AssertionError("the test never released the first run")
        return real_deliver(self, connection, payload, deadline)

    code: list[int] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(DevLakeClient, "deliver", deliver)
        runner = threading.Thread(target=lambda: code.append(world.run()), daemon=True)
        runner.start()
        try:
            assert inside.wait(30), "the first run never reached DevLake"
            yield inside, release, code
        finally:
            release.set()
            runner.join(30)


def test_a_run_that_exits_3_leaves_the_working_runs_layout_lock_in_place(
    tmp_path: Any, state_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, the second unsharded run joined the layout lock, failed on its run lock, and released the layout lock
    on its way out: a shard run then got in and worked the same Applications at the same time."""
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        three_deployments_waiting(world, "payments-api")
        with first_run_gated(world) as (_inside, release, first):
            assert world.run() == exitcodes.LOCKED
            assert world.run("--shard", "0/2") == exitcodes.LOCKED, "the first run still holds its layout"
            assert world.run("--shard", "1/2") == exitcodes.LOCKED
            assert devlake.post_count == 0
            release.set()
        assert first == [0]
        assert devlake.accepted_ids() == ids_of("payments-api", 1, 2, 3), "each deployment once"
        assert no_lock_held(world)


def no_lock_held(world: World) -> bool:
    """Every lock of the cluster is free: an exclusive lock and another layout can be taken at once."""
    store = open_state(world)
    try:
        free = store.acquire_lock("run:prod-east", "probe", 60) and store.acquire_shared_lock(
            LAYOUT, "layout-7", "probe", 60
        )
        store.release_lock("run:prod-east", "probe")
        store.release_shared_lock(LAYOUT, "probe")
        return free
    finally:
        store.close()


def started_together(world: World, arguments: list[tuple[str, ...]]) -> list[int]:
    """Run the CLI once per argument list, each in its own thread, all entering their first lock at once."""
    barrier = threading.Barrier(len(arguments))
    real = {cls: cls.acquire_lock for cls in (RedisStore, SQLiteStore)}
    first_call: set[threading.Thread] = set()
    lock = threading.Lock()

    def gate(acquire: Callable[..., bool]) -> Callable[..., bool]:
        def acquire_together(self: Store, *args: Any) -> bool:
            with lock:
                first = threading.current_thread() not in first_call
                first_call.add(threading.current_thread())
            if first:
                barrier.wait(timeout=30)
            return acquire(self, *args)

        return acquire_together

    codes: dict[int, int] = {}
    with pytest.MonkeyPatch.context() as patch:
        for cls, acquire in real.items():
            patch.setattr(cls, "acquire_lock", gate(acquire))
        threads = [
            threading.Thread(target=lambda n=n, a=a: codes.__setitem__(n, world.run(*a)), daemon=True)
            for n, a in enumerate(arguments)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    return [codes[n] for n in range(len(arguments))]


@pytest.mark.parametrize(
    ("runs", "outcomes"),
    [
        ([(), ()], [[0, 3], [3, 0]]),
        ([(), ("--shard", "0/2")], [[0, 3], [3, 0]]),
        ([("--shard", "0/2"), ("--shard", "0/3")], [[0, 3], [3, 0]]),
        ([("--shard", "0/2"), ("--shard", "1/2")], [[0, 0]]),
    ],
    ids=["two-unsharded", "unsharded-and-shard", "two-layouts", "two-shards-of-one-layout"],
)
def test_runs_started_together_never_all_fail_and_send_each_deployment_once(
    tmp_path: Any,
    state_url: str,
    monkeypatch: pytest.MonkeyPatch,
    runs: list[tuple[str, ...]],
    outcomes: list[list[int]],
) -> None:
    with open_world(tmp_path, state_url, monkeypatch) as (world, devlake):
        names = ["alpha", "beta"]  # one in each shard of two
        three_deployments_waiting(world, *names)
        codes = started_together(world, runs)
        assert codes in outcomes
        assert world.run() == 0, "what the runs did not own goes out with the next run"
        accepted = devlake.accepted_ids()
        assert sorted(accepted) == sorted(ids_of("alpha", 1, 2, 3) + ids_of("beta", 1, 2, 3))
        assert len(accepted) == len(set(accepted)), "no deployment was sent by two runs"
        assert no_lock_held(world)


# -- the store alone: owner tokens and shared membership under contention -----------------------------------


def contend(store: Store, count: int, attempt: Callable[[Store, int], bool]) -> list[bool]:
    """``count`` clients of the same state call ``attempt`` at the same moment; their answers, by index."""
    barrier = threading.Barrier(count)
    stores = [another_client(store) for _ in range(count)]
    answers: dict[int, bool] = {}

    def run(index: int) -> None:
        barrier.wait(timeout=30)
        answers[index] = attempt(stores[index], index)

    try:
        threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        for other in stores:
            other.close()
    return [answers[index] for index in range(count)]


def test_one_of_many_clients_taking_a_run_lock_at_once_gets_it(store: Store) -> None:
    taken = contend(store, 8, lambda client, n: client.acquire_lock("run:prod-east", f"run-{n}", 60))
    assert taken.count(True) == 1
    winner = f"run-{taken.index(True)}"

    def release_unless_winner(client: Store, n: int) -> bool:
        if f"run-{n}" != winner:
            client.release_lock("run:prod-east", f"run-{n}")
        return True

    contend(store, 8, release_unless_winner)
    assert not store.acquire_lock("run:prod-east", "late", 60), "the losers' releases left the winner's lock alone"
    assert store.renew_lock("run:prod-east", winner, 60)
    store.release_lock("run:prod-east", winner)
    assert store.acquire_lock("run:prod-east", "late", 60)


def release_shared(client: Store, n: int) -> bool:
    client.release_shared_lock(LAYOUT, f"run-{n}")
    return True


def test_a_shared_lock_taken_by_two_layouts_at_once_admits_one_layout_only(store: Store) -> None:
    groups = [f"layout-{1 + n % 2}" for n in range(8)]
    for _round in range(5):
        taken = contend(store, 8, lambda client, n: client.acquire_shared_lock(LAYOUT, groups[n], f"run-{n}", 60))
        admitted = {groups[n] for n, ok in enumerate(taken) if ok}
        assert len(admitted) == 1, "both layouts got in"
        assert all(ok for n, ok in enumerate(taken) if groups[n] in admitted), "every run of that layout got in"
        contend(store, 8, release_shared)
        assert store.acquire_shared_lock(LAYOUT, "layout-9", "probe", 60), "the last holder leaving frees it"
        store.release_shared_lock(LAYOUT, "probe")


def test_holders_leaving_while_others_renew_never_free_the_lock_under_them(store: Store) -> None:
    assert store.acquire_shared_lock(LAYOUT, "layout-2", "stays", 60)
    for n in range(4):
        assert store.acquire_shared_lock(LAYOUT, "layout-2", f"leaves-{n}", 60)

    def renew_or_leave(client: Store, n: int) -> bool:
        if n == 4:
            return client.renew_shared_lock(LAYOUT, "stays", 60)
        client.release_shared_lock(LAYOUT, f"leaves-{n}")
        return True

    renewed = contend(store, 5, renew_or_leave)
    assert renewed[4]
    assert not store.acquire_shared_lock(LAYOUT, "layout-1", "other", 60), "'stays' still holds it"
    assert store.renew_shared_lock(LAYOUT, "stays", 60)
