"""The ``agl-async`` command line, run as real subprocesses."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from agl_async.cli import build_parser, main
from agl_async.testing import free_port

TIMEOUT = 120  # hang guard only


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "agl_async.cli", *args]


def run_cli(*args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, check=False)


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    children: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, set()).add(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process checks read /proc")


class Proc:
    """A CLI subprocess whose output lines are collected by a thread (no blocking reads)."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            cli(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern)
        with self._changed:
            ok = self._changed.wait_for(
                lambda: any(regex.search(x) for x in self.lines) or not self._reader.is_alive(), timeout
            )
            for line in self.lines:
                match = regex.search(line)
                if match:
                    return match
        raise AssertionError(f"no line matching {pattern!r} (ok={ok}); output so far:\n" + self.output)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait(self, timeout: float = TIMEOUT) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:  # only after a failed test: never leave anything running
        proc.kill()


# ---------------------------------------------------------------------------------------- demo
def _mean_rewards(output: str) -> tuple[float, float]:
    match = re.search(r"mean reward (\d\.\d+) -> (\d\.\d+) over (\d+) epochs", output)
    assert match, output
    return float(match[1]), float(match[2])


def test_demo_runs_and_the_reward_rises() -> None:
    result = run_cli("demo", "--epochs", "8", "--runners", "3")
    assert result.returncode == 0, result.stderr
    first, last = _mean_rewards(result.stdout)
    assert last > first + 0.2
    # one progress line and one table row per epoch
    assert len(re.findall(r"^epoch +\d+/8 ", result.stdout, re.MULTILINE)) == 8
    assert len(re.findall(r"^ +\d+ \| +104 \| +0 \|", result.stdout, re.MULTILINE)) == 8


def test_demo_is_deterministic_whatever_the_number_of_runners() -> None:
    from agl_async.examples.evolution import run_demo

    one = run_demo(runners=1, epochs=3, latency=0, progress=None)
    three = run_demo(runners=3, epochs=3, latency=0, progress=None)
    slots = run_demo(runners=2, epochs=3, latency=0, progress=None, concurrency=8)
    assert [(s.train_reward, s.val_reward) for s in one] == [(s.train_reward, s.val_reward) for s in three]
    assert [(s.train_reward, s.val_reward) for s in one] == [(s.train_reward, s.val_reward) for s in slots]
    assert one[-1].train_reward > one[0].train_reward


@needs_proc
def test_demo_client_server_mode_leaves_no_process(procs: list[Proc]) -> None:
    proc = Proc("demo", "--mode", "cs", "--epochs", "3", "--runners", "2", "--latency", "0")
    procs.append(proc)
    proc.wait_for_line(r"^epoch +1/3 ")
    children = descendants(proc.popen.pid)
    assert proc.wait() == 0, proc.output
    first, last = _mean_rewards(proc.output)
    assert last > first
    assert alive(children) == set()


# ------------------------------------------------------------------------------ serve + runner
async def _drive_server(endpoint: str, n: int) -> list[Any]:
    from agl_async import LightningStoreClient
    from agl_async.examples.evolution import make_tasks

    train, _ = make_tasks(0, n_train=n, n_val=0)
    async with LightningStoreClient(endpoint, auth_token="s3cret") as client:
        await client.add_resources({"theta": [0.0] * 6})
        ids = [(await client.enqueue_rollout(task)).rollout_id for task in train]
        with anyio.fail_after(TIMEOUT):
            finished = await client.wait_for_rollouts(rollout_ids=ids)
        return finished


@needs_proc
def test_serve_and_runner_work_together_then_exit_cleanly(procs: list[Proc]) -> None:
    port = free_port()
    server = Proc("serve", "--host", "127.0.0.1", "--port", str(port), "--token", "s3cret")
    procs.append(server)
    server.wait_for_line(rf"listening on http://127\.0\.0\.1:{port}")
    runner = Proc(
        "runner",
        "--server",
        f"http://127.0.0.1:{port}",
        "--token",
        "s3cret",
        "--agent",
        "agl_async.examples.evolution:agent",
        "-n",
        "2",
        "--max-rollouts",
        "3",
    )
    procs.append(runner)
    runner.wait_for_line("attached to")
    runner_children = descendants(runner.popen.pid)

    finished = anyio.run(_drive_server, f"http://127.0.0.1:{port}", 6)
    assert [r.status for r in finished] == ["succeeded"] * 6
    assert all(0.0 < r.metadata["reward"] <= 1.0 for r in finished)

    assert runner.wait() == 0, runner.output  # 2 runners x 3 rollouts: done
    assert "runners finished" in runner.output
    server_children = descendants(server.popen.pid)
    server.popen.send_signal(signal.SIGINT)
    assert server.wait() == 0, server.output
    assert "server stopped" in server.output
    assert alive(runner_children | server_children) == set()


