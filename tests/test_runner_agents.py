"""What agents do to the runner loop (issue 16): errors of every kind, rewards of every numeric type,
agents that outlive their rollout's time limit, and results that arrive too late. Against every
store (``store`` fixture), through :func:`agl_async.trainer.runner_loop`."""

from __future__ import annotations

import decimal
import fractions
import math
import threading
import time
from typing import Any

import anyio
import pytest
from test_trainer import TIMEOUT, Event, run_until_done

import agl_async.runner
from agl_async import LightningStore, RolloutConfig, SharedMemoryExecutionStrategy, Trainer
from agl_async.algorithm import Baseline, reward_of
from agl_async.trainer import runner_loop

pytestmark = pytest.mark.anyio


async def _attempt(store: LightningStore, rollout_id: str) -> Any:
    attempt = await store.get_latest_attempt(rollout_id)
    assert attempt is not None
    return attempt


# --------------------------------------------------------------------------------- agent errors
class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken too")


async def test_an_exception_whose_str_raises_fails_only_its_attempt(store: LightningStore) -> None:
    bad = await store.enqueue_rollout("bad")
    good = await store.enqueue_rollout("good")

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        if task == "bad":
            raise Unprintable()
        return 1.0

    assert await run_until_done(store, agent, [bad.rollout_id, good.rollout_id]) == 2
    attempt = await _attempt(store, bad.rollout_id)
    assert attempt.status == "failed" and attempt.metadata["error"].startswith("Unprintable")
    finished = await store.get_rollout_by_id(good.rollout_id)
    assert finished is not None and reward_of(finished) == 1.0


async def _raise_keyboard_interrupt(task: Any, resources: dict[str, Any]) -> float:
    raise KeyboardInterrupt


def _raise_system_exit(task: Any, resources: dict[str, Any]) -> float:
    raise SystemExit(3)


@pytest.mark.parametrize(
    "agent", [_raise_keyboard_interrupt, _raise_system_exit], ids=["kbint-async", "exit-sync"]
)
async def test_keyboard_interrupt_and_system_exit_are_recorded_then_raised_as_themselves(
    store: LightningStore, agent: Any
) -> None:
    rollout = await store.enqueue_rollout("t")
    with anyio.fail_after(TIMEOUT), pytest.raises((KeyboardInterrupt, SystemExit)) as raised:
        await runner_loop(store, 0, Event(), agent)
    assert type(raised.value) in (KeyboardInterrupt, SystemExit)  # not an exception group
    attempt = await _attempt(store, rollout.rollout_id)
    assert attempt.status == "failed" and attempt.metadata["error"].split(":")[0] in (
        "KeyboardInterrupt",
        "SystemExit",
    )


@pytest.mark.parametrize(
    "agent", [_raise_keyboard_interrupt, _raise_system_exit], ids=["kbint-async", "exit-sync"]
)
def test_fit_raises_the_agents_keyboard_interrupt_or_system_exit_itself(agent: Any) -> None:
    trainer = Trainer(strategy={"type": "shm", "graceful_delay": 1.0})
    with pytest.raises(BaseException) as raised:
        trainer.fit(agent, train_dataset=[1])
    assert type(raised.value) in (KeyboardInterrupt, SystemExit), repr(raised.value)


# -------------------------------------------------------------------------------------- rewards
def _numpy_rewards() -> list[Any]:
    np = pytest.importorskip("numpy")
    return [np.float32(0.5), np.int64(3), np.float64(-1.25), np.bool_(True), np.array(2.5)]


