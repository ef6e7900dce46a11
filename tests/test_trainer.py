"""The training loop: the runner loop (against every store), the Trainer in both modes, Baseline."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import pytest
from conftest import BOTH_BACKENDS

from agl_async import (
    Algorithm,
    ClientServerExecutionStrategy,
    InMemoryLightningStore,
    LightningStore,
    RolloutConfig,
    SharedMemoryExecutionStrategy,
    Trainer,
)
from agl_async.algorithm import Baseline, PassStats, reward_of
from agl_async.examples.evolution import agent as es_agent
from agl_async.examples.evolution import make_tasks
from agl_async.testing import free_port, open_test_store, store_fixture
from agl_async.trainer import REWARD_SPAN_NAME, runner_loop

TIMEOUT = 30  # hang guard only: the machine is shared and slow


class Event:
    """A hand-made stop event (the runner loop needs only is_set / wait)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


async def run_until_done(store: LightningStore, agent: Any, ids: list[str], **kwargs: Any) -> int:
    """Run one runner until the given rollouts are terminal; return how many rollouts it ran."""
    event = Event()
    done = 0

    async def runner() -> None:
        nonlocal done
        done = await runner_loop(store, 0, event, agent, **kwargs)

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner)
            await store.wait_for_rollouts(rollout_ids=ids)
            event.set()
    return done


# ------------------------------------------------------------------------------- the runner loop
@pytest.mark.anyio
async def test_reward_is_recorded_as_span_and_on_rollout(store: LightningStore) -> None:
    await store.add_resources({"scale": 3})
    rollout = await store.enqueue_rollout({"x": 2}, metadata={"tag": "kept"})
    await store.add_resources({"scale": 100})  # newer, but the agent gets the rollout's own resources
    seen: list[tuple[Any, dict[str, Any]]] = []
    during: list[str | None] = []

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        seen.append((task, resources))
        attempt = await store.get_latest_attempt(rollout.rollout_id)
        during.append(None if attempt is None else attempt.status)
        return float(task["x"] * resources["scale"])

    assert await run_until_done(store, agent, [rollout.rollout_id]) == 1
    assert seen == [({"x": 2}, {"scale": 3})]
    assert during == ["running"]  # marked running before the agent is called
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None
    assert finished.status == "succeeded"
    assert finished.metadata == {"tag": "kept", "reward": 6.0}
    assert reward_of(finished) == 6.0
    attempt = await store.get_latest_attempt(rollout.rollout_id)
    assert attempt is not None and attempt.status == "succeeded" and attempt.worker_id == 0
    spans = await store.query_spans(rollout.rollout_id)
    assert [(s.name, s.attributes, s.attempt_id) for s in spans] == [
        (REWARD_SPAN_NAME, {"reward": 6.0}, attempt.attempt_id)
    ]


@pytest.mark.anyio
async def test_no_resources_means_empty_mapping_and_none_reward_records_nothing(
    store: LightningStore,
) -> None:
    rollout = await store.enqueue_rollout("task")
    seen: list[dict[str, Any]] = []

    def agent(task: Any, resources: dict[str, Any]) -> None:
        seen.append(resources)

    await run_until_done(store, agent, [rollout.rollout_id])
    assert seen == [{}]
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and finished.status == "succeeded" and reward_of(finished) is None
    assert await store.query_spans(rollout.rollout_id) == []


@pytest.mark.anyio
async def test_agent_error_is_recorded_and_the_runner_goes_on(store: LightningStore) -> None:
    bad = await store.enqueue_rollout("boom")
    good = await store.enqueue_rollout("ok")

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        if task == "boom":
            raise KeyError("no such tool")
        return 1.0

    assert await run_until_done(store, agent, [bad.rollout_id, good.rollout_id]) == 2
    failed = await store.get_rollout_by_id(bad.rollout_id)
    assert failed is not None and failed.status == "failed"
    attempt = await store.get_latest_attempt(bad.rollout_id)
    assert attempt is not None and attempt.status == "failed"
    assert attempt.metadata["error"] == "KeyError: 'no such tool'"
    assert "Traceback" in attempt.metadata["traceback"] and "no such tool" in attempt.metadata["traceback"]
    succeeded = await store.get_rollout_by_id(good.rollout_id)
    assert succeeded is not None and succeeded.status == "succeeded"