@needs_proc
def test_stopping_serve_ends_the_run_for_attached_runners_which_exit_0(procs: list[Proc]) -> None:
    """Used to be ~8 s of connection retries, exit code 1 and pages of tracebacks per runner."""
    import time

    port = free_port()
    server = Proc("serve", "--host", "127.0.0.1", "--port", str(port), "--token", "")
    procs.append(server)
    server.wait_for_line("listening on")
    runner = Proc(
        "runner",
        "--server",
        f"http://127.0.0.1:{port}",
        "--agent",
        "agl_async.examples.evolution:agent",
        "-n",
        "2",
    )
    procs.append(runner)
    anyio.run(_wait_for_workers, f"http://127.0.0.1:{port}", 2)  # both runner processes are polling
    children = descendants(runner.popen.pid)
    stopped = time.monotonic()
    server.popen.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.output
    assert runner.wait() == 0, runner.output
    assert time.monotonic() - stopped < 8.0  # well within one retry budget: no retries at all
    assert "Traceback" not in runner.output and "runners finished" in runner.output
    said = [line for line in runner.lines if "run is over" in line]
    assert 1 <= len(said) <= 2, runner.output  # one line (two if both noticed at the same moment)
    assert alive(children) == set()


def test_serve_reports_a_port_in_use() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert result.returncode == 1
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr


def test_runner_reports_an_unreachable_server() -> None:
    port = free_port()
    result = run_cli(
        "runner", "--server", f"http://127.0.0.1:{port}", "--agent", "agl_async.examples.evolution:agent"
    )
    assert result.returncode == 1
    assert f"cannot reach the store server at http://127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ("no_such_module_xyz:agent", "cannot import agent module 'no_such_module_xyz'"),
        ("agl_async.examples.evolution:nope", "has no attribute 'nope'"),
        ("agl_async.examples.evolution", "--agent must look like 'module:attr'"),
        ("agl_async.examples.evolution:EpochStats.rollouts_per_second", "is not callable"),
    ],
)
def test_runner_reports_an_agent_that_does_not_import(agent: str, message: str) -> None:
    result = run_cli("runner", "--server", "http://127.0.0.1:1", "--agent", agent)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_runner_rejects_a_bad_server_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runner", "--server", "ftp://host:1", "--agent", "x:y"]) == 2
    assert "--server must be an http:// or https:// URL" in capsys.readouterr().err


