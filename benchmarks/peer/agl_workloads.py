"""Agent-Lightning 0.3.0's side of benchmarks/report.py (run by ITS interpreter, never ours).

    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/agl/aglvenv/bin/python benchmarks/peer/agl_workloads.py serve
    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/agl/aglvenv/bin/python benchmarks/peer/agl_workloads.py lifecycle

Self-contained on purpose (agentlightning, anyio-free asyncio and the standard library only). It
answers the same JSON-line commands as ``benchmarks/workloads.py`` (see there for the protocol and
the exact workloads) with the same figures, using Agent-Lightning's own pieces: its
``SharedMemoryExecutionStrategy`` (``main_thread="algorithm"``: runners are threads, each with its
own event loop, sharing its thread-locked store) and ``ClientServerExecutionStrategy`` (role
``"both"``: its server + the algorithm in this process, runner processes made with its default
start method, i.e. ``fork`` on Linux), its ``InMemoryLightningStore`` and its span model.

Differences forced by its API, none of which favours us: its ``dequeue_rollout`` has no long poll,
so an idle runner sleeps 10 ms before asking again (its own runner's default is 5 s); worker ids
are strings. ``execute`` is synchronous (it calls ``asyncio.run`` itself), so ``startup_s`` is
timed from the call of ``execute``.

``noop`` (figure 1) runs ``benchmarks/peer/agl_execution.py``'s bundles (the peer side of
``benchmarks/execution.py``) on the same strategies; ``http`` runs
``benchmarks/peer/agl_http_store.py``'s ``run`` with its processes forked from this one (already
imported: no 10 s import per process).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
logging.disable(logging.WARNING)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/harness.py (stdlib only)
import harness  # noqa: E402
from agentlightning.execution import ClientServerExecutionStrategy, SharedMemoryExecutionStrategy  # noqa: E402
from agentlightning.store.memory import InMemoryLightningStore  # noqa: E402
from agentlightning.types import EnqueueRolloutRequest, Span  # noqa: E402
from harness import memory_status, with_cpu, write_memory_status  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULT: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AgentRunner:
    def __init__(self, sleep: float, spans: int, rss_dir: str | None = None, concurrency: int = 1) -> None:
        self.sleep, self.spans, self.rss_dir, self.concurrency = sleep, spans, rss_dir, concurrency

    async def __call__(self, store: Any, worker_id: int, event: Any) -> None:
        try:
            await asyncio.gather(
                *(self.loop(store, worker_id * self.concurrency + k, event) for k in range(self.concurrency))
            )
        finally:
            if self.rss_dir:
                write_memory_status(Path(self.rss_dir, f"{os.getpid()}-{worker_id}.json"))

    async def loop(self, store: Any, worker_id: int, event: Any) -> None:
        wid = str(worker_id)
        await store.update_worker(wid, heartbeat_stats={"ready": True})
        done = 0
        while not event.is_set():
            attempted = await store.dequeue_rollout(worker_id=wid)
            if attempted is None:
                await asyncio.sleep(0.01)
                continue
            rollout_id, attempt_id = attempted.rollout_id, attempted.attempt.attempt_id
            if self.spans:
                await store.update_attempt(rollout_id, attempt_id, status="running")
                for i in range(self.spans):
                    await asyncio.sleep(self.sleep / self.spans)
                    now = time.time()
                    await store.add_span(
                        Span.from_attributes(
                            rollout_id=rollout_id,
                            attempt_id=attempt_id,
                            sequence_id=i + 1,
                            trace_id=f"{worker_id:032x}",
                            span_id=f"{done:08x}{i:08x}",
                            name=f"agent.step{i}",
                            start_time=now - self.sleep / self.spans,
                            end_time=now,
                            attributes={"step": i, "gen_ai.usage.prompt_tokens": 12},
                        )
                    )
            elif self.sleep:
                await asyncio.sleep(self.sleep)
            await store.update_attempt(rollout_id, attempt_id, status="succeeded")
            done += 1


class BatchAlgorithm:
    def __init__(self, n: int, batch: int, runners: int, wait_ready: bool = True, first_alone: bool = False):
        self.n, self.batch, self.runners = n, batch, runners
        self.wait_ready, self.first_alone = wait_ready, first_alone

    async def _run_batch(self, store: Any, first: int, count: int) -> None:
        rollouts = await store.enqueue_many_rollouts(
            [EnqueueRolloutRequest(input=first + i) for i in range(count)]
        )
        remaining = [r.rollout_id for r in rollouts]
        while remaining:
            finished = await store.wait_for_rollouts(rollout_ids=remaining, timeout=10.0)
            bad = [r for r in finished if r.status != "succeeded"]
            if bad:
                raise RuntimeError(f"rollout {bad[0].rollout_id} ended {bad[0].status}")
            done = {r.rollout_id for r in finished}
            remaining = [rid for rid in remaining if rid not in done]
            if "first" not in RESULT and done:
                RESULT["first"] = time.perf_counter()

    async def __call__(self, store: Any, event: Any) -> None:
        if self.wait_ready:
            while len(await store.query_workers()) < self.runners:  # noqa: ASYNC110 (no event across processes)
                await asyncio.sleep(0.005)
        RESULT["start"] = time.perf_counter()
        submitted = 0
        if self.first_alone:
            await self._run_batch(store, 0, 1)
            submitted = 1
        while submitted < self.n:
            count = min(self.batch, self.n - submitted)
            await self._run_batch(store, submitted, count)
            submitted += count
        RESULT["end"] = time.perf_counter()
        RESULT["returned"] = time.perf_counter()


def _strategy(mode: str, runners: int) -> Any:
    if mode == "shm":
        return SharedMemoryExecutionStrategy(n_runners=runners, main_thread="algorithm")
    if mode == "cs":
        return ClientServerExecutionStrategy(
            role="both", server_host="127.0.0.1", server_port=_free_port(), n_runners=runners
        )
    raise ValueError(f"mode must be 'shm' or 'cs', got {mode!r}")


def _run(strategy: Any, algorithm: BatchAlgorithm, runner: AgentRunner) -> dict[str, float]:
    RESULT.clear()
    RESULT["execute"] = time.perf_counter()
    strategy.execute(algorithm, runner, InMemoryLightningStore())
    RESULT["returned_execute"] = time.perf_counter()
    return dict(RESULT)


def cmd_execution(
    mode: str,
    runners: int,
    n: int,
    sleep: float = 0.0,
    spans: int = 0,
    batch: int | None = None,
    concurrency: int = 1,
) -> dict[str, Any]:
    t = _run(
        _strategy(mode, runners),
        BatchAlgorithm(n, batch or n, runners * concurrency),
        AgentRunner(sleep, spans, None, concurrency),
    )
    seconds = t["end"] - t["start"]
    return {
        "rollouts_per_s": n / seconds,
        "seconds": seconds,
        "wall_s": t["returned_execute"] - t["execute"],
        "shutdown_s": t["returned_execute"] - t["returned"],
    }


def cmd_noop(mode: str, runners: int, n: int) -> dict[str, Any]:
    import agl_execution  # benchmarks/peer/agl_execution.py: figure 1's workload is its workload

    def run() -> dict[str, Any]:
        agl_execution.RESULT.clear()
        start = time.perf_counter()
        _strategy(mode, runners).execute(
            agl_execution.BenchAlgorithm(n, runners), agl_execution.bench_runner, InMemoryLightningStore()
        )
        wall = time.perf_counter() - start
        seconds = agl_execution.RESULT["seconds"]
        return {"seconds": seconds, "rollouts_per_s": n / seconds, "wall_s": wall}

    return with_cpu(n, run)


def cmd_http(clients: int, duration: float) -> dict[str, Any]:
    import agl_http_store  # benchmarks/peer/agl_http_store.py

    agl_http_store.START_METHOD = "fork"  # children inherit the imported agentlightning
    sample: dict[str, Any] = agl_http_store.run(clients, duration)
    return sample


def cmd_lifecycle(runners: int, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agl-peer-rss-") as rss_dir:
        t = _run(
            _strategy("cs", runners),
            BatchAlgorithm(n, n, runners, wait_ready=False, first_alone=True),
            AgentRunner(0.0, 0, rss_dir),
        )
        memory = [json.loads(p.read_text()) for p in Path(rss_dir).iterdir()]
    if len(memory) != runners:
        raise RuntimeError(f"expected {runners} runner memory reports, got {len(memory)}")
    return {
        "startup_s": t["first"] - t["execute"],
        "shutdown_s": t["returned_execute"] - t["returned"],
        "runner_rss_mib": max(m["VmHWM"] for m in memory),
        "runner_private_mib": max(m.get("private", float("nan")) for m in memory),
        "main_rss_mib": memory_status()["VmHWM"],
    }


COMMANDS = {
    "execution": lambda **kw: with_cpu(kw["n"], lambda: cmd_execution(**kw)),
    "noop": cmd_noop,
    "http": cmd_http,
    "lifecycle": cmd_lifecycle,
}


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # spawned/forked children import the bundles from here
    harness.main(COMMANDS)
