"""The :class:`Trainer` and the runner loop: an algorithm and an agent, run by an execution strategy.

The trainer builds two *bundles* and hands them to the strategy:

* the algorithm bundle publishes ``initial_resources`` (before anything else), sets the
  algorithm's ``store`` and awaits :meth:`Algorithm.run <agl_async.algorithm.Algorithm.run>`;
* each runner bundle runs ``concurrency`` slots (:func:`agl_async.concurrency.run_slots`), each
  the loop of :func:`runner_loop`: dequeue a rollout, mark its attempt ``running``,
  call the agent with the rollout's input and resources, record the reward (a span named
  :data:`REWARD_SPAN_NAME` and ``rollout.metadata["reward"]``), then mark the attempt
  ``succeeded`` — or ``failed`` with the error and its traceback in the attempt's metadata.

Both bundles are small picklable objects (client-server mode sends them to worker processes), so
the agent and the algorithm must pickle too: a module-level function or class instance, not a
lambda or closure, when runners live in other processes.

Shutdown: a runner checks the stop event between rollouts and while it waits for work; the
rollout it holds when the event is set is finished first (the strategy's grace period). If the
runner is cancelled while the agent runs (grace over, Ctrl-C), the attempt is marked ``failed``
with ``error = "cancelled"`` under a shielded scope before the cancellation propagates, so no
attempt is left ``running`` by a runner that is gone; a synchronous agent's worker thread is
abandoned (it cannot be interrupted) and its result discarded.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, cast

import anyio
import anyio.to_thread

from .algorithm import REWARD_KEY, Algorithm, Baseline
from .execution.base import ExecutionStrategy, resolve_strategy
from .rollout_context import RolloutContext  # [context hook]
from .rollout_context import _current as _current_rollout  # [context hook]
from .store.base import LightningStore
from .store.locked import LightningStoreLocked
from .store.memory import InMemoryLightningStore
from .types import AttemptedRollout, Span, WorkerId

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "REWARD_SPAN_NAME",
    "Agent",
    "StopEvent",
    "Trainer",
    "run_rollout",
    "runner_loop",
]

logger = logging.getLogger(__name__)

#: Name of the span the runner loop records for an agent's reward (attribute ``"reward"``).
REWARD_SPAN_NAME = "agl_async.reward"

#: An agent: ``agent(task_input, resources) -> reward`` (``float`` or ``None``), sync or async.
Agent = Callable[[Any, dict[str, Any]], "float | Awaitable[float | None] | None"]

#: Seconds between heartbeats while an agent call runs (shortened for rollouts whose
#: ``config.unresponsive_seconds`` is smaller: a third of it).
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: Idle runners poll a store without a long poll with exponential backoff between these bounds
#: (seconds); a store with ``dequeue_rollout(worker_id=..., timeout=...)`` is waited on instead.
_MIN_BACKOFF, _MAX_BACKOFF = 0.002, 0.1
_LONG_POLL_TIMEOUT = 0.5
#: Upper bound for recording the failure of a cancelled attempt (runs shielded from the cancellation).
_CANCEL_RECORD_TIMEOUT = 5.0


class StopEvent(Protocol):
    """What the runner loop needs of an :class:`~agl_async.ExecutionEvent`."""

    def is_set(self) -> bool: ...

    async def wait(self) -> Any: ...


# ---------------------------------------------------------------------------------------- runner
def _supports_long_poll(store: LightningStore) -> bool:
    """True when ``store.dequeue_rollout`` takes a ``timeout`` (a long poll that waits for work)."""
    try:
        return "timeout" in inspect.signature(store.dequeue_rollout).parameters
    except (TypeError, ValueError):
        return False


def _is_async_callable(fn: Any) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


def _as_reward(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise TypeError(f"the agent must return a float reward or None, got {type(value).__name__}: {value!r}")


def _wait_is_cancel_safe(store: LightningStore) -> bool:
    """True for in-process stores, whose long poll can be abandoned at any point without a rollout
    being claimed and lost. (Over HTTP a cancelled request may still claim one on the server.)"""
    inner = store.store if isinstance(store, LightningStoreLocked) else store
    return isinstance(inner, InMemoryLightningStore)


async def _dequeue_until_stopped(
    store: LightningStore, worker_id: WorkerId, event: StopEvent
) -> AttemptedRollout | None:
    """Long-poll an in-process store, abandoning the wait as soon as the event is set."""
    claimed: AttemptedRollout | None = None

    async def stop_on_event(scope: anyio.CancelScope) -> None:
        await event.wait()
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_on_event, tg.cancel_scope)
        claimed = await store.dequeue_rollout(worker_id=worker_id, timeout=_LONG_POLL_TIMEOUT)
        tg.cancel_scope.cancel()
    return claimed


async def _next_rollout(
    store: LightningStore, worker_id: WorkerId, event: StopEvent, long_poll: bool
) -> AttemptedRollout | None:
    """Claim the next rollout, waiting for one; ``None`` once the event is set.

    Waiting is the store's long poll when it has one — raced against the event for in-process
    stores, at most 0.5 s per request over HTTP — or else ``event.wait()`` with backoff between
    polls.
    """
    delay = _MIN_BACKOFF
    race = long_poll and _wait_is_cancel_safe(store)
    while not event.is_set():
        if race:
            rollout = await store.dequeue_rollout(worker_id=worker_id)
            if rollout is None:
                rollout = await _dequeue_until_stopped(store, worker_id, event)
        elif long_poll:
            rollout = await store.dequeue_rollout(worker_id=worker_id, timeout=_LONG_POLL_TIMEOUT)
        else:
            rollout = await store.dequeue_rollout(worker_id=worker_id)
        if rollout is not None:
            return rollout
        if not long_poll:
            with anyio.move_on_after(delay):
                await event.wait()
            delay = min(delay * 2, _MAX_BACKOFF)
    return None


async def _heartbeat(
    store: LightningStore, worker_id: WorkerId, rollout_id: str, attempt_id: str, interval: float
) -> None:
    """Tell the store the worker and its attempt are alive every ``interval`` seconds until
    cancelled. A failing heartbeat is logged, never raised: it must not kill the agent call.

    The attempt is refreshed by its own id (``update_attempt`` with no change stamps the store's
    time): runner processes started separately (``agl-async runner`` on several machines) each
    number their runners from 0, so a worker id can be shared, and a worker heartbeat alone would
    keep another process's attempt alive instead of this one."""
    while True:
        await anyio.sleep(interval)
        try:
            await store.update_worker(
                worker_id, heartbeat_stats={"rollout_id": rollout_id, "time": time.time()}
            )
            await store.update_attempt(rollout_id, attempt_id)
        except Exception:
            logger.warning("runner %s: heartbeat failed", worker_id, exc_info=True)


