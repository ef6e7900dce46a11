"""Which async library runs the current code: the one probe every layer uses.

anyio runs on asyncio or trio. Code that must know which (uvicorn needs asyncio; a connection pool
belongs to the loop that made it; a thread-safe wake-up differs per library) asks here. Asking
never starts, imports or changes an event loop (trio is imported only when it is the one running).
"""

from __future__ import annotations

import asyncio
from typing import Literal

__all__ = ["current_async_library", "loop_identity", "running_asyncio_loop"]


def running_asyncio_loop() -> asyncio.AbstractEventLoop | None:
    """The asyncio loop running in this thread, or ``None`` (no loop, or trio)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def current_async_library() -> Literal["asyncio", "trio"]:
    """``"asyncio"`` or ``"trio"``; call it from async code (anything but asyncio is trio)."""
    return "asyncio" if running_asyncio_loop() is not None else "trio"


def loop_identity() -> object:
    """An object that identifies the running event loop (the asyncio loop, or trio's root task)."""
    loop = running_asyncio_loop()
    if loop is not None:
        return loop
    import trio

    return trio.lowlevel.current_root_task()