@pytest.mark.anyio
async def test_non_numeric_result_fails_the_attempt(store: LightningStore) -> None:
    rollout = await store.enqueue_rollout("t")
    await run_until_done(store, lambda task, resources: "great", [rollout.rollout_id])
    attempt = await store.get_latest_attempt(rollout.rollout_id)
    assert attempt is not None and attempt.status == "failed"
    assert attempt.metadata["error"].startswith("TypeError: the agent must return a real number")


@pytest.mark.anyio
async def test_failed_attempt_is_retried_per_config(store: LightningStore) -> None:
    config = RolloutConfig(max_attempts=2, retry_condition=["failed"])
    rollout = await store.enqueue_rollout("flaky", config=config)
    calls = 0

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("transient")
        return 0.5

    assert await run_until_done(store, agent, [rollout.rollout_id]) == 2
    attempts = await store.query_attempts(rollout.rollout_id)
    assert [a.status for a in attempts] == ["failed", "succeeded"]
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and finished.status == "succeeded" and reward_of(finished) == 0.5


@pytest.mark.anyio
async def test_max_rollouts_stops_the_runner(store: LightningStore) -> None:
    ids = [(await store.enqueue_rollout(i)).rollout_id for i in range(5)]
    with anyio.fail_after(TIMEOUT):
        done = await runner_loop(store, 0, Event(), lambda task, resources: 1.0, max_rollouts=3)
    assert done == 3
    statuses = [r.status for r in await store.query_rollouts(rollout_id_in=ids)]
    assert statuses == ["succeeded"] * 3 + ["queuing"] * 2


@pytest.mark.anyio
async def test_idle_runner_stops_when_the_event_is_set(store: LightningStore) -> None:
    event = Event()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner_loop, store, 7, event, lambda task, resources: 1.0)
            await anyio.lowlevel.checkpoint()  # let the runner reach its wait for work
            event.set()
    worker = await store.get_worker_by_id(7)
    assert worker is not None  # it registered itself


@pytest.mark.anyio
async def test_claimed_rollout_is_finished_after_the_event(store: LightningStore) -> None:
    rollout = await store.enqueue_rollout("t")
    event = Event()
    started = anyio.Event()
    release = anyio.Event()

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        started.set()
        await release.wait()
        return 2.0

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner_loop, store, 0, event, agent)
            await started.wait()
            event.set()
            release.set()
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and finished.status == "succeeded"


@pytest.mark.anyio
async def test_sync_agent_runs_in_a_worker_thread_without_blocking_the_loop(store: LightningStore) -> None:
    rollout = await store.enqueue_rollout("t")
    unblock = threading.Event()
    loop_thread = threading.get_ident()
    agent_threads: list[int] = []

    in_thread = anyio.Event()

    def agent(task: Any, resources: dict[str, Any]) -> float:
        agent_threads.append(threading.get_ident())
        anyio.from_thread.run_sync(in_thread.set)
        # Only a free event loop can set this: a blocked one would leave us at 0.0.
        return 1.0 if unblock.wait(timeout=TIMEOUT) else 0.0

    async def unblocker() -> None:
        await in_thread.wait()
        unblock.set()

    with anyio.fail_after(TIMEOUT * 2):
        async with anyio.create_task_group() as tg:
            tg.start_soon(unblocker)
            await run_until_done(store, agent, [rollout.rollout_id])
    assert agent_threads and agent_threads[0] != loop_thread
    finished = await store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and reward_of(finished) == 1.0


@pytest.mark.anyio
async def test_heartbeats_are_sent_while_the_agent_runs(store: LightningStore) -> None:
    rollout = await store.enqueue_rollout("long", config=RolloutConfig(unresponsive_seconds=30))

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        # Returns once a heartbeat naming this rollout reached the store.
        while True:
            worker = await store.get_worker_by_id(0)
            if worker is not None and (worker.heartbeat_stats or {}).get("rollout_id") == rollout.rollout_id:
                return 1.0
            await anyio.sleep(0.01)

    await run_until_done(store, agent, [rollout.rollout_id], heartbeat_interval=0.05)
    attempt = await store.get_latest_attempt(rollout.rollout_id)
    assert attempt is not None and attempt.status == "succeeded"


