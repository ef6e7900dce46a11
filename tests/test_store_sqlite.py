"""What the SQLite store adds to the store suite (which runs against it as ``sqlite`` and
``http-sqlite``): durability across store objects, the file format and its version, pickling,
several processes on one file, and the data-integrity rules of issue 16 that the durable stores
implement already.

Crash recovery (SIGKILL mid-stream) is in ``test_store_crash.py``.
"""

from __future__ import annotations

import functools
import logging
import pickle
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import anyio.from_thread
import pytest
from conftest import BOTH_BACKENDS, make_span

from agl_async import RolloutConfig, SqliteLightningStore
from agl_async.store._sqlite_schema import APPLICATION_ID, SCHEMA_VERSION

pytestmark = pytest.mark.anyio

HANG_GUARD = 10.0


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


# ---------------------------------------------------------------------------------- durability


async def test_a_new_store_on_the_file_sees_everything(db: Path) -> None:
    async with SqliteLightningStore(db) as store:
        res = await store.add_resources({"model": "m"})
        done = await store.start_rollout({"q": 1}, metadata={"k": 1}, worker_id=7)
        await store.add_many_spans([make_span(done.rollout_id, done.attempt.attempt_id, i) for i in (1, 2)])
        await store.update_attempt(done.rollout_id, "latest", status="succeeded")
        queued = await store.enqueue_rollout("waiting")
        await store.update_worker("w", heartbeat_stats={"gpu": 1})
        assert await store.get_next_span_sequence_id(done.rollout_id, done.attempt.attempt_id) == 3
        before = (
            await store.query_rollouts(),
            await store.query_attempts(done.rollout_id),
            await store.query_spans(done.rollout_id),
            await store.query_resources(),
            await store.query_workers(),
            await store.statistics(),
        )
    async with SqliteLightningStore(db) as again:
        after = (
            await again.query_rollouts(),
            await again.query_attempts(done.rollout_id),
            await again.query_spans(done.rollout_id),
            await again.query_resources(),
            await again.query_workers(),
            await again.statistics(),
        )
        assert after == before
        assert await again.get_latest_resources() == res
        # sequence ids and the queue carry over
        assert await again.get_next_span_sequence_id(done.rollout_id, done.attempt.attempt_id) == 4
        claimed = await again.dequeue_rollout()
        assert claimed is not None and claimed.rollout_id == queued.rollout_id


async def test_a_closed_store_reconnects_when_used_again(db: Path) -> None:
    store = SqliteLightningStore(db)
    await store.close()  # never opened: nothing to close
    r = await store.enqueue_rollout(1)
    await store.close()
    await store.close()  # idempotent
    assert await store.get_rollout_by_id(r.rollout_id) == r
    await store.close()


async def test_the_file_is_in_wal_mode_with_a_versioned_schema(db: Path) -> None:
    async with SqliteLightningStore(db) as store:
        await store.enqueue_rollout(1)
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    finally:
        conn.close()


async def test_a_file_from_a_newer_release_is_refused_and_left_alone(db: Path) -> None:
    async with SqliteLightningStore(db) as store:
        await store.enqueue_rollout(1)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="newer agl_async"):
        async with SqliteLightningStore(db):
            pass
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    conn.close()


