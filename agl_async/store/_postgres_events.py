"""Cross-process wake-ups and the once-per-database watchdog of the PostgreSQL store.

Wake-ups (LISTEN/NOTIFY)
    A transaction that changes something others may wait for sends a notification on
    :data:`NOTIFY_CHANNEL` *inside* the transaction, so PostgreSQL delivers it at commit, to
    every process listening, only if the change happened:

    * ``q <n>`` — ``n`` rollouts entered the queue: up to ``n`` long-polling dequeues of each
      process try to claim (the longest waiting first), not all of them;
    * ``t <id> <id> …`` — these rollouts became terminal (``wait_for_rollouts`` calls waiting
      for one of them look again);
    * ``d <epoch seconds>`` — a live attempt got a deadline (the watchdog may have to wake
      earlier).

    Each store keeps one listening connection (:class:`Listener`); its callback only sets
    events of this process (:class:`Wakeups`), never queries. When that connection is lost,
    every waiter is woken (a notification may have been missed) and looks at the database
    itself until it is back; it reconnects with backoff. No waiter polls while it is up.

The watchdog (:class:`Watchdog`)
    Every open store runs a candidate that blocks in ``pg_advisory_lock`` on a connection of
    its own: exactly one per database holds it and is the watchdog; when its process dies, its
    session ends and another candidate gets the lock at once. The holder sleeps until the nearest
    deadline in the database (or an earlier ``d`` notification), then ends the attempts that are
    due. Ending an attempt locks its rollout and re-checks the deadline, so a second watchdog
    (say, one that lost its lock without noticing yet) can never end one twice.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg

from ._postgres_schema import NOTIFY_CHANNEL, WATCHDOG_LOCK_KEY

__all__ = [
    "CONNECTION_ERRORS",
    "PG_ERRORS",
    "Listener",
    "QueueWaiter",
    "Wakeups",
    "Watchdog",
    "notify_payloads",
]

logger = logging.getLogger("agl_async")

#: PostgreSQL refuses payloads of 8000 bytes and more.
_MAX_PAYLOAD = 7900
#: How long the watchdog sleeps at most when it knows of no deadline (a safety net only: new
#: deadlines wake it through ``d`` notifications).
_WATCHDOG_MAX_SLEEP = 30.0
_BACKOFF_MAX = 5.0
#: A background connection quiet this long is checked with a ``SELECT 1``…
PING_INTERVAL = 15.0
#: …which must answer within this many seconds, else it counts as lost.
PING_TIMEOUT = 5.0


def notify_payloads(terminal: list[str]) -> list[str]:
    """The ``t …`` payloads announcing ``terminal`` rollout ids, each within PostgreSQL's limit."""
    out: list[str] = []
    current = "t"
    for rid in terminal:
        if len(current) + 1 + len(rid) > _MAX_PAYLOAD:
            out.append(current)
            current = "t"
        current += " " + rid
    if current != "t":
        out.append(current)
    return out


