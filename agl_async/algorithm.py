"""The algorithm side of training: the :class:`Algorithm` base and the ready :class:`Baseline`.

An algorithm talks to the runners only through the store: it publishes resources
(``add_resources`` / ``update_resources``), enqueues rollouts, waits for them and reads their
rewards. The :class:`~agl_async.trainer.Trainer` sets :attr:`Algorithm.store` (and
:attr:`Algorithm.initial_resources`) before it awaits :meth:`Algorithm.run`.

Shutdown: when ``run`` returns, the run is over — the execution strategy sets the stop event and
the runners finish the rollout they hold (within the strategy's grace period) and return. When
the run is stopped from outside (Ctrl-C, SIGTERM, a runner crashing), the stop event is set
first: an algorithm sees it as :attr:`Algorithm.stop_event` (``self.stopping``, and
:meth:`Algorithm.until_stopped` to wait for something unless the run stops first) and may end
promptly by itself — :class:`Baseline` does. One that does not is cancelled at its next ``await``
once the grace period is over: write algorithms so that a cancellation at any ``await`` leaves
nothing half-done that matters (the store makes every single call atomic).
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import anyio
import msgspec

from .execution.events import ExecutionEvent
from .store.base import EnqueueRolloutRequest, LightningStore
from .types import REWARD_KEY, Rollout, RolloutConfig, RolloutMode

__all__ = ["Algorithm", "Baseline", "PassStats", "check_algorithm", "reward_of"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def reward_of(rollout: Rollout) -> float | None:
    """The reward the runner recorded on ``rollout`` (``None`` when there is none)."""
    value = rollout.metadata.get(REWARD_KEY)
    return None if value is None else float(value)


class Algorithm:
    """Base of training algorithms: subclass it and implement :meth:`run`.

    The trainer sets :attr:`store` (the store as seen from the algorithm's process),
    :attr:`initial_resources` and :attr:`stop_event` before calling :meth:`run`. ``set_store`` /
    ``get_store`` exist for code ported from Agent-Lightning. ``run`` must be ``async def``: the
    trainer refuses an algorithm whose ``run`` is a plain function (``ValueError``).

    An algorithm crosses into a child process in client-server mode with
    ``main_process="runner"``, so keep its state picklable until ``run`` starts.
    """

    initial_resources: dict[str, Any] | None = None
    #: The run's stop event (set by the trainer; ``None`` outside a run): set when the run is
    #: being stopped from outside (Ctrl-C, SIGTERM, a crashed runner) or when a bundle ends it.
    stop_event: ExecutionEvent | None = None
    _store: LightningStore | None = None

    @property
    def store(self) -> LightningStore:
        """The store to drive the runners through; ``RuntimeError`` before the trainer set it."""
        if self._store is None:
            raise RuntimeError(f"{type(self).__name__}.store is not set: run the algorithm through a Trainer")
        return self._store

    @store.setter
    def store(self, store: LightningStore) -> None:
        self._store = store

    def set_store(self, store: LightningStore) -> None:
        """Agent-Lightning's spelling of ``algorithm.store = store``."""
        self.store = store

    def get_store(self) -> LightningStore:
        """Agent-Lightning's spelling of ``algorithm.store``."""
        return self.store

    def get_initial_resources(self) -> dict[str, Any] | None:
        """The resources the trainer published before :meth:`run` (``None`` when none were given)."""
        return self.initial_resources

    @property
    def stopping(self) -> bool:
        """Whether the run's stop event is set: time to wind down and return."""
        return self.stop_event is not None and self.stop_event.is_set()

    async def until_stopped(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T | None:
        """``await fn(*args, **kwargs)``, unless the stop event is set first: then ``fn`` is
        cancelled and ``None`` is returned at once. Without a stop event, just the call."""
        event = self.stop_event
        if event is None:
            return await fn(*args, **kwargs)
        result: list[T] = []
        async with anyio.create_task_group() as tg:

            async def stop_at_event() -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(stop_at_event)
            result.append(await fn(*args, **kwargs))
            tg.cancel_scope.cancel()
        return result[0] if result else None

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        """Run the algorithm to completion; returning ends the run (the runners are told to stop)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `async def run(...)`")


class PassStats(msgspec.Struct, kw_only=True):
    """Reward statistics of one pass over a dataset (what :class:`Baseline` reports)."""

    epoch: int
    mode: RolloutMode
    rollouts: int
    succeeded: int
    failed: int
    rewarded: int
    mean_reward: float | None
    min_reward: float | None
    max_reward: float | None
    std_reward: float | None
    seconds: float

    @classmethod
    def from_rollouts(
        cls, epoch: int, mode: RolloutMode, rollouts: Sequence[Rollout], seconds: float
    ) -> PassStats:
        """Summarise finished rollouts (rewards read with :func:`reward_of`)."""
        rewards = [r for r in (reward_of(rollout) for rollout in rollouts) if r is not None]
        mean = sum(rewards) / len(rewards) if rewards else None
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards)) if mean is not None else None
        return cls(
            epoch=epoch,
            mode=mode,
            rollouts=len(rollouts),
            succeeded=sum(1 for r in rollouts if r.status == "succeeded"),
            failed=sum(1 for r in rollouts if r.status != "succeeded"),
            rewarded=len(rewards),
            mean_reward=mean,
            min_reward=min(rewards) if rewards else None,
            max_reward=max(rewards) if rewards else None,
            std_reward=std,
            seconds=seconds,
        )


class Baseline(Algorithm):
    """Enqueue a dataset, wait for every rollout, report reward statistics per pass.

    Each of ``n_epochs`` epochs makes one pass over ``train_dataset`` (mode ``"train"``) and then
    one over ``val_dataset`` (mode ``"val"``), each pass enqueued in one batch bound to the latest
    resources. The statistics of every pass are appended to :attr:`history` and handed to
    :meth:`report` (which logs them; override it to print or plot).

    ``timeout``: seconds to wait for one pass; rollouts still unfinished then count as failed
    (they stay in the store). ``None`` waits until all are done. ``config`` is given to every
    rollout (timeouts, retries).

    Stopping: when the run's stop event is set (Ctrl-C, SIGTERM, a crashed runner), the pass in
    progress is abandoned at once and ``run`` returns (its statistics are not reported), so the
    run does not wait out the strategy's grace period. A cancelled ``run`` stops at its current
    ``await`` (enqueueing or waiting). Either way the rollouts already enqueued stay in the store.
    """

    def __init__(
        self, n_epochs: int = 1, *, timeout: float | None = None, config: RolloutConfig | None = None
    ) -> None:
        if n_epochs < 1:
            raise ValueError(f"n_epochs must be >= 1, got {n_epochs}")
        self.n_epochs = n_epochs
        self.timeout = timeout
        self.config = config
        self.history: list[PassStats] = []

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        if not train_dataset and not val_dataset:
            raise ValueError("Baseline needs a train_dataset or a val_dataset with at least one task")
        for epoch in range(1, self.n_epochs + 1):
            for mode, dataset in (("train", train_dataset), ("val", val_dataset)):
                if not dataset:
                    continue
                stats = await self.run_pass(epoch, mode, dataset)  # type: ignore[arg-type]
                if stats is None:
                    logger.info("stop event set: Baseline ends during epoch %d (%s pass)", epoch, mode)
                    return
                self.history.append(stats)
                self.report(stats)

    async def run_pass(self, epoch: int, mode: RolloutMode, dataset: Sequence[Any]) -> PassStats | None:
        """Enqueue ``dataset`` in one batch, wait for it, and return its statistics (``None`` when
        the run's stop event was set before the pass finished)."""
        if self.stopping:
            return None
        started = time.monotonic()
        requests = [EnqueueRolloutRequest(input=task, mode=mode, config=self.config) for task in dataset]
        enqueued = await self.store.enqueue_many_rollouts(requests)
        ids = [rollout.rollout_id for rollout in enqueued]
        waited = await self.until_stopped(self.store.wait_for_rollouts, rollout_ids=ids, timeout=self.timeout)
        if waited is None:
            return None
        # Read every rollout back (the unfinished ones too, so they are counted as not succeeded).
        rollouts = await self.store.query_rollouts(rollout_id_in=ids)
        return PassStats.from_rollouts(epoch, mode, rollouts, time.monotonic() - started)

    def report(self, stats: PassStats) -> None:
        """Called after every pass; logs the statistics at INFO level."""
        mean = "n/a" if stats.mean_reward is None else f"{stats.mean_reward:.4f}"
        logger.info(
            "epoch %d %s: %d rollouts, %d succeeded, %d failed, mean reward %s (%.2fs)",
            stats.epoch,
            stats.mode,
            stats.rollouts,
            stats.succeeded,
            stats.failed,
            mean,
            stats.seconds,
        )


def check_algorithm(algorithm: Algorithm) -> None:
    """``ValueError`` unless ``algorithm.run`` is a coroutine function (``async def``)."""
    run = getattr(algorithm, "run", None)
    if not inspect.iscoroutinefunction(run):
        raise ValueError(
            f"{type(algorithm).__name__}.run must be a coroutine function: define it as "
            "`async def run(self, train_dataset=None, val_dataset=None)` (it talks to the store, "
            "whose methods are coroutines)"
        )
