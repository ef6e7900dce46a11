"""Agent-Lightning 0.3.0's side of benchmarks/http_store.py (run by ITS interpreter, never ours).

    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/agl/aglvenv/bin/python benchmarks/peer/agl_http_store.py \
        --duration 3 --clients 1,4,16

Self-contained on purpose (it imports only agentlightning and the standard library). Same shape
as ours: the store server (its InMemoryLightningStore behind its LightningStoreServer, launched
in asyncio mode like its ``agl store`` command) runs in its own process with a pre-filled queue;
``C`` clients (its LightningStoreClient, one per client) run in ``min(C, 4)`` processes, start
behind a barrier and loop ``dequeue_rollout(worker_id)`` + ``update_attempt(status="succeeded")``.
Prints one JSON line: ``{"dequeue+update": {"1": {...}, ...}}`` with the same figures as ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import socket
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
PREFILL = 60_000
START_METHOD = "spawn"  # benchmarks/peer/agl_workloads.py sets "fork" (it has imported agentlightning)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _quiet() -> None:
    logging.disable(logging.WARNING)


def _server_main(port: int, ready: Any, stop: Any, prefill: int) -> None:
    _quiet()
    from agentlightning.store.client_server import LightningStoreServer
    from agentlightning.store.memory import InMemoryLightningStore
    from agentlightning.types import EnqueueRolloutRequest

    async def main() -> None:
        store = InMemoryLightningStore()
        await store.enqueue_many_rollouts([EnqueueRolloutRequest(input={"i": i}) for i in range(prefill)])
        server = LightningStoreServer(store, host="127.0.0.1", port=port, launch_mode="asyncio")
        await server.start()
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        await server.stop()

    asyncio.run(main())


def _client_main(
    endpoint: str, first_worker: int, n_tasks: int, duration: float, barrier: Any, out: Any
) -> None:
    _quiet()
    from agentlightning.store.client_server import LightningStoreClient

    async def main() -> dict[str, Any]:
        clients = [LightningStoreClient(endpoint) for _ in range(n_tasks)]
        for client in clients:
            await client.statistics()
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait)
        deadline = time.perf_counter() + duration
        latencies: list[float] = []
        by_op: dict[str, list[float]] = {"dequeue": [], "update": []}
        counts = {"requests": 0, "rollouts": 0, "empty": 0}

        async def loop(client: Any, worker_id: int) -> None:
            perf = time.perf_counter
            while perf() < deadline:
                t0 = perf()
                claimed = await client.dequeue_rollout(worker_id=str(worker_id))
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
        await asyncio.gather(*(loop(c, first_worker + i) for i, c in enumerate(clients)))
        elapsed = time.perf_counter() - started
        for client in clients:
            await client.close()
        return {**counts, "elapsed": elapsed, "latencies": latencies, "by_op": by_op}

    out.put(asyncio.run(main()))


def run(n_clients: int, duration: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context(START_METHOD)
    ready, stop, results = ctx.Event(), ctx.Event(), ctx.Queue()
    port = _free_port()
    server = ctx.Process(target=_server_main, args=(port, ready, stop, PREFILL), daemon=True)
    server.start()
    procs: list[Any] = []
    try:
        if not ready.wait(180):
            raise RuntimeError("the Agent-Lightning server did not start")
        n_procs = min(n_clients, 4)
        barrier = ctx.Barrier(n_procs)
        per_proc = [n_clients // n_procs + (1 if i < n_clients % n_procs else 0) for i in range(n_procs)]
        first = 0
        for n_tasks in per_proc:
            args = (f"http://127.0.0.1:{port}", first, n_tasks, duration, barrier, results)
            procs.append(ctx.Process(target=_client_main, args=args, daemon=True))
            first += n_tasks
        for proc in procs:
            proc.start()
        parts = [results.get(timeout=duration + 180) for _ in procs]
    finally:
        stop.set()
        for proc in [*procs, server]:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    elapsed = max(part["elapsed"] for part in parts)
    latencies = [x for part in parts for x in part["latencies"]]
    requests = sum(part["requests"] for part in parts)
    per_op = {}
    for op in ("dequeue", "update"):
        values = [x for part in parts for x in part["by_op"][op]]
        if values:
            per_op[f"{op}_p50_ms"] = round(_percentile(values, 0.50) * 1000, 3)
            per_op[f"{op}_p99_ms"] = round(_percentile(values, 0.99) * 1000, 3)
    return {
        **per_op,
        "requests_per_s": round(requests / elapsed, 1),
        "rollouts_per_s": round(sum(part["rollouts"] for part in parts) / elapsed, 1),
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 3),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 3),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
        "requests": requests,
        "empty_dequeues": sum(part["empty"] for part in parts),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args()
    import agentlightning

    results = {str(n): run(n, args.duration) for n in (int(c) for c in args.clients.split(","))}
    print(json.dumps({"version": agentlightning.__version__, "dequeue+update": results}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
