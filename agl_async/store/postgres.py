"""``PostgresLightningStore``: the store in a PostgreSQL database, shared by any number of processes.

Every call is one PostgreSQL transaction: when it returns, its change is committed (durable as
far as the server's settings make commits durable) and visible to every process on the database;
when the calling process dies, nothing of a call that had not returned is left half-applied.

asyncio only
    The driver, asyncpg, runs on asyncio: use the store from an asyncio event loop (anyio's
    default backend). On trio every call raises ``RuntimeError`` saying so.

Sharing one database
    * a dequeue claims with ``SELECT … FOR UPDATE SKIP LOCKED`` in the statement that creates
      the attempt, so each queued rollout is claimed by exactly one dequeue across all processes;
    * every other change of a rollout or its attempts first locks the rollout's row, so the
      status rules (retries, the latest attempt driving the rollout) see one history;
    * span sequence ids come from an ``UPDATE … RETURNING`` of the attempt's counter (never
      issued twice);
    * wake-ups cross processes by ``LISTEN/NOTIFY`` and the watchdog runs in one process per
      database (see :mod:`agl_async.store._postgres_events`).

Data integrity (binding for every store; the same rules as the SQLite store)
    A rollout in a terminal status is never changed by its attempts again; only an explicit
    ``update_rollout(status=…)`` or ``start_attempt`` (an operator's decision) reopens it, and a
    terminal rollout keeps its ``metadata["reward"]`` when a late ``update_rollout`` tries to
    change it. An attempt the watchdog ended for good — ``timeout``, or ``unresponsive`` once its
    rollout moved on (a newer attempt, a terminal status) — keeps its verdict: a late result is
    ignored and logged. An ``unresponsive`` attempt that is still the latest of an unfinished
    rollout comes back with its next span, heartbeat-with-status or result. Inputs, metadata,
    resources, heartbeat stats and spans that cannot be stored as JSON (a lone surrogate, NaN in
    what is not a span) raise ``ValueError`` before anything is written.

Connections
    A pool of ``pool_size`` connections serves the calls, plus one connection listening for
    wake-ups and one contending for the watchdog. A connection lost mid-call is replaced and the
    call retried (a transaction that failed before its commit is simply run again; one lost
    *during* its commit is first checked for whether it landed) for up to ``reconnect_timeout``
    seconds, after which the call raises ``ConnectionError``.

Cancellation
    Cancelling a call never leaves it half-applied: the transaction runs shielded from
    cancellation (bounded by ``command_timeout``) and a claim that committed is returned, never
    lost. Cancelling the waiting part of ``wait_for_rollouts`` or a long-polling
    ``dequeue_rollout`` changes nothing.

Lifecycle and pickling
    The store connects on first use, in the event loop that uses it; ``await close()`` (or
    ``async with``) closes its connections and stops its background tasks. It pickles as its
    settings and reconnects lazily in the new process, so it can be handed to child processes
    (every process then works on the same database).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import msgspec

from .._net import is_loopback
from .._validate import (
    as_config,
    as_enqueue_requests,
    as_resources,
    check_json_value,
    check_limit,
    check_seconds,
    check_worker_id,
)
from ..types import (
    ATTEMPT_STATUSES,
    AUTO_SEQUENCE_ID,
    QUEUE_STATUSES,
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
from . import _json
from . import _postgres_sql as sql
from ._postgres_rows import (
    AttemptRow,
    RolloutRow,
    attempt_model,
    attempted_model,
    resources_model,
    rollout_model,
    wkey,
    worker_model,
)
from ._postgres_schema import NOTIFY_CHANNEL
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

if TYPE_CHECKING:
    from ._postgres_events import Listener, QueueWaiter, Wakeups, Watchdog

__all__ = ["PostgresLightningStore"]

logger = logging.getLogger("agl_async")

T = TypeVar("T")

_LIVE = frozenset({"preparing", "running"})
_MODES = frozenset({"train", "val", "test"})
#: The rollout metadata key holding the reward (what the runner loop writes).
REWARD_KEY = "reward"
#: How many due attempts the watchdog ends per round.
_SETTLE_BATCH = 256
_span_decoder = msgspec.json.Decoder(Span)


class _Tx:
    """One transaction's connection and clock reading, and what it has changed so far: attempts
    and rollouts to save, worker changes, notifications. :meth:`flush` writes it all in one
    statement just before the commit (one round trip instead of one per row)."""

    __slots__ = ("attempts", "conn", "deadline", "now", "queued", "rollouts", "terminal", "worker_ops")

    def __init__(self, conn: Any, now: float) -> None:
        self.conn = conn
        self.now = now
        self.terminal: list[str] = []
        self.queued = 0  # rollouts that entered the queue
        self.deadline: float | None = None
        self.attempts: dict[str, AttemptRow] = {}
        self.rollouts: dict[str, RolloutRow] = {}
        #: ("busy", key, now, rollout_id, attempt_id, last_dequeue)
        #: or ("release", key, status, now, attempt_id)
        self.worker_ops: list[tuple[Any, ...]] = []

    def save_attempt(self, a: AttemptRow) -> None:
        """Stage an attempt's row; its deadline is recomputed (and announced when sooner)."""
        before = a.deadline
        a.deadline = a.verdict()[1] if a.status in _LIVE else None
        if a.deadline is not None and (before is None or a.deadline < before):
            if self.deadline is None or a.deadline < self.deadline:
                self.deadline = a.deadline
        self.attempts[a.attempt_id] = a

    def save_rollout(self, r: RolloutRow) -> None:
        """Stage a rollout's status (and queue move) when it changed."""
        if r.dirty:
            self.rollouts[r.rollout_id] = r

    def payloads(self) -> list[str]:
        from ._postgres_events import notify_payloads

        payloads = notify_payloads(self.terminal)
        if self.queued:
            payloads.append(f"q {self.queued}")
        if self.deadline is not None:
            payloads.append(f"d {self.deadline!r}")
        return payloads

    async def flush(self) -> None:
        ops = self.worker_ops
        keys = [op[1] for op in ops]
        if len(set(keys)) < len(keys):  # one worker changed twice: in order, one at a time
            for op in ops:
                await self.conn.execute(sql.FLUSH, *_flush_args([], [], [op], NOTIFY_CHANNEL, []))
            ops = []
        payloads = self.payloads()
        if self.attempts or self.rollouts or ops or payloads:
            args = _flush_args(
                list(self.attempts.values()), list(self.rollouts.values()), ops, NOTIFY_CHANNEL, payloads
            )
            await self.conn.execute(sql.FLUSH, *args)
        for r in self.rollouts.values():
            r.dirty, r.queue_move = False, "keep"
        self.attempts.clear()
        self.rollouts.clear()
        self.worker_ops = []
        self.terminal, self.queued, self.deadline = [], 0, None


def _flush_args(
    attempts: list[AttemptRow],
    rollouts: list[RolloutRow],
    ops: list[tuple[Any, ...]],
    channel: str,
    payloads: list[str],
) -> list[Any]:
    busy = [op for op in ops if op[0] == "busy"]
    release = [op for op in ops if op[0] == "release"]
    return [
        [a.attempt_id for a in attempts],
        [a.status for a in attempts],
        [a.end_time for a in attempts],
        [None if a.worker_id is None else wkey(a.worker_id) for a in attempts],
        [a.last_heartbeat_time for a in attempts],
        [a.metadata for a in attempts],
        [a.timeout_s for a in attempts],
        [a.unresponsive_s for a in attempts],
        [a.deadline for a in attempts],
        [r.rollout_id for r in rollouts],
        [r.status for r in rollouts],
        [r.end_time for r in rollouts],
        [r.queue_move for r in rollouts],
        [op[1] for op in busy],
        [op[2] for op in busy],
        [op[3] for op in busy],
        [op[4] for op in busy],
        [op[5] for op in busy],
        [op[1] for op in release],
        [op[2] for op in release],
        [op[3] for op in release],
        [op[4] for op in release],
        channel,
        payloads,
    ]


