"""Agent-Lightning 0.3.0's side of benchmarks/execution.py (run by ITS interpreter, never ours).

    LITELLM_LOCAL_MODEL_COST_MAP=True /tmp/agl/aglvenv/bin/python benchmarks/peer/agl_execution.py \
        --mode shm --runners 4 --n 2000

Self-contained (agentlightning and the standard library only). The same workload as ours: runners
announce themselves with ``update_worker``; the algorithm waits for all of them, enqueues ``N``
rollouts in one ``enqueue_many_rollouts`` call and waits with ``wait_for_rollouts`` until all have
succeeded; runners loop ``dequeue_rollout`` → ``update_attempt(status="succeeded")`` until the
stop event, sleeping 10 ms when the queue is empty (its store has no long poll). Strategies:
its ``SharedMemoryExecutionStrategy(main_thread="algorithm")`` (runner threads) and
``ClientServerExecutionStrategy(role="both")`` (runner processes, its HTTP server and client),
each with its own ``InMemoryLightningStore``. Prints one JSON line with ``seconds``,
``rollouts_per_s`` and ``wall_s`` (the whole ``execute``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import time
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from agentlightning.execution import ClientServerExecutionStrategy, SharedMemoryExecutionStrategy
from agentlightning.store import InMemoryLightningStore
from agentlightning.types import EnqueueRolloutRequest

RESULT: dict[str, float] = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def bench_runner(store: Any, worker_id: int, event: Any) -> None:
    wid = f"runner-{worker_id}"
    await store.update_worker(wid, heartbeat_stats={"ready": True})
    while not event.is_set():
        attempted = await store.dequeue_rollout(worker_id=wid)
        if attempted is None:
            await asyncio.sleep(0.01)
            continue
        await store.update_attempt(attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded")


class BenchAlgorithm:
    def __init__(self, n: int, runners: int) -> None:
        self.n, self.runners = n, runners

    async def __call__(self, store: Any, event: Any) -> None:
        while len(await store.query_workers()) < self.runners:  # noqa: ASYNC110 - the store has no "worker joined" signal
            await asyncio.sleep(0.005)
        start = time.perf_counter()
        rollouts = await store.enqueue_many_rollouts(
            [EnqueueRolloutRequest(input={"i": i}) for i in range(self.n)]
        )
        ids = [r.rollout_id for r in rollouts]
        while len(await store.wait_for_rollouts(rollout_ids=ids, timeout=10.0)) < self.n:
            pass
        RESULT["seconds"] = time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["shm", "cs"], required=True)
    parser.add_argument("--runners", type=int, required=True)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    strategy: Any
    if args.mode == "shm":
        strategy = SharedMemoryExecutionStrategy(n_runners=args.runners, main_thread="algorithm")
    else:
        strategy = ClientServerExecutionStrategy(
            role="both", server_host="127.0.0.1", server_port=_free_port(), n_runners=args.runners
        )
    start = time.perf_counter()
    strategy.execute(BenchAlgorithm(args.n, args.runners), bench_runner, InMemoryLightningStore())
    wall = time.perf_counter() - start
    seconds = RESULT["seconds"]
    print(json.dumps({"seconds": seconds, "rollouts_per_s": args.n / seconds, "wall_s": wall}))


if __name__ == "__main__":
    main()