@pytest.mark.parametrize(
    "value",
    [7, True, 0.25, fractions.Fraction(1, 4), decimal.Decimal("0.75"), "numpy"],
    ids=["int", "bool", "float", "fraction", "decimal", "numpy"],
)
async def test_any_real_number_is_a_reward_converted_to_float(store: LightningStore, value: Any) -> None:
    values = _numpy_rewards() if value == "numpy" else [value]
    ids = [(await store.enqueue_rollout(i)).rollout_id for i in range(len(values))]
    await run_until_done(store, lambda task, resources: values[task], ids)
    for rid, expected in zip(ids, values, strict=True):
        finished = await store.get_rollout_by_id(rid)
        assert finished is not None and finished.status == "succeeded"
        reward = finished.metadata["reward"]
        assert type(reward) is float and reward == float(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (math.nan, "finite"),
        (math.inf, "finite"),
        (-math.inf, "finite"),
        (decimal.Decimal("NaN"), "finite"),
        (10**400, "cannot be converted to a float"),
        (1 + 2j, "real number"),
        ("0.5", "real number"),
    ],
    ids=["nan", "inf", "-inf", "decimal-nan", "huge-int", "complex", "str"],
)
async def test_a_reward_that_is_not_a_finite_real_number_fails_the_attempt_in_every_store(
    store: LightningStore, value: Any, message: str
) -> None:
    rollout = await store.enqueue_rollout("t")
    await run_until_done(store, lambda task, resources: value, [rollout.rollout_id])
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and finished.status == "failed" and "reward" not in finished.metadata
    attempt = await _attempt(store, rollout.rollout_id)
    assert attempt.status == "failed" and message in attempt.metadata["error"], attempt.metadata["error"]
    assert await store.query_spans(rollout.rollout_id) == []


# ---------------------------------------------------------------------------------- time limits
async def _hangs(task: Any, resources: dict[str, Any]) -> float:
    if task == "hang":
        await anyio.sleep_forever()
    return 1.0


_release = threading.Event()


def _blocks(task: Any, resources: dict[str, Any]) -> float:
    if task == "hang":
        _release.wait(TIMEOUT)  # a blocked sync agent: its thread is abandoned at the limit
    return 1.0


@pytest.mark.parametrize("agent", [_hangs, _blocks], ids=["async", "sync"])
async def test_timeout_seconds_cancels_the_agent_call_and_frees_the_runner(
    store: LightningStore, agent: Any
) -> None:
    config = RolloutConfig(timeout_seconds=0.3)
    hung = await store.enqueue_rollout("hang", config=config)
    after = await store.enqueue_rollout("next")
    started = time.monotonic()
    try:
        await run_until_done(store, agent, [hung.rollout_id, after.rollout_id])
    finally:
        _release.set()
    assert time.monotonic() - started < TIMEOUT  # the slot was freed: "next" ran
    attempt = await _attempt(store, hung.rollout_id)
    assert attempt.status == "timeout"
    finished = await store.get_rollout_by_id(after.rollout_id)
    assert finished is not None and finished.status == "succeeded"
    _release.clear()


async def test_a_timed_out_attempt_is_retried_per_config(store: LightningStore) -> None:
    calls: list[int] = []

    async def slow_first(task: Any, resources: dict[str, Any]) -> float:
        calls.append(len(calls))
        if len(calls) == 1:
            await anyio.sleep_forever()
        return 2.0

    config = RolloutConfig(timeout_seconds=0.3, max_attempts=2, retry_condition=["timeout"])
    rollout = await store.enqueue_rollout("t", config=config)
    await run_until_done(store, slow_first, [rollout.rollout_id])
    assert [a.status for a in await store.query_attempts(rollout.rollout_id)] == ["timeout", "succeeded"]
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and reward_of(finished) == 2.0


async def test_a_result_for_an_attempt_that_was_replaced_is_discarded(store: LightningStore) -> None:
    """The watchdog gave up on the attempt and another runner took the rollout over while this agent
    still ran: its late reward must not land on the rollout (the store keeps only the terminal one;
    this covers the window before the new attempt ends)."""
    config = RolloutConfig(unresponsive_seconds=30, max_attempts=2, retry_condition=["unresponsive"])
    rollout = await store.enqueue_rollout("t", config=config)

    async def superseded(task: Any, resources: dict[str, Any]) -> float:
        # What the watchdog and a second runner would do meanwhile.
        await store.update_attempt(rollout.rollout_id, "latest", status="unresponsive")
        other = await store.dequeue_rollout(worker_id="other")
        assert other is not None and other.attempt.sequence_id == 2
        return 9.0

    with anyio.fail_after(TIMEOUT):
        await runner_loop(store, 0, Event(), superseded, max_rollouts=1)
    current = await store.get_rollout_by_id(rollout.rollout_id)
    assert current is not None and "reward" not in current.metadata and current.status == "preparing"
    assert [a.status for a in await store.query_attempts(rollout.rollout_id)] == ["unresponsive", "preparing"]