async def test_a_foreign_sqlite_database_is_refused_and_left_alone(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    store = SqliteLightningStore(db)
    with pytest.raises(ValueError, match="not an agl_async store"):
        await store.statistics()
    conn = sqlite3.connect(db)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["mine"]
    conn.close()


async def test_a_file_that_cannot_be_opened_is_an_os_error(tmp_path: Path) -> None:
    store = SqliteLightningStore(tmp_path / "missing-dir" / "store.db")  # nothing opened yet
    with pytest.raises(OSError, match="missing-dir"):
        await store.statistics()


@pytest.mark.parametrize("path", ["", ":memory:", "file:x.db?mode=memory"])
def test_only_file_paths_are_accepted(path: str) -> None:
    with pytest.raises(ValueError, match="file path"):
        SqliteLightningStore(path)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"synchronous": "off"}, "synchronous"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"busy_timeout": -1}, "busy_timeout"),
    ],
)
def test_bad_settings_are_refused(db: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SqliteLightningStore(db, **kwargs)  # type: ignore[arg-type]


async def test_synchronous_full_is_applied(db: Path) -> None:
    store = SqliteLightningStore(db, synchronous="full")
    await store.statistics()
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    await store.close()


# ---------------------------------------------------------------------------------- processes


async def test_pickles_as_its_path_and_settings(db: Path) -> None:
    store = SqliteLightningStore(db, synchronous="full", poll_interval=0.5)
    r = await store.enqueue_rollout("shared")
    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, SqliteLightningStore) and copy is not store
    assert (copy.path, copy.synchronous, copy.poll_interval) == (store.path, "full", 0.5)
    assert await copy.get_rollout_by_id(r.rollout_id) == r  # same file, its own connection
    await copy.close()
    await store.close()


def test_a_relative_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert SqliteLightningStore("run.db").path == str(tmp_path / "run.db")


_CHILD = textwrap.dedent(
    """
    import pickle, sys, anyio
    store = pickle.loads(sys.stdin.buffer.read())

    async def main():
        claimed = await store.dequeue_rollout(worker_id="child", timeout=10)
        await store.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")
        await store.close()

    anyio.run(main)
    """
)


