"""Generated store methods for wrapper stores that forward every call to a wrapped ``self.store``.

``LightningStoreLocked`` (under its lock) and ``LightningStoreServer`` (for calls made in its own
process) are both stores around a store; instead of re-declaring each method only to forward it,
they generate the forwarding method from the ``LightningStore`` method it implements::

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

__all__ = ["delegate"]

M = TypeVar("M", bound=Callable[..., Coroutine[Any, Any, Any]])


def delegate(method: M, *, locked: bool = False) -> M:
    """A method that awaits ``self.store.<name>(*args, **kwargs)``, where ``name`` is ``method``'s;
    with ``locked``, under ``async with self._lock``. ``method`` is the ``LightningStore``
    method being implemented; its type is the result's."""
    name = method.__name__

    if locked:

        async def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            async with self._lock:
                return await getattr(self.store, name)(*args, **kwargs)

    else:

        async def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
            return await getattr(self.store, name)(*args, **kwargs)

    # updated=(): not the abstract method's __dict__ (its __isabstractmethod__ would make the
    # wrapper class abstract again).
    functools.update_wrapper(forward, method, updated=())
    forward.__qualname__ = name
    return cast(M, forward)
