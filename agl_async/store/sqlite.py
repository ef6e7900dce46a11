"""``SqliteLightningStore``: the whole store in one SQLite file, durable across process deaths.

The semantics are the in-memory store's (retries, the watchdog, the long poll, woken
``wait_for_rollouts``, span sequence ids, resources, workers); the rules themselves live in
:mod:`agl_async.store._sqlite_ops`, the file layout in :mod:`agl_async.store._sqlite_schema`.

**Durability.** Every store call is one SQLite transaction, committed before the call returns, in
write-ahead-log mode. ``synchronous="normal"`` (the default) hands each commit to the operating
system before returning, without waiting for the disk: what a call returned survives the death
of the process, SIGKILL included, but an operating-system crash or a power cut may lose the last
commits (the file stays consistent). ``synchronous="full"`` waits for the disk at every commit
(an fsync per call: durable against power loss, and slower by whatever one fsync costs on the
machine). Attempts that were in flight when a process died carry their watchdog deadline in the
file, so the first store opened on it again ends them (``unresponsive`` / ``timeout``) and retries
them per their ``RolloutConfig``: give the rollouts of a run that must resume an
``unresponsive_seconds``.

**Threads.** No sqlite3 call runs on the event loop: each store call is one hop to a worker
thread (``anyio.to_thread``, so asyncio and trio both work) that runs the whole call — every
statement and the commit — on the store's connection, one call at a time. (Measured on the
2-core development machine: one hop per call 6,000-6,800 transactions/s; aiosqlite, one await
per statement, 2,700/s; the same transactions run directly on the loop 19,000/s.)

**Waiting.** The watchdog keeps no task: every attempt row carries its deadline, every call first
settles the deadlines that have passed (an indexed query), and ``wait_for_rollouts`` and the long
poll of ``dequeue_rollout`` sleep no longer than the nearest deadline, so a verdict arrives at
its time without anyone polling. A change made through this store object wakes its waiters at
once; a change made by another process on the same file (several processes may share one, each
with its own store object) is seen by this process's waiters within ``poll_interval`` seconds.

**Cancellation.** A call cancelled while its transaction runs completes the transaction (the
worker thread is not abandoned) and returns normally; a call cancelled before it changes nothing.
Cancelling ``wait_for_rollouts`` or a long-polling ``dequeue_rollout`` while it sleeps changes
nothing and claims nothing.

**Processes.** The store pickles as its path and settings; the copy connects to the file on its
first call (e.g. in a child process). ``await store.close()`` (or ``async with``) closes the
connection; a closed store reconnects if it is used again.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from .._validate import as_enqueue_requests, check_worker_id
from ..types import (
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Worker,
    WorkerId,
    WorkerStatus,
)
from ._sqlite_ops import Effects, Transaction
from ._sqlite_schema import Synchronous, connect
from .base import UNSET, EnqueueRolloutRequest, LightningStore, RolloutSortField, Unset, check_rollout_query

__all__ = ["SqliteLightningStore"]

T = TypeVar("T")


class _Waiter:
    """One ``wait_for_rollouts`` check-and-sleep: the ids it still waits for, and its event."""

    __slots__ = ("event", "remaining")

    def __init__(self, remaining: set[str]) -> None:
        self.remaining = remaining
        self.event = anyio.Event()


def _poll(tx: Transaction, worker_id: WorkerId | None) -> tuple[AttemptedRollout | None, float | None]:
    claimed = tx.dequeue(worker_id, 1, True)
    return (claimed[0], None) if claimed else (None, tx.next_deadline())


def _finish_and_poll(
    tx: Transaction, rollout_id: str, attempt_id: str, status: AttemptStatus, worker_id: WorkerId | None
) -> AttemptedRollout | None:
    tx.update_attempt(rollout_id, attempt_id, status, UNSET, UNSET, UNSET)
    claimed = tx.dequeue(worker_id, 1, True)
    return claimed[0] if claimed else None


class SqliteLightningStore(LightningStore):
    """A complete ``LightningStore`` in the SQLite file at ``path`` (created on first use).

    ``synchronous``: ``"normal"`` or ``"full"`` (see the module documentation: process deaths vs
    power cuts). ``poll_interval``: how often a waiting call looks for changes made by *other
    processes* on the same file (seconds; ``None``: never, when this object is the file's only
    user). ``busy_timeout``: how long a call waits for another process's transaction.
    """

    #: A long poll cancelled while it sleeps claims nothing, and one cancelled while its claiming
    #: transaction runs completes it and returns the claim (the worker thread is not abandoned and
    #: nothing awaits after the claim): the runner loop may race it against its stop event.
    long_poll_is_cancel_safe = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "normal",
        poll_interval: float | None = 1.0,
        busy_timeout: float = 30.0,
    ) -> None:
        path = os.fspath(path)
        if not isinstance(path, str) or not path or path == ":memory:" or path.startswith("file:"):
            raise ValueError(
                f"SqliteLightningStore needs a file path, got {path!r} "
                "(for a store in memory use InMemoryLightningStore)"
            )
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        if poll_interval is not None and not poll_interval > 0:
            raise ValueError(f"poll_interval must be a positive number or None, got {poll_interval!r}")
        if not busy_timeout >= 0:
            raise ValueError(f"busy_timeout must be >= 0, got {busy_timeout!r}")
        self.path = os.path.abspath(path)
        self.synchronous: Synchronous = synchronous
        self.poll_interval = poll_interval
        self.busy_timeout = float(busy_timeout)
        # Worker-thread side: the connection (opened on first use, per process) and the lock
        # that gives it to one call at a time.
        self._conn: Any = None
        self._conn_pid: int | None = None
        self._lock = threading.Lock()
        # Event-loop side: one thread at a time per event loop, and the waiters to wake.
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"SqliteLightningStore-{id(self)}")
        self._waiters: dict[str, list[_Waiter]] = {}
        self._queue_event: anyio.Event | None = None
        self._next_due: float | None = None  # the nearest deadline the sleepers know of

    def __repr__(self) -> str:
        return f"SqliteLightningStore({self.path!r})"

    # ------------------------------------------------------------------ pickling, lifecycle
    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "synchronous": self.synchronous,
            "poll_interval": self.poll_interval,
            "busy_timeout": self.busy_timeout,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    async def __aenter__(self) -> SqliteLightningStore:
        """Open the file now (so that a bad path or a foreign file fails here, not later)."""
        await self._call(lambda tx: None)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection (checkpointing the write-ahead log). Idempotent."""
        await anyio.to_thread.run_sync(self._close_connection, limiter=self._thread_limiter())

    def _close_connection(self) -> None:
        with self._lock:
            if self._conn is not None and self._conn_pid == os.getpid():
                self._conn.close()
            self._conn = None

    # ------------------------------------------------------------------ the worker thread
    def _thread_limiter(self) -> anyio.CapacityLimiter:
        try:
            return self._limiter.get()
        except LookupError:
            limiter = anyio.CapacityLimiter(1)
            self._limiter.set(limiter)
            return limiter

    def _transact(self, operation: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, Effects]:
        """Run ``operation(transaction, *args)`` in one write transaction (worker thread)."""
        with self._lock:
            if self._conn is None or self._conn_pid != os.getpid():
                # A connection inherited through fork() must not be used: open our own.
                self._conn = connect(self.path, self.synchronous, self.busy_timeout)
                self._conn_pid = os.getpid()
            conn = self._conn
            tx = Transaction(conn, time.time())
            conn.execute("BEGIN IMMEDIATE")
            try:
                tx.settle()
                result = operation(tx, *args)
                tx.flush()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result, tx.effects

    async def _call(self, operation: Callable[..., T], *args: Any) -> T:
        result, effects = await anyio.to_thread.run_sync(
            self._transact, operation, args, limiter=self._thread_limiter()
        )
        self._apply(effects)
        return result

    # ------------------------------------------------------------------ waking
    def _apply(self, effects: Effects) -> None:
        for rollout_id in effects.finished:
            for waiter in self._waiters.pop(rollout_id, ()):
                waiter.remaining.discard(rollout_id)
                if not waiter.remaining:
                    waiter.event.set()
        if effects.queued:
            self._notify_queue()
        due = effects.earliest_deadline
        if due is not None and (self._next_due is None or due < self._next_due):
            # Sleepers sleep until the nearest deadline they knew of; this one may come sooner.
            self._next_due = due
            for waiters in self._waiters.values():
                for waiter in waiters:
                    waiter.event.set()
            self._notify_queue()

    def _notify_queue(self) -> None:
        event, self._queue_event = self._queue_event, None
        if event is not None:
            event.set()

    def _sleep_time(self, remaining: float | None, next_due: float | None) -> float:
        """How long a waiter may sleep: its own timeout, the next watchdog deadline, and the
        interval at which it looks for other processes' changes, whichever is first."""
        self._next_due = next_due
        limits = [math.inf if remaining is None else remaining]
        if self.poll_interval is not None:
            limits.append(self.poll_interval)
        if next_due is not None:
            limits.append(max(next_due - time.time(), 0.0) + 0.001)
        return min(limits)

    def _forget(self, waiter: _Waiter, rollout_ids: Sequence[str]) -> None:
        for rid in rollout_ids:
            waiters = self._waiters.get(rid)
            if waiters is not None:
                try:
                    waiters.remove(waiter)
                except ValueError:
                    pass
                if not waiters:
                    del self._waiters[rid]

    # ------------------------------------------------------------------ rollouts and the queue
    async def enqueue_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        request = EnqueueRolloutRequest(
            input=input, mode=mode, resources_id=resources_id, config=config, metadata=metadata
        )
        return (await self._call(Transaction.enqueue, [request]))[0]

    async def enqueue_many_rollouts(
        self, rollouts: Sequence[EnqueueRolloutRequest | Mapping[str, Any]]
    ) -> list[Rollout]:
        return await self._call(Transaction.enqueue, as_enqueue_requests(rollouts))

    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        check_worker_id(worker_id)
        if not timeout:
            claimed = await self._call(Transaction.dequeue, worker_id, 1, True)
            return claimed[0] if claimed else None
        deadline = time.monotonic() + timeout
        while True:
            # Taken before looking, so that an enqueue committed after the look still wakes us.
            if self._queue_event is None:
                self._queue_event = anyio.Event()
            event = self._queue_event
            rollout, next_due = await self._call(_poll, worker_id)
            if rollout is not None:
                return rollout  # no checkpoint after the claim: a claimed rollout is returned
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with anyio.move_on_after(self._sleep_time(remaining, next_due)):
                await event.wait()

    async def finish_and_dequeue(
        self,
        rollout_id: str,
        attempt_id: str,
        status: AttemptStatus = "succeeded",
        *,
        worker_id: WorkerId | None = None,
        timeout: float | None = None,
    ) -> AttemptedRollout | None:
        """One transaction ends the attempt and claims the next rollout; then, with a ``timeout``
        and nothing queued, the long poll of ``dequeue_rollout``."""
        if timeout is not None and (isinstance(timeout, bool) or not timeout >= 0):
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        check_worker_id(worker_id)
        claimed = await self._call(_finish_and_poll, rollout_id, attempt_id, status, worker_id)
        if claimed is not None or not timeout:
            return claimed
        return await self.dequeue_rollout(worker_id, timeout=timeout)

    async def unclaim_rollout(self, rollout_id: str, attempt_id: str) -> bool:
        return await self._call(Transaction.unclaim, rollout_id, attempt_id)

    async def dequeue_many_rollouts(
        self, *, limit: int = 1, worker_id: WorkerId | None = None
    ) -> list[AttemptedRollout]:
        check_worker_id(worker_id)
        return await self._call(Transaction.dequeue, worker_id, max(limit, 0), False)

    async def start_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        worker_id: WorkerId | None = None,
    ) -> AttemptedRollout:
        request = EnqueueRolloutRequest(
            input=input, mode=mode, resources_id=resources_id, config=config, metadata=metadata
        )
        return await self._call(Transaction.start_rollout, request, worker_id)

    async def start_attempt(self, rollout_id: str, worker_id: WorkerId | None = None) -> AttemptedRollout:
        return await self._call(Transaction.start_attempt, rollout_id, worker_id)

    async def update_rollout(
        self,
        rollout_id: str,
        input: Any | Unset = UNSET,
        mode: RolloutMode | Unset | None = UNSET,
        resources_id: str | Unset | None = UNSET,
        status: RolloutStatus | Unset = UNSET,
        config: RolloutConfig | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Rollout:
        return await self._call(
            Transaction.update_rollout, rollout_id, input, mode, resources_id, status, config, metadata
        )

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str | Literal["latest"],
        status: AttemptStatus | Unset = UNSET,
        worker_id: WorkerId | Unset | None = UNSET,
        last_heartbeat_time: float | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Attempt:
        return await self._call(
            Transaction.update_attempt,
            rollout_id,
            attempt_id,
            status,
            worker_id,
            last_heartbeat_time,
            metadata,
        )

    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout}")
        deadline = None if timeout is None else time.monotonic() + timeout
        ids = list(rollout_ids)
        while True:
            # Registered before looking, so that a rollout finishing after the look wakes us.
            waiter = _Waiter(set(ids))
            for rid in waiter.remaining:
                self._waiters.setdefault(rid, []).append(waiter)
            try:
                terminal, pending, next_due = await self._call(Transaction.check_wait, ids)
                remaining = None if deadline is None else deadline - time.monotonic()
                # Unknown ids are not waited for: ids come from the store, so they can never finish.
                if not pending or (remaining is not None and remaining <= 0):
                    return [terminal[rid] for rid in ids if rid in terminal]
                waiter.remaining &= pending
                if not waiter.remaining:
                    continue  # what we waited for finished while we looked: look again
                with anyio.move_on_after(self._sleep_time(remaining, next_due)):
                    await waiter.event.wait()
            finally:
                self._forget(waiter, ids)

    async def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        return await self._call(Transaction.get_rollout, rollout_id)

    async def query_rollouts(
        self,
        *,
        status_in: Sequence[RolloutStatus] | None = None,
        rollout_id_in: Sequence[str] | None = None,
        rollout_id_contains: str | None = None,
        sort_by: RolloutSortField | None = None,
        sort_order: Literal["asc", "desc"] = "asc",
        limit: int = -1,
        offset: int = 0,
    ) -> list[Rollout]:
        check_rollout_query(rollout_id_contains, sort_by, sort_order, limit, offset)
        return await self._call(
            Transaction.query_rollouts,
            status_in,
            rollout_id_in,
            rollout_id_contains,
            sort_by,
            sort_order,
            limit,
            offset,
        )

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        return await self._call(Transaction.query_attempts, rollout_id)

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        return await self._call(Transaction.get_latest_attempt, rollout_id)

    # ------------------------------------------------------------------ spans
    async def add_span(self, span: Span) -> Span | None:
        return (await self._call(Transaction.add_spans, [span]))[0]

    async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        return await self._call(Transaction.add_spans, list(spans))

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        return await self._call(Transaction.query_spans, rollout_id, attempt_id)

    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        return await self._call(Transaction.next_span_sequence_id, rollout_id, attempt_id)

    # ------------------------------------------------------------------ resources
    async def add_resources(self, resources: Mapping[str, Any]) -> ResourcesUpdate:
        return await self._call(Transaction.add_resources, resources)

    async def update_resources(self, resources_id: str, resources: Mapping[str, Any]) -> ResourcesUpdate:
        return await self._call(Transaction.update_resources, resources_id, resources)

    async def get_latest_resources(self) -> ResourcesUpdate | None:
        return await self._call(Transaction.get_latest_resources)

    async def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        return await self._call(Transaction.get_resources, resources_id)

    async def query_resources(self) -> list[ResourcesUpdate]:
        return await self._call(Transaction.query_resources)

    # ------------------------------------------------------------------ workers
    async def query_workers(self, *, status_in: Sequence[WorkerStatus] | None = None) -> list[Worker]:
        return await self._call(Transaction.query_workers, status_in)

    async def get_worker_by_id(self, worker_id: WorkerId) -> Worker | None:
        return await self._call(Transaction.get_worker, worker_id)

    async def update_worker(
        self, worker_id: WorkerId, heartbeat_stats: dict[str, Any] | Unset = UNSET
    ) -> Worker:
        return await self._call(Transaction.update_worker, worker_id, heartbeat_stats)

    # ------------------------------------------------------------------ misc
    async def statistics(self) -> dict[str, Any]:
        stats = await self._call(Transaction.statistics)
        return {"name": type(self).__name__, "path": self.path, **stats}
