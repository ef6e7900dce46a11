"""The store extensions the HTTP layer relies on, specified for every store kind (memory, locked,
http): long-poll ``dequeue_rollout(timeout=)`` and ``finish_and_dequeue``."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from agl_async import LightningStore, LightningStoreLocked, RolloutConfig

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_default_is_non_blocking(store: LightningStore) -> None:
    with anyio.fail_after(5):
        assert await store.dequeue_rollout() is None
        assert await store.dequeue_rollout(timeout=None) is None
        assert await store.dequeue_rollout(timeout=0) is None


async def test_long_poll_returns_none_after_the_timeout(store: LightningStore) -> None:
    started = time.monotonic()
    with anyio.fail_after(10):
        assert await store.dequeue_rollout(worker_id="w", timeout=0.3) is None
    assert time.monotonic() - started >= 0.3
    worker = await store.get_worker_by_id("w")
    assert worker is not None and worker.status == "idle"


async def test_negative_timeout_is_a_value_error(store: LightningStore) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await store.dequeue_rollout(timeout=-1)
    with pytest.raises(ValueError, match="timeout"):
        await store.finish_and_dequeue("ro-x", "latest", timeout=-1)


async def test_long_poll_is_woken_by_enqueue(store: LightningStore) -> None:
    got = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def poll() -> None:
                got.append(await store.dequeue_rollout(worker_id=1, timeout=60))

            tg.start_soon(poll)
            await anyio.sleep(0.05)  # lets the poll start waiting first (the result holds either way)
            # The enqueue goes through the same store: with a lock held by the poll this would hang.
            rollout = await store.enqueue_rollout("x")
    assert got[0] is not None and got[0].rollout_id == rollout.rollout_id and got[0].attempt.worker_id == 1


async def test_long_poll_is_woken_by_a_requeue(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=2, retry_condition=["failed"])
    rollout = await store.enqueue_rollout("retry me", config=config)
    first = await store.dequeue_rollout()
    assert first is not None
    got = []
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:

            async def poll() -> None:
                got.append(await store.dequeue_rollout(timeout=60))

            tg.start_soon(poll)
            await anyio.sleep(0.05)  # lets the poll start waiting first (the result holds either way)
            await store.update_attempt(rollout.rollout_id, first.attempt.attempt_id, status="failed")
    assert got[0] is not None and got[0].rollout_id == rollout.rollout_id and got[0].attempt.sequence_id == 2


async def test_long_poll_sees_a_watchdog_requeue_without_other_calls(store: LightningStore) -> None:
    config = RolloutConfig(unresponsive_seconds=0.3, max_attempts=2, retry_condition=["unresponsive"])
    rollout = await store.enqueue_rollout("silent", config=config)
    first = await store.dequeue_rollout()
    assert first is not None
    with anyio.fail_after(10):
        again = await store.dequeue_rollout(timeout=30)  # nobody else calls the store meanwhile
    assert again is not None and again.rollout_id == rollout.rollout_id and again.attempt.sequence_id == 2
    attempts = await store.query_attempts(rollout.rollout_id)
    assert [a.status for a in attempts] == ["unresponsive", "preparing"]


async def test_cancelled_long_poll_claims_nothing(store: LightningStore) -> None:
    if type(store).__name__ == "LightningStoreClient":
        pytest.skip("over HTTP the disconnect is seen asynchronously: test_http_client covers it")
    with anyio.fail_after(10):
        with anyio.move_on_after(0.2):
            await store.dequeue_rollout(timeout=60)
        rollout = await store.enqueue_rollout("still queued")
        current = await store.get_rollout_by_id(rollout.rollout_id)
    assert current is not None and current.status == "queuing"


async def test_locked_wrapper_does_not_hold_its_lock_while_polling(store: LightningStore) -> None:
    if not isinstance(store, LightningStoreLocked):
        pytest.skip("about the locked wrapper")
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: store.dequeue_rollout(timeout=60))
            await anyio.wait_all_tasks_blocked()  # the poll is waiting now
            assert not store._lock.locked()
            await store.statistics()  # would hang behind a held lock
            tg.cancel_scope.cancel()


async def test_finish_and_dequeue(store: LightningStore) -> None:
    a = await store.enqueue_rollout("a")
    b = await store.enqueue_rollout("b")
    claimed = await store.dequeue_rollout(worker_id="w")
    assert claimed is not None and claimed.rollout_id == a.rollout_id
    nxt = await store.finish_and_dequeue(a.rollout_id, claimed.attempt.attempt_id, worker_id="w")
    assert nxt is not None and nxt.rollout_id == b.rollout_id and nxt.attempt.worker_id == "w"
    assert (await store.get_rollout_by_id(a.rollout_id)).status == "succeeded"  # type: ignore[union-attr]
    failed = await store.finish_and_dequeue(b.rollout_id, "latest", "failed", timeout=0.05)
    assert failed is None
    assert (await store.get_rollout_by_id(b.rollout_id)).status == "failed"  # type: ignore[union-attr]


async def test_finish_and_dequeue_with_a_bad_id_dequeues_nothing(store: LightningStore) -> None:
    queued = await store.enqueue_rollout("stay")
    with pytest.raises(ValueError, match="ro-unknown"):
        await store.finish_and_dequeue("ro-unknown", "latest")
    running = await store.start_rollout("running")
    with pytest.raises(ValueError, match="bogus"):
        await store.finish_and_dequeue(running.rollout_id, "latest", "bogus")  # type: ignore[arg-type]
    assert (await store.get_rollout_by_id(running.rollout_id)).status == "preparing"  # type: ignore[union-attr]
    assert (await store.get_rollout_by_id(queued.rollout_id)).status == "queuing"  # type: ignore[union-attr]


@pytest.mark.parametrize("wrap", ["memory", "locked"])
async def test_unclaim_puts_an_unstarted_claim_back_at_the_head(wrap: str) -> None:
    from agl_async import InMemoryLightningStore

    inner = InMemoryLightningStore()
    store: LightningStore = inner if wrap == "memory" else LightningStoreLocked(inner)
    first = await store.enqueue_rollout("first")
    second = await store.enqueue_rollout("second")
    claimed = await store.dequeue_rollout(worker_id="gone")
    assert claimed is not None and claimed.rollout_id == first.rollout_id
    assert await store.unclaim_rollout(claimed.rollout_id, claimed.attempt.attempt_id) is True
    assert (await store.get_rollout_by_id(first.rollout_id)).status == "queuing"  # type: ignore[union-attr]
    assert await store.query_attempts(first.rollout_id) == []
    worker = await store.get_worker_by_id("gone")
    assert worker is not None and worker.status == "idle" and worker.current_rollout_id is None
    again = await store.dequeue_rollout(worker_id="next")
    assert again is not None and again.rollout_id == first.rollout_id and again.attempt.sequence_id == 1
    # A claim its runner has acted on is not taken back.
    await store.update_attempt(again.rollout_id, again.attempt.attempt_id, status="running")
    assert await store.unclaim_rollout(again.rollout_id, again.attempt.attempt_id) is False
    assert (await store.get_rollout_by_id(first.rollout_id)).status == "running"  # type: ignore[union-attr]
    later = await store.dequeue_rollout()
    assert later is not None and later.rollout_id == second.rollout_id


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the server runs on asyncio
async def test_a_long_poll_ended_by_the_client_leaving_claims_nothing(anyio_backend: str) -> None:
    """Once the server sees the client gone it must not take a last look at the queue: a rollout
    claimed then would belong to nobody and sit in "preparing"."""
    from starlette.requests import Request

    from agl_async import InMemoryLightningStore, LightningStoreServer

    async def receive() -> dict[str, str]:
        return {"type": "http.disconnect"}

    looked: list[bool] = []

    async def wait() -> None:
        await anyio.sleep_forever()

    async def look() -> None:
        looked.append(True)

    async with LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0) as server:
        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        with anyio.fail_after(5):
            assert await server.app._long_poll(request, wait, look) is None
    assert looked == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # the server runs on asyncio
async def test_end_long_polls_answers_waiting_and_later_polls_at_once(anyio_backend: str) -> None:
    """``end_long_polls()`` (called by the client-server strategy when the algorithm returns) ends
    the long polls in progress and makes later ones non-blocking, while the server keeps serving."""
    from agl_async import InMemoryLightningStore, LightningStoreClient, LightningStoreServer

    class Store(InMemoryLightningStore):
        polling = anyio.Event()  # set once a long poll has reached the store (the server is watching)

        async def dequeue_rollout(self, worker_id: int | None = None, *, timeout: float | None = None) -> Any:
            if timeout:
                self.polling.set()
            return await super().dequeue_rollout(worker_id, timeout=timeout)

    store = Store()
    async with LightningStoreServer(store, host="127.0.0.1", port=0) as server:
        async with LightningStoreClient(server.endpoint) as client:
            answers: list[object] = []

            async def poll() -> None:
                answers.append(await client.dequeue_rollout(worker_id=0, timeout=60))

            with anyio.fail_after(20):  # a hang guard: the poll itself would wait 60 s
                async with anyio.create_task_group() as tg:
                    tg.start_soon(poll)
                    await store.polling.wait()
                    server.end_long_polls()
                assert answers == [None]
                assert await client.dequeue_rollout(worker_id=0, timeout=60) is None  # no wait now
                rollout = await client.enqueue_rollout({"task": 1})  # still serving
                claimed = await client.dequeue_rollout(worker_id=0, timeout=60)
                assert claimed is not None and claimed.rollout_id == rollout.rollout_id
