"""Benchmark: CPU per request of the HTTP client under ``LightningStoreClient``, and of the server.

    python benchmarks/http_client.py [--requests 4000] [--concurrency 1,16,64] [--repeat 3]
    python benchmarks/http_client.py --httpx2-python /tmp/httpx2-venv/bin/python   # + httpx2

One ``agl-async serve`` process (in-memory store, 127.0.0.1); for every client kind and every
concurrency ``k``, a fresh client process sends ``--requests`` small POSTs (``get_rollout_by_id``
of an unknown id: 26 bytes in, 4 bytes out) from ``k`` concurrent asyncio tasks sharing one client
object, after 200 warm-up requests. Measured: CPU seconds of the client process (all threads)
and of the server process during the measured requests, per request; requests/s; p50/p99
latency. Kinds, run interleaved, ``--repeat`` times (median, min-max):

* ``httpx``: ``httpx.AsyncClient`` with its default transport (httpcore's pool);
* ``httpx+httpx-aiohttp``: ``httpx.AsyncClient(transport=httpx_aiohttp.AiohttpTransport())``;
* ``httpx+agl-aiohttp``: ``httpx.AsyncClient`` over agl_async's own aiohttp transport
  (:mod:`agl_async.http.transport`), as ``LightningStoreClient`` uses it;
* ``LightningStoreClient``: the store client itself (``get_rollout_by_id``), default transport
  (aiohttp); ``LightningStoreClient:httpx``: the same over httpx's transport;
* ``aiohttp``: ``aiohttp.ClientSession`` directly (the floor: no httpx on top);
* ``httpx2``: ``httpx2.AsyncClient`` (the maintained successor, httpcore2's rewritten pool), run
  by ``--httpx2-python`` (an interpreter with ``httpx2`` installed; skipped without one).

Prints one JSON document (and writes it to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"rollout_id":"ro-unknown"}'
PATH = "/v1/get_rollout_by_id"

# ---------------------------------------------------------------------------- the client process
WORKER = r"""
import asyncio, json, sys, time, resource

kind, url, n, k = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
BODY = b'{"rollout_id":"ro-unknown"}'
HEADERS = {"content-type": "application/json"}

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

async def make():
    if kind == "httpx":
        import httpx
        c = httpx.AsyncClient(limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))
        async def post():
            r = await c.post(url, content=BODY, headers=HEADERS); r.raise_for_status(); return r.content
        return post, c.aclose
    if kind == "httpx+httpx-aiohttp":
        import httpx, httpx_aiohttp
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        t = httpx_aiohttp.AiohttpTransport(limits=limits)
        c = httpx.AsyncClient(transport=t)
        async def post():
            r = await c.post(url, content=BODY, headers=HEADERS); r.raise_for_status(); return r.content
        return post, c.aclose
    if kind == "httpx+agl-aiohttp":
        import httpx
        from agl_async.http.transport import make_transport
        c = httpx.AsyncClient(transport=make_transport("aiohttp", max_connections=100))
        async def post():
            r = await c.post(url, content=BODY, headers=HEADERS); r.raise_for_status(); return r.content
        return post, c.aclose
    if kind.startswith("LightningStoreClient"):
        from agl_async import LightningStoreClient
        transport = kind.partition(":")[2] or None
        base = url.rsplit("/v1/", 1)[0]
        c = LightningStoreClient(base, auth_token="", **({"transport": transport} if transport else {}))
        async def post():
            return await c.get_rollout_by_id("ro-unknown")
        return post, c.close
    if kind == "aiohttp":
        import aiohttp
        s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))
        async def post():
            async with s.post(url, data=BODY, headers=HEADERS) as r:
                r.raise_for_status(); return await r.read()
        return post, s.close
    if kind == "httpx2":
        import httpx2
        c = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=100, max_keepalive_connections=100))
        async def post():
            r = await c.post(url, content=BODY, headers=HEADERS); r.raise_for_status(); return r.content
        return post, c.aclose
    raise SystemExit(f"unknown kind {kind}")

