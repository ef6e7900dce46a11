"""A fleet across hosts, for real: three network namespaces, HTTPS with a token, a cut link.

The store server (a ``Trainer`` in ``role="algorithm"``, :mod:`faults.netfleet`) runs in the
server namespace on its own address with a throwaway CA's certificate and a token read from a
file; ``agl-async runner --server https://... --ca-file --token-file -n 2`` runs in each of the two
runner namespaces. Once a quarter of the rollouts have succeeded, the link of the runner host that
is holding work is cut (``ip link set ... down`` at the server's end: its packets are lost, no
error anywhere). Checked while it is cut: every attempt that host held becomes ``unresponsive``
(the watchdog, ``RolloutConfig.unresponsive_seconds``) and its rollout is run again, to success,
by the other host. Then the link is restored and the run trains to completion: every rollout
succeeded, each ended once (its end time never changes once it has succeeded), none failed.
The runners stop on SIGINT (exit 130, no process left) and the server stops cleanly (exit 0).

Needs root and iproute2 (skips otherwise, saying which); see tests/faults/netns.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import TLSFiles

from .fleet import TESTS_DIR, stop_session, wait_exit, wait_no_session_left
from .netns import SERVER_ADDRESS, Hosts, hosts, unavailable

pytestmark = [pytest.mark.anyio, pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))]

ROLLOUTS = 24
SECONDS = 1.0  # agent work per rollout
UNRESPONSIVE = 3.0  # RolloutConfig.unresponsive_seconds
PORT = 4747  # the server namespace is empty: any port is free there
TOKEN = "netns-fleet-token"
HANG_GUARD = 120.0


def _popen(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), full_env.get("PYTHONPATH")]))
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.pop("AGL_SERVER_TOKEN", None)
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )


class Control:
    """The server namespace's process, driven through its pipes (see faults.netfleet)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        line: str = await anyio.to_thread.run_sync(self.proc.stdout.readline)
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr and self.proc.poll() is not None else ""
            raise AssertionError(f"the server process ended early: {err}")
        return line.strip()

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(await self.line())
        return result


