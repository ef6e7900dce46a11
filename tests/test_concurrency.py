"""Runner concurrency (CONTRACT section 6): ``Trainer(..., concurrency=C)`` and ``agl-async runner
--concurrency C`` put ``n_runners x C`` rollouts in flight, each slot with a worker id unique in the
store; stop, grace, cancellation and ``max_rollouts`` hold for every slot.

The agents here wait for each other through the store (``current_rollout().store``): an agent
returns only once the number of rollouts ``running`` at once has reached the target, so a run whose
runners do not really work on ``n_runners x C`` rollouts at once cannot finish (the hang guard
fails it). They are module-level so that they pickle into runner processes.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from conftest import BOTH_BACKENDS
from test_cli import Proc, alive, descendants, procs  # noqa: F401 (fixture)

from agl_async import (
    Algorithm,
    ClientServerExecutionStrategy,
    InMemoryLightningStore,
    LightningStore,
    Rollout,
    SharedMemoryExecutionStrategy,
    Trainer,
)
from agl_async.cli import main
from agl_async.concurrency import check_concurrency, new_worker_prefix, run_slots, slot_worker_id
from agl_async.rollout_context import current_rollout
from agl_async.testing import free_port

TIMEOUT = 60  # hang guard only: the machine is shared and slow
POLL = 0.02  # agents in other processes see each other through the store only


# ---------------------------------------------------------------------------- agents (module level)
async def _running(store: LightningStore) -> int:
    return len(await store.query_rollouts(status_in=["running"]))


async def _observe(store: LightningStore) -> tuple[int, int]:
    """(rollouts running now, rollouts of the waiting group that have started)."""
    rollouts = await store.query_rollouts()
    running = sum(r.status == "running" for r in rollouts)
    started = sum(
        r.input["index"] < r.input["target"] and r.status in ("running", "succeeded") for r in rollouts
    )
    return running, started


async def gather_async(task: dict[str, Any], resources: dict[str, Any]) -> float:
    """Return the largest number of rollouts seen running at once. The first ``target`` rollouts
    (the waiting group) return only once all of them have started: none of them can end before
    the last one starts, so ``target`` of them ran at once."""
    context = current_rollout()
    assert context is not None
    running, started = await _observe(context.store)
    peak = running
    with anyio.fail_after(TIMEOUT):
        while task["index"] < task["target"] and started < task["target"]:
            await anyio.sleep(POLL)  # other processes' state, seen through the store
            running, started = await _observe(context.store)
            peak = max(peak, running)
    return float(peak)


def gather_sync(task: dict[str, Any], resources: dict[str, Any]) -> float:
    """:func:`gather_async` as a plain function (runs in a worker thread)."""
    assert threading.current_thread() is not threading.main_thread()
    context = current_rollout()  # the worker thread runs in a copy of the slot's context
    assert context is not None
    running, started = anyio.from_thread.run(_observe, context.store)
    peak = running
    deadline = time.monotonic() + TIMEOUT
    while task["index"] < task["target"] and started < task["target"]:
        assert time.monotonic() < deadline, f"only {started} of {task['target']} started"
        time.sleep(POLL)
        running, started = anyio.from_thread.run(_observe, context.store)
        peak = max(peak, running)
    return float(peak)


async def forever(task: Any, resources: dict[str, Any]) -> float:
    await anyio.sleep_forever()
    raise AssertionError("unreachable")


async def brief(task: Any, resources: dict[str, Any]) -> float:
    await anyio.sleep(0.3)
    return 1.0


async def where_am_i(task: Any, resources: dict[str, Any]) -> float:
    context = current_rollout()
    assert context is not None
    attempt = await context.store.get_latest_attempt(context.rollout_id)
    assert attempt is not None and attempt.attempt_id == context.attempt_id
    assert attempt.worker_id == context.worker_id and attempt.status == "running"
    return 1.0


def where_am_i_sync(task: Any, resources: dict[str, Any]) -> float:
    context = current_rollout()
    assert context is not None and context.rollout.input == task
    return 1.0


# ---------------------------------------------------------------------------- algorithms
class Gather(Algorithm):
    """Enqueue ``target + extra`` rollouts and wait for all of them."""

    def __init__(self, target: int, extra: int = 2) -> None:
        self.target, self.extra = target, extra
        self.finished: list[Rollout] = []

    async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
        tasks = [{"index": i, "target": self.target} for i in range(self.target + self.extra)]
        ids = [r.rollout_id for r in await self.store.enqueue_many_rollouts([{"input": t} for t in tasks])]
        self.finished = await self.store.wait_for_rollouts(rollout_ids=ids, timeout=TIMEOUT)


class ReturnWhenRunning(Algorithm):
    """Enqueue ``n`` rollouts, wait until all of them are ``running``, then return (the stop)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ids: list[str] = []

    async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
        self.ids = [
            r.rollout_id
            for r in await self.store.enqueue_many_rollouts([{"input": i} for i in range(self.n)])
        ]
        with anyio.fail_after(TIMEOUT):
            while await _running(self.store) < self.n:  # noqa: ASYNC110 - runners' state, via the store
                await anyio.sleep(POLL)


