"""A known store for the dashboard and metrics tests: half an hour of a small run, replayed.

``populate(store)`` drives an :class:`~agl_async.InMemoryLightningStore` through the public store
API while the store's clock is a replayed one (the memory store reads ``time.time()``), so the
rollouts finish spread over 30 minutes, as in a real run, and the dashboard's charts have a
history to draw. What it made is returned as a :class:`KnownStore` for the assertions.
"""

from __future__ import annotations

import contextlib
import random
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

from agl_async import InMemoryLightningStore, RolloutConfig, Span
from agl_async.store import memory

__all__ = ["KnownStore", "populate", "replayed_clock"]


@contextlib.contextmanager
def replayed_clock(start: float) -> Iterator[list[float]]:
    """While active, the memory store's ``time.time()`` is ``clock[0]`` (advance it by hand)."""
    clock = [start]
    fake = types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic)
    real = memory.time
    memory.time = fake  # type: ignore[assignment]
    try:
        yield clock
    finally:
        memory.time = real


SPAN_NAMES = ("agent.run", "llm.chat", "tool.search", "http.get")


async def _trace(store: InMemoryLightningStore, rid: str, aid: str, base: int, t: float) -> None:
    """An attempt's spans: agent.run > (llm.chat, tool.search > http.get)."""
    ids = [f"{base + k:016x}" for k in range(4)]
    common = {"rollout_id": rid, "attempt_id": aid, "trace_id": f"{base:032x}"}
    await store.add_many_spans(
        [
            Span(**common, sequence_id=1, span_id=ids[0], name="agent.run", start_time=t, end_time=t + 4.0,
                 attributes={"task": rid}),
            Span(**common, sequence_id=2, span_id=ids[1], parent_id=ids[0], name="llm.chat",
                 start_time=t + 0.1, end_time=t + 2.5,
                 attributes={"gen_ai.request.model": "toy-policy", "gen_ai.usage.input_tokens": 412,
                             "gen_ai.usage.output_tokens": 96}),
            Span(**common, sequence_id=3, span_id=ids[2], parent_id=ids[0], name="tool.search",
                 start_time=t + 2.6, end_time=t + 3.6, attributes={"query": "<b>not html</b>"}),
            Span(**common, sequence_id=4, span_id=ids[3], parent_id=ids[2], name="http.get",
                 start_time=t + 2.7, end_time=t + 3.4, attributes={"http.status_code": 200},
                 status_code="error", status_message="HTTP 503 once, then retried"),
        ]
    )  # fmt: skip


@dataclass
class KnownStore:
    counts: dict[str, int] = field(default_factory=dict)  # rollouts by status
    traced_rollout_id: str = ""  # a succeeded rollout with a tree of spans
    span_names: tuple[str, ...] = SPAN_NAMES  # of each of its attempts (the reward on the last)
    rewards: dict[str, float] = field(default_factory=dict)  # rollout id -> reward
    workers: list[str] = field(default_factory=list)


async def populate(store: InMemoryLightningStore, *, minutes: float = 30.0, seed: int = 7) -> KnownStore:
    rng = random.Random(seed)
    known = KnownStore(workers=[f"runner-{i}" for i in range(4)])
    with replayed_clock(time.time() - minutes * 60) as clock:
        await store.add_resources({"model": "toy-policy", "temperature": 0.7})
        steps, per_step = 24, 5
        for step in range(steps):
            tasks = [{"task": f"task-{step}-{i}", "step": step} for i in range(per_step)]
            batch = await store.enqueue_many_rollouts([{"input": t, "mode": "train"} for t in tasks])
            for i, _ in enumerate(batch):
                worker = known.workers[i % len(known.workers)]
                clock[0] += 0.5
                claimed = await store.dequeue_rollout(worker_id=worker)
                assert claimed is not None
                rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
                await store.update_worker(worker, {"rollouts": step})
                traced = step == 2 and i == 0
                if traced:  # a first attempt that fails, then a manual retry
                    await _trace(store, rid, aid, 1000 * step, clock[0])
                    clock[0] += 5.0
                    await store.update_attempt(rid, aid, status="failed")
                    aid = (await store.start_attempt(rid, worker_id=worker)).attempt.attempt_id
                clock[0] += 1.0
                base = 1000 * step + 10 * i + 100 * traced
                await _trace(store, rid, aid, base, clock[0])
                clock[0] += minutes * 60 / (steps * per_step) - 1.5
                if (step * per_step + i) % 11 == 5:
                    await store.update_attempt(rid, aid, status="failed")
                    continue
                reward = round(min(1.0, 0.15 + 0.8 * step / steps + rng.uniform(-0.08, 0.08)), 4)
                known.rewards[rid] = reward
                await store.add_span(
                    Span(rollout_id=rid, attempt_id=aid, sequence_id=5,
                         trace_id=f"{base:032x}", span_id=f"{base + 5:016x}", name="agl_async.reward",
                         start_time=clock[0], end_time=clock[0], attributes={"reward": reward})
                )  # fmt: skip
                await store.update_rollout(rid, metadata={"reward": reward})
                await store.update_attempt(rid, aid, status="succeeded")
                if traced:
                    known.traced_rollout_id = rid
        # The run right now: one waiting for its retry, a few in flight, one cancelled, some queued.
        clock[0] = time.time() - 90
        running = await store.enqueue_many_rollouts([{"input": {"task": f"live-{i}"}} for i in range(3)])
        for i, _ in enumerate(running):
            claimed = await store.dequeue_rollout(worker_id=known.workers[i])
            assert claimed is not None
            await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="running")
        retry = RolloutConfig(max_attempts=3, retry_condition=["failed"])
        again = await store.enqueue_rollout({"task": "flaky"}, config=retry)
        claimed = await store.dequeue_rollout(worker_id=known.workers[3])
        assert claimed is not None and claimed.rollout_id == again.rollout_id
        await store.update_attempt(again.rollout_id, claimed.attempt.attempt_id, status="failed")
        cancelled = await store.enqueue_rollout({"task": "cancelled"})
        await store.update_rollout(cancelled.rollout_id, status="cancelled")
        await store.enqueue_many_rollouts([{"input": {"task": f"waiting-{i}"}} for i in range(7)])
        clock[0] = time.time()
    stats = await store.statistics()
    known.counts = dict(stats["rollouts"])
    return known
