"""``ExecutionStrategy``: how the algorithm bundle and the runner bundles of one run are executed.

A strategy's ``await execute(algorithm, runner, store)`` runs one whole run inside the caller's
event loop; ``run(...)`` is the blocking convenience that starts a loop with ``anyio.run`` and
turns Ctrl-C into the same shutdown as cancelling ``execute``, then raises ``KeyboardInterrupt``.
The bundles are the two callables described by :class:`AlgorithmBundle` and :class:`RunnerBundle`.
"""

from __future__ import annotations

import abc
from typing import Protocol

import anyio

from ..store.base import LightningStore
from ._sigint import cancel_on_sigint
from .events import ExecutionEvent

__all__ = ["AlgorithmBundle", "ExecutionEvent", "ExecutionStrategy", "RunnerBundle"]


class AlgorithmBundle(Protocol):
    """``async def algorithm(store, event)``: the training side of a run."""

    async def __call__(self, store: LightningStore, event: ExecutionEvent) -> None: ...


class RunnerBundle(Protocol):
    """``async def runner(store, worker_id, event)``: one rollout worker (``worker_id`` 0 … n-1)."""

    async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None: ...


class ExecutionStrategy(abc.ABC):
    """Runs an algorithm bundle and runner bundles against one store.

    Subclasses implement :meth:`execute`.
    """

    @abc.abstractmethod
    async def execute(self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore) -> None:
        """Run one whole run inside the running event loop and return when every bundle is done.

        Never starts an event loop itself. The first error of a bundle is re-raised as itself;
        cancelling the call shuts the run down (event, grace, cancel) before the cancellation
        propagates.
        """

    def run(
        self,
        algorithm: AlgorithmBundle,
        runner: RunnerBundle,
        store: LightningStore,
        *,
        backend: str = "asyncio",
    ) -> None:
        """Blocking form of :meth:`execute` for code without an event loop.

        Ctrl-C (SIGINT, when called from the main thread) cancels ``execute`` — i.e. the same
        cooperative shutdown as a cancellation by the caller — and, once it has finished,
        raises ``KeyboardInterrupt``. Further Ctrl-Cs during that shutdown are logged and ignored:
        the shutdown is bounded by the strategy's own timeouts.
        """
        anyio.run(self._run_main, algorithm, runner, store, backend=backend)

    async def _run_main(
        self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore
    ) -> None:
        if await cancel_on_sigint(self.execute, algorithm, runner, store):
            raise KeyboardInterrupt
