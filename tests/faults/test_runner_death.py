"""Scenario 1: a runner fleet survives a runner's death.

A store server runs on its own (in the test process); two runner processes attach to it as
``ClientServerExecutionStrategy(role="runner")`` processes (``python -m faults.fleet runner``).
One is SIGKILLed while it runs a rollout. With ``unresponsive_seconds`` and a retry on
``"unresponsive"`` every rollout still ends ``succeeded`` exactly once (one succeeded attempt,
one reward span) and the dead attempt is recorded ``unresponsive``; without retries the rollout
ends ``failed`` with its attempt ``unresponsive`` — never stuck ``running``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from agl_async import InMemoryLightningStore, LightningStoreServer, RolloutConfig
from agl_async.trainer import REWARD_SPAN_NAME

from .fleet import popen, stop_session, wait_exit, wait_no_session_left

pytestmark = pytest.mark.anyio

UNRESPONSIVE = 1.0  # seconds without a heartbeat before a running attempt is declared unresponsive
AGENT_SECONDS = 1.5  # longer than UNRESPONSIVE: live runners must keep their attempts alive by heartbeats
N_ROLLOUTS = 6
GUARD = 60.0


def _markers(markers: Path) -> list[Path]:
    return list(markers.iterdir())


def _tasks_of(markers: Path, pid: int) -> list[Path]:
    """The markers left by process ``pid``, oldest first."""
    mine = [m for m in markers.iterdir() if int(m.name.split(".")[1]) == pid]
    return sorted(mine, key=lambda m: m.stat().st_mtime_ns)


async def _nth_task_of_pid(markers: Path, pid: int, n: int) -> int:
    """Wait until process ``pid`` has started its ``n``-th task; return that task's index."""
    with anyio.fail_after(GUARD):
        while len(mine := _tasks_of(markers, pid)) < n:  # noqa: ASYNC110 - a file marker, no event
            await anyio.sleep(0.02)
    return int(mine[-1].name.split(".")[0])


def _start_runner(launcher: str, port: int, tag: str) -> Any:
    if launcher == "strategy":
        heartbeat = str(UNRESPONSIVE / 4)
        return popen("runner", "--port", str(port), "--tag", tag, "--heartbeat", heartbeat)
    # The CLI: every separately started `agl-async runner` numbers its runners from 0.
    server = f"http://127.0.0.1:{port}"
    return popen("agl_async.cli", "runner", "--server", server, "--agent", "faults.fleet:marking_agent")


