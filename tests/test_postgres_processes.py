"""PostgreSQL store across processes: durability after SIGKILL, claims, wake-ups, the watchdog.

Each test gets a fresh database on the session's throwaway cluster (``pg_dsn``); the other
processes are ``tests/pg_child.py`` (a store in a child process) or ``agl-async serve``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from agl_async import RolloutConfig
from agl_async.store.postgres import PostgresLightningStore

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("no_leftover_processes")]

CHILD = str(Path(__file__).with_name("pg_child.py"))
HANG_GUARD = 60.0


class Child:
    """A ``pg_child.py`` process whose JSON lines are collected by a thread."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, CHILD, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            text=True,
            bufsize=1,
        )
        self.lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if line.endswith("\n"):  # a line cut by a SIGKILL was not reported
                with self._changed:
                    self.lines.append(json.loads(line))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, key: str, count: int = 1, timeout: float = HANG_GUARD) -> list[dict[str, Any]]:
        """Block until ``count`` lines with ``key`` have come (a thread: call via to_thread)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [line for line in self.lines if key in line]
                if len(found) >= count:
                    return found
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(
                        f"child exited ({self.popen.returncode}) before {count} {key!r} lines"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} {key!r} lines within {timeout}s: {self.lines[-3:]}")
                self._changed.wait(left)

    async def await_lines(self, key: str, count: int = 1) -> list[dict[str, Any]]:
        return await anyio.to_thread.run_sync(self.wait_for, key, count)

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write("go\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)
        self._reader.join(timeout=10)


@pytest.fixture
def children() -> Any:
    made: list[Child] = []

    def make(*args: str) -> Child:
        child = Child(*args)
        made.append(child)
        return child

    yield make
    for child in made:
        child.stop()


# ---------------------------------------------------------------------------------- durability


async def test_a_sigkilled_writer_loses_nothing_it_reported_and_its_attempts_are_retried(
    pg_dsn: str, children: Any
) -> None:
    writer = children("write", pg_dsn)
    await writer.await_lines("span", 30)  # mid-stream: dozens of rollouts, claims, spans
    writer.popen.send_signal(signal.SIGKILL)
    writer.stop()
    reported = writer.lines
    rollouts = [line["rollout"] for line in reported if "rollout" in line]
    claims = {line["claimed"]: line["attempt"] for line in reported if "claimed" in line}
    spans = [tuple(line["span"]) for line in reported if "span" in line]
    resources = [line["resources"] for line in reported if "resources" in line]

    async with PostgresLightningStore(pg_dsn) as store:
        # Everything whose call had returned is there.
        stored = {r.rollout_id: r for r in await store.query_rollouts()}
        assert set(rollouts) <= set(stored)
        for rid, aid, seq in spans:
            assert (aid, seq) in {(s.attempt_id, s.sequence_id) for s in await store.query_spans(rid)}
        for res in resources:
            assert await store.get_resources_by_id(res) is not None
        for rid, aid in claims.items():
            attempt = await store.get_latest_attempt(rid)
            assert attempt is not None and attempt.attempt_id == aid

        # The attempts in flight at the kill are ended by this store's watchdog (1 s of silence)
        # and retried; a runner here finishes every rollout, each succeeding exactly once.
        everything = list(stored)
        with anyio.fail_after(HANG_GUARD):
            while True:
                claimed = await store.dequeue_rollout(worker_id="survivor", timeout=0.5)
                if claimed is not None:
                    await store.update_attempt(
                        claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded"
                    )
                    continue
                done = await store.wait_for_rollouts(rollout_ids=everything, timeout=0)
                if len(done) == len(everything):
                    break
        assert {r.status for r in done} == {"succeeded"}
        for rid in everything:
            attempts = await store.query_attempts(rid)
            assert [a.status for a in attempts].count("succeeded") == 1
            if rid in claims:  # the one in flight died with the writer
                assert attempts[0].attempt_id == claims[rid] and attempts[0].status == "unresponsive"
                assert attempts[-1].status == "succeeded" and attempts[-1].worker_id == "survivor"


# ---------------------------------------------------------------------------------- claims


async def test_three_processes_dequeue_2000_rollouts_without_double_claims_or_losses(
    pg_dsn: str, children: Any
) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        ids: list[str] = []
        for batch in range(10):
            created = await store.enqueue_many_rollouts([{"input": batch * 200 + i} for i in range(200)])
            ids += [r.rollout_id for r in created]
        workers = [children("dequeue", pg_dsn, f"w{i}") for i in range(3)]
        for worker in workers:
            await worker.await_lines("ready")
        for worker in workers:
            worker.go()
        results = [(await worker.await_lines("claimed"))[0]["claimed"] for worker in workers]
        counts = Counter(rid for claimed in results for rid in claimed)
        assert len(ids) == 2000
        assert sorted(counts) == sorted(ids)  # no loss
        assert max(counts.values()) == 1  # no double claim
        assert all(len(claimed) > 0 for claimed in results), [len(c) for c in results]
        stats = await store.statistics()
        assert stats["queue_length"] == 0 and stats["total_attempts"] == 2000
        assert stats["rollouts"]["preparing"] == 2000


# ---------------------------------------------------------------------------------- wake-ups


async def test_a_change_in_another_process_wakes_wait_for_rollouts_within_a_second(
    pg_dsn: str, children: Any, record_property: pytest.RecordProperty
) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        started = await store.start_rollout("task")
        finisher = children("finish", pg_dsn, started.rollout_id)
        await finisher.await_lines("ready")
        woken: list[float] = []
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:

                async def waiter() -> None:
                    done = await store.wait_for_rollouts(rollout_ids=[started.rollout_id])  # no timeout
                    woken.append(time.time())
                    assert [r.status for r in done] == ["succeeded"]

                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                finisher.go()
                committed = (await finisher.await_lines("done"))[0]["done"]
        delay = woken[0] - committed
        record_property("cross_process_wake_s", delay)
        assert delay < 1.0


async def test_an_enqueue_in_another_process_wakes_a_long_poll_within_a_second(
    pg_dsn: str, children: Any, record_property: pytest.RecordProperty
) -> None:
    async with PostgresLightningStore(pg_dsn) as store:
        producer = children("enqueue", pg_dsn)
        await producer.await_lines("ready")
        with anyio.fail_after(HANG_GUARD):
            async with anyio.create_task_group() as tg:
                got: list[Any] = []

                async def poll() -> None:
                    got.append(await store.dequeue_rollout(worker_id="w", timeout=30))
                    got.append(time.time())

                tg.start_soon(poll)
                await anyio.wait_all_tasks_blocked()
                producer.go()
                line = (await producer.await_lines("done"))[0]
        assert got[0] is not None and got[0].rollout_id == line["rollout"]
        record_property("cross_process_long_poll_wake_s", got[1] - line["done"])
        assert got[1] - line["done"] < 1.0


# ---------------------------------------------------------------------------------- the watchdog


async def test_one_watchdog_per_database_and_another_takes_over_when_it_dies(
    pg_dsn: str, children: Any
) -> None:
    holders = [children("hold", pg_dsn) for _ in range(3)]
    for holder in holders:
        await holder.await_lines("open")
    # This store never runs the watchdog: what it sees ended, another process ended.
    async with PostgresLightningStore(pg_dsn, watchdog=False) as store:
        config = RolloutConfig(unresponsive_seconds=0.3)
        first = await store.start_rollout(1, config=config)
        with anyio.fail_after(HANG_GUARD):
            done = await store.wait_for_rollouts(rollout_ids=[first.rollout_id])
            assert [r.status for r in done] == ["failed"]
            leaders = [h for h in holders if any("leading" in line for line in h.lines)]
            assert len(leaders) == 1  # exactly one process of the database runs it
            leaders[0].popen.send_signal(signal.SIGKILL)
            leaders[0].stop()
            second = await store.start_rollout(2, config=config)
            done = await store.wait_for_rollouts(rollout_ids=[second.rollout_id])
        assert [r.status for r in done] == ["failed"]
        attempt = await store.get_latest_attempt(second.rollout_id)
        assert attempt is not None and attempt.status == "unresponsive"
        assert attempt.end_time is not None
        assert attempt.end_time - attempt.start_time == pytest.approx(0.3, abs=0.05)
        successors = [h for h in holders if h is not leaders[0] and any("leading" in x for x in h.lines)]
        assert len(successors) == 1


# ---------------------------------------------------------------------------------- serving


def _serve(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agl_async.cli", "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,  # a process group of its own, as a command run in a terminal
    )


def _endpoint_of(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on http://" in line, line
    return "http://" + line.split("http://", 1)[1].split()[0].rstrip(";,")


def _kill(process: subprocess.Popen[str]) -> None:
    """Whatever happened in the test: no server left (its workers die with it: PDEATHSIG)."""
    if process.poll() is None:
        process.kill()
        process.communicate(timeout=60)


def _stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        _kill(process)
    return process.returncode, out


async def test_two_serve_processes_on_one_database_serve_one_store(pg_dsn: str) -> None:
    from agl_async import LightningStoreClient

    servers = [_serve("--store", pg_dsn, "--port", "0") for _ in range(2)]
    try:
        endpoints = [await anyio.to_thread.run_sync(_endpoint_of, s) for s in servers]
        async with LightningStoreClient(endpoints[0]) as a, LightningStoreClient(endpoints[1]) as b:
            r = await a.enqueue_rollout({"q": 1})
            assert await b.get_rollout_by_id(r.rollout_id) == r
            with anyio.fail_after(HANG_GUARD):
                async with anyio.create_task_group() as tg:
                    done: list[Any] = []

                    async def wait_through_b() -> None:
                        done.extend(await b.wait_for_rollouts(rollout_ids=[r.rollout_id]))

                    tg.start_soon(wait_through_b)
                    claimed = await b.dequeue_rollout(worker_id="w", timeout=10)  # claimed through B
                    assert claimed is not None and claimed.rollout_id == r.rollout_id
                    assert await a.dequeue_rollout(worker_id="w2") is None  # A cannot claim it again
                    await a.update_attempt(r.rollout_id, claimed.attempt.attempt_id, status="succeeded")
            assert [x.status for x in done] == ["succeeded"]  # woken in B by a change through A
            assert (await a.statistics())["rollouts"] == (await b.statistics())["rollouts"]
    finally:
        for server in servers:
            code, out = _stop(server)
            assert code == 0, out


async def test_serve_workers_runs_n_processes_on_one_address(pg_dsn: str) -> None:
    import psutil

    from agl_async import LightningStoreClient

    server = _serve("--store", pg_dsn, "--port", "0", "--workers", "3")
    try:
        endpoint = await anyio.to_thread.run_sync(_endpoint_of, server)
        port = int(endpoint.rsplit(":", 1)[1])
        workers = psutil.Process(server.pid).children()
        assert len(workers) == 3
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(LightningStoreClient(endpoint)) for _ in range(30)]
            ids = [(await client.enqueue_rollout(i)).rollout_id for i, client in enumerate(clients)]
            # 30 kept-alive connections, spread by the kernel over the three processes
            serving = {
                w.pid
                for w in workers
                for c in w.net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
            }
            assert serving == {w.pid for w in workers}
            assert [r.rollout_id for r in await clients[-1].query_rollouts()] == ids  # one store
    finally:
        code, out = _stop(server)
    assert code == 0, out
    assert "servers stopped" in out


def test_ctrl_c_stops_every_worker_cleanly(pg_dsn: str) -> None:
    import psutil

    server = _serve("--store", pg_dsn, "--port", "0", "--workers", "2")
    try:
        _endpoint_of(server)
        workers = psutil.Process(server.pid).children()
        os.killpg(server.pid, signal.SIGINT)  # what a Ctrl-C in the terminal sends: the whole group
        out, _ = server.communicate(timeout=60)
    finally:
        _kill(server)
    assert server.returncode == 0, out
    assert "SIGINT received, stopping the servers" in out and "servers stopped" in out
    assert "error" not in out
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_a_worker_that_dies_stops_the_others(pg_dsn: str) -> None:
    import psutil

    server = _serve("--store", pg_dsn, "--port", "0", "--workers", "2")
    try:
        _endpoint_of(server)
        first, second = psutil.Process(server.pid).children()
        first.kill()
        out, _ = server.communicate(timeout=60)
    finally:
        _kill(server)
    assert server.returncode == 1, out
    assert f"store server process {first.pid} exited with code -9; stopped the others" in out
    second.wait(timeout=30)


def test_serve_refuses_workers_for_a_store_of_one_process() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agl_async.cli", "serve", "--store", "memory://", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "--workers 2 needs a store that several processes can share" in out.stderr


def test_serve_refuses_an_unknown_store_url() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "agl_async.cli", "serve", "--store", "mongodb://x/y"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "mongodb://" in out.stderr and "--store" in out.stderr


# ---------------------------------------------------------------------------------- training


async def _double(task: int, resources: dict[str, Any]) -> float:
    """Module level, so that it pickles into runner processes."""
    return float(task * 2)


@pytest.mark.parametrize("mode", ["shm", "cs"])
def test_a_training_run_on_a_postgres_url_leaves_its_results_in_the_database(pg_dsn: str, mode: str) -> None:
    from agl_async import Trainer
    from agl_async.testing import free_port

    strategy: Any = (
        "shm" if mode == "shm" else {"type": "cs", "server_host": "127.0.0.1", "server_port": free_port()}
    )
    trainer = Trainer(strategy=strategy, store=pg_dsn, n_runners=2)
    assert isinstance(trainer.store, PostgresLightningStore)
    trainer.fit(_double, train_dataset=[1, 2, 3])

    async def read() -> list[float]:
        async with PostgresLightningStore(pg_dsn) as store:  # another store: the database has it all
            rollouts = await store.query_rollouts(status_in=["succeeded"])
            return sorted(r.metadata["reward"] for r in rollouts)

    assert anyio.run(read) == [2.0, 4.0, 6.0]
