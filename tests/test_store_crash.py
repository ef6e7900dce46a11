"""Crash recovery of the SQLite store: a process writing to it is SIGKILLed mid-stream.

The writer reports each object on stdout only after the store call that wrote it has returned;
after the kill, a new store on the same file must hold every reported object, and the attempts
the writer had in flight must be ended by the watchdog and retried, each rollout succeeding
exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest

from agl_async import SqliteLightningStore

pytestmark = pytest.mark.anyio

UNRESPONSIVE = 0.5

_WRITER = textwrap.dedent(
    f"""
    import sys, anyio
    from agl_async import RolloutConfig, SqliteLightningStore, Span

    CONFIG = RolloutConfig(
        unresponsive_seconds={UNRESPONSIVE}, max_attempts=2, retry_condition=["unresponsive"]
    )

    def report(*words):
        print(*words, flush=True)

    async def main():
        store = SqliteLightningStore(sys.argv[1])
        i = 0
        while True:  # until killed
            r = await store.enqueue_rollout({{"i": i}}, config=CONFIG)
            report("rollout", r.rollout_id)
            claimed = await store.dequeue_rollout(worker_id="writer")
            rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
            await store.update_attempt(rid, aid, status="running")
            for seq in (1, 2):
                span = Span(rollout_id=rid, attempt_id=aid, sequence_id=seq, trace_id="t",
                            span_id=f"{{aid}}-{{seq}}", name="step", attributes={{"i": i}})
                await store.add_span(span)
                report("span", rid, aid, seq)
            if i % 3:  # every third rollout is left in flight (its runner "hangs")
                await store.update_attempt(rid, aid, status="succeeded")
                report("succeeded", rid)
            i += 1

    anyio.run(main)
    """
)


async def _run_writer_until_killed(db: Path, lines_before_kill: int) -> list[list[str]]:
    """Start the writer, read its reports, SIGKILL it mid-stream; returns the reports read."""
    reports: list[list[str]] = []
    writer = await anyio.open_process([sys.executable, "-c", _WRITER, str(db)], stderr=subprocess.STDOUT)
    try:
        assert writer.stdout is not None
        buffer = b""
        with anyio.fail_after(60):
            while len(reports) < lines_before_kill:
                chunk = await writer.stdout.receive()
                buffer += chunk
                *complete, buffer = buffer.split(b"\n")
                reports += [line.decode().split() for line in complete]
        os.kill(writer.pid, signal.SIGKILL)  # mid-stream: it is writing as fast as it can
    finally:
        if writer.returncode is None:
            writer.kill()
        await writer.wait()
    assert writer.returncode == -signal.SIGKILL
    assert all(r[0] in ("rollout", "span", "succeeded") for r in reports), reports[:5]
    return reports


async def test_sigkill_loses_nothing_returned_and_in_flight_attempts_are_retried_once(
    tmp_path: Path, no_leftover_processes: None
) -> None:
    db = tmp_path / "crash.db"
    reports = await _run_writer_until_killed(db, lines_before_kill=400)
    rollouts = [r[1] for r in reports if r[0] == "rollout"]
    spans = [(r[1], r[2], int(r[3])) for r in reports if r[0] == "span"]
    succeeded = {r[1] for r in reports if r[0] == "succeeded"}
    assert len(rollouts) > 30 and succeeded

    async with SqliteLightningStore(db) as store:
        # everything whose call had returned is there
        found = {r.rollout_id: r for r in await store.query_rollouts()}
        assert set(rollouts) <= set(found)
        for rid in succeeded:
            assert found[rid].status == "succeeded"
        for rid, aid, seq in spans:
            assert (aid, seq) in {(s.attempt_id, s.sequence_id) for s in await store.query_spans(rid)}
        in_flight = [rid for rid, r in found.items() if r.status not in ("succeeded", "queuing")]
        assert in_flight  # every third rollout at least

        # A runner of the new process: the watchdog ends the dead writer's attempts (nobody polls
        # for it) and requeues them; each is run once more and succeeds.
        async def runner() -> None:
            while True:
                claimed = await store.dequeue_rollout(worker_id="restarted", timeout=5)
                if claimed is not None:
                    await store.update_attempt(
                        claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded"
                    )

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                tg.start_soon(runner)
                done = await store.wait_for_rollouts(rollout_ids=list(found))
                tg.cancel_scope.cancel()
        assert {r.status for r in done} == {"succeeded"} and len(done) == len(found)

        for rid in found:
            attempts = await store.query_attempts(rid)
            statuses = [a.status for a in attempts]
            assert statuses.count("succeeded") == 1, (rid, statuses)  # exactly once
            if rid in succeeded:
                assert statuses == ["succeeded"]  # never run again
            if rid in in_flight:
                assert statuses == ["unresponsive", "succeeded"]
                assert attempts[0].worker_id == "writer" and attempts[1].worker_id == "restarted"
                assert attempts[0].end_time is not None
        stats = await store.statistics()
        assert stats["queue_length"] == 0 and stats["rollouts"]["succeeded"] == len(found)
        assert stats["total_spans"] >= len(spans)
