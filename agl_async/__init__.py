"""agl_async: an asyncio-native execution framework for training agents with RL.

The public surface (see the docs' API reference) is re-exported here.
"""

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
    "ResourcesUpdate",
    "Rollout",
    "RolloutConfig",
    "SharedMemoryExecutionStrategy",
    "Span",
    "Trainer",
    "Worker",
    "__version__",
]
