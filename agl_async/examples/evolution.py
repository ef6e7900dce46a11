"""An evolution-strategy search that learns a linear policy: the example behind ``agl-async demo``.

The toy environment: each task is a feature vector ``x`` with a hidden target ``y = w·x``; an
agent holding a policy ``theta`` (published as a resource) answers ``theta·x`` and earns the reward
``exp(-(theta·x - y)² / 2)`` in ``(0, 1]``. The agent never sees ``w``; the algorithm never runs the
environment. All learning goes through the store:

1. each epoch the :class:`EvolutionStrategy` samples antithetic perturbations ``mu ± sigma·eps``
   of its current policy, publishes each candidate with ``add_resources`` and enqueues every train
   task bound to every candidate (plus the validation tasks bound to ``mu`` itself);
2. runners dequeue the rollouts and call :func:`agent` with the task and the candidate's resources;
3. the algorithm waits for the epoch's rollouts, scores each candidate by its mean reward and
   moves ``mu`` along the rank-weighted perturbations.

Everything is seeded, so a run is deterministic whatever the number of runners or the mode; only
the timings vary.

Resuming: after each epoch the algorithm saves its state (policy, step size, random generator,
history) in the store, as a resources snapshot under :data:`STATE_KEY`, and it tags every rollout
with its epoch. Started again on a durable store (``agl-async demo --store sqlite:///demo.db``),
it reads that state back, and for the epoch that was in flight it finds the rollouts already
enqueued (``query_rollouts``) instead of enqueuing them again: the finished ones count as they
are, the others finish now (attempts cut off by the interruption are retried per the rollouts'
``RolloutConfig``). Only a resumed run's first epoch looks for earlier rollouts.

The agent is a module-level coroutine function, so it pickles into runner processes (``--mode
cs``) and can be attached with ``agl-async runner --agent agl_async.examples.evolution:agent``.
"""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import anyio
import msgspec

from ..algorithm import Algorithm, reward_of
from ..store.base import EnqueueRolloutRequest, LightningStore
from ..types import RolloutConfig

__all__ = [
    "STATE_KEY",
    "EpochStats",
    "EvolutionStrategy",
    "agent",
    "make_tasks",
    "print_summary",
    "run_demo",
    "run_demo_async",
]

#: Key of the algorithm's saved state in its resources snapshot (see "Resuming" above).
STATE_KEY = "agl_async.examples.evolution/state"


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def agent(task: dict[str, Any], resources: dict[str, Any]) -> float:
    """Answer ``theta·x`` with the policy from ``resources["theta"]`` and score it against ``y``.

    ``task["latency"]`` seconds of simulated work (an LLM call, say) are awaited first, so that
    several runners visibly overlap.
    """
    latency = float(task.get("latency", 0.0))
    if latency > 0:
        await anyio.sleep(latency)
    theta = resources.get("theta")
    if theta is None:
        raise ValueError("the rollout carries no policy: resources['theta'] is missing")
    error = _dot(theta, task["x"]) - task["y"]
    return math.exp(-(error**2) / 2)


