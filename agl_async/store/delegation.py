"""Stores around a store: :class:`DelegatingStore` forwards every call to a wrapped ``self.store``.

``LightningStoreLocked`` (under its lock) and ``LightningStoreServer`` (for calls made in its own
process) are both stores around a store. Instead of re-declaring each method only to forward it,
:class:`DelegatingStore` generates each forwarding method, once, from the ``LightningStore`` method
it implements::

    enqueue_rollout = delegate(LightningStore.enqueue_rollout)

The generated method keeps the abstract method's static type (so callers are type-checked as
against ``LightningStore``), its name, docstring and, through ``__wrapped__``, its signature for
``inspect.signature`` / ``help()``. Cancellation is the wrapped store's: the forwarding adds no
await of its own beyond taking the lock, and a call cancelled while waiting for the lock never
reaches the wrapped store.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, cast

from .base import LightningStore

__all__ = ["DelegatingStore", "delegate"]

M = TypeVar("M", bound=Callable[..., Coroutine[Any, Any, Any]])


def delegate(method: M) -> M:
    """A method that awaits ``self.store.<name>(*args, **kwargs)``, where ``name`` is ``method``'s,
    under ``async with self._lock`` when the instance has a lock. ``method`` is the
    ``LightningStore`` method being implemented; its type is the result's."""
    name = method.__name__

    async def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        lock = self._lock
        if lock is None:
            return await getattr(self.store, name)(*args, **kwargs)
        async with lock:
            return await getattr(self.store, name)(*args, **kwargs)

    # updated=(): not the abstract method's __dict__ (its __isabstractmethod__ would make the
    # wrapper class abstract again).
    functools.update_wrapper(forward, method, updated=())
    forward.__qualname__ = name
    return cast(M, forward)


class DelegatingStore(LightningStore):
    """A store whose every method awaits the same method of ``self.store`` (set by the subclass).

    ``close()`` is not forwarded: whoever made the wrapped store closes it, unless a subclass says
    otherwise. A subclass that sets ``_lock`` (an async context manager such as ``anyio.Lock``)
    runs each call under it."""

    store: LightningStore
    _lock: Any = None

    @property
    def long_poll_is_cancel_safe(self) -> bool:  # type: ignore[override]
        """The wrapped store's (the forwarding adds no await after the claim)."""
        return self.store.long_poll_is_cancel_safe

    enqueue_rollout = delegate(LightningStore.enqueue_rollout)
    enqueue_many_rollouts = delegate(LightningStore.enqueue_many_rollouts)
    dequeue_rollout = delegate(LightningStore.dequeue_rollout)
    dequeue_many_rollouts = delegate(LightningStore.dequeue_many_rollouts)
    unclaim_rollout = delegate(LightningStore.unclaim_rollout)
    finish_and_dequeue = delegate(LightningStore.finish_and_dequeue)
    start_rollout = delegate(LightningStore.start_rollout)
    start_attempt = delegate(LightningStore.start_attempt)
    update_rollout = delegate(LightningStore.update_rollout)
    update_attempt = delegate(LightningStore.update_attempt)
    wait_for_rollouts = delegate(LightningStore.wait_for_rollouts)
    get_rollout_by_id = delegate(LightningStore.get_rollout_by_id)
    query_rollouts = delegate(LightningStore.query_rollouts)
    query_attempts = delegate(LightningStore.query_attempts)
    get_latest_attempt = delegate(LightningStore.get_latest_attempt)
    add_span = delegate(LightningStore.add_span)
    add_many_spans = delegate(LightningStore.add_many_spans)
    query_spans = delegate(LightningStore.query_spans)
    get_next_span_sequence_id = delegate(LightningStore.get_next_span_sequence_id)
    add_resources = delegate(LightningStore.add_resources)
    update_resources = delegate(LightningStore.update_resources)
    get_latest_resources = delegate(LightningStore.get_latest_resources)
    get_resources_by_id = delegate(LightningStore.get_resources_by_id)
    query_resources = delegate(LightningStore.query_resources)
    query_workers = delegate(LightningStore.query_workers)
    get_worker_by_id = delegate(LightningStore.get_worker_by_id)
    update_worker = delegate(LightningStore.update_worker)
    statistics = delegate(LightningStore.statistics)
