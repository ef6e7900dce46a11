"""Benchmark: execution strategies end to end — the algorithm enqueues N rollouts and waits; the
runners dequeue and mark each one succeeded.

    .venv/bin/python benchmarks/execution.py [--n 2000] [--repeat 3] [--shm 1,4,16] [--cs 1,2,4]
    AGL_PEER_PYTHON=/tmp/agl/aglvenv/bin/python .venv/bin/python benchmarks/execution.py

Workload (the same on both sides):

* every runner announces itself (``update_worker(..., heartbeat_stats={"ready": True})``); the
  algorithm waits until all have, so that process start-up is not part of the measurement;
* the algorithm then enqueues ``N`` rollouts with one ``enqueue_many_rollouts`` call and waits
  with ``wait_for_rollouts`` until all have succeeded: ``rollouts_per_s = N / that time``;
* each runner loops ``dequeue_rollout(worker_id)`` → ``update_attempt(..., status="succeeded")``
  until the stop event (``agl_async``, compared in ``ratio``). Ours long-polls the dequeue
  (``timeout=0.1``: no spinning on an empty queue); Agent-Lightning's store has no long poll, so
  its runners sleep 10 ms when the queue is empty (its own runner's default is 5 s, which would
  only make it look slower). ``agl_async_finish_and_dequeue`` is the same loop with our one-call
  ``finish_and_dequeue`` (end the attempt and claim the next rollout: one HTTP request per
  rollout instead of two), compared in ``ratio_finish_and_dequeue``.

Modes: ``shm`` (SharedMemoryExecutionStrategy: ours are tasks of one task group, theirs threads)
with 1/4/16 runners, and ``cs`` (ClientServerExecutionStrategy, role "both": server + algorithm
in this process, runner processes over HTTP) with 1/2/4 runner processes. ``wall_s`` is the
whole ``execute`` (spawning included). Each configuration runs ``--repeat`` times; the best run is
reported (least disturbed by the other load on the machine) together with all the samples.

With ``AGL_PEER_PYTHON`` set to Agent-Lightning 0.3.0's interpreter, the same workload runs on
its strategies through ``benchmarks/peer/agl_execution.py`` in the same run, and ``ratio`` =
ours / theirs (rollouts/s). Without it the peer is skipped with a note.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from agl_async import (
    ClientServerExecutionStrategy,
    ExecutionEvent,
    ExecutionStrategy,
    InMemoryLightningStore,
    LightningStore,
    SharedMemoryExecutionStrategy,
)

PEER_SCRIPT = Path(__file__).parent / "peer" / "agl_execution.py"
RESULT: dict[str, float] = {}  # written by the algorithm bundle, which runs in this process


# ---------------------------------------------------------------------------- bundles (module level)
async def bench_runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Two calls per rollout: long-poll ``dequeue_rollout``, then ``update_attempt``."""
    await store.update_worker(worker_id, heartbeat_stats={"ready": True})
    while not event.is_set():
        attempted = await store.dequeue_rollout(worker_id=worker_id, timeout=0.1)
        if attempted is not None:
            await store.update_attempt(attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded")


async def bench_runner_fused(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """One call per rollout: ``finish_and_dequeue`` ends the attempt and claims the next one
    (one HTTP request instead of two in client-server mode)."""
    await store.update_worker(worker_id, heartbeat_stats={"ready": True})
    attempted = None
    while not event.is_set():
        if attempted is None:
            attempted = await store.dequeue_rollout(worker_id=worker_id, timeout=0.1)
        else:
            attempted = await store.finish_and_dequeue(
                attempted.rollout_id,
                attempted.attempt.attempt_id,
                "succeeded",
                worker_id=worker_id,
                timeout=0.1,
            )
    if attempted is not None:  # claimed just as the run ended: hand it back finished
        await store.update_attempt(attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded")


RUNNERS = {"plain": bench_runner, "fused": bench_runner_fused}


class BenchAlgorithm:
    """Picklable algorithm bundle: wait for the runners, enqueue ``n``, wait for all of them."""

    def __init__(self, n: int, runners: int) -> None:
        self.n, self.runners = n, runners

    async def __call__(self, store: LightningStore, event: ExecutionEvent) -> None:
        while len(await store.query_workers()) < self.runners:  # noqa: ASYNC110 - the store has no "worker joined" signal
            await anyio.sleep(0.005)
        start = time.perf_counter()
        rollouts = await store.enqueue_many_rollouts([{"input": i} for i in range(self.n)])
        ids = [r.rollout_id for r in rollouts]
        while len(await store.wait_for_rollouts(rollout_ids=ids, timeout=10.0)) < self.n:
            pass
        RESULT["seconds"] = time.perf_counter() - start
        stats = await store.statistics()
        if stats["rollouts"]["succeeded"] != self.n:
            raise RuntimeError(f"expected {self.n} succeeded rollouts, got {stats['rollouts']}")


def _strategy(mode: str, runners: int) -> ExecutionStrategy:
    if mode == "shm":
        return SharedMemoryExecutionStrategy(n_runners=runners)
    return ClientServerExecutionStrategy(
        role="both", server_host="127.0.0.1", server_port=0, n_runners=runners, managed_store=True
    )


def run_ours(mode: str, runners: int, n: int, variant: str = "plain") -> dict[str, float]:
    RESULT.clear()
    start = time.perf_counter()
    _strategy(mode, runners).run(BenchAlgorithm(n, runners), RUNNERS[variant], InMemoryLightningStore())
    wall = time.perf_counter() - start
    return {"seconds": RESULT["seconds"], "rollouts_per_s": n / RESULT["seconds"], "wall_s": wall}


def run_peer(python: str, mode: str, runners: int, n: int) -> dict[str, float]:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    out = subprocess.run(
        [python, str(PEER_SCRIPT), "--mode", mode, "--runners", str(runners), "--n", str(n)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peer failed ({out.returncode}): {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def best(samples: list[dict[str, float]]) -> dict[str, Any]:
    top = max(samples, key=lambda s: s["rollouts_per_s"])
    return {
        "rollouts_per_s": round(top["rollouts_per_s"], 1),
        "seconds": round(top["seconds"], 4),
        "wall_s": round(top["wall_s"], 3),
        "samples_rollouts_per_s": [round(s["rollouts_per_s"], 1) for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shm", default="1,4,16", help="runner counts for shared-memory ('' to skip)")
    parser.add_argument("--cs", default="1,2,4", help="runner process counts for client-server ('' to skip)")
    args = parser.parse_args()
    configs = [("shm", int(k)) for k in args.shm.split(",") if k] + [
        ("cs", int(k)) for k in args.cs.split(",") if k
    ]

    peer = os.environ.get("AGL_PEER_PYTHON")
    peer_note = None
    if not peer:
        peer_note = "AGL_PEER_PYTHON not set: Agent-Lightning 0.3.0 comparison skipped"
    elif not Path(peer).exists():
        peer_note = f"AGL_PEER_PYTHON={peer} does not exist: comparison skipped"
        peer = None

    results = []
    for mode, runners in configs:
        entry: dict[str, Any] = {"mode": mode, "runners": runners, "n": args.n}
        ours: dict[str, list[dict[str, float]]] = {"plain": [], "fused": []}
        theirs: list[dict[str, float]] = []
        for _ in range(args.repeat):  # interleaved, so that both sides see the same machine load
            for variant in ours:
                ours[variant].append(run_ours(mode, runners, args.n, variant))
            if peer:
                theirs.append(run_peer(peer, mode, runners, args.n))
        entry["agl_async"] = best(ours["plain"])
        entry["agl_async_finish_and_dequeue"] = best(ours["fused"])
        if peer:
            entry["agentlightning_0_3_0"] = best(theirs)
            base = entry["agentlightning_0_3_0"]["rollouts_per_s"]
            entry["ratio"] = round(entry["agl_async"]["rollouts_per_s"] / base, 2)
            entry["ratio_finish_and_dequeue"] = round(
                entry["agl_async_finish_and_dequeue"]["rollouts_per_s"] / base, 2
            )
        print(json.dumps(entry), file=sys.stderr, flush=True)
        results.append(entry)

    report: dict[str, Any] = {
        "benchmark": "execution: enqueue N, runners dequeue + succeed each, wait for all",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "results": results,
    }
    if peer_note:
        report["note"] = peer_note
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
