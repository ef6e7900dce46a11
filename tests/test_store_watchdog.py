"""Store specification, part 2: the watchdog and ``wait_for_rollouts``.

Time-based behaviour is observed through ``wait_for_rollouts`` itself (the watchdog must act
without anyone else calling the store); every wait is bounded by ``anyio.fail_after`` as a hang
guard, and timing bounds are generous (a loaded, shared 2-core machine).
"""

from __future__ import annotations

import anyio
import pytest
from conftest import BOTH_BACKENDS, make_span

from agl_async import LightningStore, RolloutConfig

pytestmark = pytest.mark.anyio

HANG_GUARD = 10.0


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# ---------------------------------------------------------------------------------- watchdog


async def test_silent_attempt_becomes_unresponsive(store: LightningStore) -> None:
    r = await store.enqueue_rollout(1, config=RolloutConfig(unresponsive_seconds=0.2))
    claimed = await store.dequeue_rollout(worker_id="w")
    assert claimed is not None
    started = anyio.current_time()
    with anyio.fail_after(HANG_GUARD):
        done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id])  # nobody else calls the store
    assert anyio.current_time() - started >= 0.15
    assert [x.status for x in done] == ["failed"]
    attempt = await store.get_latest_attempt(r.rollout_id)
    assert attempt is not None and attempt.status == "unresponsive"
    assert attempt.end_time is not None
    assert attempt.end_time - attempt.start_time == pytest.approx(0.2, abs=0.05)
    worker = await store.get_worker_by_id("w")
    assert worker is not None and worker.status == "unknown" and worker.current_attempt_id is None


async def test_long_attempt_times_out_despite_heartbeats(store: LightningStore) -> None:
    config = RolloutConfig(timeout_seconds=0.3, unresponsive_seconds=5.0)
    started = await store.start_rollout(1, config=config, worker_id="w")
    rid = started.rollout_id
    async with anyio.create_task_group() as tg:

        async def beat() -> None:
            while True:
                await store.update_worker("w")
                await anyio.sleep(0.02)

        tg.start_soon(beat)
        with anyio.fail_after(HANG_GUARD):
            done = await store.wait_for_rollouts(rollout_ids=[rid])
        tg.cancel_scope.cancel()
    assert [x.status for x in done] == ["failed"]
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.status == "timeout"
    assert attempt.end_time is not None
    assert attempt.end_time - attempt.start_time == pytest.approx(0.3, abs=0.05)


async def test_spans_and_heartbeats_keep_an_attempt_alive(store: LightningStore) -> None:
    config = RolloutConfig(unresponsive_seconds=1.0)
    started = await store.start_rollout(1, config=config, worker_id="w")
    rid, aid = started.rollout_id, started.attempt.attempt_id
    # > 1.5 s of activity, each kind of heartbeat well inside the 1 s window
    for i in range(30):
        await anyio.sleep(0.05)
        kind = i % 3
        if kind == 0:
            await store.add_span(make_span(rid, aid, i + 1))
        elif kind == 1:
            await store.update_attempt(rid, aid)
        else:
            await store.update_worker("w")
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.status == "running"  # the span made it running
    # silence now: the verdict comes by itself
    with anyio.fail_after(HANG_GUARD):
        done = await store.wait_for_rollouts(rollout_ids=[rid])
    assert [x.status for x in done] == ["failed"]
    attempt = await store.get_latest_attempt(rid)
    assert attempt is not None and attempt.status == "unresponsive"


async def test_unresponsive_attempt_is_retried(store: LightningStore) -> None:
    config = RolloutConfig(unresponsive_seconds=0.1, max_attempts=2, retry_condition=["unresponsive"])
    r = await store.enqueue_rollout(1, config=config)
    assert await store.dequeue_rollout() is not None
    with anyio.fail_after(HANG_GUARD):
        # the second attempt stays silent too; the waiter sees both verdicts by itself
        async with anyio.create_task_group() as tg:

            async def retry_when_requeued() -> None:  # a runner polling the queue
                for _ in range(500):
                    again = await store.dequeue_rollout(worker_id="w2")
                    if again is not None:
                        assert again.attempt.sequence_id == 2
                        return
                    await anyio.sleep(0.02)
                pytest.fail("the rollout was never requeued")

            tg.start_soon(retry_when_requeued)
            done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id])
    assert [x.status for x in done] == ["failed"]
    assert [a.status for a in await store.query_attempts(r.rollout_id)] == ["unresponsive", "unresponsive"]


async def test_unresponsive_attempt_comes_back_with_a_span(store: LightningStore) -> None:
    config = RolloutConfig(unresponsive_seconds=0.1)
    started = await store.start_rollout(1, config=config)
    with anyio.fail_after(HANG_GUARD):
        await store.wait_for_rollouts(rollout_ids=[started.rollout_id])
    await store.add_span(make_span(started.rollout_id, started.attempt.attempt_id, 1))
    attempt = await store.get_latest_attempt(started.rollout_id)
    assert attempt is not None and attempt.status == "running" and attempt.end_time is None
    rollout = await store.get_rollout_by_id(started.rollout_id)
    assert rollout is not None and rollout.status == "running"


async def test_waiter_sees_verdict_on_an_attempt_made_after_it_started_waiting(store: LightningStore) -> None:
    r = await store.enqueue_rollout(1, config=RolloutConfig(unresponsive_seconds=0.1))
    result: list[str] = []
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id])
                result.extend(x.status for x in done)

            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            # the runner claims it, then dies: no other call reaches the store
            assert await store.dequeue_rollout() is not None
    assert result == ["failed"]


