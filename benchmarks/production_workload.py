"""Agent-Lightning's production store workload, re-created: the system-independent half.

Agent-Lightning's maintainers benchmark their store with a synthetic agent and three algorithm
modes (``tests/benchmark/benchmark_store.py`` and the matrix of ``.github/workflows/benchmark.yml``
in microsoft/agent-lightning, v0.x line). This module is our own writing of that workload, shared
by both sides of ``benchmarks/production.py`` (agl_async, this repository's interpreter) and
``benchmarks/peer/agl_production.py`` (Agent-Lightning 0.3.0, its own interpreter); standard
library and asyncio only.

The agent (each system writes the spans with its own API; see :func:`plan_rollout`)
    ``rounds`` = uniform 1..``max_rounds``; round ``i`` is a span ``agent{i}`` with two nested spans
    ``round{i}_1`` and ``round{i}_2``, each preceded by a sleep uniform in [0, ``sleep``] and carrying
    random flattened attributes (:func:`random_attributes`: nesting depth 1-3, 2-6 keys per level,
    keys 3-20 characters, values 5-300 characters; about 4.5 KB of JSON per span); one
    ``round{k}_1`` span, ``k`` drawn at random, also carries ``task`` = the task's name. After each
    round a reward uniform in [0, 1] is emitted half the time. Then a span ``final`` (after one more
    sleep, with attributes, plus ``bench.agent_seconds``: the rollout's total planned sleep) and a
    final reward uniform in [1, 2].

The algorithm modes (:func:`run_algorithm`, over a small per-system :class:`Adapter`)
    ``batch``: publish resources, enqueue ``batch`` tasks, wait for all of them (polling every
    ``poll`` seconds), check each, next batch. ``batch_partial``: keep at most ``window`` rollouts
    in flight, topping up ``batch`` at a time. ``single``: ``window`` concurrent loops, each:
    publish resources, enqueue one task, wait for it, check it. The check of a finished rollout:
    status ``succeeded``; its spans contain the task's name and end with a final reward in [1, 2].
    Anything else is counted (``failed`` / ``bad_spans``), never raised; rollouts still unfinished
    after ``stall`` seconds without progress are counted ``lost``.
"""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "QUICK_SHAPES",
    "SHAPES",
    "Adapter",
    "LatencyLog",
    "Plan",
    "Shape",
    "check_spans",
    "plan_rollout",
    "random_attributes",
    "run_algorithm",
    "scan_shape",
]

TERMINAL = ("succeeded", "failed", "cancelled")


# ---------------------------------------------------------------------------- the shapes measured
@dataclass(frozen=True)
class Shape:
    """One workload: the algorithm mode and its sizes, the runners' capacity, the agent.

    ``in_flight``: rollouts the runners work on at once (Agent-Lightning: runner processes; agl_async:
    processes x concurrency). ``batch``: tasks enqueued at once (``batch``; the top-up of
    ``batch_partial``), default ``in_flight``. ``window``: rollouts the algorithm keeps in flight
    (``batch_partial``'s remaining, ``single``'s concurrency), default ``in_flight``.
    """

    name: str
    mode: str  # "batch" | "batch_partial" | "single"
    tasks: int
    in_flight: int
    max_rounds: int
    sleep: float
    batch: int = 0
    window: int = 0

    def args(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tasks": self.tasks,
            "in_flight": self.in_flight,
            "batch": self.batch or self.in_flight,
            "window": self.window or self.in_flight,
            "max_rounds": self.max_rounds,
            "sleep": self.sleep,
        }

    def mean_agent_seconds(self) -> float:
        """Expected planned sleep of one rollout: (2 x mean rounds + 1) x sleep / 2."""
        return (2 * (self.max_rounds + 1) / 2 + 1) * self.sleep / 2


