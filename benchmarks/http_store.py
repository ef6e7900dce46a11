"""Benchmark: the store over HTTP — a runner's dequeue + complete cycle with 1, 4 and 16 clients.

    .venv/bin/python benchmarks/http_store.py [--duration 3] [--clients 1,4,16]
    AGL_PEER_PYTHON=/tmp/agl/aglvenv/bin/python .venv/bin/python benchmarks/http_store.py

Setup (the same for both sides): the store server runs in its own process with a pre-filled queue
(an in-memory store served on 127.0.0.1); ``C`` concurrent clients, each with its own client
object and connection, run in ``min(C, 4)`` client processes (``C / processes`` asyncio tasks
each), start together behind a barrier and loop for ``--duration`` seconds:

* ``dequeue+update``: ``dequeue_rollout(worker_id)`` then ``update_attempt(..., status="succeeded")``
  (two requests per rollout) — the workload both implementations can run;
* ``finish_and_dequeue`` (ours only): one request per rollout, ending the attempt and claiming the
  next rollout together.

Printed JSON: for each workload and client count, HTTP ``requests_per_s``, ``rollouts_per_s``
and per-request ``p50_ms`` / ``p99_ms``; the same figures for Agent-Lightning 0.3.0 when
``AGL_PEER_PYTHON`` names its interpreter (measured by ``benchmarks/peer/agl_http_store.py`` under
that interpreter, in the same run), and ``ratio`` = ours / theirs for requests/s and rollouts/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

PEER_SCRIPT = Path(__file__).parent / "peer" / "agl_http_store.py"
PREFILL = 60_000


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --------------------------------------------------------------------------- server process
def _server_main(port_queue: Any, stop: Event, prefill: int) -> None:
    from agl_async import InMemoryLightningStore, LightningStoreServer

    async def main() -> None:
        import anyio

        store = InMemoryLightningStore()
        await store.enqueue_many_rollouts([{"input": i} for i in range(prefill)])
        async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server:
            port_queue.put(server.port)
            await anyio.to_thread.run_sync(stop.wait)

    asyncio.run(main())


# --------------------------------------------------------------------------- client processes
def _client_main(
    endpoint: str, first_worker: int, n_tasks: int, duration: float, workload: str, barrier: Barrier, out: Any
) -> None:
    from agl_async import LightningStoreClient

    async def main() -> dict[str, Any]:
        import anyio

        clients = [LightningStoreClient(endpoint, auth_token="") for _ in range(n_tasks)]
        for client in clients:  # open the connections before the clock starts
            await client.statistics()
        await anyio.to_thread.run_sync(barrier.wait)
        deadline = time.perf_counter() + duration
        latencies: list[float] = []
        by_op: dict[str, list[float]] = {"dequeue": [], "update": []}  # dequeue+update, per request kind
        counts = {"requests": 0, "rollouts": 0, "empty": 0}

        async def loop(client: LightningStoreClient, worker_id: int) -> None:
            perf = time.perf_counter
            if workload == "finish_and_dequeue":
                t0 = perf()
                current = await client.dequeue_rollout(worker_id=worker_id)
                latencies.append(perf() - t0)
                counts["requests"] += 1
                while current is not None and perf() < deadline:
                    t0 = perf()
                    current = await client.finish_and_dequeue(
                        current.rollout_id, current.attempt.attempt_id, worker_id=worker_id
                    )
                    latencies.append(perf() - t0)
                    counts["requests"] += 1
                    counts["rollouts"] += 1
                if current is None:
                    counts["empty"] += 1
                return
            while perf() < deadline:
                t0 = perf()
                claimed = await client.dequeue_rollout(worker_id=worker_id)
                t1 = perf()
                latencies.append(t1 - t0)
                by_op["dequeue"].append(t1 - t0)
                counts["requests"] += 1
                if claimed is None:
                    counts["empty"] += 1
                    continue
                await client.update_attempt(
                    claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded"
                )
                latencies.append(perf() - t1)
                by_op["update"].append(latencies[-1])
                counts["requests"] += 1
                counts["rollouts"] += 1

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i, client in enumerate(clients):
                tg.start_soon(loop, client, first_worker + i)
        elapsed = time.perf_counter() - started
        for client in clients:
            await client.close()
        return {**counts, "elapsed": elapsed, "latencies": latencies, "by_op": by_op}

    out.put(asyncio.run(main()))


def run_ours(n_clients: int, duration: float, workload: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    port_queue, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_server_main, args=(port_queue, stop, PREFILL), daemon=True)
    server.start()
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        port = port_queue.get(timeout=60)
        n_procs = min(n_clients, 4)
        barrier = ctx.Barrier(n_procs)
        per_proc = [n_clients // n_procs + (1 if i < n_clients % n_procs else 0) for i in range(n_procs)]
        first = 0
        for n_tasks in per_proc:
            args = (f"http://127.0.0.1:{port}", first, n_tasks, duration, workload, barrier, results)
            procs.append(ctx.Process(target=_client_main, args=args, daemon=True))
            first += n_tasks
        for proc in procs:
            proc.start()
        parts = [results.get(timeout=duration + 120) for _ in procs]
    finally:
        stop.set()
        for proc in [*procs, server]:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return summarise(parts)


def summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate the client processes' counts and latencies into the reported figures."""
    elapsed = max(part["elapsed"] for part in parts)
    latencies = [x for part in parts for x in part["latencies"]]
    requests = sum(part["requests"] for part in parts)
    rollouts = sum(part["rollouts"] for part in parts)
    per_op = {}
    for op in ("dequeue", "update"):
        values = [x for part in parts for x in part.get("by_op", {}).get(op, [])]
        if values:
            per_op[f"{op}_p50_ms"] = round(_percentile(values, 0.50) * 1000, 3)
            per_op[f"{op}_p99_ms"] = round(_percentile(values, 0.99) * 1000, 3)
    return {
        **per_op,
        "requests_per_s": round(requests / elapsed, 1),
        "rollouts_per_s": round(rollouts / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
        "requests": requests,
        "empty_dequeues": sum(part["empty"] for part in parts),
    }


def run_peer(clients: list[int], duration: float) -> dict[str, Any]:
    python = os.environ.get("AGL_PEER_PYTHON")
    if not python:
        return {"skipped": "AGL_PEER_PYTHON is not set"}
    if not Path(python).exists():
        return {"skipped": f"AGL_PEER_PYTHON={python} does not exist"}
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("PYTHONPATH", None)
    command = [
        python,
        str(PEER_SCRIPT),
        "--duration",
        str(duration),
        "--clients",
        ",".join(map(str, clients)),
    ]
    completed = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=60 + len(clients) * (duration + 90)
    )
    if completed.returncode != 0:
        return {"skipped": f"peer benchmark failed ({completed.returncode}): {completed.stderr[-2000:]}"}
    result: dict[str, Any] = json.loads(completed.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    ours: dict[str, dict[str, Any]] = {"dequeue+update": {}, "finish_and_dequeue": {}}
    for workload in ours:
        for n in clients:
            ours[workload][str(n)] = run_ours(n, args.duration, workload)
    peer = run_peer(clients, args.duration)

    ratio: dict[str, Any] = {}
    peer_runs = peer.get("dequeue+update", {})
    for n in map(str, clients):
        theirs = peer_runs.get(n)
        if not theirs:
            continue
        ratio[n] = {
            "dequeue+update requests_per_s": round(
                ours["dequeue+update"][n]["requests_per_s"] / theirs["requests_per_s"], 2
            ),
            "dequeue+update rollouts_per_s": round(
                ours["dequeue+update"][n]["rollouts_per_s"] / theirs["rollouts_per_s"], 2
            ),
            "finish_and_dequeue rollouts_per_s": round(
                ours["finish_and_dequeue"][n]["rollouts_per_s"] / theirs["rollouts_per_s"], 2
            ),
        }
    report = {
        "benchmark": "http_store",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "duration_s": args.duration,
        "prefilled_rollouts": PREFILL,
        "agl_async": ours,
        "agentlightning_0.3.0": peer,
        "ratio_ours_over_peer": ratio,
    }
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
