"""The runner: what each runner bundle does with the rollouts of the store.

:func:`runner_loop` is one runner. It registers its worker, then loops: claim a rollout
(``dequeue_rollout``, waiting for one), mark the attempt ``running``, call the agent with the
rollout's input and resources (:func:`call_agent`, the one place an agent runs), record the reward
(a span named :data:`REWARD_SPAN_NAME` and ``rollout.metadata["reward"]``), and mark the attempt
``succeeded`` — or ``failed`` with the error and its traceback in the attempt's metadata. It ends
the attempt and claims the next rollout in one call (``finish_and_dequeue``: one round trip over
HTTP). While the agent runs, a heartbeat task keeps the worker and the attempt alive in the store.

Shutdown: a runner checks the stop event (an :class:`~agl_async.ExecutionEvent`) between
rollouts and while it waits for work — and whether its store says the run is over
(``LightningStore.run_over``: the server of a run whose algorithm has finished), which sets the
event; the rollout it holds when the event is set is finished
first (the strategy's grace period). If the runner is cancelled while the agent runs (grace over,
Ctrl-C), the attempt is marked ``failed`` with ``error = "cancelled"`` under a shielded, bounded
scope before the cancellation propagates, so no attempt is left ``running`` by a runner that is
gone; a synchronous agent's thread is abandoned (it cannot be interrupted) and its result
discarded. Synchronous agents run in daemon threads of their own (:mod:`agl_async._threads`), so an
abandoned one never keeps the process alive after the run.

Time limits: a rollout whose ``config.timeout_seconds`` is set has its agent call cancelled when
that time has passed since the claim (an async agent at its next ``await``; a sync agent's thread
abandoned), and the attempt is recorded ``timeout`` — the status the store's watchdog gives it too,
so retries follow ``retry_condition`` either way. An agent's result that arrives for an attempt the
store has already ended (the watchdog, a newer attempt) is discarded and logged.

What an agent raises fails its attempt, whatever it is: an ``Exception`` (even one whose ``str()``
raises) is recorded and the runner goes on; ``KeyboardInterrupt`` / ``SystemExit`` are recorded
and then re-raised as themselves (they end the run, and ``fit`` raises them). A reward must be a
real number (``int``, ``float``, ``bool``, ``Fraction``, ``Decimal``, numpy scalars — anything with
``__float__`` that is not complex), converted to a finite ``float``; ``NaN``, infinities and other
types fail the attempt with an error saying so.

:class:`RunnerBundle` is the picklable ``runner(store, worker_id, event)`` the trainer hands to
the execution strategy.
"""

from __future__ import annotations

import decimal
import functools
import inspect
import logging
import math
import numbers
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import anyio

from ._threads import run_in_daemon_thread
from .execution.events import ExecutionEvent
from .rollout_context import RolloutContext  # [context hook]
from .rollout_context import _current as _current_rollout  # [context hook]
from .semconv import REWARD_SPAN_NAME
from .store.base import LightningStore
from .tracing import trace_attempt
from .types import REWARD_KEY, AttemptedRollout, Span, WorkerId

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "REWARD_SPAN_NAME",
    "Agent",
    "RunnerBundle",
    "call_agent",
    "run_rollout",
    "runner_loop",
]

logger = logging.getLogger("agl_async.runner")

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
    """The agent's result as a reward: ``None``, or a real number as a finite ``float``."""
    if value is None:
        return None
    is_real = isinstance(value, (numbers.Real, decimal.Decimal)) or (
        hasattr(type(value), "__float__") and not isinstance(value, (numbers.Complex, str, bytes))
    )
    if not is_real:
        raise TypeError(
            f"the agent must return a real number (the reward) or None, got {type(value).__name__}: "
            f"{_safe_repr(value)}"
        )
    try:
        reward = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"the reward {_safe_repr(value)} cannot be converted to a float: {exc}") from None
    if not math.isfinite(reward):
        raise ValueError(f"the reward must be a finite number, got {_safe_repr(value)}")
    return reward


def _safe_repr(value: Any) -> str:
    try:
        return repr(value)[:200]
    except Exception:
        return f"<{type(value).__name__} (repr() failed)>"


def describe_error(exc: BaseException) -> str:
    """``"<Type>: <message>"`` for the attempt's metadata and the log; never raises (an exception
    whose ``__str__`` raises is still described)."""
    try:
        message = str(exc)
    except Exception as inner:
        message = f"<str() raised {type(inner).__name__}>"
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