async def test_a_pickled_store_works_in_a_child_process_and_wakes_waiters_here(
    db: Path, no_leftover_processes: None
) -> None:
    """Two processes on one file: the child's long poll claims what this process enqueues, and
    the child's update wakes ``wait_for_rollouts`` here (within ``poll_interval``)."""
    store = SqliteLightningStore(db, poll_interval=0.2)
    child = await anyio.open_process([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE)
    try:
        assert child.stdin is not None
        await child.stdin.send(pickle.dumps(store))
        await child.stdin.aclose()
        r = await store.enqueue_rollout("for the child")
        with anyio.fail_after(HANG_GUARD):
            done = await store.wait_for_rollouts(rollout_ids=[r.rollout_id])
            assert await child.wait() == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert [x.status for x in done] == ["succeeded"]
    attempt = await store.get_latest_attempt(r.rollout_id)
    assert attempt is not None and attempt.worker_id == "child"
    await store.close()


async def test_waiters_do_not_poll_without_a_poll_interval(db: Path) -> None:
    """With ``poll_interval=None`` a waiter that nothing wakes sleeps out its timeout in one go:
    it looks at the database once at the start and once at the end."""
    store = SqliteLightningStore(db, poll_interval=None)
    started = await store.start_rollout(1)
    calls = 0
    original = store._transact

    def counting(*args: object) -> object:
        nonlocal calls
        calls += 1
        return original(*args)  # type: ignore[arg-type]

    store._transact = counting  # type: ignore[method-assign, assignment]
    with anyio.fail_after(HANG_GUARD):
        assert await store.wait_for_rollouts(rollout_ids=[started.rollout_id], timeout=0.5) == []
    assert calls == 2
    await store.close()


# ---------------------------------------------------------------------------------- cancellation


def test_the_long_poll_says_it_is_cancel_safe(db: Path) -> None:
    # the runner loop races it against its stop event instead of polling in 0.5 s requests
    assert SqliteLightningStore(db).long_poll_is_cancel_safe is True


async def test_a_long_poll_cancelled_while_it_sleeps_claims_nothing(db: Path) -> None:
    async with SqliteLightningStore(db) as store:
        with anyio.fail_after(HANG_GUARD):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(functools.partial(store.dequeue_rollout, "w", timeout=30))
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            queued = await store.enqueue_rollout("task")
            stats = await store.statistics()
            assert stats["queue_length"] == 1 and stats["total_attempts"] == 0
            claimed = await store.dequeue_rollout("other")
        assert claimed is not None and claimed.rollout_id == queued.rollout_id


async def test_a_long_poll_cancelled_while_it_claims_returns_the_claim(db: Path) -> None:
    """Cancelled in the middle of the claiming transaction (from inside the worker thread), the
    call still returns what it claimed: the claim is never made for nobody."""
    async with SqliteLightningStore(db) as store:
        queued = await store.enqueue_rollout("task")
        original = store._transact
        with anyio.CancelScope() as scope:

            def cancelling(*args: object) -> object:
                result = original(*args)  # type: ignore[arg-type]
                anyio.from_thread.run_sync(scope.cancel)
                return result

            store._transact = cancelling  # type: ignore[method-assign, assignment]
            with anyio.fail_after(HANG_GUARD):
                claimed = await store.dequeue_rollout("w", timeout=30)
        store._transact = original  # type: ignore[method-assign]
        assert scope.cancel_called
        assert claimed is not None and claimed.rollout_id == queued.rollout_id


# ---------------------------------------------------------------------------------- issue 16 rules


async def test_a_late_result_never_changes_a_terminal_rollout(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The watchdog fails the rollout (no retries left); the agent's success arrives afterwards."""
    async with SqliteLightningStore(db) as store:
        started = await store.start_rollout(1, config=RolloutConfig(timeout_seconds=0.1), worker_id="w")
        rid, aid = started.rollout_id, started.attempt.attempt_id
        with anyio.fail_after(HANG_GUARD):
            [failed] = await store.wait_for_rollouts(rollout_ids=[rid])
        assert failed.status == "failed"
        with caplog.at_level(logging.WARNING, "agl_async.store"):
            await store.update_rollout(rid, metadata={"reward": 1.0})
            late = await store.update_attempt(rid, aid, status="succeeded")
        assert late.status == "timeout"
        assert await store.get_rollout_by_id(rid) == failed  # status, end time and metadata unchanged
        assert "reward" in caplog.text and "late 'succeeded' is ignored" in caplog.text


async def test_a_stale_attempt_never_overwrites_the_retry(db: Path) -> None:
    """Attempt 1 times out and is retried; attempt 2 succeeds with its reward; then attempt 1's
    runner comes back with a result and a reward of its own."""
    config = RolloutConfig(timeout_seconds=0.1, max_attempts=2, retry_condition=["timeout"])
    async with SqliteLightningStore(db) as store:
        r = await store.enqueue_rollout("task", config=config)
        first = await store.dequeue_rollout(worker_id="slow")
        assert first is not None
        with anyio.fail_after(HANG_GUARD):
            second = await store.dequeue_rollout(worker_id="fast", timeout=HANG_GUARD)  # after the verdict
        assert second is not None and second.attempt.sequence_id == 2
        await store.update_rollout(r.rollout_id, metadata={"reward": 0.9})
        await store.update_attempt(r.rollout_id, second.attempt.attempt_id, status="succeeded")
        # the stale runner
        await store.update_rollout(r.rollout_id, metadata={"reward": 0.1})
        await store.update_attempt(r.rollout_id, first.attempt.attempt_id, status="failed")
        await store.update_attempt(r.rollout_id, first.attempt.attempt_id, status="succeeded")
        got = await store.get_rollout_by_id(r.rollout_id)
        assert got is not None and got.status == "succeeded" and got.metadata == {"reward": 0.9}
        assert [a.status for a in await store.query_attempts(r.rollout_id)] == ["timeout", "succeeded"]


async def test_an_unresponsive_attempt_comes_back_while_nothing_newer_exists(db: Path) -> None:
    config = RolloutConfig(unresponsive_seconds=0.1, max_attempts=2, retry_condition=["unresponsive"])
    async with SqliteLightningStore(db) as store:
        r = await store.enqueue_rollout("task", config=config)
        claimed = await store.dequeue_rollout()
        assert claimed is not None
        await anyio.sleep(0.2)
        requeued = await store.get_rollout_by_id(r.rollout_id)
        assert requeued is not None and requeued.status == "requeuing"
        # its runner was only slow: the span brings the attempt back and the rollout out of the queue
        await store.add_span(make_span(r.rollout_id, claimed.attempt.attempt_id))
        back = await store.get_rollout_by_id(r.rollout_id)
        assert back is not None and back.status == "running"
        assert await store.dequeue_rollout() is None
        await store.update_attempt(r.rollout_id, "latest", status="succeeded")
        done = await store.get_rollout_by_id(r.rollout_id)
        assert done is not None and done.status == "succeeded"


async def test_an_explicit_update_may_still_requeue_a_terminal_rollout(db: Path) -> None:
    async with SqliteLightningStore(db) as store:
        started = await store.start_rollout(1)
        await store.update_attempt(started.rollout_id, "latest", status="succeeded")
        again = await store.update_rollout(started.rollout_id, status="queuing", metadata={})
        assert again.status == "queuing" and again.end_time is None
        assert (await store.dequeue_rollout()) is not None


@pytest.mark.parametrize(
    "call",
    [
        "enqueue_input",
        "enqueue_metadata",
        "start_input",
        "update_input",
        "resources",
        "span",
        "worker",
        "attempt",
    ],
)
async def test_values_that_are_not_json_are_refused_when_they_enter(db: Path, call: str) -> None:
    bad = "lone \ud800 surrogate"
    async with SqliteLightningStore(db) as store:
        started = await store.start_rollout("ok", worker_id="w")
        rid, aid = started.rollout_id, started.attempt.attempt_id
        before = (await store.query_rollouts(), await store.query_attempts(rid), await store.statistics())
        with pytest.raises(ValueError, match="cannot be stored as JSON"):
            if call == "enqueue_input":
                await store.enqueue_rollout({"text": bad})
            elif call == "enqueue_metadata":
                await store.enqueue_many_rollouts([{"input": 1}, {"input": 2, "metadata": {"m": bad}}])
            elif call == "start_input":
                await store.start_rollout(object())
            elif call == "update_input":
                await store.update_rollout(rid, input=[bad], status="failed")
            elif call == "resources":
                await store.add_resources({"prompt": bad})
            elif call == "span":
                await store.add_many_spans(
                    [make_span(rid, aid, 1), make_span(rid, aid, 2, attributes={"x": bad})]
                )
            elif call == "worker":
                await store.update_worker("w", heartbeat_stats={"s": bad})
            else:
                await store.update_attempt(rid, aid, status="failed", metadata={"error": bad})
        after = (await store.query_rollouts(), await store.query_attempts(rid), await store.statistics())
        assert after == before
        assert await store.query_spans(rid) == [] and await store.query_resources() == []


# ---------------------------------------------------------------------------------- queries


async def test_sort_by_start_time_reads_the_times_not_the_creation_order(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes on one file (or a clock stepped back) create rollouts out of start-time
    order: ``sort_by="start_time"`` orders by the recorded times, paged in SQL."""
    import time
    import types

    from agl_async.store import sqlite as sqlite_module

    clock = [100.0]
    monkeypatch.setattr(
        sqlite_module, "time", types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic)
    )
    async with SqliteLightningStore(db) as store:
        a = await store.enqueue_rollout("a")
        clock[0] = 200.0
        b = await store.enqueue_rollout("b")
        clock[0] = 150.0  # another process's clock, or an NTP step back
        c = await store.enqueue_rollout("c")
        by_start = await store.query_rollouts(sort_by="start_time")
        assert [r.rollout_id for r in by_start] == [a.rollout_id, c.rollout_id, b.rollout_id]
        newest = await store.query_rollouts(sort_by="start_time", sort_order="desc", limit=2)
        assert [r.rollout_id for r in newest] == [b.rollout_id, c.rollout_id]
        page = await store.query_rollouts(sort_by="start_time", sort_order="desc", limit=2, offset=2)
        assert [r.rollout_id for r in page] == [a.rollout_id]
