"""``ExecutionEvent``: the cooperative stop signal shared by all bundles of one run.

Two implementations:

* :class:`ThreadingExecutionEvent` (shared-memory mode): settable from any thread; each
  ``await wait()`` parks on an ``anyio.Event`` of the waiter's own loop, and ``set()`` wakes it with
  the loop's thread-safe scheduling call (``call_soon_threadsafe`` on asyncio, the trio token's
  ``run_sync_soon`` on trio). No polling.
* :class:`ProcessExecutionEvent` (client-server mode): a pipe that is written once and never read.
  Every process of the run holds both ends (they travel to spawned children with the process
  arguments), so the read end stays readable in all of them once any of them has set the event.
  ``await wait()`` is ``anyio.wait_readable`` on a private duplicate of the read end: no polling,
  and any number of tasks of any process can wait at once.

Cancellation: cancelling ``await event.wait()`` changes nothing; the waiter is deregistered (or
its duplicate descriptor closed) on the way out.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio.lowlevel import checkpoint

from .._backend import running_asyncio_loop

__all__ = ["ExecutionEvent", "ProcessExecutionEvent", "ThreadingExecutionEvent"]


@runtime_checkable
class ExecutionEvent(Protocol):
    """The stop signal handed to every bundle.

    ``set()`` is idempotent and callable from any thread (and, for the client-server event, any
    process) of the run; ``is_set()`` never blocks; ``await wait()`` returns once the event is set,
    is cancellable, and does not poll.
    """

    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


def _threadsafe_waker(event: anyio.Event) -> Callable[[], None]:
    """Return a callable that sets ``event`` (bound to the running loop) from any thread."""
    loop = running_asyncio_loop()
    if loop is not None:
        running = loop

        def wake_asyncio() -> None:
            try:
                running.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

        return wake_asyncio

    import trio  # the only other backend anyio runs on

    token = trio.lowlevel.current_trio_token()

    def wake_trio() -> None:
        try:
            token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass

    return wake_trio


class ThreadingExecutionEvent:
    """In-process :class:`ExecutionEvent`: set from any thread, awaited on any asyncio/trio loop."""

    __slots__ = ("_flag", "_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flag = False
        self._waiters: set[Callable[[], None]] = set()

    def __repr__(self) -> str:
        return f"<ThreadingExecutionEvent set={self._flag}>"

    def __reduce__(self) -> Any:
        raise TypeError(
            "ThreadingExecutionEvent cannot cross a process boundary; the client-server strategy "
            "uses ProcessExecutionEvent"
        )

    def set(self) -> None:
        with self._lock:
            if self._flag:
                return
            self._flag = True
            waiters, self._waiters = self._waiters, set()
        for wake in waiters:
            wake()

    def is_set(self) -> bool:
        return self._flag

    async def wait(self) -> None:
        woken = anyio.Event()
        wake = _threadsafe_waker(woken)
        with self._lock:
            already = self._flag
            if not already:
                self._waiters.add(wake)
        if already:
            await checkpoint()
            return
        try:
            await woken.wait()
        finally:
            with self._lock:
                self._waiters.discard(wake)


def _readable_now(fd: int) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    readable, _, _ = select.select([fd], [], [], 0)  # pragma: no cover - non-POSIX
    return bool(readable)


class ProcessExecutionEvent:
    """Cross-process :class:`ExecutionEvent` backed by a level-triggered pipe.

    Pickles only while a child process is being spawned (the descriptors are passed to the child
    by the start method), like ``multiprocessing``'s own synchronisation primitives. ``close()``
    releases this process's descriptors; afterwards ``is_set()`` reports the state at close time
    and ``set()`` only changes that local state.
    """

    __slots__ = ("__weakref__", "_closed_flag", "_lock", "_r", "_w")

    def __init__(self) -> None:
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._init(r, w)

    def _init(self, r: int, w: int) -> None:
        self._r: int | None = r
        self._w: int | None = w
        self._closed_flag = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ProcessExecutionEvent set={self.is_set()}>"

    def __reduce__(self) -> Any:
        from multiprocessing import context, reduction

        context.assert_spawning(self)
        if self._r is None or self._w is None:
            raise ValueError("a closed ProcessExecutionEvent cannot be sent to a child process")
        return _rebuild_process_event, (reduction.DupFd(self._r), reduction.DupFd(self._w))

    def set(self) -> None:
        with self._lock:
            if self._w is None:
                self._closed_flag = True
                return
            if _readable_now(self._r):  # type: ignore[arg-type]
                return
            try:
                os.write(self._w, b"\x01")
            except BlockingIOError:  # pipe full: it is set already
                pass

    def is_set(self) -> bool:
        with self._lock:
            if self._r is None:
                return self._closed_flag
            return _readable_now(self._r)

    async def wait(self) -> None:
        with self._lock:
            if self._r is None:
                fd = None
            else:
                fd = os.dup(self._r)  # one descriptor per waiter: any number may wait at once
        if fd is None:
            if self._closed_flag:
                await checkpoint()
                return
            await anyio.sleep_forever()  # closed unset: nothing can set it any more
        assert fd is not None
        try:
            await anyio.wait_readable(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Release this process's descriptors (idempotent)."""
        with self._lock:
            if self._r is None or self._w is None:
                return
            self._closed_flag = _readable_now(self._r)
            r, w = self._r, self._w
            self._r = self._w = None
        os.close(r)
        os.close(w)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass


def _rebuild_process_event(r: Any, w: Any) -> ProcessExecutionEvent:
    event = ProcessExecutionEvent.__new__(ProcessExecutionEvent)
    event._init(r.detach(), w.detach())
    return event