def _hosts_of(markers: Path) -> dict[int, list[str]]:
    """Task index -> the hosts whose agent started it, in marker order."""
    ran: dict[int, list[str]] = {}
    for entry in sorted(markers.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        i, host = entry.name.split(".")[:2]
        ran.setdefault(int(i), []).append(host)
    return ran


async def _until(control: Control, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Snapshots of the store until ``done(snapshot)`` (bounded by the caller's fail_after)."""
    while True:
        snapshot = await control.ask("snapshot")
        if done(snapshot):
            return snapshot
        await anyio.sleep(0.2)  # the state of other processes: polled, at a bounded pace


def _statuses(snapshot: dict[str, Any]) -> dict[str, str]:
    return {r["rollout_id"]: r["status"] for r in snapshot["rollouts"]}


async def test_fleet_across_namespaces_survives_a_cut_link(
    tmp_path: Path, figures: Callable[..., None]
) -> None:
    tls = TLSFiles(tmp_path, SERVER_ADDRESS)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")  # trailing newline, as `echo > file` leaves it
    token_file.chmod(0o600)
    markers = tmp_path / "markers"
    markers.mkdir()
    endpoint = f"https://{SERVER_ADDRESS}:{PORT}"
    procs: list[subprocess.Popen[str]] = []
    with hosts() as net:
        try:
            await _run_fleet(net, tls, token_file, markers, endpoint, procs, figures)
        finally:
            for proc in procs:
                stop_session(proc)


async def _run_fleet(
    net: Hosts,
    tls: TLSFiles,
    token_file: Path,
    markers: Path,
    endpoint: str,
    procs: list[subprocess.Popen[str]],
    figures: Callable[..., None],
) -> None:
    server = _popen(
        net.command(
            net.server,
            sys.executable,
            "-m",
            "faults.netfleet",
            "algorithm",
            "--host",
            SERVER_ADDRESS,
            "--port",
            str(PORT),
            "--certfile",
            str(tls.cert),
            "--keyfile",
            str(tls.key),
            "--token-file",
            str(token_file),
            "--rollouts",
            str(ROLLOUTS),
            "--seconds",
            str(SECONDS),
            "--unresponsive",
            str(UNRESPONSIVE),
            "--markers",
            str(markers),
        )
    )
    procs.append(server)
    control = Control(server)
    with anyio.fail_after(HANG_GUARD):
        assert await control.line() == "SERVING"
    runners = {}
    for ns in net.runners:
        argv = net.command(
            ns,
            sys.executable,
            "-m",
            "agl_async.cli",
            "runner",
            "--server",
            endpoint,
            "--ca-file",
            str(tls.ca),
            "--token-file",
            str(token_file),
            "--agent",
            "faults.netfleet:host_agent",
            "-n",
            "2",
        )
        runners[ns] = proc = _popen(argv, env={"FLEET_HOST": ns})
        procs.append(proc)
    assert TOKEN not in " ".join(str(a) for p in procs for a in p.args)  # never on a command line

    started = time.monotonic()
    with anyio.fail_after(HANG_GUARD):
        # Mid-run: a quarter done, and a runner host holding work to lose.
        def quarter_done_and_held(snapshot: dict[str, Any]) -> bool:
            succeeded = sum(s == "succeeded" for s in _statuses(snapshot).values())
            return succeeded >= ROLLOUTS // 4 and bool(_held_by(snapshot, markers))

        lost: dict[str, str] = {}  # attempt id -> rollout id: what the cut host holds
        while not lost:
            snapshot = await _until(control, quarter_done_and_held)
            held = _held_by(snapshot, markers)
            victim = max(held, key=lambda ns: len(held[ns]))  # the host holding the most attempts
            net.cut(victim)
            cut_at = time.monotonic()
            # What it still holds now that nothing of it reaches the server any more.
            after = await control.ask("snapshot")
            live = {
                a["attempt_id"] for r in after["rollouts"] for a in r["attempts"] if a["status"] == "running"
            }
            lost = {a: r for a, r in held[victim].items() if a in live}
            if not lost:  # it finished them all in the instant before the cut: try again
                net.restore(victim)
        survivor = next(ns for ns in net.runners if ns != victim)

        # While cut: each attempt the lost host held is ended by the watchdog, and its rollout
        # succeeds again on the other host.
        def recovered(snapshot: dict[str, Any]) -> bool:
            attempts = {a["attempt_id"]: a for r in snapshot["rollouts"] for a in r["attempts"]}
            statuses = _statuses(snapshot)
            return all(attempts[a]["status"] == "unresponsive" for a in lost) and all(
                statuses[r] == "succeeded" for r in lost.values()
            )

        during = await _until(control, recovered)
        recovered_after = time.monotonic() - cut_at
        ran = _hosts_of(markers)
        by_id = {r["rollout_id"]: r for r in during["rollouts"]}
        for rollout_id in lost.values():
            rollout = by_id[rollout_id]
            assert ran[rollout["i"]][-1] == survivor, (rollout, ran[rollout["i"]])
            assert rollout["attempts"][-1]["status"] == "succeeded"
        ended = {r["rollout_id"]: r["end_time"] for r in during["rollouts"] if r["status"] == "succeeded"}
        net.restore(victim)

        final = await _until(
            control, lambda s: all(status == "succeeded" for status in _statuses(s).values())
        )
        trained_in = time.monotonic() - started
        for proc in runners.values():
            proc.send_signal(signal.SIGINT)
        for ns, proc in runners.items():
            code, _, err = await wait_exit(proc, 60)
            assert code == 130, (ns, code, err)
            assert "Traceback" not in err and TOKEN not in err, err
            await wait_no_session_left(proc.pid)
        last = await control.ask("finish")
        code, _, err = await wait_exit(server, 60)
        assert code == 0, err
        assert TOKEN not in err, err
        await wait_no_session_left(server.pid)

    assert last == final or _statuses(last) == _statuses(final)
    rollouts = final["rollouts"]
    assert len(rollouts) == ROLLOUTS and all(r["status"] == "succeeded" for r in rollouts)
    for rollout in rollouts:
        assert not any(a["status"] == "failed" for a in rollout["attempts"]), rollout
        assert rollout["attempts"][-1]["status"] == "succeeded", rollout
        if rollout["rollout_id"] in ended:  # succeeded once: its end was never recorded again
            assert rollout["end_time"] == ended[rollout["rollout_id"]], rollout
    ran = _hosts_of(markers)
    assert set(ran) == set(range(ROLLOUTS))
    hosts_used = {host for chain in ran.values() for host in chain}
    assert hosts_used == set(net.runners)
    figures(
        rollouts=ROLLOUTS,
        attempts_lost=len(lost),
        recovered_s=recovered_after,
        unresponsive_seconds=UNRESPONSIVE,
        trained_s=trained_in,
        reruns=sum(len(chain) - 1 for chain in ran.values()),
    )


def _held_by(snapshot: dict[str, Any], markers: Path) -> dict[str, dict[str, str]]:
    """Runner host -> {attempt id: rollout id} of the live attempts whose agent it started (the
    latest marker of the task names the host: a live attempt is the task's latest start)."""
    ran = _hosts_of(markers)
    held: dict[str, dict[str, str]] = {}
    for rollout in snapshot["rollouts"]:
        attempt = rollout["attempts"][-1] if rollout["attempts"] else None
        if attempt is None or attempt["status"] != "running" or rollout["i"] not in ran:
            continue
        if len(ran[rollout["i"]]) != len(rollout["attempts"]):
            continue  # the agent of this attempt has not left its marker yet
        held.setdefault(ran[rollout["i"]][-1], {})[attempt["attempt_id"]] = rollout["rollout_id"]
    return held