def _strategy(mode: str, n_runners: int, grace: float = 10.0) -> Any:
    if mode == "shm":
        return SharedMemoryExecutionStrategy(n_runners=n_runners, graceful_delay=grace)
    return ClientServerExecutionStrategy(
        role="both",
        n_runners=n_runners,
        server_host="127.0.0.1",
        server_port=free_port(),
        graceful_timeout=grace,
        terminate_timeout=5.0,
    )


async def _attempts(store: LightningStore, ids: Sequence[str]) -> list[Any]:
    out = []
    for rollout_id in ids:
        out += await store.query_attempts(rollout_id)
    return out


# ---------------------------------------------------------------------------- in flight: n x C
@pytest.mark.parametrize(
    ("mode", "agent", "n_runners", "concurrency"),
    [
        ("shm", gather_async, 2, 5),
        ("shm", gather_sync, 2, 24),  # 48 threads: more than anyio's default limiter (40) allows
        ("cs", gather_async, 2, 4),
        ("cs", gather_sync, 2, 3),
    ],
    ids=["shm-async", "shm-sync", "cs-async", "cs-sync"],
)
def test_peak_in_flight_is_n_runners_times_concurrency(
    mode: str, agent: Any, n_runners: int, concurrency: int, no_leftover_processes: None
) -> None:
    target = n_runners * concurrency
    algorithm = Gather(target)
    trainer = Trainer(
        strategy=_strategy(mode, n_runners), algorithm=algorithm, concurrency=concurrency, agent=agent
    )
    trainer.run()
    assert [r.status for r in algorithm.finished] == ["succeeded"] * (target + 2)
    # `target` ran at once (the waiting group cannot end otherwise); nobody ever saw more
    assert max(r.metadata["reward"] for r in algorithm.finished) == target
    workers = anyio.run(trainer.store.query_workers)
    ids = [w.worker_id for w in workers]
    assert len(ids) == len(set(ids)) == target  # one worker id per slot
    attempts = anyio.run(_attempts, trainer.store, [r.rollout_id for r in algorithm.finished])
    concurrent = [a.worker_id for a in attempts[:target]]
    assert len(set(concurrent)) == target  # the rollouts running at once each had a slot of their own
    assert {a.worker_id for a in attempts} <= set(ids)
    if mode == "cs":  # one prefix per runner process
        prefixes = {str(i).rsplit("/", 1)[0] for i in ids}
        assert len(prefixes) == n_runners


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BOTH_BACKENDS)
@pytest.mark.parametrize("agent", [where_am_i, where_am_i_sync], ids=["async", "sync"])
async def test_agent_sees_its_own_rollout(agent: Any) -> None:
    store = InMemoryLightningStore()
    ids = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(6)])]
    assert current_rollout() is None
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            tg.start_soon(lambda: run_slots(store, 0, stop, agent, concurrency=3))
            finished = await store.wait_for_rollouts(rollout_ids=ids)
            stop.set()
    assert [r.status for r in finished] == ["succeeded"] * 6
    assert current_rollout() is None


# ---------------------------------------------------------------------------- max_rollouts
@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BOTH_BACKENDS)
async def test_max_rollouts_caps_the_runner_not_each_slot() -> None:
    store = InMemoryLightningStore()
    ids = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(10)])]
    with anyio.fail_after(TIMEOUT):
        done = await run_slots(store, 0, anyio.Event(), brief, concurrency=4, max_rollouts=3)
    assert done == 3
    statuses = [r.status for r in await store.query_rollouts(rollout_id_in=ids)]
    assert sorted(statuses).count("succeeded") == 3 and statuses.count("queuing") == 7