@pytest.mark.anyio
async def test_cancelled_agent_call_marks_the_attempt_failed(store: LightningStore) -> None:
    rollout = await store.enqueue_rollout("t")
    started = anyio.Event()

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner_loop, store, 0, Event(), agent)
            await started.wait()
            tg.cancel_scope.cancel()
    attempt = await store.get_latest_attempt(rollout.rollout_id)
    assert attempt is not None and attempt.status == "failed" and attempt.metadata == {"error": "cancelled"}


# ----------------------------------------------------------------------------------- the Trainer
class Recorder(Algorithm):
    """Enqueues its dataset, waits, and keeps what it saw."""

    def __init__(self) -> None:
        self.rewards: list[float | None] = []
        self.resources_at_start: Any = None

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        latest = await self.store.get_latest_resources()
        self.resources_at_start = (None if latest is None else latest.resources, self.initial_resources)
        ids = [(await self.store.enqueue_rollout(task)).rollout_id for task in train_dataset or []]
        finished = await self.store.wait_for_rollouts(rollout_ids=ids, timeout=TIMEOUT)
        self.rewards = [reward_of(r) for r in finished]


def double(task: Any, resources: dict[str, Any]) -> float:
    return float(task * resources.get("factor", 1))


async def async_double(task: Any, resources: dict[str, Any]) -> float:
    await anyio.lowlevel.checkpoint()
    return float(task * resources.get("factor", 1))


@pytest.mark.parametrize("agent", [double, async_double], ids=["sync", "async"])
def test_fit_shared_memory_with_initial_resources(agent: Any) -> None:
    algorithm = Recorder()
    trainer = Trainer(n_runners=3, algorithm=algorithm, initial_resources={"factor": 10})
    assert isinstance(trainer.strategy, SharedMemoryExecutionStrategy)
    assert trainer.n_runners == 3
    assert isinstance(trainer.store, InMemoryLightningStore)
    trainer.fit(agent, train_dataset=[1, 2, 3, 4])
    assert algorithm.rewards == [10.0, 20.0, 30.0, 40.0]
    assert algorithm.resources_at_start == ({"factor": 10}, {"factor": 10})


@pytest.mark.parametrize("anyio_backend", BOTH_BACKENDS)
@pytest.mark.anyio
async def test_fit_async_inside_a_running_loop(anyio_backend: str) -> None:
    algorithm = Recorder()
    trainer = Trainer(strategy="shm", n_runners=2, algorithm=algorithm)
    with anyio.fail_after(TIMEOUT):
        await trainer.fit_async(async_double, train_dataset=[1, 2, 3])
    assert algorithm.rewards == [1.0, 2.0, 3.0]


@pytest.mark.anyio
async def test_arun_uses_the_constructor_arguments() -> None:
    algorithm = Recorder()
    trainer = Trainer(algorithm=algorithm, agent=double, train_dataset=[5], initial_resources={"factor": 2})
    with anyio.fail_after(TIMEOUT):
        await trainer.arun()
    assert algorithm.rewards == [10.0]


def test_the_given_store_is_the_one_used() -> None:
    store = InMemoryLightningStore()
    trainer = Trainer(store=store, agent=double, train_dataset=[4])
    assert trainer.store is store
    trainer.run()
    [rollout] = anyio.run(store.query_rollouts)
    assert (rollout.status, reward_of(rollout)) == ("succeeded", 4.0)


def test_debugging_setup_runner_in_the_main_thread() -> None:
    algorithm = Recorder()
    trainer = Trainer(strategy={"type": "shm", "main_thread": "runner"}, algorithm=algorithm, max_rollouts=3)
    assert trainer.n_runners == 1
    trainer.fit(double, train_dataset=[1, 2, 3])  # the runner returns after 3; the algorithm is awaited
    assert algorithm.rewards == [1.0, 2.0, 3.0]


