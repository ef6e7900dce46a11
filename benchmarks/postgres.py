"""Benchmark: ``agl-async serve --workers N`` on PostgreSQL — throughput with 1, 2 and 4 server
processes on one address, and which resource saturates; one in-memory server for comparison.

    python benchmarks/postgres.py [--quick] [--rollouts 2000] [--workers 1,2,4] [--clients 4]
                                  [--client-runners 8] [--client-spans 2000]

(The PostgreSQL store direct, behind one server, and the memory of a serving process as it grows
past 1,000,000 spans are measured with the other stores by ``benchmarks/stores.py``.)

Prints JSON (progress on stderr). A throwaway PostgreSQL cluster is started for the run
(``tests/throwaway_postgres.py``: ``fsync=off``, as in the tests); each measurement gets a fresh
database. For each W of ``--workers``, ``agl-async serve --store … --workers W`` serves it;
``--clients`` client processes, each running ``--client-runners`` runner loops
(:func:`agl_async.runner.runner_loop`, an agent that returns at once) with a
:class:`~agl_async.LightningStoreClient` of its own (its own connections, so the kernel spreads
them over the server processes), work through ``--rollouts`` rollouts (``rollouts_per_s``), then
each client process adds spans from ``--client-runners`` tasks, one ``add_span`` request at a
time (``spans_per_s``). ``cpu_cores`` says how many cores each group of processes kept busy
meanwhile (CPU seconds / wall seconds: the server processes, PostgreSQL's processes, the
clients) and ``machine_busy`` how many the whole machine did (other work included): when that
reaches the core count, the cores are what saturates; otherwise the busiest group is.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from throwaway_postgres import PG_USER, PostgresCluster

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stores import _reward, _span  # the same agent and spans as the other store figures


# --------------------------------------------------------------------------- served: clients
def _client_main(
    endpoint: str, runners: int, spans: int, ready: Any, go: Any, phase2: Any, results: Any
) -> None:
    """A client process: ``runners`` runner loops until told to stop, then ``runners`` span tasks."""
    from agl_async import LightningStoreClient
    from agl_async.runner import runner_loop

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            stop = anyio.Event()
            clients = [LightningStoreClient(endpoint) for _ in range(runners)]
            for client in clients:
                await client.get_latest_resources()  # connected (and everything imported) before the clock
            ready.put(os.getpid())
            await anyio.to_thread.run_sync(go.wait)
            for i, client in enumerate(clients):
                tg.start_soon(runner_loop, client, f"{os.getpid()}-{i}", stop, _reward)
            await anyio.to_thread.run_sync(phase2.wait)
            stop.set()
        # phase 2: spans, one request at a time per task
        attempts = [await clients[i].start_rollout(i) for i in range(runners)]
        per_task = spans // runners

        async def add(i: int) -> None:
            a = attempts[i]
            for seq in range(1, per_task + 1):
                await clients[i].add_span(_span(a.rollout_id, a.attempt.attempt_id, seq))

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for i in range(runners):
                tg.start_soon(add, i)
        results.put((per_task * runners, started, time.perf_counter()))
        for client in clients:
            await client.close()

    anyio.run(main)


def _cpu_by_pid(pids: set[int]) -> dict[int, float]:
    import psutil

    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _postgres_pids() -> set[int]:
    import psutil

    return {p.pid for p in psutil.process_iter(["username"]) if p.info["username"] in (PG_USER, "postgres")}


class _CpuMeter:
    """CPU seconds of groups of processes over an interval (processes that start meanwhile count
    from zero, those that end keep what they had used at the start), and of the whole machine."""

    def __init__(self, groups: dict[str, Any]) -> None:
        import psutil

        self.groups = groups  # name -> callable returning the group's pids now
        self.before = {name: _cpu_by_pid(pids()) for name, pids in groups.items()}
        self.machine_before = psutil.cpu_times()

    def cores(self, elapsed: float) -> dict[str, float]:
        import psutil

        out = {}
        for name, pids in self.groups.items():
            after = _cpu_by_pid(pids())
            used = sum(after.get(pid, before) - before for pid, before in self.before[name].items())
            used += sum(v for pid, v in after.items() if pid not in self.before[name])
            out[name] = round(used / elapsed, 2)
        m0, m1 = self.machine_before, psutil.cpu_times()
        busy = (sum(m1) - m1.idle - m1.iowait) - (sum(m0) - m0.idle - m0.iowait)
        out["machine_busy"] = round(busy / elapsed, 2)  # every process of the machine, ours or not
        return out


def _tree(pid: int) -> set[int]:
    import psutil

    try:
        root = psutil.Process(pid)
        return {pid} | {c.pid for c in root.children(recursive=True)}
    except psutil.Error:
        return set()


def _start_server(store_url: str, workers: int) -> tuple[subprocess.Popen[str], str]:
    command = ["serve", "--store", store_url, "--port", "0", "--workers", str(workers)]
    process = subprocess.Popen(
        [sys.executable, "-m", "agl_async.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if "listening on http://" not in line:
        process.kill()
        raise RuntimeError(f"server did not start: {line}{process.stdout.read()}")
    endpoint = "http://" + line.split("http://", 1)[1].split()[0].rstrip(";,")
    return process, endpoint


def _stop_server(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def _served(store_url: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    from agl_async import LightningStoreClient

    server, endpoint = _start_server(store_url, workers)
    context = multiprocessing.get_context("spawn")
    ready, go, phase2, results = context.Queue(), context.Event(), context.Event(), context.Queue()
    clients = [
        context.Process(
            target=_client_main,
            args=(endpoint, args.client_runners, args.client_spans, ready, go, phase2, results),
        )
        for _ in range(args.clients)
    ]
    try:
        ids: list[str] = []

        async def enqueue() -> None:
            async with LightningStoreClient(endpoint) as client:
                created = await client.enqueue_many_rollouts([{"input": i} for i in range(args.rollouts)])
                ids.extend(r.rollout_id for r in created)

        anyio.run(enqueue)
        for c in clients:
            c.start()
        for _ in clients:
            ready.get(timeout=300)
        client_pids = {c.pid for c in clients if c.pid is not None}
        meter = _CpuMeter(
            {"server": lambda: _tree(server.pid), "postgres": _postgres_pids, "clients": lambda: client_pids}
        )

        async def wait_all() -> float:
            async with LightningStoreClient(endpoint) as client:
                started = time.perf_counter()
                go.set()
                done = await client.wait_for_rollouts(rollout_ids=ids, timeout=600)
                elapsed = time.perf_counter() - started
                assert len(done) == len(ids) and all(r.status == "succeeded" for r in done)
                return elapsed

        elapsed = anyio.run(wait_all)
        cpu_cores = meter.cores(elapsed)
        phase2.set()
        span_results = [results.get(timeout=600) for _ in clients]
        span_total = sum(r[0] for r in span_results)
        span_elapsed = max(r[2] for r in span_results) - min(r[1] for r in span_results)
        for c in clients:
            c.join(60)
        return {
            "rollouts_per_s": round(len(ids) / elapsed, 1),
            "spans_per_s": round(span_total / span_elapsed, 1),
            "cpu_cores": cpu_cores,
        }
    finally:
        for c in clients:
            if c.is_alive():
                c.kill()
                c.join()
        _stop_server(server)


# --------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test of the script")
    parser.add_argument("--rollouts", type=int, default=2000)
    parser.add_argument("--workers", default="1,2,4", help="server process counts to measure")
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--client-runners", type=int, default=8, help="runner loops per client process")
    parser.add_argument("--client-spans", type=int, default=2000, help="spans per client process")
    args = parser.parse_args()
    if args.quick:
        args.rollouts, args.client_spans = 200, 200
    workers = [int(w) for w in args.workers.split(",") if w]
    report: dict[str, Any] = {
        "benchmark": "postgres",
        "units": "rollouts or spans per second (one run each); cpu_cores = CPU s / wall s",
        "settings": dict(vars(args)),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    with PostgresCluster() as cluster:
        report["postgres"] = cluster.psql("SHOW server_version")
        served: dict[str, Any] = {"memory x1": _served("memory://", 1, args)}
        print(f"served memory x1: {served['memory x1']}", file=sys.stderr, flush=True)
        for w in workers:
            served[f"postgres x{w}"] = _served(cluster.create_database(), w, args)
            print(f"served postgres x{w}: {served[f'postgres x{w}']}", file=sys.stderr, flush=True)
        report["served"] = served
    report["load_average_at_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
