"""agl_async: an asyncio-native execution framework for training agents with RL.

The public surface (see the docs' API reference) is re-exported here.
"""

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

if TYPE_CHECKING:
    from .algorithm import Algorithm
    from .execution.base import ExecutionEvent, ExecutionStrategy
    from .execution.client_server import ClientServerExecutionStrategy
    from .execution.shared_memory import SharedMemoryExecutionStrategy
    from .http.client import LightningStoreClient
    from .http.server import LightningStoreServer
    from .store import (
        UNSET,
        EnqueueRolloutRequest,
        InMemoryLightningStore,
        LightningStore,
        LightningStoreLocked,
    )
    from .store.postgres import PostgresLightningStore
    from .store.sqlite import SqliteLightningStore
    from .store.urls import open_store
    from .trainer import Trainer
    from .types import (
        Attempt,
        AttemptedRollout,
        ResourcesUpdate,
        Rollout,
        RolloutConfig,
        Span,
        Worker,
    )

# Imported on first access (PEP 562), so that `import agl_async.cli` / `agl-async --help` do not
# pay for uvicorn, starlette, httpx and aiomultiprocess.
_LAZY = {
    "Algorithm": ".algorithm",
    "ExecutionEvent": ".execution.base",
    "ExecutionStrategy": ".execution.base",
    "ClientServerExecutionStrategy": ".execution.client_server",
    "SharedMemoryExecutionStrategy": ".execution.shared_memory",
    "LightningStoreClient": ".http.client",
    "LightningStoreServer": ".http.server",
    "UNSET": ".store",
    "EnqueueRolloutRequest": ".store",
    "InMemoryLightningStore": ".store",
    "LightningStore": ".store",
    "LightningStoreLocked": ".store",
    # durable stores: their modules import their drivers (sqlite3, asyncpg) only when first used
    "SqliteLightningStore": ".store.sqlite",
    "PostgresLightningStore": ".store.postgres",
    "open_store": ".store.urls",
    "Trainer": ".trainer",
    "Attempt": ".types",
    "AttemptedRollout": ".types",
    "ResourcesUpdate": ".types",
    "Rollout": ".types",
    "RolloutConfig": ".types",
    "Span": ".types",
    "Worker": ".types",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__version__ = "0.1.0"

__all__ = [
    "UNSET",
    "Algorithm",
    "Attempt",
    "AttemptedRollout",
    "ClientServerExecutionStrategy",
    "EnqueueRolloutRequest",
    "ExecutionEvent",
    "ExecutionStrategy",
    "InMemoryLightningStore",
    "LightningStore",
    "LightningStoreClient",
    "LightningStoreLocked",
    "LightningStoreServer",
    "PostgresLightningStore",
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "SharedMemoryExecutionStrategy",
    "Span",
    "SqliteLightningStore",
    "Trainer",
    "Worker",
    "__version__",
    "open_store",
]
