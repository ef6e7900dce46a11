"""Benchmark: the stores side by side — rollouts/s and spans/s, direct and behind the HTTP server,
and the memory of a serving process as its store grows past 1,000,000 spans.

    python benchmarks/stores.py [--stores memory,sqlite] [--rollouts 2000] [--runners 8]
                                [--spans 5000] [--batched-spans 50000] [--growth 1000000]

Prints JSON. Each store in ``--stores`` is made by its entry in :data:`STORES` (a fresh, empty
store from a private, empty work directory), and measured two ways: ``direct`` (the store object
in this process) and ``http`` (a :class:`~agl_async.LightningStoreServer` over the store in a child
process, this process talking to it with one :class:`~agl_async.LightningStoreClient`):

* ``rollouts_per_s``: ``--rollouts`` rollouts enqueued in one batch, then ``--runners`` runner
  loops (:func:`agl_async.runner.runner_loop`, an async agent that returns at once: every store
  call a real runner makes per rollout — dequeue, running, the reward span, the reward, the
  finish) until ``wait_for_rollouts`` sees all of them succeeded;
* ``spans_per_s``: ``add_span`` one at a time from one task (``--spans`` spans over 100 attempts);
* ``batched_spans_per_s``: ``add_many_spans`` in batches of 100 (``--batched-spans`` spans).

``growth``: for each store, a server process over a fresh store receives ``--growth`` spans in
batches of 10,000 (``add_many_spans`` over HTTP); the serving process's resident memory (RSS,
from ``/proc``) is sampled every 100,000 spans. A database store must stay flat once the server's
idempotency cache (the answers to recent requests, bounded at 64 MiB) has filled, so the report
gives the growth over the second half; the in-memory store grows with what it holds (run with
``--growth-stores sqlite`` to skip it). glibc's adaptive mmap threshold adds a slow creep of a few
MiB to any long-lived server; ``MALLOC_MMAP_THRESHOLD_=131072`` in the environment fixes it and
shows what the store itself holds.

Adding a store: put a factory into :data:`STORES` — a function of the work directory returning a
fresh, empty store — and name it in ``--stores``; every figure above is then measured for it too,
in the same run. ``postgres`` makes a fresh database per store on the server
``AGL_BENCH_POSTGRES_URL`` names, else on a throwaway cluster started for the run
(``tests/throwaway_postgres.py``: ``fsync=off``, as in the tests); it is in the default
``--stores`` when PostgreSQL is installed. (Its 1, 2 and 4 serving processes:
``benchmarks/postgres.py``.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import anyio

from agl_async import InMemoryLightningStore, LightningStore, Span, SqliteLightningStore

#: A fresh, empty store of one kind, from a private, empty work directory.
StoreFactory = Callable[[Path], LightningStore]


def _postgres(workdir: Path) -> LightningStore:
    from agl_async.store.postgres import PostgresLightningStore

    name = f"bench_{workdir.name.replace('-', '_')}_{os.urandom(3).hex()}"
    return PostgresLightningStore(_fresh_postgres_database(name))


STORES: dict[str, StoreFactory] = {
    "memory": lambda workdir: InMemoryLightningStore(),
    "sqlite": lambda workdir: SqliteLightningStore(workdir / "store.db"),
    "postgres": _postgres,
}

_POSTGRES_URL_ENV = "AGL_BENCH_POSTGRES_URL"


def _throwaway_postgres() -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import throwaway_postgres

    return throwaway_postgres


def _postgres_available() -> bool:
    return bool(os.environ.get(_POSTGRES_URL_ENV)) or _throwaway_postgres().skip_reason() is None


def _fresh_postgres_database(name: str) -> str:
    """The DSN of a new database ``name`` on the benchmark's server (in this process or a child)."""
    import atexit
    import subprocess

    server = os.environ.get(_POSTGRES_URL_ENV)
    if not server:  # the first use in the run's main process: start a cluster for the run
        cluster = _throwaway_postgres().PostgresCluster().start()
        atexit.register(cluster.stop)
        server = os.environ[_POSTGRES_URL_ENV] = cluster.dsn()  # spawned children inherit it
    psql = os.path.join(_throwaway_postgres().find_bindir() or "/usr/bin", "psql")
    subprocess.run([psql, "-X", "-q", "-d", server, "-c", f'CREATE DATABASE "{name}"'], check=True)
    return server.rsplit("/", 1)[0] + "/" + name


