"""The :class:`Trainer`: an algorithm and an agent, run by an execution strategy.

The trainer builds two *bundles* and hands them to the strategy:

* the algorithm bundle publishes ``initial_resources`` (before anything else), sets the
  algorithm's ``store`` and awaits :meth:`Algorithm.run <agl_async.algorithm.Algorithm.run>`;
* each runner bundle runs ``concurrency`` slots (:func:`agl_async.concurrency.run_slots`), each
  the loop of :func:`~agl_async.runner.runner_loop` with the agent (what a runner does, and how
  it stops, is described in :mod:`agl_async.runner`).

Both bundles are small picklable objects (client-server mode sends them to worker processes), so
the agent and the algorithm must pickle too: a module-level function or class instance, not a
lambda or closure, when runners live in other processes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from ._backend import running_asyncio_loop
from ._validate import check_count
from .algorithm import Algorithm, Baseline, check_algorithm
from .execution.base import ExecutionStrategy
from .execution.events import ExecutionEvent
from .execution.registry import resolve_strategy
from .runner import (
    DEFAULT_HEARTBEAT_INTERVAL,
    REWARD_SPAN_NAME,
    Agent,
    RunnerBundle,
    run_rollout,
    runner_loop,
)
from .store.base import LightningStore
from .store.memory import InMemoryLightningStore
from .store.urls import open_store

# The runner's names stay importable from here, where they were first.
__all__ = ["DEFAULT_HEARTBEAT_INTERVAL", "REWARD_SPAN_NAME", "Agent", "Trainer", "run_rollout", "runner_loop"]


class _AlgorithmBundle:
    """``algorithm(store, event)`` for the strategy; picklable when the algorithm is.

    Publishes ``initial_resources`` first (so every rollout the algorithm enqueues is bound to
    them), then runs the algorithm. Without an algorithm it waits for the event: the runners
    serve an algorithm elsewhere, or stop by ``max_rollouts``.
    """

    def __init__(
        self,
        algorithm: Algorithm | None,
        train_dataset: Sequence[Any] | None,
        val_dataset: Sequence[Any] | None,
        initial_resources: Mapping[str, Any] | None,
    ) -> None:
        self.algorithm = algorithm
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.initial_resources = initial_resources

    async def __call__(self, store: LightningStore, event: ExecutionEvent) -> None:
        if self.initial_resources is not None:
            await store.add_resources(dict(self.initial_resources))
        if self.algorithm is None:
            await event.wait()
            return
        self.algorithm.store = store
        self.algorithm.stop_event = event
        if self.initial_resources is not None:
            self.algorithm.initial_resources = dict(self.initial_resources)
        check_algorithm(self.algorithm)  # again: run may have been replaced since
        await self.algorithm.run(train_dataset=self.train_dataset, val_dataset=self.val_dataset)


# --------------------------------------------------------------------------------------- trainer
def _make_strategy(spec: Any, n_runners: int | None) -> ExecutionStrategy:
    """An ExecutionStrategy from an instance, a class, an alias or a ``{"type": alias, **options}``
    dict (:func:`~agl_async.execution.base.resolve_strategy`); ``None`` means shared-memory.

    ``n_runners`` fills in the strategy's ``n_runners`` when the alias/dict does not set it, and
    must agree with the strategy's own otherwise. Every mistake is a ``ValueError``.
    """
    try:
        strategy = resolve_strategy(spec, n_runners=n_runners)
    except TypeError as exc:
        raise ValueError(f"invalid strategy {spec!r}: {exc}") from None
    own = getattr(strategy, "n_runners", None)
    if n_runners is not None and own is not None and own != n_runners:
        raise ValueError(f"n_runners={n_runners} conflicts with the strategy's n_runners={own}")
    return strategy


def _refuse_running_loop() -> None:
    if running_asyncio_loop() is None:
        return
    raise RuntimeError(
        "Trainer.fit() / run() start their own event loop and cannot run inside a running one; "
        "use `await trainer.fit_async(...)` / `await trainer.arun()` there"
    )


class Trainer:
    """Run an :class:`~agl_async.algorithm.Algorithm` and an agent with an execution strategy.

    ``strategy``: an :class:`~agl_async.ExecutionStrategy`, the alias ``"shm"`` / ``"cs"``, or a
    dict ``{"type": "shm" | "cs", **options}``; ``None`` means shared-memory. ``n_runners`` sets
    the number of runners of a strategy made from an alias or dict (and must agree with one the
    strategy sets itself); ``trainer.n_runners`` is the resolved number. ``store`` (a store or a
    store URL for :func:`~agl_async.open_store`) defaults to a fresh
    :class:`~agl_async.InMemoryLightningStore` (kept on ``trainer.store``, so results can be read
    after the run). ``algorithm`` ``None`` with a dataset means :class:`~agl_async.algorithm.Baseline`;
    with no dataset the algorithm side only waits for the stop event, so the run lasts until it is
    stopped (Ctrl-C, cancellation): for runners serving an algorithm elsewhere.
    ``max_rollouts`` caps the rollouts of *each* runner. ``concurrency``: rollouts each runner
    works on at once (:mod:`agl_async.concurrency`), so ``n_runners x concurrency`` are in
    flight. ``initial_resources`` (a mapping of JSON values) is published with ``add_resources``
    before the algorithm starts. ``heartbeat_interval``: seconds between runner heartbeats while an
    agent call runs.

    Shutdown and errors are the strategy's: the run ends when the algorithm returns (runners finish
    their current rollout within the grace period); an exception in a bundle stops the run and is
    re-raised by ``fit``; Ctrl-C under ``fit`` stops everything and raises ``KeyboardInterrupt``.
    """

    def __init__(
        self,
        strategy: ExecutionStrategy | str | Mapping[str, Any] | None = None,
        n_runners: int | None = None,
        store: LightningStore | str | None = None,
        algorithm: Algorithm | None = None,
        agent: Agent | None = None,
        train_dataset: Sequence[Any] | None = None,
        val_dataset: Sequence[Any] | None = None,
        max_rollouts: int | None = None,
        initial_resources: Mapping[str, Any] | None = None,
        concurrency: int = 1,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
    ) -> None:
        from .concurrency import check_concurrency  # [concurrency hook]

        self.concurrency = check_concurrency(concurrency)
        if n_runners is not None:
            check_count(n_runners, "n_runners")
        if max_rollouts is not None and (
            isinstance(max_rollouts, bool) or not isinstance(max_rollouts, int) or max_rollouts < 0
        ):
            raise ValueError(f"max_rollouts must be a non-negative integer or None, got {max_rollouts!r}")
        if initial_resources is not None and not isinstance(initial_resources, Mapping):
            raise ValueError(f"initial_resources must be a mapping, got {type(initial_resources).__name__}")
        if isinstance(store, str):
            store = open_store(store)  # a store URL (issue 12): memory://, sqlite:///..., postgresql://...
        if store is not None and not isinstance(store, LightningStore):
            raise ValueError(f"store must be a LightningStore or a store URL, got {type(store).__name__}")
        if algorithm is not None and not isinstance(algorithm, Algorithm):
            raise ValueError(f"algorithm must be an Algorithm, got {type(algorithm).__name__}")
        if algorithm is not None:
            check_algorithm(algorithm)
        self.strategy = _make_strategy(strategy, n_runners)
        self.n_runners: int = getattr(self.strategy, "n_runners", n_runners or 1)
        self.store: LightningStore = store if store is not None else InMemoryLightningStore()
        self.algorithm = algorithm
        self.agent = agent
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.max_rollouts = max_rollouts
        self.initial_resources = initial_resources
        self.heartbeat_interval = heartbeat_interval

    def _bundles(
        self, agent: Agent | None, train_dataset: Sequence[Any] | None, val_dataset: Sequence[Any] | None
    ) -> tuple[_AlgorithmBundle, RunnerBundle]:
        if agent is None:
            raise ValueError("no agent: pass one to fit() or to Trainer(agent=...)")
        if not callable(agent):
            raise ValueError(f"the agent must be callable as agent(task_input, resources), got {agent!r}")
        algorithm = self.algorithm
        if algorithm is None and (train_dataset or val_dataset):
            algorithm = Baseline()
        return (
            _AlgorithmBundle(algorithm, train_dataset, val_dataset, self.initial_resources),
            RunnerBundle(agent, self.max_rollouts, self.heartbeat_interval, self.concurrency),
        )

    def fit(
        self,
        agent: Agent,
        train_dataset: Sequence[Any] | None = None,
        val_dataset: Sequence[Any] | None = None,
    ) -> None:
        """Train ``agent``; blocks until the run is over (starts its own event loop).

        Not for use inside a running event loop (a notebook, an async app): there, ``await
        fit_async(...)``; calling it there raises ``RuntimeError`` saying so.
        """
        _refuse_running_loop()
        algorithm_bundle, runner_bundle = self._bundles(agent, train_dataset, val_dataset)
        self.strategy.run(algorithm_bundle, runner_bundle, self.store)

    async def fit_async(
        self,
        agent: Agent,
        train_dataset: Sequence[Any] | None = None,
        val_dataset: Sequence[Any] | None = None,
    ) -> None:
        """Train ``agent`` inside the caller's event loop; cancelling it stops the run cleanly."""
        algorithm_bundle, runner_bundle = self._bundles(agent, train_dataset, val_dataset)
        await self.strategy.execute(algorithm_bundle, runner_bundle, self.store)

    def run(self) -> None:
        """:meth:`fit` with the agent and datasets given to the constructor."""
        self.fit(cast(Agent, self.agent), self.train_dataset, self.val_dataset)

    async def arun(self) -> None:
        """:meth:`fit_async` with the agent and datasets given to the constructor."""
        await self.fit_async(cast(Agent, self.agent), self.train_dataset, self.val_dataset)
