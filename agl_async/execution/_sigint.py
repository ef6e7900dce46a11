"""Ctrl-C as a cancellation: a SIGINT cancels the work in progress instead of interrupting it.

Used by :meth:`ExecutionStrategy.run <agl_async.execution.base.ExecutionStrategy.run>` (the
blocking form of a run) and by every child process of the client-server strategy, so that a
Ctrl-C starts the same orderly shutdown as a cancellation by the caller.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskStatus

__all__ = ["cancel_on_sigint"]

logger = logging.getLogger("agl_async.execution")


async def cancel_on_sigint(fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
    """Await ``fn(*args)``; a SIGINT cancels it instead of raising ``KeyboardInterrupt`` mid-flight.

    Returns ``True`` when a SIGINT arrived (``fn`` was cancelled, or finished meanwhile), ``False``
    when ``fn`` finished without one; ``fn``'s own exception propagates as itself. Further SIGINTs
    while ``fn`` winds down are logged and ignored. Off the main thread (where no signal arrives)
    this is just ``await fn(*args)``.
    """
    if threading.current_thread() is not threading.main_thread():
        await fn(*args)
        return False
    interrupted = False
    outcome: list[BaseException] = []
    fn_scope = anyio.CancelScope()
    watcher_scope = anyio.CancelScope()

    async def watcher(*, task_status: TaskStatus[None]) -> None:
        nonlocal interrupted
        with watcher_scope, anyio.open_signal_receiver(signal.SIGINT) as signals:
            task_status.started()
            async for _ in signals:
                if interrupted:
                    logger.warning("SIGINT again: the shutdown in progress is bounded by its timeouts")
                    continue
                interrupted = True
                logger.warning("SIGINT: cancelling and shutting down")
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
        await tg.start(watcher)  # SIGINT is ours before fn starts
        tg.start_soon(runner)
    if outcome:
        raise outcome[0]
    return interrupted