# ------------------------------------------------------------------------------------- shutdown
async def test_a_runner_that_just_finished_a_rollout_stops_at_once_at_the_event(
    store: LightningStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a success the runner claims the next rollout in the same call; on an in-process store
    that call must not wait (its wait could not see the event): the event is raced instead."""
    if not store.long_poll_is_cancel_safe:
        pytest.skip("over HTTP the server ends its long polls when the run ends (tested in cs)")
    monkeypatch.setattr(agl_async.runner, "_LONG_POLL_TIMEOUT", 3600.0)  # any wait would show
    event = Event()
    rollout = await store.enqueue_rollout("t")

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        return 1.0

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner_loop, store, 0, event, agent)
            await store.wait_for_rollouts(rollout_ids=[rollout.rollout_id])
            await anyio.wait_all_tasks_blocked()
            event.set()


async def test_the_debugging_setup_returns_when_baseline_is_done() -> None:
    # SharedMemoryExecutionStrategy(main_thread="runner") + Baseline used to finish its epochs and
    # never return (the runner waited for work forever).
    algorithm = Baseline(n_epochs=2)
    strategy = SharedMemoryExecutionStrategy(n_runners=1, main_thread="runner")
    trainer = Trainer(strategy=strategy, algorithm=algorithm)
    with anyio.fail_after(TIMEOUT):
        await trainer.fit_async(lambda task, resources: float(task), [1, 2])
    assert [s.mean_reward for s in algorithm.history] == [1.5, 1.5]


# ------------------------------------------------------------------------------- the algorithm
async def test_baseline_ends_at_the_stop_event_instead_of_waiting_out_the_grace_period() -> None:
    """A caller's cancellation (what Ctrl-C is) sets the event: Baseline sees it and returns, so the
    run ends as soon as the runners have finished the rollout they hold, not after graceful_delay."""
    started = anyio.Event()

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        started.set()
        await anyio.sleep(0.02)
        return 1.0

    algorithm = Baseline()
    trainer = Trainer(strategy={"type": "shm", "graceful_delay": TIMEOUT * 10}, algorithm=algorithm)
    with anyio.fail_after(TIMEOUT):  # the grace period alone would be ten times longer
        async with anyio.create_task_group() as tg:
            tg.start_soon(trainer.fit_async, agent, list(range(10_000)))
            await started.wait()
            tg.cancel_scope.cancel()
    assert algorithm.history == []  # the interrupted pass is not reported
    assert algorithm.stopping


async def test_until_stopped_returns_the_result_or_none_at_the_event() -> None:
    from agl_async.execution.events import ThreadingExecutionEvent

    algorithm = Baseline()
    assert await algorithm.until_stopped(anyio.sleep, 0) is None  # no event: just the call
    algorithm.stop_event = ThreadingExecutionEvent()

    async def answer() -> int:
        return 42

    assert await algorithm.until_stopped(answer) == 42
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(algorithm.until_stopped, anyio.sleep_forever)
            await anyio.wait_all_tasks_blocked()
            algorithm.stop_event.set()
    assert algorithm.stopping


def test_a_synchronous_algorithm_run_is_refused_with_what_to_write() -> None:
    from agl_async import Algorithm

    class Sync(Algorithm):
        def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:  # type: ignore[override]
            pass

    with pytest.raises(ValueError, match=r"Sync\.run must be a coroutine function: .*async def run"):
        Trainer(algorithm=Sync())
