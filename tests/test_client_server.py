"""ClientServerExecutionStrategy: contract section 3 with real (spawned) child processes.

Runner bundles live in ``tests/bundles.py`` so that spawned children can import them. Every
test checks that no descendant process outlives it (runners, the algorithm child,
aiomultiprocess's manager, the resource tracker). Timeouts are short so that each escalation
step is actually reached; assertions on time are hang guards only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from typing import Any

import aiomultiprocess.core
import anyio
import bundles
import psutil
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from agl_async import (
    ClientServerExecutionStrategy,
    ExecutionEvent,
    InMemoryLightningStore,
    LightningStore,
    LightningStoreClient,
    LightningStoreServer,
)
from agl_async.execution.registry import resolve_strategy

pytestmark = pytest.mark.anyio

GUARD = 60.0
FAST = {"graceful_timeout": 0.5, "terminate_timeout": 0.5}


@pytest.fixture(autouse=True)
def _every_test_leaves_no_process(no_leftover_processes: None) -> None:
    """Every test gets tests/conftest.py's ``no_leftover_processes`` check."""


def cs(**kwargs: Any) -> ClientServerExecutionStrategy:
    kwargs.setdefault("server_host", "127.0.0.1")
    kwargs.setdefault("server_port", 0)
    return ClientServerExecutionStrategy(**{**FAST, **kwargs})


async def _statuses(store: LightningStore) -> dict[str, int]:
    stats = await store.statistics()
    return {k: v for k, v in stats["rollouts"].items() if v}


# ---------------------------------------------------------------------------- construction
def test_defaults_are_public_attributes() -> None:
    s = ClientServerExecutionStrategy()
    assert (s.role, s.server_host, s.server_port, s.n_runners) == ("both", "localhost", 4747, 1)
    assert (s.graceful_timeout, s.terminate_timeout, s.main_process) == (10.0, 10.0, "algorithm")
    assert s.managed_store is True and s.allowed_exit_codes == (0, -15)


def test_settings_come_from_the_environment_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGL_CURRENT_ROLE", "runner")
    monkeypatch.setenv("AGL_SERVER_HOST", "10.0.0.7")
    monkeypatch.setenv("AGL_SERVER_PORT", "5151")
    monkeypatch.setenv("AGL_MANAGED_STORE", "0")
    s = ClientServerExecutionStrategy()
    assert (s.role, s.server_host, s.server_port, s.managed_store) == ("runner", "10.0.0.7", 5151, False)
    s = ClientServerExecutionStrategy(role="algorithm", server_host="h", server_port=1, managed_store=True)
    assert (s.role, s.server_host, s.server_port, s.managed_store) == ("algorithm", "h", 1, True)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("AGL_CURRENT_ROLE", "trainer"),
        ("AGL_SERVER_PORT", "http"),
        ("AGL_SERVER_PORT", "70000"),
        ("AGL_MANAGED_STORE", "maybe"),
    ],
)
def test_bad_environment_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str
) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        ClientServerExecutionStrategy()


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="role"):
        ClientServerExecutionStrategy(role="trainer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_runners == 1"):
        ClientServerExecutionStrategy(main_process="runner", n_runners=2)
    with pytest.raises(ValueError, match="role='both'"):
        ClientServerExecutionStrategy(main_process="runner", role="algorithm")
    with pytest.raises(ValueError, match="main_process"):
        ClientServerExecutionStrategy(main_process="server")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="graceful_timeout"):
        ClientServerExecutionStrategy(graceful_timeout=-1)
    with pytest.raises(ValueError, match="n_runners"):
        ClientServerExecutionStrategy(n_runners=0)


def test_alias_and_dict_resolve() -> None:
    built = resolve_strategy({"type": "cs", "role": "runner"}, n_runners=3)
    assert isinstance(built, ClientServerExecutionStrategy)
    assert (built.role, built.n_runners) == ("runner", 3)
    assert isinstance(resolve_strategy("cs"), ClientServerExecutionStrategy)


# ---------------------------------------------------------------------------- role "both"
async def test_both_runs_the_workload_in_runner_processes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agl_async")
    store = InMemoryLightningStore()
    with anyio.fail_after(GUARD):
        await cs(n_runners=2, graceful_timeout=GUARD).execute(
            bundles.algorithm_enqueueing(10), bundles.runner_processes, store
        )
    assert await _statuses(store) == {"succeeded": 10}
    pids = {int((w.heartbeat_stats or {})["pid"]) for w in await store.query_workers()}
    assert len(pids) == 2 and os.getpid() not in pids  # two separate runner processes
    assert {w.worker_id for w in await store.query_workers()} == {0, 1}
    text = caplog.text
    for line in ("spawned runner-0", "spawned runner-1", "stopping runner-", "exited with code 0"):
        assert line in text
    assert "escalating" not in text  # cooperative runners: the event was enough


