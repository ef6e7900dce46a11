"""What is particular to ``PostgresLightningStore``: its lifecycle, schema, asyncio-only driver,
pickling, lost connections and cancelled claims. (The store API itself is specified by the
conformance suite, which runs against it through the ``store`` fixture.)"""

from __future__ import annotations

import pickle
import subprocess
import sys
from typing import Any

import anyio
import pytest

from agl_async import RolloutConfig
from agl_async.store.postgres import PostgresLightningStore

pytestmark = pytest.mark.anyio
HANG_GUARD = 30.0


# ---------------------------------------------------------------------------------- construction


def test_bad_arguments_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="postgresql://"):
        PostgresLightningStore("sqlite:///x.db")
    with pytest.raises(ValueError, match="pool_size"):
        PostgresLightningStore("postgresql://u@h/db", pool_size=0)
    with pytest.raises(ValueError, match="reconnect_timeout"):
        PostgresLightningStore("postgresql://u@h/db", reconnect_timeout=-1)


def test_repr_and_errors_never_show_the_password() -> None:
    store = PostgresLightningStore("postgresql://agl:s3cret@db.example:5432/runs")
    assert "s3cret" not in repr(store)
    assert "agl:***@db.example" in repr(store)


async def test_nothing_connects_until_the_first_call(pg_dsn: str) -> None:
    store = PostgresLightningStore(pg_dsn)
    assert store._runtime is None
    await store.close()  # closing an unopened store is fine
    assert await store.get_rollout_by_id("ro-x") is None
    assert store._runtime is not None
    await store.close()
    assert store._runtime is None
    assert await store.get_rollout_by_id("ro-x") is None  # a closed store reopens on use
    await store.close()


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_on_trio_every_call_says_it_needs_asyncio(pg_dsn: str) -> None:
    store = PostgresLightningStore(pg_dsn)
    with pytest.raises(RuntimeError, match="asyncio"):
        await store.enqueue_rollout(1)


async def test_an_unreachable_database_is_a_connection_error_after_reconnect_timeout() -> None:
    from agl_async.testing import free_port

    store = PostgresLightningStore(
        f"postgresql://agl@127.0.0.1:{free_port()}/nothing", reconnect_timeout=0.5, connect_timeout=0.5
    )
    with anyio.fail_after(HANG_GUARD), pytest.raises(ConnectionError, match="cannot connect"):
        await store.statistics()


# ---------------------------------------------------------------------------------- schema


async def test_the_schema_is_created_on_first_open_and_versioned(pg_dsn: str, pg_cluster: Any) -> None:
    from agl_async.store._postgres_schema import SCHEMA_VERSION

    dbname = pg_dsn.rsplit("/", 1)[1]
    assert pg_cluster.psql("SELECT to_regclass('agl_meta') IS NULL", dbname) == "t"
    # several processes opening a fresh database at once: one creates, the others find it made
    stores = [PostgresLightningStore(pg_dsn, pool_size=1) for _ in range(5)]
    async with anyio.create_task_group() as tg:
        for s in stores:
            tg.start_soon(s.open)
    for s in stores:
        await s.close()
    assert pg_cluster.psql("SELECT value FROM agl_meta WHERE key = 'schema_version'", dbname) == str(
        SCHEMA_VERSION
    )


async def test_a_database_from_a_newer_release_is_refused(pg_dsn: str, pg_cluster: Any) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        await store.enqueue_rollout(1)
    dbname = pg_dsn.rsplit("/", 1)[1]
    pg_cluster.psql("UPDATE agl_meta SET value = '999' WHERE key = 'schema_version'", dbname)
    with pytest.raises(RuntimeError, match="version 999, newer than this release"):
        await PostgresLightningStore(pg_dsn).open()


# ---------------------------------------------------------------------------------- pickling


