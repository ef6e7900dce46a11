"""Scenario 2: shutdown escalation is bounded, measured step by step in one run.

Four runner processes in one client-server run: one stops on the event, one ignores the event
(SIGINT ends it), one ignores SIGINT (``terminate()`` ends it), one ignores SIGTERM too (only
``kill()`` ends it). From the moment the algorithm returns, each must be gone within its step's
deadline (+ slack) and not before the step was reached; the whole shutdown within
``graceful_timeout + 3 * terminate_timeout`` + slack; no descendant left (conftest). The per-step
behaviour (log lines, exit codes) is specified in tests/test_client_server.py; this measures it.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import anyio
import bundles
import pytest

from agl_async import ClientServerExecutionStrategy, ExecutionEvent, InMemoryLightningStore, LightningStore

from . import fleet

pytestmark = pytest.mark.anyio

GRACEFUL = 1.0
TERMINATE = 1.0
SLACK = 2.0  # scheduling on a shared 2-core machine; not a performance claim
EXITED = re.compile(r"runner-(\d) \(pid \d+\) exited with code (-?\d+)")


async def test_each_step_stops_its_runner_within_its_deadline(
    caplog: pytest.LogCaptureFixture, figures: Callable[..., None]
) -> None:
    caplog.set_level(logging.INFO, logger="agl_async")
    returned_at: list[float] = []

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:  # runs in this process
        await bundles.wait_ready(store, 4)
        returned_at.append(time.time())

    strategy = ClientServerExecutionStrategy(
        server_host="127.0.0.1",
        server_port=0,
        n_runners=4,
        graceful_timeout=GRACEFUL,
        terminate_timeout=TERMINATE,
    )
    with anyio.fail_after(60), pytest.raises(RuntimeError, match=r"runner-3 \(pid \d+\) exited with code -9"):
        await strategy.execute(algorithm, fleet.mixed_runner, InMemoryLightningStore())
    ended = time.time()

    t0 = returned_at[0]
    exits: dict[int, tuple[int, float]] = {}
    for record in caplog.records:
        match = EXITED.search(record.getMessage())
        if match:
            exits[int(match[1])] = (int(match[2]), record.created - t0)
    assert sorted(exits) == [0, 1, 2, 3], caplog.text
    g, t = GRACEFUL, TERMINATE
    # (exit code, step reached at, deadline of the step)
    expected = {0: (0, 0.0, g), 1: (0, g, g + t), 2: (-15, g + t, g + 2 * t), 3: (-9, g + 2 * t, g + 3 * t)}
    for worker, (code, reached, deadline) in expected.items():
        got_code, after = exits[worker]
        assert got_code == code, (worker, exits)
        assert reached - 0.05 <= after <= deadline + SLACK, (worker, after, exits)
    total = ended - t0
    assert total <= g + 3 * t + SLACK
    figures(
        graceful_timeout=g,
        terminate_timeout=t,
        cooperative_exit_s=exits[0][1],
        sigint_exit_s=exits[1][1],
        terminate_exit_s=exits[2][1],
        kill_exit_s=exits[3][1],
        total_shutdown_s=total,
        bound_s=g + 3 * t + SLACK,
    )
