"""Runner concurrency: one runner works on up to ``concurrency`` rollouts at once.

:func:`run_slots` is what a runner bundle runs: ``concurrency`` *slots*, each its own loop of
claim → agent → record (the runner loop of :mod:`agl_async.runner`, one rollout at a time) with
its own worker id, all tasks of one task group on the runner's event loop. Async agents run
concurrently on that loop; sync agents each in a worker thread (anyio's default thread limiter is
raised by ``concurrency`` while the slots run, so that ``concurrency`` sync agents really run at
once, and lowered again when they stop).

Worker ids
    Every slot records a worker id of its own, unique in the store across slots, runners,
    processes and hosts: ``"<host>:<pid>:<random>/<runner>.<slot>"``, where the prefix is drawn
    anew by each :func:`run_slots` call (so two ``agl-async runner`` commands on one host, or a
    process that runs twice against one store, never share an id). The runner bundle's own
    ``worker_id`` argument stays ``0 … n_runners-1``, as the strategies hand it out.

``max_rollouts``
    Caps the rollouts of the *runner*, all its slots together: a slot takes a ticket before it
    claims a rollout and gives it back when the claim ends without one.

Waiting for work
    A slot that finds the queue empty does not long-poll the store on its own: one slot of the
    runner waits in the store's long poll, the others queue behind it and are woken as work comes
    (:class:`_Claims`). An idle runner keeps one request waiting on the server, whatever its
    concurrency; a busy slot still ends its attempt and claims the next queued rollout in one call
    (``finish_and_dequeue``).

Errors
    An error of the store itself (the server is gone, say) in any slot ends the runner: the other
    slots are cancelled (recording their attempts as below) and :func:`run_slots` raises that
    error as itself. Errors of the agent are recorded on the attempt and never raised.

Stopping and cancellation (every slot, as for one runner loop)
    Each slot checks the stop event between rollouts and while it waits for work, and always runs
    a claimed rollout to the end (the strategy's grace period). Cancelling :func:`run_slots`
    cancels every slot; each one that holds a running attempt records it ``failed`` with
    ``error = "cancelled"`` under a shielded, bounded scope before the cancellation propagates, so
    no attempt is left ``running``; a sync agent's worker thread is abandoned, not interrupted.
    Heartbeats run per attempt, so every slot's attempt stays alive on its own.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread

from .execution.events import ExecutionEvent
from .runner import (
    DEFAULT_HEARTBEAT_INTERVAL,
    Agent,
    _is_async_callable,
    _next_rollout,
    _run_attempt,
    _supports_long_poll,
)
from .store.base import LightningStore
from .types import AttemptedRollout

__all__ = ["check_concurrency", "new_worker_prefix", "run_slots", "slot_worker_id"]

logger = logging.getLogger(__name__)


def check_concurrency(value: Any) -> int:
    """``value`` as a concurrency (a positive integer); ``ValueError`` saying what is wrong."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"concurrency must be a positive integer (rollouts per runner), got {value!r}")
    return value


def new_worker_prefix() -> str:
    """A prefix no other runner shares: host name, process id and 24 random bits."""
    host = socket.gethostname() or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(3)}"


def slot_worker_id(prefix: str, runner: int, slot: int) -> str:
    """The worker id slot ``slot`` of runner ``runner`` records in the store."""
    return f"{prefix}/{runner}.{slot}"


