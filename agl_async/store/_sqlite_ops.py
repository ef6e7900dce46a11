"""The store's semantics on an SQLite connection: one :class:`Transaction` per store call.

A transaction loads the rows a call touches into model objects once, changes them in place by
the same rules as :class:`~agl_async.store.memory.InMemoryLightningStore` (status propagation,
retries, the watchdog's verdicts, worker bookkeeping), and writes the changed ones back
(:meth:`Transaction.flush`) before the caller commits. What the event loop must do afterwards —
wake ``wait_for_rollouts`` callers and long-polling dequeuers — is collected in
:class:`Effects`, applied only once the transaction has committed.

Rules the in-memory store will share once issue 16 lands in it (data integrity):

* an attempt's result never changes a rollout that is already terminal (``succeeded``,
  ``failed``, ``cancelled``); only explicit calls (``update_rollout``, ``start_attempt``) do;
* a terminal rollout's ``metadata["reward"]`` never changes afterwards (a late runner's write
  of it is ignored and logged);
* an attempt the watchdog ended (``timeout``; ``unresponsive`` once its rollout moved on: a newer
  attempt or a terminal status) keeps its verdict: a late result is ignored and logged. An
  ``unresponsive`` attempt that is still its rollout's latest, the rollout not terminal, comes
  back to life with its next span, heartbeat-with-status or result;
* values the store cannot write as JSON (a lone surrogate in a string, an arbitrary object) are
  refused with ``ValueError`` when they enter the store.

Everything here is blocking: it runs on the store's worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import msgspec

from .._validate import as_config, as_resources, check_worker_id
from ..types import (
    ATTEMPT_STATUSES,
    AUTO_SEQUENCE_ID,
    QUEUE_STATUSES,
    ROLLOUT_STATUSES,
    TERMINAL_ATTEMPT_STATUSES,
    TERMINAL_ROLLOUT_STATUSES,
    UNSET,
    Attempt,
    AttemptedRollout,
    AttemptStatus,
    EnqueueRolloutRequest,
    ResourcesUpdate,
    Rollout,
    RolloutConfig,
    RolloutMode,
    RolloutStatus,
    Span,
    Unset,
    Worker,
    WorkerId,
    WorkerStatus,
)
from ._rules import new_id, rollout_status_for
from .base import select_rollouts

__all__ = ["Effects", "Transaction", "encode_json"]

logger = logging.getLogger("agl_async.store.sqlite")

_LIVE = frozenset({"preparing", "running"})
_MODES = frozenset({"train", "val", "test"})
#: ``Rollout.metadata`` key of the reward (``agl_async.algorithm.REWARD_KEY``; the store sits below
#: the algorithm layer and cannot import it).
_REWARD_KEY = "reward"
#: Ids per ``IN (...)`` list (SQLite's default limit on bound parameters is 32,766).
_CHUNK = 500

_encode = msgspec.json.Encoder().encode
_decode_rollout = msgspec.json.Decoder(Rollout).decode
_decode_attempt = msgspec.json.Decoder(Attempt).decode
_decode_span = msgspec.json.Decoder(Span).decode
_decode_resources = msgspec.json.Decoder(ResourcesUpdate).decode
_decode_worker = msgspec.json.Decoder(Worker).decode


#: ``query_rollouts(sort_by=...)`` fields that are columns of ``rollouts`` / kept in its ``data``
#: only (a fixed table: nothing from the caller reaches the SQL text).
_SORT_COLUMNS = frozenset({"rollout_id", "status"})
_SORT_TIMES = {"start_time": "start_time", "end_time": "end_time"}


def _config_copy(config: Any) -> RolloutConfig:
    """A checked copy of ``config`` the caller cannot change afterwards (the default for ``None``)."""
    checked = as_config(config) or RolloutConfig()
    copy: RolloutConfig = checked.__copy__()  # type: ignore[attr-defined]
    copy.retry_condition = list(checked.retry_condition)
    return copy


def encode_json(value: Any, what: str) -> bytes:
    """``value`` as JSON bytes; ``ValueError`` naming ``what`` when it cannot be written as JSON."""
    try:
        return _encode(value)
    except (TypeError, ValueError, OverflowError) as exc:  # UnicodeEncodeError is a ValueError
        raise ValueError(f"{what} cannot be stored as JSON: {exc}") from None


class Effects:
    """What the event loop must do once the transaction has committed."""

    __slots__ = ("earliest_deadline", "finished", "queued")

    def __init__(self) -> None:
        self.finished: list[str] = []  # rollouts that became terminal: wake their waiters
        self.queued = False  # something entered the queue: wake long-polling dequeuers
        self.earliest_deadline: float | None = None  # nearest watchdog deadline written


class _RolloutRow:
    __slots__ = ("dirty", "key", "latest", "queue_pos", "rollout")

    def __init__(self, key: int | None, rollout: Rollout, queue_pos: int | None) -> None:
        self.key = key  # rollouts.id; None until inserted
        self.rollout = rollout
        self.queue_pos = queue_pos
        self.latest: _AttemptRow | Literal[False] | None = False  # False: not looked up yet
        self.dirty = key is None


class _AttemptRow:
    __slots__ = ("attempt", "dirty", "key", "next_span_seq", "owner")

    def __init__(self, key: int | None, attempt: Attempt, owner: _RolloutRow, next_span_seq: int) -> None:
        self.key = key
        self.attempt = attempt
        self.owner = owner
        self.next_span_seq = next_span_seq
        self.dirty = key is None


class _WorkerRow:
    __slots__ = ("dirty", "key", "worker")

    def __init__(self, key: int | None, worker: Worker) -> None:
        self.key = key
        self.worker = worker
        self.dirty = key is None


def _chunks(items: Sequence[str]) -> Iterable[Sequence[str]]:
    for i in range(0, len(items), _CHUNK):
        yield items[i : i + _CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _worker_key(worker_id: WorkerId) -> str:
    return _encode(worker_id).decode()


class Transaction:
    """One store call's view of the database (the caller has begun a write transaction).

    Rows are loaded once per transaction and cached by id, so the same rollout, attempt or worker
    is one object however it was reached; :meth:`flush` writes back the changed ones. Every
    public method is one store operation; it raises ``ValueError`` (and the caller rolls back)
    before or while changing anything.
    """

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self.effects = Effects()
        self._rollouts: dict[str, _RolloutRow] = {}
        self._attempts: dict[str, _AttemptRow] = {}
        self._workers: dict[str, _WorkerRow] = {}
        self._tail: int | None = None  # next queue position at the tail, once looked up
        self._spans_added = 0

    # ------------------------------------------------------------------ loading
    def _rollout_row(self, rollout_id: Any) -> _RolloutRow | None:
        if not isinstance(rollout_id, str):
            return None
        row = self._rollouts.get(rollout_id)
        if row is None:
            found = self.conn.execute(
                "SELECT id, queue_pos, data FROM rollouts WHERE rollout_id = ?", (rollout_id,)
            ).fetchone()
            if found is None:
                return None
            row = self._rollouts[rollout_id] = _RolloutRow(found[0], _decode_rollout(found[2]), found[1])
        return row

    def _require_rollout(self, rollout_id: Any) -> _RolloutRow:
        row = self._rollout_row(rollout_id)
        if row is None:
            raise ValueError(f"rollout {rollout_id!r} not found")
        return row

    def _attempt_from(self, found: tuple[Any, ...], owner: _RolloutRow) -> _AttemptRow:
        key, next_seq, data = found
        attempt = _decode_attempt(data)
        cached = self._attempts.get(attempt.attempt_id)
        if cached is not None:
            return cached
        row = self._attempts[attempt.attempt_id] = _AttemptRow(key, attempt, owner, next_seq)
        return row

    def _latest(self, owner: _RolloutRow) -> _AttemptRow | None:
        if owner.latest is False:
            found = None
            if owner.key is not None:
                found = self.conn.execute(
                    "SELECT id, next_span_seq, data FROM attempts WHERE rollout = ? "
                    "ORDER BY sequence_id DESC LIMIT 1",
                    (owner.key,),
                ).fetchone()
            owner.latest = None if found is None else self._attempt_from(found, owner)
        return owner.latest

    def _attempts_of(self, owner: _RolloutRow) -> list[_AttemptRow]:
        self.flush()
        if owner.key is None:
            return []
        rows = self.conn.execute(
            "SELECT id, next_span_seq, data FROM attempts WHERE rollout = ? ORDER BY sequence_id",
            (owner.key,),
        ).fetchall()
        return [self._attempt_from(found, owner) for found in rows]

    def _attempt_row(self, rollout_id: Any, attempt_id: Any) -> _AttemptRow:
        """The attempt (``"latest"`` allowed) of a rollout; ``ValueError`` naming what is missing."""
        owner = self._require_rollout(rollout_id)
        if attempt_id == "latest":
            latest = self._latest(owner)
            if latest is None:
                raise ValueError(f"rollout {rollout_id!r} has no attempts")
            return latest
        row = self._attempts.get(attempt_id) if isinstance(attempt_id, str) else None
        if row is None and isinstance(attempt_id, str) and owner.key is not None:
            found = self.conn.execute(
                "SELECT id, next_span_seq, data FROM attempts WHERE attempt_id = ? AND rollout = ?",
                (attempt_id, owner.key),
            ).fetchone()
            if found is not None:
                row = self._attempt_from(found, owner)
        if row is None or row.owner is not owner:
            raise ValueError(f"attempt {attempt_id!r} not found in rollout {rollout_id!r}")
        return row

    def _worker_row(self, worker_id: WorkerId, create: bool = True) -> _WorkerRow | None:
        wkey = _worker_key(worker_id)
        row = self._workers.get(wkey)
        if row is None:
            found = self.conn.execute("SELECT id, data FROM workers WHERE worker_key = ?", (wkey,)).fetchone()
            if found is not None:
                row = _WorkerRow(found[0], _decode_worker(found[1]))
            elif create:
                row = _WorkerRow(None, Worker(worker_id=worker_id))
            else:
                return None
            self._workers[wkey] = row
        return row

    def _setting(self, key: str) -> Any:
        found = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if found is None else found[0]

    def _set_setting(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    # ------------------------------------------------------------------ writing back
    def _deadline(self, row: _AttemptRow) -> tuple[AttemptStatus, float | None]:
        """The status the attempt gets if nothing happens, and when (``None``: never)."""
        attempt = row.attempt
        if attempt.status not in _LIVE:
            return "timeout", None
        config = row.owner.rollout.config
        verdict: AttemptStatus = "timeout"
        due: float | None = None
        if config.timeout_seconds is not None:
            due = attempt.start_time + config.timeout_seconds
        if config.unresponsive_seconds is not None:
            silent_due = (attempt.last_heartbeat_time or attempt.start_time) + config.unresponsive_seconds
            if due is None or silent_due < due:
                verdict, due = "unresponsive", silent_due
        return verdict, due

    def flush(self) -> None:
        """Write every changed row (rollouts first: new attempts need their rollout's id)."""
        execute = self.conn.execute
        for rid, r in self._rollouts.items():
            if not r.dirty:
                continue
            data = encode_json(r.rollout, f"rollout {rid}")
            if r.key is None:
                cursor = execute(
                    "INSERT INTO rollouts (rollout_id, status, queue_pos, data) VALUES (?, ?, ?, ?)",
                    (rid, r.rollout.status, r.queue_pos, data),
                )
                r.key = cursor.lastrowid
            else:
                execute(
                    "UPDATE rollouts SET status = ?, queue_pos = ?, data = ? WHERE id = ?",
                    (r.rollout.status, r.queue_pos, data, r.key),
                )
            r.dirty = False
        effects = self.effects
        for aid, a in self._attempts.items():
            if not a.dirty:
                continue
            data = encode_json(a.attempt, f"attempt {aid}")
            _, due = self._deadline(a)
            if due is not None and (effects.earliest_deadline is None or due < effects.earliest_deadline):
                effects.earliest_deadline = due
            if a.key is None:
                cursor = execute(
                    "INSERT INTO attempts (attempt_id, rollout, sequence_id, status, deadline, "
                    "next_span_seq, data) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (aid, a.owner.key, a.attempt.sequence_id, a.attempt.status, due, a.next_span_seq, data),
                )
                a.key = cursor.lastrowid
            else:
                execute(
                    "UPDATE attempts SET status = ?, deadline = ?, next_span_seq = ?, data = ? WHERE id = ?",
                    (a.attempt.status, due, a.next_span_seq, data, a.key),
                )
            a.dirty = False
        for wkey, w in self._workers.items():
            if not w.dirty:
                continue
            data = encode_json(w.worker, f"worker {w.worker.worker_id!r}")
            if w.key is None:
                cursor = execute(
                    "INSERT INTO workers (worker_key, status, data) VALUES (?, ?, ?)",
                    (wkey, w.worker.status, data),
                )
                w.key = cursor.lastrowid
            else:
                execute(
                    "UPDATE workers SET status = ?, data = ? WHERE id = ?", (w.worker.status, data, w.key)
                )
            w.dirty = False
        if self._spans_added:  # may be negative (an unclaimed attempt's spans)
            execute("UPDATE settings SET value = value + ? WHERE key = 'total_spans'", (self._spans_added,))
            self._spans_added = 0

    # ------------------------------------------------------------------ the queue
    def _queue_tail(self) -> int:
        if self._tail is None:
            self.flush()
            found = self.conn.execute(
                "SELECT max(queue_pos) FROM rollouts WHERE queue_pos IS NOT NULL"
            ).fetchone()
            self._tail = (found[0] or 0) + 1
        pos = self._tail
        self._tail += 1
        return pos

    def _push(self, row: _RolloutRow) -> None:
        row.queue_pos = self._queue_tail()
        row.dirty = True
        self.effects.queued = True

    def _pop_queued(self) -> _RolloutRow | None:
        while True:
            self.flush()
            found = self.conn.execute(
                "SELECT rollout_id FROM rollouts WHERE queue_pos IS NOT NULL ORDER BY queue_pos LIMIT 1"
            ).fetchone()
            if found is None:
                return None
            row = self._require_rollout(found[0])
            row.queue_pos = None
            row.dirty = True
            if row.rollout.status in QUEUE_STATUSES:
                return row
            # defensive: a queued row in another status leaves the queue and is skipped

    # ------------------------------------------------------------------ state transitions
    def _set_rollout_status(self, row: _RolloutRow, status: RolloutStatus, now: float) -> None:
        rollout = row.rollout
        if rollout.status == status:
            return
        rollout.status = status
        row.dirty = True
        if status in TERMINAL_ROLLOUT_STATUSES:
            rollout.end_time = now
            self.effects.finished.append(rollout.rollout_id)
        else:
            rollout.end_time = None
            if status in QUEUE_STATUSES:
                if row.queue_pos is None:
                    self._push(row)
                return
        row.queue_pos = None

    def _set_attempt_status(self, row: _AttemptRow, status: AttemptStatus, now: float) -> None:
        attempt = row.attempt
        previous = attempt.status
        attempt.status = status
        row.dirty = True
        if status in TERMINAL_ATTEMPT_STATUSES:
            attempt.end_time = attempt.end_time if previous == status else now
        else:
            attempt.end_time = None
        self._sync_worker(row, now)
        owner = row.owner
        if self._latest(owner) is row:
            if owner.rollout.status in TERMINAL_ROLLOUT_STATUSES:
                if status != previous:
                    logger.info(
                        "attempt %s of rollout %s is now %r; the rollout stays %r (terminal)",
                        attempt.attempt_id,
                        attempt.rollout_id,
                        status,
                        owner.rollout.status,
                    )
            else:
                self._set_rollout_status(owner, rollout_status_for(attempt, owner.rollout.config), now)

    def _is_dead(self, row: _AttemptRow) -> bool:
        """True when the watchdog ended the attempt for good: ``timeout``, or ``unresponsive`` with
        a newer attempt or a terminal rollout. A dead attempt's verdict is final."""
        status = row.attempt.status
        if status == "timeout":
            return True
        if status != "unresponsive":
            return False
        return self._latest(row.owner) is not row or row.owner.rollout.status in TERMINAL_ROLLOUT_STATUSES

    def _new_attempt(self, owner: _RolloutRow, worker_id: WorkerId | None, now: float) -> _AttemptRow:
        latest = self._latest(owner)
        attempt = Attempt(
            rollout_id=owner.rollout.rollout_id,
            attempt_id=new_id("at"),
            sequence_id=(latest.attempt.sequence_id if latest is not None else 0) + 1,
            start_time=now,
            worker_id=worker_id,
        )
        row = self._attempts[attempt.attempt_id] = _AttemptRow(None, attempt, owner, 1)
        owner.latest = row
        owner.queue_pos = None
        owner.rollout.status = "preparing"
        owner.rollout.end_time = None
        owner.dirty = True
        if worker_id is not None:
            self._sync_worker(row, now, dequeued=True)
        return row

    def _sync_worker(self, row: _AttemptRow, now: float, dequeued: bool = False) -> None:
        attempt = row.attempt
        if attempt.worker_id is None:
            return
        wrow = self._worker_row(attempt.worker_id)
        assert wrow is not None
        worker = wrow.worker
        wrow.dirty = True
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

    def _heartbeat(self, row: _AttemptRow, now: float) -> None:
        row.attempt.last_heartbeat_time = now
        row.dirty = True
        status = row.attempt.status
        if status == "preparing" or (status == "unresponsive" and not self._is_dead(row)):
            self._set_attempt_status(row, "running", now)

    def _attempted(self, owner: _RolloutRow, row: _AttemptRow) -> AttemptedRollout:
        fields = msgspec.structs.asdict(owner.rollout)
        return AttemptedRollout(**fields, attempt=row.attempt)

    # ------------------------------------------------------------------ the watchdog
    def settle(self) -> None:
        """Give every live attempt past its deadline its verdict (``timeout`` / ``unresponsive``),
        dated at the deadline itself, with the usual consequences (retry or fail the rollout)."""
        now = self.now
        due_rows = self.conn.execute(
            "SELECT a.id, a.next_span_seq, a.data, r.rollout_id FROM attempts a JOIN rollouts r "
            "ON r.id = a.rollout WHERE a.deadline <= ? ORDER BY a.deadline",
            (now,),
        ).fetchall()
        for key, next_seq, data, rollout_id in due_rows:
            owner = self._require_rollout(rollout_id)
            row = self._attempt_from((key, next_seq, data), owner)
            verdict, due = self._deadline(row)
            if due is None:
                row.dirty = True  # clears a stale deadline
            elif due <= now:
                self._set_attempt_status(row, verdict, due)
            else:
                row.dirty = True  # rewrites the deadline
        if due_rows:
            self.flush()

    def next_deadline(self) -> float | None:
        found = self.conn.execute("SELECT min(deadline) FROM attempts WHERE deadline IS NOT NULL").fetchone()
        return None if found is None else found[0]

    # ------------------------------------------------------------------ rollouts and the queue
    def _check_rollout_args(
        self, mode: Any, resources_id: Any, config: Any, metadata: Any, input: Any | Unset = UNSET
    ) -> RolloutConfig:
        if mode is not None and mode not in _MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; expected one of {sorted(_MODES)}")
        if resources_id is not None and not self._resources_exist(resources_id):
            raise ValueError(f"resources {resources_id!r} not found")
        if metadata is not None:
            if not isinstance(metadata, dict):
                raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
            encode_json(metadata, "rollout metadata")
        if not isinstance(input, Unset):
            encode_json(input, "rollout input")
        return _config_copy(config)

    def _resources_exist(self, resources_id: Any) -> bool:
        if not isinstance(resources_id, str):
            return False
        found = self.conn.execute(
            "SELECT 1 FROM resources WHERE resources_id = ?", (resources_id,)
        ).fetchone()
        return found is not None

    def _create_rollout(self, request: EnqueueRolloutRequest, config: RolloutConfig) -> _RolloutRow:
        resources_id = request.resources_id
        if resources_id is None:
            resources_id = self._setting("latest_resources_id")
        rollout = Rollout(
            rollout_id=new_id("ro"),
            input=request.input,
            start_time=self.now,
            mode=request.mode,  # type: ignore[arg-type]  # checked by _check_rollout_args
            resources_id=resources_id,
            config=config,
            metadata=dict(request.metadata) if request.metadata else {},
        )
        row = self._rollouts[rollout.rollout_id] = _RolloutRow(None, rollout, None)
        row.latest = None
        return row

    def enqueue(self, requests: Sequence[EnqueueRolloutRequest]) -> list[Rollout]:
        configs = [
            self._check_rollout_args(r.mode, r.resources_id, r.config, r.metadata, r.input) for r in requests
        ]
        out = []
        for request, config in zip(requests, configs, strict=True):
            row = self._create_rollout(request, config)
            self._push(row)
            out.append(row.rollout)
        return out

    def start_rollout(self, request: EnqueueRolloutRequest, worker_id: WorkerId | None) -> AttemptedRollout:
        check_worker_id(worker_id)
        config = self._check_rollout_args(
            request.mode, request.resources_id, request.config, request.metadata, request.input
        )
        owner = self._create_rollout(request, config)
        return self._attempted(owner, self._new_attempt(owner, worker_id, self.now))

    def dequeue(self, worker_id: WorkerId | None, limit: int, register_idle: bool) -> list[AttemptedRollout]:
        check_worker_id(worker_id)
        out = []
        for _ in range(limit):
            owner = self._pop_queued()
            if owner is None:
                break
            out.append(self._attempted(owner, self._new_attempt(owner, worker_id, self.now)))
        if not out and register_idle and worker_id is not None:
            wrow = self._worker_row(worker_id)
            assert wrow is not None
            wrow.worker.last_dequeue_time = self.now
            if wrow.worker.current_attempt_id is None:
                wrow.worker.status = "idle"
            wrow.dirty = True
        return out

    def start_attempt(self, rollout_id: str, worker_id: WorkerId | None) -> AttemptedRollout:
        check_worker_id(worker_id)
        owner = self._require_rollout(rollout_id)
        return self._attempted(owner, self._new_attempt(owner, worker_id, self.now))

    def unclaim(self, rollout_id: str, attempt_id: str) -> bool:
        row = self._attempt_row(rollout_id, attempt_id)
        owner = row.owner
        if (
            row.attempt.status != "preparing"
            or owner.rollout.status != "preparing"
            or self._latest(owner) is not row
        ):
            return False
        self.flush()
        removed = self.conn.execute("DELETE FROM spans WHERE attempt = ?", (row.key,)).rowcount
        self._spans_added -= max(removed, 0)
        self.conn.execute("DELETE FROM attempts WHERE id = ?", (row.key,))
        del self._attempts[row.attempt.attempt_id]
        owner.latest = False
        worker_id = row.attempt.worker_id
        if worker_id is not None:
            wrow = self._worker_row(worker_id, create=False)
            if wrow is not None:
                self._release_worker(wrow.worker, "idle", self.now, row.attempt.attempt_id)
                wrow.dirty = True
        owner.rollout.status = "queuing" if row.attempt.sequence_id == 1 else "requeuing"
        found = self.conn.execute(
            "SELECT min(queue_pos) FROM rollouts WHERE queue_pos IS NOT NULL"
        ).fetchone()
        owner.queue_pos = (found[0] if found[0] is not None else 1) - 1  # the head of the queue
        owner.dirty = True
        self.effects.queued = True
        return True

    def update_rollout(
        self,
        rollout_id: str,
        input: Any | Unset,
        mode: RolloutMode | Unset | None,
        resources_id: str | Unset | None,
        status: RolloutStatus | Unset,
        config: RolloutConfig | Unset,
        metadata: dict[str, Any] | Unset | None,
    ) -> Rollout:
        owner = self._require_rollout(rollout_id)
        # Validate everything first: a failing call changes nothing.
        if not isinstance(status, Unset) and status not in ROLLOUT_STATUSES:
            raise ValueError(f"unknown rollout status {status!r}; expected one of {sorted(ROLLOUT_STATUSES)}")
        self._check_rollout_args(
            None if isinstance(mode, Unset) else mode,
            None if isinstance(resources_id, Unset) else resources_id,
            None,
            None if isinstance(metadata, Unset) else metadata,
            input,
        )
        new_config = None if isinstance(config, Unset) else _config_copy(config)
        rollout = owner.rollout
        if not isinstance(input, Unset):
            rollout.input = input
        if not isinstance(mode, Unset):
            rollout.mode = mode
        if not isinstance(resources_id, Unset):
            rollout.resources_id = resources_id
        if new_config is not None:
            rollout.config = new_config
            for row in self._attempts_of(owner):
                if row.attempt.status in _LIVE:
                    row.dirty = True  # the new limits apply to attempts already running
        if not isinstance(metadata, Unset):
            new_metadata = dict(metadata) if metadata else {}
            stays_terminal = rollout.status in TERMINAL_ROLLOUT_STATUSES and (
                isinstance(status, Unset) or status in TERMINAL_ROLLOUT_STATUSES
            )
            if stays_terminal and new_metadata.get(_REWARD_KEY, UNSET) != rollout.metadata.get(
                _REWARD_KEY, UNSET
            ):
                logger.warning(
                    "rollout %s is %s: its reward stays %r (a late write of %r is ignored)",
                    rollout_id,
                    rollout.status,
                    rollout.metadata.get(_REWARD_KEY),
                    new_metadata.get(_REWARD_KEY),
                )
                if _REWARD_KEY in rollout.metadata:
                    new_metadata[_REWARD_KEY] = rollout.metadata[_REWARD_KEY]
                else:
                    new_metadata.pop(_REWARD_KEY, None)
            rollout.metadata = new_metadata
        owner.dirty = True
        if not isinstance(status, Unset):
            self._set_rollout_status(owner, status, self.now)
        return rollout

    def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str,
        status: AttemptStatus | Unset,
        worker_id: WorkerId | Unset | None,
        last_heartbeat_time: float | Unset,
        metadata: dict[str, Any] | Unset | None,
    ) -> Attempt:
        row = self._attempt_row(rollout_id, attempt_id)
        if not isinstance(status, Unset) and status not in ATTEMPT_STATUSES:
            raise ValueError(f"unknown attempt status {status!r}; expected one of {sorted(ATTEMPT_STATUSES)}")
        if not isinstance(metadata, (Unset, dict)) and metadata is not None:
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if isinstance(metadata, dict):
            encode_json(metadata, "attempt metadata")
        if not isinstance(last_heartbeat_time, (Unset, int, float)) or isinstance(last_heartbeat_time, bool):
            raise ValueError(f"last_heartbeat_time must be a number, got {last_heartbeat_time!r}")
        if not isinstance(worker_id, Unset):
            check_worker_id(worker_id)
        attempt = row.attempt
        if not isinstance(status, Unset) and status != attempt.status and self._is_dead(row):
            logger.warning(
                "attempt %s of rollout %s ended %r (watchdog); a late %r is ignored",
                attempt.attempt_id,
                attempt.rollout_id,
                attempt.status,
                status,
            )
            return attempt
        now = self.now
        if not isinstance(metadata, Unset):
            attempt.metadata = dict(metadata) if metadata else {}
        if not isinstance(worker_id, Unset) and worker_id != attempt.worker_id:
            attempt.worker_id = worker_id
            if attempt.status in _LIVE:
                self._sync_worker(row, now)
        if attempt.status in _LIVE or status in _LIVE:
            attempt.last_heartbeat_time = (
                now if isinstance(last_heartbeat_time, Unset) else float(last_heartbeat_time)
            )
        elif not isinstance(last_heartbeat_time, Unset):
            attempt.last_heartbeat_time = float(last_heartbeat_time)
        row.dirty = True
        if not isinstance(status, Unset):
            if self._latest(row.owner) is not row and status != attempt.status:
                logger.info(
                    "attempt %s is not the latest of rollout %s: its %r does not change the rollout",
                    attempt.attempt_id,
                    attempt.rollout_id,
                    status,
                )
            self._set_attempt_status(row, status, now)
        return attempt

    def check_wait(self, rollout_ids: Sequence[str]) -> tuple[dict[str, Rollout], set[str], float | None]:
        """For ``wait_for_rollouts``: the terminal ones among ``rollout_ids`` (by id), the ids still
        pending (known, not terminal) and the next watchdog deadline."""
        terminal: dict[str, Rollout] = {}
        pending: set[str] = set()
        ids = [rid for rid in dict.fromkeys(rollout_ids) if isinstance(rid, str)]
        for chunk in _chunks(ids):
            for rid, status, data in self.conn.execute(
                f"SELECT rollout_id, status, data FROM rollouts WHERE rollout_id IN ({_marks(len(chunk))})",
                tuple(chunk),
            ):
                if status in TERMINAL_ROLLOUT_STATUSES:
                    terminal[rid] = _decode_rollout(data)
                else:
                    pending.add(rid)
        return terminal, pending, self.next_deadline()

    def get_rollout(self, rollout_id: str) -> Rollout | None:
        row = self._rollout_row(rollout_id)
        return None if row is None else row.rollout

    def query_rollouts(
        self,
        status_in: Sequence[RolloutStatus] | None,
        rollout_id_in: Sequence[str] | None,
        rollout_id_contains: str | None = None,
        sort_by: str | None = None,
        sort_order: str = "asc",
        limit: int = -1,
        offset: int = 0,
    ) -> list[Rollout]:
        """``LightningStore.query_rollouts`` (arguments checked by the caller): filtering, order
        and paging in SQL (``LIMIT -1`` is SQLite's "no limit"); times are read from ``data``."""
        if rollout_id_in is not None:
            ids = [rid for rid in dict.fromkeys(rollout_id_in) if isinstance(rid, str)]
            found: dict[str, Rollout] = {}
            for chunk in _chunks(ids):
                for rid, data in self.conn.execute(
                    f"SELECT rollout_id, data FROM rollouts WHERE rollout_id IN ({_marks(len(chunk))})",
                    tuple(chunk),
                ):
                    found[rid] = _decode_rollout(data)
            return select_rollouts(
                (found[rid] for rid in ids if rid in found),
                status_in=status_in,
                rollout_id_contains=rollout_id_contains,
                sort_by=sort_by,
                sort_order=sort_order,
                limit=limit,
                offset=offset,
            )
        where: list[str] = []
        params: list[Any] = []
        if status_in is not None:
            statuses = tuple(dict.fromkeys(s for s in status_in if isinstance(s, str)))
            where.append(f"status IN ({_marks(len(statuses))})")
            params += statuses
        if rollout_id_contains is not None:
            where.append("instr(rollout_id, ?) > 0")
            params.append(rollout_id_contains)
        direction = "DESC" if sort_order == "desc" else "ASC"
        if sort_by is None:
            order = "id"  # creation order, whatever sort_order says (as in every store)
        elif sort_by in _SORT_COLUMNS:
            order = f"{sort_by} {direction}, id {direction}"
        else:  # a time, kept in data only; rollouts without one (end_time: unfinished) come last
            value = f"json_extract(CAST(data AS TEXT), '$.{_SORT_TIMES[sort_by]}')"
            order = f"{value} IS NULL, {value} {direction}, id {direction}"
        sql = "SELECT data FROM rollouts"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {order} LIMIT ? OFFSET ?"
        cursor = self.conn.execute(sql, (*params, limit, offset))
        return [_decode_rollout(data) for (data,) in cursor]

    def query_attempts(self, rollout_id: str) -> list[Attempt]:
        owner = self._rollout_row(rollout_id)
        return [] if owner is None else [row.attempt for row in self._attempts_of(owner)]

    def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        owner = self._rollout_row(rollout_id)
        latest = None if owner is None else self._latest(owner)
        return None if latest is None else latest.attempt

    # ------------------------------------------------------------------ spans
    def _check_span(self, span: Any) -> _AttemptRow:
        if not isinstance(span, Span):
            raise ValueError(f"expected a Span, got {type(span).__name__}")
        row = self._attempt_row(span.rollout_id, span.attempt_id)
        if isinstance(span.sequence_id, bool) or not isinstance(span.sequence_id, int):
            raise ValueError(f"span sequence_id must be an integer, got {span.sequence_id!r}")
        if type(span.attributes) is not dict or type(span.events) is not list:
            raise ValueError("span attributes must be a dict and events a list")
        return row

    def add_spans(self, spans: Sequence[Span]) -> list[Span]:
        rows = [self._check_span(span) for span in spans]  # all checked first: nothing half-applied
        encoded = [encode_json(span, f"span {span.span_id!r}") for span in spans]
        now = self.now
        self.flush()  # attempts made in this transaction get their ids
        params = []
        for span, row, data in zip(spans, rows, encoded, strict=True):
            if span.sequence_id == AUTO_SEQUENCE_ID:  # the store numbers it (OTLP, the runner's tracer)
                span.sequence_id = row.next_span_seq
                data = encode_json(span, f"span {span.span_id!r}")  # encoded once already: cannot fail
            params.append((row.key, span.sequence_id, data))
            if span.sequence_id >= row.next_span_seq:
                row.next_span_seq = span.sequence_id + 1
            self._heartbeat(row, now)
        self.conn.executemany("INSERT INTO spans (attempt, sequence_id, data) VALUES (?, ?, ?)", params)
        self._spans_added += len(params)
        return list(spans)

    def query_spans(self, rollout_id: str, attempt_id: str | None) -> list[Span]:
        owner = self._rollout_row(rollout_id)
        if owner is None or owner.key is None:
            return []
        if attempt_id is None:
            cursor = self.conn.execute(
                "SELECT s.data FROM spans s JOIN attempts a ON a.id = s.attempt WHERE a.rollout = ? "
                "ORDER BY a.sequence_id, s.sequence_id, s.id",
                (owner.key,),
            )
        else:
            if attempt_id == "latest":
                row = self._latest(owner)
            else:
                try:
                    row = self._attempt_row(rollout_id, attempt_id)
                except ValueError:
                    row = None
            if row is None or row.key is None:
                return []
            cursor = self.conn.execute(
                "SELECT data FROM spans WHERE attempt = ? ORDER BY sequence_id, id", (row.key,)
            )
        return [_decode_span(data) for (data,) in cursor]

    def next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        row = self._attempt_row(rollout_id, attempt_id)
        seq = row.next_span_seq
        row.next_span_seq = seq + 1
        row.dirty = True
        return seq

    # ------------------------------------------------------------------ resources
    def add_resources(self, resources: Mapping[str, Any]) -> ResourcesUpdate:
        update = ResourcesUpdate(new_id("rs"), as_resources(resources), self.now, self.now)
        data = encode_json(update, "resources")
        self.conn.execute(
            "INSERT INTO resources (resources_id, data) VALUES (?, ?)", (update.resources_id, data)
        )
        self._set_setting("latest_resources_id", update.resources_id)
        return update

    def update_resources(self, resources_id: str, resources: Mapping[str, Any]) -> ResourcesUpdate:
        current = self.get_resources(resources_id)
        if current is None:
            raise ValueError(f"resources {resources_id!r} not found")
        current.resources = as_resources(resources)
        current.update_time = self.now
        current.version += 1
        data = encode_json(current, "resources")
        self.conn.execute("UPDATE resources SET data = ? WHERE resources_id = ?", (data, resources_id))
        self._set_setting("latest_resources_id", resources_id)
        return current

    def get_resources(self, resources_id: Any) -> ResourcesUpdate | None:
        if not isinstance(resources_id, str):
            return None
        found = self.conn.execute(
            "SELECT data FROM resources WHERE resources_id = ?", (resources_id,)
        ).fetchone()
        return None if found is None else _decode_resources(found[0])

    def get_latest_resources(self) -> ResourcesUpdate | None:
        latest = self._setting("latest_resources_id")
        return None if latest is None else self.get_resources(latest)

    def query_resources(self) -> list[ResourcesUpdate]:
        return [
            _decode_resources(data) for (data,) in self.conn.execute("SELECT data FROM resources ORDER BY id")
        ]

    # ------------------------------------------------------------------ workers
    def query_workers(self, status_in: Sequence[WorkerStatus] | None) -> list[Worker]:
        if status_in is None:
            cursor = self.conn.execute("SELECT data FROM workers ORDER BY id")
        else:
            statuses = tuple(s for s in set(status_in) if isinstance(s, str))
            cursor = self.conn.execute(
                f"SELECT data FROM workers WHERE status IN ({_marks(len(statuses))}) ORDER BY id", statuses
            )
        return [_decode_worker(data) for (data,) in cursor]

    def get_worker(self, worker_id: WorkerId) -> Worker | None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, (str, int)):
            return None
        row = self._worker_row(worker_id, create=False)
        return None if row is None else row.worker

    def update_worker(self, worker_id: WorkerId, heartbeat_stats: dict[str, Any] | Unset) -> Worker:
        if isinstance(worker_id, bool) or not isinstance(worker_id, (str, int)):
            raise ValueError(f"worker_id must be a string or an integer, got {worker_id!r}")
        if not isinstance(heartbeat_stats, (Unset, dict)):
            raise ValueError(f"heartbeat_stats must be a dict, got {type(heartbeat_stats).__name__}")
        if isinstance(heartbeat_stats, dict):
            encode_json(heartbeat_stats, "heartbeat_stats")
        now = self.now
        wrow = self._worker_row(worker_id)
        assert wrow is not None
        worker = wrow.worker
        worker.last_heartbeat_time = now
        if not isinstance(heartbeat_stats, Unset):
            worker.heartbeat_stats = dict(heartbeat_stats)
        wrow.dirty = True
        current = worker.current_attempt_id
        if current is not None and worker.current_rollout_id is not None:
            try:
                row = self._attempt_row(worker.current_rollout_id, current)
            except ValueError:
                row = None
            if row is not None and row.attempt.status in _LIVE:
                row.attempt.last_heartbeat_time = now
                row.dirty = True
        return worker

    # ------------------------------------------------------------------ misc
    def statistics(self) -> dict[str, Any]:
        execute = self.conn.execute
        rollouts: dict[str, int] = dict.fromkeys(sorted(ROLLOUT_STATUSES), 0)
        for status, n in execute("SELECT status, count(*) FROM rollouts GROUP BY status"):
            rollouts[status] = n
        attempts: dict[str, int] = dict.fromkeys(sorted(ATTEMPT_STATUSES), 0)
        for status, n in execute("SELECT status, count(*) FROM attempts GROUP BY status"):
            attempts[status] = n
        workers: dict[str, int] = {"busy": 0, "idle": 0, "unknown": 0}
        for status, n in execute("SELECT status, count(*) FROM workers GROUP BY status"):
            workers[status] = n
        return {
            "total_rollouts": sum(rollouts.values()),
            "total_attempts": sum(attempts.values()),
            "total_spans": int(self._setting("total_spans") or 0),
            "total_resources": execute("SELECT count(*) FROM resources").fetchone()[0],
            "queue_length": execute("SELECT count(*) FROM rollouts WHERE queue_pos IS NOT NULL").fetchone()[
                0
            ],
            "rollouts": rollouts,
            "attempts": attempts,
            "workers": workers,
        }