async def _call_agent(agent: Agent, task_input: Any, resources: dict[str, Any]) -> Any:
    if _is_async_callable(agent):
        result: Any = await cast(Callable[..., Awaitable[Any]], agent)(task_input, resources)
    else:
        # A worker thread keeps the loop free; abandoned (not interrupted) on cancellation.
        result = await anyio.to_thread.run_sync(
            functools.partial(agent, task_input, resources), abandon_on_cancel=True
        )
    if inspect.isawaitable(result):
        result = await result
    return result


async def run_rollout(
    store: LightningStore,
    worker_id: WorkerId,
    rollout: AttemptedRollout,
    agent: Agent,
    *,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
) -> float | None:
    """Run one claimed rollout through ``agent`` and record the outcome; returns the reward.

    An exception from the agent (or a non-numeric result) is recorded — attempt ``failed`` with
    ``metadata = {"error": "<Type>: <message>", "traceback": "..."}`` — and not raised. Errors of
    the store itself propagate. Cancellation while the agent runs marks the attempt ``failed``
    (``error = "cancelled"``), shielded and bounded, and then propagates.
    """
    succeeded, reward = await _execute(store, worker_id, rollout, agent, heartbeat_interval)
    if succeeded:
        await store.update_attempt(rollout.rollout_id, rollout.attempt.attempt_id, status="succeeded")
    return reward


