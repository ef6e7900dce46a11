"""ExecutionEvent: the in-process (threads) and the cross-process (pipe) implementations."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import threading
from collections.abc import Iterator

import anyio
import pytest
from conftest import BOTH_BACKENDS

from agl_async import ExecutionEvent
from agl_async.execution.events import ProcessExecutionEvent, ThreadingExecutionEvent
from agl_async.execution.processes import MultiprocessingHelpers

pytestmark = pytest.mark.anyio

GUARD = 30.0
KINDS = [ThreadingExecutionEvent, ProcessExecutionEvent]


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=KINDS, ids=lambda k: k.__name__)
def event(request: pytest.FixtureRequest) -> Iterator[ExecutionEvent]:
    made: ExecutionEvent = request.param()
    yield made
    if isinstance(made, ProcessExecutionEvent):
        made.close()  # not left to GC: a later test counting descriptors would see them vanish


def _no_polling_timer() -> bool:
    """True when the running loop has no timed wake-up pending within the next seconds (the only
    timer allowed is the test's own hang guard, GUARD seconds away): nobody is polling."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        import trio

        return trio.lowlevel.current_statistics().seconds_to_next_deadline > GUARD / 2
    timers = [h.when() for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    return all(when - loop.time() > GUARD / 2 for when in timers)


def _open_fds() -> int | None:
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None


async def test_implementations_satisfy_the_protocol(event: ExecutionEvent) -> None:
    assert isinstance(event, ExecutionEvent)


async def test_set_is_idempotent_and_wait_returns_once_set(event: ExecutionEvent) -> None:
    assert not event.is_set()
    event.set()
    event.set()
    assert event.is_set()
    with anyio.fail_after(GUARD):
        await event.wait()
        await event.wait()


async def test_set_from_another_thread_wakes_every_waiter_without_polling(event: ExecutionEvent) -> None:
    woken: list[int] = []
    release = threading.Event()

    async def waiter(i: int) -> None:
        await event.wait()
        woken.append(i)

    def setter() -> None:
        release.wait(GUARD)
        event.set()

    thread = threading.Thread(target=setter)
    thread.start()
    try:
        with anyio.fail_after(GUARD):
            async with anyio.create_task_group() as tg:
                for i in range(5):
                    tg.start_soon(waiter, i)
                await anyio.wait_all_tasks_blocked()
                assert _no_polling_timer(), "wait() must park, not poll the loop"
                assert woken == []
                release.set()
    finally:
        release.set()
        thread.join()
    assert sorted(woken) == list(range(5))


async def test_wait_is_cancellable_and_leaves_nothing_behind(event: ExecutionEvent) -> None:
    fds_before = _open_fds()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(event.wait)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    assert scope.cancelled_caught
    assert not event.is_set()
    if isinstance(event, ThreadingExecutionEvent):
        assert not event._waiters
    if fds_before is not None:
        assert _open_fds() == fds_before  # the waiter's duplicate is closed
    event.set()
    with anyio.fail_after(GUARD):
        await event.wait()


async def test_threading_event_does_not_pickle() -> None:
    with pytest.raises(TypeError, match="process boundary"):
        pickle.dumps(ThreadingExecutionEvent())


async def test_process_event_pickles_only_while_spawning() -> None:
    with pytest.raises(RuntimeError, match="inheritance"):
        pickle.dumps(ProcessExecutionEvent())


async def test_process_event_close_keeps_the_state_and_releases_descriptors() -> None:
    set_event, unset_event = ProcessExecutionEvent(), ProcessExecutionEvent()
    set_event.set()
    set_event.close()
    unset_event.close()
    set_event.close()  # idempotent
    assert set_event.is_set() and not unset_event.is_set()
    with anyio.fail_after(GUARD):
        await set_event.wait()
    unset_event.set()  # only local state now
    assert unset_event.is_set()


# ---------------------------------------------------------------------------- across processes
@pytest.fixture
def spawn_helpers(no_leftover_processes: None) -> Iterator[None]:
    """Spawning starts multiprocessing's resource tracker: stop it again (when these tests
    started it); tests/conftest.py's ``no_leftover_processes`` checks that no child is left."""
    MultiprocessingHelpers.acquire()
    try:
        yield
    finally:
        MultiprocessingHelpers.release()


def _child_sets(event: ProcessExecutionEvent) -> None:
    event.set()


def _child_waits(event: ProcessExecutionEvent, seen: ProcessExecutionEvent) -> None:
    async def main() -> None:
        with anyio.fail_after(GUARD):
            await event.wait()
        seen.set()

    anyio.run(main)


@pytest.mark.usefixtures("spawn_helpers")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_process_event_set_in_a_spawned_child_wakes_the_parent() -> None:
    event = ProcessExecutionEvent()
    child = multiprocessing.get_context("spawn").Process(target=_child_sets, args=(event,))
    child.start()
    try:
        with anyio.fail_after(GUARD):
            await event.wait()
        assert event.is_set()
    finally:
        await anyio.to_thread.run_sync(child.join, GUARD)
        event.close()
    assert child.exitcode == 0


@pytest.mark.usefixtures("spawn_helpers")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_process_event_set_in_the_parent_wakes_a_waiting_child() -> None:
    event, seen = ProcessExecutionEvent(), ProcessExecutionEvent()
    child = multiprocessing.get_context("spawn").Process(target=_child_waits, args=(event, seen))
    child.start()
    try:
        event.set()
        with anyio.fail_after(GUARD):
            await seen.wait()
    finally:
        await anyio.to_thread.run_sync(child.join, GUARD)
        event.close()
        seen.close()
    assert child.exitcode == 0
