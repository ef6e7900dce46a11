"""Scenario 7 (slow): 64 concurrent clients hammer one server for 30 s.

The server is a standalone ``agl-async serve`` process (so its memory can be measured alone);
4 client processes (``python -m faults.fleet load``) run 16 store clients each, every client
looping dequeue -> update_attempt(running) -> 3 x add_span -> update_attempt(succeeded) until
its deadline (a bounded loop; a claimed rollout is finished first). A feeder here keeps the queue
topped up. Checked: zero errors, zero lost spans (what the clients were told they added is what
the store holds), every finished rollout succeeded once, and the server's RSS growth stays under
``RSS_BOUND`` — the store keeps everything it is given, so the bound is stated as a fixed
allowance plus a generous cost per stored span/rollout. The p99 latency is recorded. It runs
over plain HTTP and over HTTPS (a throwaway CA's certificate).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import anyio
import psutil
import pytest
from conftest import TLSFiles

from agl_async import LightningStoreClient
from agl_async.testing import free_port

from .fleet import popen, stop_session, wait_exit, wait_no_session_left

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

PROCESSES = 4
CLIENTS_PER_PROCESS = 16
SECONDS = float(os.environ.get("AGL_LOAD_SECONDS", "30"))
SPANS_PER_ROLLOUT = 3
MIB = 1024 * 1024
#: RSS growth allowance: 64 MiB fixed (allocator arenas, the idempotency memory of the last
#: 8192 answers) + 4 KiB per stored span and per stored rollout (each well under 1 KiB of JSON).
RSS_FIXED = 64 * MIB
RSS_PER_ITEM = 4 * 1024


async def _feed(client: LightningStoreClient, until: float, counts: dict[str, int]) -> None:
    """Keep at least 256 rollouts queued until ``until``."""
    while time.monotonic() < until:
        stats = await client.statistics()
        if stats["queue_length"] < 256:
            await client.enqueue_many_rollouts([{"input": n} for n in range(256)])
            counts["enqueued"] += 256
        await anyio.sleep(0.1)


async def _sample_rss(pid: int, until: float, samples: list[tuple[float, int]]) -> None:
    proc = psutil.Process(pid)
    started = time.monotonic()
    while time.monotonic() < until:
        samples.append((time.monotonic() - started, proc.memory_info().rss))
        await anyio.sleep(0.5)


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_64_clients_for_30_seconds(
    scheme: str, tls_files: TLSFiles, figures: Callable[..., None]
) -> None:
    port = free_port()
    tls = ["--ssl-certfile", str(tls_files.cert), "--ssl-keyfile", str(tls_files.key)]
    ca = ["--ca-file", str(tls_files.ca)] if scheme == "https" else []
    server = popen("agl_async.cli", "serve", "--host", "127.0.0.1", "--port", str(port), *(tls if ca else []))
    procs: list[Any] = []
    try:
        assert server.stdout is not None
        line = await anyio.to_thread.run_sync(server.stdout.readline)
        assert "listening on" in line, line
        rss_start = psutil.Process(server.pid).memory_info().rss
        feeder = LightningStoreClient(f"{scheme}://127.0.0.1:{port}", "", str(tls_files.ca))
        counts = {"enqueued": 0}
        await feeder.enqueue_many_rollouts([{"input": n} for n in range(512)])
        counts["enqueued"] += 512
        rss: list[tuple[float, int]] = []
        started = time.monotonic()
        procs = [
            popen(
                "load",
                "--port",
                str(port),
                "--clients",
                str(CLIENTS_PER_PROCESS),
                "--seconds",
                str(SECONDS),
                "--spans",
                str(SPANS_PER_ROLLOUT),
                "--tag",
                f"p{n}",
                *ca,
            )
            for n in range(PROCESSES)
        ]
        results: list[dict[str, Any]] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_feed, feeder, started + SECONDS + 5, counts)
            tg.start_soon(_sample_rss, server.pid, started + SECONDS + 5, rss)
            for proc in procs:
                code, out, err = await wait_exit(proc, SECONDS + 120)
                assert code == 0, err
                results.append(json.loads(out.strip().splitlines()[-1]))
            tg.cancel_scope.cancel()
        wall = time.monotonic() - started
        stats = await feeder.statistics()
        rss_end = psutil.Process(server.pid).memory_info().rss
        await feeder.close()
        for proc in procs:
            await wait_no_session_left(proc.pid)
    finally:
        for proc in procs:
            stop_session(proc)
        server.send_signal(2)
        code, _, server_err = await wait_exit(server, 30)
        stop_session(server)
    assert code == 0, server_err
    assert "Traceback" not in server_err, server_err

    errors = sum(r["errors"] for r in results)
    samples = [s for r in results for s in r["error_samples"]]
    assert errors == 0, samples
    spans_added = sum(r["spans_added"] for r in results)
    done = sum(r["rollouts_done"] for r in results)
    requests = sum(r["requests"] for r in results)
    assert stats["total_spans"] == spans_added  # zero lost, zero extra
    assert stats["rollouts"]["succeeded"] == done
    assert stats["rollouts"]["failed"] == 0 and stats["attempts"]["unresponsive"] == 0
    assert done > 0 and spans_added == SPANS_PER_ROLLOUT * done

    latencies = sorted(x for r in results for x in r["latencies"])
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[int(len(latencies) * 0.99)]
    growth = rss_end - rss_start
    bound = RSS_FIXED + RSS_PER_ITEM * (spans_added + stats["total_rollouts"])
    peak = max(r for _, r in rss) if rss else rss_end
    figures(
        scheme=scheme,
        clients=PROCESSES * CLIENTS_PER_PROCESS,
        seconds=SECONDS,
        wall_s=wall,
        requests=requests,
        requests_per_s=requests / SECONDS,
        errors=errors,
        rollouts_done=done,
        spans_added=spans_added,
        spans_in_store=stats["total_spans"],
        p50_ms=p50 * 1000,
        p99_ms=p99 * 1000,
        max_ms=latencies[-1] * 1000,
        rss_start_mib=rss_start / MIB,
        rss_end_mib=rss_end / MIB,
        rss_peak_mib=peak / MIB,
        rss_growth_mib=growth / MIB,
        rss_bound_mib=bound / MIB,
        rss_growth_per_span_bytes=growth / max(spans_added, 1),
    )
    assert growth <= bound, (growth / MIB, bound / MIB)
