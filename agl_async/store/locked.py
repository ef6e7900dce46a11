"""``LightningStoreLocked``: serialise every call to a store through one anyio lock.

Shared-memory mode hands this wrapper to all bundles so that each compound operation of the
wrapped store (dequeue with its new attempt, an update with its status propagation) is seen as
atomic by the other tasks, even for stores that await in the middle of an operation.

``wait_for_rollouts`` is the exception: it does not hold the lock while it waits (that would stop
every other bundle); each of its checks is a single atomic step of the wrapped store.

The lock is an ``anyio.Lock``, so the wrapper works on asyncio and trio; it can be created
outside an event loop. Cancellation while waiting for the lock leaves the store untouched.
"""

from __future__ import annotations

from typing import Any

import anyio

from ..types import AttemptedRollout, Rollout, WorkerId
from .base import LightningStore
from .delegation import DelegatingStore

__all__ = ["LightningStoreLocked"]


class LightningStoreLocked(DelegatingStore):
    """Wrap ``store`` so that each call runs under one ``anyio.Lock`` (``wait_for_rollouts``
    excepted: it waits without the lock)."""

    def __init__(self, store: LightningStore) -> None:
        if not isinstance(store, LightningStore):
            raise TypeError(f"LightningStoreLocked wraps a LightningStore, got {type(store).__name__}")
        self.store = store
        self._lock = anyio.Lock(fast_acquire=True)

    def __repr__(self) -> str:
        return f"LightningStoreLocked({self.store!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"store": self.store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["store"])  # type: ignore[misc]

    async def wait_for_rollouts(
        self, *, rollout_ids: list[str], timeout: float | None = None
    ) -> list[Rollout]:
        return await self.store.wait_for_rollouts(rollout_ids=rollout_ids, timeout=timeout)

    async def close(self) -> None:
        await self.store.close()

    async def dequeue_rollout(
        self, worker_id: WorkerId | None = None, *, timeout: float | None = None
    ) -> AttemptedRollout | None:
        """Non-blocking form under the lock; the long-poll form (``timeout > 0``) waits without
        the lock, like ``wait_for_rollouts``: each of its claims is one atomic step of the store.

        That relies on the wrapped store's long-poll claim being atomic on its own (true of
        ``InMemoryLightningStore``, whose claim never awaits); a store that awaits between reading
        the queue and claiming must make its long poll safe itself."""
        if timeout:
            return await self.store.dequeue_rollout(worker_id, timeout=timeout)
        async with self._lock:
            return await self.store.dequeue_rollout(worker_id, timeout=timeout)
