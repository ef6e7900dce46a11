"""Benchmark: what TLS costs the store over HTTP — plain vs HTTPS, with 1 and 16 clients.

    PYTHONPATH=. python benchmarks/tls_cost.py [--duration 3] [--clients 1,16] [--repeats 3] \
        [--out benchmarks/results/tls_cost.json]

Setup (identical for both schemes but for the certificate): the store server runs in its own
process with a pre-filled queue (an in-memory store on 127.0.0.1, HTTPS with a throwaway CA's
certificate from ``trustme``, TLS as uvicorn and Python's ``ssl`` negotiate it — TLS 1.3 here);
``C`` clients, each with its own ``LightningStoreClient`` and keep-alive connection, run in
``min(C, 4)`` client processes, start together behind a barrier and loop for ``--duration``
seconds on the runner's hot path, ``finish_and_dequeue`` (one request per rollout). Plain and
HTTPS alternate (A B A B) ``--repeats`` times; the medians are reported.

Printed (and written to ``--out``) JSON, per scheme and client count: ``requests_per_s``,
``client_cpu_ms_per_request`` (CPU time of the client processes over the measured window /
requests), ``server_cpu_ms_per_request`` (the server process likewise), ``p50_ms`` / ``p99_ms``;
``tls_over_plain`` gives the ratios; ``connect`` the cost of a new connection (a fresh client's
first request, which carries the TCP and, for HTTPS, the TLS handshake: wall ms and client CPU ms,
median of 50).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from multiprocessing.synchronize import Barrier, Event
from pathlib import Path
from typing import Any

PREFILL = 200_000


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def make_certificates(directory: Path) -> dict[str, str]:
    import trustme

    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    issued.private_key_pem.write_to_path(str(files["key"]))
    with open(files["cert"], "wb") as f:
        for blob in issued.cert_chain_pems:
            f.write(blob.bytes())
    return {k: str(v) for k, v in files.items()}


# --------------------------------------------------------------------------- server process
def _server_main(port_queue: Any, stop: Event, prefill: int, tls: dict[str, str] | None) -> None:
    from agl_async import InMemoryLightningStore, LightningStoreServer

    async def main() -> None:
        import anyio

        store = InMemoryLightningStore()
        await store.enqueue_many_rollouts([{"input": i} for i in range(prefill)])
        kwargs = {"ssl_certfile": tls["cert"], "ssl_keyfile": tls["key"]} if tls else {}
        async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="", **kwargs) as server:
            port_queue.put((os.getpid(), server.endpoint))
            await anyio.to_thread.run_sync(stop.wait)

    asyncio.run(main())


# --------------------------------------------------------------------------- client processes
def _client_main(
    endpoint: str, verify: Any, first_worker: int, n_tasks: int, duration: float, barrier: Barrier, out: Any
) -> None:
    from agl_async import LightningStoreClient

    async def main() -> dict[str, Any]:
        import anyio

        clients = [LightningStoreClient(endpoint, "", verify) for _ in range(n_tasks)]
        currents = []
        for n, client in enumerate(clients):  # connections open, one rollout held, before the clock
            currents.append(await client.dequeue_rollout(worker_id=first_worker + n))
        await anyio.to_thread.run_sync(barrier.wait)
        cpu0, started = time.process_time(), time.perf_counter()
        deadline = started + duration
        latencies: list[float] = []

        async def loop(client: LightningStoreClient, worker_id: int, current: Any) -> None:
            perf = time.perf_counter
            while current is not None and perf() < deadline:
                t0 = perf()
                current = await client.finish_and_dequeue(
                    current.rollout_id, current.attempt.attempt_id, worker_id=worker_id
                )
                latencies.append(perf() - t0)

        async with anyio.create_task_group() as tg:
            for n, client in enumerate(clients):
                tg.start_soon(loop, client, first_worker + n, currents[n])
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu0
        for client in clients:
            await client.close()
        return {"requests": len(latencies), "elapsed": elapsed, "cpu": cpu, "latencies": latencies}

    out.put(asyncio.run(main()))


def _connect_main(endpoint: str, verify: Any, n: int, out: Any) -> None:
    """A fresh client's first request, ``n`` times: the cost of a new connection."""
    from agl_async import LightningStoreClient

    async def main() -> dict[str, list[float]]:
        walls, cpus = [], []
        warm = LightningStoreClient(endpoint, "", verify)
        await warm.statistics()  # imports, CA loading and the like out of the way
        await warm.close()
        for _ in range(n):
            client = LightningStoreClient(endpoint, "", verify)
            client._client()  # the pool (and its SSL context) exists before the clock starts
            cpu0, t0 = time.process_time(), time.perf_counter()
            await client.get_latest_resources()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - cpu0)
            await client.close()
        return {"wall": walls, "cpu": cpus}

    out.put(asyncio.run(main()))


