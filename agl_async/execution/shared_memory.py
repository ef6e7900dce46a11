"""``SharedMemoryExecutionStrategy``: the algorithm and the runners as tasks of one anyio task group.

Everything runs on the caller's event loop (asyncio or trio); there are no threads and no
processes. The bundles share a :class:`~agl_async.execution.events.ThreadingExecutionEvent`
(so code a bundle hands to a worker thread may set it too) and, with ``managed_store``, a
:class:`~agl_async.store.locked.LightningStoreLocked` around the given store.

Stop and cancellation semantics (implemented by :class:`~agl_async.execution.supervision.Supervisor`):

* ``main_thread="algorithm"``: when the algorithm returns, the event is set; bundles still running
  get ``graceful_delay`` seconds (a deadline on their cancel scope) and are then cancelled.
* ``main_thread="runner"`` (one runner): when the runner returns, the algorithm is awaited until it
  returns by itself; the algorithm returning first does not stop the runner.
* The event being set by anyone — a bundle, a thread — starts the same grace period for all
  bundles still running.
* A bundle raising sets the event, the others get the grace period, and ``execute`` re-raises
  that first error as itself.
* Cancelling ``execute`` (or Ctrl-C under :meth:`run`) sets the event, grants the grace period,
  cancels the rest, then lets the cancellation (``KeyboardInterrupt``) propagate. No task is left
  running when ``execute`` returns or raises.
"""

from __future__ import annotations

import logging
from typing import Literal

from .._validate import check_count, check_seconds
from ..store.base import LightningStore
from ..store.locked import LightningStoreLocked
from ._env import env_bool
from .base import AlgorithmBundle, ExecutionStrategy, RunnerBundle
from .events import ThreadingExecutionEvent
from .supervision import Supervisor

__all__ = ["SharedMemoryExecutionStrategy"]

logger = logging.getLogger("agl_async.execution.shm")


class SharedMemoryExecutionStrategy(ExecutionStrategy):
    """Bundles as tasks of one anyio task group on the caller's loop (asyncio or trio).

    ``managed_store`` (None: env ``AGL_MANAGED_STORE``, default true) wraps the store in
    ``LightningStoreLocked``; false hands the store over as it is.
    """

    def __init__(
        self,
        n_runners: int = 1,
        main_thread: Literal["algorithm", "runner"] = "algorithm",
        graceful_delay: float = 5.0,
        managed_store: bool | None = None,
    ) -> None:
        check_count(n_runners, "n_runners")
        if main_thread not in ("algorithm", "runner"):
            raise ValueError(f"main_thread must be 'algorithm' or 'runner', got {main_thread!r}")
        if main_thread == "runner" and n_runners != 1:
            raise ValueError(f"main_thread='runner' requires n_runners == 1, got n_runners={n_runners}")
        check_seconds(graceful_delay, "graceful_delay", optional=False)
        self.n_runners = n_runners
        self.main_thread: Literal["algorithm", "runner"] = main_thread
        self.graceful_delay = float(graceful_delay)
        self.managed_store = env_bool("AGL_MANAGED_STORE", "managed_store", managed_store, True)

    def __repr__(self) -> str:
        return (
            f"SharedMemoryExecutionStrategy(n_runners={self.n_runners}, main_thread={self.main_thread!r}, "
            f"graceful_delay={self.graceful_delay}, managed_store={self.managed_store})"
        )

    async def execute(self, algorithm: AlgorithmBundle, runner: RunnerBundle, store: LightningStore) -> None:
        """Run the algorithm and ``n_runners`` runners as tasks on the running loop (see the
        module docstring for stop, error and cancellation semantics)."""
        event = ThreadingExecutionEvent()
        bundle_store: LightningStore = LightningStoreLocked(store) if self.managed_store else store
        supervisor = Supervisor(event, self.graceful_delay, "graceful_delay")

        def algorithm_returned() -> None:
            if self.main_thread == "algorithm":
                logger.info("algorithm returned: setting the stop event")
                event.set()

        supervisor.add_bundle("algorithm", algorithm, bundle_store, event, on_return=algorithm_returned)
        for worker_id in range(self.n_runners):
            supervisor.add_bundle(f"runner-{worker_id}", runner, bundle_store, worker_id, event)
        logger.info(
            "shared-memory run: algorithm + %d runner(s), main_thread=%r, managed_store=%s",
            self.n_runners,
            self.main_thread,
            self.managed_store,
        )
        try:
            await supervisor.run()
        finally:
            logger.info("shared-memory run finished")