GROWTH_BATCH = 10_000
GROWTH_SAMPLE_EVERY = 100_000


def _span(rollout_id: str, attempt_id: str, sequence_id: int) -> Span:
    return Span(
        rollout_id=rollout_id,
        attempt_id=attempt_id,
        sequence_id=sequence_id,
        trace_id="0" * 32,
        span_id=f"{sequence_id:016x}",
        name="llm.call",
        start_time=1.0,
        end_time=2.0,
        attributes={"gen_ai.usage.prompt_tokens": 12, "gen_ai.usage.completion_tokens": 40, "reward": 0.5},
    )


# --------------------------------------------------------------------------- workloads
async def _reward(task: Any, resources: dict[str, Any]) -> float:
    return 1.0


async def rollouts_per_s(store: LightningStore, n: int, runners: int) -> float:
    from agl_async.runner import runner_loop

    ids = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(n)])]
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        started = time.perf_counter()
        for worker_id in range(runners):
            tg.start_soon(runner_loop, store, worker_id, stop, _reward)
        done = await store.wait_for_rollouts(rollout_ids=ids)
        elapsed = time.perf_counter() - started
        stop.set()
    assert len(done) == n and all(r.status == "succeeded" for r in done), "not every rollout succeeded"
    return n / elapsed


async def spans_per_s(store: LightningStore, n: int, batch: int) -> float:
    attempts = [await store.start_rollout(i) for i in range(100)]
    spans = [
        _span(attempts[i % 100].rollout_id, attempts[i % 100].attempt.attempt_id, i // 100 + 1)
        for i in range(n)
    ]
    started = time.perf_counter()
    if batch == 1:
        for span in spans:
            await store.add_span(span)
    else:
        for i in range(0, n, batch):
            await store.add_many_spans(spans[i : i + batch])
    return n / (time.perf_counter() - started)


async def _workloads(store: LightningStore, args: argparse.Namespace) -> dict[str, float]:
    return {
        "rollouts_per_s": round(await rollouts_per_s(store, args.rollouts, args.runners), 1),
        "spans_per_s": round(await spans_per_s(store, args.spans, 1), 1),
        "batched_spans_per_s": round(await spans_per_s(store, args.batched_spans, 100), 1),
    }


# --------------------------------------------------------------------------- server process
def _serve(kind: str, workdir: str, port_queue: Any, stop: Event) -> None:
    """Child process: serve a fresh store of ``kind`` on 127.0.0.1 until ``stop`` is set."""

    async def main() -> None:
        from agl_async import LightningStoreServer

        store = STORES[kind](Path(workdir))
        async with LightningStoreServer(store, "127.0.0.1", 0) as server:
            port_queue.put(server.port)
            await anyio.to_thread.run_sync(stop.wait)
        await store.close()

    anyio.run(main)


class _Served:
    """A store of one kind served by a child process (``with``: started and stopped)."""

    def __init__(self, kind: str, workdir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._queue = context.Queue()
        self._stop = context.Event()
        self.process = context.Process(target=_serve, args=(kind, str(workdir), self._queue, self._stop))

    def __enter__(self) -> _Served:
        self.process.start()
        self.endpoint = f"http://127.0.0.1:{self._queue.get(timeout=60)}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def rss_mb(self) -> float:
        return _rss_mb(self.process.pid)


def _rss_mb(pid: int | None) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc (Linux only)")


# --------------------------------------------------------------------------- measurements
async def _direct(kind: str, workdir: Path, args: argparse.Namespace) -> dict[str, float]:
    store = STORES[kind](workdir)
    try:
        return await _workloads(store, args)
    finally:
        await store.close()


async def _over_http(endpoint: str, args: argparse.Namespace) -> dict[str, float]:
    from agl_async import LightningStoreClient

    async with LightningStoreClient(endpoint) as client:
        return await _workloads(client, args)


async def _grow(endpoint: str, served: _Served, total: int) -> dict[str, Any]:
    from agl_async import LightningStoreClient

    samples: list[dict[str, float]] = [{"spans": 0, "rss_mb": round(served.rss_mb(), 1)}]
    async with LightningStoreClient(endpoint, request_timeout=600) as client:
        attempts = [await client.start_rollout(i) for i in range(100)]
        started = time.perf_counter()
        for first in range(0, total, GROWTH_BATCH):
            batch = [
                _span(a.rollout_id, a.attempt.attempt_id, (first + i) // 100 + 1)
                for i in range(GROWTH_BATCH)
                for a in (attempts[(first + i) % 100],)
            ]
            await client.add_many_spans(batch)
            added = first + GROWTH_BATCH
            if added % GROWTH_SAMPLE_EVERY == 0:
                samples.append({"spans": added, "rss_mb": round(served.rss_mb(), 1)})
        elapsed = time.perf_counter() - started
        stats = await client.statistics()
        # a read at the end: the store still answers queries over everything it holds
        query_started = time.perf_counter()
        spans = await client.query_spans(attempts[0].rollout_id)
        query_s = time.perf_counter() - query_started
    half = min(samples, key=lambda s: abs(s["spans"] - total / 2))
    return {
        "total_spans": stats["total_spans"],
        "spans_per_s": round(total / elapsed, 1),
        "rss_mb": samples,
        # the server's idempotency cache (answers of recent requests, at most 64 MiB) fills first
        "rss_growth_over_the_second_half_mb": round(samples[-1]["rss_mb"] - half["rss_mb"], 1),
        "query_spans_of_one_rollout": {"spans": len(spans), "seconds": round(query_s, 3)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    available = [k for k in STORES if k != "postgres" or _postgres_available()]
    parser.add_argument("--stores", default=",".join(available), help="stores to measure (default: all)")
    parser.add_argument("--rollouts", type=int, default=2000, help="rollouts per rollouts/s run")
    parser.add_argument("--runners", type=int, default=8, help="runner loops of the rollouts/s run")
    parser.add_argument("--spans", type=int, default=5000, help="spans added one at a time")
    parser.add_argument("--batched-spans", type=int, default=50_000, help="spans added in batches of 100")
    parser.add_argument("--growth", type=int, default=1_000_000, help="spans of the memory run (0: skip)")
    parser.add_argument("--growth-stores", default=None, help="stores of the memory run (default: --stores)")
    args = parser.parse_args()
    kinds = [k for k in args.stores.split(",") if k]
    growth_kinds = kinds if args.growth_stores is None else [k for k in args.growth_stores.split(",") if k]
    unknown = [k for k in {*kinds, *growth_kinds} if k not in STORES]
    if unknown:
        parser.error(f"unknown store(s) {unknown}; known: {sorted(STORES)}")

    results: dict[str, Any] = {}
    growth: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agl-bench-stores-") as tmp:
        for kind in kinds:
            direct = Path(tmp, f"{kind}-direct")
            direct.mkdir()
            results[kind] = {"direct": anyio.run(_direct, kind, direct, args)}
            served_dir = Path(tmp, f"{kind}-http")
            served_dir.mkdir()
            with _Served(kind, served_dir) as served:
                results[kind]["http"] = anyio.run(_over_http, served.endpoint, args)
            print(f"{kind}: {results[kind]}", file=sys.stderr, flush=True)
        if args.growth > 0:
            for kind in growth_kinds:
                grow_dir = Path(tmp, f"{kind}-growth")
                grow_dir.mkdir()
                with _Served(kind, grow_dir) as served:
                    growth[kind] = anyio.run(_grow, served.endpoint, served, args.growth)
                    if kind not in ("memory", "postgres"):  # postgres: its files are the server's
                        growth[kind]["file_mb"] = round(
                            sum(f.stat().st_size for f in grow_dir.iterdir()) / 2**20, 1
                        )
                print(f"{kind} growth: {growth[kind]['rss_mb'][-1]}", file=sys.stderr, flush=True)

    report = {
        "benchmark": "stores",
        "units": "rollouts or spans per second (one run each); RSS in MiB",
        "settings": {k: v for k, v in vars(args).items()},
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "results": results,
        "growth": growth,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
