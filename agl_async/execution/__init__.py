"""Execution strategies: shared-memory (anyio task group) and client-server (processes).

* :mod:`.events` — ``ExecutionEvent`` and its in-process / cross-process implementations;
* :mod:`.base` — ``ExecutionStrategy``, the alias registry (``resolve_strategy``), env helpers;
* :mod:`.supervision` — bundles as tasks, the stop event, grace deadlines, caller cancellation;
* :mod:`.shared_memory` — ``SharedMemoryExecutionStrategy``;
* :mod:`.processes` — child processes (aiomultiprocess), the four-step shutdown, clean-up;
* :mod:`.client_server` — ``ClientServerExecutionStrategy``.
"""

from .base import ExecutionStrategy, register_strategy, resolve_strategy
from .client_server import ClientServerExecutionStrategy
from .events import ExecutionEvent, ProcessExecutionEvent, ThreadingExecutionEvent
from .shared_memory import SharedMemoryExecutionStrategy

__all__ = [
    "ClientServerExecutionStrategy",
    "ExecutionEvent",
    "ExecutionStrategy",
    "ProcessExecutionEvent",
    "SharedMemoryExecutionStrategy",
    "ThreadingExecutionEvent",
    "register_strategy",
    "resolve_strategy",
]