#: The shapes of ``benchmarks/production.py``: Agent-Lightning's matrix ("minimal production
#: scale" 32 runners, 4,096 tasks in batches of 256, 6 rounds, 0.5 s; "medium" 100 runners, 10,000
#: in batches of 1,000, 10 rounds, 0.1 s; "high-throughput concurrent requests", single mode, 2
#: rounds; "heavy rollouts with deep traces", batch_partial, 20 rounds, 1.0 s, 256 remaining)
#: scaled to a 2-core machine: fewer tasks, and sleeps long enough that the ideal rate
#: (in-flight ÷ mean agent time) stays within what 2 cores can serve.
SHAPES: dict[str, Shape] = {
    "minimal-32": Shape("minimal-32", "batch", 1024, 32, 6, 0.25, batch=256),
    "medium-128": Shape("medium-128", "batch", 4096, 128, 10, 0.25, batch=1024),
    "single-32": Shape("single-32", "single", 1024, 32, 2, 0.5),
    "single-128": Shape("single-128", "single", 4096, 128, 2, 1.0),
    "heavy-64": Shape("heavy-64", "batch_partial", 256, 64, 20, 1.0, batch=32),
}
#: ``--quick``: the same modes, small (a smoke run of the whole pipeline in under 3 minutes).
QUICK_SHAPES: dict[str, Shape] = {
    "minimal-16": Shape("minimal-16", "batch", 96, 16, 4, 0.1, batch=32),
    "single-16": Shape("single-16", "single", 96, 16, 2, 0.2),
    "heavy-16": Shape("heavy-16", "batch_partial", 32, 16, 20, 0.05, batch=8),
}