class _Budget:
    """``max_rollouts`` shared by the slots of one runner (all on one event loop: no lock)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.taken = 0  # claims in progress + rollouts run
        self.done = 0

    def take(self) -> bool:
        if self.limit is not None and self.taken >= self.limit:
            return False
        self.taken += 1
        return True

    def refund(self) -> None:
        self.taken -= 1


@asynccontextmanager
async def _thread_tokens(extra: int) -> AsyncIterator[None]:
    """Raise anyio's default thread limiter by ``extra`` tokens for the duration (tokens added by
    concurrent callers add up, and each takes back only its own)."""
    if extra <= 0:
        yield
        return
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens += extra
    try:
        yield
    finally:
        limiter.total_tokens = max(1, limiter.total_tokens - extra)


class _Mirror:
    """The run's stop event as seen by one runner's slots: one task waits on the real event (a
    pipe read, for a cross-process event) and sets a local one, which any number of slots check
    and wait on for free."""

    def __init__(self) -> None:
        self.local = anyio.Event()

    def set(self) -> None:
        self.local.set()

    def is_set(self) -> bool:
        return self.local.is_set()

    async def wait(self) -> None:
        await self.local.wait()

    async def follow(self, event: ExecutionEvent) -> None:
        await event.wait()
        self.local.set()


#: A long poll answered within this many seconds found the queue non-empty (a backlog).
_BACKLOG_SECONDS = 0.005


class _Claims:
    """Idle slots of one runner share a single long poll.

    A slot looking for work becomes the runner's *watcher* — the one slot waiting in the store's
    long poll, which looks at the queue first — unless there already is one; then it takes a quick
    look of its own and, finding nothing, queues here. When the watcher gets a rollout it hands the
    watch to the first queued slot (and, when its poll was answered at once — a backlog — wakes a
    second one to look too); a slot that claims a rollout with a quick look wakes two more. So a
    batch of ``n`` fills ``n`` idle slots in about ``log2(n)`` round trips, an idle runner keeps
    one request waiting on the server whatever its concurrency, and one rollout enqueued at a time
    costs about one request more than its claim, not one per idle slot.
    """

    def __init__(self) -> None:
        self.polling = False
        self.waiting: deque[anyio.Event] = deque()

    def wake(self, n: int) -> None:
        for _ in range(min(n, len(self.waiting))):
            self.waiting.popleft().set()

    async def wait(self, stop: _Mirror) -> None:
        """Queue until woken or stopped; a slot cancelled after being woken passes the wake on."""
        event = anyio.Event()
        self.waiting.append(event)
        try:
            await _wait_either(event, stop)
        except BaseException:
            if event.is_set():
                self.wake(1)
            raise
        finally:
            if not event.is_set():
                try:
                    self.waiting.remove(event)
                except ValueError:
                    pass


async def _wait_either(first: anyio.Event, stop: _Mirror) -> None:
    if stop.is_set():
        return
    async with anyio.create_task_group() as tg:

        async def on_stop() -> None:
            await stop.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(on_stop)
        await first.wait()
        tg.cancel_scope.cancel()


async def _next_shared(
    store: LightningStore,
    worker_id: str,
    stop: _Mirror,
    long_poll: bool,
    claims: _Claims,
    *,
    look: bool = True,
) -> AttemptedRollout | None:
    """:func:`~agl_async.runner._next_rollout` for a slot (see :class:`_Claims`): a quick look
    at the queue (unless ``look`` is false: the caller just saw it empty), then the runner's one
    long poll or a place in the queue for it; ``None`` once the run stops."""
    if not long_poll:
        return await _next_rollout(store, worker_id, stop, long_poll)
    while not stop.is_set():
        if not claims.polling:  # take the watch: the store's long poll looks at the queue first
            claims.polling = True
            started = time.monotonic()
            rollout: AttemptedRollout | None = None
            try:
                rollout = await _next_rollout(store, worker_id, stop, long_poll)
                return rollout
            finally:
                claims.polling = False
                # Hand the watch on. Answered at once, the poll found a backlog: wake one more
                # slot to look as well, so that a batch fills idle slots in log2(n) round trips.
                backlog = rollout is not None and time.monotonic() - started < _BACKLOG_SECONDS
                claims.wake(2 if backlog else 1)
        if look:  # someone else watches: a quick look of our own
            rollout = await store.dequeue_rollout(worker_id=worker_id)
            if rollout is not None:
                claims.wake(2)  # there may be more
                return rollout
        look = True
        await claims.wait(stop)
    return None


async def _claim(
    store: LightningStore, worker_id: str, stop: _Mirror, long_poll: bool, budget: _Budget, claims: _Claims
) -> AttemptedRollout | None:
    if not budget.take():
        return None
    rollout = await _next_shared(store, worker_id, stop, long_poll, claims)
    if rollout is None:
        budget.refund()
    return rollout


async def _slot(
    store: LightningStore,
    worker_id: str,
    stop: _Mirror,
    agent: Agent,
    budget: _Budget,
    long_poll: bool,
    heartbeat_interval: float,
    claims: _Claims,
) -> None:
    """One slot: the runner loop (claim, run, record; end + claim in one call when it can)."""
    await store.update_worker(worker_id, heartbeat_stats={"time": time.time()})
    rollout = await _claim(store, worker_id, stop, long_poll, budget, claims)
    while rollout is not None:
        succeeded, _ = await _run_attempt(store, worker_id, rollout, agent, heartbeat_interval)
        budget.done += 1
        if succeeded and not stop.is_set() and budget.take():
            # One call (one round trip over HTTP) ends this attempt and claims the next rollout
            # if one is queued (no wait: an empty queue is waited for by the runner's one poll).
            rollout = await store.finish_and_dequeue(
                rollout.rollout_id, rollout.attempt.attempt_id, "succeeded", worker_id=worker_id
            )
            if rollout is None:
                rollout = await _next_shared(store, worker_id, stop, long_poll, claims, look=False)
                if rollout is None:
                    budget.refund()
            continue
        if succeeded:
            await store.update_attempt(rollout.rollout_id, rollout.attempt.attempt_id, status="succeeded")
        rollout = None if stop.is_set() else await _claim(store, worker_id, stop, long_poll, budget, claims)


async def run_slots(
    store: LightningStore,
    runner: int,
    event: ExecutionEvent,
    agent: Agent,
    *,
    concurrency: int = 1,
    max_rollouts: int | None = None,
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    worker_prefix: str | None = None,
) -> int:
    """Run runner number ``runner`` as ``concurrency`` slots until ``event`` is set or
    ``max_rollouts`` rollouts (of the whole runner) are done; returns how many it ran.

    ``worker_prefix`` (default: :func:`new_worker_prefix`) starts every worker id it records.
    Bad ``concurrency`` / ``max_rollouts`` are a ``ValueError`` before anything runs. See the
    module docstring for stopping and cancellation.
    """
    concurrency = check_concurrency(concurrency)
    if max_rollouts is not None and (
        isinstance(max_rollouts, bool) or not isinstance(max_rollouts, int) or max_rollouts < 0
    ):
        raise ValueError(f"max_rollouts must be a non-negative integer or None, got {max_rollouts!r}")
    prefix = worker_prefix if worker_prefix is not None else new_worker_prefix()
    budget = _Budget(max_rollouts)
    if max_rollouts == 0:
        return 0
    long_poll = _supports_long_poll(store)
    threads = 0 if _is_async_callable(agent) else concurrency
    stop, claims = _Mirror(), _Claims()
    errors: list[BaseException] = []
    async with _thread_tokens(threads), anyio.create_task_group() as outer:
        outer.start_soon(stop.follow, event)
        async with anyio.create_task_group() as tg:

            async def slot(worker_id: str) -> None:
                try:
                    await _slot(store, worker_id, stop, agent, budget, long_poll, heartbeat_interval, claims)
                except anyio.get_cancelled_exc_class():
                    raise
                except BaseException as exc:  # a store error ends the runner: the other slots too
                    # (also an agent's KeyboardInterrupt / SystemExit, recorded and re-raised by
                    # _run_attempt: raised below as itself, never in an exception group)
                    errors.append(exc)
                    tg.cancel_scope.cancel()

            for index in range(concurrency):
                tg.start_soon(slot, slot_worker_id(prefix, runner, index))
        outer.cancel_scope.cancel()
    if errors:
        raise errors[0]  # as itself, not in an exception group (the strategy reports it)
    logger.debug("runner %s: %d slots stopped after %d rollouts", prefix, concurrency, budget.done)
    return budget.done