class _Runtime:
    """What an open store holds in one event loop: the pool and its background tasks."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pool: Any = None
        self.wakeups: Wakeups | None = None
        self.listener: Listener | None = None
        self.watchdog: Watchdog | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.clock_offset = 0.0
        #: A lost, refused or failing connection (retried).
        self.errors: tuple[type[BaseException], ...] = ()
        #: A deadlock or serialisation failure (nothing was applied: run again at once).
        self.conflicts: tuple[type[BaseException], ...] = ()


@dataclass(frozen=True)
class _Settings:
    dsn: str
    pool_size: int
    connect_timeout: float
    command_timeout: float
    reconnect_timeout: float
    watchdog: bool


class PostgresLightningStore(LightningStore):
    """A complete ``LightningStore`` in a PostgreSQL database (asyncio only: asyncpg).

    ``dsn``: ``postgresql://user:password@host:port/dbname`` (libpq parameters such as
    ``?sslmode=require`` or ``options=-csearch_path=agl`` work). ``pool_size``: connections
    serving calls (plus two: wake-ups and the watchdog). ``connect_timeout``: seconds for one
    connection attempt; ``command_timeout``: seconds one statement may take; ``reconnect_timeout``:
    how long a call keeps retrying a lost database before it raises ``ConnectionError``.
    ``watchdog=False``: this store never runs the database's watchdog (others still do).

    Nothing connects until the first call; the schema is created then, or checked (a database
    made by a newer release is refused). See the module docstring for the guarantees.
    """

    #: A claim is one committed statement that always reaches the caller (see Cancellation in the
    #: module docstring): a long poll may be abandoned at any moment without losing a rollout.
    long_poll_is_cancel_safe = True

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 60.0,
        reconnect_timeout: float = 30.0,
        watchdog: bool = True,
    ) -> None:
        if not isinstance(dsn, str) or urlsplit(dsn).scheme not in ("postgresql", "postgres"):
            raise ValueError(f"dsn must be a postgresql:// URL, got {_redact(dsn)!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be a positive integer, got {pool_size!r}")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("command_timeout", command_timeout),
            ("reconnect_timeout", reconnect_timeout),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self._settings = _Settings(
            dsn, pool_size, float(connect_timeout), float(command_timeout), float(reconnect_timeout), watchdog
        )
        self._runtime: _Runtime | None = None
        self._starting: asyncio.Lock | None = None

    @property
    def dsn(self) -> str:
        return self._settings.dsn

    @property
    def pool_size(self) -> int:
        return self._settings.pool_size

    def __repr__(self) -> str:
        s = self._settings
        return f"PostgresLightningStore({_redact(s.dsn)!r}, pool_size={s.pool_size})"

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self._settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._settings = state["settings"]
        self._runtime = None
        self._starting = None

    # ------------------------------------------------------------------ lifecycle
    async def open(self) -> None:
        """Connect now (create or check the schema, start listening and the watchdog candidate)
        instead of at the first call; ``ConnectionError`` when the database cannot be reached
        within ``reconnect_timeout``. ``async with store`` does it too."""
        await self._rt()

    async def __aenter__(self) -> PostgresLightningStore:
        await self._rt()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the wake-up listener and the watchdog candidate, close every connection (waits
        for calls in progress to give theirs back, up to 5 s). Calls made afterwards reconnect,
        as on first use."""
        rt, self._runtime = self._runtime, None
        self._starting = None
        if rt is None:
            return
        with anyio.CancelScope(shield=True):
            # Their connections go first: a query waiting there (the watchdog's lock) ends with
            # its connection, instead of asyncpg opening another one to cancel it.
            for background in (rt.listener, rt.watchdog):
                if background is not None:
                    background.abort()
            for _ in range(5):  # let the queries on them fail by themselves before cancelling
                await anyio.lowlevel.checkpoint()
            for task in rt.tasks:
                task.cancel()
            for task in rt.tasks:
                try:
                    await task
                except BaseException:
                    pass  # cancelled on purpose
            if rt.pool is not None:
                try:
                    with anyio.fail_after(5.0):
                        await rt.pool.close()
                except BaseException:
                    rt.pool.terminate()

    def _now(self) -> float:
        rt = self._runtime
        return time.time() + (rt.clock_offset if rt is not None else 0.0)

    async def _rt(self) -> _Runtime:
        rt = self._runtime
        try:
            loop = asyncio.get_running_loop()  # raises on trio
        except RuntimeError:
            loop = None
        if loop is None or asyncio.current_task() is None:
            raise RuntimeError(
                "PostgresLightningStore runs on asyncio (its driver, asyncpg, is asyncio-only): "
                "use it from an asyncio event loop (anyio's default backend)"
            )
        if rt is not None:
            if rt.loop is loop:
                return rt
            if not rt.loop.is_closed():
                raise RuntimeError(
                    "this PostgresLightningStore is open in another event loop; give each loop its own "
                    "store (a pickled copy reconnects by itself)"
                )
            self._runtime = None  # that loop is gone, and its connections with it
            self._starting = None
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._runtime is None or self._runtime.loop is not loop:
                await self._start(loop)
            assert self._runtime is not None
            return self._runtime

    async def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            import asyncpg
        except ImportError:
            raise ImportError(
                "PostgresLightningStore needs asyncpg: pip install 'agl-async[postgres]'"
            ) from None
        from . import _postgres_events as events
        from ._postgres_schema import ensure_schema

        rt = _Runtime(loop)
        rt.errors = events.CONNECTION_ERRORS
        rt.conflicts = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
        s = self._settings
        extra = _connect_options(s.dsn)

        async def connect_pool() -> Any:
            return await asyncpg.create_pool(
                s.dsn,
                **extra,
                min_size=1,
                max_size=s.pool_size,
                timeout=s.connect_timeout,
                command_timeout=s.command_timeout,
                statement_cache_size=256,
                max_inactive_connection_lifetime=60.0,
                # The pool's connections never LISTEN, hold session locks or change settings:
                # skip asyncpg's reset query on every release (a round trip per call).
                reset=_keep_session,
                # Every statement is a keyed lookup: plan it once per connection, not per call.
                server_settings={"plan_cache_mode": "force_generic_plan", "application_name": "agl_async"},
            )

        def connect_as(role: str) -> Callable[[], Awaitable[Any]]:
            async def connect() -> Any:
                settings = {"application_name": f"agl_async {role}"}  # what pg_stat_activity shows
                return await asyncpg.connect(
                    s.dsn, timeout=s.connect_timeout, server_settings=settings, **extra
                )

            return connect

        rt.pool = await self._retry_connect(connect_pool, rt.errors)
        try:
            async with rt.pool.acquire() as conn:
                await ensure_schema(conn)
                t0 = time.time()
                db_now = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
                t1 = time.time()
            offset = float(db_now) - (t0 + t1) / 2
            # Processes on other hosts agree on the database's clock; on its own host, keep time.time().
            rt.clock_offset = offset if abs(offset) > 0.005 else 0.0
            self._runtime = rt  # the background tasks below use the store (and its clock) at once
            rt.wakeups = events.Wakeups()
            rt.listener = events.Listener(connect_as("listener"), rt.wakeups)
            rt.tasks.append(loop.create_task(rt.listener.run(), name="agl_async postgres listener"))
            if s.watchdog:
                rt.watchdog = events.Watchdog(connect_as("watchdog"), rt.wakeups, self._settle_due, self._now)
                rt.tasks.append(loop.create_task(rt.watchdog.run(), name="agl_async postgres watchdog"))
            with anyio.move_on_after(s.connect_timeout):
                await rt.listener.connected.wait()
        except BaseException:
            self._runtime = None
            for task in rt.tasks:
                task.cancel()
            rt.pool.terminate()
            raise

    async def _retry_connect(
        self, connect: Callable[[], Awaitable[T]], errors: tuple[type[BaseException], ...]
    ) -> T:
        deadline = time.monotonic() + self._settings.reconnect_timeout
        failures = 0
        while True:
            try:
                return await connect()
            except errors as exc:
                if time.monotonic() >= deadline:
                    raise ConnectionError(
                        f"cannot connect to PostgreSQL at {_redact(self._settings.dsn)}: {exc}"
                    ) from exc
                if failures == 0:
                    logger.warning("PostgresLightningStore: cannot connect (%s); retrying", exc)
            await anyio.sleep(min(0.05 * 2**failures, 2.0))
            failures += 1

    # ------------------------------------------------------------------ running statements
    async def _after_failure(self, exc: BaseException, failures: int, deadline: float) -> int:
        if time.monotonic() >= deadline:
            raise ConnectionError(
                f"lost the connection to PostgreSQL at {_redact(self._settings.dsn)} and could not get it "
                f"back within {self._settings.reconnect_timeout:g}s: {exc}"
            ) from exc
        if failures == 0:
            logger.warning("PostgresLightningStore: database connection lost (%s); retrying", exc)
        await anyio.sleep(min(0.02 * 2**failures, 1.0))
        return failures + 1

    async def _read(self, method: str, statement: str, *args: Any) -> Any:
        """One read-only statement (``method``: ``fetch`` / ``fetchrow`` / ``fetchval``), run again
        on a lost connection. Cancellable."""
        rt = await self._rt()
        deadline = time.monotonic() + self._settings.reconnect_timeout
        failures = 0
        while True:
            try:
                async with rt.pool.acquire() as conn:
                    return await getattr(conn, method)(statement, *args)
            except rt.errors as exc:
                failures = await self._after_failure(exc, failures, deadline)

    async def _autocommit(self, method: str, statement: str, *args: Any) -> Any:
        """One statement that changes things, in its own transaction: shielded from cancellation
        and run again on a lost connection (only for statements where running twice is harmless)."""
        rt = await self._rt()
        deadline = time.monotonic() + self._settings.reconnect_timeout
        failures = 0
        while True:
            conn = None
            try:
                conn = await rt.pool.acquire()
                with anyio.CancelScope(shield=True):
                    return await getattr(conn, method)(statement, *args)
            except rt.errors as exc:
                failures = await self._after_failure(exc, failures, deadline)
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await rt.pool.release(conn)

    async def _write(
        self,
        fn: Callable[[_Tx], Awaitable[T]],
        *,
        landed: Callable[[Any], Awaitable[T | None]] | None = None,
        transaction: bool = True,
    ) -> T:
        """Run ``fn(tx)`` in a transaction (what it staged flushed before the commit), shielded
        from cancellation so that it is never half-done nor done-and-lost. ``transaction=False``:
        for an ``fn`` whose change is one statement (atomic by itself), saving BEGIN and COMMIT.

        A deadlock or a connection lost before the commit: run again. A connection lost during
        the commit: ``landed(conn)`` says whether it was applied (its result is returned) or not
        (run again); without ``landed`` it is run again (for calls where that is harmless).
        """
        rt = await self._rt()
        deadline = time.monotonic() + self._settings.reconnect_timeout
        failures = conflicts = 0
        uncertain = False
        while True:
            conn = None
            committing = False
            try:
                conn = await rt.pool.acquire()
                with anyio.CancelScope(shield=True):
                    if uncertain and landed is not None:
                        uncertain = False
                        found = await landed(conn)
                        if found is not None:
                            return found
                    tx = _Tx(conn, self._now())
                    if not transaction:
                        committing = True  # every statement commits by itself
                        result = await fn(tx)
                        await tx.flush()
                        return result
                    txn = conn.transaction()
                    await txn.start()
                    try:
                        result = await fn(tx)
                        await tx.flush()
                    except BaseException:
                        if not conn.is_closed():
                            try:
                                await txn.rollback()
                            except rt.errors:
                                pass  # the connection is gone, and the transaction with it
                        raise
                    committing = True
                    await txn.commit()
                    return result
            except rt.conflicts:
                conflicts += 1  # nothing was applied
                if conflicts > 50:
                    raise
                await anyio.sleep(0.001 * conflicts)
            except rt.errors as exc:
                uncertain = committing
                failures = await self._after_failure(exc, failures, deadline)
            finally:
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await rt.pool.release(conn)

    # ------------------------------------------------------------------ locked reads
    @staticmethod
    async def _lock(
        tx: _Tx, rollout_id: Any, attempt_id: Any = None, *, skip_locked: bool = False
    ) -> tuple[RolloutRow, AttemptRow | None]:
        """Lock a rollout's row for this transaction and read one of its attempts (``"latest"``:
        its latest; ``None``: none), in one statement. ``ValueError`` naming an unknown id; with
        ``skip_locked``, a rollout another transaction holds counts as unknown."""
        rec = None
        if isinstance(rollout_id, str):
            if skip_locked:
                rec = await tx.conn.fetchrow(sql.LOCK_ROLLOUT_SKIP_LOCKED, rollout_id)
            else:
                wanted = attempt_id if isinstance(attempt_id, str) else None
                rec = await tx.conn.fetchrow(sql.LOCK_ROLLOUT_WITH_ATTEMPT, rollout_id, wanted)
        if rec is None:
            raise ValueError(f"rollout {rollout_id!r} not found")
        r = RolloutRow.of(rec)
        if attempt_id is None:
            return r, None
        if attempt_id == "latest" and r.latest_attempt_id is None:
            raise ValueError(f"rollout {r.rollout_id!r} has no attempts")
        if skip_locked or rec["a_attempt_id"] is None:
            raise ValueError(f"attempt {attempt_id!r} not found in rollout {r.rollout_id!r}")
        return r, AttemptRow.of(rec, "a_")

    # ------------------------------------------------------------------ state transitions
    @staticmethod
    def _set_rollout_status(tx: _Tx, r: RolloutRow, status: str, now: float) -> None:
        if r.status == status:
            return
        r.status = status
        r.dirty = True
        if status in TERMINAL_ROLLOUT_STATUSES:
            r.end_time = now
            tx.terminal.append(r.rollout_id)
        else:
            r.end_time = None
            if status in QUEUE_STATUSES:
                if not r.queued:
                    r.queue_move, r.queued = "tail", True
                    tx.queued += 1
                return
        if r.queued:
            r.queue_move, r.queued = "out", False

    def _set_attempt_status(self, tx: _Tx, r: RolloutRow, a: AttemptRow, status: str, now: float) -> None:
        """Set an attempt's status; the latest attempt drives its rollout unless that is finished."""
        previous = a.status
        a.status = status
        if status in TERMINAL_ATTEMPT_STATUSES:
            a.end_time = a.end_time if previous == status else now
        else:
            a.end_time = None
        self._sync_worker(tx, a, now)
        ended = status in TERMINAL_ATTEMPT_STATUSES and previous != status
        if r.latest_attempt_id != a.attempt_id:
            if ended:
                logger.info(
                    "attempt %s of rollout %s ended %s but is not its latest attempt: rollout unchanged",
                    a.attempt_id,
                    r.rollout_id,
                    status,
                )
            return
        if r.status in TERMINAL_ROLLOUT_STATUSES:
            if ended:
                logger.warning(
                    "attempt %s of rollout %s ended %s after the rollout was %s: rollout unchanged",
                    a.attempt_id,
                    r.rollout_id,
                    status,
                    r.status,
                )
            return
        # The retry rule is the one every store shares (_rules): it reads the status and sequence id.
        view = Attempt(rollout_id=r.rollout_id, attempt_id=a.attempt_id, sequence_id=a.sequence_id)
        view.status = status  # type: ignore[assignment]
        self._set_rollout_status(tx, r, rollout_status_for(view, r.config), now)

    @staticmethod
    def _sync_worker(tx: _Tx, a: AttemptRow, now: float, dequeued: bool = False) -> None:
        """The worker of an attempt follows it: busy while it is live, released when it ends."""
        if a.worker_id is None:
            return
        key = wkey(a.worker_id)
        if a.status in ("succeeded", "failed"):
            tx.worker_ops.append(("release", key, "idle", now, a.attempt_id))
        elif a.status in ("unresponsive", "timeout"):
            tx.worker_ops.append(("release", key, "unknown", now, a.attempt_id))
        else:
            tx.worker_ops.append(("busy", key, now, a.rollout_id, a.attempt_id, now if dequeued else None))

    async def _new_attempt(self, tx: _Tx, r: RolloutRow, worker_id: WorkerId | None) -> Attempt:
        """A new attempt of a locked rollout, which leaves the queue and becomes ``preparing``."""
        now = tx.now
        a = AttemptRow(
            rollout_id=r.rollout_id,
            attempt_id=new_id("at"),
            sequence_id=r.n_attempts + 1,
            start_time=now,
            end_time=None,
            status="preparing",
            worker_id=worker_id,
            last_heartbeat_time=None,
            metadata="{}",
            timeout_s=r.config.timeout_seconds,
            unresponsive_s=r.config.unresponsive_seconds,
            deadline=None,
        )
        a.deadline = a.verdict()[1]
        if a.deadline is not None and (tx.deadline is None or a.deadline < tx.deadline):
            tx.deadline = a.deadline
        key = None if worker_id is None else wkey(worker_id)
        await tx.conn.execute(
            sql.INSERT_ATTEMPT,
            a.attempt_id,
            a.rollout_id,
            a.sequence_id,
            now,
            key,
            a.timeout_s,
            a.unresponsive_s,
            a.deadline,
        )
        await tx.conn.execute(sql.TOUCH_ROLLOUT_FOR_ATTEMPT, r.rollout_id, a.sequence_id, a.attempt_id)
        r.status, r.end_time, r.queued = "preparing", None, False
        r.n_attempts, r.latest_attempt_id = a.sequence_id, a.attempt_id
        if worker_id is not None:
            self._sync_worker(tx, a, now, dequeued=True)
        return a.model()

    # ------------------------------------------------------------------ validation
    @staticmethod
    async def _check_resources_exist(conn: Any, ids: set[str]) -> None:
        if not ids:
            return
        found = {rec[0] for rec in await conn.fetch(sql.EXISTING_RESOURCES, sorted(ids))}
        for rid in sorted(ids):
            if rid not in found:
                raise ValueError(f"resources {rid!r} not found")

    @staticmethod
    def _rollout_values(
        input: Any, mode: Any, resources_id: Any, config: Any, metadata: Any
    ) -> tuple[str, RolloutConfig, str, str]:
        """Check and encode ``enqueue_rollout``'s arguments: ``(input, config, config_json, metadata)``."""
        if mode is not None and mode not in _MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; expected one of {sorted(_MODES)}")
        if resources_id is not None and not isinstance(resources_id, str):
            raise ValueError(f"resources {resources_id!r} not found")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        check_json_value(input, "input")  # [issue 16] the JSON rule, shared (_validate)
        check_json_value(metadata, "metadata")
        cfg = _as_config(config)
        return (
            _json.encode(input, "rollout input"),
            cfg,
            _json.encode(cfg, "rollout config"),
            _json.encode(dict(metadata) if metadata else {}, "rollout metadata"),
        )

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
        return (await self.enqueue_many_rollouts([request]))[0]

    async def enqueue_many_rollouts(
        self, rollouts: Sequence[EnqueueRolloutRequest | Mapping[str, Any]]
    ) -> list[Rollout]:
        requests = as_enqueue_requests(rollouts)
        encoded = [
            self._rollout_values(r.input, r.mode, r.resources_id, r.config, r.metadata) for r in requests
        ]
        if not requests:
            return []
        ids = [new_id("ro") for _ in requests]

        async def run(tx: _Tx) -> list[Rollout]:
            await self._check_resources_exist(
                tx.conn, {r.resources_id for r in requests if r.resources_id is not None}
            )
            recs = await tx.conn.fetch(
                sql.ENQUEUE,
                ids,
                [e[0] for e in encoded],
                [r.mode for r in requests],
                [r.resources_id for r in requests],
                [e[2] for e in encoded],
                [e[3] for e in encoded],
                tx.now,
                [e[1].timeout_seconds for e in encoded],
                [e[1].unresponsive_seconds for e in encoded],
            )
            bound = {rec["rollout_id"]: rec["resources_id"] for rec in recs}
            tx.queued += len(recs)
            return [
                Rollout(
                    rollout_id=rid,
                    input=_json.decode(e[0]),
                    start_time=tx.now,
                    mode=r.mode,  # type: ignore[arg-type]  # checked by _rollout_values
                    resources_id=bound[rid],
                    status="queuing",
                    config=msgspec.json.decode(e[2], type=RolloutConfig),
                    metadata=_json.decode(e[3]),
                )
                for rid, r, e in zip(ids, requests, encoded, strict=True)
            ]

        async def landed(conn: Any) -> list[Rollout] | None:
            if await conn.fetchval(sql.COUNT_ROLLOUT, ids[0]) == 0:
                return None
            by_id = {
                rec["rollout_id"]: rollout_model(rec) for rec in await conn.fetch(sql.ROLLOUTS_BY_ID, ids)
            }
            return [by_id[rid] for rid in ids]

        return await self._write(run, landed=landed)

    @staticmethod
    def _claimed_model(rec: Any, now: float, worker_id: WorkerId | None) -> AttemptedRollout:
        attempt = Attempt(
            rollout_id=rec["rollout_id"],
            attempt_id=rec["latest_attempt_id"],
            sequence_id=rec["n_attempts"],
            start_time=now,
            worker_id=worker_id,
        )
        rollout = rollout_model({**dict(rec.items()), "status": "preparing", "end_time": None})
        return attempted_model(rollout, attempt)

    async def _claim(
        self, limit: int, worker_id: WorkerId | None, *, idle_if_empty: bool
    ) -> list[AttemptedRollout]:
        key = None if worker_id is None else wkey(worker_id)
        attempt_ids = [new_id("at") for _ in range(limit)]

        async def run(tx: _Tx) -> list[AttemptedRollout]:
            recs = await tx.conn.fetch(sql.CLAIM, limit, attempt_ids, tx.now, key, NOTIFY_CHANNEL)
            if not recs and key is not None and idle_if_empty:
                await tx.conn.execute(sql.WORKER_IDLE_DEQUEUE, key, tx.now)
            return [self._claimed_model(rec, tx.now, worker_id) for rec in recs]

        async def landed(conn: Any) -> list[AttemptedRollout] | None:
            recs = await conn.fetch(sql.CLAIMED_BY_ATTEMPT_IDS, attempt_ids)
            if not recs:
                return None
            order = {aid: i for i, aid in enumerate(attempt_ids)}
            recs = sorted(recs, key=lambda rec: order[rec["latest_attempt_id"]])
            return [self._claimed_model(rec, rec["attempt_start"], worker_id) for rec in recs]

        return await self._write(run, landed=landed, transaction=False)

    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        check_seconds(timeout)
        check_worker_id(worker_id)
        rt = await self._rt()
        assert rt.wakeups is not None
        deadline = time.monotonic() + timeout if timeout else None
        # Long polls wait in line: a rollout entering the queue wakes one of them (see
        # _postgres_events). A wake-up this call takes but does not turn into a look at the queue
        # (cancelled, or it returns with another rollout) is handed on to the next in line.
        owed = False
        waiter: QueueWaiter | None = None
        try:
            while True:
                waiter = rt.wakeups.queue_waiter()  # in line before looking: no enqueue slips by
                claimed = await self._claim(1, worker_id, idle_if_empty=True)
                owed = False
                if claimed:
                    return claimed[0]
                remaining = 0.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return None
                if not rt.wakeups.listening:
                    remaining = min(remaining, rt.wakeups.degraded_interval)
                # Cancelling this wait claims nothing: the claim above is one committed statement.
                with anyio.move_on_after(remaining):
                    await waiter.event.wait()
                owed = waiter.event.is_set()
                rt.wakeups.leave_queue_line(waiter)
                waiter = None
                await anyio.lowlevel.checkpoint()  # a cancellation that came with the wake-up: leave now
        finally:
            if waiter is not None:
                rt.wakeups.leave_queue_line(waiter)
                owed = owed or waiter.event.is_set()
            if owed:
                rt.wakeups.queue_changed(1)

    async def dequeue_many_rollouts(
        self, *, limit: int = 1, worker_id: WorkerId | None = None
    ) -> list[AttemptedRollout]:
        check_worker_id(worker_id)
        check_limit(limit)  # [issue 16] an integer >= 0, shared (_validate)
        if limit == 0:
            return []
        return await self._claim(limit, worker_id, idle_if_empty=False)

    async def unclaim_rollout(self, rollout_id: str, attempt_id: str) -> bool:
        async def run(tx: _Tx) -> bool:
            r, a = await self._lock(tx, rollout_id, attempt_id)
            assert a is not None
            if a.status != "preparing" or r.status != "preparing" or r.latest_attempt_id != a.attempt_id:
                return False
            await tx.conn.execute(sql.DELETE_ATTEMPT_SPANS, a.attempt_id)
            await tx.conn.execute(sql.DELETE_ATTEMPT, a.attempt_id)
            previous = await tx.conn.fetchval(sql.PREVIOUS_ATTEMPT_ID, r.rollout_id, a.sequence_id - 1)
            status = "queuing" if a.sequence_id == 1 else "requeuing"
            await tx.conn.execute(sql.UNCLAIM_ROLLOUT, r.rollout_id, status, previous)
            if a.worker_id is not None:
                tx.worker_ops.append(("release", wkey(a.worker_id), "idle", tx.now, a.attempt_id))
            tx.queued += 1
            return True

        return await self._write(run)

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
        input_json, cfg, config_json, metadata_json = self._rollout_values(
            input, mode, resources_id, config, metadata
        )
        rollout_id = new_id("ro")

        async def run(tx: _Tx) -> AttemptedRollout:
            if resources_id is not None:
                await self._check_resources_exist(tx.conn, {resources_id})
            rec = await tx.conn.fetchrow(
                sql.START_ROLLOUT,
                rollout_id,
                input_json,
                tx.now,
                mode,
                resources_id,
                config_json,
                metadata_json,
                cfg.timeout_seconds,
                cfg.unresponsive_seconds,
            )
            attempt = await self._new_attempt(tx, RolloutRow.of(rec), worker_id)
            return attempted_model(rollout_model(rec), attempt)

        async def landed(conn: Any) -> AttemptedRollout | None:
            rec = await conn.fetchrow(sql.GET_ROLLOUT, rollout_id)
            if rec is None:
                return None
            arec = await conn.fetchrow(sql.GET_ATTEMPT, rec["latest_attempt_id"], rollout_id)
            return attempted_model(rollout_model(rec), attempt_model(arec))

        return await self._write(run, landed=landed)

    async def start_attempt(self, rollout_id: str, worker_id: WorkerId | None = None) -> AttemptedRollout:
        check_worker_id(worker_id)

        async def run(tx: _Tx) -> AttemptedRollout:
            r, _ = await self._lock(tx, rollout_id)
            attempt = await self._new_attempt(tx, r, worker_id)
            return attempted_model(rollout_model(r.record, status="preparing", end_time=None), attempt)

        return await self._write(run)

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
        # Everything is checked before the transaction: a failing call changes nothing.
        if status is not UNSET and status not in ROLLOUT_STATUSES:
            raise ValueError(f"unknown rollout status {status!r}; expected one of {sorted(ROLLOUT_STATUSES)}")
        if not isinstance(mode, Unset) and mode is not None and mode not in _MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; expected one of {sorted(_MODES)}")
        if not isinstance(metadata, Unset) and metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        new_resources = None if isinstance(resources_id, Unset) else resources_id
        if new_resources is not None and not isinstance(new_resources, str):
            raise ValueError(f"resources {new_resources!r} not found")
        new_config = None if isinstance(config, Unset) else _as_config(config)
        if not isinstance(input, Unset):
            check_json_value(input, "input")  # [issue 16] the JSON rule, shared (_validate)
        if not isinstance(metadata, Unset):
            check_json_value(metadata, "metadata")
        input_json = None if isinstance(input, Unset) else _json.encode(input, "rollout input")
        new_metadata = None if isinstance(metadata, Unset) else (dict(metadata) if metadata else {})
        metadata_json = None if new_metadata is None else _json.encode(new_metadata, "rollout metadata")
        if isinstance(status, Unset) and new_config is None and isinstance(rollout_id, str):
            # The common case (a runner writing the reward): one statement; anything it cannot
            # decide (an unknown id, a finished rollout's metadata) takes the locked path below.
            rec = await self._autocommit(
                "fetchrow",
                sql.UPDATE_ROLLOUT_FIELDS_FAST,
                rollout_id,
                input_json is not None,
                input_json,
                not isinstance(mode, Unset),
                None if isinstance(mode, Unset) else mode,
                not isinstance(resources_id, Unset),
                new_resources,
                metadata_json is not None,
                metadata_json,
            )
            if rec is not None:
                return rollout_model(rec)

        async def run(tx: _Tx) -> Rollout:
            r, _ = await self._lock(tx, rollout_id)
            if new_resources is not None:
                await self._check_resources_exist(tx.conn, {new_resources})
            rec = dict(r.record.items())
            if input_json is not None:
                rec["input"] = input_json
            if not isinstance(mode, Unset):
                rec["mode"] = mode
            if not isinstance(resources_id, Unset):
                rec["resources_id"] = resources_id
            if new_config is not None:
                rec["config"] = _json.encode(new_config, "rollout config")
                r.config = new_config
            if new_metadata is not None and metadata_json is not None:
                stays_terminal = isinstance(status, Unset) or status in TERMINAL_ROLLOUT_STATUSES
                rec["metadata"] = (
                    self._keep_reward(r, new_metadata, metadata_json) if stays_terminal else metadata_json
                )
            await tx.conn.execute(
                sql.SAVE_ROLLOUT_FIELDS,
                r.rollout_id,
                rec["input"],
                rec["mode"],
                rec["resources_id"],
                rec["config"],
                rec["metadata"],
                r.config.timeout_seconds,
                r.config.unresponsive_seconds,
            )
            if new_config is not None:
                # The new limits apply to the attempts already running.
                for arec in await tx.conn.fetch(sql.LIVE_ATTEMPTS, r.rollout_id):
                    a = AttemptRow.of(arec)
                    a.timeout_s = new_config.timeout_seconds
                    a.unresponsive_s = new_config.unresponsive_seconds
                    tx.save_attempt(a)
            if not isinstance(status, Unset):
                self._set_rollout_status(tx, r, status, tx.now)
                tx.save_rollout(r)
            rec["status"], rec["end_time"] = r.status, r.end_time
            return rollout_model(rec)

        return await self._write(run)

    @staticmethod
    def _keep_reward(r: RolloutRow, new: dict[str, Any], new_json: str) -> str:
        """The metadata to store: ``new``, except that a finished rollout keeps its reward."""
        if r.status in TERMINAL_ROLLOUT_STATUSES:
            old = _json.decode(r.metadata)
            missing = object()
            if old.get(REWARD_KEY, missing) != new.get(REWARD_KEY, missing):
                logger.warning(
                    "rollout %s is %s: its reward stays %r (a late update tried to make it %r)",
                    r.rollout_id,
                    r.status,
                    old.get(REWARD_KEY),
                    new.get(REWARD_KEY),
                )
                kept = dict(new)
                if REWARD_KEY in old:
                    kept[REWARD_KEY] = old[REWARD_KEY]
                else:
                    kept.pop(REWARD_KEY, None)
                return _json.encode(kept, "rollout metadata")
        return new_json

    async def update_attempt(
        self,
        rollout_id: str,
        attempt_id: str | Literal["latest"],
        status: AttemptStatus | Unset = UNSET,
        worker_id: WorkerId | Unset | None = UNSET,
        last_heartbeat_time: float | Unset = UNSET,
        metadata: dict[str, Any] | Unset | None = UNSET,
    ) -> Attempt:
        if status is not UNSET and status not in ATTEMPT_STATUSES:
            raise ValueError(f"unknown attempt status {status!r}; expected one of {sorted(ATTEMPT_STATUSES)}")
        if not isinstance(metadata, (Unset, dict)) and metadata is not None:
            raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
        if not isinstance(last_heartbeat_time, (Unset, int, float)) or isinstance(last_heartbeat_time, bool):
            raise ValueError(f"last_heartbeat_time must be a number, got {last_heartbeat_time!r}")
        if not isinstance(worker_id, Unset):
            check_worker_id(worker_id)
        metadata_json = None
        if not isinstance(metadata, Unset):
            check_json_value(metadata, "metadata")  # [issue 16] the JSON rule, shared (_validate)
            metadata_json = _json.encode(dict(metadata) if metadata else {}, "attempt metadata")

        async def run(tx: _Tx) -> Attempt:
            r, a = await self._lock(tx, rollout_id, attempt_id)
            assert a is not None
            now = tx.now
            if metadata_json is not None:
                a.metadata = metadata_json
            if not isinstance(worker_id, Unset) and worker_id != a.worker_id:
                a.worker_id = worker_id
                if a.status in _LIVE:
                    self._sync_worker(tx, a, now)
            beat = now if isinstance(last_heartbeat_time, Unset) else float(last_heartbeat_time)
            if a.status in _LIVE or status in _LIVE:
                a.last_heartbeat_time = beat
            elif not isinstance(last_heartbeat_time, Unset):
                a.last_heartbeat_time = beat
            if not isinstance(status, Unset) and self._accepts(r, a, status):
                self._set_attempt_status(tx, r, a, status, now)
            tx.save_attempt(a)
            tx.save_rollout(r)
            return a.model()

        return await self._write(run)

    @staticmethod
    def _accepts(r: RolloutRow, a: AttemptRow, status: str) -> bool:
        """Whether a new status applies to an attempt. One the watchdog ended for good — ``timeout``,
        or ``unresponsive`` once its rollout moved on (a newer attempt, a terminal status) — keeps
        its verdict; an unresponsive attempt that is still the latest of an unfinished rollout is
        back (the same rule as the SQLite store)."""
        dead = a.status == "timeout" or (a.status == "unresponsive" and not _may_revive(r, a))
        if not dead or status == a.status:
            return True
        logger.warning(
            "attempt %s of rollout %s was ended by the watchdog (%s): a late %r is ignored",
            a.attempt_id,
            r.rollout_id,
            a.status,
            status,
        )
        return False

    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        check_seconds(timeout)
        ids = [rid for rid in dict.fromkeys(rollout_ids) if isinstance(rid, str)]
        rt = await self._rt()
        assert rt.wakeups is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = rt.wakeups.register(set(ids))  # before the first look: no change can slip by
        try:
            look, everything = set(ids), True
            pending: set[str] = set()
            while True:
                if everything or look & pending:
                    # Only what changed is looked at again (O(changes), not O(ids) per wake-up).
                    ask = ids if everything else sorted(look & pending)
                    recs = await self._read("fetch", sql.ROLLOUT_STATUSES_BY_ID, ask)
                    if everything:
                        pending = set()  # unknown ids are not waited for: they can never finish
                    for rid, status in recs:
                        if status in TERMINAL_ROLLOUT_STATUSES:
                            pending.discard(rid)
                        else:
                            pending.add(rid)
                remaining = None if deadline is None else deadline - time.monotonic()
                if not pending or (remaining is not None and remaining <= 0):
                    break
                if not rt.wakeups.listening:
                    interval = rt.wakeups.degraded_interval
                    remaining = interval if remaining is None else min(remaining, interval)
                    waiter.everything = True  # nothing tells us what changed meanwhile
                event = waiter.event
                with anyio.move_on_after(remaining):
                    await event.wait()
                look, everything = waiter.take()
        finally:
            rt.wakeups.forget(waiter)
        finished = await self._read("fetch", sql.TERMINAL_ROLLOUTS_BY_ID, ids)
        by_id = {rec["rollout_id"]: rollout_model(rec) for rec in finished}
        return [by_id[rid] for rid in rollout_ids if rid in by_id]

    async def get_rollout_by_id(self, rollout_id: str) -> Rollout | None:
        if _not_str(rollout_id):
            return None
        rec = await self._read("fetchrow", sql.GET_ROLLOUT, rollout_id)
        return None if rec is None else rollout_model(rec)

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
        statuses = None if status_in is None else [str(s) for s in status_in]
        if rollout_id_in is None:  # filtered, ordered and paged by the database
            statement = sql.QUERY_ROLLOUTS.format(order=sql.ROLLOUT_ORDERS[sort_by, sort_order])
            page_size = None if limit == -1 else limit
            recs = await self._read("fetch", statement, statuses, rollout_id_contains, page_size, offset)
            return [rollout_model(rec) for rec in recs]
        wanted = [rid for rid in dict.fromkeys(rollout_id_in) if isinstance(rid, str)]
        recs = await self._read("fetch", sql.QUERY_ROLLOUTS_BY_ID, wanted, statuses)
        by_id = {rec["rollout_id"]: rollout_model(rec) for rec in recs}
        return select_rollouts(  # a page of the ids asked: ordered here, in the order asked
            (by_id[rid] for rid in wanted if rid in by_id),
            rollout_id_contains=rollout_id_contains,
            sort_by=sort_by,
            sort_order=sort_order,
            limit=limit,
            offset=offset,
        )

    async def query_attempts(self, rollout_id: str) -> list[Attempt]:
        if _not_str(rollout_id):
            return []
        return [attempt_model(rec) for rec in await self._read("fetch", sql.QUERY_ATTEMPTS, rollout_id)]

    async def get_latest_attempt(self, rollout_id: str) -> Attempt | None:
        if _not_str(rollout_id):
            return None
        rec = await self._read("fetchrow", sql.LATEST_ATTEMPT, rollout_id)
        return None if rec is None else attempt_model(rec)

    # ------------------------------------------------------------------ spans
    @staticmethod
    def _encode_span(span: Any) -> str:
        if not isinstance(span, Span):
            raise ValueError(f"expected a Span, got {type(span).__name__}")
        if isinstance(span.sequence_id, bool) or not isinstance(span.sequence_id, int):
            raise ValueError(f"span sequence_id must be an integer, got {span.sequence_id!r}")
        if type(span.attributes) is not dict or type(span.events) is not list:
            raise ValueError("span attributes must be a dict and events a list")
        if not isinstance(span.rollout_id, str):
            raise ValueError(f"rollout {span.rollout_id!r} not found")
        if not isinstance(span.attempt_id, str):
            raise ValueError(f"attempt {span.attempt_id!r} not found in rollout {span.rollout_id!r}")
        return _json.encode(span, "span", allow_non_finite=True)

    async def add_span(self, span: Span) -> Span | None:
        data = self._encode_span(span)
        if span.attempt_id != "latest":
            # The common case, a span of a running attempt, is one statement; the rest is locked.
            await self._rt()
            now = self._now()
            args = (span.rollout_id, span.attempt_id, data, span.sequence_id, now)
            seq = await self._autocommit("fetchval", sql.ADD_SPAN_FAST, *args)
            if seq is not None:
                span.sequence_id = seq  # AUTO_SEQUENCE_ID: the one the store gave it
                return span
        await self._add_spans([span], [data])
        return span

    async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
        spans = list(spans)
        data = [self._encode_span(span) for span in spans]  # all checked before anything is stored
        if spans:
            await self._add_spans(spans, data)
        return spans

    async def _add_spans(self, spans: list[Span], data: list[str]) -> None:
        """Store spans in one transaction of a fixed number of statements, whatever their number:
        lock their rollouts, read their attempts, insert, count them as heartbeats."""

        async def run(tx: _Tx) -> None:
            rollout_ids = sorted({s.rollout_id for s in spans})  # one lock order everywhere: no deadlock
            rollouts = {
                rec["rollout_id"]: RolloutRow.of(rec)
                for rec in await tx.conn.fetch(sql.LOCK_ROLLOUTS, rollout_ids)
            }
            for rid in rollout_ids:
                if rid not in rollouts:
                    raise ValueError(f"rollout {rid!r} not found")
            wanted: dict[tuple[str, str], str] = {}
            for s in spans:
                aid = s.attempt_id
                if aid == "latest":
                    latest = rollouts[s.rollout_id].latest_attempt_id
                    if latest is None:
                        raise ValueError(f"rollout {s.rollout_id!r} has no attempts")
                    aid = latest
                wanted[s.rollout_id, s.attempt_id] = aid
            recs = await tx.conn.fetch(sql.ATTEMPTS_BY_ID, sorted(set(wanted.values())))
            found = {rec["attempt_id"]: AttemptRow.of(rec) for rec in recs}
            next_seq: dict[str, int] = {rec["attempt_id"]: rec["next_span_seq"] for rec in recs}
            of: list[AttemptRow] = []
            for s in spans:
                a = found.get(wanted[s.rollout_id, s.attempt_id])
                if a is None or a.rollout_id != s.rollout_id:
                    raise ValueError(f"attempt {s.attempt_id!r} not found in rollout {s.rollout_id!r}")
                of.append(a)
            # Sequence ids: AUTO_SEQUENCE_ID takes the attempt's next one, in the order given.
            following = {aid: rec_seq for aid, rec_seq in next_seq.items()}
            top: dict[str, int] = {}
            for s, a in zip(spans, of, strict=True):
                if s.sequence_id == AUTO_SEQUENCE_ID:
                    s.sequence_id = following[a.attempt_id]
                following[a.attempt_id] = max(following[a.attempt_id], s.sequence_id + 1)
                top[a.attempt_id] = max(top.get(a.attempt_id, s.sequence_id), s.sequence_id)
            await tx.conn.execute(
                sql.INSERT_SPANS,
                [s.rollout_id for s in spans],
                [a.attempt_id for a in of],
                [a.sequence_id for a in of],
                [s.sequence_id for s in spans],
                data,
            )
            await tx.conn.execute(sql.SPANS_HEARTBEAT, tx.now, list(top), list(top.values()))
            # A span makes a preparing attempt running, and brings back an unresponsive one while
            # it may (see the module docstring): the rare case, one attempt at a time.
            for a in {a.attempt_id: a for a in of}.values():
                r = rollouts[a.rollout_id]
                if a.status == "preparing" or (a.status == "unresponsive" and _may_revive(r, a)):
                    a.last_heartbeat_time = tx.now
                    self._set_attempt_status(tx, r, a, "running", tx.now)
                    tx.save_attempt(a)
                    tx.save_rollout(r)

        await self._write(run)

    async def query_spans(self, rollout_id: str, attempt_id: str | None = None) -> list[Span]:
        if _not_str(rollout_id):
            return []
        if attempt_id is None:
            recs = await self._read("fetch", sql.SPANS_OF_ROLLOUT, rollout_id)
        elif attempt_id == "latest":
            recs = await self._read("fetch", sql.SPANS_OF_LATEST_ATTEMPT, rollout_id)
        elif _not_str(attempt_id):
            return []
        else:
            recs = await self._read("fetch", sql.SPANS_OF_ATTEMPT, rollout_id, attempt_id)
        spans = [_span_decoder.decode(rec[0]) for rec in recs]
        for span, rec in zip(spans, recs, strict=True):
            span.sequence_id = rec[1]  # the column is the truth (AUTO_SEQUENCE_ID spans were numbered)
        return spans

    async def get_next_span_sequence_id(self, rollout_id: str, attempt_id: str) -> int:
        async def run(tx: _Tx) -> int:
            seq = None
            if isinstance(rollout_id, str) and isinstance(attempt_id, str):
                seq = await tx.conn.fetchval(sql.NEXT_SPAN_SEQ, rollout_id, attempt_id)
            if seq is None:  # say which id is unknown
                await self._lock(tx, rollout_id, attempt_id)
                raise AssertionError(f"no sequence id for {rollout_id!r} / {attempt_id!r}")
            return int(seq)

        return await self._write(run, transaction=False)

    # ------------------------------------------------------------------ resources
    async def add_resources(self, resources: Mapping[str, Any]) -> ResourcesUpdate:
        text = _json.encode(as_resources(resources), "resources")
        resources_id = new_id("rs")

        async def run(tx: _Tx) -> ResourcesUpdate:
            return resources_model(await tx.conn.fetchrow(sql.INSERT_RESOURCES, resources_id, text, tx.now))

        async def landed(conn: Any) -> ResourcesUpdate | None:
            rec = await conn.fetchrow(sql.GET_RESOURCES, resources_id)
            return None if rec is None else resources_model(rec)

        return await self._write(run, landed=landed, transaction=False)

    async def update_resources(self, resources_id: str, resources: Mapping[str, Any]) -> ResourcesUpdate:
        text = _json.encode(as_resources(resources), "resources")

        async def run(tx: _Tx) -> ResourcesUpdate:
            rec = None
            if isinstance(resources_id, str):
                rec = await tx.conn.fetchrow(sql.UPDATE_RESOURCES, resources_id, text, tx.now)
            if rec is None:
                raise ValueError(f"resources {resources_id!r} not found")
            return resources_model(rec)

        return await self._write(run, transaction=False)

    async def get_latest_resources(self) -> ResourcesUpdate | None:
        rec = await self._read("fetchrow", sql.LATEST_RESOURCES)
        return None if rec is None else resources_model(rec)

    async def get_resources_by_id(self, resources_id: str) -> ResourcesUpdate | None:
        if _not_str(resources_id):
            return None
        rec = await self._read("fetchrow", sql.GET_RESOURCES, resources_id)
        return None if rec is None else resources_model(rec)

    async def query_resources(self) -> list[ResourcesUpdate]:
        return [resources_model(rec) for rec in await self._read("fetch", sql.QUERY_RESOURCES)]

    # ------------------------------------------------------------------ workers
    async def query_workers(self, *, status_in: Sequence[WorkerStatus] | None = None) -> list[Worker]:
        statuses = None if status_in is None else [str(s) for s in status_in]
        return [worker_model(rec) for rec in await self._read("fetch", sql.QUERY_WORKERS, statuses)]

    async def get_worker_by_id(self, worker_id: WorkerId) -> Worker | None:
        if isinstance(worker_id, bool) or not isinstance(worker_id, (str, int)):
            return None
        rec = await self._read("fetchrow", sql.GET_WORKER, wkey(worker_id))
        return None if rec is None else worker_model(rec)

    async def update_worker(
        self, worker_id: WorkerId, heartbeat_stats: dict[str, Any] | Unset = UNSET
    ) -> Worker:
        if isinstance(worker_id, bool) or not isinstance(worker_id, (str, int)):
            raise ValueError(f"worker_id must be a string or an integer, got {worker_id!r}")
        if not isinstance(heartbeat_stats, (Unset, dict)):
            raise ValueError(f"heartbeat_stats must be a dict, got {type(heartbeat_stats).__name__}")
        stats = None
        if not isinstance(heartbeat_stats, Unset):
            check_json_value(heartbeat_stats, "heartbeat_stats")  # [issue 16] the JSON rule (_validate)
            stats = _json.encode(dict(heartbeat_stats), "heartbeat_stats")
        await self._rt()
        rec = await self._autocommit(
            "fetchrow", sql.UPSERT_WORKER_HEARTBEAT, wkey(worker_id), self._now(), stats
        )
        worker = worker_model(rec)
        if worker.current_attempt_id is not None:
            # A heartbeat of the attempt it holds: its own statement, which locks only that row.
            await self._autocommit("fetchval", sql.HEARTBEAT_ATTEMPT, worker.current_attempt_id, self._now())
        return worker

    # ------------------------------------------------------------------ misc
    async def statistics(self) -> dict[str, Any]:
        recs = await self._read("fetch", sql.STATISTICS)
        counts: dict[str, dict[str, int]] = {
            "rollouts": dict.fromkeys(sorted(ROLLOUT_STATUSES), 0),
            "attempts": dict.fromkeys(sorted(ATTEMPT_STATUSES), 0),
            "workers": {"busy": 0, "idle": 0, "unknown": 0},
        }
        totals = {"spans": 0, "resources": 0, "queue": 0}
        for rec in recs:
            kind, status, n = rec["kind"], rec["status"], int(rec["n"])
            if kind in counts:
                counts[kind][status] = n
            else:
                totals[kind] = n
        return {
            "name": type(self).__name__,
            "total_rollouts": sum(counts["rollouts"].values()),
            "total_attempts": sum(counts["attempts"].values()),
            "total_spans": totals["spans"],
            "total_resources": totals["resources"],
            "queue_length": totals["queue"],
            "rollouts": counts["rollouts"],
            "attempts": counts["attempts"],
            "workers": counts["workers"],
        }

    # ------------------------------------------------------------------ the watchdog
    async def _settle_due(self) -> float | None:
        """End every live attempt past its deadline; return the next deadline (``None``: none).

        Run by the process that holds the database's watchdog lock (see ``_postgres_events``).
        Each rollout is settled in its own transaction, under its row lock, after re-reading its
        attempts: a heartbeat that came meanwhile wins, and nothing is ended twice.
        """
        now = self._now()
        due = await self._read("fetch", sql.DUE_ROLLOUTS, now, _SETTLE_BATCH)
        busy = False
        for rec in due:

            async def settle(tx: _Tx, rollout_id: str = rec[0]) -> bool:
                try:
                    r, _ = await self._lock(tx, rollout_id, skip_locked=True)
                except ValueError:
                    return False  # another transaction holds it: look again in a moment
                for arec in await tx.conn.fetch(sql.DUE_ATTEMPTS, rollout_id, now):
                    a = AttemptRow.of(arec)
                    verdict, when = a.verdict()
                    if a.status in _LIVE and when is not None and when <= now:
                        self._set_attempt_status(tx, r, a, verdict, when)  # ended at its deadline
                    tx.save_attempt(a)
                tx.save_rollout(r)
                return True

            busy |= not await self._write(settle)
        if busy or len(due) >= _SETTLE_BATCH:
            return now + 0.01
        nxt = await self._read("fetchval", sql.NEXT_DEADLINE)
        return None if nxt is None else float(nxt)


