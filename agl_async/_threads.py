"""Blocking calls in daemon threads that this package owns: they never hold a process open.

:func:`run_in_daemon_thread` is how a synchronous agent runs. On asyncio each call gets a new
``threading.Thread(daemon=True)``; on trio it is trio's own worker thread, a daemon thread
already (``anyio.to_thread.run_sync`` there). A call that never returns (an agent blocked on a socket, a
``time.sleep(3600)``) is abandoned when the awaiting task is cancelled, and, being a daemon
thread, it does not keep the interpreter alive at exit. anyio's worker threads
(``anyio.to_thread.run_sync``) are not daemon threads: one blocked call there made the process
wait forever after the run had ended (``threading._shutdown`` joins them), and a runner process
whose parent had died could not exit (runner processes run asyncio).

Cancellation: cancelling the ``await`` abandons the thread at once; the function keeps running
in it until it returns by itself (Python cannot interrupt a thread), and its result or exception
is discarded. The call runs in a copy of the caller's context (``contextvars``), as
``anyio.to_thread.run_sync`` does, so tracing contexts reach it; and, like one of anyio's worker
threads, it knows the event loop that started it, so ``anyio.from_thread.run(...)`` /
``run_sync(...)`` work in it without a token (agents use that to call async code of the runner's
loop). That is anyio's private per-thread token (``claim_worker_thread`` sets the same), the one
thing taken from anyio beyond its public API, pinned by tests/test_threads.py.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
import anyio.to_thread

from ._backend import current_async_library, threadsafe_setter

_anyio_threadlocals: Any
try:  # where anyio's worker threads keep the token of their event loop (anyio 4.x)
    from anyio._core._eventloop import threadlocals as _anyio_threadlocals
except ImportError:  # pragma: no cover - a future anyio: from_thread then needs token=
    _anyio_threadlocals = None

__all__ = ["run_in_daemon_thread"]

T = TypeVar("T")


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any, name: str = "agl-async-sync") -> T:
    """``fn(*args)`` in a new daemon thread; returns its result or raises its exception (any
    ``BaseException``, as itself). See the module docstring for cancellation."""
    if current_async_library() == "trio":  # trio's worker threads are daemon threads
        return await anyio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
    done = anyio.Event()
    wake = threadsafe_setter(done)
    outcome: list[tuple[bool, Any]] = []
    context = contextvars.copy_context()
    token = anyio.lowlevel.current_token()

    def target() -> None:
        if _anyio_threadlocals is not None:
            _anyio_threadlocals.current_token = token
        try:
            outcome.append((True, context.run(fn, *args)))
        except BaseException as exc:  # handed to the awaiting task, raised there as itself
            outcome.append((False, exc))
        finally:
            wake()

    threading.Thread(target=target, name=name, daemon=True).start()
    await done.wait()
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value
