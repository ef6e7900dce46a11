"""Scenario 3: Ctrl-C on a blocking ``run()`` in its own process.

``python -m faults.fleet ctrlc`` runs a whole client-server run (server + algorithm there, two
runner processes busy with rollouts). Once both runners have finished rollouts it gets SIGINT —
once, or twice in quick succession — either as ``kill -INT <pid>`` or, as a terminal's Ctrl-C
does, to its whole process group. It must exit promptly (well within ``graceful_timeout``: the
runners are cooperative), with the code of its ``KeyboardInterrupt`` handler, no process of its
session left, and no traceback on stderr: a few clear log lines, none repeated beyond one per
process per step.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from .fleet import popen, stop_session, wait_exit, wait_no_session_left

pytestmark = pytest.mark.anyio

GRACEFUL = 5.0
TERMINATE = 5.0
GUARD = 60.0


async def _wait_ready(proc: object, tmp_path: Path) -> None:
    assert proc.stdout is not None  # type: ignore[attr-defined]
    line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)  # type: ignore[attr-defined]
    assert line.startswith("STARTING"), line
    line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)  # type: ignore[attr-defined]
    assert line.startswith("RUNNING"), line
    line = await anyio.to_thread.run_sync(proc.stdout.readline, abandon_on_cancel=True)  # type: ignore[attr-defined]
    assert line.startswith("READY "), line


@pytest.mark.parametrize("target", ["pid", "group"])
@pytest.mark.parametrize("times", [1, 2], ids=["once", "twice"])
async def test_ctrl_c_exits_promptly_and_quietly(
    tmp_path: Path, figures: Callable[..., None], target: str, times: int
) -> None:
    proc = popen(
        "ctrlc",
        "--graceful",
        str(GRACEFUL),
        "--terminate",
        str(TERMINATE),
        env={"FAULTS_MARKERS": str(tmp_path)},
    )
    try:
        with anyio.fail_after(GUARD):
            await _wait_ready(proc, tmp_path)
        started = time.monotonic()
        for n in range(times):
            if target == "pid":
                os.kill(proc.pid, signal.SIGINT)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            if n + 1 < times:
                await anyio.sleep(0.1)
        code, _, stderr = await wait_exit(proc, GUARD)
        took = time.monotonic() - started
        await wait_no_session_left(proc.pid)
    finally:
        stop_session(proc)

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == 130, stderr
    assert took < GRACEFUL, (took, stderr)  # cooperative runners: the event is enough
    assert "Traceback" not in stderr, stderr
    assert lines[-1] == "interrupted"
    text = "\n".join(lines)
    assert "SIGINT: cancelling and shutting down" in text
    if times == 2:
        assert text.count("SIGINT again") == 1, stderr
    assert "escalating" not in text, stderr
    # A runner stopped by Ctrl-C is a clean stop, however many Ctrl-Cs its process group got.
    assert "ERROR" not in text and "exited with code" not in text, stderr
    repeated = {line: n for line, n in Counter(lines).items() if n > 1}
    assert not repeated, stderr
    assert len(lines) <= 8, stderr
    figures(target=target, sigints=times, exit_s=took, exit_code=code, stderr_lines=len(lines))