# ---------------------------------------------------------------------------- stop, grace, cancellation
@pytest.mark.parametrize("mode", ["shm", "cs"])
def test_grace_lets_every_slot_finish_its_rollout(mode: str, no_leftover_processes: None) -> None:
    algorithm = ReturnWhenRunning(6)
    trainer = Trainer(strategy=_strategy(mode, 2, grace=30.0), algorithm=algorithm, concurrency=3)
    trainer.fit(brief)  # the algorithm returns while 6 agents run: the grace lets them finish
    rollouts = anyio.run(lambda: trainer.store.query_rollouts(rollout_id_in=algorithm.ids))
    assert [r.status for r in rollouts] == ["succeeded"] * 6


@pytest.mark.parametrize("mode", ["shm", "cs"])
def test_cancelled_slots_leave_no_attempt_running(mode: str, no_leftover_processes: None) -> None:
    algorithm = ReturnWhenRunning(8)
    trainer = Trainer(strategy=_strategy(mode, 2, grace=0.2), algorithm=algorithm, concurrency=4)
    trainer.fit(forever)  # grace over: every slot is cancelled while its agent runs
    attempts = anyio.run(_attempts, trainer.store, algorithm.ids)
    assert len(attempts) == 8
    assert [(a.status, a.metadata) for a in attempts] == [("failed", {"error": "cancelled"})] * 8


# ---------------------------------------------------------------------------- worker ids
def test_worker_ids_are_unique_per_slot_and_per_call() -> None:
    first, second = new_worker_prefix(), new_worker_prefix()
    assert first != second
    ids = {slot_worker_id(p, r, s) for p in (first, second) for r in range(3) for s in range(4)}
    assert len(ids) == 24


async def _drive(endpoint: str, n: int) -> tuple[list[Rollout], list[Any], list[Any]]:
    from agl_async import LightningStoreClient

    async with LightningStoreClient(endpoint, auth_token="") as client:
        ids = [r.rollout_id for r in await client.enqueue_many_rollouts([{"input": 0}] * n)]
        with anyio.fail_after(TIMEOUT):
            finished: list[Rollout] = []
            while len(finished) < n:
                finished = await client.wait_for_rollouts(rollout_ids=ids, timeout=TIMEOUT)
        return finished, await _attempts(client, ids), await client.query_workers()


async def slow_one(task: Any, resources: dict[str, Any]) -> float:
    await anyio.sleep(0.2)
    return 1.0


