"""Module-level bundles for the execution tests: spawned child processes import them from here.

Runners announce that they are up with ``update_worker(worker_id, {"ready": True, "pid": ...})``
so that a test can wait for every child to be running before it starts a shutdown (a SIGINT that
reaches a child still importing would be a different scenario). :func:`wait_ready` polls the
store for that, bounded by ``anyio.fail_after``: it is test scaffolding, not product code.
"""

from __future__ import annotations

import functools
import os
import signal
import time
from typing import Any

import anyio

from agl_async import ExecutionEvent, LightningStore

HANG_GUARD = 60.0  # generous upper bound for anything a test waits for


async def announce(store: LightningStore, worker_id: int) -> None:
    await store.update_worker(worker_id, heartbeat_stats={"ready": True, "pid": os.getpid()})


async def wait_ready(store: LightningStore, n: int) -> list[int]:
    """Wait until ``n`` runners have announced themselves; return their pids."""
    with anyio.fail_after(HANG_GUARD):
        while True:
            workers = [w for w in await store.query_workers() if (w.heartbeat_stats or {}).get("ready")]
            if len(workers) >= n:
                return [int((w.heartbeat_stats or {})["pid"]) for w in workers]
            await anyio.sleep(0.02)


# ---------------------------------------------------------------------------- algorithms
async def algorithm_returns_when_ready(store: LightningStore, event: ExecutionEvent, n: int = 1) -> None:
    """Wait for ``n`` runners to be up, then return (which starts the shutdown)."""
    await wait_ready(store, n)


def algorithm_ready(n: int) -> Any:
    return functools.partial(algorithm_returns_when_ready, n=n)


async def algorithm_waits_for_event(store: LightningStore, event: ExecutionEvent) -> None:
    await event.wait()


async def algorithm_enqueues(store: LightningStore, event: ExecutionEvent, n: int = 5) -> None:
    """Enqueue ``n`` rollouts and wait until all have finished."""
    rollouts = await store.enqueue_many_rollouts([{"input": i} for i in range(n)])
    ids = [r.rollout_id for r in rollouts]
    with anyio.fail_after(HANG_GUARD):
        while len(await store.wait_for_rollouts(rollout_ids=ids, timeout=1.0)) < n:
            pass


def algorithm_enqueueing(n: int) -> Any:
    return functools.partial(algorithm_enqueues, n=n)


async def algorithm_raises(store: LightningStore, event: ExecutionEvent) -> None:
    raise ValueError("algorithm failed on purpose")


# ---------------------------------------------------------------------------- runners
async def runner_until_event(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Cooperative: announce, then return once the event is set."""
    await announce(store, worker_id)
    await event.wait()


async def runner_ignores_event(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Never looks at the event; a SIGINT (a cancellation) ends it."""
    await announce(store, worker_id)
    await anyio.sleep_forever()


async def runner_ignores_sigint(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Ignores SIGINT and blocks its loop: only terminate() (SIGTERM, exit code -15) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    await announce(store, worker_id)
    time.sleep(HANG_GUARD)  # noqa: ASYNC251 - blocking on purpose: deaf to everything but signals


async def runner_ignores_sigterm(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Ignores SIGINT and SIGTERM and blocks: only kill() (exit code -9) ends it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    await announce(store, worker_id)
    time.sleep(HANG_GUARD)  # noqa: ASYNC251


async def runner_raises(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    await announce(store, worker_id)
    raise ValueError(f"runner {worker_id} failed on purpose")


async def runner_exits_3(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Worker 1 dies with exit code 3 once up; the others wait for the event."""
    await announce(store, worker_id)
    if worker_id == 1:
        os._exit(3)
    await event.wait()


async def runner_sets_event(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Sets the (cross-process) event from its process, then returns."""
    await announce(store, worker_id)
    event.set()


async def runner_checks_unmanaged_store(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """With managed_store=False the runner gets (a copy of) the store itself, not an HTTP client."""
    from agl_async import InMemoryLightningStore

    if type(store) is not InMemoryLightningStore:
        raise TypeError(f"expected the store itself, got {type(store).__name__}")
    if not await store.query_rollouts():
        raise ValueError("the copy of the store lacks the rollout enqueued before the run")
    event.set()


async def runner_processes(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Dequeue and finish rollouts until the event is set (long-poll dequeue: no spinning)."""
    await announce(store, worker_id)
    while not event.is_set():
        attempted = await store.dequeue_rollout(worker_id=worker_id, timeout=0.2)
        if attempted is not None:
            await store.update_attempt(attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded")


async def runner_drains(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Finish rollouts until the queue stays empty for a moment, then return by itself."""
    await announce(store, worker_id)
    while (attempted := await store.dequeue_rollout(worker_id=worker_id, timeout=1.0)) is not None:
        await store.update_attempt(attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded")


async def runner_long_polls(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Idle runner waiting for work in hour-long polls: it returns in time only when the server
    answers its poll early (``end_long_polls`` when the algorithm returns)."""
    await announce(store, worker_id)
    while not event.is_set():
        await store.dequeue_rollout(worker_id=worker_id, timeout=3600)


async def runner_uses_store_after_event(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Keeps talking to the store for a while after the event: the server must still be up."""
    await announce(store, worker_id)
    await event.wait()
    for _ in range(5):
        await anyio.sleep(0.02)
        await store.update_worker(
            worker_id, heartbeat_stats={"ready": True, "pid": os.getpid(), "after": True}
        )