async def _execute(
    store: LightningStore,
    worker_id: WorkerId,
    rollout: AttemptedRollout,
    agent: Agent,
    heartbeat_interval: float,
) -> tuple[bool, float | None]:
    """:func:`run_rollout` up to, not including, marking the attempt ``succeeded`` (the caller
    does that, possibly together with the next dequeue). Returns ``(succeeded, reward)``; a failure
    is already recorded when ``succeeded`` is false."""
    rollout_id, attempt_id = rollout.rollout_id, rollout.attempt.attempt_id
    await store.update_attempt(rollout_id, attempt_id, status="running", worker_id=worker_id)
    resources: dict[str, Any] = {}
    if rollout.resources_id is not None:
        update = await store.get_resources_by_id(rollout.resources_id)
        if update is not None:
            resources = dict(update.resources)
    unresponsive = rollout.config.unresponsive_seconds
    interval = heartbeat_interval if unresponsive is None else min(heartbeat_interval, unresponsive / 3)

    started = time.time()
    reward: float | None = None
    error: BaseException | None = None
    error_traceback = ""
    try:
        async with anyio.create_task_group() as tg:
            if interval > 0:
                tg.start_soon(_heartbeat, store, worker_id, rollout_id, attempt_id, interval)
            context = _current_rollout.set(RolloutContext(store, rollout, worker_id))  # [context hook]
            try:
                reward = _as_reward(await _call_agent(agent, rollout.input, resources))
            except Exception as exc:
                error, error_traceback = exc, traceback.format_exc()
            finally:
                _current_rollout.reset(context)  # [context hook]
                tg.cancel_scope.cancel()
    except BaseException:
        # Cancelled (or interrupted) while the agent ran: do not leave the attempt "running".
        with anyio.CancelScope(shield=True), anyio.move_on_after(_CANCEL_RECORD_TIMEOUT):
            try:
                await store.update_attempt(
                    rollout_id, attempt_id, status="failed", metadata={"error": "cancelled"}
                )
            except Exception:
                logger.warning("runner %s: could not record the cancelled attempt", worker_id, exc_info=True)
        raise
    ended = time.time()

    if error is not None:
        logger.warning("runner %s: rollout %s failed: %r", worker_id, rollout_id, error)
        await store.update_attempt(
            rollout_id,
            attempt_id,
            status="failed",
            metadata={"error": f"{type(error).__name__}: {error}", "traceback": error_traceback},
        )
        return False, None
    if reward is not None:
        sequence_id = await store.get_next_span_sequence_id(rollout_id, attempt_id)
        await store.add_span(
            Span(
                rollout_id=rollout_id,
                attempt_id=attempt_id,
                sequence_id=sequence_id,
                trace_id=uuid.uuid4().hex,
                span_id=uuid.uuid4().hex[:16],
                name=REWARD_SPAN_NAME,
                start_time=started,
                end_time=ended,
                attributes={REWARD_KEY: reward},
                status_code="ok",
            )
        )
        # Written before the attempt succeeds, so whoever is woken by the success sees the reward.
        await store.update_rollout(rollout_id, metadata={**rollout.metadata, REWARD_KEY: reward})
    return True, reward


async def runner_loop(
    store: LightningStore,
    worker_id: WorkerId,
    event: StopEvent,
    agent: Agent,
    *,
    max_rollouts: int | None = None,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
) -> int:
    """Run rollouts from ``store`` through ``agent`` until ``event`` is set or ``max_rollouts``
    rollouts (of this runner) are done; returns how many it ran.

    Stops: checked between rollouts and while waiting for work (an idle runner on an in-process
    store stops at once, over HTTP within 0.5 s); the rollout already claimed is always run to
    the end. See :func:`run_rollout` for what is
    recorded and for cancellation.
    """
    if max_rollouts is not None and max_rollouts < 0:
        raise ValueError(f"max_rollouts must be >= 0 or None, got {max_rollouts}")
    long_poll = _supports_long_poll(store)
    await store.update_worker(worker_id, heartbeat_stats={"time": time.time()})
    done = 0
    rollout = None if max_rollouts == 0 else await _next_rollout(store, worker_id, event, long_poll)
    while rollout is not None:
        succeeded, _ = await _execute(store, worker_id, rollout, agent, heartbeat_interval)
        done += 1
        more = (max_rollouts is None or done < max_rollouts) and not event.is_set()
        if succeeded and more:
            # One call (one round trip over HTTP) ends this attempt and claims the next rollout.
            rollout = await store.finish_and_dequeue(
                rollout.rollout_id,
                rollout.attempt.attempt_id,
                "succeeded",
                worker_id=worker_id,
                timeout=_LONG_POLL_TIMEOUT if long_poll else None,
            )
            if rollout is None:
                rollout = await _next_rollout(store, worker_id, event, long_poll)
            continue
        if succeeded:
            await store.update_attempt(rollout.rollout_id, rollout.attempt.attempt_id, status="succeeded")
        rollout = await _next_rollout(store, worker_id, event, long_poll) if more else None
    logger.debug("runner %s: stopping after %d rollouts", worker_id, done)
    return done


