"""agl_async's side of the side-by-side report (``benchmarks/report.py``): the workloads, one sample each.

Not usually run by hand. ``report.py`` starts ``python benchmarks/workloads.py serve`` once and
sends it one JSON command per line on stdin (``{"fn": "execution", "args": {...}}``); each answer
is one JSON line on the file descriptor that was stdout when the process started (stdout itself is
pointed at stderr, so nothing a child process prints can corrupt the answers). Agent-Lightning's
side, ``benchmarks/peer/agl_workloads.py``, answers the same commands with the same figures.

Commands (each returns one sample):

* ``noop`` — figure 1, delegated to ``benchmarks/execution.py``'s ``run_ours`` (the algorithm waits
  for the runners, enqueues ``n`` and waits; runners dequeue and mark each one succeeded);
* ``execution`` — figures 2 and 6: the same, with an agent per rollout. Runners dequeue (long poll,
  ``timeout=0.1``); with ``spans > 0`` they mark the attempt ``running`` and then ``spans`` times
  sleep ``sleep / spans`` seconds and write one span; with ``spans == 0`` they sleep ``sleep``
  seconds; then they mark the attempt ``succeeded``. The algorithm enqueues ``n`` rollouts in
  batches of ``batch`` (``enqueue_many_rollouts``) and waits for each batch to finish before the
  next (``wait_for_rollouts``), like Agent-Lightning's own store benchmark in ``batch`` mode.
  ``concurrency``: agent loops per runner bundle (figure 6's client-server case: 4 processes x 8);
  ``finish``: end each attempt and claim the next rollout in one ``finish_and_dequeue`` call, as
  agl_async's own runner loop does (figure 1's extra rows; agl_async only). Both ``noop`` and
  ``execution`` report the CPU time of the whole run per rollout (this process and its children);
* ``http`` — figure 5, delegated to ``benchmarks/http_store.py``'s ``run_ours``.

``python benchmarks/workloads.py lifecycle --runners 2 --n 200`` (a fresh process per sample,
figures 3 and 4): client-server strategy; the algorithm enqueues one rollout at once (without
waiting for the runners) and waits for it — ``startup_s`` is ``execute``'s start to that first
completed rollout — then ``n - 1`` more; ``shutdown_s`` is the algorithm's return to ``execute``
returning. Every runner process writes its peak RSS (``VmHWM``) and private memory when its bundle
ends; ``runner_rss_mib`` is the largest.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import harness  # benchmarks/harness.py: the half shared with Agent-Lightning's worker
from harness import memory_status, with_cpu, write_memory_status

from agl_async import (
    ClientServerExecutionStrategy,
    ExecutionEvent,
    ExecutionStrategy,
    InMemoryLightningStore,
    LightningStore,
    SharedMemoryExecutionStrategy,
    Span,
)

HERE = Path(__file__).resolve().parent
RESULT: dict[str, float] = {}  # written by the algorithm bundle, which runs in this process


# ---------------------------------------------------------------------------- bundles (they pickle)
class AgentRunner:
    """Runner bundle: dequeue, run a simulated agent (sleep + spans), mark the attempt succeeded."""

    def __init__(
        self, sleep: float, spans: int, rss_dir: str | None = None, concurrency: int = 1, finish: bool = False
    ) -> None:
        self.sleep, self.spans, self.rss_dir, self.concurrency = sleep, spans, rss_dir, concurrency
        self.finish = finish  # end each attempt and claim the next in one finish_and_dequeue call

    async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        try:
            async with anyio.create_task_group() as tg:
                for k in range(self.concurrency):
                    tg.start_soon(self.loop, store, worker_id * self.concurrency + k, event)
        finally:
            if self.rss_dir:
                write_memory_status(Path(self.rss_dir, f"{os.getpid()}-{worker_id}.json"))

    async def loop(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        """One agent loop (``concurrency`` of them per runner bundle, worker ids of their own)."""
        await store.update_worker(worker_id, heartbeat_stats={"ready": True})
        done = 0
        attempted = None
        while not event.is_set():
            if attempted is None:
                attempted = await store.dequeue_rollout(worker_id=worker_id, timeout=0.1)
                if attempted is None:
                    continue
            rollout_id, attempt_id = attempted.rollout_id, attempted.attempt.attempt_id
            if self.spans:
                await store.update_attempt(rollout_id, attempt_id, status="running")
                for i in range(self.spans):
                    await anyio.sleep(self.sleep / self.spans)
                    now = time.time()
                    await store.add_span(
                        Span(
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
                await anyio.sleep(self.sleep)
            done += 1
            if self.finish:
                attempted = await store.finish_and_dequeue(
                    rollout_id, attempt_id, worker_id=worker_id, timeout=0.1
                )
            else:
                await store.update_attempt(rollout_id, attempt_id, status="succeeded")
                attempted = None


class BatchAlgorithm:
    """Algorithm bundle: (optionally) wait for the runners, enqueue ``n`` in batches, wait for each.

    Timestamps (``time.perf_counter``) go to :data:`RESULT`: ``first`` (first rollout completed),
    ``start``/``end`` of the measured phase, ``returned`` (just before returning)."""

    def __init__(self, n: int, batch: int, runners: int, wait_ready: bool = True, first_alone: bool = False):
        self.n, self.batch, self.runners = n, batch, runners
        self.wait_ready, self.first_alone = wait_ready, first_alone

    async def _run_batch(self, store: LightningStore, first: int, count: int) -> None:
        rollouts = await store.enqueue_many_rollouts([{"input": first + i} for i in range(count)])
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

    async def __call__(self, store: LightningStore, event: ExecutionEvent) -> None:
        if self.wait_ready:
            while len(await store.query_workers()) < self.runners:  # noqa: ASYNC110 (no event across processes)
                await anyio.sleep(0.005)
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


def _strategy(mode: str, runners: int) -> ExecutionStrategy:
    if mode == "shm":
        return SharedMemoryExecutionStrategy(n_runners=runners)
    if mode == "cs":
        return ClientServerExecutionStrategy(
            role="both", server_host="127.0.0.1", server_port=0, n_runners=runners, managed_store=True
        )
    raise ValueError(f"mode must be 'shm' or 'cs', got {mode!r}")


def _run(strategy: ExecutionStrategy, algorithm: BatchAlgorithm, runner: AgentRunner) -> dict[str, float]:
    RESULT.clear()

    async def main() -> None:
        RESULT["execute"] = time.perf_counter()
        await strategy.execute(algorithm, runner, InMemoryLightningStore())
        RESULT["returned_execute"] = time.perf_counter()

    anyio.run(main, backend="asyncio")
    return dict(RESULT)


# ---------------------------------------------------------------------------- commands
def cmd_execution(
    mode: str,
    runners: int,
    n: int,
    sleep: float = 0.0,
    spans: int = 0,
    batch: int | None = None,
    concurrency: int = 1,
    finish: bool = False,
) -> dict[str, Any]:
    t = _run(
        _strategy(mode, runners),
        BatchAlgorithm(n, batch or n, runners * concurrency),
        AgentRunner(sleep, spans, None, concurrency, finish),
    )
    seconds = t["end"] - t["start"]
    return {
        "rollouts_per_s": n / seconds,
        "seconds": seconds,
        "wall_s": t["returned_execute"] - t["execute"],
        "shutdown_s": t["returned_execute"] - t["returned"],
    }


def cmd_noop(mode: str, runners: int, n: int) -> dict[str, Any]:
    import execution  # benchmarks/execution.py: figure 1's workload is its workload

    return with_cpu(n, lambda: execution.run_ours(mode, runners, n))


def cmd_http(clients: int, duration: float) -> dict[str, Any]:
    import http_store  # benchmarks/http_store.py

    sample: dict[str, Any] = http_store.run_ours(clients, duration, "dequeue+update")
    return sample


def cmd_lifecycle(runners: int, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agl-bench-rss-") as rss_dir:
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
