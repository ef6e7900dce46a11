"""Stop signals as a cancellation: a SIGINT (Ctrl-C) or SIGTERM cancels the work in progress
instead of interrupting it.

Used by :meth:`ExecutionStrategy.run <agl_async.execution.base.ExecutionStrategy.run>` (the
blocking form of a run: SIGINT and SIGTERM, which docker, Kubernetes and SLURM send) and by every
child process of the client-server strategy (SIGINT only: a child's SIGTERM keeps its default
action, death, because it is the ``terminate()`` step of the shutdown escalation), so that a stop
signal starts the same orderly shutdown as a cancellation by the caller.

Start-up: :func:`blocked_stop_signals` holds SIGINT back in the thread that spawns children; a
spawned child inherits that signal mask, so a terminal's Ctrl-C that reaches a child while it is
still starting (importing, unpickling its bundle) stays pending instead of killing it with a
``KeyboardInterrupt`` traceback (exit code -2). :func:`cancel_on_signals` unblocks it once its
handler is in place, and the pending Ctrl-C then cancels the child's bundle like any other.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = ["EXIT_CODE_SIGTERM", "Terminated", "blocked_stop_signals", "cancel_on_signals"]

logger = logging.getLogger("agl_async.execution")

#: The exit code of a process stopped by SIGTERM after its shutdown (128 + 15, as a shell reports
#: a death by SIGTERM; Ctrl-C gives 130).
EXIT_CODE_SIGTERM = 128 + signal.SIGTERM


class Terminated(SystemExit):
    """Raised by a blocking run that SIGTERM stopped, once its shutdown is complete: the process
    exits with code 143 and no traceback unless something catches it."""

    def __init__(self) -> None:
        super().__init__(EXIT_CODE_SIGTERM)


@contextlib.contextmanager
def blocked_stop_signals() -> Iterator[None]:
    """Block SIGINT in this thread for the duration (children spawned meanwhile inherit the mask;
    see the module docstring). A no-op where signal masks do not exist."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - non-POSIX
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


async def cancel_on_signals(
    fn: Callable[..., Awaitable[Any]],
    *args: Any,
    signals: Collection[signal.Signals] = (signal.SIGINT,),
) -> signal.Signals | None:
    """Await ``fn(*args)``; the first of ``signals`` to arrive cancels it instead of interrupting.

    Returns the signal that arrived (``fn`` was cancelled, or finished meanwhile), ``None`` when
    ``fn`` finished without one; ``fn``'s own exception propagates as itself. Further signals
    while ``fn`` winds down are logged and ignored. Off the main thread (where no signal arrives)
    this is just ``await fn(*args)``.
    """
    if threading.current_thread() is not threading.main_thread():
        await fn(*args)
        return None
    received: signal.Signals | None = None
    outcome: list[BaseException] = []
    fn_scope = anyio.CancelScope()
    watcher_scope = anyio.CancelScope()

    async def watcher(*, task_status: TaskStatus[None]) -> None:
        nonlocal received
        with watcher_scope, anyio.open_signal_receiver(*signals) as arrived:
            if hasattr(signal, "pthread_sigmask"):  # a Ctrl-C held back during start-up comes now
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            task_status.started()
            async for signum in arrived:
                name = signal.Signals(signum).name
                if received is not None:
                    logger.warning("%s again: the shutdown in progress is bounded by its timeouts", name)
                    continue
                received = signal.Signals(signum)
                logger.warning("%s: cancelling and shutting down", name)
                fn_scope.cancel()

    async def runner() -> None:
        try:
            with fn_scope:
                await fn(*args)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # anything but the cancellation absorbed by fn_scope
            outcome.append(exc)
        finally:
            watcher_scope.cancel()

    async with anyio.create_task_group() as tg:
        await tg.start(watcher)  # the signals are ours before fn starts
        tg.start_soon(runner)
    if outcome:
        raise outcome[0]
    return received