async def _dequeue_until_stopped(
    store: LightningStore, worker_id: WorkerId, event: ExecutionEvent
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
    store: LightningStore, worker_id: WorkerId, event: ExecutionEvent, long_poll: bool
) -> AttemptedRollout | None:
    """Claim the next rollout, waiting for one; ``None`` once the event is set.

    Waiting is the store's long poll when it has one — raced against the event when the store
    says its poll may be abandoned at any moment (``LightningStore.long_poll_is_cancel_safe``:
    in-process stores), else at most 0.5 s per request (over HTTP) — or else ``event.wait()`` with
    backoff between polls.
    """
    delay = _MIN_BACKOFF
    race = long_poll and store.long_poll_is_cancel_safe
    while not event.is_set() and not _run_is_over(store, worker_id, event):
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


def _run_is_over(store: LightningStore, worker_id: WorkerId, event: ExecutionEvent) -> bool:
    """Whether the store says the run is over (a server whose algorithm has finished); the first
    runner to see it says so and sets the run's event, so its siblings stop without a word."""
    if not store.run_over:
        return False
    if not event.is_set():
        logger.warning("runner %s: the store server says the run is over; stopping", worker_id)
        event.set()
    return True


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


async def call_agent(agent: Agent, rollout: AttemptedRollout, resources: dict[str, Any]) -> Any:
    """The one place where an attempt's agent call runs: ``agent(rollout.input, resources)``.

    An async agent is awaited on this task; a sync one runs in a daemon thread of its own, which
    keeps the loop free and is abandoned (not interrupted) when this call is cancelled, and never
    keeps the process alive (:mod:`agl_async._threads`). What wraps the agent call as a whole (a
    tracing context, a concurrency slot) wraps this function.
    """
    task_input = rollout.input
    if _is_async_callable(agent):
        result: Any = await cast(Callable[..., Awaitable[Any]], agent)(task_input, resources)
    else:
        result = await run_in_daemon_thread(agent, task_input, resources, name=f"agent {rollout.rollout_id}")
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
    succeeded, reward = await _run_attempt(store, worker_id, rollout, agent, heartbeat_interval)
    if succeeded:
        await store.update_attempt(rollout.rollout_id, rollout.attempt.attempt_id, status="succeeded")
    return reward


async def _run_attempt(
    store: LightningStore,
    worker_id: WorkerId,
    rollout: AttemptedRollout,
    agent: Agent,
    heartbeat_interval: float,
) -> tuple[bool, float | None]:
    """:func:`run_rollout` up to, not including, marking the attempt ``succeeded`` (the caller
    does that, possibly together with the next dequeue). Returns ``(succeeded, reward)``; a failure
    is already recorded when ``succeeded`` is false."""
    claimed_at = time.monotonic()
    rollout_id, attempt_id = rollout.rollout_id, rollout.attempt.attempt_id
    await store.update_attempt(rollout_id, attempt_id, status="running", worker_id=worker_id)
    resources: dict[str, Any] = {}
    if rollout.resources_id is not None:
        update = await store.get_resources_by_id(rollout.resources_id)
        if update is not None:
            resources = dict(update.resources)
    config = rollout.config
    unresponsive = config.unresponsive_seconds
    interval = heartbeat_interval if unresponsive is None else min(heartbeat_interval, unresponsive / 3)
    # The agent may run until the rollout's timeout, counted from the claim (the store's watchdog
    # counts from the attempt's creation, a moment earlier: both end it as "timeout").
    limit = math.inf if config.timeout_seconds is None else config.timeout_seconds
    deadline = claimed_at + limit

    started = time.time()
    reward: float | None = None
    error: BaseException | None = None
    error_traceback = ""
    timed_out = False
    try:
        async with anyio.create_task_group() as tg:
            if interval > 0:
                tg.start_soon(_heartbeat, store, worker_id, rollout_id, attempt_id, interval)
            context = _current_rollout.set(RolloutContext(store, rollout, worker_id))  # [context hook]
            # The agent's call runs here, in the host of the task group, and whatever it raises is
            # caught here: only a cancellation of this runner leaves the task group as an
            # exception (never an exception group around the agent's own error).
            try:
                # The agent's OpenTelemetry spans, written to the store on exit (agl_async.tracing),
                # outside the time limit: a timed-out call's spans are written too.
                async with trace_attempt(store, rollout_id, attempt_id):
                    with anyio.move_on_after(max(deadline - time.monotonic(), 0.0)) as time_limit:
                        reward = _as_reward(await call_agent(agent, rollout, resources))
                timed_out = time_limit.cancelled_caught
            except anyio.get_cancelled_exc_class():
                raise
            except BaseException as exc:  # the agent's error, recorded below
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

    if timed_out:
        message = (
            f"TimeoutError: the agent ran longer than the rollout's timeout_seconds={limit:g} "
            "and its call was cancelled"
        )
        logger.warning("runner %s: rollout %s: %s", worker_id, rollout_id, message)
        await store.update_attempt(rollout_id, attempt_id, status="timeout", metadata={"error": message})
        return False, None
    if error is not None:
        description = describe_error(error)
        logger.warning("runner %s: rollout %s failed: %s", worker_id, rollout_id, description)
        await store.update_attempt(
            rollout_id,
            attempt_id,
            status="failed",
            metadata={"error": description, "traceback": error_traceback},
        )
        if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: recorded, then raised
            raise error
        return False, None
    if unresponsive is not None and not await _still_ours(store, worker_id, rollout_id, attempt_id):
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


