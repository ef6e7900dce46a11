"""Time of the dashboard's JSON routes (and of ``/metrics``) with a large store.

Run: ``python benchmarks/dashboard_routes.py [--rollouts 100000] [--repeat 20]``. Prints JSON.

The store is an ``InMemoryLightningStore`` holding a replayed run of ``--rollouts`` rollouts over
ten hours (the store's clock is replayed while it is filled, so end times are spread as in a real
run): 98 % finished (succeeded with a reward, every 20th failed), 64 running on 64 workers, the
rest queued, two spans per rollout. A server in this process serves it; one httpx client asks
each route ``--repeat`` times and the JSON gives the median, 95th percentile and maximum in ms.

``summary_first`` is the very first ``/v1/dashboard/summary`` (the timeline is built from every
finished rollout, in pages). Then the worst case: the timeline is refreshed and
``store.statistics()`` called on every request (in the server both are reused for a second,
however many pages poll), and for ``summary`` 20 rollouts finish between two calls (a run at ~40
rollouts/s polled every 0.5 s). ``gc`` reports the full (generation 2) garbage collections that
ran during the measurements and their total pause: with a million live objects, such a pause
(not the route) is what the slowest requests of any route include.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import time
import types
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from agl_async import InMemoryLightningStore, LightningStoreServer, Span
from agl_async.store import memory


async def fill(store: InMemoryLightningStore, n: int, hours: float = 10.0) -> dict[str, Any]:
    clock = [time.time() - hours * 3600]
    real = memory.time
    memory.time = types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic)  # type: ignore[assignment]
    step = hours * 3600 / n
    running = 64
    queued = n - int(n * 0.98) - running
    finished = n - running - queued
    try:
        await store.add_resources({"model": "policy"})
        made = 0
        while made < n:
            batch = await store.enqueue_many_rollouts(
                [{"input": {"task": made + i}, "mode": "train"} for i in range(min(1000, n - made))]
            )
            for r in batch:
                if made >= finished + running:
                    made += 1
                    continue  # stays queued
                claimed = await store.dequeue_rollout(worker_id=f"runner-{made % running}")
                assert claimed is not None and claimed.rollout_id == r.rollout_id
                aid = claimed.attempt.attempt_id
                await store.add_many_spans(
                    [
                        Span(rollout_id=r.rollout_id, attempt_id=aid, sequence_id=k, trace_id="0" * 32,
                             span_id=f"{made:014x}{k:02x}", name=name, start_time=clock[0],
                             end_time=clock[0] + 0.5, attributes={"k": k})
                        for k, name in ((1, "agent.run"), (2, "llm.chat"))
                    ]
                )  # fmt: skip
                clock[0] += step
                if made < finished:
                    if made % 20 == 7:
                        await store.update_attempt(r.rollout_id, aid, status="failed")
                    else:
                        reward = min(1.0, 0.2 + 0.7 * made / n)
                        await store.update_rollout(r.rollout_id, metadata={"reward": reward})
                        await store.update_attempt(r.rollout_id, aid, status="succeeded")
                made += 1
    finally:
        memory.time = real
    stats = await store.statistics()
    return {"rollouts": stats["rollouts"], "spans": stats["total_spans"], "workers": stats["workers"]}


_GC_PAUSES: list[float] = []
_gc_started = 0.0


def _gc_watch(phase: str, info: dict[str, Any]) -> None:
    global _gc_started
    if info.get("generation") != 2:
        return
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        _GC_PAUSES.append(time.perf_counter() - _gc_started)


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "max_ms": round(ordered[-1], 2),
        "n": len(ordered),
    }


async def timed(
    call: Callable[[], Awaitable[httpx.Response]], repeat: int, between: Any = None
) -> list[float]:
    out = []
    for _ in range(repeat):
        if between is not None:
            await between()
        start = time.perf_counter()
        response = await call()
        out.append((time.perf_counter() - start) * 1e3)
        response.raise_for_status()
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    store = InMemoryLightningStore()
    started = time.perf_counter()
    contents = await fill(store, args.rollouts)
    fill_seconds = time.perf_counter() - started
    some = (await store.query_rollouts(status_in=["succeeded"], limit=1, offset=args.rollouts // 2))[0]
    queued = await store.query_rollouts(status_in=["queuing"])

    async def finish_some() -> None:  # 20 more rollouts finish between two polls
        for _ in range(20):
            claimed = await store.dequeue_rollout(worker_id="runner-extra")
            if claimed is None:
                return
            await store.update_rollout(claimed.rollout_id, metadata={"reward": 0.9})
            await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")

    # Where the time goes: the store calls behind the routes, made directly.
    finished = ["succeeded", "failed", "cancelled"]
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "statistics": store.statistics,
        "page_newest_25": lambda: store.query_rollouts(sort_by="start_time", sort_order="desc", limit=26),
        "page_at_50000": lambda: store.query_rollouts(
            sort_by="start_time", sort_order="desc", limit=26, offset=50_000
        ),
        "page_status_failed": lambda: store.query_rollouts(
            status_in=["failed"], sort_by="start_time", sort_order="desc", limit=26
        ),
        "search_id": lambda: store.query_rollouts(rollout_id_contains=some.rollout_id[-6:], limit=26),
        "timeline_catch_up_256": lambda: store.query_rollouts(
            status_in=finished,
            sort_by="end_time",
            sort_order="desc",
            limit=256,  # type: ignore[arg-type]
        ),
        "queue_oldest_10": lambda: store.query_rollouts(status_in=["queuing", "requeuing"], limit=10),
    }
    store_calls: dict[str, dict[str, float]] = {}
    for name, call in calls.items():
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            await call()
            times.append((time.perf_counter() - start) * 1e3)
        store_calls[name] = _summary(times)

    routes: dict[str, dict[str, float]] = {}
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        dashboard = server.app.extensions["dashboard"]
        async with httpx.AsyncClient(base_url=server.endpoint, timeout=60) as http:
            routes["summary_first"] = _summary(await timed(lambda: http.get("/v1/dashboard/summary"), 1))
            dashboard.timeline.min_interval = 0.0  # refresh on every call: the worst case
            dashboard.statistics_ttl = 0.0
            gc.callbacks.append(_gc_watch)
            routes["summary"] = _summary(
                await timed(lambda: http.get("/v1/dashboard/summary"), args.repeat, finish_some)
            )
            pages = {
                "rollouts_page_1": {"limit": 25},
                "rollouts_page_at_50000": {"limit": 25, "offset": 50_000},
                "rollouts_last_page": {"limit": 25, "offset": args.rollouts - 25},
                "rollouts_status_failed": {"limit": 25, "status": "failed"},
                "rollouts_status_running_queuing": {"limit": 25, "status": "running,queuing"},
                "rollouts_search_id": {"limit": 25, "q": some.rollout_id[-6:]},
            }
            for name, params in pages.items():
                routes[name] = _summary(
                    await timed(lambda p=params: http.get("/v1/dashboard/rollouts", params=p), args.repeat)  # type: ignore[misc]
                )
            routes["rollout_detail"] = _summary(
                await timed(lambda: http.get(f"/v1/dashboard/rollouts/{some.rollout_id}"), args.repeat)
            )
            routes["metrics"] = _summary(await timed(lambda: http.get("/metrics"), args.repeat))
            shell = await timed(lambda: http.get("/"), args.repeat)
            routes["page_shell"] = _summary(shell)
            gc.callbacks.remove(_gc_watch)
    return {
        "benchmark": "dashboard_routes",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "store": {"kind": "InMemoryLightningStore", "fill_seconds": round(fill_seconds, 1), **contents},
        "queued_at_start": len(queued),
        "repeat": args.repeat,
        "store_calls": store_calls,
        "routes": routes,
        "gc": {"full_collections": len(_GC_PAUSES), "total_pause_ms": round(sum(_GC_PAUSES) * 1e3, 1)},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollouts", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=20)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