def test_run_uses_the_constructor_arguments() -> None:
    trainer = Trainer(agent=async_double, train_dataset=[1, 2], val_dataset=[3])
    trainer.run()  # no algorithm + a dataset: Baseline
    rollouts = anyio.run(trainer.store.query_rollouts)
    assert sorted((r.mode, reward_of(r)) for r in rollouts) == [("train", 1.0), ("train", 2.0), ("val", 3.0)]


def test_fit_client_server_both_roles(no_leftover_processes: None) -> None:
    train, val = make_tasks(0, n_train=4, n_val=2)
    algorithm = Baseline()
    trainer = Trainer(
        strategy={"type": "cs", "server_host": "127.0.0.1", "server_port": free_port()},
        n_runners=2,
        algorithm=algorithm,
        initial_resources={"theta": [0.0] * 6},
    )
    assert isinstance(trainer.strategy, ClientServerExecutionStrategy)
    assert trainer.strategy.n_runners == 2 and trainer.n_runners == 2
    trainer.fit(es_agent, train, val)
    assert [(s.mode, s.rollouts, s.succeeded) for s in algorithm.history] == [("train", 4, 4), ("val", 2, 2)]
    workers = anyio.run(trainer.store.query_workers)
    # one worker id per runner process (section 6: unique across processes, not the bundle's 0/1)
    assert len({w.worker_id for w in workers}) == 2


def picky(task: int, resources: dict[str, Any]) -> float:
    """Module level, so that it pickles into runner processes."""
    if task < 0:
        raise ValueError(f"negative task {task}")
    return float(task * resources.get("factor", 1))


@pytest.mark.anyio
async def test_fit_async_client_server_records_failures_from_runner_processes(
    no_leftover_processes: None,
) -> None:
    algorithm = Baseline()
    strategy = ClientServerExecutionStrategy(
        role="both", n_runners=2, server_host="127.0.0.1", server_port=free_port()
    )
    trainer = Trainer(strategy=strategy, algorithm=algorithm, initial_resources={"factor": 3})
    with anyio.fail_after(TIMEOUT * 2):
        await trainer.fit_async(picky, train_dataset=[1, -2, 3])
    [stats] = algorithm.history
    assert (stats.rollouts, stats.succeeded, stats.failed, stats.mean_reward) == (3, 2, 1, 6.0)
    [failed] = await trainer.store.query_rollouts(status_in=["failed"])
    attempt = await trainer.store.get_latest_attempt(failed.rollout_id)
    assert attempt is not None
    assert attempt.worker_id in {w.worker_id for w in await trainer.store.query_workers()}
    assert attempt.metadata["error"] == "ValueError: negative task -2"
    assert "in picky" in attempt.metadata["traceback"]


def test_max_rollouts_caps_each_runner() -> None:
    class Enqueue10(Algorithm):
        leftover: list[str] = []

        async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
            ids = [(await self.store.enqueue_rollout(i)).rollout_id for i in range(10)]
            with anyio.fail_after(TIMEOUT):
                while len(await self.store.query_rollouts(status_in=["succeeded"])) < 4:
                    await self.store.wait_for_rollouts(rollout_ids=ids, timeout=0.05)
            # Both runners are done (2 each): the rest stays queued however long we wait.
            await self.store.wait_for_rollouts(rollout_ids=ids, timeout=0.5)
            self.leftover = [r.rollout_id for r in await self.store.query_rollouts(status_in=["queuing"])]

    algorithm = Enqueue10()
    Trainer(n_runners=2, algorithm=algorithm, max_rollouts=2).fit(double)
    assert len(algorithm.leftover) == 6


def test_algorithm_error_propagates_from_fit() -> None:
    class Broken(Algorithm):
        async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
            raise LookupError("bad algorithm")

    with pytest.raises(LookupError, match="bad algorithm"):
        Trainer(algorithm=Broken(), strategy={"type": "shm", "graceful_delay": 0.1}).fit(double)


