"""Scenario 5: runners whose store server goes away.

Two runner processes (``python -m faults.fleet runner``, i.e. ``role="runner"`` with the
trainer's runner loop) work against a server in the test process. The server stops; while the
runners' clients retry (``DEFAULT_RETRY_DELAYS``, 7.85 s in all) it comes back on the same port
with the same store object, and the runners carry on with new work without a restart of their
own. Then the server stops for good: each runner exits within its retry budget (+ slack) with
exit code 1 and one clear error line naming the endpoint.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from agl_async import InMemoryLightningStore, LightningStoreServer
from agl_async.http.client import DEFAULT_RETRY_DELAYS

from .fleet import popen, stop_session, wait_exit, wait_no_session_left

pytestmark = pytest.mark.anyio

DOWN_FOR = 2.0  # well within the retry budget
BUDGET = sum(DEFAULT_RETRY_DELAYS)
SLACK = 5.0
GUARD = 60.0


async def _run_batch(store: InMemoryLightningStore, tmp_path: Path, n: int, tag: str) -> list[str]:
    rollouts = await store.enqueue_many_rollouts(
        [{"input": {"i": f"{tag}{i}", "dir": str(tmp_path), "seconds": 0.1}} for i in range(n)]
    )
    ids = [r.rollout_id for r in rollouts]
    with anyio.fail_after(GUARD):
        finished = await store.wait_for_rollouts(rollout_ids=ids, timeout=GUARD)
    assert [r.status for r in finished] == ["succeeded"] * n
    return ids


async def test_runners_ride_out_a_restart_and_give_up_on_a_server_gone_for_good(
    tmp_path: Path, figures: Callable[..., None]
) -> None:
    store = InMemoryLightningStore()
    server = LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="")
    await server.start()
    port = server.port
    procs: list[Any] = []
    try:
        procs = [popen("runner", "--port", str(port), "--tag", tag) for tag in "ab"]
        await _run_batch(store, tmp_path, 4, "before")

        # Down for a while, back on the same port with the same store.
        await server.stop()
        down_at = time.monotonic()
        queued_while_down = await store.enqueue_many_rollouts(
            [{"input": {"i": f"down{i}", "dir": str(tmp_path), "seconds": 0.1}} for i in range(4)]
        )
        await anyio.sleep(DOWN_FOR)
        assert all(p.poll() is None for p in procs)  # still retrying, not dead
        server = LightningStoreServer(store, host="127.0.0.1", port=port, auth_token="")
        await server.start()
        back_at = time.monotonic()
        ids = [r.rollout_id for r in queued_while_down]
        with anyio.fail_after(GUARD):
            finished = await store.wait_for_rollouts(rollout_ids=ids, timeout=GUARD)
        recovered = time.monotonic() - back_at
        assert [r.status for r in finished] == ["succeeded"] * 4
        await _run_batch(store, tmp_path, 4, "after")
        assert all(p.poll() is None for p in procs)
        workers = {
            a.worker_id
            for r in await store.query_rollouts()
            for a in await store.query_attempts(r.rollout_id)
        }
        assert workers <= {"a-0", "b-0"}

        # Gone for good: each runner gives up after its retries, with one clear error.
        await server.stop()
        gone_at = time.monotonic()
        exits = []
        for proc in procs:
            code, _, stderr = await wait_exit(proc, GUARD)
            exits.append(time.monotonic() - gone_at)
            assert code == 1, stderr
            last = stderr.strip().splitlines()[-1]
            assert last.startswith("runner ") and "failed: StoreConnectionError" in last, stderr
            assert f"http://127.0.0.1:{port}" in last and "tries" in last, last
            assert "Traceback" not in stderr and len(stderr.strip().splitlines()) <= 3, stderr
            await wait_no_session_left(proc.pid)
        assert BUDGET - 0.5 <= min(exits) and max(exits) <= BUDGET + SLACK, exits
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            stop_session(proc)
        await server.stop()

    assert (await store.statistics())["rollouts"]["succeeded"] == 12
    figures(
        down_for_s=DOWN_FOR,
        restart_to_backlog_done_s=recovered,
        down_to_backlog_done_s=back_at - down_at + recovered,
        retry_budget_s=BUDGET,
        gone_to_runner_exit_s=max(exits),
        runner_exit_codes=[p.returncode for p in procs],
    )