def make_tasks(
    seed: int = 0, *, dim: int = 6, n_train: int = 8, n_val: int = 8, latency: float = 0.0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded train and validation set of the toy environment (JSON-serialisable dicts)."""
    rng = random.Random(seed)
    target = [rng.uniform(-1.5, 1.5) for _ in range(dim)]

    def task(i: int) -> dict[str, Any]:
        x = [rng.gauss(0.0, 1.0) for _ in range(dim)]
        return {"id": i, "x": x, "y": _dot(target, x), "latency": latency}

    return [task(i) for i in range(n_train)], [task(n_train + i) for i in range(n_val)]


class EpochStats(msgspec.Struct, kw_only=True):
    """What one epoch of :class:`EvolutionStrategy` measured."""

    epoch: int
    rollouts: int
    failed: int
    train_reward: float  # mean over every candidate's rollouts
    best_candidate: float  # mean reward of the best candidate
    val_reward: float | None  # mean reward of the current policy ``mu`` on the validation set
    sigma: float
    seconds: float

    @property
    def rollouts_per_second(self) -> float:
        return self.rollouts / self.seconds if self.seconds > 0 else float("inf")


class EvolutionStrategy(Algorithm):
    """Antithetic evolution strategy with centered-rank fitness shaping over a numeric policy.

    ``dim``: policy size. ``pairs``: perturbation pairs per epoch (``2 * pairs`` candidates).
    ``sigma`` (decayed by ``decay`` each epoch) and ``lr`` set the step. ``progress``: a stream for
    a live progress line (rewritten in place on a terminal) — ``None`` prints nothing. The
    per-epoch results are in :attr:`history`, the final policy in :attr:`mu`.

    Cancellation: ``run`` is cancelled at its current ``await``; the epoch in flight is dropped
    (its rollouts stay in the store), ``history`` holds the finished epochs. On a durable store a
    new run picks up where this one stopped (module documentation, "Resuming").

    Every rollout may take ``max_attempts`` attempts: a failed one, or one whose runner went
    silent for ``unresponsive_seconds`` (it died with its process, say), is retried.
    """

    def __init__(
        self,
        *,
        epochs: int = 12,
        dim: int = 6,
        pairs: int = 6,
        sigma: float = 0.4,
        lr: float = 0.8,
        decay: float = 0.9,
        seed: int = 0,
        progress: TextIO | None = None,
        max_attempts: int = 3,
        unresponsive_seconds: float = 5.0,
    ) -> None:
        if epochs < 1 or dim < 1 or pairs < 1:
            raise ValueError(f"epochs, dim and pairs must be >= 1, got {epochs}, {dim}, {pairs}")
        self.epochs, self.dim, self.pairs = epochs, dim, pairs
        self.sigma, self.lr, self.decay = sigma, lr, decay
        self.seed = seed
        self.rng = random.Random(seed + 1)
        self.progress = progress
        self.mu = [0.0] * dim
        self.history: list[EpochStats] = []
        self.config = RolloutConfig(
            max_attempts=max_attempts,
            retry_condition=["failed", "unresponsive", "timeout"],
            unresponsive_seconds=unresponsive_seconds,
        )
        #: The epoch a resumed run started at (1 for a fresh run), set by :meth:`run`.
        self.first_epoch = 1
        self._state_id: str | None = None

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        if not train_dataset:
            raise ValueError("EvolutionStrategy needs a non-empty train_dataset")
        self.first_epoch = await self._resume()
        for epoch in range(self.first_epoch, self.epochs + 1):
            resumed = epoch == self.first_epoch and self._state_id is not None
            stats = await self._epoch(epoch, train_dataset, val_dataset or [], resumed=resumed)
            self.history.append(stats)
            await self._save(epoch)
            self._print_line(self._describe(stats), final=True)  # once saved: a resumed run starts after it
        self._print_line("", final=True)

    # ------------------------------------------------------------------ saved state
    async def _resume(self) -> int:
        """Load the state a previous run saved in the store; returns the epoch to start at."""
        for update in reversed(await self.store.query_resources()):
            state = update.resources.get(STATE_KEY)
            if state is not None:
                break
        else:
            return 1
        saved = {k: state.get(k) for k in ("seed", "dim", "pairs")}
        if saved != {"seed": self.seed, "dim": self.dim, "pairs": self.pairs}:
            raise ValueError(
                f"the store holds an evolution run with {saved}, not seed={self.seed}, dim={self.dim}, "
                f"pairs={self.pairs}: use those options again, or another store"
            )
        self._state_id = update.resources_id
        self.mu, self.sigma = list(state["mu"]), float(state["sigma"])
        version, internal, gauss_next = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss_next))
        self.history = msgspec.convert(state["history"], list[EpochStats])
        done = int(state["epoch"])
        if self.progress is not None:
            left = f"resuming at epoch {done + 1}" if done < self.epochs else "nothing left to do"
            self.progress.write(f"found a run that finished {done} epoch(s) in this store: {left}\n")
            self.progress.flush()
        return done + 1

    async def _save(self, epoch: int) -> None:
        """Save what a resumed run needs, once ``epoch`` is finished (one store call)."""
        state = {
            "epoch": epoch,
            "seed": self.seed,
            "dim": self.dim,
            "pairs": self.pairs,
            "mu": self.mu,
            "sigma": self.sigma,
            "rng": _json_rng_state(self.rng),
            "history": msgspec.to_builtins(self.history),
        }
        if self._state_id is None:
            self._state_id = (await self.store.add_resources({STATE_KEY: state})).resources_id
        else:
            await self.store.update_resources(self._state_id, {STATE_KEY: state})

    # ------------------------------------------------------------------ one epoch
    async def _enqueued_before(self, epoch: int) -> list[str]:
        """Ids of the rollouts an interrupted run had enqueued for ``epoch`` (in order)."""
        found = [r for r in await self.store.query_rollouts() if r.metadata.get("epoch") == epoch]
        if found and self.progress is not None:
            done = sum(1 for r in found if r.status == "succeeded")
            self.progress.write(
                f"epoch {epoch}: {len(found)} rollouts were enqueued before the interruption, "
                f"{done} already succeeded; waiting for the rest\n"
            )
            self.progress.flush()
        return [r.rollout_id for r in found]

    async def _epoch(
        self, epoch: int, train: Sequence[Any], val: Sequence[Any], resumed: bool = False
    ) -> EpochStats:
        store = self.store
        started = time.monotonic()
        eps = [[self.rng.gauss(0.0, 1.0) for _ in range(self.dim)] for _ in range(self.pairs)]
        candidates: list[list[float]] = []
        for e in eps:
            candidates.append([m + self.sigma * z for m, z in zip(self.mu, e, strict=True)])
            candidates.append([m - self.sigma * z for m, z in zip(self.mu, e, strict=True)])
        ids = await self._enqueued_before(epoch) if resumed else []
        if not ids:  # enqueue_many_rollouts is all or nothing: an epoch's rollouts exist entirely or not
            requests: list[EnqueueRolloutRequest] = []
            for k, theta in enumerate(candidates):
                resources = await store.add_resources({"theta": theta})
                requests += [
                    EnqueueRolloutRequest(
                        input=task,
                        mode="train",
                        resources_id=resources.resources_id,
                        config=self.config,
                        metadata={"epoch": epoch, "candidate": k},
                    )
                    for task in train
                ]
            if val:
                center = await store.add_resources({"theta": list(self.mu)})
                requests += [
                    EnqueueRolloutRequest(
                        input=task,
                        mode="val",
                        resources_id=center.resources_id,
                        config=self.config,
                        metadata={"epoch": epoch},
                    )
                    for task in val
                ]
            ids = [rollout.rollout_id for rollout in await store.enqueue_many_rollouts(requests)]

        # Wait for the epoch, refreshing the progress line a few times a second.
        while True:
            finished = await store.wait_for_rollouts(rollout_ids=ids, timeout=0.25)
            self._progress(epoch, len(finished), len(ids), time.monotonic() - started)
            if len(finished) == len(ids):
                break

        rollouts = await store.query_rollouts(rollout_id_in=ids)
        sums = [0.0] * len(candidates)
        counts = [0] * len(candidates)
        val_rewards: list[float] = []
        train_rewards: list[float] = []
        for rollout in rollouts:
            reward = reward_of(rollout) if rollout.status == "succeeded" else None
            reward = 0.0 if reward is None else reward  # a failed rollout scores nothing
            if rollout.mode == "val":
                val_rewards.append(reward)
            else:
                k = int(rollout.metadata["candidate"])
                sums[k] += reward
                counts[k] += 1
                train_rewards.append(reward)
        fitness = [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]

        # Centered ranks in [-0.5, 0.5]: robust to the scale of the reward.
        order = sorted(range(len(fitness)), key=fitness.__getitem__)
        ranks = [0.0] * len(fitness)
        for rank, k in enumerate(order):
            ranks[k] = rank / (len(fitness) - 1) - 0.5
        step = [0.0] * self.dim
        for p, e in enumerate(eps):
            diff = ranks[2 * p] - ranks[2 * p + 1]
            for d in range(self.dim):
                step[d] += diff * e[d]
        self.mu = [m + self.lr * self.sigma * 2 * s / self.pairs for m, s in zip(self.mu, step, strict=True)]

        stats = EpochStats(
            epoch=epoch,
            rollouts=len(rollouts),
            failed=sum(1 for r in rollouts if r.status != "succeeded"),
            train_reward=sum(train_rewards) / len(train_rewards),
            best_candidate=max(fitness),
            val_reward=sum(val_rewards) / len(val_rewards) if val_rewards else None,
            sigma=self.sigma,
            seconds=time.monotonic() - started,
        )
        self.sigma *= self.decay
        return stats

    # ------------------------------------------------------------------ progress output
    def _describe(self, stats: EpochStats) -> str:
        val = "" if stats.val_reward is None else f"  val reward {stats.val_reward:.3f}"
        return (
            f"epoch {stats.epoch:>3}/{self.epochs}  {stats.rollouts} rollouts  "
            f"{stats.rollouts_per_second:7.1f} rollouts/s  mean reward {stats.train_reward:.3f}{val}"
        )

    def _progress(self, epoch: int, done: int, total: int, seconds: float) -> None:
        rate = done / seconds if seconds > 0 else 0.0
        previous = f"  last mean reward {self.history[-1].train_reward:.3f}" if self.history else ""
        self._print_line(
            f"epoch {epoch:>3}/{self.epochs}  {done}/{total} rollouts  {rate:7.1f} rollouts/s{previous}"
        )

    def _print_line(self, text: str, final: bool = False) -> None:
        out = self.progress
        if out is None:
            return
        if out.isatty():
            out.write("\r\x1b[2K" + text + ("\n" if final and text else ""))
        elif final and text:
            out.write(text + "\n")
        out.flush()


def print_summary(history: Sequence[EpochStats], out: TextIO = sys.stdout) -> None:
    """Print a table of the epochs and the first-to-last change of the mean reward."""
    out.write(
        "\n epoch | rollouts | failed | mean reward | best candidate | val reward |  sigma | rollouts/s\n"
    )
    out.write(
        "-------+----------+--------+-------------+----------------+------------+--------+-----------\n"
    )
    for s in history:
        val = "       n/a" if s.val_reward is None else f"{s.val_reward:10.3f}"
        out.write(
            f" {s.epoch:5} | {s.rollouts:8} | {s.failed:6} | {s.train_reward:11.3f} "
            f"| {s.best_candidate:14.3f} | {val} | {s.sigma:6.3f} | {s.rollouts_per_second:9.1f}\n"
        )
    if history:
        first, last = history[0], history[-1]
        total = sum(s.rollouts for s in history)
        seconds = sum(s.seconds for s in history)
        out.write(
            f"\nmean reward {first.train_reward:.3f} -> {last.train_reward:.3f} over {len(history)} epochs; "
            f"{total} rollouts in {seconds:.2f}s ({total / seconds if seconds else 0:.0f} rollouts/s)\n"
        )
    out.flush()


def run_demo(
    *,
    mode: str = "shm",
    runners: int = 4,
    epochs: int = 12,
    seed: int = 0,
    latency: float = 0.005,
    port: int | None = None,
    progress: TextIO | None = sys.stdout,
    store: str | None = None,
    concurrency: int = 1,
) -> list[EpochStats]:
    """Run the example end to end (blocking) and return the per-epoch statistics.

    ``mode="shm"``: every bundle a task of this process, no ports. ``mode="cs"``: the store served
    over HTTP on 127.0.0.1:``port`` (a free port when ``None``) and ``runners`` runner processes.
    ``store``: a store URL (:func:`~agl_async.open_store`); ``None`` is a fresh in-memory store. On
    a durable store (``sqlite:///demo.db``) an interrupted run continues where it stopped when it
    is started again with the same ``seed``; a larger ``epochs`` extends a finished one.
    ``concurrency``: rollouts each runner works on at once (``runners x concurrency`` in flight).
    """
    trainer, algorithm, train, val = _setup(
        mode, runners, epochs, seed, latency, port, progress, store, concurrency
    )
    try:
        trainer.fit(agent, train, val)
    finally:
        anyio.run(trainer.store.close)
    return algorithm.history


async def run_demo_async(
    *,
    mode: str = "shm",
    runners: int = 4,
    epochs: int = 12,
    seed: int = 0,
    latency: float = 0.005,
    port: int | None = None,
    progress: TextIO | None = sys.stdout,
    store: LightningStore | str | None = None,
    concurrency: int = 1,
) -> list[EpochStats]:
    """:func:`run_demo` inside the caller's event loop, on ``store`` (a store or a store URL) when
    given, so that the caller can serve it meanwhile (``agl-async demo --dashboard``). The store is
    the caller's to close. Cancelling it stops the run."""
    trainer, algorithm, train, val = _setup(
        mode, runners, epochs, seed, latency, port, progress, store, concurrency
    )
    await trainer.fit_async(agent, train, val)
    return algorithm.history


def _setup(
    mode: str,
    runners: int,
    epochs: int,
    seed: int,
    latency: float,
    port: int | None,
    progress: TextIO | None,
    store: LightningStore | str | None,
    concurrency: int = 1,
) -> tuple[Any, EvolutionStrategy, list[Any], list[Any]]:
    from ..trainer import Trainer  # the trainer imports the execution layer: only when running

    strategy: dict[str, Any]
    if mode == "shm":
        strategy = {"type": "shm", "n_runners": runners}
    elif mode == "cs":
        strategy = {
            "type": "cs",
            "role": "both",
            "n_runners": runners,
            "server_host": "127.0.0.1",
            "server_port": port if port is not None else _free_port(),
        }
    else:
        raise ValueError(f"unknown mode {mode!r}: expected 'shm' or 'cs'")
    train, val = make_tasks(seed, latency=latency)
    algorithm = EvolutionStrategy(epochs=epochs, seed=seed, progress=progress)
    trainer = Trainer(strategy=strategy, algorithm=algorithm, store=store, concurrency=concurrency)
    return trainer, algorithm, list(train), list(val)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _json_rng_state(rng: random.Random) -> list[Any]:
    """``rng.getstate()`` as JSON values (lists, not tuples: resources are JSON, and the store
    refuses what would not come back as it went in); ``setstate`` takes it back with a tuple."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]