def run_once(n_clients: int, duration: float, tls: dict[str, str] | None) -> dict[str, Any]:
    import psutil

    ctx = multiprocessing.get_context("spawn")
    port_queue, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_server_main, args=(port_queue, stop, PREFILL, tls), daemon=True)
    server.start()
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        server_pid, endpoint = port_queue.get(timeout=120)
        verify: Any = tls["ca"] if tls else True
        n_procs = min(n_clients, 4)
        barrier = ctx.Barrier(n_procs + 1)  # + this process, which reads the server's CPU
        per_proc = [n_clients // n_procs + (1 if i < n_clients % n_procs else 0) for i in range(n_procs)]
        first = 0
        for n_tasks in per_proc:
            args = (endpoint, verify, first, n_tasks, duration, barrier, results)
            procs.append(ctx.Process(target=_client_main, args=args, daemon=True))
            first += n_tasks
        for proc in procs:
            proc.start()
        server_proc = psutil.Process(server_pid)
        barrier.wait(timeout=120)
        before = server_proc.cpu_times()
        time.sleep(duration)
        after = server_proc.cpu_times()
        parts = [results.get(timeout=duration + 120) for _ in procs]
        connect = None
        if n_clients == 1:
            probe = ctx.Process(target=_connect_main, args=(endpoint, verify, 50, results), daemon=True)
            probe.start()
            connect = results.get(timeout=120)
            probe.join(timeout=30)
    finally:
        stop.set()
        for proc in [*procs, server]:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    requests = sum(p["requests"] for p in parts)
    elapsed = max(p["elapsed"] for p in parts)
    latencies = [x for p in parts for x in p["latencies"]]
    server_cpu = (after.user + after.system) - (before.user + before.system)
    # The server's CPU was read over ``duration``; the clients counted over their own window
    # (about the same): scale the server's share to the requests made in that time.
    server_requests = requests * min(1.0, duration / elapsed)
    figures = {
        "requests_per_s": requests / elapsed,
        "client_cpu_ms_per_request": 1000 * sum(p["cpu"] for p in parts) / requests,
        "server_cpu_ms_per_request": 1000 * server_cpu / server_requests,
        "p50_ms": 1000 * _percentile(latencies, 0.5),
        "p99_ms": 1000 * _percentile(latencies, 0.99),
        "requests": requests,
    }
    if connect is not None:
        figures["connect_wall_ms"] = 1000 * statistics.median(connect["wall"])
        figures["connect_client_cpu_ms"] = 1000 * statistics.median(connect["cpu"])
    return figures


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement")
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts")
    parser.add_argument("--repeats", type=int, default=3, help="A B repetitions (medians reported)")
    parser.add_argument("--out", default=None, help="also write the JSON report to this file")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {"http": {}, "https": {}}
    with tempfile.TemporaryDirectory() as directory:
        tls = make_certificates(Path(directory))
        for _ in range(args.repeats):
            for n in clients:
                for scheme in ("http", "https"):
                    result = run_once(n, args.duration, tls if scheme == "https" else None)
                    runs[scheme].setdefault(str(n), []).append(result)
                    print(f"{scheme} clients={n}: {json.dumps(result)}", file=sys.stderr, flush=True)
    medians = {scheme: {n: _median_of(r) for n, r in by_n.items()} for scheme, by_n in runs.items()}
    ratios = {}
    for n in map(str, clients):
        plain, tls_figures = medians["http"][n], medians["https"][n]
        ratios[n] = {k: round(tls_figures[k] / plain[k], 3) for k in plain if k != "requests" and plain[k]}
    report = {
        "benchmark": "tls_cost",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "workload": "finish_and_dequeue (one request per rollout), keep-alive connections",
        "duration_s": args.duration,
        "repeats": args.repeats,
        "median": medians,
        "tls_over_plain": ratios,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
