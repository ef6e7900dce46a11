"""Stores: the abstract ``LightningStore``, the in-memory store and the locking wrapper."""

from .base import UNSET, EnqueueRolloutRequest, LightningStore, Unset
from .locked import LightningStoreLocked
from .memory import InMemoryLightningStore

__all__ = [
    "UNSET",
    "EnqueueRolloutRequest",
    "InMemoryLightningStore",
    "LightningStore",
    "LightningStoreLocked",
    "Unset",
]
