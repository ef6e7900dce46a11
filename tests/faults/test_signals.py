"""Scenario 6: stop signals at any moment of a client-server run, with cooperative, blocking and
stubborn agents (issue 16).

``python -m faults.fleet ctrlc`` runs a whole client-server run (server + algorithm in that
process, two runner processes). It gets SIGINT or SIGTERM — to its pid, or to its whole process
group as a terminal or a batch system does — at start-up (while the runner processes are being
spawned and import), mid-run, or during the shutdown that a first signal started; or it is
SIGKILLed. Whatever the moment:

* the exit code is the documented one: 130 after a Ctrl-C, 143 after a SIGTERM (the first signal
  decides), and ``interrupted`` / ``terminated`` is the last line on stderr;
* no traceback and no ERROR line on stderr (an ordinary interrupt is not an error), and no
  ``exited with code -2`` (a child that the Ctrl-C reached while starting);
* no process of its session is left, and the server's port is free again;
* a SIGKILLed parent's runner processes exit by themselves, even when their agent blocks.

The sweep over random moments is marked ``slow`` (``nox -s faults``); one of each kind runs by
default.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from agl_async.testing import free_port

from .fleet import popen, session_members, stop_session, wait_exit, wait_no_session_left

pytestmark = pytest.mark.anyio

GRACEFUL = 4.0
TERMINATE = 2.0
GUARD = 60.0
SLACK = 3.0  # a shared 2-core machine; a bound, not a performance claim
EXPECTED = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def _readline(proc: Any) -> str:
    # abandon_on_cancel: the hang guard (fail_after) must be able to give up on a line that never comes
    line: str = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)
    return line


def _send(proc: Any, sig: signal.Signals, target: str) -> None:
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        os.kill(proc.pid, sig)


async def _run_and_signal(
    tmp_path: Path, agent: str, moment: str, signals: list[signal.Signals], target: str, delay: float
) -> tuple[int, str, float, int]:
    """Start ``ctrlc``, send ``signals`` (the second one ``delay`` s after the first) ``delay`` s
    into ``moment``: ``startup`` (the run has begun, its runner processes are starting),
    ``midrun`` (both runners have finished rollouts), ``shutdown`` (mid-run, then a second signal
    while the first one's shutdown is in progress); returns (exit code, stderr, seconds from the
    first signal to the exit, port)."""
    port = free_port()
    proc = popen(
        "ctrlc",
        "--graceful",
        str(GRACEFUL),
        "--terminate",
        str(TERMINATE),
        "--port",
        str(port),
        "--agent",
        agent,
        env={"FAULTS_MARKERS": str(tmp_path)},
    )
    try:
        with anyio.fail_after(GUARD):
            assert (await _readline(proc)).startswith("STARTING")
            assert (await _readline(proc)).startswith("RUNNING")  # the run handles signals now
            if moment != "startup":  # else: the runner processes are still starting (importing)
                assert (await _readline(proc)).startswith("READY")
            await anyio.sleep(delay)
        started = time.monotonic()
        _send(proc, signals[0], target)
        for sig in signals[1:]:
            await anyio.sleep(delay)
            _send(proc, sig, target)
        code, _, stderr = await wait_exit(proc, GUARD)
        took = time.monotonic() - started
        await wait_no_session_left(proc.pid)
    finally:
        stop_session(proc)
    return code, stderr, took, port


def _check_quiet_exit(code: int, stderr: str, first: signal.Signals, port: int) -> None:
    expected_code, last_line = EXPECTED[first]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == expected_code, stderr
    assert lines and lines[-1] == last_line, stderr
    assert "Traceback" not in stderr, stderr
    assert "ERROR" not in stderr and "exited with code -2" not in stderr, stderr
    assert _port_is_free(port), f"port {port} still bound"


# ------------------------------------------------------------------------------ one of each kind
async def test_sigterm_mid_run_is_a_ctrl_c_that_exits_143(
    tmp_path: Path, figures: Callable[..., None]
) -> None:
    code, stderr, took, port = await _run_and_signal(
        tmp_path, "marking", "midrun", [signal.SIGTERM], "pid", 0.1
    )
    _check_quiet_exit(code, stderr, signal.SIGTERM, port)
    assert "SIGTERM: cancelling and shutting down" in stderr
    assert took < GRACEFUL, (took, stderr)  # cooperative runners: the event is enough
    figures(exit_s=took, exit_code=code)


async def test_ctrl_c_while_the_runner_processes_start(tmp_path: Path, figures: Callable[..., None]) -> None:
    code, stderr, took, port = await _run_and_signal(
        tmp_path, "marking", "startup", [signal.SIGINT], "group", 0.3
    )
    _check_quiet_exit(code, stderr, signal.SIGINT, port)
    figures(exit_s=took, exit_code=code)


async def test_ctrl_c_with_agents_blocked_for_good(tmp_path: Path, figures: Callable[..., None]) -> None:
    """Every fourth task blocks its agent's thread for good: a Ctrl-C to the group cancels the runners,
    their threads are abandoned, and the processes exit without escalation."""
    code, stderr, took, port = await _run_and_signal(
        tmp_path, "blocking", "midrun", [signal.SIGINT], "group", 0.5
    )
    _check_quiet_exit(code, stderr, signal.SIGINT, port)
    assert "escalating" not in stderr, stderr
    assert took < GRACEFUL + SLACK, (took, stderr)
    figures(exit_s=took, exit_code=code)


async def test_runner_processes_exit_when_their_parent_is_killed_even_if_their_agent_blocks(
    tmp_path: Path, figures: Callable[..., None]
) -> None:
    port = free_port()
    proc = popen("ctrlc", "--port", str(port), "--agent", "blocking", env={"FAULTS_MARKERS": str(tmp_path)})
    try:
        with anyio.fail_after(GUARD):
            assert (await _readline(proc)).startswith("STARTING")
            assert (await _readline(proc)).startswith("RUNNING")
            assert (await _readline(proc)).startswith("READY")
            await anyio.sleep(0.5)  # some agents are blocked by now
        children = session_members(proc.pid) - {proc.pid}
        assert len(children) >= 2
        killed_at = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        await wait_exit(proc, GUARD)
        # The lifeline: each child cancels its runner, abandons the blocked thread, records what it
        # can (the store is gone: bounded) and exits.
        await wait_no_session_left(proc.pid, timeout=20.0)
        gone = time.monotonic() - killed_at
    finally:
        stop_session(proc)
    assert _port_is_free(port)
    figures(children=len(children), children_gone_s=gone)


# ------------------------------------------------------------------------- random moments (slow)
def _moments() -> list[Any]:
    rng = random.Random(16)
    cases = []
    for moment in ("startup", "midrun", "shutdown"):
        for agent in ("marking", "blocking"):
            for target in ("pid", "group"):
                first = rng.choice([signal.SIGINT, signal.SIGTERM])
                signals = (
                    [first] if moment != "shutdown" else [first, rng.choice([signal.SIGINT, signal.SIGTERM])]
                )
                delay = round(rng.uniform(0.0, 1.0 if moment == "startup" else 0.5), 2)
                cases.append(
                    pytest.param(
                        moment,
                        agent,
                        target,
                        signals,
                        delay,
                        id=f"{moment}-{agent}-{target}-{'+'.join(s.name for s in signals)}-{delay}",
                    )
                )
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("moment", "agent", "target", "signals", "delay"), _moments())
async def test_a_signal_at_any_moment_ends_the_run_quietly_and_completely(
    tmp_path: Path,
    figures: Callable[..., None],
    moment: str,
    agent: str,
    target: str,
    signals: list[signal.Signals],
    delay: float,
) -> None:
    code, stderr, took, port = await _run_and_signal(tmp_path, agent, moment, signals, target, delay)
    _check_quiet_exit(code, stderr, signals[0], port)
    # Bounded by the escalation whatever the agents do (a blocked agent under a pid-only signal
    # needs the SIGINT step: its runner sees the event only between rollouts).
    assert took < GRACEFUL + 3 * TERMINATE + SLACK, (took, stderr)
    figures(moment=moment, agent=agent, target=target, exit_s=took, exit_code=code)
