"""What the request-metrics middleware costs per request, and what a ``/metrics`` scrape costs.

Run: ``python benchmarks/metrics_overhead.py [--n 20000] [--repeat 5] [--rollouts 100000]``.
Prints JSON. Needs ``prometheus_client`` (the ``metrics`` extra) for the "with" side.

* ``asgi_us_per_request``: the server's ASGI application called directly (no socket, no HTTP
  parsing: the part the middleware adds to) for ``POST /v1/get_latest_attempt`` on a small
  store, with ``metrics=True`` and ``metrics=False``; ``--repeat`` interleaved rounds (with,
  without, with, ...), best and median of each. The difference is the middleware's cost.
* ``http_server_cpu_us_per_request``: the same request over real HTTP to a server in a child
  process, one client here; the child's CPU time (user + system, from ``/proc``) per request,
  with and without metrics. This is the cost where it is paid, on the server's one event loop.
* ``middleware_alone_us``: the middleware around a trivial ASGI application that answers at once,
  minus that application alone (best of 15 interleaved rounds): its own cost, without noise from
  the rest of the server.
* ``scrape_ms``: ``GET /metrics`` (through the ASGI application) on a store of ``--rollouts``
  finished rollouts: it calls ``store.statistics()`` once, then renders.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import msgspec

from agl_async import InMemoryLightningStore, LightningStoreServer


async def _asgi_call(app: Any, method: str, path: str, body: bytes) -> int:
    status = 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 4747),
        "client": ("127.0.0.1", 50000),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    await app(scope, receive, send)
    return status


async def asgi_round(metrics: bool, n: int) -> float:
    store = InMemoryLightningStore()
    claimed = await store.start_rollout({"task": 0})
    server = LightningStoreServer(store, "127.0.0.1", 0, auth_token="", metrics=metrics)
    body = msgspec.json.encode({"rollout_id": claimed.rollout_id})
    for _ in range(200):  # warm up
        await _asgi_call(server.app, "POST", "/v1/get_latest_attempt", body)
    start = time.perf_counter()
    for _ in range(n):
        await _asgi_call(server.app, "POST", "/v1/get_latest_attempt", body)
    return (time.perf_counter() - start) / n * 1e6


def _proc_cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime + stime


_CHILD = """
import asyncio, sys
from agl_async import InMemoryLightningStore, LightningStoreServer
async def main():
    store = InMemoryLightningStore()
    claimed = await store.start_rollout({"task": 0})
    server = LightningStoreServer(store, "127.0.0.1", 0, auth_token="", metrics=sys.argv[1] == "1")
    await server.start()
    print(server.port, claimed.rollout_id, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop()
asyncio.run(main())
"""


async def http_round(metrics: bool, n: int) -> float:
    import httpx

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD,
        "1" if metrics else "0",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        port, rollout_id = (await child.stdout.readline()).decode().split()
        body = {"rollout_id": rollout_id}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(200):
                (await client.post("/v1/get_latest_attempt", json=body)).raise_for_status()
            before = _proc_cpu_seconds(child.pid)
            for _ in range(n):
                (await client.post("/v1/get_latest_attempt", json=body)).raise_for_status()
            used = _proc_cpu_seconds(child.pid) - before
        child.stdin.write(b"\n")
        await child.stdin.drain()
        await asyncio.wait_for(child.wait(), 30)
        return used / n * 1e6
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def scrape_ms(rollouts: int, repeat: int) -> dict[str, float]:
    store = InMemoryLightningStore()
    for offset in range(0, rollouts, 1000):
        batch = await store.enqueue_many_rollouts([{"input": i} for i in range(min(1000, rollouts - offset))])
        for r in batch:
            claimed = await store.dequeue_rollout(worker_id=r.rollout_id[-1])
            assert claimed is not None
            await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")
    server = LightningStoreServer(store, "127.0.0.1", 0, auth_token="")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        assert await _asgi_call(server.app, "GET", "/metrics", b"") == 200
        times.append((time.perf_counter() - start) * 1e3)
    stats_times = []
    for _ in range(repeat):
        start = time.perf_counter()
        await store.statistics()
        stats_times.append((time.perf_counter() - start) * 1e3)
    return {"median": statistics.median(times), "statistics_call_median": statistics.median(stats_times)}


async def middleware_alone(rounds: int = 15, n: int = 30000) -> dict[str, float]:
    from agl_async.http.request_metrics import RequestMetrics, RouteTemplates

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def send(message: Any) -> None:
        pass

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    wrapped = RequestMetrics(app, RouteTemplates(["/v1/get_latest_attempt"]))
    scope = {"type": "http", "path": "/v1/get_latest_attempt", "method": "POST"}
    best = {"bare": float("inf"), "wrapped": float("inf")}
    for _ in range(rounds):
        for label, target in (("bare", app), ("wrapped", wrapped)):
            start = time.perf_counter()
            for _ in range(n):
                await target(scope, receive, send)
            best[label] = min(best[label], (time.perf_counter() - start) / n * 1e6)
    return {**best, "middleware": best["wrapped"] - best["bare"]}


def _summary(values: list[float]) -> dict[str, float]:
    return {"best": min(values), "median": statistics.median(values)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    asgi: dict[str, list[float]] = {"with": [], "without": []}
    http: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(args.repeat):
        for label, on in (("with", True), ("without", False)):
            asgi[label].append(await asgi_round(on, args.n))
    if sys.platform == "linux" and not args.no_http:
        for _ in range(args.repeat):
            for label, on in (("with", True), ("without", False)):
                http[label].append(await http_round(on, args.n_http))
    result: dict[str, Any] = {
        "benchmark": "metrics_overhead",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "n": args.n,
        "repeat": args.repeat,
        "asgi_us_per_request": {k: _summary(v) for k, v in asgi.items()},
        "asgi_middleware_us_median": statistics.median(asgi["with"]) - statistics.median(asgi["without"]),
    }
    if http["with"]:
        result["n_http"] = args.n_http
        result["http_server_cpu_us_per_request"] = {k: _summary(v) for k, v in http.items()}
        result["http_middleware_cpu_us_median"] = statistics.median(http["with"]) - statistics.median(
            http["without"]
        )
    result["middleware_alone_us"] = await middleware_alone()
    result["scrape_ms"] = {"rollouts": args.rollouts, **await scrape_ms(args.rollouts, 5)}
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="requests per ASGI round")
    parser.add_argument("--n-http", type=int, default=3000, help="requests per HTTP round")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rollouts", type=int, default=100_000, help="store size for the scrape")
    parser.add_argument("--no-http", action="store_true", help="skip the child-process HTTP rounds")
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