async def _still_ours(store: LightningStore, worker_id: WorkerId, rollout_id: str, attempt_id: str) -> bool:
    """Whether the attempt is still its rollout's latest and not ended by the watchdog; a result
    for one that is not would set a reward on a rollout that has moved on: discarded, logged.
    (Asked only for rollouts with ``unresponsive_seconds``: time limits are enforced here.)"""
    latest = await store.get_latest_attempt(rollout_id)
    if latest is not None and latest.attempt_id == attempt_id and latest.status != "timeout":
        return True
    verdict = "a newer attempt" if latest is not None and latest.attempt_id != attempt_id else "the watchdog"
    logger.warning(
        "runner %s: rollout %s: attempt %s was ended by %s while its agent ran; its result is discarded",
        worker_id,
        rollout_id,
        attempt_id,
        verdict,
    )
    return False


async def runner_loop(
    store: LightningStore,
    worker_id: WorkerId,
    event: ExecutionEvent,
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
        succeeded, _ = await _run_attempt(store, worker_id, rollout, agent, heartbeat_interval)
        done += 1
        more = (
            (max_rollouts is None or done < max_rollouts)
            and not event.is_set()
            and not _run_is_over(store, worker_id, event)
        )
        if succeeded and more:
            # One call (one round trip over HTTP) ends this attempt and claims the next rollout.
            # Without waiting when the store's wait can be raced against the event instead
            # (_next_rollout does that next): a wait here would not see the event.
            rollout = await store.finish_and_dequeue(
                rollout.rollout_id,
                rollout.attempt.attempt_id,
                "succeeded",
                worker_id=worker_id,
                timeout=_LONG_POLL_TIMEOUT if long_poll and not store.long_poll_is_cancel_safe else None,
            )
            if rollout is None:
                rollout = await _next_rollout(store, worker_id, event, long_poll)
            continue
        if succeeded:
            await store.update_attempt(rollout.rollout_id, rollout.attempt.attempt_id, status="succeeded")
        rollout = await _next_rollout(store, worker_id, event, long_poll) if more else None
    logger.debug("runner %s: stopping after %d rollouts", worker_id, done)
    return done


class RunnerBundle:
    """``runner(store, worker_id, event)`` for the strategy: ``concurrency`` slots of
    :func:`runner_loop` with an agent (:func:`agl_async.concurrency.run_slots`, each slot with a
    worker id of its own, unique across processes and hosts); picklable when the agent is."""

    def __init__(
        self, agent: Agent, max_rollouts: int | None, heartbeat_interval: float, concurrency: int = 1
    ) -> None:
        self.agent = agent
        self.max_rollouts = max_rollouts
        self.heartbeat_interval = heartbeat_interval
        self.concurrency = concurrency

    async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        from .concurrency import run_slots  # [concurrency hook] (it imports this module)

        await run_slots(
            store,
            worker_id,
            event,
            self.agent,
            concurrency=self.concurrency,
            max_rollouts=self.max_rollouts,
            heartbeat_interval=self.heartbeat_interval,
        )
