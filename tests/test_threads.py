"""Sync agents in daemon threads (agl_async._threads): an abandoned, blocked agent never keeps a
process alive (issue 16, bug 2), and the thread behaves like one of anyio's worker threads where
agents rely on it (context variables, ``anyio.from_thread``)."""

from __future__ import annotations

import contextvars
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from conftest import BOTH_BACKENDS

from agl_async._threads import run_in_daemon_thread

pytestmark = pytest.mark.anyio

GUARD = 30.0
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_result_exception_and_a_daemon_thread() -> None:
    def work(x: int) -> tuple[int, bool, bool]:  # trio: its own worker threads, daemon too
        current = threading.current_thread()
        return x * 2, current.daemon, current is threading.main_thread()

    assert await run_in_daemon_thread(work, 21) == (42, True, False)

    def fail() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        await run_in_daemon_thread(fail)


async def test_cancelling_abandons_the_thread_at_once() -> None:
    release = threading.Event()
    finished = threading.Event()

    def blocked() -> None:
        release.wait(GUARD)
        finished.set()

    with anyio.fail_after(GUARD):
        with anyio.move_on_after(0.05):
            await run_in_daemon_thread(blocked)
    assert not finished.is_set()  # abandoned, still blocked
    release.set()
    assert finished.wait(GUARD)


_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("_VAR", default="unset")


async def test_context_variables_and_from_thread_work_in_the_thread() -> None:
    """Tracing contexts reach a sync agent, and it may call back into the loop without a token
    (pins the anyio per-thread token that _threads sets)."""
    _VAR.set("from the caller")
    called: list[str] = []

    def agent() -> str:
        anyio.from_thread.run_sync(called.append, "on the loop")
        return _VAR.get()

    assert await run_in_daemon_thread(agent) == "from the caller"
    assert called == ["on the loop"]


SCRIPT = textwrap.dedent(
    """
    import threading, time
    from agl_async import Trainer
    from agl_async.algorithm import Baseline

    def stuck(task, resources):
        threading.Event().wait()  # never returns: its thread is abandoned when the run ends

    if __name__ == "__main__":
        trainer = Trainer(strategy={"type": "shm", "graceful_delay": 0.1}, algorithm=Baseline(timeout=0.3))
        trainer.fit(stuck, train_dataset=[1])
        print("fit returned", flush=True)
    """
)


def test_a_blocked_sync_agent_does_not_keep_the_process_alive(tmp_path: Path) -> None:
    script = tmp_path / "stuck.py"
    script.write_text(SCRIPT)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=GUARD,  # before the fix: the interpreter waited for the thread forever
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "fit returned"
    assert "Traceback" not in result.stderr, result.stderr
    assert time.monotonic() - started < GUARD