class QueueWaiter:
    """One long-polling dequeue waiting for the queue; its event is set when it is its turn."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = anyio.Event()


class _Waiter:
    """One ``wait_for_rollouts`` call: the ids it waits for, those announced finished since it
    last looked (``hits``), and whether it must look at all of them again (``everything``: a
    notification may have been lost)."""

    __slots__ = ("event", "everything", "hits", "remaining")

    def __init__(self, remaining: set[str]) -> None:
        self.remaining = remaining
        self.hits: set[str] = set()
        self.everything = False
        self.event = anyio.Event()

    def take(self) -> tuple[set[str], bool]:
        """What to look at now (and start collecting anew)."""
        hits, everything = self.hits, self.everything
        self.hits, self.everything = set(), False
        self.event = anyio.Event()
        return hits, everything


class Wakeups:
    """This process's waiters, woken by notifications (or by everything when they may be lost)."""

    def __init__(self) -> None:
        self._queue_waiters: collections.deque[QueueWaiter] = collections.deque()
        self._waiters: dict[str, list[_Waiter]] = {}
        self._deadline_event: anyio.Event | None = None
        self._deadline_target = math.inf
        #: False while no listening connection is up: waiters then look at the database at least
        #: every :attr:`degraded_interval` seconds themselves.
        self.listening = False
        self.degraded_interval = 0.5

    # ------------------------------------------------------------------ the queue
    def queue_waiter(self) -> QueueWaiter:
        """A place in the line of long polls; take it *before* looking at the queue."""
        waiter = QueueWaiter()
        self._queue_waiters.append(waiter)
        return waiter

    def leave_queue_line(self, waiter: QueueWaiter) -> None:
        with contextlib.suppress(ValueError):
            self._queue_waiters.remove(waiter)

    def queue_changed(self, count: int | None = None) -> None:
        """``count`` rollouts entered the queue: wake that many long polls, the longest waiting
        first (``None``: all of them)."""
        waiters = self._queue_waiters
        n = len(waiters) if count is None else min(count, len(waiters))
        for _ in range(n):
            waiters.popleft().event.set()

    # ------------------------------------------------------------------ terminal rollouts
    def register(self, rollout_ids: set[str]) -> _Waiter:
        """A waiter for ``rollout_ids``; register it *before* reading their statuses."""
        waiter = _Waiter(set(rollout_ids))
        for rid in rollout_ids:
            self._waiters.setdefault(rid, []).append(waiter)
        return waiter

    def forget(self, waiter: _Waiter) -> None:
        for rid in waiter.remaining:
            waiters = self._waiters.get(rid)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[rid]

    def finished(self, rollout_ids: list[str]) -> None:
        for rid in rollout_ids:
            for waiter in self._waiters.get(rid, ()):
                waiter.hits.add(rid)
                waiter.event.set()

    # ------------------------------------------------------------------ deadlines (watchdog)
    def deadline_event(self, target: float) -> anyio.Event:
        """The event a ``d`` notification earlier than ``target`` sets."""
        self._deadline_target = target
        self._deadline_event = anyio.Event()
        return self._deadline_event

    def retarget_deadline(self, target: float) -> None:
        """Lower or raise the bar of the current deadline event (no await: nothing is missed)."""
        self._deadline_target = target

    def new_deadline(self, due: float) -> None:
        if due < self._deadline_target:
            self.poke_watchdog()

    def poke_watchdog(self) -> None:
        if self._deadline_event is not None:
            self._deadline_event.set()

    # ------------------------------------------------------------------ dispatch
    def wake_all(self) -> None:
        """Wake everyone: something may have happened that no notification told us."""
        self.queue_changed()
        for waiters in self._waiters.values():
            for waiter in waiters:
                waiter.everything = True
                waiter.event.set()
        self.poke_watchdog()

    def dispatch(self, payload: str) -> None:
        kind, _, rest = payload.partition(" ")
        if kind == "q":
            self.queue_changed(int(rest) if rest.isdigit() else None)
        elif kind == "t":
            self.finished(rest.split())
        elif kind == "d":
            try:
                self.new_deadline(float(rest))
            except ValueError:
                self.wake_all()
        else:
            self.wake_all()


Connect = Callable[[], Awaitable[Any]]

#: What a lost, refused or broken connection raises (and nothing else: a server error about
#: a statement is a bug to report, not a connection to retry).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutdown, terminated backend
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.InterfaceError,  # "connection is closed"
    asyncpg.exceptions.InternalClientError,  # a connection the server ended mid-operation
)
#: What the background connections (listener, watchdog candidate) recover from by reconnecting.
PG_ERRORS: tuple[type[BaseException], ...] = (*CONNECTION_ERRORS, asyncpg.PostgresError)
_PING_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, *PG_ERRORS)


async def _sleep_backoff(attempt: int) -> None:
    await anyio.sleep(min(0.05 * 2**attempt, _BACKOFF_MAX))


class Listener:
    """Keeps one connection LISTENing on :data:`NOTIFY_CHANNEL` and feeds :class:`Wakeups`.

    ``run()`` loops until cancelled: connect, LISTEN, wait for the connection to end, reconnect
    with backoff. Cancelling it closes the connection.
    """

    def __init__(self, connect: Connect, wakeups: Wakeups) -> None:
        self._connect = connect
        self._wakeups = wakeups
        self._conn: Any = None
        self._closing = False
        self.connected = anyio.Event()  # set once the first LISTEN is in place

    def abort(self) -> None:
        """Drop the connection at once (before cancelling :meth:`run`, at the store's close)."""
        self._closing = True
        _terminate(self._conn)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self._wakeups.dispatch(payload)

    async def run(self) -> None:
        failures = 0
        while True:
            conn = None
            try:
                conn = self._conn = await _connect_shielded(self._connect)
                lost = anyio.Event()
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                if failures:
                    logger.info("PostgresLightningStore: listening for wake-ups again")
                failures = 0
                self._wakeups.listening = True
                self._wakeups.wake_all()  # notifications sent while we were away are lost
                self.connected.set()
                await _until_lost(conn, lost)
                if not self._closing:
                    logger.warning("PostgresLightningStore: the wake-up connection was lost; reconnecting")
            except PG_ERRORS as exc:
                if failures == 0 and not self._closing:
                    logger.warning("PostgresLightningStore: cannot listen for wake-ups (%s); retrying", exc)
            finally:
                self._wakeups.listening = False
                self._wakeups.wake_all()
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(conn)
            await _sleep_backoff(failures)
            failures += 1