def test_agent_module_in_the_current_directory_is_found(tmp_path: Path) -> None:
    (tmp_path / "broken_agent_mod.py").write_text("raise RuntimeError('import-time failure')\n")
    result = subprocess.run(
        cli("runner", "--server", "http://127.0.0.1:1", "--agent", "broken_agent_mod:agent"),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    assert result.returncode == 2
    assert (
        "importing agent module 'broken_agent_mod' failed: RuntimeError: import-time failure" in result.stderr
    )


# ------------------------------------------------------------------------------------------ help
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ([], ["demo", "serve", "runner"]),
        (["demo"], ["--mode", "--runners", "--epochs"]),
        (["serve"], ["--host", "--port", "--token"]),
        (["runner"], ["--server", "--agent", "-n", "--max-rollouts"]),
    ],
)
def test_help_explains_each_command(
    command: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in expected:
        assert word in text


def test_cli_import_and_help_stay_light() -> None:
    code = (
        "import sys, agl_async.cli\n"
        "try:\n    agl_async.cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('uvicorn', 'starlette', 'httpx', 'aiomultiprocess', 'msgspec')\n"
        "print([m for m in heavy if m in sys.modules])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]"


CONTRACT_NAMES = (
    "Rollout AttemptedRollout Attempt RolloutConfig Span ResourcesUpdate Worker "
    "LightningStore InMemoryLightningStore LightningStoreLocked LightningStoreServer LightningStoreClient "
    "ExecutionStrategy ExecutionEvent SharedMemoryExecutionStrategy ClientServerExecutionStrategy "
    "Trainer Algorithm"
).split()


def test_every_contract_name_is_exported_from_its_documented_path() -> None:
    """Section 1 of the contract, in a fresh interpreter (the package exports lazily)."""
    code = (
        f"from agl_async import {', '.join(CONTRACT_NAMES)}\n"
        "import agl_async\n"
        "from agl_async.execution.shared_memory import SharedMemoryExecutionStrategy as S\n"
        "from agl_async.execution.client_server import ClientServerExecutionStrategy as C\n"
        "from agl_async.trainer import Trainer as T\n"
        "assert (S, C, T) == (SharedMemoryExecutionStrategy, ClientServerExecutionStrategy, Trainer)\n"
        f"names = {CONTRACT_NAMES!r}\n"
        "missing = [n for n in names if n not in agl_async.__all__ or n not in dir(agl_async)]\n"
        "print(missing)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.mode, args.runners, args.epochs) == ("shm", 4, 12)


async def _wait_for_workers(endpoint: str, n: int) -> None:
    from agl_async import LightningStoreClient

    async with LightningStoreClient(endpoint, auth_token="") as client:
        with anyio.fail_after(TIMEOUT):
            while len(await client.query_workers()) < n:  # noqa: ASYNC110 - state of other processes
                await anyio.sleep(0.05)


@needs_proc
@pytest.mark.parametrize(
    ("sig", "code", "word"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["ctrl-c", "sigterm"],
)
def test_ctrl_c_stops_attached_runners_and_their_processes(
    procs: list[Proc], sig: signal.Signals, code: int, word: str
) -> None:
    port = free_port()
    server = Proc("serve", "--port", str(port), "--token", "")
    procs.append(server)
    server.wait_for_line("listening on")
    runner = Proc(
        "runner",
        "--server",
        f"http://127.0.0.1:{port}",
        "--agent",
        "agl_async.examples.evolution:agent",
        "-n",
        "2",
    )
    procs.append(runner)
    anyio.run(_wait_for_workers, f"http://127.0.0.1:{port}", 2)  # both runner processes are up
    children = descendants(runner.popen.pid)
    assert children
    runner.popen.send_signal(sig)
    assert runner.wait() == code, runner.output
    assert word in runner.output and "Traceback" not in runner.output
    assert alive(children) == set()
    server.popen.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.output


# ------------------------------------------------------------------------------- value checks
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--mode", "cs", "--port", "99999"], "--port: must be a port number in 0..65535"),
        (["serve", "--port", "99999"], "--port: must be a port number in 0..65535"),
        (["serve", "--port", "4_800"], "--port: must be an integer, got '4_800'"),
        (["demo", "--latency", "inf"], "--latency: must be a finite number of seconds"),
        (["demo", "--latency", "nan"], "--latency: must be a finite number of seconds"),
        (["demo", "--latency", "-1"], "--latency: must be a finite number of seconds"),
        (["demo", "--latency", "3600"], "--latency: must be a finite number of seconds >= 0 and <= 60"),
        (["demo", "--runners", "100000"], "--runners: must be at most 256"),
        (["demo", "--runners", "0"], "--runners: must be >= 1"),
        (
            ["runner", "--server", "http://h:1", "--agent", "m:a", "-n", "100000"],
            "-n/--n-runners: must be at most",
        ),
        (
            ["runner", "--server", "http://h:1", "--agent", "m:a", "--connect-timeout", "nan"],
            "--connect-timeout",
        ),
        (
            ["runner", "--server", "http://h:1", "--agent", "m:a", "--connect-timeout", "0"],
            "--connect-timeout",
        ),
    ],
)
def test_bad_values_are_one_clear_error_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1, err


def test_port_without_client_server_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--port", "4800"]) == 2
    assert "--port applies to --mode cs or --dashboard only" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("AGL_SERVER_PORT", "4_800", "AGL_SERVER_PORT must be an integer, got '4_800'"),
        ("AGL_SERVER_PORT", "+4800", "AGL_SERVER_PORT must be an integer"),
        ("AGL_SERVER_PORT", "99999", "AGL_SERVER_PORT must be in 0..65535"),
        ("AGL_SERVER_HOST", "http://x:1", "AGL_SERVER_HOST must be a host name or an IP address"),
        ("AGL_SERVER_HOST", "head:4747", "AGL_SERVER_HOST must be a host name or an IP address"),
        ("AGL_SERVER_HOST", "host/path", "AGL_SERVER_HOST must be a host name or an IP address"),
    ],
)
def test_bad_environment_values_are_refused_naming_the_variable(
    variable: str, value: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agl_async import ClientServerExecutionStrategy

    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=re.escape(message)):
        ClientServerExecutionStrategy()


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "::1", "[::1]", "head-node.example", "0.0.0.0"])
def test_good_hosts_are_kept(host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from agl_async import ClientServerExecutionStrategy

    monkeypatch.setenv("AGL_SERVER_HOST", host)
    assert ClientServerExecutionStrategy().server_host == host.strip("[]")


@pytest.mark.skipif(
    importlib.util.find_spec("ray") is not None, reason="Ray is installed here (nox -s ray tests --ray)"
)
def test_runner_ray_without_ray_says_how_to_install_it(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["runner", "--server", "http://127.0.0.1:1", "--agent", "agl_async.examples.evolution:agent"]
    assert main([*args, "--ray", "2"]) == 2
    assert "pip install 'agl-async[ray]'" in capsys.readouterr().err
