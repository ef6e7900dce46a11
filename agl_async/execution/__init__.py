"""Execution strategies: shared-memory (anyio task group) and client-server (processes).

* :mod:`.events` — ``ExecutionEvent`` and its in-process / cross-process implementations;
* :mod:`.base` — ``ExecutionStrategy`` and the bundle protocols;
* :mod:`.registry` — strategies by alias (``resolve_strategy``);
* :mod:`.supervision` — bundles as tasks, the stop event, grace deadlines, caller cancellation;
* :mod:`.shared_memory` — ``SharedMemoryExecutionStrategy``;
* :mod:`.processes` — child processes: spawning, the lifeline to the parent, clean-up;
* :mod:`.shutdown` — the four-step shutdown of child processes;
* :mod:`.client_server` — ``ClientServerExecutionStrategy``.
"""

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .base import ExecutionStrategy
    from .client_server import ClientServerExecutionStrategy
    from .events import ExecutionEvent, ProcessExecutionEvent, ThreadingExecutionEvent
    from .registry import resolve_strategy
    from .shared_memory import SharedMemoryExecutionStrategy

# Imported on first access (PEP 562): a runner child process imports this package for
# ``.processes`` / ``.events`` and must not pay for the server side (uvicorn, starlette).
_LAZY = {
    "ExecutionStrategy": ".base",
    "resolve_strategy": ".registry",
    "ClientServerExecutionStrategy": ".client_server",
    "ExecutionEvent": ".events",
    "ProcessExecutionEvent": ".events",
    "ThreadingExecutionEvent": ".events",
    "SharedMemoryExecutionStrategy": ".shared_memory",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ClientServerExecutionStrategy",
    "ExecutionEvent",
    "ExecutionStrategy",
    "ProcessExecutionEvent",
    "SharedMemoryExecutionStrategy",
    "ThreadingExecutionEvent",
    "resolve_strategy",
]