async def run(post, count, lat):
    left = [count]
    async def loop():
        while left[0] > 0:
            left[0] -= 1
            t = time.perf_counter(); await post(); lat.append(time.perf_counter() - t)
    await asyncio.gather(*(loop() for _ in range(k)))

async def main():
    post, close = await make()
    await run(post, 200, [])
    print("ready", flush=True)
    sys.stdin.readline()
    lat = []
    c0, t0 = cpu(), time.perf_counter()
    await run(post, n, lat)
    c1, t1 = cpu(), time.perf_counter()
    lat.sort()
    print(json.dumps({"client_cpu_ms": 1000 * (c1 - c0) / n, "requests_per_s": n / (t1 - t0),
                      "p50_ms": 1000 * lat[len(lat) // 2],
                      "p99_ms": 1000 * lat[int(len(lat) * 0.99)]}), flush=True)
    await close()

asyncio.run(main())
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_listening(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


def sample(python: str, kind: str, url: str, n: int, k: int, server_pid: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [python, "-c", WORKER, kind, url, str(n), str(k)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{kind} worker failed to start")
        s0 = _proc_cpu(server_pid)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        s1 = _proc_cpu(server_pid)
        result: dict[str, Any] = json.loads(line)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    result["server_cpu_ms"] = 1000 * (s1 - s0) / n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--kinds",
        default="httpx,httpx+httpx-aiohttp,httpx+agl-aiohttp,LightningStoreClient:httpx,LightningStoreClient,aiohttp",
    )
    parser.add_argument("--httpx2-python", help="an interpreter with httpx2 installed (adds the httpx2 kind)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    kinds = [(k, sys.executable) for k in args.kinds.split(",") if k]
    if args.httpx2_python:
        kinds.append(("httpx2", args.httpx2_python))
    levels = [int(x) for x in args.concurrency.split(",")]
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agl_async.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token",
            "",
        ],
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    samples: dict[str, dict[int, list[dict[str, Any]]]] = {k: {c: [] for c in levels} for k, _ in kinds}
    load_start = os.getloadavg()
    try:
        _wait_listening(port)
        url = f"http://127.0.0.1:{port}{PATH}"
        for _ in range(args.repeat):
            for k in levels:
                for kind, python in kinds:
                    result = sample(python, kind, url, args.requests, k, server.pid)
                    samples[kind][k].append(result)
                    print(f"{kind:22} k={k:3}: {result} load={os.getloadavg()[0]:.2f}", file=sys.stderr)
    finally:
        server.terminate()
        server.wait(timeout=30)
    table: dict[str, Any] = {}
    for kind, by_k in samples.items():
        table[kind] = {}
        for k, values in by_k.items():
            table[kind][k] = {
                key: {
                    "median": statistics.median(v[key] for v in values),
                    "min": min(v[key] for v in values),
                    "max": max(v[key] for v in values),
                }
                for key in ("client_cpu_ms", "server_cpu_ms", "requests_per_s", "p50_ms", "p99_ms")
            }
    report = {
        "requests": args.requests,
        "repeat": args.repeat,
        "load_start": [round(x, 2) for x in load_start],
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "cores": os.cpu_count(),
        "results": table,
    }
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    print(render(report), file=sys.stderr)


def render(report: dict[str, Any]) -> str:
    levels = next(iter(report["results"].values())).keys()
    head = "| client | " + " | ".join(f"client CPU/req, {k} at once" for k in levels)
    head += " | " + " | ".join(f"server CPU/req, {k}" for k in levels) + " |"
    lines = [head, "|---" * (1 + 2 * len(levels)) + "|"]
    for kind, by_k in report["results"].items():
        cells = [f"{by_k[k]['client_cpu_ms']['median']:.3f} ms" for k in levels]
        cells += [f"{by_k[k]['server_cpu_ms']['median']:.3f} ms" for k in levels]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
