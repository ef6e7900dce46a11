"""RayExecutionStrategy and ``agl-async runner --ray``: contract section 10 on a real local Ray cluster.

Marked ``ray`` and skipped where Ray is not installed (the default test session); ``nox -s ray``
runs them. The first test lets the strategy start (and shut down) Ray itself and checks that no
Ray process outlives the run; the others share one local Ray instance started by a module
fixture (starting Ray takes seconds) and check after each test that no runner actor process is
left. Bundles and agents pickle by value (the Ray workers do not have ``tests/`` on their path).

Timeouts are short so that each escalation step is reached; assertions on time are hang guards.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra (nox -s ray)")

import bundles  # noqa: E402

from agl_async import ExecutionEvent, InMemoryLightningStore, LightningStore, RolloutConfig  # noqa: E402
from agl_async.algorithm import Baseline  # noqa: E402
from agl_async.execution.ray import RayExecutionStrategy  # noqa: E402
from agl_async.execution.registry import resolve_strategy  # noqa: E402
from agl_async.trainer import REWARD_SPAN_NAME, Trainer  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.anyio]

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
ray.cloudpickle.register_pickle_by_value(bundles)

GUARD = 90.0
FAST = {"graceful_timeout": 0.5, "terminate_timeout": 2.0}
TESTS_DIR = Path(__file__).parent


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _ray_processes(*markers: str) -> list[tuple[int, str]]:
    """Live processes whose command line contains one of ``markers``."""
    found = []
    for p in psutil.process_iter():
        cmd = _cmd(p)
        try:
            alive = p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            alive = False
        if alive and any(m in cmd for m in markers):
            found.append((p.pid, cmd[:120]))
    return found


def _wait_gone(*markers: str, within: float = 10.0) -> list[tuple[int, str]]:
    """Ray reaps killed workers asynchronously: give it ``within`` seconds."""
    deadline = time.monotonic() + within
    while (left := _ray_processes(*markers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


CLUSTER_PROCESSES = ("raylet", "gcs_server", "ray::", "ray/dashboard", "ray/_private/log_monitor")
RUNNER_ACTOR = "ray::RunnerActor"


# ---------------------------------------------------------------------------- agents and bundles
async def quick_agent(task: Any, resources: dict[str, Any]) -> float:
    await anyio.sleep(0.01)
    return float(task)


async def slow_agent(task: Any, resources: dict[str, Any]) -> float:
    """Long enough to be killed mid-rollout; heart-beats keep the attempt alive meanwhile."""
    await anyio.sleep(0.8)
    return float(task)


async def runner_records_its_actor(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Announce itself with what Ray assigned to its actor, then wait for the event."""
    context = ray.get_runtime_context()
    await store.update_worker(
        worker_id,
        heartbeat_stats={
            "ready": True,
            "pid": os.getpid(),
            "resources": context.get_assigned_resources(),
            "actor": context.get_actor_name(),
            "request_timeout": getattr(store, "request_timeout", None),
        },
    )
    await event.wait()


