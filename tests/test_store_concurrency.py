"""Concurrency: many tasks on one store; ``LightningStoreLocked`` makes compound operations atomic."""

from __future__ import annotations

from collections import Counter
from typing import Any
from unittest.mock import MagicMock

import anyio
import pytest
from conftest import BOTH_BACKENDS, STORE_METHODS, required_kwargs

from agl_async import AttemptedRollout, InMemoryLightningStore, LightningStore, LightningStoreLocked
from agl_async.types import WorkerId

pytestmark = pytest.mark.anyio

HANG_GUARD = 60.0


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _drain(store: LightningStore, n_tasks: int) -> list[tuple[int, str]]:
    """``n_tasks`` workers dequeue until the queue is empty, completing what they claim."""
    claims: list[tuple[int, str]] = []

    async def worker(i: int) -> None:
        while (claimed := await store.dequeue_rollout(worker_id=i)) is not None:
            claims.append((i, claimed.rollout_id))
            await anyio.lowlevel.checkpoint()  # let the others interleave
            await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")

    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            for i in range(n_tasks):
                tg.start_soon(worker, i)
    return claims


async def test_50_tasks_dequeue_1000_rollouts_each_exactly_once(store: LightningStore) -> None:
    created = await store.enqueue_many_rollouts([{"input": i} for i in range(1000)])
    claims = await _drain(store, 50)
    counts = Counter(rid for _, rid in claims)
    assert len(claims) == 1000
    assert set(counts) == {r.rollout_id for r in created}
    assert max(counts.values()) == 1
    assert len({i for i, _ in claims}) > 1  # the work really was shared
    stats = await store.statistics()
    assert stats["rollouts"]["succeeded"] == 1000
    assert stats["total_attempts"] == 1000
    assert stats["queue_length"] == 0
    assert stats["workers"]["busy"] == 0


class _YieldingStore(InMemoryLightningStore):
    """A store whose dequeue awaits between reading the queue and claiming (like a database
    round-trip would): without a lock, two tasks can claim the same rollout."""

    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        queued = await self.query_rollouts(status_in=["queuing", "requeuing"])
        await anyio.lowlevel.checkpoint()
        if not queued:
            return None
        return await self.start_attempt(queued[0].rollout_id, worker_id=worker_id)


async def test_without_the_lock_a_yielding_store_double_claims() -> None:
    # control experiment: shows the test below would catch a missing lock
    store = _YieldingStore()
    await store.enqueue_many_rollouts([{"input": i} for i in range(100)])
    claims = await _drain(store, 10)
    assert len(claims) > len({rid for _, rid in claims})


async def test_the_lock_makes_each_dequeue_atomic() -> None:
    store = LightningStoreLocked(_YieldingStore())
    created = await store.enqueue_many_rollouts([{"input": i} for i in range(1000)])
    claims = await _drain(store, 50)
    assert sorted(rid for _, rid in claims) == sorted(r.rollout_id for r in created)


@pytest.mark.parametrize("name", sorted(set(STORE_METHODS) - {"finish_and_dequeue"}))  # two locked calls
async def test_every_call_takes_the_lock_and_reaches_the_wrapped_store(name: str) -> None:
    wrapped = MagicMock(spec=InMemoryLightningStore)
    locked = LightningStoreLocked(wrapped)
    method = getattr(wrapped, name)
    results: list[Any] = []

    async def call() -> None:
        results.append(await getattr(locked, name)(**required_kwargs(name)))

    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            async with locked._lock:
                tg.start_soon(call)
                await anyio.wait_all_tasks_blocked()
                # only a wait goes through while someone holds the lock
                assert method.await_count == (name == "wait_for_rollouts")
    assert results == [method.return_value] and method.await_count == 1


async def test_a_waiter_does_not_hold_the_lock() -> None:
    store = LightningStoreLocked(InMemoryLightningStore())
    started = await store.start_rollout(1)
    result: list[Any] = []
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                result.extend(await store.wait_for_rollouts(rollout_ids=[started.rollout_id]))

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            # other calls go through while the waiter waits
            for i in range(20):
                await store.enqueue_rollout(i)
            await store.update_attempt(started.rollout_id, "latest", status="succeeded")
    assert [r.status for r in result] == ["succeeded"]
    assert (await store.statistics())["total_rollouts"] == 21


async def test_cancelling_a_call_waiting_for_the_lock_changes_nothing() -> None:
    store = LightningStoreLocked(InMemoryLightningStore())
    release = anyio.Event()
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:

            async def hold_the_lock() -> None:  # a slow call of another task, as seen by the lock
                async with store._lock:
                    await release.wait()

            tg.start_soon(hold_the_lock)
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.05) as scope:
                await store.enqueue_rollout("never")
            release.set()
    assert scope.cancelled_caught
    assert await store.query_rollouts() == []


async def test_long_polling_workers_are_woken_by_enqueues_and_claim_each_once(store: LightningStore) -> None:
    total = 100
    claims: list[str] = []
    all_claimed = anyio.Event()

    async def worker(i: int) -> None:
        while True:  # a runner: long-polls for as long as it lives
            claimed = await store.dequeue_rollout(worker_id=i, timeout=30)
            if claimed is None:
                continue
            claims.append(claimed.rollout_id)
            await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")
            if len(claims) == total:
                all_claimed.set()

    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(worker, i)
            await anyio.wait_all_tasks_blocked()  # everyone waits on an empty queue
            created = []
            for batch in range(5):
                created += await store.enqueue_many_rollouts([{"input": [batch, j]} for j in range(20)])
                await anyio.lowlevel.checkpoint()
            await all_claimed.wait()
            tg.cancel_scope.cancel()  # cancelling the long polls claims nothing
    assert sorted(claims) == sorted(r.rollout_id for r in created)
    await store.enqueue_rollout("after")
    # Over HTTP a cancelled long poll ends on the server only once the server reads the client's
    # disconnect: a poll that is woken by "after" first may claim it and then put it back
    # (unclaim_rollout) when it sees its client gone. What is specified is the settled state:
    # nothing stays claimed for a client that left. In-process stores settle at once.
    with anyio.fail_after(10):
        for _ in range(1000):  # bounded by fail_after; a state to reach, not an event to wait on
            stats = await store.statistics()
            if stats["queue_length"] == 1:
                break
            await anyio.sleep(0.01)
    assert stats["queue_length"] == 1 and stats["total_attempts"] == total