async def test_changing_the_config_supervises_a_live_attempt(store: LightningStore) -> None:
    started = await store.start_rollout(1)
    await store.update_rollout(started.rollout_id, config=RolloutConfig(timeout_seconds=0.1))
    with anyio.fail_after(HANG_GUARD):
        done = await store.wait_for_rollouts(rollout_ids=[started.rollout_id])
    assert [x.status for x in done] == ["failed"]
    attempt = await store.get_latest_attempt(started.rollout_id)
    assert attempt is not None and attempt.status == "timeout"


async def test_finished_attempts_are_not_judged(store: LightningStore) -> None:
    started = await store.start_rollout(1, config=RolloutConfig(timeout_seconds=0.1))
    unsupervised = await store.start_rollout(2)
    await store.update_attempt(started.rollout_id, "latest", status="succeeded")
    # wait past the deadline without calling anything else
    assert await store.wait_for_rollouts(rollout_ids=[unsupervised.rollout_id], timeout=0.2) == []
    attempt = await store.get_latest_attempt(started.rollout_id)
    assert attempt is not None and attempt.status == "succeeded"


# ---------------------------------------------------------------------------------- wait_for_rollouts


async def test_wait_returns_only_terminal_rollouts_in_the_order_asked(store: LightningStore) -> None:
    a = await store.start_rollout("a")
    b = await store.start_rollout("b")
    c = await store.start_rollout("c")
    await store.update_attempt(c.rollout_id, "latest", status="failed")
    await store.update_attempt(a.rollout_id, "latest", status="succeeded")
    ids = [c.rollout_id, b.rollout_id, a.rollout_id]
    done = await store.wait_for_rollouts(rollout_ids=ids, timeout=0)
    assert [(x.rollout_id, x.status) for x in done] == [(c.rollout_id, "failed"), (a.rollout_id, "succeeded")]
    assert all(x.end_time is not None for x in done)


async def test_wait_honours_its_timeout(store: LightningStore) -> None:
    r = await store.start_rollout(1)
    started = anyio.current_time()
    with anyio.fail_after(HANG_GUARD):
        done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id, "ro-missing"], timeout=0.2)
    elapsed = anyio.current_time() - started
    assert done == []
    assert 0.15 <= elapsed < 5.0


async def test_unknown_ids_are_not_waited_for(store: LightningStore) -> None:
    done = await store.start_rollout(1)
    await store.update_attempt(done.rollout_id, "latest", status="succeeded")
    with anyio.fail_after(2.0):  # timeout=None: returns at once all the same
        result = await store.wait_for_rollouts(rollout_ids=["ro-missing", done.rollout_id])
    assert [r.rollout_id for r in result] == [done.rollout_id]


async def test_wait_with_zero_timeout_only_looks(store: LightningStore) -> None:
    r = await store.start_rollout(1)
    with anyio.fail_after(2.0):
        assert await store.wait_for_rollouts(rollout_ids=[r.rollout_id], timeout=0) == []


async def test_wait_with_negative_timeout_is_refused(store: LightningStore) -> None:
    with pytest.raises(ValueError, match="timeout"):
        await store.wait_for_rollouts(rollout_ids=[], timeout=-1)


async def test_wait_wakes_promptly_on_the_completing_update(
    store: LightningStore, record_property: pytest.RecordProperty
) -> None:
    rollouts = [await store.start_rollout(i) for i in range(3)]
    ids = [r.rollout_id for r in rollouts]
    returned_at: list[float] = []
    result: list[str] = []
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:

            async def waiter() -> None:
                done = await store.wait_for_rollouts(rollout_ids=ids)  # no timeout: woken, not polled
                returned_at.append(anyio.current_time())
                result.extend(x.status for x in done)

            tg.start_soon(waiter)
            for rid in ids[:2]:
                await store.update_attempt(rid, "latest", status="succeeded")
            await anyio.wait_all_tasks_blocked()
            assert returned_at == []  # two of three finished: still waiting
            completed_at = anyio.current_time()
            await store.update_attempt(ids[2], "latest", status="failed")
    delay = returned_at[0] - completed_at
    record_property("wake_delay_s", delay)
    assert delay < 0.5
    assert result == ["succeeded", "succeeded", "failed"]


async def test_every_waiter_is_woken(store: LightningStore) -> None:
    r = await store.start_rollout(1)
    woken: list[int] = []
    with anyio.fail_after(HANG_GUARD):
        async with anyio.create_task_group() as tg:
            for i in range(5):

                async def waiter(i: int = i) -> None:
                    await store.wait_for_rollouts(rollout_ids=[r.rollout_id])
                    woken.append(i)

                tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            await store.update_rollout(r.rollout_id, status="cancelled")
    assert sorted(woken) == [0, 1, 2, 3, 4]


async def test_cancelled_wait_changes_nothing(store: LightningStore) -> None:
    r = await store.start_rollout(1)
    with anyio.move_on_after(0.05) as scope:
        await store.wait_for_rollouts(rollout_ids=[r.rollout_id])
    assert scope.cancelled_caught
    got = await store.get_rollout_by_id(r.rollout_id)
    assert got is not None and got.status == "preparing"
    # a later wait still works
    await store.update_attempt(r.rollout_id, "latest", status="succeeded")
    with anyio.fail_after(HANG_GUARD):
        done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id])
    assert [x.status for x in done] == ["succeeded"]