@pytest.mark.parametrize(
    ("launcher", "retries"),
    [("strategy", True), ("strategy", False), ("cli", True)],
    ids=["retry-unresponsive", "no-retry", "cli-retry-unresponsive"],
)
async def test_fleet_survives_a_sigkilled_runner(
    tmp_path: Path, figures: Callable[..., None], launcher: str, retries: bool
) -> None:
    config = (
        RolloutConfig(unresponsive_seconds=UNRESPONSIVE, max_attempts=2, retry_condition=["unresponsive"])
        if retries
        else RolloutConfig(unresponsive_seconds=UNRESPONSIVE)
    )
    store = InMemoryLightningStore()
    procs = []
    async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server:
        try:
            procs = [_start_runner(launcher, server.port, tag) for tag in "ab"]
            victim, survivor = procs
            rollouts = await store.enqueue_many_rollouts(
                [
                    {"input": {"i": i, "dir": str(tmp_path), "seconds": AGENT_SECONDS}, "config": config}
                    for i in range(N_ROLLOUTS)
                ]
            )
            by_input = {r.input["i"]: r.rollout_id for r in rollouts}
            ids = list(by_input.values())

            # Killed in its second rollout: both runners have been working side by side for a while.
            killed_task = await _nth_task_of_pid(tmp_path, victim.pid, 2)
            killed_rollout = by_input[killed_task]
            os.kill(victim.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            code, _, _ = await wait_exit(victim, GUARD)
            assert code == -signal.SIGKILL

            # The dead attempt is declared unresponsive by the store's own watchdog.
            with anyio.fail_after(GUARD):
                while (await store.get_latest_attempt(killed_rollout)).status == "running":  # type: ignore[union-attr]
                    await store.wait_for_rollouts(rollout_ids=[killed_rollout], timeout=0.05)
            detected = time.monotonic() - killed_at

            with anyio.fail_after(GUARD):
                finished = await store.wait_for_rollouts(rollout_ids=ids, timeout=GUARD)
            recovered = time.monotonic() - killed_at
            assert len(finished) == N_ROLLOUTS

            # Stop the survivor with a Ctrl-C: a clean exit (the CLI's documented code for it: 130).
            survivor.send_signal(signal.SIGINT)
            code, _, survivor_err = await wait_exit(survivor, GUARD)
            assert code == (0 if launcher == "strategy" else 130), survivor_err
            for proc in procs:
                await wait_no_session_left(proc.pid)
        finally:
            for proc in procs:
                stop_session(proc)

    outcome: dict[str, Any] = {}
    for rollout in await store.query_rollouts(rollout_id_in=ids):
        attempts = await store.query_attempts(rollout.rollout_id)
        spans = [s for s in await store.query_spans(rollout.rollout_id) if s.name == REWARD_SPAN_NAME]
        outcome[rollout.rollout_id] = (rollout.status, [a.status for a in attempts], len(spans))

    dead_attempt = (await store.query_attempts(killed_rollout))[0]
    assert dead_attempt.status == "unresponsive"
    if launcher == "strategy":
        assert str(dead_attempt.worker_id).startswith("a-")  # the victim's
    if retries:
        assert outcome[killed_rollout] == ("succeeded", ["unresponsive", "succeeded"], 1)
        if launcher == "strategy":
            retried = (await store.query_attempts(killed_rollout))[1]
            assert str(retried.worker_id).startswith("b-")  # picked up by the survivor
    else:
        assert outcome[killed_rollout] == ("failed", ["unresponsive"], 0)
    for rollout_id, result in outcome.items():
        if rollout_id != killed_rollout:
            # Exactly once: one attempt, succeeded, one reward span (no live attempt was declared
            # unresponsive although each ran longer than unresponsive_seconds).
            assert result == ("succeeded", ["succeeded"], 1), (rollout_id, result)
    assert (await store.statistics())["rollouts"]["running"] == 0
    assert "Traceback" not in survivor_err, survivor_err
    figures(
        launcher=launcher,
        unresponsive_seconds=UNRESPONSIVE,
        agent_seconds=AGENT_SECONDS,
        rollouts=N_ROLLOUTS,
        kill_to_unresponsive_s=detected,
        kill_to_all_terminal_s=recovered,
        killed_rollout_final=outcome[killed_rollout][0],
    )


async def test_cli_fleet_keeps_live_attempts_alive(tmp_path: Path, figures: Callable[..., None]) -> None:
    """Three ``agl-async runner`` processes (each numbers its runner 0, so their worker ids
    collide in the store) and two rollouts longer than ``unresponsive_seconds``: the heartbeats of
    the two busy runners must keep *their own* attempts alive, so that the idle third runner never
    gets a live rollout requeued to it — each rollout runs exactly once."""
    config = RolloutConfig(
        unresponsive_seconds=UNRESPONSIVE, max_attempts=2, retry_condition=["unresponsive"]
    )
    store = InMemoryLightningStore()
    procs = []
    async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server:
        try:
            procs = [_start_runner("cli", server.port, tag) for tag in "abc"]
            # All three are attached (and then idle in their long polls) before work arrives.
            with anyio.fail_after(GUARD):
                for proc in procs:
                    line = await anyio.to_thread.run_sync(proc.stdout.readline)
                    assert "attached to" in line, line
            await anyio.sleep(1.5)
            rollouts = await store.enqueue_many_rollouts(
                [
                    {"input": {"i": i, "dir": str(tmp_path), "seconds": 2 * AGENT_SECONDS}, "config": config}
                    for i in range(2)
                ]
            )
            ids = [r.rollout_id for r in rollouts]
            with anyio.fail_after(GUARD):
                finished = await store.wait_for_rollouts(rollout_ids=ids, timeout=GUARD)
            assert [r.status for r in finished] == ["succeeded", "succeeded"]
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                await wait_exit(proc, GUARD)
                await wait_no_session_left(proc.pid)
        finally:
            for proc in procs:
                stop_session(proc)
    runs = sorted(m.name.split(".")[0] for m in _markers(tmp_path))
    attempts = {rid: [a.status for a in await store.query_attempts(rid)] for rid in ids}
    figures(agent_calls=len(runs), attempts=list(attempts.values()))
    assert runs == ["0", "1"], (runs, attempts)  # each agent call happened once
    assert list(attempts.values()) == [["succeeded"], ["succeeded"]]
