"""``RunnerActor``: one runner bundle inside a Ray actor process (the actor side of the Ray fleet).

The class is plain Python: :mod:`agl_async.execution.ray_fleet` turns it into an *async* Ray actor
(``ray.remote(RunnerActor)``), so every method below runs as a task of the actor's own asyncio
loop and they run concurrently: ``stop()`` and ``wait_stopped()`` reach the actor while ``run()``
is still running. This module does not import Ray; a worker process imports it to build the actor.

What the driver sends is bytes (the runner bundle, pickled with Ray's cloudpickle, and the store or
how to reach it). They are unpickled inside :meth:`RunnerActor.run`, so a bundle whose module is
missing on the node surfaces as the ``ModuleNotFoundError`` of that call (which the driver re-raises
as itself) instead of a failed actor creation.

Stop and cancellation semantics:

* Each actor has its own :class:`~agl_async.execution.events.ThreadingExecutionEvent`, the
  ``event`` its bundle sees. ``stop()`` sets it (the driver calls it when the run's event is set);
  ``wait_stopped()`` returns once it is set, by ``stop()`` or by the bundle itself — the driver
  keeps one such call pending per actor to carry a bundle's ``event.set()`` back to the run. No
  polling on either side.
* ``run()`` runs the bundle once per actor incarnation: a second ``run()`` on the same incarnation
  (the driver re-sends it after a connection blip that Ray reported as "actor unavailable") joins
  the one in progress instead of starting another loop. A restarted actor is a new incarnation
  and starts the bundle afresh (its predecessor's attempts are recovered by the store's watchdog).
* ``ray.cancel`` of ``run()`` cancels the bundle like any asyncio cancellation (the runner loop
  records its attempt in flight as failed, ``"cancelled"``) and then closes the store client.
  The cancelled call's reference resolves at once, before that clean-up: ``wait_finished()``
  returns when it is over.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
from collections.abc import Callable
from typing import Any

import anyio

from .events import ThreadingExecutionEvent

__all__ = ["RunnerActor", "StoreSpec"]

logger = logging.getLogger("agl_async.execution.ray")

StoreSpec = tuple[str, Any]
"""How an actor reaches the store: ``("client", {"endpoint": ..., "auth_token": ..., ...})`` makes a
``LightningStoreClient`` in the actor (closed when ``run()`` ends); ``("store", pickled)`` unpickles
the store itself (``managed_store=False``)."""


def _loads(data: bytes) -> Any:
    try:
        from ray import cloudpickle  # the format the driver used
    except ImportError:  # pragma: no cover - an actor always has Ray
        return pickle.loads(data)
    return cloudpickle.loads(data)


class RunnerActor:
    """Runs ``runner(store, worker_id, event)`` on request; see the module docstring."""

    def __init__(self, runner: bytes, store: StoreSpec, worker_id: int, name: str) -> None:
        # Nothing here can fail on a node that lacks the user's modules: see run().
        self._runner = runner
        self._store_spec = store
        self._worker_id = worker_id
        self._name = name
        self._event = ThreadingExecutionEvent()
        self._task: asyncio.Task[bool] | None = None

    def __repr__(self) -> str:
        return f"RunnerActor({self._name!r}, worker_id={self._worker_id})"

    async def run(self) -> bool:
        """Run the bundle until it returns (joining a run already in progress); returns whether the
        actor's event was set by then. A bundle's exception propagates as itself."""
        if self._task is None:
            self._task = asyncio.ensure_future(self._run_once())
        # Cancelling this call (ray.cancel) cancels the awaited task too: that is the point.
        return await self._task

    async def wait_finished(self) -> None:
        """Return once the bundle of this incarnation has finished, however it ended (the driver
        uses it after ``ray.cancel``, whose reference resolves before the bundle has unwound)."""
        if self._task is not None:
            await asyncio.wait([self._task])

    async def stop(self) -> None:
        """Set this actor's event: the bundle should return soon."""
        self._event.set()

    async def wait_stopped(self) -> None:
        """Return once this actor's event is set (by :meth:`stop` or by the bundle)."""
        await self._event.wait()

    async def _run_once(self) -> bool:
        runner: Callable[..., Any] = _loads(self._runner)
        store, close = self._open_store()
        try:
            logger.debug("%r: runner starting (pid %d)", self, os.getpid())
            await runner(store, self._worker_id, self._event)
            return self._event.is_set()
        finally:
            if close:
                with anyio.CancelScope(shield=True):
                    await store.close()

    def _open_store(self) -> tuple[Any, bool]:
        kind, value = self._store_spec
        if kind == "store":
            return _loads(value), False
        from ..http.client import LightningStoreClient

        return LightningStoreClient(**value), True