class _RunnerBundle:
    """``runner(store, worker_id, event)`` for the strategy; picklable when the agent is.

    Runs :func:`agl_async.concurrency.run_slots`: ``concurrency`` slots, each with a worker id of
    its own (unique across processes and hosts)."""

    def __init__(
        self, agent: Agent, max_rollouts: int | None, heartbeat_interval: float, concurrency: int = 1
    ) -> None:
        self.agent = agent
        self.max_rollouts = max_rollouts
        self.heartbeat_interval = heartbeat_interval
        self.concurrency = concurrency

    async def __call__(self, store: LightningStore, worker_id: int, event: StopEvent) -> None:
        from .concurrency import run_slots  # [concurrency hook] (imports this module)

        await run_slots(
            store,
            worker_id,
            event,
            self.agent,
            concurrency=self.concurrency,
            max_rollouts=self.max_rollouts,
            heartbeat_interval=self.heartbeat_interval,
        )


class _AlgorithmBundle:
    """``algorithm(store, event)`` for the strategy; picklable when the algorithm is.

    Publishes ``initial_resources`` first (so every rollout the algorithm enqueues is bound to
    them), then runs the algorithm. Without an algorithm it waits for the event: the runners
    serve an algorithm elsewhere, or stop by ``max_rollouts``.
    """

    def __init__(
        self,
        algorithm: Algorithm | None,
        train_dataset: Sequence[Any] | None,
        val_dataset: Sequence[Any] | None,
        initial_resources: Mapping[str, Any] | None,
    ) -> None:
        self.algorithm = algorithm
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.initial_resources = initial_resources

    async def __call__(self, store: LightningStore, event: StopEvent) -> None:
        if self.initial_resources is not None:
            await store.add_resources(dict(self.initial_resources))
        if self.algorithm is None:
            await event.wait()
            return
        self.algorithm.store = store
        if self.initial_resources is not None:
            self.algorithm.initial_resources = dict(self.initial_resources)
        await self.algorithm.run(train_dataset=self.train_dataset, val_dataset=self.val_dataset)


# --------------------------------------------------------------------------------------- trainer
def _make_strategy(spec: Any, n_runners: int | None) -> ExecutionStrategy:
    """An ExecutionStrategy from an instance, a class, an alias or a ``{"type": alias, **options}``
    dict (:func:`~agl_async.execution.base.resolve_strategy`); ``None`` means shared-memory.

    ``n_runners`` fills in the strategy's ``n_runners`` when the alias/dict does not set it, and
    must agree with the strategy's own otherwise. Every mistake is a ``ValueError``.
    """
    try:
        strategy = resolve_strategy(spec, n_runners=n_runners)
    except TypeError as exc:
        raise ValueError(f"invalid strategy {spec!r}: {exc}") from None
    own = getattr(strategy, "n_runners", None)
    if n_runners is not None and own is not None and own != n_runners:
        raise ValueError(f"n_runners={n_runners} conflicts with the strategy's n_runners={own}")
    return strategy


def _refuse_running_loop() -> None:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "Trainer.fit() / run() start their own event loop and cannot run inside a running one; "
        "use `await trainer.fit_async(...)` / `await trainer.arun()` there"
    )


