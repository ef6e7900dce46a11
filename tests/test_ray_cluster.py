"""RayExecutionStrategy on a two-node cluster started with ``ray start`` (contract section 10).

A head node (no CPUs) and a second node offering a custom resource run as ``ray start --block``
processes of this test; terminating them stops the Ray processes they started (any that Ray
leaves behind are killed by process id, and the test checks none is left). The
strategy joins the cluster at ``address``, places its actors with ``runner_options`` on the node
that has the resource, and leaves the cluster running when it is done (it only disconnects).

The driver is a fresh process, as a user's script would be (in a process that had opened and
shut down another Ray session before, Ray 2.60 was seen to drop the new actors before they ran:
"all references to the actor were removed"). Ray's token authentication is turned off for
this private cluster (``RAY_AUTH_MODE=disabled``) so that the nodes and the driver agree without
sharing a token file.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import psutil
import pytest

ray = pytest.importorskip("ray", reason="needs the ray extra (nox -s ray)")

pytestmark = [pytest.mark.ray, pytest.mark.anyio]

GUARD = 90.0
RAY_CLI = str(Path(sys.executable).with_name("ray"))


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if temp_dir in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except psutil.Error:
            continue
    return found


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            continue
    return alive


def _runner_actors() -> list[int]:
    pids = []
    for p in psutil.process_iter():
        try:
            if "ray::RunnerActor" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


@pytest.fixture
def two_node_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """``ray start --head --block`` (0 CPUs) and a second ``ray start --block`` node offering
    ``agl_worker``; yields the head's address and the two processes, and stops both after."""
    for name in ("AGL_SERVER_HOST", "AGL_SERVER_TOKEN", "AGL_MANAGED_STORE", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="agl-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--disable-usage-stats", "--block"]
    head = subprocess.Popen(
        [RAY_CLI, "start", "--head", f"--port={port}", "--num-cpus=0", f"--temp-dir={temp_dir}",
         "--include-dashboard=false", *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    address = f"{ray.util.get_node_ip_address()}:{port}"
    worker = subprocess.Popen(
        [RAY_CLI, "start", f"--address={address}", "--num-cpus=2", '--resources={"agl_worker": 2}', *common],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield address, [head, worker]
    finally:
        started = []  # what the two nodes started (their daemons and workers), by process id
        for node in (worker, head):
            try:
                started += psutil.Process(node.pid).children(recursive=True)
            except psutil.Error:
                pass
        for p in (worker, head):
            p.terminate()
        for p in (worker, head):
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        deadline = time.monotonic() + 10
        while (left := _alive(started) + _processes_of(temp_dir)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for p in left:  # what this cluster started and Ray left running (its agents, at times)
            p.kill()
        psutil.wait_procs(left, timeout=10)
        assert _alive(left) == [], f"Ray processes of the test cluster outlived it: {_alive(left)}"


DRIVER = """
import json, os, sys, anyio, ray
from agl_async import InMemoryLightningStore
from agl_async.execution.ray import RayExecutionStrategy

async def runner(store, worker_id, event):
    context = ray.get_runtime_context()
    await store.update_worker(worker_id, heartbeat_stats={"resources": context.get_assigned_resources()})
    await event.wait()

async def algorithm(store, event):
    with anyio.fail_after(60):
        while len(await store.query_workers()) < 2:
            await anyio.sleep(0.05)

async def main():
    store = InMemoryLightningStore()
    strategy = RayExecutionStrategy(2, address=sys.argv[1], runner_options={"resources": {"agl_worker": 1}},
                                    graceful_timeout=1.0, terminate_timeout=2.0)
    await strategy.execute(algorithm, runner, store)
    workers = [w.heartbeat_stats for w in await store.query_workers()]
    print(json.dumps({"workers": workers, "connected_after": ray.is_initialized()}))

anyio.run(main)
"""


async def test_actors_are_placed_on_the_cluster_at_address_which_outlives_the_run(
    two_node_cluster: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    """A driver script (a fresh process, as a user's would be) runs the strategy against the
    cluster at ``address``."""
    address, nodes = two_node_cluster
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    with anyio.fail_after(GUARD):
        result = await anyio.run_process([sys.executable, "-c", DRIVER, address], env=env, check=False)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    # Only the second node offers agl_worker: both actors run there, one unit each.
    assert [w["resources"].get("agl_worker") for w in report["workers"]] == [1.0, 1.0]
    # The strategy joined this cluster: it disconnected, and the cluster is still up.
    assert report["connected_after"] is False
    assert all(p.poll() is None for p in nodes)
    deadline = time.monotonic() + 10  # and no actor of the run is left on it
    while (actors := _runner_actors()) and time.monotonic() < deadline:  # noqa: ASYNC110 - processes
        await anyio.sleep(0.1)
    assert actors == []