async def runner_ignores_event(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Worker 0 ends only by cancellation (records it); worker 1 is deaf to cancellation too."""
    await bundles.announce(store, worker_id)
    if worker_id == 0:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await store.update_worker(worker_id, heartbeat_stats={"cancelled": True})
    deadline = time.monotonic() + GUARD
    while time.monotonic() < deadline:  # swallows cancellations (a shield does not stop asyncio's)
        try:
            await anyio.sleep(deadline - time.monotonic())
        except anyio.get_cancelled_exc_class():
            continue


class RunnerError(Exception):
    """A test's own exception type: it must come back as itself, not as Ray's wrapper."""


async def runner_raises(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    await bundles.announce(store, worker_id)
    if worker_id == 1:
        raise RunnerError(f"runner {worker_id} failed on purpose")
    await event.wait()


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture
def agl_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AGL_SERVER_HOST", "AGL_SERVER_TOKEN", "AGL_MANAGED_STORE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for the tests that do not test Ray's own start and stop."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture
def shared_ray(ray_cluster: str, agl_env: None) -> Iterator[str]:
    """The module's Ray instance; after the test, no runner actor process may be left."""
    yield ray_cluster
    assert _wait_gone(RUNNER_ACTOR) == [], "runner actor processes outlived the run"
    named = ray.util.list_named_actors(all_namespaces=True)
    assert [a for a in named if a["name"].startswith("agl-async-")] == []


def strategy(n_runners: int = 2, **kwargs: Any) -> RayExecutionStrategy:
    return RayExecutionStrategy(n_runners, **{**FAST, **kwargs})


# ---------------------------------------------------------------------------- Ray's own lifecycle
async def test_training_run_with_runner_actors_leaves_no_ray_process(
    agl_env: None, no_leftover_processes: None
) -> None:
    """Runs first: the strategy starts a local Ray itself, and everything it started is gone
    afterwards (the raylet, the GCS, the workers, the actors)."""
    if ray.is_initialized() or _ray_processes("raylet", "gcs_server"):
        pytest.fail("a Ray instance is already running: this test must start its own")
    trainer = Trainer(strategy="ray", n_runners=2, train_dataset=list(range(12)), agent=quick_agent)
    assert isinstance(trainer.strategy, RayExecutionStrategy)
    with anyio.fail_after(GUARD):
        await trainer.arun()
    rollouts = await trainer.store.query_rollouts()
    assert len(rollouts) == 12 and {r.status for r in rollouts} == {"succeeded"}
    workers = {a.worker_id for r in rollouts for a in await trainer.store.query_attempts(r.rollout_id)}
    assert len(workers) >= 1
    assert not ray.is_initialized()
    assert _wait_gone(*CLUSTER_PROCESSES) == []


def test_alias_and_dict_resolve_to_the_ray_strategy() -> None:
    s = resolve_strategy({"type": "ray", "runner_options": {"num_cpus": 1}, "max_restarts": 2}, n_runners=3)
    assert isinstance(s, RayExecutionStrategy)
    assert (s.n_runners, s.runner_options, s.max_restarts, s.server_port) == (3, {"num_cpus": 1}, 2, 0)
    assert isinstance(resolve_strategy("ray"), RayExecutionStrategy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_runners": 0}, "n_runners"),
        ({"max_restarts": -2}, "max_restarts"),
        ({"server_port": 70000}, "server_port"),
        ({"graceful_timeout": -1}, "graceful_timeout"),
        ({"runner_options": {"num_cpu": 1}}, "num_cpu"),
        ({"runner_options": {"max_restarts": 3}}, "max_restarts="),
        ({"runner_options": [("num_cpus", 1)]}, "mapping"),
        ({"client_options": {"endpoint": "x"}}, "client_options may not set endpoint"),
        ({"server_options": {"auth_token": "x"}}, "server_options may not set auth_token"),
        ({"client_options": {"verify": False}}, "client_options may not set verify"),
        ({"verify": "/no/such/ca.pem"}, "does not exist"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RayExecutionStrategy(**kwargs)


async def test_an_unpicklable_runner_fails_before_anything_starts(agl_env: None) -> None:
    import threading

    class Unpicklable:
        def __init__(self) -> None:
            self.lock = threading.Lock()

        async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
            pass

    with pytest.raises(TypeError, match="runner bundle must pickle"):
        await strategy(1).execute(bundles.algorithm_waits_for_event, Unpicklable(), InMemoryLightningStore())
    assert not ray.is_initialized()


def test_needs_asyncio(agl_env: None) -> None:
    async def under_trio() -> None:
        await strategy(1).execute(
            bundles.algorithm_waits_for_event, bundles.runner_until_event, InMemoryLightningStore()
        )

    with pytest.raises(RuntimeError, match="needs asyncio"):
        anyio.run(under_trio, backend="trio")
    assert not ray.is_initialized()


# ---------------------------------------------------------------------------- on a shared cluster
async def test_actors_get_runner_and_client_options_and_the_event_reaches_them(shared_ray: str) -> None:
    """Each actor is created with runner_options; the algorithm returning stops every runner."""
    store = InMemoryLightningStore()
    s = strategy(2, runner_options={"num_cpus": 1}, client_options={"request_timeout": 7.5})
    with anyio.fail_after(GUARD):
        await s.execute(bundles.algorithm_ready(2), runner_records_its_actor, store)
    stats = [w.heartbeat_stats or {} for w in await store.query_workers()]
    assert sorted(w["resources"].get("CPU") for w in stats) == [1.0, 1.0]
    assert all(w["actor"].startswith("agl-async-") for w in stats)
    assert len({w["pid"] for w in stats}) == 2
    assert [w["request_timeout"] for w in stats] == [7.5, 7.5]  # client_options reach the actors
    assert s.server_endpoint is None  # only set while a run is going


async def test_loopback_cluster_gets_a_loopback_server_without_token(shared_ray: str) -> None:
    """On a one-machine cluster the server binds 127.0.0.1 and needs no token."""
    s = strategy(1)
    seen: dict[str, Any] = {}

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        seen["endpoint"], seen["token"] = s.server_endpoint, s.server_token
        await bundles.wait_ready(store, 1)

    with anyio.fail_after(GUARD):
        await s.execute(algorithm, bundles.runner_until_event, InMemoryLightningStore())
    assert seen["endpoint"].startswith("http://127.0.0.1:") and seen["token"] is None


async def test_a_wildcard_bind_advertises_the_node_address_and_requires_a_run_token(shared_ray: str) -> None:
    """server_host="0.0.0.0": the actors are told this node's address, and the server requires a
    token generated for the run (only the actors have it)."""
    import httpx

    s = strategy(1, server_host="0.0.0.0")
    seen: dict[str, Any] = {}

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        await bundles.wait_ready(store, 1)  # the actor got in: it was given the token
        seen["endpoint"], seen["token"] = s.server_endpoint, s.server_token
        async with httpx.AsyncClient() as http:
            seen["anonymous"] = (await http.post(f"{s.server_endpoint}/v1/statistics", json={})).status_code

    with anyio.fail_after(GUARD):
        await s.execute(algorithm, bundles.runner_until_event, InMemoryLightningStore())
    node = ray.util.get_node_ip_address()
    assert seen["endpoint"].startswith(f"http://{node}:")
    assert seen["token"] and len(seen["token"]) >= 32
    assert seen["anonymous"] == 401


async def test_port_in_use_fails_fast_naming_it_and_places_no_actor(shared_ray: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=str(port)):
            await strategy(1, server_port=port).execute(
                bundles.algorithm_waits_for_event, bundles.runner_until_event, InMemoryLightningStore()
            )
    assert [n for n in ray.util.list_named_actors() if n.startswith("agl-async-")] == []


async def test_https_server_with_the_ca_given_to_the_actors(shared_ray: str, tls_files: Any) -> None:
    """Section 9 on Ray: the server serves HTTPS with its certificate, and the actors verify it
    with the CA path they are given (an actor that could not would never announce itself)."""
    s = strategy(1, ssl_certfile=tls_files.cert, ssl_keyfile=tls_files.key, verify=str(tls_files.ca))
    seen: dict[str, Any] = {}

    async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
        seen["endpoint"] = s.server_endpoint
        await bundles.wait_ready(store, 1)

    with anyio.fail_after(GUARD):
        await s.execute(algorithm, bundles.runner_until_event, InMemoryLightningStore())
    assert seen["endpoint"].startswith("https://127.0.0.1:")


async def test_unmanaged_store_itself_goes_to_the_actors(shared_ray: str) -> None:
    """managed_store=False: no server of the strategy; the store (here a client of a server the
    test runs) is pickled to the actors and handed to the algorithm as it is."""
    from agl_async import LightningStoreClient, LightningStoreServer

    memory = InMemoryLightningStore()
    async with LightningStoreServer(memory, "127.0.0.1", 0, auth_token="") as server:
        client = LightningStoreClient(server.endpoint, auth_token="")
        seen: list[LightningStore] = []

        async def algorithm(store: LightningStore, event: ExecutionEvent) -> None:
            seen.append(store)
            await bundles.wait_ready(store, 2)

        s = strategy(2, managed_store=False)
        with anyio.fail_after(GUARD):
            await s.execute(algorithm, bundles.runner_until_event, client)
        await client.close()
    assert seen == [client] and s.server_endpoint is None
    assert len(await memory.query_workers()) == 2


def test_importing_the_package_does_not_import_ray_and_actors_do_not_import_the_server() -> None:
    code = (
        "import sys, agl_async, agl_async.trainer, agl_async.execution\n"
        "from agl_async.execution.registry import resolve_strategy; resolve_strategy('shm')\n"
        "assert 'ray' not in sys.modules, 'ray imported'\n"
        "import agl_async.execution.ray_actor\n"
        "assert 'uvicorn' not in sys.modules and 'starlette' not in sys.modules, 'server imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


async def runner_sets_event_and_carries_on(
    store: LightningStore, worker_id: int, event: ExecutionEvent
) -> None:
    """Worker 0 sets the event and keeps running (until cancelled); worker 1 waits for it."""
    await bundles.announce(store, worker_id)
    if worker_id == 0:
        await bundles.wait_ready(store, 2)
        event.set()
        await anyio.sleep_forever()
    await event.wait()


@pytest.mark.parametrize(
    "runner",
    [bundles.runner_sets_event, runner_sets_event_and_carries_on],
    ids=["then-returns", "carries-on"],
)
async def test_event_set_in_an_actor_stops_the_run(shared_ray: str, runner: Any) -> None:
    """A runner's event.set() reaches the algorithm (and so every other actor) whether the runner
    then returns or keeps running."""
    with anyio.fail_after(GUARD):
        await strategy(2).execute(bundles.algorithm_waits_for_event, runner, InMemoryLightningStore())


async def test_a_runner_error_is_reraised_as_itself(shared_ray: str) -> None:
    with anyio.fail_after(GUARD), pytest.raises(RunnerError, match="runner 1 failed on purpose") as info:
        await strategy(2).execute(bundles.algorithm_waits_for_event, runner_raises, InMemoryLightningStore())
    assert type(info.value) is RunnerError  # not ray.exceptions.RayTaskError(RunnerError)


async def test_algorithm_error_propagates_and_stops_the_actors(shared_ray: str) -> None:
    with anyio.fail_after(GUARD), pytest.raises(ValueError, match="algorithm failed on purpose"):
        await strategy(2).execute(
            bundles.algorithm_raises, bundles.runner_until_event, InMemoryLightningStore()
        )


async def test_each_escalation_step(shared_ray: str, caplog: pytest.LogCaptureFixture) -> None:
    """Actor 0 ignores the event (ray.cancel ends it); actor 1 ignores cancellation (ray.kill)."""
    caplog.set_level(logging.INFO, logger="agl_async")
    store = InMemoryLightningStore()
    started = time.monotonic()
    with anyio.fail_after(GUARD):
        await strategy(2).execute(bundles.algorithm_ready(2), runner_ignores_event, store)
    assert time.monotonic() - started < GUARD / 2
    stats = {w.worker_id: w.heartbeat_stats or {} for w in await store.query_workers()}
    assert stats[0].get("cancelled") is True  # ray.cancel reached it as a cancellation
    assert "cancelled" not in stats[1]
    text = caplog.text
    assert "ray.cancel" in text and "ray.kill" in text
    assert text.index("ray.cancel") < text.index("ray.kill")


async def test_caller_cancellation_stops_the_actors_then_propagates(shared_ray: str) -> None:
    with anyio.fail_after(GUARD):
        with anyio.CancelScope() as scope:
            store = InMemoryLightningStore()

            async def cancel_when_ready(store: LightningStore, event: ExecutionEvent) -> None:
                await bundles.wait_ready(store, 2)
                scope.cancel()
                await event.wait()

            await strategy(2).execute(cancel_when_ready, bundles.runner_until_event, store)
        assert scope.cancelled_caught


def _mark(directory: str, task: Any) -> None:
    Path(directory, f"{task}.{os.getpid()}").touch()


def _markers(directory: Path, pattern: str = "*") -> list[Path]:
    return list(directory.glob(pattern))


def marking_agent_factory(directory: str) -> Any:
    """``slow_agent`` that first leaves a marker file ``<task>.<pid>`` in ``directory``."""

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        _mark(directory, task)
        return await slow_agent(task, resources)

    return agent


async def kill_runner_0_on_task_0(directory: Path, *, no_restart: bool) -> int:
    """Once runner actor 0 has started task 0 (its marker exists), ``ray.kill`` it from here, as
    an operator would; returns the pid of the killed incarnation."""
    with anyio.fail_after(GUARD):
        while not (markers := _markers(directory, "0.*")):  # noqa: ASYNC110 - the agent's file marker
            await anyio.sleep(0.05)
    (name,) = [n for n in ray.util.list_named_actors() if n.endswith("-runner-0")]
    ray.kill(ray.get_actor(name), no_restart=no_restart)
    return int(markers[0].name.split(".")[1])


async def _rollout_of(store: LightningStore, task: int) -> Any:
    (rollout,) = [r for r in await store.query_rollouts() if r.input == task]
    return rollout


async def test_an_actor_killed_mid_run_is_restarted_and_every_rollout_succeeds_once(
    shared_ray: str, tmp_path: Path
) -> None:
    """One runner actor, max_restarts=1: after ray.kill its restarted incarnation does the rest,
    including task 0, whose attempt in flight the watchdog declares unresponsive and retries."""
    config = RolloutConfig(unresponsive_seconds=1.0, max_attempts=2, retry_condition=["unresponsive"])
    trainer = Trainer(
        strategy=strategy(1, max_restarts=1),
        algorithm=Baseline(config=config),
        train_dataset=list(range(4)),
        agent=marking_agent_factory(str(tmp_path)),
        heartbeat_interval=0.2,
    )
    killed: list[int] = []

    async def killer() -> None:
        killed.append(await kill_runner_0_on_task_0(tmp_path, no_restart=False))

    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            await trainer.arun()
    rollouts = await trainer.store.query_rollouts()
    assert len(rollouts) == 4 and {r.status for r in rollouts} == {"succeeded"}
    for r in rollouts:
        attempts = await trainer.store.query_attempts(r.rollout_id)
        assert [a.status for a in attempts].count("succeeded") == 1
        spans = [s for s in await trainer.store.query_spans(r.rollout_id) if s.name == REWARD_SPAN_NAME]
        assert len(spans) == 1
    task0 = await trainer.store.query_attempts((await _rollout_of(trainer.store, 0)).rollout_id)
    assert [a.status for a in task0] == ["unresponsive", "succeeded"]
    pids = {int(m.name.split(".")[1]) for m in _markers(tmp_path)}
    assert killed[0] in pids and len(pids) == 2  # the restarted incarnation did the rest


async def test_an_actor_lost_past_its_restarts_is_a_runtime_error_naming_it(
    shared_ray: str, tmp_path: Path
) -> None:
    trainer = Trainer(
        strategy=strategy(1, max_restarts=0),
        train_dataset=list(range(4)),
        agent=marking_agent_factory(str(tmp_path)),
    )
    with anyio.fail_after(GUARD):
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(kill_runner_0_on_task_0, tmp_path, no_restart=False))
            with pytest.raises(RuntimeError, match=r"runner actor agl-async-\w+-runner-0 ") as info:
                await trainer.arun()
    assert "max_restarts=0" in str(info.value)


async def test_concurrency_applies_per_actor(shared_ray: str, tmp_path: Path) -> None:
    if "concurrency" not in inspect.signature(Trainer).parameters:
        pytest.skip("Trainer(concurrency=...) is not available on this branch yet")
    trainer = Trainer(  # type: ignore[call-arg, unused-ignore]
        strategy=strategy(2), concurrency=3, train_dataset=list(range(12)), agent=slow_agent
    )
    with anyio.fail_after(GUARD):
        await trainer.arun()
    attempts = [
        a
        for r in await trainer.store.query_rollouts()
        for a in await trainer.store.query_attempts(r.rollout_id)
    ]
    # 12 rollouts of 0.8 s on 2 actors x 3 slots: at least 5 at once somewhere
    events = sorted([(a.start_time, 1) for a in attempts] + [(a.end_time or 0.0, -1) for a in attempts])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak >= 5
    assert len({a.worker_id for a in attempts}) >= 4  # unique worker ids across slots and actors


CTRL_C_SCRIPT = """
import sys, anyio
from agl_async.trainer import Trainer

async def agent(task, resources):
    print("agent started", flush=True)
    await anyio.sleep(60)
    return 1.0

trainer = Trainer(strategy={"type": "ray", "graceful_timeout": 0.5, "terminate_timeout": 2},
                  n_runners=2, train_dataset=list(range(4)), agent=agent)
try:
    trainer.run()
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(130)
"""


async def test_ctrl_c_under_run_stops_the_actors_then_raises_keyboard_interrupt(shared_ray: str) -> None:
    """A driver script on the running cluster gets Ctrl-C (SIGINT to its process group, as a
    terminal sends it) while an agent runs: the actors are stopped, then KeyboardInterrupt."""
    import signal

    env = {**os.environ, "RAY_ADDRESS": shared_ray, "PYTHONPATH": str(TESTS_DIR.parent)}
    process = await anyio.open_process(
        [sys.executable, "-c", CTRL_C_SCRIPT], env=env, stderr=subprocess.STDOUT, start_new_session=True
    )
    output = b""
    try:
        assert process.stdout is not None
        with anyio.fail_after(GUARD):
            async for chunk in process.stdout:
                output += chunk
                if b"agent started" in output:
                    break
            os.killpg(process.pid, signal.SIGINT)
            async for chunk in process.stdout:
                output += chunk
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 130, output.decode()
    assert b"KeyboardInterrupt" in output


# ---------------------------------------------------------------------------- the CLI
async def test_cli_places_runner_actors_against_a_running_server(shared_ray: str) -> None:
    """`agl-async runner --ray 2` joins the running Ray cluster (RAY_ADDRESS) and works for a
    store server started separately; each actor stops after --max-rollouts."""
    from agl_async import LightningStoreServer

    store = InMemoryLightningStore()
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="s3cret") as server:
        await store.enqueue_many_rollouts([{"input": i} for i in range(4)])
        env = {**os.environ, "RAY_ADDRESS": shared_ray, "PYTHONPATH": str(TESTS_DIR.parent)}
        cmd = [
            sys.executable, "-m", "agl_async.cli", "runner", "--ray", "2",
            "--server", server.endpoint, "--token", "s3cret",
            "--agent", "ray_agents:double", "--max-rollouts", "2",
        ]  # fmt: skip
        with anyio.fail_after(GUARD):
            result = await anyio.run_process(cmd, cwd=TESTS_DIR, env=env, check=False)
    out = result.stdout.decode() + result.stderr.decode()
    assert result.returncode == 0, out
    assert "2 runner actor(s)" in out
    rollouts = await store.query_rollouts()
    assert {r.status for r in rollouts} == {"succeeded"}
    assert sorted(r.metadata["reward"] for r in rollouts) == [0.0, 2.0, 4.0, 6.0]