async def test_a_pickled_store_reconnects_in_another_process(pg_dsn: str) -> None:
    async with PostgresLightningStore(pg_dsn, pool_size=3) as store:
        await store.enqueue_rollout("before")
        data = pickle.dumps(store)
        copy = pickle.loads(data)
        assert copy.dsn == pg_dsn and copy.pool_size == 3 and copy._runtime is None
        code = (
            "import pickle, sys, anyio\n"
            "store = pickle.loads(sys.stdin.buffer.read())\n"
            "async def main():\n"
            "    async with store:\n"
            "        print(len(await store.query_rollouts()))\n"
            "        await store.enqueue_rollout('from the child')\n"
            "anyio.run(main)\n"
        )
        out = await anyio.run_process([sys.executable, "-c", code], input=data, check=True)
        assert out.stdout.decode().strip() == "1"
        assert [r.input for r in await store.query_rollouts()] == ["before", "from the child"]


# ---------------------------------------------------------------------------------- lost connections


async def _terminate_backends(pg_cluster: Any, dsn: str) -> None:
    dbname = dsn.rsplit("/", 1)[1]
    await anyio.to_thread.run_sync(
        pg_cluster.psql,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE datname = '{dbname}' AND pid <> pg_backend_pid()",
    )


async def test_lost_connections_are_replaced_and_waiters_still_woken(pg_dsn: str, pg_cluster: Any) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        started = await store.start_rollout("task")
        config = RolloutConfig(unresponsive_seconds=0.5)
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:
                done: list[Any] = []

                async def waiter() -> None:
                    done.extend(await store.wait_for_rollouts(rollout_ids=[started.rollout_id]))

                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                await _terminate_backends(pg_cluster, pg_dsn)  # pool, listener, watchdog: all gone
                # Calls keep working (the pool replaces what died) ...
                silent = await store.start_rollout("silent", config=config)
                await store.update_attempt(started.rollout_id, "latest", status="succeeded")
            assert [r.status for r in done] == ["succeeded"]  # ... the waiter was woken ...
            # ... and the watchdog is back too.
            judged = await store.wait_for_rollouts(rollout_ids=[silent.rollout_id])
        assert [r.status for r in judged] == ["failed"]


async def test_a_database_restart_is_survived(pg_dsn: str, pg_cluster: Any) -> None:
    async with PostgresLightningStore(pg_dsn, reconnect_timeout=60) as store:
        r = await store.enqueue_rollout("before")
        await anyio.to_thread.run_sync(pg_cluster.restart)
        assert (await store.get_rollout_by_id(r.rollout_id)) == r
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:
                claimed: list[Any] = []

                async def poll() -> None:
                    claimed.append(await store.dequeue_rollout(timeout=HANG_GUARD))
                    claimed.append(await store.dequeue_rollout(timeout=HANG_GUARD))

                tg.start_soon(poll)
                await anyio.wait_all_tasks_blocked()
                await store.enqueue_rollout("after")  # wakes the long poll over a new connection
        assert [c.input for c in claimed] == ["before", "after"]


# ---------------------------------------------------------------------------------- cancellation


async def test_a_cancelled_dequeue_claims_nothing_it_does_not_return(pg_dsn: str) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        ids = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(60)])]
        returned: list[str] = []
        for i in range(60):
            with anyio.move_on_after(0.0002 * (i % 15)):  # cancel at every stage of the claim
                claimed = await store.dequeue_rollout(worker_id="w")
                if claimed is not None:
                    returned.append(claimed.rollout_id)
        # what was claimed was returned; the rest is still queued, in order
        preparing = [r.rollout_id for r in await store.query_rollouts(status_in=["preparing"])]
        assert sorted(preparing) == sorted(returned)
        queued = [r.rollout_id for r in await store.query_rollouts(status_in=["queuing"])]
        assert sorted(queued + returned) == sorted(ids)
        stats = await store.statistics()
        assert stats["total_attempts"] == len(returned)


