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
the timings vary. The agent is a module-level coroutine function, so it pickles into runner
processes (``--mode cs``) and can be attached with ``agl-async runner --agent
agl_async.examples.evolution:agent``.
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
from ..store.base import EnqueueRolloutRequest

__all__ = ["EpochStats", "EvolutionStrategy", "agent", "make_tasks", "print_summary", "run_demo"]


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
    (its rollouts stay in the store), ``history`` holds the finished epochs.
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
    ) -> None:
        if epochs < 1 or dim < 1 or pairs < 1:
            raise ValueError(f"epochs, dim and pairs must be >= 1, got {epochs}, {dim}, {pairs}")
        self.epochs, self.dim, self.pairs = epochs, dim, pairs
        self.sigma, self.lr, self.decay = sigma, lr, decay
        self.rng = random.Random(seed + 1)
        self.progress = progress
        self.mu = [0.0] * dim
        self.history: list[EpochStats] = []

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        if not train_dataset:
            raise ValueError("EvolutionStrategy needs a non-empty train_dataset")
        for epoch in range(1, self.epochs + 1):
            self.history.append(await self._epoch(epoch, train_dataset, val_dataset or []))
        self._print_line("", final=True)

    async def _epoch(self, epoch: int, train: Sequence[Any], val: Sequence[Any]) -> EpochStats:
        store = self.store
        started = time.monotonic()
        eps = [[self.rng.gauss(0.0, 1.0) for _ in range(self.dim)] for _ in range(self.pairs)]
        candidates: list[list[float]] = []
        for e in eps:
            candidates.append([m + self.sigma * z for m, z in zip(self.mu, e, strict=True)])
            candidates.append([m - self.sigma * z for m, z in zip(self.mu, e, strict=True)])
        requests: list[EnqueueRolloutRequest] = []
        for k, theta in enumerate(candidates):
            resources = await store.add_resources({"theta": theta})
            requests += [
                EnqueueRolloutRequest(
                    input=task, mode="train", resources_id=resources.resources_id, metadata={"candidate": k}
                )
                for task in train
            ]
        if val:
            center = await store.add_resources({"theta": list(self.mu)})
            requests += [
                EnqueueRolloutRequest(input=task, mode="val", resources_id=center.resources_id)
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
        self._print_line(self._describe(stats), final=True)
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
    concurrency: int = 1,
) -> list[EpochStats]:
    """Run the example end to end (blocking) and return the per-epoch statistics.

    ``mode="shm"``: in-memory store, every bundle a task of this process, no ports. ``mode="cs"``:
    the store served over HTTP on 127.0.0.1:``port`` (a free port when ``None``) and ``runners``
    runner processes. ``concurrency``: rollouts each runner works on at once (``runners x
    concurrency`` in flight).
    """
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
    Trainer(strategy=strategy, algorithm=algorithm, concurrency=concurrency).fit(agent, train, val)
    return algorithm.history


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
