"""Scenario 7: the normal end of a cluster job (issue 16).

The algorithm runs here with ``role="algorithm"`` (it serves its store); two runner processes
(``python -m faults.fleet runner``, ``role="runner"``) are attached from "other machines". When
the algorithm returns, the server says that the run is over (``end_run``): idle runners hear it
in the answer to their long poll, a busy one records its rollout first (the server keeps serving
while attempts are live, up to ``graceful_timeout``). Every runner exits 0, promptly, with one
line on stderr — not ~8 s of connection retries, exit code 1 and pages of tracebacks blaming a
runner, as before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from agl_async import ClientServerExecutionStrategy, ExecutionEvent, InMemoryLightningStore, LightningStore
from agl_async.testing import free_port

from .fleet import popen, stop_session, wait_exit, wait_no_session_left

pytestmark = pytest.mark.anyio

GUARD = 60.0


async def _is_running(store: LightningStore, rollout_id: str) -> bool:
    rollout = await store.get_rollout_by_id(rollout_id)
    return rollout is not None and rollout.status == "running"


async def test_runners_elsewhere_exit_0_at_once_when_the_algorithm_is_done(
    tmp_path: Path, figures: Callable[..., None]
) -> None:
    port = free_port()
    procs: list[Any] = []
    returned_at: list[float] = []

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        for tag in "ab":
            procs.append(popen("runner", "--port", str(port), "--tag", tag))
        rollouts = await store.enqueue_many_rollouts(
            [{"input": {"i": i, "dir": str(tmp_path), "seconds": 0.05}} for i in range(8)]
        )
        # The last one is slow: its runner is busy when the algorithm returns.
        slow = await store.enqueue_rollout({"i": "slow", "dir": str(tmp_path), "seconds": 1.0})
        ids = [r.rollout_id for r in rollouts]
        with anyio.fail_after(GUARD):
            await store.wait_for_rollouts(rollout_ids=ids)
            while not await _is_running(store, slow.rollout_id):  # noqa: ASYNC110 - another process's state
                await anyio.sleep(0.02)
        returned_at.append(time.monotonic())

    store = InMemoryLightningStore()
    strategy = ClientServerExecutionStrategy(role="algorithm", server_host="127.0.0.1", server_port=port)
    try:
        with anyio.fail_after(GUARD):
            await strategy.execute(algorithm, None, store)  # type: ignore[arg-type]
        served_until = time.monotonic()
        exits = []
        for proc in procs:
            code, _, stderr = await wait_exit(proc, GUARD)
            exits.append(time.monotonic() - returned_at[0])
            lines = [line for line in stderr.splitlines() if line.strip()]
            assert code == 0, stderr
            assert "Traceback" not in stderr and len(lines) <= 1, stderr
            assert all("run is over" in line for line in lines), stderr
            await wait_no_session_left(proc.pid)
    finally:
        for proc in procs:
            stop_session(proc)
    statuses = [r.status for r in await store.query_rollouts()]
    assert statuses == ["succeeded"] * 9  # the slow one too: recorded before the server stopped
    assert max(exits) < 5.0, exits  # not the client's 7.85 s of retries
    figures(served_after_return_s=served_until - returned_at[0], runner_exit_s=max(exits))
