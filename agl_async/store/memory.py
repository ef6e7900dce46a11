"""``InMemoryLightningStore``: the whole store in this process's memory.

Atomicity: no method awaits between reading and writing state, so on one event loop every call
is atomic by construction (``LightningStoreLocked`` adds a lock for stores where that is not so).
The store is not thread-safe; use it from the event loop that runs the bundles.

The watchdog is deadline bookkeeping, not a polling task: each live attempt whose rollout has a
``timeout_seconds`` / ``unresponsive_seconds`` gets an entry in a heap ordered by deadline. Every
store call first settles the deadlines that have passed, and ``wait_for_rollouts`` sleeps no
longer than the nearest deadline (a new attempt with a nearer one wakes it to sleep less), so a
waiter sees an expired attempt's rollout requeued or failed at that moment without anyone polling.
The attempt's ``end_time`` is the deadline itself.

Pickling copies the data (rollouts, attempts, spans, resources, workers, queue); waiters belong
to the event loop they wait on and are not carried over.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import anyio
import msgspec

from .._validate import (
    as_config,
    as_enqueue_requests,
    as_resources,
    check_encodable,
    check_json_value,
    check_limit,
    check_seconds,
    check_worker_id,
)
from ..types import (
    ATTEMPT_STATUSES,
    AUTO_SEQUENCE_ID,
    QUEUE_STATUSES,
    REWARD_KEY,
    ROLLOUT_STATUSES,
    TERMINAL_ATTEMPT_STATUSES,
    TERMINAL_ROLLOUT_STATUSES,
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
from ._rules import new_id, rollout_status_for
from .base import (
    UNSET,
    EnqueueRolloutRequest,
    LightningStore,
    RolloutSortField,
    Unset,
    check_rollout_query,
    select_rollouts,
)

__all__ = ["InMemoryLightningStore"]

logger = logging.getLogger("agl_async.store")

_LIVE_ATTEMPT_STATUSES = frozenset({"preparing", "running"})
_MODES = frozenset({"train", "val", "test"})


_S = TypeVar("_S", bound=msgspec.Struct)


def _copy_config(c: RolloutConfig) -> RolloutConfig:
    copy: RolloutConfig = c.__copy__()  # type: ignore[attr-defined]
    copy.retry_condition = list(c.retry_condition)
    return copy


def _copy_rollout(r: Rollout) -> Rollout:
    copy: Rollout = r.__copy__()  # type: ignore[attr-defined]
    copy.config = _copy_config(r.config)
    copy.metadata = r.metadata.copy()
    return copy


def _copy_attempt(a: Attempt) -> Attempt:
    copy: Attempt = a.__copy__()  # type: ignore[attr-defined]
    copy.metadata = a.metadata.copy()
    return copy


def _copy_span(s: Span) -> Span:
    copy: Span = s.__copy__()  # type: ignore[attr-defined]
    copy.attributes = s.attributes.copy()
    copy.events = s.events.copy()
    return copy


def _copy_resources(r: ResourcesUpdate) -> ResourcesUpdate:
    copy: ResourcesUpdate = r.__copy__()  # type: ignore[attr-defined]
    copy.resources = r.resources.copy()
    return copy


def _copy_worker(w: Worker) -> Worker:
    copy: Worker = w.__copy__()  # type: ignore[attr-defined]
    if w.heartbeat_stats is not None:
        copy.heartbeat_stats = w.heartbeat_stats.copy()
    return copy


_COPIERS: dict[type, Any] = {
    RolloutConfig: _copy_config,
    Rollout: _copy_rollout,
    Attempt: _copy_attempt,
    Span: _copy_span,
    ResourcesUpdate: _copy_resources,
    Worker: _copy_worker,
}


def _copy(obj: _S) -> _S:
    """A snapshot of a model: callers get copies, never the store's own objects.

    The model and its containers (metadata, config, resources, span attributes …) are copied one
    level deep, so assigning to a snapshot's fields or to keys of its dicts never reaches the
    store, as over HTTP. ``input`` and values nested deeper are shared, not copied (cost).
    """
    copier = _COPIERS.get(type(obj))
    return copier(obj) if copier is not None else obj.__copy__()  # type: ignore[attr-defined,no-any-return]


_span_encoder = msgspec.json.Encoder()
_span_decoder = msgspec.json.Decoder(Span)


def _encode_span(span: Span) -> bytes:
    try:
        return _span_encoder.encode(span)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        raise ValueError(f"span {span.span_id!r}: attributes must be JSON values: {exc}") from None


def _sequence_of(stored: tuple[int, bytes]) -> int:
    return stored[0]


class _Waiter:
    """One ``wait_for_rollouts`` call: the ids it still waits for and the event that ends it."""

    __slots__ = ("event", "remaining")

    def __init__(self, remaining: set[str]) -> None:
        self.remaining = remaining
        self.event = anyio.Event()


class InMemoryLightningStore(LightningStore):
    """A complete ``LightningStore`` kept in memory (the default store of a ``Trainer``)."""

    long_poll_is_cancel_safe = True  # the claim never awaits: an abandoned wait claimed nothing
    copies_when_pickled = True  # the state is in this process's memory

    def __init__(self) -> None:
        self._rollouts: dict[str, Rollout] = {}
        self._attempts: dict[str, list[Attempt]] = {}  # rollout_id -> attempts by sequence_id
        self._attempt_by_id: dict[str, Attempt] = {}
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._spans: dict[str, list[tuple[int, bytes]]] = {}  # attempt_id -> (sequence_id, JSON)
        self._span_seq: dict[str, int] = {}  # attempt_id -> next sequence id
        self._resources: dict[str, ResourcesUpdate] = {}
        self._latest_resources_id: str | None = None
        self._workers: dict[WorkerId, Worker] = {}
        self._deadlines: list[tuple[float, str]] = []  # (deadline, attempt_id) min-heap
        self._waiters: dict[str, list[_Waiter]] = {}
        # Set (and dropped) whenever a rollout enters the queue: wakes long-polling dequeuers.
        self._queue_event: anyio.Event | None = None
        # Creation order is start_time order (so query_rollouts(sort_by="start_time") needs no sort)
        # as long as the clock never stepped back between two creations.
        self._start_ordered = True
        self._latest_start = -float("inf")

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_waiters"] = {}
        state["_queue_event"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ lookups
    def _rollout(self, rollout_id: str) -> Rollout:
        try:
            return self._rollouts[rollout_id]
        except (KeyError, TypeError):
            raise ValueError(f"rollout {rollout_id!r} not found") from None

    def _attempt(self, rollout_id: str, attempt_id: str) -> Attempt:
        self._rollout(rollout_id)
        if attempt_id == "latest":
            attempts = self._attempts.get(rollout_id)
            if not attempts:
                raise ValueError(f"rollout {rollout_id!r} has no attempts")
            return attempts[-1]
        attempt = self._attempt_by_id.get(attempt_id) if isinstance(attempt_id, str) else None
        if attempt is None or attempt.rollout_id != rollout_id:
            raise ValueError(f"attempt {attempt_id!r} not found in rollout {rollout_id!r}")
        return attempt

    def _is_latest(self, attempt: Attempt) -> bool:
        return self._attempts[attempt.rollout_id][-1] is attempt

    def _attempted(self, rollout: Rollout, attempt: Attempt) -> AttemptedRollout:
        fields = msgspec.structs.asdict(rollout)
        fields["config"] = _copy_config(rollout.config)
        fields["metadata"] = rollout.metadata.copy()
        return AttemptedRollout(**fields, attempt=_copy_attempt(attempt))

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_rollout_args(
        mode: Any,
        resources_id: Any,
        config: Any,
        metadata: Any,
        resources: Mapping[str, ResourcesUpdate],
        input: Any = UNSET,
    ) -> RolloutConfig:
        if mode is not None and mode not in _MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; expected one of {sorted(_MODES)}")
        if resources_id is not None and resources_id not in resources:
            raise ValueError(f"resources {resources_id!r} not found")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
            check_json_value(metadata, "metadata")
        if input is not UNSET:
            check_json_value(input, "input")
        return _config_copy(config)

    # ------------------------------------------------------------------ watchdog
    def _settle_deadlines(self, now: float | None = None) -> None:
        """Turn every live attempt past its deadline ``timeout`` / ``unresponsive``."""
        heap = self._deadlines
        if not heap:
            return
        if now is None:
            now = time.time()
        while heap and heap[0][0] <= now:
            _, attempt_id = heapq.heappop(heap)
            attempt = self._attempt_by_id.get(attempt_id)
            if attempt is None or attempt.status not in _LIVE_ATTEMPT_STATUSES:
                continue
            verdict, due = self._attempt_deadline(attempt)
            if due is None:
                continue
            if due <= now:
                self._set_attempt_status(attempt, verdict, due)
            else:
                heapq.heappush(heap, (due, attempt_id))

    def _attempt_deadline(self, attempt: Attempt) -> tuple[AttemptStatus, float | None]:
        """The status an attempt will get if nothing happens, and when."""
        config = self._rollouts[attempt.rollout_id].config
        verdict: AttemptStatus = "timeout"
        due: float | None = None
        if config.timeout_seconds is not None:
            due = attempt.start_time + config.timeout_seconds
        if config.unresponsive_seconds is not None:
            last = attempt.last_heartbeat_time or attempt.start_time
            silent_due = last + config.unresponsive_seconds
            if due is None or silent_due < due:
                verdict, due = "unresponsive", silent_due
        return verdict, due

    def _watch(self, attempt: Attempt) -> None:
        _, due = self._attempt_deadline(attempt)
        if due is not None:
            heap = self._deadlines
            earliest = not heap or due < heap[0][0]
            heapq.heappush(heap, (due, attempt.attempt_id))
            if earliest:
                # Waiters sleep until the nearest deadline they knew of; this one comes sooner.
                self._nudge_waiters()

    def _next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    # ------------------------------------------------------------------ state transitions
    def _set_rollout_status(self, rollout: Rollout, status: RolloutStatus, now: float) -> None:
        if rollout.status == status:
            return
        rollout.status = status
        if status in TERMINAL_ROLLOUT_STATUSES:
            rollout.end_time = now
            self._wake(rollout.rollout_id)
        else:
            rollout.end_time = None
            if status in QUEUE_STATUSES and rollout.rollout_id not in self._queued:
                self._queue.append(rollout.rollout_id)
                self._queued.add(rollout.rollout_id)
                self._notify_queue()
                return
        if status not in QUEUE_STATUSES:
            self._unqueue(rollout.rollout_id)

    def _unqueue(self, rollout_id: str) -> None:
        """Take a rollout out of the queue when it leaves it other than by being dequeued.

        O(queue length), but only on that rare path (a status set by hand, ``start_attempt`` on a
        queued rollout, a late update of a requeued rollout's attempt); ``dequeue`` pops in O(1).
        """
        if rollout_id in self._queued:
            self._queued.discard(rollout_id)
            self._queue.remove(rollout_id)

    def _set_attempt_status(self, attempt: Attempt, status: AttemptStatus, now: float) -> None:
        previous = attempt.status
        attempt.status = status
        if status in TERMINAL_ATTEMPT_STATUSES:
            attempt.end_time = attempt.end_time if previous == status else now
        else:
            attempt.end_time = None
            if previous not in _LIVE_ATTEMPT_STATUSES:
                self._watch(attempt)  # revived: supervise it again
        self._sync_worker(attempt, now)
        if self._is_latest(attempt):
            rollout = self._rollouts[attempt.rollout_id]
            if rollout.status not in TERMINAL_ROLLOUT_STATUSES:
                self._set_rollout_status(rollout, rollout_status_for(attempt, rollout.config), now)
            elif status != previous:
                # Terminal is final: only an explicit update_rollout / start_attempt moves it on.
                logger.warning(
                    "attempt %s of rollout %s is now %r; the rollout stays %r (terminal)",
                    attempt.attempt_id,
                    attempt.rollout_id,
                    status,
                    rollout.status,
                )

    def _new_attempt(self, rollout: Rollout, worker_id: WorkerId | None, now: float) -> Attempt:
        attempts = self._attempts.setdefault(rollout.rollout_id, [])
        attempt = Attempt(
            rollout_id=rollout.rollout_id,
            attempt_id=new_id("at"),
            sequence_id=len(attempts) + 1,
            start_time=now,
            worker_id=worker_id,
        )
        attempts.append(attempt)
        self._attempt_by_id[attempt.attempt_id] = attempt
        self._unqueue(rollout.rollout_id)
        rollout.status = "preparing"
        rollout.end_time = None
        config = rollout.config
        if config.timeout_seconds is not None or config.unresponsive_seconds is not None:
            self._watch(attempt)
        if worker_id is not None:
            self._sync_worker(attempt, now, dequeued=True)
        return attempt

    def _sync_worker(self, attempt: Attempt, now: float, dequeued: bool = False) -> None:
        if attempt.worker_id is None:
            return
        worker = self._worker(attempt.worker_id)
        if dequeued:
            worker.last_dequeue_time = now
        if attempt.status in ("succeeded", "failed"):
            self._release_worker(worker, "idle", now, attempt.attempt_id)
        elif attempt.status in ("unresponsive", "timeout"):
            self._release_worker(worker, "unknown", now, attempt.attempt_id)
        else:
            worker.status = "busy"
            worker.last_busy_time = now
            worker.current_rollout_id = attempt.rollout_id
            worker.current_attempt_id = attempt.attempt_id

    @staticmethod
    def _release_worker(worker: Worker, status: WorkerStatus, now: float, attempt_id: str) -> None:
        if worker.current_attempt_id not in (None, attempt_id):
            return  # the worker has moved on to another attempt already
        worker.status = status
        worker.last_idle_time = now
        worker.current_rollout_id = None
        worker.current_attempt_id = None

    def _worker(self, worker_id: WorkerId) -> Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            worker = self._workers[worker_id] = Worker(worker_id=worker_id)
        return worker

    def _heartbeat(self, attempt: Attempt, now: float) -> None:
        attempt.last_heartbeat_time = now
        if attempt.status == "preparing" or (attempt.status == "unresponsive" and not self._is_dead(attempt)):
            self._set_attempt_status(attempt, "running", now)

    def _is_dead(self, attempt: Attempt) -> bool:
        """Whether the watchdog has ended ``attempt`` for good: ``timeout``; or ``unresponsive``
        once its rollout has moved on (a newer attempt, or a terminal status). A dead attempt keeps
        its verdict; an ``unresponsive`` attempt that is still the latest of a rollout waiting for
        a retry comes back to ``running`` with its next span, heartbeat status or result."""
        if attempt.status == "timeout":
            return True
        if attempt.status != "unresponsive":
            return False
        rollout = self._rollouts[attempt.rollout_id]
        return not self._is_latest(attempt) or rollout.status in TERMINAL_ROLLOUT_STATUSES

    def _nudge_waiters(self) -> None:
        """Wake every ``wait_for_rollouts`` call so that it recomputes how long to sleep."""
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.event.set()
        self._notify_queue()  # long-polling dequeuers recompute their sleep as well

    def _wake(self, rollout_id: str) -> None:
        for waiter in self._waiters.pop(rollout_id, ()):
            waiter.remaining.discard(rollout_id)
            if not waiter.remaining:
                waiter.event.set()

    # ------------------------------------------------------------------ rollouts and the queue
    def _create_rollout(
        self,
        input: Any,
        mode: str | None,
        resources_id: str | None,
        config: RolloutConfig | None,
        metadata: dict[str, Any] | None,
        now: float,
        checked: RolloutConfig | None = None,
    ) -> Rollout:
        """A new rollout in the store; ``checked``: the arguments were checked already (this is
        the config :meth:`_check_rollout_args` made of them)."""
        cfg = checked or self._check_rollout_args(
            mode, resources_id, config, metadata, self._resources, input
        )
        rollout = Rollout(
            rollout_id=new_id("ro"),
            input=input,
            start_time=now,
            mode=mode,  # type: ignore[arg-type]  # checked above
            resources_id=resources_id if resources_id is not None else self._latest_resources_id,
            config=cfg,
            metadata=dict(metadata) if metadata else {},
        )
        self._rollouts[rollout.rollout_id] = rollout
        if now < self._latest_start:  # the clock stepped back: creation order is no longer start order
            self._start_ordered = False
        self._latest_start = now
        return rollout

    def _enqueue(self, rollout: Rollout) -> None:
        self._queue.append(rollout.rollout_id)
        self._queued.add(rollout.rollout_id)
        self._notify_queue()

    def _notify_queue(self) -> None:
        """Wake the long-polling ``dequeue_rollout`` calls: the queue has something again."""
        event, self._queue_event = self._queue_event, None
        if event is not None:
            event.set()

    async def enqueue_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Rollout:
        self._settle_deadlines()
        rollout = self._create_rollout(input, mode, resources_id, config, metadata, time.time())
        self._enqueue(rollout)
        return _copy(rollout)

    async def enqueue_many_rollouts(
        self, rollouts: Sequence[EnqueueRolloutRequest | Mapping[str, Any]]
    ) -> list[Rollout]:
        self._settle_deadlines()
        requests = as_enqueue_requests(rollouts)
        # Validate all before creating any: nothing half-applied.
        configs = [
            self._check_rollout_args(r.mode, r.resources_id, r.config, r.metadata, self._resources, r.input)
            for r in requests
        ]
        now = time.time()
        out = []
        for r, config in zip(requests, configs, strict=True):
            rollout = self._create_rollout(
                r.input, r.mode, r.resources_id, r.config, r.metadata, now, checked=config
            )
            self._enqueue(rollout)
            out.append(_copy(rollout))
        return out

    def _pop_queued(self) -> Rollout | None:
        queue, queued = self._queue, self._queued
        while queue:
            rollout_id = queue.popleft()
            if rollout_id not in queued:
                continue  # defensive: every way out of the queue also removes the entry
            queued.discard(rollout_id)
            rollout = self._rollouts[rollout_id]
            if rollout.status in QUEUE_STATUSES:
                return rollout
        return None

    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        check_seconds(timeout)
        check_worker_id(worker_id)
        deadline = time.monotonic() + timeout if timeout else None
        while True:
            self._settle_deadlines()
            now = time.time()
            rollout = self._pop_queued()
            if rollout is not None:
                attempt = self._new_attempt(rollout, worker_id, now)
                return self._attempted(rollout, attempt)
            if worker_id is not None:
                worker = self._worker(worker_id)
                worker.last_dequeue_time = now
                if worker.current_attempt_id is None:
                    worker.status = "idle"
            remaining = 0.0 if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return None
            # Long poll: sleep until something is queued, our timeout, or the next watchdog
            # deadline (which may requeue a rollout), whichever comes first. Cancelling this
            # sleep changes nothing: the claim above happens without awaiting.
            next_due = self._next_deadline()
            if next_due is not None:
                remaining = min(remaining, max(next_due - time.time(), 0.0) + 0.001)
            if self._queue_event is None:
                self._queue_event = anyio.Event()
            with anyio.move_on_after(remaining):
                await self._queue_event.wait()

    async def unclaim_rollout(self, rollout_id: str, attempt_id: str) -> bool:
        self._settle_deadlines()
        attempt = self._attempt(rollout_id, attempt_id)
        rollout = self._rollouts[rollout_id]
        if attempt.status != "preparing" or rollout.status != "preparing" or not self._is_latest(attempt):
            return False
        self._attempts[rollout_id].pop()
        del self._attempt_by_id[attempt.attempt_id]
        self._spans.pop(attempt.attempt_id, None)
        self._span_seq.pop(attempt.attempt_id, None)
        if attempt.worker_id is not None:
            worker = self._workers.get(attempt.worker_id)
            if worker is not None:
                self._release_worker(worker, "idle", time.time(), attempt.attempt_id)
        rollout.status = "queuing" if attempt.sequence_id == 1 else "requeuing"
        self._queue.appendleft(rollout_id)
        self._queued.add(rollout_id)
        self._notify_queue()
        return True

    async def dequeue_many_rollouts(
        self, *, limit: int = 1, worker_id: WorkerId | None = None
    ) -> list[AttemptedRollout]:
        check_limit(limit)
        check_worker_id(worker_id)
        self._settle_deadlines()
        now = time.time()
        out = []
        for _ in range(limit):
            rollout = self._pop_queued()
            if rollout is None:
                break
            out.append(self._attempted(rollout, self._new_attempt(rollout, worker_id, now)))
        return out

    async def start_rollout(
        self,
        input: Any,
        mode: RolloutMode | None = None,
        resources_id: str | None = None,
        config: RolloutConfig | None = None,
        metadata: dict[str, Any] | None = None,
        worker_id: WorkerId | None = None,
    ) -> AttemptedRollout:
        check_worker_id(worker_id)
        self._settle_deadlines()
        now = time.time()
        rollout = self._create_rollout(input, mode, resources_id, config, metadata, now)
        return self._attempted(rollout, self._new_attempt(rollout, worker_id, now))

    async def start_attempt(self, rollout_id: str, worker_id: WorkerId | None = None) -> AttemptedRollout:
        check_worker_id(worker_id)
        self._settle_deadlines()
        rollout = self._rollout(rollout_id)
        now = time.time()
        return self._attempted(rollout, self._new_attempt(rollout, worker_id, now))

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
        self._settle_deadlines()
        rollout = self._rollout(rollout_id)
        # Validate everything first: a failing call changes nothing.
        if status is not UNSET and status not in ROLLOUT_STATUSES:
            raise ValueError(f"unknown rollout status {status!r}; expected one of {sorted(ROLLOUT_STATUSES)}")
        self._check_rollout_args(
            None if mode is UNSET else mode,
            None if resources_id is UNSET else resources_id,
            None,
            None if metadata is UNSET else metadata,
            self._resources,
            input,
        )
        new_config = None if config is UNSET else _config_copy(config)
        if not isinstance(input, Unset):
            rollout.input = input
        if not isinstance(mode, Unset):
            rollout.mode = mode
        if not isinstance(resources_id, Unset):
            rollout.resources_id = resources_id
        if new_config is not None:
            rollout.config = new_config
            for attempt in self._attempts.get(rollout_id, ()):
                if attempt.status in _LIVE_ATTEMPT_STATUSES:
                    self._watch(attempt)  # the new limits apply to attempts already running
        if not isinstance(metadata, Unset):
            new_metadata = dict(metadata) if metadata else {}
            stays_terminal = rollout.status in TERMINAL_ROLLOUT_STATUSES and (
                isinstance(status, Unset) or status in TERMINAL_ROLLOUT_STATUSES
            )
            if stays_terminal:
                _keep_reward(rollout, new_metadata)
            rollout.metadata = new_metadata
        if not isinstance(status, Unset):
            self._set_rollout_status(rollout, status, time.time())
        return _copy(rollout)

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str | Literal["latest"],
        status: AttemptStatus | Unset = UNSET,
        worker_id: WorkerId | Unset | None = UNSET,
        last_heartbeat_time: float | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Attempt:
        self._settle_deadlines()
        attempt = self._attempt(rollout_id, attempt_id)
        if status is not UNSET and status not in ATTEMPT_STATUSES:
            raise ValueError(f"unknown attempt status {status!r}; expected one of {sorted(ATTEMPT_STATUSES)}")
        if not isinstance(metadata, (Unset, dict)) and metadata is not None:
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if isinstance(metadata, dict):
            check_json_value(metadata, "metadata")
        if not isinstance(last_heartbeat_time, (Unset, int, float)) or isinstance(last_heartbeat_time, bool):
            raise ValueError(f"last_heartbeat_time must be a number, got {last_heartbeat_time!r}")
        if not isinstance(worker_id, Unset):
            check_worker_id(worker_id)
        if not isinstance(status, Unset) and status != attempt.status and self._is_dead(attempt):
            # A result (or any other status) arriving for an attempt the watchdog has ended:
            # its verdict is final, and the rollout has moved on (requeued, retried or finished).
            logger.warning(
                "ignoring status %r for attempt %s of rollout %s: the watchdog already ended it as %r",
                status,
                attempt.attempt_id,
                rollout_id,
                attempt.status,
            )
            return _copy(attempt)
        now = time.time()
        if not isinstance(metadata, Unset):
            attempt.metadata = dict(metadata) if metadata else {}
        if not isinstance(worker_id, Unset) and worker_id != attempt.worker_id:
            attempt.worker_id = worker_id
            if attempt.status in _LIVE_ATTEMPT_STATUSES:
                self._sync_worker(attempt, now)
        if attempt.status in _LIVE_ATTEMPT_STATUSES or status in _LIVE_ATTEMPT_STATUSES:
            attempt.last_heartbeat_time = (
                now if isinstance(last_heartbeat_time, Unset) else float(last_heartbeat_time)
            )
        elif not isinstance(last_heartbeat_time, Unset):
            attempt.last_heartbeat_time = float(last_heartbeat_time)
        if not isinstance(status, Unset):
            self._set_attempt_status(attempt, status, now)
        return _copy(attempt)

    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        check_seconds(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._settle_deadlines()
            # Unknown ids are not waited for: ids come from the store, so they can never finish.
            pending = {rid for rid in rollout_ids if rid in self._rollouts and not self._is_finished(rid)}
            remaining = None if deadline is None else deadline - time.monotonic()
            if not pending or (remaining is not None and remaining <= 0):
                break
            # Sleep until a rollout we wait for finishes, our timeout, or the next watchdog
            # deadline (which may finish one of ours), whichever comes first.
            next_due = self._next_deadline()
            if next_due is not None:
                until_due = max(next_due - time.time(), 0.0) + 0.001
                remaining = until_due if remaining is None else min(remaining, until_due)
            waiter = _Waiter(pending)
            for rid in pending:
                self._waiters.setdefault(rid, []).append(waiter)
            try:
                with anyio.move_on_after(remaining):
                    await waiter.event.wait()
            finally:
                self._forget(waiter)
        return [_copy(self._rollouts[rid]) for rid in rollout_ids if self._is_finished(rid)]

    def _is_finished(self, rollout_id: str) -> bool:
        rollout = self._rollouts.get(rollout_id)
        return rollout is not None and rollout.status in TERMINAL_ROLLOUT_STATUSES

    def _forget(self, waiter: _Waiter) -> None:
        for rid in waiter.remaining:
            waiters = self._waiters.get(rid)
            if waiters is not None:
                try:
                    waiters.remove(waiter)
                except ValueError:
                    pass
                if not waiters:
                    del self._waiters[rid]

    async def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        self._settle_deadlines()
        rollout = self._rollouts.get(rollout_id)
        return None if rollout is None else _copy(rollout)

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
        self._settle_deadlines()
        rollouts: Iterable[Rollout]
        if rollout_id_in is not None:
            rollouts = (self._rollouts[r] for r in dict.fromkeys(rollout_id_in) if r in self._rollouts)
        elif sort_by == "start_time" and self._start_ordered:
            # Already in that order (ties in creation order): walk it, no sort; "desc" from the end.
            rollouts = reversed(self._rollouts.values()) if sort_order == "desc" else self._rollouts.values()
            sort_by = None
        else:
            rollouts = self._rollouts.values()
        # Filter, order and page the store's own objects; copy only the page handed out.
        page = select_rollouts(
            rollouts,
            status_in=status_in,
            rollout_id_contains=rollout_id_contains,
            sort_by=sort_by,
            sort_order=sort_order,
            limit=limit,
            offset=offset,
        )
        return [_copy(r) for r in page]

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        self._settle_deadlines()
        return [_copy(a) for a in self._attempts.get(rollout_id, ())]

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        self._settle_deadlines()
        attempts = self._attempts.get(rollout_id)
        return _copy(attempts[-1]) if attempts else None

    # ------------------------------------------------------------------ spans
    def _check_span(self, span: Span) -> Attempt:
        if not isinstance(span, Span):
            raise ValueError(f"expected a Span, got {type(span).__name__}")
        attempt = self._attempt(span.rollout_id, span.attempt_id)
        if isinstance(span.sequence_id, bool) or not isinstance(span.sequence_id, int):
            raise ValueError(f"span sequence_id must be an integer, got {span.sequence_id!r}")
        if type(span.attributes) is not dict or type(span.events) is not list:
            raise ValueError("span attributes must be a dict and events a list")
        check_encodable(span, f"span {span.span_id!r}")
        return attempt

    def _store_span(self, span: Span, now: float, encoded: bytes) -> Span:
        attempt = self._check_span(span)
        # [compact spans] kept as their JSON encoding: 3.7 KB instead of 6.5 KB for a span of
        # benchmarks/production.py (no Python object per attribute key and value); queries decode
        # fresh copies.
        seq, next_seq = span.sequence_id, self._span_seq.get(attempt.attempt_id, 1)
        if seq == AUTO_SEQUENCE_ID:  # the store numbers it (OTLP ingestion, the runner's tracer)
            span.sequence_id = seq = next_seq
            encoded = _encode_span(span)  # the encoding must carry the number it was given
        self._spans.setdefault(attempt.attempt_id, []).append((seq, encoded))
        if seq >= next_seq:
            self._span_seq[attempt.attempt_id] = seq + 1
        self._heartbeat(attempt, now)
        return span

    async def add_span(self, span: Span) -> Span | None:
        """Store a snapshot of ``span`` (its JSON encoding); returns ``span`` itself."""
        self._settle_deadlines()
        self._check_span(span)
        return self._store_span(span, time.time(), _encode_span(span))

    async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        self._settle_deadlines()
        for span in spans:  # validate all first: nothing half-applied
            self._check_span(span)
        encoded = [_encode_span(span) for span in spans]
        now = time.time()
        return [self._store_span(span, now, data) for span, data in zip(spans, encoded, strict=True)]

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        self._settle_deadlines()
        attempts = self._attempts.get(rollout_id, [])
        if attempt_id == "latest":
            attempts = attempts[-1:]
        elif attempt_id is not None:
            attempts = [a for a in attempts if a.attempt_id == attempt_id]
        out: list[Span] = []
        for attempt in attempts:
            stored = sorted(self._spans.get(attempt.attempt_id, ()), key=_sequence_of)
            out.extend(_span_decoder.decode(data) for _, data in stored)
        return out

    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        self._settle_deadlines()
        attempt = self._attempt(rollout_id, attempt_id)
        seq = self._span_seq.get(attempt.attempt_id, 1)
        self._span_seq[attempt.attempt_id] = seq + 1
        return seq

    # ------------------------------------------------------------------ resources
    async def add_resources(self, resources: Mapping[str, Any]) -> ResourcesUpdate:
        update = ResourcesUpdate(new_id("rs"), as_resources(resources))
        self._resources[update.resources_id] = update
        self._latest_resources_id = update.resources_id
        return _copy(update)

    async def update_resources(self, resources_id: str, resources: Mapping[str, Any]) -> ResourcesUpdate:
        current = self._resources.get(resources_id)
        if current is None:
            raise ValueError(f"resources {resources_id!r} not found")
        mapping = as_resources(resources)
        current.resources = mapping
        current.update_time = time.time()
        current.version += 1
        self._latest_resources_id = resources_id
        return _copy(current)

    async def get_latest_resources(self) -> ResourcesUpdate | None:
        if self._latest_resources_id is None:
            return None
        return _copy(self._resources[self._latest_resources_id])

    async def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        found = self._resources.get(resources_id)
        return None if found is None else _copy(found)

    async def query_resources(self) -> list[ResourcesUpdate]:
        return [_copy(r) for r in self._resources.values()]

    # ------------------------------------------------------------------ workers
    async def query_workers(self, *, status_in: Sequence[WorkerStatus] | None = None) -> list[Worker]:
        self._settle_deadlines()
        wanted = None if status_in is None else set(status_in)
        return [_copy(w) for w in self._workers.values() if wanted is None or w.status in wanted]

    async def get_worker_by_id(self, worker_id: WorkerId) -> Worker | None:
        self._settle_deadlines()
        worker = self._workers.get(worker_id)
        return None if worker is None else _copy(worker)

    async def update_worker(
        self, worker_id: WorkerId, heartbeat_stats: dict[str, Any] | Unset = UNSET
    ) -> Worker:
        self._settle_deadlines()
        check_worker_id(worker_id, optional=False)
        if not isinstance(heartbeat_stats, (Unset, dict)):
            raise ValueError(f"heartbeat_stats must be a dict, got {type(heartbeat_stats).__name__}")
        if isinstance(heartbeat_stats, dict):
            check_json_value(heartbeat_stats, "heartbeat_stats")
        now = time.time()
        worker = self._worker(worker_id)
        worker.last_heartbeat_time = now
        if not isinstance(heartbeat_stats, Unset):
            worker.heartbeat_stats = dict(heartbeat_stats)
        if worker.current_attempt_id is not None:
            attempt = self._attempt_by_id.get(worker.current_attempt_id)
            if attempt is not None and attempt.status in _LIVE_ATTEMPT_STATUSES:
                attempt.last_heartbeat_time = now
        return _copy(worker)

    # ------------------------------------------------------------------ misc
    async def statistics(self) -> dict[str, Any]:
        self._settle_deadlines()
        rollouts: dict[str, int] = dict.fromkeys(sorted(ROLLOUT_STATUSES), 0)
        for r in self._rollouts.values():
            rollouts[r.status] += 1
        attempts: dict[str, int] = dict.fromkeys(sorted(ATTEMPT_STATUSES), 0)
        for a in self._attempt_by_id.values():
            attempts[a.status] += 1
        workers: dict[str, int] = {"busy": 0, "idle": 0, "unknown": 0}
        for w in self._workers.values():
            workers[w.status] += 1
        return {
            "name": type(self).__name__,
            "total_rollouts": len(self._rollouts),
            "total_attempts": len(self._attempt_by_id),
            "total_spans": sum(len(s) for s in self._spans.values()),
            "total_resources": len(self._resources),
            "queue_length": len(self._queued),
            "rollouts": rollouts,
            "attempts": attempts,
            "workers": workers,
        }


_DEFAULT_CONFIG = RolloutConfig()  # only ever copied (cheaper than constructing and validating)


def _keep_reward(rollout: Rollout, new_metadata: dict[str, Any]) -> None:
    """A terminal rollout's reward is final: put the old one back into ``new_metadata`` (the rest
    of the metadata may change), logging a late attempt to change it."""
    old, new = rollout.metadata.get(REWARD_KEY, UNSET), new_metadata.get(REWARD_KEY, UNSET)
    if old == new:
        return
    logger.warning(
        "rollout %s is %s: its reward stays %r (a late update tried to make it %r)",
        rollout.rollout_id,
        rollout.status,
        None if old is UNSET else old,
        None if new is UNSET else new,
    )
    if old is UNSET:
        del new_metadata[REWARD_KEY]
    else:
        new_metadata[REWARD_KEY] = old


def _config_copy(config: Any) -> RolloutConfig:
    """The store's own copy of a checked config (the default one for ``None``)."""
    return _copy_config(as_config(config) or _DEFAULT_CONFIG)