def scan_shape(in_flight: int) -> Shape:
    """``--scan``: batch_partial topping up to ``in_flight``, 4 rounds of 0.25 s (0.75 s per rollout)."""
    return Shape(
        f"scan-{in_flight}",
        "batch_partial",
        max(512, 6 * in_flight),
        in_flight,
        4,
        0.25,
        batch=max(8, in_flight // 4),
    )


# ---------------------------------------------------------------------------- the agent's plan
_POOL_CHARS = 1 << 16
_pool: str | None = None


def _int(rng: random.Random, low: int, high: int) -> int:
    """Uniform integer in [low, high] (``randint`` without its Python-level overhead)."""
    return low + int(rng.random() * (high - low + 1))


def _random_string(rng: random.Random, low: int, high: int) -> str:
    """Random text of a random length in [low, high]: a slice at a random offset of a pool of
    random base64 text drawn once per process (a store sees the same sizes and entropy; the
    agent's own CPU stays out of the figures)."""
    global _pool
    if _pool is None:
        _pool = base64.b64encode(random.randbytes(_POOL_CHARS * 3 // 4)).decode()
    n = _int(rng, low, high)
    start = _int(rng, 0, len(_pool) - n)
    return _pool[start : start + n]


def random_attributes(rng: random.Random) -> dict[str, str]:
    """A random nested mapping, flattened to dotted keys: each level has 2-6 keys of 3-20
    characters; a branch stops at a depth drawn (per level) between the current one and 3; leaves
    are strings of 5-300 characters (about 28 leaves, 4.5 KB of JSON on average)."""
    out: dict[str, str] = {}

    def grow(prefix: str, level: int) -> None:
        stop_at = _int(rng, level, 3)
        for _ in range(_int(rng, 2, 6)):
            key = _random_string(rng, 3, 20)
            path = f"{prefix}.{key}" if prefix else key
            if level >= stop_at:
                out[path] = _random_string(rng, 5, 300)
            else:
                grow(path, level + 1)

    grow("", 1)
    return out


@dataclass
class Step:
    """One span to write: its name, its parent's name, the sleep before it ends, its attributes."""

    name: str
    parent: str | None
    sleep: float
    attributes: dict[str, Any]


@dataclass
class Round:
    steps: list[Step]  # agent{i} first (its sleep is 0: it spans its children), then its children
    reward: float | None  # emitted after the round, half the time


@dataclass
class Plan:
    rounds: list[Round]
    final: Step
    final_reward: float
    agent_seconds: float = 0.0
    span_count: int = field(default=0)


def plan_rollout(task: str, max_rounds: int, sleep: float, rng: random.Random | None = None) -> Plan:
    """Everything random about one rollout, drawn up front (so both systems spend the same CPU on
    drawing it, and the agent only sleeps and writes)."""
    rng = rng or random.Random()
    n = rng.randint(1, max_rounds)
    marked = rng.randint(0, n - 1)
    rounds: list[Round] = []
    total = 0.0
    spans = 0
    for i in range(n):
        first, second = rng.uniform(0.0, sleep), rng.uniform(0.0, sleep)
        total += first + second
        attrs_first = random_attributes(rng)
        if i == marked:
            attrs_first["task"] = task
        steps = [
            Step(f"agent{i}", None, 0.0, {}),
            Step(f"round{i}_1", f"agent{i}", first, attrs_first),
            Step(f"round{i}_2", f"agent{i}", second, random_attributes(rng)),
        ]
        reward = rng.uniform(0.0, 1.0) if rng.random() < 0.5 else None
        rounds.append(Round(steps, reward))
        spans += 3 + (reward is not None)
    last = rng.uniform(0.0, sleep)
    total += last
    final_attrs = random_attributes(rng)
    final_attrs["bench.agent_seconds"] = total  # the planned sleep of the whole rollout
    final = Step("final", None, last, final_attrs)
    return Plan(rounds, final, rng.uniform(1.0, 2.0), total, spans + 2)


def check_spans(attributes: Sequence[dict[str, Any]], final_reward: float | None, task: str) -> str | None:
    """``None`` when the spans of a rollout pass the check, else what is wrong."""
    if final_reward is None:
        return "no final reward"
    if not 1.0 <= final_reward <= 2.0:
        return f"final reward {final_reward} not in [1, 2]"
    if not any(a.get("task") == task for a in attributes):
        return f"no span carries task {task!r}"
    return None


# ---------------------------------------------------------------------------- the algorithm
class Adapter(Protocol):
    """What :func:`run_algorithm` needs of a store (each side implements it with its own API)."""

    async def add_resources(self, tag: int) -> None: ...

    async def enqueue(self, tasks: list[str]) -> list[str]: ...

    async def finished(self, rollout_ids: list[str], poll: float) -> list[tuple[str, str]]:
        """``(rollout_id, status)`` of those that are terminal, waiting up to ``poll`` seconds."""
        ...

    async def wait_one(self, rollout_id: str) -> str:
        """Wait until the rollout is terminal (however long); its status."""
        ...

    async def spans(self, rollout_id: str) -> tuple[list[dict[str, Any]], float | None, int]:
        """(attribute mappings of the latest attempt's spans, its final reward, span count)."""
        ...

    async def workers(self) -> int:
        """How many workers the store knows (runners register as they start)."""
        ...


@dataclass
class Outcome:
    succeeded: int = 0
    failed: int = 0
    bad_spans: int = 0
    lost: int = 0
    spans: int = 0
    agent_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    last_progress: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {
            "succeeded": self.succeeded,
            "failed": self.failed,
            "bad_spans": self.bad_spans,
            "lost": self.lost,
            "spans": self.spans,
            "agent_seconds": self.agent_seconds,
            "errors": self.errors[:5],
        }


async def _check(adapter: Adapter, rollout_id: str, status: str, task: str, out: Outcome) -> None:
    out.last_progress = time.monotonic()
    if status != "succeeded":
        out.failed += 1
        out.errors.append(f"{rollout_id} ended {status}")
        return
    attributes, final_reward, count = await adapter.spans(rollout_id)
    out.spans += count
    problem = check_spans(attributes, final_reward, task)
    if problem is not None:
        out.bad_spans += 1
        out.errors.append(f"{rollout_id}: {problem}")
        return
    out.succeeded += 1
    for a in attributes:
        if "bench.agent_seconds" in a:
            out.agent_seconds += float(a["bench.agent_seconds"])


async def _wait_all(
    adapter: Adapter, pending: dict[str, str], poll: float, stall: float, out: Outcome
) -> None:
    """Check every rollout of ``pending`` (id -> task) as it finishes; stop when none is left or
    nothing happened for ``stall`` seconds (the rest counts as lost)."""
    while pending:
        for rollout_id, status in await adapter.finished(list(pending), poll):
            task = pending.pop(rollout_id, None)
            if task is not None:
                await _check(adapter, rollout_id, status, task, out)
        if pending and time.monotonic() - out.last_progress > stall:
            out.lost += len(pending)
            out.errors.append(f"{len(pending)} rollouts made no progress for {stall:.0f} s")
            pending.clear()


async def run_algorithm(
    adapter: Adapter,
    *,
    mode: str,
    tasks: int,
    batch: int,
    window: int,
    poll: float = 0.1,
    stall: float = 120.0,
    ready: int = 0,
    **_: Any,
) -> dict[str, Any]:
    """Run one algorithm mode over ``tasks`` tasks; returns the outcome with ``start``/``end``
    (``time.time()``) of the measured phase, which begins once ``ready`` workers are registered
    (the runners' start-up is not what is measured; ``ready_s`` says how long it took)."""
    out = Outcome()
    begun = time.time()
    while ready and await adapter.workers() < ready and time.time() - begun < stall:  # noqa: ASYNC110
        await asyncio.sleep(0.05)  # other processes' state, seen through the store
    start = time.time()
    out.last_progress = time.monotonic()
    if mode == "batch":
        submitted = 0
        while submitted < tasks:
            await adapter.add_resources(submitted)
            names = [f"task-{i}" for i in range(submitted, min(tasks, submitted + batch))]
            ids = await adapter.enqueue(names)
            submitted += len(names)
            await _wait_all(adapter, dict(zip(ids, names, strict=True)), poll, stall, out)
    elif mode == "batch_partial":
        active: dict[str, str] = {}
        submitted = 0
        top_up = batch
        while submitted < tasks or active:
            if submitted < tasks and len(active) < window:
                await adapter.add_resources(submitted)
                names = [f"task-{i}" for i in range(submitted, min(tasks, submitted + top_up))]
                active.update(zip(await adapter.enqueue(names), names, strict=True))
                submitted += len(names)
                continue
            for rollout_id, status in await adapter.finished(list(active), poll):
                task = active.pop(rollout_id, None)
                if task is not None:
                    await _check(adapter, rollout_id, status, task, out)
            if active and time.monotonic() - out.last_progress > stall:
                out.lost += len(active) + tasks - submitted
                out.errors.append(f"{len(active)} rollouts made no progress for {stall:.0f} s")
                break
    elif mode == "single":
        next_task = 0

        async def loop() -> None:
            nonlocal next_task
            while next_task < tasks:
                index, next_task = next_task, next_task + 1
                name = f"task-{index}"
                await adapter.add_resources(index)
                [rollout_id] = await adapter.enqueue([name])
                try:
                    status = await asyncio.wait_for(adapter.wait_one(rollout_id), stall)
                except asyncio.TimeoutError:
                    out.lost += 1
                    out.errors.append(f"{rollout_id} made no progress for {stall:.0f} s")
                    continue
                await _check(adapter, rollout_id, status, name, out)

        await asyncio.gather(*(loop() for _ in range(window)))
    else:
        raise ValueError(f"mode must be batch, batch_partial or single, got {mode!r}")
    end = time.time()
    return {**out.as_dict(), "start": start, "end": end, "tasks": tasks, "ready_s": start - begun}


async def poll_until_terminal(get_status: Any, rollout_id: str, poll: float) -> str:
    """For stores without a blocking wait: ask every ``poll`` seconds."""
    while True:
        status = await get_status(rollout_id)
        if status in TERMINAL:
            return str(status)
        await asyncio.sleep(poll)


# ---------------------------------------------------------------------------- request latencies
class LatencyLog:
    """Durations (seconds) of one process's store requests, appended to ``<dir>/lat-<pid>.bin``
    (native doubles) every 256 requests or second, whichever comes first: a process may end
    without a goodbye (runner children), so at most the last second is lost."""

    def __init__(self, directory: str | None) -> None:
        self.directory = directory
        self.pid = 0
        self.buffer: list[float] = []
        self.flushed = time.monotonic()

    def record(self, seconds: float) -> None:
        if self.directory is None:
            return
        import os

        if self.pid != os.getpid():  # a forked child starts its own file
            self.pid, self.buffer = os.getpid(), []
        self.buffer.append(seconds)
        if len(self.buffer) >= 256 or time.monotonic() - self.flushed > 1.0:
            self.flush()

    def flush(self) -> None:
        if not self.buffer or self.directory is None:
            return
        import array
        import os

        with open(os.path.join(self.directory, f"lat-{self.pid}.bin"), "ab") as sink:
            array.array("d", self.buffer).tofile(sink)
        self.buffer = []
        self.flushed = time.monotonic()