class Trainer:
    """Run an :class:`~agl_async.algorithm.Algorithm` and an agent with an execution strategy.

    ``strategy``: an :class:`~agl_async.ExecutionStrategy`, the alias ``"shm"`` / ``"cs"``, or a
    dict ``{"type": "shm" | "cs", **options}``; ``None`` means shared-memory. ``n_runners`` sets
    the number of runners of a strategy made from an alias or dict (and must agree with one the
    strategy sets itself); ``trainer.n_runners`` is the resolved number. ``store`` defaults to a fresh
    :class:`~agl_async.InMemoryLightningStore` (kept on ``trainer.store``, so results can be read
    after the run). ``algorithm`` ``None`` with a dataset means :class:`~agl_async.algorithm.Baseline`;
    with no dataset the algorithm side only waits for the stop event, so the run lasts until it is
    stopped (Ctrl-C, cancellation): for runners serving an algorithm elsewhere.
    ``max_rollouts`` caps the rollouts of *each* runner. ``concurrency``: rollouts each runner
    works on at once (:mod:`agl_async.concurrency`), so ``n_runners x concurrency`` are in
    flight. ``initial_resources`` (a mapping of JSON values) is published with ``add_resources``
    before the algorithm starts. ``heartbeat_interval``: seconds between runner heartbeats while an
    agent call runs.

    Shutdown and errors are the strategy's: the run ends when the algorithm returns (runners finish
    their current rollout within the grace period); an exception in a bundle stops the run and is
    re-raised by ``fit``; Ctrl-C under ``fit`` stops everything and raises ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        strategy: ExecutionStrategy | str | Mapping[str, Any] | None = None,
        n_runners: int | None = None,
        store: LightningStore | None = None,
        algorithm: Algorithm | None = None,
        agent: Agent | None = None,
        train_dataset: Sequence[Any] | None = None,
        val_dataset: Sequence[Any] | None = None,
        max_rollouts: int | None = None,
        initial_resources: Mapping[str, Any] | None = None,
        concurrency: int = 1,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        from .concurrency import check_concurrency  # [concurrency hook]

        self.concurrency = check_concurrency(concurrency)
        if n_runners is not None and (
            isinstance(n_runners, bool) or not isinstance(n_runners, int) or n_runners < 1
        ):
            raise ValueError(f"n_runners must be a positive integer, got {n_runners!r}")
        if max_rollouts is not None and (
            isinstance(max_rollouts, bool) or not isinstance(max_rollouts, int) or max_rollouts < 0
        ):
            raise ValueError(f"max_rollouts must be a non-negative integer or None, got {max_rollouts!r}")
        if initial_resources is not None and not isinstance(initial_resources, Mapping):
            raise ValueError(f"initial_resources must be a mapping, got {type(initial_resources).__name__}")
        if store is not None and not isinstance(store, LightningStore):
            raise ValueError(f"store must be a LightningStore, got {type(store).__name__}")
        if algorithm is not None and not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be an Algorithm, got {type(algorithm).__name__}")
        self.strategy = _make_strategy(strategy, n_runners)
        self.n_runners: int = getattr(self.strategy, "n_runners", n_runners or 1)
        self.store: LightningStore = store if store is not None else InMemoryLightningStore()
        self.algorithm = algorithm
        self.agent = agent
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.max_rollouts = max_rollouts
        self.initial_resources = initial_resources
        self.heartbeat_interval = heartbeat_interval

    def _bundles(
        self, agent: Agent | None, train_dataset: Sequence[Any] | None, val_dataset: Sequence[Any] | None
    ) -> tuple[_AlgorithmBundle, _RunnerBundle]:
        if agent is None:
            raise ValueError("no agent: pass one to fit() or to Trainer(agent=...)")
        if not callable(agent):
            raise ValueError(f"the agent must be callable as agent(task_input, resources), got {agent!r}")
        algorithm = self.algorithm
        if algorithm is None and (train_dataset or val_dataset):
            algorithm = Baseline()
        return (
            _AlgorithmBundle(algorithm, train_dataset, val_dataset, self.initial_resources),
            _RunnerBundle(agent, self.max_rollouts, self.heartbeat_interval, self.concurrency),
        )

    def fit(
        self,
        agent: Agent,
        train_dataset: Sequence[Any] | None = None,
        val_dataset: Sequence[Any] | None = None,
    ) -> None:
        """Train ``agent``; blocks until the run is over (starts its own event loop).

        Not for use inside a running event loop (a notebook, an async app): there, ``await
        fit_async(...)``; calling it there raises ``RuntimeError`` saying so.
        """
        _refuse_running_loop()
        algorithm_bundle, runner_bundle = self._bundles(agent, train_dataset, val_dataset)
        self.strategy.run(algorithm_bundle, runner_bundle, self.store)

    async def fit_async(
        self,
        agent: Agent,
        train_dataset: Sequence[Any] | None = None,
        val_dataset: Sequence[Any] | None = None,
    ) -> None:
        """Train ``agent`` inside the caller's event loop; cancelling it stops the run cleanly."""
        algorithm_bundle, runner_bundle = self._bundles(agent, train_dataset, val_dataset)
        await self.strategy.execute(algorithm_bundle, runner_bundle, self.store)

    def run(self) -> None:
        """:meth:`fit` with the agent and datasets given to the constructor."""
        self.fit(cast(Agent, self.agent), self.train_dataset, self.val_dataset)

    async def arun(self) -> None:
        """:meth:`fit_async` with the agent and datasets given to the constructor."""
        await self.fit_async(cast(Agent, self.agent), self.train_dataset, self.val_dataset)