async def test_the_watchdog_does_not_need_anyone_to_call_the_store(pg_dsn: str) -> None:
    # One store made the attempt and went quiet; another only waits. The verdict comes anyway.
    async with PostgresLightningStore(pg_dsn) as maker:
        started = await maker.start_rollout(1, config=RolloutConfig(timeout_seconds=0.3))
    async with PostgresLightningStore(pg_dsn) as watcher:
        with anyio.fail_after(HANG_GUARD):
            done = await watcher.wait_for_rollouts(rollout_ids=[started.rollout_id])
        assert [r.status for r in done] == ["failed"]
        attempt = await watcher.get_latest_attempt(started.rollout_id)
        assert attempt is not None and attempt.status == "timeout"
        assert attempt.end_time == pytest.approx(attempt.start_time + 0.3, abs=1e-6)


def test_import_agl_async_does_not_import_asyncpg() -> None:
    code = "import sys, agl_async, agl_async.store.postgres\nprint('asyncpg' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


async def test_a_silently_dead_listener_is_noticed_and_replaced(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal

    from agl_async.store import _postgres_events

    monkeypatch.setattr(_postgres_events, "PING_INTERVAL", 0.2)
    monkeypatch.setattr(_postgres_events, "PING_TIMEOUT", 0.3)
    listening = (
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'agl_async listener'"
    )
    async with PostgresLightningStore(pg_dsn) as store:
        rt = await store._rt()
        frozen = await rt.pool.fetchval(listening)
        assert frozen is not None
        os.kill(frozen, signal.SIGSTOP)  # the backend stops answering; its socket stays open
        try:
            with anyio.fail_after(HANG_GUARD):
                while (await rt.pool.fetchval(listening + " AND pid <> $1", frozen)) is None:  # noqa: ASYNC110
                    await anyio.sleep(0.05)  # a test-side look for the replacement
                started = await store.start_rollout("task")
                async with anyio.create_task_group() as tg:
                    done: list[Any] = []

                    async def waiter() -> None:
                        done.extend(await store.wait_for_rollouts(rollout_ids=[started.rollout_id]))

                    tg.start_soon(waiter)
                    await anyio.wait_all_tasks_blocked()
                    assert rt.wakeups is not None and rt.wakeups.listening
                    await store.update_attempt(started.rollout_id, "latest", status="succeeded")
            assert [r.status for r in done] == ["succeeded"]
        finally:
            os.kill(frozen, signal.SIGCONT)


async def test_a_rollout_wakes_one_long_poll_and_a_cancelled_one_hands_its_turn_on(pg_dsn: str) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        rt = await store._rt()
        assert rt.wakeups is not None
        got: dict[int, Any] = {}
        scopes: dict[int, anyio.CancelScope] = {}
        arrived = {i: anyio.Event() for i in range(3)}
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:

                async def poll(i: int, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                    with anyio.CancelScope() as scope:
                        scopes[i] = scope
                        task_status.started()
                        got[i] = await store.dequeue_rollout(worker_id=f"w{i}", timeout=HANG_GUARD)
                        arrived[i].set()

                for i in range(3):  # in line in this order
                    await tg.start(poll, i)
                    await anyio.wait_all_tasks_blocked()
                # One rollout: one poll wakes (the first in line), the others keep waiting.
                first = await store.enqueue_rollout("one")
                await arrived[0].wait()  # the notification comes back over the listener
                assert got[0] is not None and got[0].rollout_id == first.rollout_id
                await anyio.wait_all_tasks_blocked()
                assert set(got) == {0} and len(rt.wakeups._queue_waiters) == 2
                # A rollout that entered the queue without a notification, and a poll woken for
                # it that is cancelled before it looks: its turn goes to the next in line.
                started = await store.start_rollout("two")
                await rt.pool.execute(
                    "UPDATE agl_rollouts SET status = 'queuing', queue_pos = nextval('agl_queue_seq') "
                    "WHERE rollout_id = $1",
                    started.rollout_id,
                )
                rt.wakeups.queue_changed(1)  # wakes poll 1 ...
                scopes[1].cancel()  # ... which is cancelled before it runs
                await arrived[2].wait()
        assert got[2] is not None and got[2].rollout_id == started.rollout_id and 1 not in got