def test_two_separately_started_runner_commands_record_distinct_worker_ids(
    procs: list[Proc],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    here = str(Path(__file__).parent)  # the runner commands import this module's agent
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    port = free_port()
    server = Proc("serve", "--host", "127.0.0.1", "--port", str(port), "--token", "")
    procs.append(server)
    server.wait_for_line("listening on")
    endpoint = f"http://127.0.0.1:{port}"
    runners = []
    for _ in range(2):
        runner = Proc(
            "runner", "--server", endpoint, "--token", "", "--agent", "test_concurrency:slow_one",
            "--concurrency", "2", "--max-rollouts", "3",
        )  # fmt: skip
        procs.append(runner)
        runners.append(runner)
    for runner in runners:
        runner.wait_for_line(r"1 runner\(s\) x 2 concurrent rollouts")
    children = set().union(*(descendants(r.popen.pid) for r in runners))
    finished, attempts, workers = anyio.run(_drive, endpoint, 6)
    assert [r.status for r in finished] == ["succeeded"] * 6
    for runner in runners:
        assert runner.wait() == 0, runner.output  # 3 rollouts each (2 slots together): done
    ids = {w.worker_id for w in workers}
    assert len(ids) == 4  # 2 processes x 2 slots, no id shared (the old runner recorded 0 twice)
    assert {a.worker_id for a in attempts} <= ids
    assert len({str(i).rsplit("/", 1)[0] for i in ids}) == 2
    server.popen.send_signal(signal.SIGINT)
    assert server.wait() == 0, server.output
    assert alive(children) == set()


# ---------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2", None])
def test_bad_concurrency_is_a_clear_value_error(value: Any) -> None:
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        Trainer(concurrency=value)
    with pytest.raises(ValueError, match="concurrency must be a positive integer"):
        check_concurrency(value)


@pytest.mark.anyio
async def test_run_slots_rejects_bad_values_before_running() -> None:
    store = InMemoryLightningStore()
    with pytest.raises(ValueError, match="concurrency"):
        await run_slots(store, 0, anyio.Event(), brief, concurrency=0)
    with pytest.raises(ValueError, match="max_rollouts"):
        await run_slots(store, 0, anyio.Event(), brief, max_rollouts=-1)
    assert await store.query_workers() == []


@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_cli_rejects_a_bad_concurrency(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    for command in (["demo"], ["runner", "--server", "http://127.0.0.1:1", "--agent", "m:a"]):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--concurrency", value])
        assert exc.value.code == 2
        assert re.search(r"--concurrency: (must be >= 1|must be an integer|invalid)", capsys.readouterr().err)


# ---------------------------------------------------------------------------- waiting for work
class CountingStore(InMemoryLightningStore):
    """Counts the long polls (``dequeue_rollout`` with a timeout) waiting at once, and every
    ``dequeue_rollout`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.polling = 0
        self.most_polling = 0
        self.dequeues = 0

    async def dequeue_rollout(self, worker_id: Any = None, *, timeout: float | None = None) -> Any:
        self.dequeues += 1
        if not timeout:
            return await super().dequeue_rollout(worker_id, timeout=timeout)
        self.polling += 1
        self.most_polling = max(self.most_polling, self.polling)
        try:
            return await super().dequeue_rollout(worker_id, timeout=timeout)
        finally:
            self.polling -= 1


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", BOTH_BACKENDS)
async def test_idle_slots_share_one_long_poll_and_all_wake_for_work() -> None:
    store = CountingStore()
    stop = anyio.Event()
    slots = 8
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_slots(store, 0, stop, gather_async, concurrency=slots))
            while len(await store.query_workers()) < slots or store.polling < 1:  # noqa: ASYNC110
                await anyio.sleep(POLL)  # every slot is up and idle
            tasks = [{"input": {"index": i, "target": slots}} for i in range(slots)]
            ids = [r.rollout_id for r in await store.enqueue_many_rollouts(tasks)]
            finished = await store.wait_for_rollouts(rollout_ids=ids)  # needs all 8 slots at once
            stop.set()
    assert [r.status for r in finished] == ["succeeded"] * slots
    assert store.most_polling == 1


class FailingStore(InMemoryLightningStore):
    """``update_attempt(status="running")`` of the rollout whose input is ``"bad"`` fails."""

    async def update_attempt(self, rollout_id: str, attempt_id: str, *args: Any, **kwargs: Any) -> Any:
        rollout = await self.get_rollout_by_id(rollout_id)
        if kwargs.get("status") == "running" and rollout is not None and rollout.input == "bad":
            raise ConnectionError("the store went away")
        return await super().update_attempt(rollout_id, attempt_id, *args, **kwargs)


@pytest.mark.anyio
async def test_a_store_error_in_one_slot_ends_the_runner_with_that_error() -> None:
    store = FailingStore()
    good = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": "good"}] * 3)]
    await store.enqueue_rollout("bad")
    with anyio.fail_after(TIMEOUT), pytest.raises(ConnectionError, match="went away"):
        await run_slots(store, 0, anyio.Event(), forever, concurrency=4)
    attempts = await _attempts(store, good)
    assert [(a.status, a.metadata) for a in attempts] == [("failed", {"error": "cancelled"})] * 3


async def quick(task: Any, resources: dict[str, Any]) -> float:
    await anyio.sleep(0.01)
    return 1.0


@pytest.mark.anyio
async def test_one_rollout_at_a_time_does_not_wake_every_idle_slot() -> None:
    store = CountingStore()
    stop = anyio.Event()
    slots, rollouts = 16, 10
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: run_slots(store, 0, stop, quick, concurrency=slots))
            while len(await store.query_workers()) < slots or store.polling < 1:  # noqa: ASYNC110
                await anyio.sleep(POLL)
            store.dequeues = 0
            for i in range(rollouts):  # the `single` pattern: enqueue one, wait for it
                rollout = await store.enqueue_rollout(i)
                await store.wait_for_rollouts(rollout_ids=[rollout.rollout_id])
            stop.set()
    # a few looks per rollout (the watcher's poll, the next watcher's look), not one per idle slot
    assert store.dequeues <= 4 * rollouts
