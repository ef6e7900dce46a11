"""Operations per second of the in-memory store, with and without ``LightningStoreLocked``.

Run: ``python benchmarks/store_ops.py [--n 20000] [--repeat 3]``. Prints JSON. Each operation is
awaited one at a time from one task on asyncio (``anyio.run``), so this measures the per-call cost
of the store itself (plus the lock's acquire/release), not concurrency. Best of ``--repeat`` runs.

* ``enqueue``: ``enqueue_rollout`` into an empty store;
* ``dequeue_complete``: ``dequeue_rollout(worker_id=…)`` then ``update_attempt(…, status="succeeded")``
  per rollout (one pair = one operation), over a queue of ``n`` rollouts;
* ``add_span``: ``add_span`` of ``n`` spans spread over 100 running attempts.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable

import anyio

from agl_async import InMemoryLightningStore, LightningStore, LightningStoreLocked, Span

Factory = Callable[[], LightningStore]


async def bench_enqueue(make: Factory, n: int) -> float:
    store = make()
    start = time.perf_counter()
    for i in range(n):
        await store.enqueue_rollout({"task": i})
    return n / (time.perf_counter() - start)


async def bench_dequeue_complete(make: Factory, n: int) -> float:
    store = make()
    await store.enqueue_many_rollouts([{"input": {"task": i}} for i in range(n)])
    start = time.perf_counter()
    for i in range(n):
        claimed = await store.dequeue_rollout(worker_id=i % 32)
        assert claimed is not None
        await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")
    return n / (time.perf_counter() - start)


async def bench_add_span(make: Factory, n: int) -> float:
    store = make()
    attempts = [await store.start_rollout({"task": i}) for i in range(100)]
    spans = [
        Span(
            rollout_id=a.rollout_id,
            attempt_id=a.attempt.attempt_id,
            sequence_id=i // 100 + 1,
            trace_id="0" * 32,
            span_id=f"{i:016x}",
            name="llm.call",
            start_time=1.0,
            end_time=2.0,
            attributes={"gen_ai.usage.prompt_tokens": 12, "reward": 0.5},
        )
        for i in range(n)
        for a in (attempts[i % 100],)
    ]
    start = time.perf_counter()
    for span in spans:
        await store.add_span(span)
    return n / (time.perf_counter() - start)


BENCHES: dict[str, Callable[[Factory, int], Awaitable[float]]] = {
    "enqueue": bench_enqueue,
    "dequeue_complete": bench_dequeue_complete,
    "add_span": bench_add_span,
}
STORES: dict[str, Factory] = {
    "memory": InMemoryLightningStore,
    "locked": lambda: LightningStoreLocked(InMemoryLightningStore()),
}


async def run(n: int, repeat: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}
    for store_name, make in STORES.items():
        results[store_name] = {}
        for bench_name, bench in BENCHES.items():
            best = max([await bench(make, n) for _ in range(repeat)])
            results[store_name][bench_name] = round(best)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="operations per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    args = parser.parse_args()
    ops = anyio.run(run, args.n, args.repeat, backend="asyncio")
    report = {
        "benchmark": "store_ops",
        "unit": "operations per second (best of repeats, one task, asyncio)",
        "n": args.n,
        "repeat": args.repeat,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "results": ops,
        "lock_overhead_pct": {
            name: round(100 * (ops["memory"][name] / ops["locked"][name] - 1), 1) for name in BENCHES
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