class Watchdog:
    """Contends for the database's watchdog lock and, while holding it, ends attempts when due.

    ``settle()`` ends what is due now and returns the next deadline (``None``: none); ``now()``
    is the store's clock. ``run()`` loops until cancelled.
    """

    def __init__(
        self,
        connect: Connect,
        wakeups: Wakeups,
        settle: Callable[[], Awaitable[float | None]],
        now: Callable[[], float],
    ) -> None:
        self._connect = connect
        self._wakeups = wakeups
        self._settle = settle
        self._now = now
        self._conn: Any = None
        self._closing = False
        self.leading = False

    def abort(self) -> None:
        """Drop the connection at once (before cancelling :meth:`run`, at the store's close): a
        candidate waiting for the lock stops waiting, a holder releases it."""
        self._closing = True
        _terminate(self._conn)

    async def run(self) -> None:
        failures = 0
        while True:
            conn = None
            try:
                conn = self._conn = await _connect_shielded(self._connect)
                lost = anyio.Event()

                def on_lost(_conn: Any = None, lost: anyio.Event = lost) -> None:
                    lost.set()
                    self._wakeups.poke_watchdog()

                conn.add_termination_listener(on_lost)
                # Blocks until this process's candidate is the one: no polling for leadership.
                # Not cancellable (asyncpg would open a connection to cancel it): abort() ends it.
                with anyio.CancelScope(shield=True):
                    await conn.execute("SELECT pg_advisory_lock($1)", WATCHDOG_LOCK_KEY)
                failures = 0
                self.leading = True
                logger.debug("PostgresLightningStore: this process runs the watchdog of the database")
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_until_lost, conn, lost, on_lost)  # ends by setting `lost` (or cancelled)
                    await self._lead(lost)
                    tg.cancel_scope.cancel()
            except Exception as exc:
                if failures == 0 and not self._closing:
                    logger.warning("PostgresLightningStore: watchdog connection failed (%r); retrying", exc)
            finally:
                self.leading = False
                if conn is not None:
                    with anyio.CancelScope(shield=True):
                        await _close_quietly(conn)
            await _sleep_backoff(failures)
            failures += 1

    async def _lead(self, lost: anyio.Event) -> None:
        """Settle, sleep until the next deadline (or an earlier one is announced), repeat; return
        when the connection holding the lock is lost."""
        failures = 0
        while not lost.is_set():
            # Take the event before looking, so that a deadline announced meanwhile is not missed.
            event = self._wakeups.deadline_event(math.inf)
            try:
                due = await self._settle()
                failures = 0
            except Exception as exc:  # the watchdog must outlive any one failure
                if failures == 0:
                    logger.warning("PostgresLightningStore: the watchdog could not end due attempts: %r", exc)
                await _sleep_backoff(failures)
                failures += 1
                continue
            if event.is_set():
                continue
            self._wakeups.retarget_deadline(math.inf if due is None else due)
            sleep = _WATCHDOG_MAX_SLEEP
            if due is not None:
                sleep = min(max(due - self._now(), 0.0), _WATCHDOG_MAX_SLEEP)
            if not self._wakeups.listening:
                sleep = min(sleep, self._wakeups.degraded_interval)
            with anyio.move_on_after(sleep + 0.001):
                await event.wait()


async def _until_lost(conn: Any, lost: anyio.Event, on_lost: Callable[[], None] | None = None) -> None:
    """Return when ``conn`` is lost, noticing a silently dead one too: every
    :data:`PING_INTERVAL` seconds of quiet it must answer a ``SELECT 1`` within
    :data:`PING_TIMEOUT` (notifications still arrive meanwhile)."""
    while not lost.is_set():
        with anyio.move_on_after(PING_INTERVAL):
            await lost.wait()
        if lost.is_set():
            return
        try:
            with anyio.CancelScope(shield=True), anyio.fail_after(PING_TIMEOUT):
                await conn.fetchval("SELECT 1")  # not cut by a cancellation: bounded instead
        except _PING_ERRORS:
            lost.set()
            if on_lost is not None:
                on_lost()


async def _connect_shielded(connect: Connect) -> Any:
    """Connect, not cancellable midway (bounded by the connect timeout): asyncpg leaves a future
    with an unretrieved exception behind when cancelled during its SSL negotiation."""
    with anyio.CancelScope(shield=True):
        conn = await connect()
    try:
        await anyio.lowlevel.checkpoint()  # a cancellation that came meanwhile: hand it back closed
    except BaseException:
        with anyio.CancelScope(shield=True):
            await _close_quietly(conn)
        raise
    return conn


def _terminate(conn: Any) -> None:
    if conn is not None and not conn.is_closed():
        conn.terminate()


async def _close_quietly(conn: Any) -> None:
    try:
        with anyio.fail_after(2.0):
            await conn.close()
    except BaseException:
        conn.terminate()