def _connect_options(dsn: str) -> dict[str, Any]:
    """``ssl=False`` for a loopback (or Unix socket) server when the DSN names no ``sslmode``:
    encrypting a connection that never leaves the machine buys nothing, and asyncpg's default
    (``prefer``: ask for TLS, fall back) costs a round trip per connection."""
    from urllib.parse import parse_qs

    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    if "sslmode" in query or "ssl" in query:
        return {}
    host = parts.hostname or (query.get("host") or [""])[0]
    if host == "" or host.startswith("/") or is_loopback(host):
        return {"ssl": False}
    return {}


async def _keep_session(conn: Any) -> None:
    """The pool's reset: nothing beyond asyncpg's own rollback of an unfinished transaction."""


def _not_str(value: object) -> bool:
    """A wrongly typed id (from untyped callers) is an unknown id, not a driver error."""
    return not isinstance(value, str)


def _may_revive(r: RolloutRow, a: AttemptRow) -> bool:
    """An unresponsive attempt may come back only while it is the latest and its rollout is not
    finished (afterwards its results are late)."""
    return r.latest_attempt_id == a.attempt_id and r.status not in TERMINAL_ROLLOUT_STATUSES


def _as_config(config: Any) -> RolloutConfig:
    """A checked config; ``None`` is the default one."""
    return as_config(config) or RolloutConfig()


def _redact(dsn: Any) -> Any:
    """``dsn`` without its password (for messages and ``repr``)."""
    if not isinstance(dsn, str):
        return dsn
    try:
        parts = urlsplit(dsn)
        if parts.password is None:
            return dsn
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable dsn>"
