"""A child process for the multi-process PostgreSQL tests: ``python tests/pg_child.py COMMAND DSN ...``.

Every line it prints is one JSON object, printed (and flushed) only after the store call it
reports has returned, so that a parent that SIGKILLs it knows what must be in the database.

Commands
    ``write DSN``: forever: enqueue a rollout, claim one and mark it running, add a span to it,
    now and then add resources and a worker heartbeat. The claimed attempts are never finished
    (in flight when the process dies); their config retries ``unresponsive`` (1 s of silence).
    ``dequeue DSN WORKER``: wait for a line on stdin (the start signal), then claim rollouts
    until the queue is empty; prints ``{"claimed": [ids]}`` at the end.
    ``finish DSN ROLLOUT_ID``: mark the rollout's latest attempt succeeded; prints the time just
    after it returned.
    ``enqueue DSN``: enqueue one rollout; prints its id and the time just after it returned.
    ``hold DSN``: open the store (a watchdog candidate), print ``{"open": pid}``, then
    ``{"leading": pid}`` once this process runs the database's watchdog; sleep forever.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import anyio

from agl_async import RolloutConfig
from agl_async.store.postgres import PostgresLightningStore
from agl_async.types import Span

CRASH_CONFIG = RolloutConfig(unresponsive_seconds=1.0, max_attempts=3, retry_condition=["unresponsive"])


def say(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def write(dsn: str) -> None:
    async with PostgresLightningStore(dsn, pool_size=2) as store:
        i = 0
        while True:
            r = await store.enqueue_rollout({"i": i}, config=CRASH_CONFIG)
            say(rollout=r.rollout_id)
            claimed = await store.dequeue_rollout(worker_id="crashy")
            if claimed is not None:
                await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="running")
                say(claimed=claimed.rollout_id, attempt=claimed.attempt.attempt_id)
                seq = await store.get_next_span_sequence_id(claimed.rollout_id, claimed.attempt.attempt_id)
                span = Span(
                    rollout_id=claimed.rollout_id,
                    attempt_id=claimed.attempt.attempt_id,
                    sequence_id=seq,
                    trace_id="t",
                    span_id=f"s{i}",
                    name="work",
                    attributes={"i": i},
                )
                await store.add_span(span)
                say(span=[claimed.rollout_id, claimed.attempt.attempt_id, seq])
            if i % 5 == 0:
                res = await store.add_resources({"version": i})
                say(resources=res.resources_id)
                await store.update_worker("crashy", heartbeat_stats={"i": i})
            i += 1


async def dequeue(dsn: str, worker: str) -> None:
    claimed: list[str] = []
    async with PostgresLightningStore(dsn, pool_size=2) as store:
        say(ready=os.getpid())
        await anyio.to_thread.run_sync(sys.stdin.readline)  # the start signal
        while True:
            got = await store.dequeue_rollout(worker_id=worker)
            if got is None:
                break
            claimed.append(got.rollout_id)
    say(claimed=claimed)


async def finish(dsn: str, rollout_id: str) -> None:
    async with PostgresLightningStore(dsn, pool_size=1) as store:
        say(ready=os.getpid())
        await anyio.to_thread.run_sync(sys.stdin.readline)
        await store.update_attempt(rollout_id, "latest", status="succeeded")
        say(done=time.time())


async def enqueue(dsn: str) -> None:
    async with PostgresLightningStore(dsn, pool_size=1) as store:
        say(ready=os.getpid())
        await anyio.to_thread.run_sync(sys.stdin.readline)
        r = await store.enqueue_rollout("from another process")
        say(rollout=r.rollout_id, done=time.time())


async def hold(dsn: str) -> None:
    async with PostgresLightningStore(dsn, pool_size=1) as store:
        await store.open()
        say(open=os.getpid())
        runtime = await store._rt()
        assert runtime.watchdog is not None
        while not runtime.watchdog.leading:  # noqa: ASYNC110 - a test-side look
            await anyio.sleep(0.02)
        say(leading=os.getpid())
        await anyio.sleep_forever()


def main() -> None:
    command, dsn, *rest = sys.argv[1:]
    commands = {"write": write, "dequeue": dequeue, "finish": finish, "enqueue": enqueue, "hold": hold}
    anyio.run(commands[command], dsn, *rest)


if __name__ == "__main__":
    main()