def test_baseline_reports_failures_and_reward_statistics() -> None:
    def agent(task: int, resources: dict[str, Any]) -> float:
        if task < 0:
            raise ValueError("negative")
        return float(task)

    algorithm = Baseline(n_epochs=2)
    Trainer(algorithm=algorithm, n_runners=2).fit(agent, train_dataset=[1, 2, 3, -1], val_dataset=[5])
    assert [(s.epoch, s.mode) for s in algorithm.history] == [
        (1, "train"),
        (1, "val"),
        (2, "train"),
        (2, "val"),
    ]
    train = algorithm.history[0]
    assert isinstance(train, PassStats)
    assert (train.rollouts, train.succeeded, train.failed, train.rewarded) == (4, 3, 1, 3)
    assert (train.mean_reward, train.min_reward, train.max_reward) == (2.0, 1.0, 3.0)
    assert algorithm.history[1].mean_reward == 5.0


# ------------------------------------------------------------------------------- configuration
def test_strategy_from_alias_dict_and_object() -> None:
    assert isinstance(Trainer().strategy, SharedMemoryExecutionStrategy)
    assert isinstance(Trainer(strategy="shm").strategy, SharedMemoryExecutionStrategy)
    cs = Trainer(strategy="cs", n_runners=3).strategy
    assert isinstance(cs, ClientServerExecutionStrategy) and cs.n_runners == 3
    shm = Trainer(strategy={"type": "shm", "n_runners": 2, "graceful_delay": 1.0}, n_runners=2).strategy
    assert isinstance(shm, SharedMemoryExecutionStrategy) and shm.graceful_delay == 1.0
    assert Trainer(strategy={"type": "shm", "n_runners": 2}).n_runners == 2
    given = SharedMemoryExecutionStrategy(n_runners=4)
    trainer = Trainer(strategy=given)
    assert trainer.strategy is given and trainer.n_runners == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "gpu"}, "unknown execution strategy 'gpu'"),
        ({"strategy": {"n_runners": 2}}, 'needs a "type" key'),
        ({"strategy": {"type": "shm", "bogus": 1}}, "invalid strategy .*bogus"),
        ({"strategy": {"type": "shm", "main_thread": "gpu"}}, "main_thread must be"),
        ({"strategy": 42}, "invalid strategy 42: strategy must be"),
        ({"n_runners": 0}, "n_runners must be a positive integer"),
        ({"max_rollouts": -1}, "max_rollouts must be"),
        ({"initial_resources": [1, 2]}, "initial_resources must be a mapping"),
        ({"algorithm": object()}, "algorithm must be an Algorithm"),
        ({"store": {}}, "store must be a LightningStore"),
    ],
)
def test_bad_configuration_is_a_clear_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Trainer(**kwargs)


def test_conflicting_n_runners_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_runners=2 conflicts with the strategy's n_runners=4"):
        Trainer(strategy=SharedMemoryExecutionStrategy(n_runners=4), n_runners=2)
    with pytest.raises(ValueError, match="n_runners=5 conflicts with the strategy's n_runners=2"):
        Trainer(strategy={"type": "cs", "n_runners": 2}, n_runners=5)


def test_fit_without_an_agent_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="no agent"):
        Trainer().run()
    with pytest.raises(ValueError, match="must be callable"):
        Trainer().fit(42)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_blocking_fit_inside_a_running_loop_points_to_fit_async() -> None:
    with pytest.raises(RuntimeError, match=r"use `await trainer\.fit_async"):
        Trainer().fit(double, train_dataset=[1])


def test_algorithm_store_is_set_by_the_trainer_only() -> None:
    with pytest.raises(RuntimeError, match="store is not set"):
        _ = Recorder().store


# ------------------------------------------------------------------------ agl_async.testing
user_store = store_fixture("memory", "locked", "http", name="user_store")


@pytest.mark.anyio
async def test_store_fixture_for_users_suites(user_store: LightningStore) -> None:
    rollout = await user_store.enqueue_rollout(3)
    assert await run_until_done(user_store, double, [rollout.rollout_id]) == 1
    finished = await user_store.get_rollout_by_id(rollout.rollout_id)
    assert finished is not None and reward_of(finished) == 3.0


@pytest.mark.anyio
async def test_open_test_store_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown store kind 'disk'"):
        async with open_test_store("disk"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="unknown store kind 'disk'"):
        store_fixture("disk")  # type: ignore[arg-type]
