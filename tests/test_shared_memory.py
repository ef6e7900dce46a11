"""SharedMemoryExecutionStrategy: contract section 3, on asyncio and trio.

Bundles here are closures (nothing crosses a process). Timing is asserted only as lower bounds
that follow from the deadlines themselves, plus generous hang guards.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from typing import Any

import anyio
import pytest
from conftest import BOTH_BACKENDS

from agl_async import (
    ExecutionEvent,
    ExecutionStrategy,
    InMemoryLightningStore,
    LightningStore,
    LightningStoreLocked,
    SharedMemoryExecutionStrategy,
)
from agl_async.execution.registry import resolve_strategy

pytestmark = pytest.mark.anyio

GUARD = 30.0
GRACE = 0.2


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Recorder:
    """Bundles that record what happened to them."""

    def __init__(self) -> None:
        self.stores: list[LightningStore] = []
        self.worker_ids: list[int] = []
        self.returned: list[str] = []
        self.cancelled: list[str] = []
        self.saw_event: list[str] = []
        self.started = 0
        self.all_started: anyio.Event | None = None

    def mark_started(self, n: int) -> None:
        self.started += 1
        if self.all_started is not None and self.started >= n:
            self.all_started.set()

    async def track(self, name: str, coro: Any) -> None:
        try:
            await coro
        except anyio.get_cancelled_exc_class():
            self.cancelled.append(name)
            raise
        self.returned.append(name)


def cooperative_runner(rec: Recorder) -> Any:
    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        rec.stores.append(store)
        rec.worker_ids.append(worker_id)

        async def body() -> None:
            await event.wait()
            rec.saw_event.append(f"runner-{worker_id}")

        await rec.track(f"runner-{worker_id}", body())

    return runner


def deaf_runner(rec: Recorder) -> Any:
    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await rec.track(f"runner-{worker_id}", anyio.sleep_forever())

    return runner


def returning_algorithm(rec: Recorder) -> Any:
    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        rec.stores.append(store)
        await anyio.lowlevel.checkpoint()
        rec.returned.append("algorithm")

    return algorithm


# ---------------------------------------------------------------------------- construction
def test_defaults_and_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGL_MANAGED_STORE", raising=False)
    strategy = SharedMemoryExecutionStrategy()
    assert (strategy.n_runners, strategy.main_thread, strategy.graceful_delay, strategy.managed_store) == (
        1,
        "algorithm",
        5.0,
        True,
    )
    with pytest.raises(ValueError, match="n_runners"):
        SharedMemoryExecutionStrategy(n_runners=2, main_thread="runner")
    with pytest.raises(ValueError, match="main_thread"):
        SharedMemoryExecutionStrategy(main_thread="thread")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_runners"):
        SharedMemoryExecutionStrategy(n_runners=0)
    with pytest.raises(ValueError, match="graceful_delay"):
        SharedMemoryExecutionStrategy(graceful_delay=-1)


def test_managed_store_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGL_MANAGED_STORE", "false")
    assert SharedMemoryExecutionStrategy().managed_store is False
    assert SharedMemoryExecutionStrategy(managed_store=True).managed_store is True
    monkeypatch.setenv("AGL_MANAGED_STORE", "perhaps")
    with pytest.raises(ValueError, match="AGL_MANAGED_STORE"):
        SharedMemoryExecutionStrategy()


def test_resolve_strategy_from_alias_dict_class_and_instance() -> None:
    assert isinstance(resolve_strategy("shm"), SharedMemoryExecutionStrategy)
    assert isinstance(resolve_strategy(None), SharedMemoryExecutionStrategy)
    built = resolve_strategy({"type": "shm", "graceful_delay": 1.0}, n_runners=3)
    assert isinstance(built, SharedMemoryExecutionStrategy)
    assert (built.n_runners, built.graceful_delay) == (3, 1.0)
    assert resolve_strategy({"type": "shm", "n_runners": 2}, n_runners=3).n_runners == 2  # type: ignore[attr-defined]
    assert isinstance(resolve_strategy(SharedMemoryExecutionStrategy), SharedMemoryExecutionStrategy)
    given = SharedMemoryExecutionStrategy()
    assert resolve_strategy(given) is given
    assert isinstance(given, ExecutionStrategy)
    with pytest.raises(ValueError, match="unknown execution strategy 'nope'"):
        resolve_strategy("nope")
    with pytest.raises(ValueError, match='"type"'):
        resolve_strategy({"n_runners": 2})
    with pytest.raises(TypeError):
        resolve_strategy(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- normal runs
async def test_algorithm_returning_stops_cooperative_runners() -> None:
    rec = Recorder()
    store = InMemoryLightningStore()
    strategy = SharedMemoryExecutionStrategy(n_runners=3, graceful_delay=GUARD)
    with anyio.fail_after(GUARD):
        await strategy.execute(returning_algorithm(rec), cooperative_runner(rec), store)
    assert sorted(rec.worker_ids) == [0, 1, 2]
    assert sorted(rec.saw_event) == ["runner-0", "runner-1", "runner-2"]
    assert rec.cancelled == []
    assert sorted(rec.returned) == ["algorithm", "runner-0", "runner-1", "runner-2"]
    # managed store: every bundle got one and the same LightningStoreLocked around the store
    assert all(isinstance(s, LightningStoreLocked) and s.store is store for s in rec.stores)
    assert len({id(s) for s in rec.stores}) == 1


@pytest.mark.parametrize("how", ["argument", "environment"])
async def test_unmanaged_store_is_handed_over_as_is(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    store = InMemoryLightningStore()
    if how == "environment":  # managed_store=None defers to AGL_MANAGED_STORE
        monkeypatch.setenv("AGL_MANAGED_STORE", "false")
        strategy = SharedMemoryExecutionStrategy(n_runners=2)
    else:
        monkeypatch.setenv("AGL_MANAGED_STORE", "true")  # the argument wins over the variable
        strategy = SharedMemoryExecutionStrategy(n_runners=2, managed_store=False)
    with anyio.fail_after(GUARD):
        await strategy.execute(returning_algorithm(rec), cooperative_runner(rec), store)
    assert all(s is store for s in rec.stores) and len(rec.stores) == 3


async def test_bundles_share_the_store_and_the_work_gets_done() -> None:
    store = InMemoryLightningStore()

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        rollouts = await store.enqueue_many_rollouts([{"input": i} for i in range(20)])
        ids = [r.rollout_id for r in rollouts]
        while len(await store.wait_for_rollouts(rollout_ids=ids, timeout=1.0)) < len(ids):
            pass

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        while not event.is_set():
            attempted = await store.dequeue_rollout(worker_id=worker_id, timeout=0.1)
            if attempted is not None:
                await store.update_attempt(
                    attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded"
                )

    with anyio.fail_after(GUARD):
        await SharedMemoryExecutionStrategy(n_runners=4).execute(algorithm, runner, store)
    stats = await store.statistics()
    assert stats["rollouts"]["succeeded"] == 20
    workers = {
        a.worker_id for r in await store.query_rollouts() for a in await store.query_attempts(r.rollout_id)
    }
    assert workers <= {0, 1, 2, 3}


async def test_runner_ignoring_the_event_is_cancelled_after_graceful_delay() -> None:
    rec = Recorder()
    strategy = SharedMemoryExecutionStrategy(n_runners=2, graceful_delay=GRACE)
    start = anyio.current_time()
    with anyio.fail_after(GUARD):
        await strategy.execute(returning_algorithm(rec), deaf_runner(rec), InMemoryLightningStore())
    assert sorted(rec.cancelled) == ["runner-0", "runner-1"]
    assert anyio.current_time() - start >= GRACE  # the grace period was granted first


async def test_runner_finishing_within_the_grace_period_is_not_cancelled() -> None:
    rec = Recorder()

    async def slow_runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        async def body() -> None:
            await event.wait()
            await anyio.sleep(0.05)  # some clean-up after the event, well within the grace period

        await rec.track("runner-0", body())

    strategy = SharedMemoryExecutionStrategy(graceful_delay=GUARD)
    with anyio.fail_after(GUARD):
        await strategy.execute(returning_algorithm(rec), slow_runner, InMemoryLightningStore())
    assert rec.cancelled == [] and "runner-0" in rec.returned


async def test_main_thread_runner_waits_for_the_algorithm_to_return_by_itself() -> None:
    order: list[str] = []
    runner_done = anyio.Event()

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        await runner_done.wait()
        await anyio.sleep(GRACE)  # keeps going after the runner has returned: nobody cancels it
        order.append(f"algorithm (event set: {event.is_set()})")

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        order.append("runner")
        runner_done.set()

    strategy = SharedMemoryExecutionStrategy(main_thread="runner", graceful_delay=0)
    with anyio.fail_after(GUARD):
        await strategy.execute(algorithm, runner, InMemoryLightningStore())
    assert order == ["runner", "algorithm (event set: False)"]


async def test_main_thread_runner_algorithm_returning_first_does_not_stop_the_runner() -> None:
    algorithm_done = anyio.Event()
    seen: list[bool] = []

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        algorithm_done.set()

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await algorithm_done.wait()
        await anyio.sleep(GRACE)
        seen.append(event.is_set())

    strategy = SharedMemoryExecutionStrategy(main_thread="runner", graceful_delay=0)
    with anyio.fail_after(GUARD):
        await strategy.execute(algorithm, runner, InMemoryLightningStore())
    assert seen == [False]


async def test_event_set_from_a_thread_starts_the_grace_period_for_everyone() -> None:
    rec = Recorder()

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        await rec.track("algorithm", anyio.sleep_forever())  # deaf: cancelled after the grace

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await anyio.to_thread.run_sync(event.set)  # e.g. a synchronous agent deciding to stop
        await rec.track("runner-0", event.wait())

    strategy = SharedMemoryExecutionStrategy(graceful_delay=GRACE)
    with anyio.fail_after(GUARD):
        await strategy.execute(algorithm, runner, InMemoryLightningStore())
    assert rec.cancelled == ["algorithm"] and rec.returned == ["runner-0"]


# ---------------------------------------------------------------------------- errors
async def test_runner_error_is_reraised_as_itself_after_the_others_got_the_grace() -> None:
    rec = Recorder()
    boom = ValueError("runner failed")

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        async def body() -> None:
            await event.wait()
            rec.saw_event.append("algorithm")

        await rec.track("algorithm", body())

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        if worker_id == 0:
            raise boom
        await rec.track(f"runner-{worker_id}", anyio.sleep_forever())

    strategy = SharedMemoryExecutionStrategy(n_runners=2, graceful_delay=GRACE)
    with anyio.fail_after(GUARD), pytest.raises(ValueError) as caught:
        await strategy.execute(algorithm, runner, InMemoryLightningStore())
    assert caught.value is boom  # the original object, not an exception group
    assert rec.saw_event == ["algorithm"] and rec.returned == ["algorithm"]
    assert rec.cancelled == ["runner-1"]


async def test_algorithm_error_is_reraised_and_runners_stop() -> None:
    rec = Recorder()

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        raise KeyError("algorithm failed")

    strategy = SharedMemoryExecutionStrategy(n_runners=2, graceful_delay=GUARD)
    with anyio.fail_after(GUARD), pytest.raises(KeyError, match="algorithm failed"):
        await strategy.execute(algorithm, cooperative_runner(rec), InMemoryLightningStore())
    assert sorted(rec.saw_event) == ["runner-0", "runner-1"]


async def test_first_error_wins() -> None:
    first, second = ValueError("first"), RuntimeError("second")

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        raise first

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await event.wait()
        raise second

    strategy = SharedMemoryExecutionStrategy(graceful_delay=GUARD)
    with anyio.fail_after(GUARD), pytest.raises(ValueError) as caught:
        await strategy.execute(algorithm, runner, InMemoryLightningStore())
    assert caught.value is first


# ---------------------------------------------------------------------------- cancellation
async def test_caller_cancellation_sets_the_event_grants_the_grace_then_propagates() -> None:
    rec = Recorder()
    rec.all_started = anyio.Event()

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        rec.mark_started(3)

        async def body() -> None:
            await event.wait()
            rec.saw_event.append("algorithm")

        await rec.track("algorithm", body())

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        rec.mark_started(3)
        if worker_id == 0:
            await rec.track("runner-0", event.wait())
        else:
            await rec.track("runner-1", anyio.sleep_forever())

    strategy = SharedMemoryExecutionStrategy(n_runners=2, graceful_delay=GRACE)
    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(strategy.execute, algorithm, runner, InMemoryLightningStore())
                await rec.all_started.wait()
                cancelled_at = anyio.current_time()
                scope.cancel()
    assert scope.cancelled_caught  # the cancellation propagated out of execute
    assert anyio.current_time() - cancelled_at >= GRACE  # the deaf one got its grace period first
    assert sorted(rec.returned) == ["algorithm", "runner-0"]  # cooperative bundles returned
    assert rec.cancelled == ["runner-1"]  # the deaf one was cancelled after the grace period


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_native_asyncio_task_cancel_gets_the_same_shutdown() -> None:
    rec = Recorder()
    rec.all_started = anyio.Event()

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        rec.mark_started(1)
        await rec.track("runner-0", event.wait())

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        await rec.track("algorithm", anyio.sleep_forever())

    strategy = SharedMemoryExecutionStrategy(graceful_delay=GRACE)
    tasks_before = asyncio.all_tasks()
    task = asyncio.create_task(strategy.execute(algorithm, runner, InMemoryLightningStore()))
    with anyio.fail_after(GUARD):
        await rec.all_started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert rec.returned == ["runner-0"] and rec.cancelled == ["algorithm"]
    assert asyncio.all_tasks() == tasks_before  # no task left running


async def test_no_task_left_after_execute_returns() -> None:
    rec = Recorder()
    strategy = SharedMemoryExecutionStrategy(n_runners=4, graceful_delay=GRACE)
    with anyio.fail_after(GUARD):
        before = _task_count()
        await strategy.execute(returning_algorithm(rec), deaf_runner(rec), InMemoryLightningStore())
        assert _task_count() == before


def _task_count() -> int:
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        import trio

        root = trio.lowlevel.current_root_task()
        assert root is not None

        def count(task: Any) -> int:
            return 1 + sum(count(t) for n in task.child_nurseries for t in n.child_tasks)

        return count(root)


async def test_lifecycle_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agl_async")
    rec = Recorder()
    with anyio.fail_after(GUARD):
        await SharedMemoryExecutionStrategy(graceful_delay=GRACE).execute(
            returning_algorithm(rec), deaf_runner(rec), InMemoryLightningStore()
        )
    text = caplog.text
    assert "algorithm returned" in text
    assert "stop event set; runner-0 get 0.2 s (graceful_delay)" in text
    assert "grace period over: cancelled runner-0" in text


# ---------------------------------------------------------------------------- blocking run()
def _blocking_bundles(rec: Recorder, interrupt: bool) -> tuple[Any, Any]:
    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        if interrupt:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        await rec.track("algorithm", event.wait())

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await rec.track("runner-0", anyio.sleep_forever())

    return algorithm, runner


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_blocks_and_returns(backend: str) -> None:
    rec = Recorder()
    SharedMemoryExecutionStrategy(graceful_delay=GRACE).run(
        returning_algorithm(rec), deaf_runner(rec), InMemoryLightningStore(), backend=backend
    )
    assert rec.returned == ["algorithm"] and rec.cancelled == ["runner-0"]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_run_ctrl_c_shuts_down_then_raises_keyboard_interrupt(backend: str) -> None:
    assert threading.current_thread() is threading.main_thread()
    rec = Recorder()
    algorithm, runner = _blocking_bundles(rec, interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        SharedMemoryExecutionStrategy(graceful_delay=GRACE).run(
            algorithm, runner, InMemoryLightningStore(), backend=backend
        )
    assert rec.returned == ["algorithm"]  # the event was set: the cooperative bundle returned
    assert rec.cancelled == ["runner-0"]  # the deaf one was cancelled after the grace period
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_run_reraises_the_bundle_error() -> None:
    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        SharedMemoryExecutionStrategy(graceful_delay=GRACE).run(
            algorithm, cooperative_runner(Recorder()), InMemoryLightningStore()
        )