async def test_idle_runners_in_a_long_poll_stop_when_the_algorithm_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The server answers the runners' long polls as soon as the algorithm returns, so idle
    runners see the event at once: no escalation, although their polls would last an hour."""
    caplog.set_level(logging.INFO, logger="agl_async")
    with anyio.fail_after(GUARD):
        await cs(n_runners=2, graceful_timeout=20).execute(
            bundles.algorithm_ready(2), bundles.runner_long_polls, InMemoryLightningStore()
        )
    assert "exited with code 0" in caplog.text
    assert "escalating" not in caplog.text


async def test_server_stays_up_until_the_runners_are_gone() -> None:
    store = InMemoryLightningStore()
    with anyio.fail_after(GUARD):
        await cs(n_runners=2, graceful_timeout=GUARD).execute(
            bundles.algorithm_ready(2), bundles.runner_uses_store_after_event, store
        )
    # the runners kept calling the store after the event, and exited 0 (no refused connection)
    assert all((w.heartbeat_stats or {}).get("after") for w in await store.query_workers())


async def test_event_set_in_a_runner_process_reaches_the_algorithm() -> None:
    with anyio.fail_after(GUARD):
        await cs().execute(
            bundles.algorithm_waits_for_event, bundles.runner_sets_event, InMemoryLightningStore()
        )


@pytest.mark.parametrize(
    ("runner", "last_step", "code"),
    [
        (bundles.runner_ignores_event, "SIGINT", 0),
        (bundles.runner_ignores_sigint, "terminate()", -15),
        (bundles.runner_ignores_sigterm, "kill()", -9),
    ],
    ids=["ignores-event", "ignores-sigint", "ignores-sigterm"],
)
async def test_each_escalation_step(
    caplog: pytest.LogCaptureFixture, runner: Any, last_step: str, code: int
) -> None:
    caplog.set_level(logging.INFO, logger="agl_async")
    steps = ["SIGINT", "terminate()", "kill()"]
    # A SIGINT is handled by the child's own loop (a cancellation): give that step all the time it
    # may need on a loaded machine. SIGTERM/SIGKILL act in the kernel: 0.5 s is plenty.
    strategy = cs(terminate_timeout=GUARD if last_step == "SIGINT" else 0.5)
    with anyio.fail_after(2 * GUARD):
        if code in (0, -15):
            await strategy.execute(bundles.algorithm_ready(1), runner, InMemoryLightningStore())
        else:
            with pytest.raises(RuntimeError, match=r"runner-0 \(pid \d+\) exited with code -9"):
                await strategy.execute(bundles.algorithm_ready(1), runner, InMemoryLightningStore())
    text = caplog.text
    for step in steps[: steps.index(last_step) + 1]:
        assert f"escalating to {step}" in text
    for step in steps[steps.index(last_step) + 1 :]:
        assert f"escalating to {step}" not in text
    assert f"exited with code {code}" in text


async def test_runner_dying_stops_the_run_with_runtime_error_naming_it() -> None:
    with (
        anyio.fail_after(GUARD),
        pytest.raises(RuntimeError, match=r"runner-1 \(pid \d+\) exited with code 3"),
    ):
        await cs(n_runners=2).execute(
            bundles.algorithm_waits_for_event, bundles.runner_exits_3, InMemoryLightningStore()
        )


async def test_runner_raising_exits_1_and_fails_the_run() -> None:
    with (
        anyio.fail_after(GUARD),
        pytest.raises(RuntimeError, match=r"runner-0 \(pid \d+\) exited with code 1"),
    ):
        await cs().execute(bundles.algorithm_waits_for_event, bundles.runner_raises, InMemoryLightningStore())


async def test_allowed_exit_codes_are_configurable() -> None:
    with anyio.fail_after(GUARD):
        await cs(n_runners=2, allowed_exit_codes=(0, 3)).execute(
            bundles.algorithm_ready(2), bundles.runner_exits_3, InMemoryLightningStore()
        )


async def test_algorithm_error_propagates_as_itself_over_exit_code_failures() -> None:
    with anyio.fail_after(GUARD), pytest.raises(ValueError, match="algorithm failed on purpose"):
        await cs(graceful_timeout=0.2, terminate_timeout=0.2).execute(
            bundles.algorithm_raises, bundles.runner_ignores_sigterm, InMemoryLightningStore()
        )


async def test_unmanaged_store_itself_goes_to_the_runner_processes() -> None:
    store = InMemoryLightningStore()
    await store.enqueue_rollout(input="before the run")
    given: list[LightningStore] = []

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:  # runs here: may be local
        given.append(store)
        await event.wait()

    with anyio.fail_after(GUARD):
        await cs(managed_store=False).execute(algorithm, bundles.runner_checks_unmanaged_store, store)
    assert given == [store] and given[0] is store  # no server in between: the store itself


async def test_unpicklable_bundles_fail_before_anything_is_spawned() -> None:
    async def local_runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        pass

    with pytest.raises(TypeError, match="module level"):
        await cs().execute(bundles.algorithm_waits_for_event, local_runner, InMemoryLightningStore())

    class LocalStore(InMemoryLightningStore):
        pass

    with pytest.raises(TypeError, match="managed_store=False"):
        await cs(managed_store=False).execute(
            bundles.algorithm_waits_for_event, bundles.runner_sets_event, LocalStore()
        )
    with pytest.raises(TypeError, match="module level"):
        await cs(main_process="runner").execute(
            local_runner, bundles.runner_sets_event, InMemoryLightningStore()
        )  # type: ignore[arg-type]


@pytest.mark.parametrize("main_process", ["algorithm", "runner"])
async def test_port_in_use_fails_fast_naming_the_port(main_process: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with anyio.fail_after(GUARD), pytest.raises(OSError, match=str(port)):
            await cs(server_port=port, main_process=main_process).execute(
                bundles.algorithm_waits_for_event, bundles.runner_sets_event, InMemoryLightningStore()
            )
    assert aiomultiprocess.core._manager is None  # nothing was spawned


async def test_caller_cancellation_shuts_down_then_propagates(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agl_async")
    ready = anyio.Event()

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:  # runs here: may be local
        await bundles.wait_ready(store, 2)
        ready.set()
        await event.wait()  # cooperative: returns once the cancellation has set the event

    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(
                    cs(n_runners=2, graceful_timeout=GUARD).execute,
                    algorithm,
                    bundles.runner_until_event,
                    InMemoryLightningStore(),
                )
                await ready.wait()
                scope.cancel()
    assert scope.cancelled_caught
    assert caplog.text.count("exited with code 0") == 2  # the runners stopped on the event
    assert "escalating" not in caplog.text


# ---------------------------------------------------------------------------- main_process="runner"
async def test_main_process_runner_runs_the_runner_here_and_the_algorithm_in_a_child() -> None:
    done: list[str] = []

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        assert isinstance(store, LightningStoreClient)
        while len(done) < 5:
            attempted = await store.dequeue_rollout(worker_id=worker_id, timeout=GUARD)
            assert attempted is not None
            await store.update_attempt(attempted.rollout_id, attempted.attempt.attempt_id, status="succeeded")
            done.append(attempted.rollout_id)

    store = InMemoryLightningStore()
    with anyio.fail_after(GUARD):
        await cs(main_process="runner").execute(bundles.algorithm_enqueueing(5), runner, store)
    assert len(set(done)) == 5
    assert await store.query_rollouts() == []  # the child worked on its own copy of the store


async def test_main_process_runner_the_child_serves_until_the_runner_here_is_done() -> None:
    # the runner keeps calling the store after the algorithm returned: the child must still serve
    with anyio.fail_after(GUARD):
        await cs(main_process="runner", graceful_timeout=GUARD).execute(
            bundles.algorithm_ready(1), bundles.runner_uses_store_after_event, InMemoryLightningStore()
        )  # (a grace shorter than the client's retries would cancel a runner that lost its server)


async def test_main_process_runner_algorithm_child_failing_stops_the_runner() -> None:
    stopped: list[bool] = []

    async def runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await event.wait()
        stopped.append(True)

    with (
        anyio.fail_after(GUARD),
        pytest.raises(RuntimeError, match=r"algorithm \(pid \d+\) exited with code 1"),
    ):
        await cs(main_process="runner").execute(bundles.algorithm_raises, runner, InMemoryLightningStore())
    assert stopped in ([True], [])  # it stopped on the event (or never started: the server never came up)


# ---------------------------------------------------------------------------- roles "runner" / "algorithm"
@pytest.mark.parametrize("n_runners", [1, 2])
async def test_role_runner_against_a_separately_started_server(n_runners: int) -> None:
    store = InMemoryLightningStore()
    async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server:
        await store.enqueue_many_rollouts([{"input": i} for i in range(6)])
        strategy = cs(role="runner", server_port=server.port, n_runners=n_runners)
        with anyio.fail_after(GUARD):
            await strategy.execute(bundles.algorithm_raises, bundles.runner_drains, InMemoryLightningStore())
    assert await _statuses(store) == {"succeeded": 6}
    workers = await store.query_workers()
    assert {w.worker_id for w in workers} == set(range(n_runners))
    pids = {int((w.heartbeat_stats or {})["pid"]) for w in workers}
    if n_runners == 1:
        assert pids == {os.getpid()}  # one runner runs in this process
    else:
        assert len(pids) == n_runners and os.getpid() not in pids  # one process each


async def test_role_runner_child_crash_is_a_runtime_error_naming_it() -> None:
    async with LightningStoreServer(
        InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token=""
    ) as server:
        strategy = cs(role="runner", server_port=server.port, n_runners=2)
        with (
            anyio.fail_after(GUARD),
            pytest.raises(RuntimeError, match=r"runner-1 \(pid \d+\) exited with code 3"),
        ):
            await strategy.execute(bundles.algorithm_raises, bundles.runner_exits_3, InMemoryLightningStore())


async def test_role_runner_cancelled_shuts_its_processes_down() -> None:
    store = InMemoryLightningStore()
    async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server:
        strategy = cs(role="runner", server_port=server.port, n_runners=2)
        with anyio.fail_after(GUARD):
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(
                        strategy.execute, bundles.algorithm_raises, bundles.runner_until_event, store
                    )
                    await bundles.wait_ready(store, 2)
                    scope.cancel()
    assert scope.cancelled_caught


async def test_role_algorithm_serves_the_store_while_the_algorithm_runs() -> None:
    seen: list[Any] = []

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        assert isinstance(store, LightningStoreServer)
        async with LightningStoreClient(store.endpoint, auth_token="") as client:
            rollout = await client.enqueue_rollout(input="over http")
        seen.append(await store.get_rollout_by_id(rollout.rollout_id))

    store = InMemoryLightningStore()
    with anyio.fail_after(GUARD):
        await cs(role="algorithm").execute(algorithm, bundles.runner_raises, store)
    assert seen and seen[0].input == "over http"
    assert len(await store.query_rollouts()) == 1


# ---------------------------------------------------------------------------- blocking run() and Ctrl-C
def test_sigint_to_the_parent_of_run_shuts_down_then_raises_keyboard_interrupt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="agl_async")

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:  # runs in this process
        await bundles.wait_ready(store, 2)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
        await event.wait()

    with pytest.raises(KeyboardInterrupt):
        cs(n_runners=2, graceful_timeout=GUARD).run(
            algorithm, bundles.runner_until_event, InMemoryLightningStore()
        )
    assert caplog.text.count("exited with code 0") == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_serving_roles_say_they_need_asyncio() -> None:
    with pytest.raises(RuntimeError, match="needs asyncio"):
        await cs().execute(
            bundles.algorithm_waits_for_event, bundles.runner_sets_event, InMemoryLightningStore()
        )


async def test_spawn_failure_stops_the_children_already_started(monkeypatch: pytest.MonkeyPatch) -> None:
    from agl_async.execution import client_server, processes

    def spawn_one_then_fail(specs: Any, into: list[Any], lifeline: Any) -> None:
        processes.spawn(specs[:1], into, lifeline)
        raise OSError("cannot start runner-1 (simulated)")

    monkeypatch.setattr(client_server, "spawn", spawn_one_then_fail)
    ran: list[str] = []

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        ran.append("algorithm")

    with anyio.fail_after(GUARD), pytest.raises(OSError, match="simulated"):
        await cs(n_runners=2).execute(algorithm, bundles.runner_until_event, InMemoryLightningStore())
    assert ran == []  # nothing runs once spawning has failed; runner-0 was stopped (no leftovers)


PARENT_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import anyio, bundles
from agl_async import ClientServerExecutionStrategy, InMemoryLightningStore

async def algorithm(store, event):
    await bundles.wait_ready(store, 2)
    print("READY", flush=True)
    await anyio.sleep_forever()

ClientServerExecutionStrategy(server_host="127.0.0.1", server_port=0, n_runners=2).run(
    algorithm, bundles.runner_ignores_event, InMemoryLightningStore()
)
"""


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # dead, waiting for a reaper that is not us
    except psutil.NoSuchProcess:
        return True


async def test_children_exit_by_themselves_when_the_parent_is_killed() -> None:
    script = PARENT_SCRIPT.format(tests=os.path.dirname(__file__))
    parent = await anyio.open_process([sys.executable, "-c", script], stderr=None)
    try:
        assert parent.stdout is not None
        with anyio.fail_after(GUARD):
            line = await BufferedByteReceiveStream(parent.stdout).receive_until(b"\n", 1000)
        assert line.strip() == b"READY"
        descendants = psutil.Process(parent.pid).children(recursive=True)
        assert len(descendants) >= 2  # the two runners (and the resource tracker)
    finally:
        parent.kill()  # no shutdown at all: SIGKILL
        with anyio.CancelScope(shield=True):
            await parent.aclose()
    with anyio.fail_after(GUARD):
        # another process's children: nothing to await but their state (polled, bounded)
        while not all(_gone(p) for p in descendants):  # noqa: ASYNC110
            await anyio.sleep(0.05)
