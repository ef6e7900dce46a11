"""Agent-Lightning's production store workloads, agl_async and Agent-Lightning 0.3.0 side by side.

    python benchmarks/production.py                         # agl_async only
    python benchmarks/production.py --peer /work/peer-venv/bin/python
    python benchmarks/production.py --quick --peer ...      # smoke run, under 3 minutes
    python benchmarks/production.py --scan --peer ...       # + best configuration of each system

The workload (``benchmarks/production_workload.py``) is our writing of the synthetic agent and
the three algorithm modes of Agent-Lightning's own store benchmark, scaled to a 2-core machine.
Both systems run it in the same topology, the one Agent-Lightning's benchmark uses: a store
server in its own process (``agl-async serve`` / ``python -m agentlightning.cli.store``), and a
trainer process (client-server strategy, ``managed_store=False``, a store client given as the
store) that runs the algorithm and starts the runner processes; everything talks to the server
over HTTP. Each system's side is one command run by its own interpreter (``production.py
trainer`` here, ``peer/agl_production.py trainer`` under ``--peer``), so neither is imported
into the other.

* agl_async: ``Trainer(strategy=ClientServerExecutionStrategy(n_runners=P, managed_store=False),
  concurrency=C)``; the agent writes its spans with OpenTelemetry (``start_as_current_span``) and
  the runner's tracer stores them when the agent returns (``agl-async[otel]``; without the SDK the
  agent writes the same spans with one ``add_many_spans``); the runner adds the final reward.
  P x C = the shape's in-flight count.
* Agent-Lightning: its ``Trainer`` with ``{"type": "cs", "managed_store": False}``, one runner
  process per in-flight rollout, its default tracer (AgentOps, spans exported over OTLP to the
  store's ``/v1/traces``) and ``emit_reward``; its runner sleeps ``poll_interval`` whenever the
  queue is empty: measured at its default (5 s) and tuned to 0.1 s.

The algorithm is the same code for both (``run_algorithm``): ``batch`` and ``batch_partial`` poll
``wait_for_rollouts(ids, timeout=0.1)`` (Agent-Lightning's client refuses longer timeouts);
``single`` waits for its one rollout with each system's longest wait (ours: blocking, woken by the
change; Agent-Lightning: 0.1 s polls).

Figures per run: rollouts/s (tasks ÷ the algorithm's first enqueue → last check), spans/s,
efficiency (rollouts/s x mean agent time ÷ in-flight), p50/p99 of every store request that does
not wait by design (client side, all processes; long polls and waits excluded), peak RSS of the
server and of the runner side (sum of each process's peak: every descendant of the trainer
process but the trainer itself), CPU per rollout of everything (server + algorithm + runners) in
the measured window (from ``/proc``, sampled every 0.2 s) and of the whole run, and the count of
rollouts that did not succeed, failed the span check, or were lost (must be 0). The load average
is recorded with every run: the machine may be shared.

Output: ``benchmarks/results/production-latest.json`` and ``.md`` (and a time-stamped JSON copy);
``benchmarks/report.py`` includes the latest one in ``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import array
import datetime as dt
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
PEER_SCRIPT = HERE / "peer" / "agl_production.py"
sys.path.insert(0, str(HERE))
if str(ROOT) not in sys.path:  # a checkout without an install of agl_async
    sys.path.insert(1, str(ROOT))

import production_workload as W  # noqa: E402  (benchmarks/, standard library only)

RUN_TIMEOUT = 900.0
#: ``--scan``: in-flight counts tried (ours: 2 and 4 processes; the peer: one process per rollout,
#: up to 128 processes: each takes ~300 MiB of RSS, and its rate stops growing well before).
SCAN_OURS = (32, 64, 128, 256, 512)
SCAN_PEER = (16, 32, 64, 128)


# ============================================================================ agl_async's side
from agl_async import Algorithm, LightningStoreClient  # noqa: E402


class TimedStoreClient(LightningStoreClient):
    """A LightningStoreClient that records the latency of every request that does not wait."""

    latency_dir: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "latency_dir": self.latency_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.latency_dir = state.get("latency_dir")

    async def _call(self, name: str, body: Any, *, wait: float | None = 0.0) -> Any:
        if wait != 0.0:
            return await super()._call(name, body, wait=wait)
        started = time.perf_counter()
        result = await super()._call(name, body, wait=wait)
        _latencies(self.latency_dir).record(time.perf_counter() - started)
        return result


_LATENCY_LOG: W.LatencyLog | None = None


def _latencies(directory: str | None) -> W.LatencyLog:
    global _LATENCY_LOG
    if _LATENCY_LOG is None or _LATENCY_LOG.directory != directory:
        _LATENCY_LOG = W.LatencyLog(directory)
    return _LATENCY_LOG


class ProductionAgent:
    """The synthetic agent (``production_workload``): sleeps, writes its spans, returns the final
    reward (which the runner records).

    With the runner's OpenTelemetry tracer on (``agl-async[otel]``: :mod:`agl_async.tracing`), the
    spans are OpenTelemetry spans started with ``start_as_current_span``, exactly as
    Agent-Lightning's agent writes them; the tracer stores them when the agent returns. Without
    it, the agent writes the same spans with one ``add_many_spans`` when it ends."""

    def __init__(self, max_rounds: int, sleep: float) -> None:
        self.max_rounds, self.sleep = max_rounds, sleep

    async def __call__(self, task: str, resources: dict[str, Any]) -> float:
        from agl_async.tracing import tracing_enabled

        plan = W.plan_rollout(task, self.max_rounds, self.sleep)
        if tracing_enabled():
            await _spans_through_opentelemetry(plan)
        else:
            await _spans_through_the_store(plan)
        return plan.final_reward


async def _spans_through_opentelemetry(plan: W.Plan) -> None:
    import anyio
    from opentelemetry import trace

    tracer = trace.get_tracer("agl_async.benchmarks.production")
    for round_ in plan.rounds:
        head, *children = round_.steps
        with tracer.start_as_current_span(head.name):
            for step in children:
                with tracer.start_as_current_span(step.name) as span:
                    await anyio.sleep(step.sleep)
                    span.set_attributes(step.attributes)
        if round_.reward is not None:
            with tracer.start_as_current_span("reward") as span:
                span.set_attribute("reward", round_.reward)
    with tracer.start_as_current_span(plan.final.name) as span:
        await anyio.sleep(plan.final.sleep)
        span.set_attributes(plan.final.attributes)


async def _spans_through_the_store(plan: W.Plan) -> None:
    import anyio

    from agl_async import Span
    from agl_async.rollout_context import current_rollout

    context = current_rollout()
    assert context is not None, "run by the runner loop"
    store, rollout_id, attempt_id = context.store, context.rollout_id, context.attempt_id
    trace_id = uuid.uuid4().hex
    sequence = 0

    def span(name: str, parent: str | None, start: float, end: float, attributes: dict[str, Any]) -> Any:
        nonlocal sequence
        sequence += 1
        return Span(
            rollout_id=rollout_id,
            attempt_id=attempt_id,
            sequence_id=sequence,
            trace_id=trace_id,
            span_id=os.urandom(8).hex(),
            name=name,
            parent_id=parent,
            start_time=start,
            end_time=end,
            attributes=attributes,
        )

    written = []
    for round_ in plan.rounds:
        head, *children = round_.steps
        head_id = os.urandom(8).hex()
        started = time.time()
        head_at = len(written)
        for step in children:
            step_started = time.time()
            await anyio.sleep(step.sleep)
            written.append(span(step.name, head_id, step_started, time.time(), step.attributes))
        parent = span(head.name, None, started, time.time(), {})
        parent.span_id = head_id
        written.insert(head_at, parent)
        if round_.reward is not None:
            now = time.time()
            written.append(span("reward", None, now, now, {"reward": round_.reward}))
    started = time.time()
    await anyio.sleep(plan.final.sleep)
    written.append(span("final", None, started, time.time(), plan.final.attributes))
    await store.add_many_spans(written)  # once, at the end, as Agent-Lightning's tracer exports


class OursAdapter:
    """``production_workload.Adapter`` over an agl_async store."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def add_resources(self, tag: int) -> None:
        await self.store.add_resources(
            {"llm": {"endpoint": f"http://localhost:{tag}/v1", "model": f"test-model-{tag}"}}
        )

    async def enqueue(self, tasks: list[str]) -> list[str]:
        rollouts = await self.store.enqueue_many_rollouts([{"input": t, "mode": "train"} for t in tasks])
        return [r.rollout_id for r in rollouts]

    async def finished(self, rollout_ids: list[str], poll: float) -> list[tuple[str, str]]:
        rollouts = await self.store.wait_for_rollouts(rollout_ids=rollout_ids, timeout=poll)
        return [(r.rollout_id, r.status) for r in rollouts]

    async def wait_one(self, rollout_id: str) -> str:
        while True:
            done = await self.store.wait_for_rollouts(rollout_ids=[rollout_id], timeout=30.0)
            if done:
                return str(done[0].status)

    async def workers(self) -> int:
        return len(await self.store.query_workers())

    async def spans(self, rollout_id: str) -> tuple[list[dict[str, Any]], float | None, int]:
        spans = await self.store.query_spans(rollout_id, "latest")
        rewards = [s.attributes["reward"] for s in spans if "reward" in s.attributes]
        return [s.attributes for s in spans], (float(rewards[-1]) if rewards else None), len(spans)


RESULT: dict[str, Any] = {}


class ProductionAlgorithm(Algorithm):
    """``production_workload.run_algorithm`` as an agl_async algorithm; the outcome goes to RESULT."""

    def __init__(self, shape: dict[str, Any]) -> None:
        self.shape = shape

    async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
        shape = self.shape
        RESULT.update(await W.run_algorithm(OursAdapter(self.store), ready=shape["in_flight"], **shape))


def cmd_trainer(args: argparse.Namespace) -> None:
    """One run of agl_async (this process is the algorithm; it starts the runner processes)."""
    import resource

    from agl_async import ClientServerExecutionStrategy, Trainer

    shape = json.loads(args.shape)
    client = TimedStoreClient(args.url, auth_token="", max_connections=max(100, 2 * shape["window"] + 16))
    client.latency_dir = args.latency_dir
    strategy = ClientServerExecutionStrategy(
        role="both", n_runners=args.processes, managed_store=False, graceful_timeout=30.0
    )
    trainer = Trainer(
        strategy=strategy, store=client, algorithm=ProductionAlgorithm(shape), concurrency=args.concurrency
    )
    trainer.fit(ProductionAgent(shape["max_rounds"], shape["sleep"]))
    from agl_async.tracing import tracing_enabled

    RESULT["spans_via"] = "opentelemetry" if tracing_enabled() else "add_many_spans"
    _latencies(args.latency_dir).flush()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    RESULT["algorithm_cpu_s"] = me.ru_utime + me.ru_stime
    RESULT["children_cpu_s"] = kids.ru_utime + kids.ru_stime
    print(json.dumps(RESULT), flush=True)


# ============================================================================ the driver
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the store server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the store server did not listen on {port} within {timeout:.0f} s")


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(pid: int, children: dict[int, list[int]]) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            out.append(child)
            todo.append(child)
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def _read_proc(pid: int) -> tuple[float, float] | None:
    """(CPU seconds, peak RSS MiB) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        hwm = 0.0
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
                    break
    except (OSError, ValueError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK, hwm


@dataclass
class Sampler:
    """Samples CPU and peak RSS of the server and of the trainer's process tree every 0.2 s."""

    server: int
    trainer: int
    interval: float = 0.2
    last: dict[int, tuple[float, float]] = field(default_factory=dict)  # pid -> (cpu, hwm)
    role: dict[int, str] = field(default_factory=dict)
    series: list[tuple[float, dict[str, float]]] = field(default_factory=list)  # (time, cpu by role)
    max_runners: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        children = _children_map()
        pids = {self.server: "server", self.trainer: "algorithm"}
        runners = _descendants(self.trainer, children)
        pids.update({pid: "runners" for pid in runners})
        self.max_runners = max(self.max_runners, len(runners))
        for pid, role in pids.items():
            seen = _read_proc(pid)
            if seen is not None:  # both only grow (an exiting process may read as 0 MiB)
                before = self.last.get(pid, (0.0, 0.0))
                self.last[pid] = (max(seen[0], before[0]), max(seen[1], before[1]))
                self.role[pid] = role
        by_role: dict[str, float] = {}
        for pid, (cpu, _) in self.last.items():
            role = self.role[pid]
            by_role[role] = by_role.get(role, 0.0) + cpu
        self.series.append((time.time(), by_role))

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def cpu_at(self, when: float, role: str | None = None) -> float:
        """CPU seconds used by ``role`` (all roles: None) up to ``when``, interpolated."""

        def total(by_role: dict[str, float]) -> float:
            return sum(by_role.values()) if role is None else by_role.get(role, 0.0)

        series = self.series
        if not series:
            return 0.0
        for (t0, c0), (t1, c1) in itertools.pairwise(series):
            if t0 <= when <= t1:
                a, b = total(c0), total(c1)
                return a + (b - a) * (when - t0) / max(t1 - t0, 1e-9)
        return total(series[0][1] if when < series[0][0] else series[-1][1])

    def peak(self, role: str) -> float:
        return sum(self.each(role))

    def each(self, role: str) -> list[float]:
        return sorted(
            (hwm for pid, (_, hwm) in self.last.items() if self.role.get(pid) == role), reverse=True
        )


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _wait4(proc: subprocess.Popen[Any], timeout: float) -> float:
    """Reap ``proc`` (within ``timeout``) and return the CPU seconds of it and its reaped children."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        time.sleep(0.05)
    _kill_group(proc)
    return float("nan")


def _percentiles(directory: str) -> dict[str, float]:
    values = array.array("d")
    for path in Path(directory).glob("lat-*.bin"):
        data = path.read_bytes()
        values.frombytes(data[: len(data) - len(data) % values.itemsize])
    if not values:
        return {"requests": 0}
    ordered = sorted(values)
    n = len(ordered)
    return {
        "requests": n,
        "p50_ms": 1000 * ordered[n // 2],
        "p99_ms": 1000 * ordered[min(n - 1, int(n * 0.99))],
    }


@dataclass
class System:
    key: str  # "ours" / "peer"
    python: str

    def server_argv(self, port: int) -> list[str]:
        if self.key == "ours":
            return [
                self.python,
                "-m",
                "agl_async.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--token",
                "",
            ]
        return [
            self.python,
            "-m",
            "agentlightning.cli.store",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "WARNING",
        ]

    def trainer_argv(self, url: str, shape: W.Shape, config: dict[str, Any], latency_dir: str) -> list[str]:
        common = ["trainer", "--url", url, "--shape", json.dumps(shape.args()), "--latency-dir", latency_dir]
        if self.key == "ours":
            return [
                self.python,
                str(Path(__file__)),
                *common,
                "--processes",
                str(config["processes"]),
                "--concurrency",
                str(config["concurrency"]),
            ]
        return [
            self.python,
            str(PEER_SCRIPT),
            *common,
            "--runners",
            str(config["runners"]),
            "--poll-interval",
            str(config["poll"]),
        ]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
        env["AGENTOPS_LOG_LEVEL"] = "ERROR"
        if self.key == "ours":
            env["PYTHONPATH"] = str(ROOT)
        return env


def run_one(system: System, shape: W.Shape, config: dict[str, Any], log: Any) -> dict[str, Any]:
    """One run: a fresh server and a fresh trainer; the figures of ``config`` on ``shape``."""
    port = _free_port()
    env = system.env()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="agl-prod-") as tmp:
        server_log = open(Path(tmp, "server.log"), "w")
        server = subprocess.Popen(
            system.server_argv(port),
            stdout=server_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        trainer: subprocess.Popen[str] | None = None
        try:
            _wait_listening(port, server)
            latency_dir = Path(tmp, "latency")
            latency_dir.mkdir()
            trainer_log = open(Path(tmp, "trainer.log"), "w")
            started = time.time()
            trainer = subprocess.Popen(
                system.trainer_argv(f"http://127.0.0.1:{port}", shape, config, str(latency_dir)),
                stdout=subprocess.PIPE,
                stderr=trainer_log,
                text=True,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            sampler = Sampler(server.pid, trainer.pid)
            sampler.sample()
            thread = sampler.start()
            out: list[str] = []
            reader = threading.Thread(target=lambda: out.extend(trainer.stdout or []), daemon=True)  # type: ignore[union-attr]
            reader.start()
            trainer_cpu = _wait4(trainer, RUN_TIMEOUT)
            reader.join(10)
            sampler.stop()
            thread.join()
            finished = time.time()
            server.send_signal(signal.SIGINT)
            server_cpu = _wait4(server, 60)
            trainer_log.close()
            server_log.close()
            lines = [line for line in out if line.startswith("{")]
            if trainer.returncode != 0 or not lines:
                tail = Path(tmp, "trainer.log").read_text()[-2500:]
                raise RuntimeError(f"trainer exited {trainer.returncode}: {tail}")
            result = json.loads(lines[-1])
            latency = _percentiles(str(latency_dir))
        finally:
            _kill_group(server)
            if trainer is not None:
                _kill_group(trainer)
    seconds = result["end"] - result["start"]
    tasks = result["tasks"]
    window_cpu = sampler.cpu_at(result["end"]) - sampler.cpu_at(result["start"])
    mean_agent = result["agent_seconds"] / max(1, result["succeeded"])
    rate = tasks / seconds
    sample = {
        "rollouts_per_s": rate,
        "spans_per_s": result["spans"] / seconds,
        "efficiency": rate * mean_agent / shape.in_flight,
        "mean_agent_s": mean_agent,
        "seconds": seconds,
        "wall_s": finished - started,
        "ready_s": result.get("ready_s", float("nan")),
        "spans_via": result.get("spans_via", "opentelemetry (peer)" if system.key == "peer" else "?"),
        **latency,
        "server_peak_rss_mib": sampler.peak("server"),
        "runners_peak_rss_mib": sampler.peak("runners"),
        "algorithm_peak_rss_mib": sampler.peak("algorithm"),
        "runner_processes": sampler.max_runners,
        "runner_side_peak_rss_each_mib": [round(x, 1) for x in sampler.each("runners")],
        "cpu_ms_per_rollout": 1000 * window_cpu / tasks,
        **{
            f"cpu_ms_per_rollout_{role}": 1000
            * (sampler.cpu_at(result["end"], role) - sampler.cpu_at(result["start"], role))
            / tasks
            for role in ("server", "algorithm", "runners")
        },
        "cpu_ms_per_rollout_whole_run": 1000 * (trainer_cpu + server_cpu) / tasks,
        "server_cpu_ms_per_rollout": 1000 * server_cpu / tasks,
        "not_ok": result["failed"] + result["bad_spans"] + result["lost"],
        "failed": result["failed"],
        "bad_spans": result["bad_spans"],
        "lost": result["lost"],
        "errors": result.get("errors", []),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    log(
        f"  {system.key:4} {shape.name:11} {_config_label(system.key, config):22} "
        f"{rate:7.1f} rollouts/s  eff {sample['efficiency']:.2f}  "
        f"cpu {sample['cpu_ms_per_rollout']:6.1f} ms/r  "
        f"p50/p99 {latency.get('p50_ms', float('nan')):.1f}/{latency.get('p99_ms', float('nan')):.1f} ms  "
        f"rss srv {sample['server_peak_rss_mib']:.0f} run {sample['runners_peak_rss_mib']:.0f} MiB  "
        f"not ok {sample['not_ok']}  load {sample['load_before'][0]:.1f}->{sample['load_after'][0]:.1f}"
    )
    return sample


def _git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], capture_output=True, text=True, cwd=ROOT, timeout=30
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "agl_async")),
    }


def _config_label(key: str, config: dict[str, Any]) -> str:
    if key == "ours":
        return f"{config['processes']} proc x {config['concurrency']}"
    return f"{config['runners']} proc, poll {config['poll']:g} s"


def plan_runs(quick: bool, scan: bool, have_peer: bool) -> list[tuple[str, W.Shape, dict[str, Any]]]:
    """(system, shape, config) in the order they run: for each shape, ours then the peer's."""
    runs: list[tuple[str, W.Shape, dict[str, Any]]] = []
    shapes = W.QUICK_SHAPES if quick else W.SHAPES
    for shape in shapes.values():
        n = shape.in_flight
        ours = [{"processes": 2, "concurrency": n // 2}]
        if not quick and n >= 64:
            ours.append({"processes": 4, "concurrency": n // 4})
        runs += [("ours", shape, c) for c in ours]
        if have_peer:
            polls = [0.1] if quick else [5.0, 0.1]
            runs += [("peer", shape, {"runners": n, "poll": p}) for p in polls]
    if scan and not quick:
        for n in sorted(set(SCAN_OURS) | set(SCAN_PEER)):
            shape = W.scan_shape(n)
            if n in SCAN_OURS:
                runs.append(("ours", shape, {"processes": 2, "concurrency": n // 2}))
            if n in SCAN_OURS and n >= 128:
                runs.append(("ours", shape, {"processes": 4, "concurrency": n // 4}))
            if have_peer and n in SCAN_PEER:
                runs.append(("peer", shape, {"runners": n, "poll": 0.1}))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    trainer = sub.add_parser("trainer", help="(internal) one run of agl_async")
    trainer.add_argument("--url", required=True)
    trainer.add_argument("--shape", required=True)
    trainer.add_argument("--processes", type=int, required=True)
    trainer.add_argument("--concurrency", type=int, required=True)
    trainer.add_argument("--latency-dir")
    parser.add_argument("--peer", default=os.environ.get("AGL_PEER_PYTHON"), help="Agent-Lightning's python")
    parser.add_argument("--quick", action="store_true", help="small shapes, one configuration each (< 3 min)")
    parser.add_argument(
        "--scan", action="store_true", help="also raise the in-flight count until the rate stops growing"
    )
    parser.add_argument("--only", help="comma-separated shape names to run")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    if args.command == "trainer":
        cmd_trainer(args)
        return

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    systems = {"ours": System("ours", sys.executable)}
    if args.peer:
        systems["peer"] = System("peer", args.peer)
    runs = plan_runs(args.quick, args.scan, "peer" in systems)
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if r[1].name in wanted]
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    load_start = [round(x, 2) for x in os.getloadavg()]
    log(f"production benchmark: {len(runs)} runs x {args.repeat}, load {load_start}")
    results: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for key, shape, config in runs:
            entry = {
                "system": key,
                "shape": shape.name,
                "shape_args": shape.args(),
                "config": config,
                "rep": rep,
            }
            try:
                entry["sample"] = run_one(systems[key], shape, config, log)
            except Exception as exc:  # a failed run is reported, not fatal
                entry["error"] = f"{type(exc).__name__}: {exc}"[-3000:]
                log(f"  {key} {shape.name} {config}: ERROR {entry['error'][-500:]}")
            results.append(entry)
    report = {
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "cores": os.cpu_count(),
        "peer": args.peer,
        "load_start": load_start,
        "load_end": [round(x, 2) for x in os.getloadavg()],
        "git": _git_commit(),
        "runs": results,
    }
    report["targets"] = targets(report)
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    suffix = "-quick" if args.quick else ""
    (RESULTS / f"production-{started.replace(':', '').replace('-', '')}{suffix}.json").write_text(text + "\n")
    if not args.quick and not args.only:
        (RESULTS / "production-latest.json").write_text(text + "\n")
        (RESULTS / "production-latest.md").write_text(render_markdown(report) + "\n")
    print(render_markdown(report))


# ============================================================================ targets and rendering
COLUMNS = [
    ("rollouts_per_s", "rollouts/s", 1),
    ("spans_per_s", "spans/s", 0),
    ("efficiency", "efficiency", 2),
    ("p50_ms", "request p50 ms", 2),
    ("p99_ms", "request p99 ms", 1),
    ("server_peak_rss_mib", "server peak RSS MiB", 0),
    ("runners_peak_rss_mib", "runners peak RSS MiB (sum)", 0),
    ("cpu_ms_per_rollout", "CPU ms/rollout", 1),
    ("cpu_ms_per_rollout_server", "… server", 1),
    ("cpu_ms_per_rollout_runners", "… runners", 1),
    ("not_ok", "not ok", 0),
]
PEER_NAME = "Agent-Lightning 0.3.0"


def _groups(report: dict[str, Any]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for run in report["runs"]:
        label = _config_label(run["system"], run["config"])
        groups.setdefault((run["shape"], run["system"], label), []).append(run)
    return groups


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r["sample"][key] for r in runs if "sample" in r and key in r["sample"]]
    return statistics.median(values) if values else None


def _memory(runs: list[dict[str, Any]]) -> float | None:
    server, runners = _median(runs, "server_peak_rss_mib"), _median(runs, "runners_peak_rss_mib")
    return None if server is None or runners is None else server + runners


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, judged on this report (the peer at its tuned 0.1 s poll)."""
    groups = _groups(report)
    out: list[dict[str, Any]] = []
    quick = bool(report.get("quick"))
    # 1. single mode: our efficiency at the same in-flight count (not on --quick's tiny shapes)
    for (shape, system, label), runs in groups.items():
        if quick:
            break
        if system == "ours" and shape.startswith("single"):
            eff = _median(runs, "efficiency")
            out.append(
                {
                    "target": f"{shape} ({label}): efficiency ≥ 0.9",
                    "measured": "—" if eff is None else f"{eff:.2f}",
                    "met": None if eff is None else eff >= 0.9,
                }
            )
    # 2. zero lost / failed-check rollouts, everywhere
    bad = sum(r["sample"]["not_ok"] for r in report["runs"] if "sample" in r)
    errors = sum("error" in r for r in report["runs"])
    out.append(
        {
            "target": "every rollout succeeded and passed the span check (both systems, every run)",
            "measured": f"{bad} not ok, {errors} failed runs",
            "met": bad == 0 and errors == 0,
        }
    )

    # 3. best configurations (the --scan runs only): rate, CPU, memory
    def best(system: str) -> tuple[str, list[dict[str, Any]]] | None:
        candidates = [
            (k, runs)
            for k, runs in groups.items()
            if k[1] == system and (system == "ours" or "poll 0.1" in k[2]) and k[0].startswith("scan")
        ]
        rated = [(_median(runs, "rollouts_per_s") or 0.0, k, runs) for k, runs in candidates]
        if not rated:
            return None
        _, key, runs = max(rated, key=lambda x: x[0])
        return f"{key[0]}, {key[2]}", runs

    ours, peer = best("ours"), best("peer")
    if not (ours and peer):
        out.append(
            {
                "target": "best configurations (≥ 3x rollouts/s, ≤ 1/5 CPU per rollout, ≤ 1/2 memory)",
                "measured": "judged on a full run with --scan and the peer",
                "met": None,
            }
        )
    else:
        o_rate, p_rate = _median(ours[1], "rollouts_per_s"), _median(peer[1], "rollouts_per_s")
        o_cpu, p_cpu = _median(ours[1], "cpu_ms_per_rollout"), _median(peer[1], "cpu_ms_per_rollout")
        o_mem, p_mem = _memory(ours[1]), _memory(peer[1])
        where = f"agl_async: {ours[0]}; {PEER_NAME}: {peer[0]}"
        if o_rate and p_rate:
            out.append(
                {
                    "target": "best configurations: rollouts/s ≥ 3x Agent-Lightning's",
                    "measured": f"{o_rate:.1f} vs {p_rate:.1f} = {o_rate / p_rate:.2f}x ({where})",
                    "met": o_rate >= 3 * p_rate,
                }
            )
        if o_cpu and p_cpu:
            out.append(
                {
                    "target": "best configurations: CPU per rollout ≤ 1/5 of Agent-Lightning's",
                    "measured": f"{o_cpu:.1f} vs {p_cpu:.1f} ms = 1/{p_cpu / o_cpu:.1f} ({where})",
                    "met": o_cpu * 5 <= p_cpu,
                }
            )
        if o_mem and p_mem:
            out.append(
                {
                    "target": "best configurations: peak memory, server + runners, ≤ half of the peer's",
                    "measured": f"{o_mem:,.0f} vs {p_mem:,.0f} MiB = {o_mem / p_mem:.3f}x ({where})",
                    "met": o_mem * 2 <= p_mem,
                }
            )
    return out


def render_targets(report: dict[str, Any]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for t in report.get("targets") or targets(report):
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {verdict} |")
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    head = "| shape | system | configuration | " + " | ".join(label for _, label, _ in COLUMNS) + " | load |"
    lines = [head, "|---" * (4 + len(COLUMNS)) + "|"]
    for (shape, system, label), runs in _groups(report).items():
        samples = [r["sample"] for r in runs if "sample" in r]
        name = "agl_async" if system == "ours" else PEER_NAME
        if not samples:
            lines.append(f"| {shape} | {name} | {label} | " + " | ".join("error" for _ in COLUMNS) + " | |")
            continue
        cells = []
        for key, _, digits in COLUMNS:
            values = [s[key] for s in samples if key in s]
            cells.append(f"{statistics.median(values):,.{digits}f}" if values else "—")
        loads = ", ".join(f"{s['load_before'][0]:.1f}" for s in samples)
        lines.append(f"| {shape} | {name} | {label} | " + " | ".join(cells) + f" | {loads} |")
    return "\n".join(lines)


def render_shapes(report: dict[str, Any]) -> str:
    seen: dict[str, dict[str, Any]] = {}
    for run in report["runs"]:
        seen.setdefault(run["shape"], run["shape_args"])
    lines = [
        "| shape | mode | tasks | in flight | batch / window | rounds | sleep (s) | mean agent time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in seen.items():
        mean = (2 * (a["max_rounds"] + 1) / 2 + 1) * a["sleep"] / 2
        lines.append(
            f"| {name} | {a['mode']} | {a['tasks']} | {a['in_flight']} | {a['batch']} / {a['window']} "
            f"| 1-{a['max_rounds']} | {a['sleep']:g} | {mean:.2f} |"
        )
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    parts = [
        f"# Production workloads ({report['started']} → {report['finished']}, {report['cores']} cores)",
        "",
        f"Load average at start {report.get('load_start')}, at end {report.get('load_end')} "
        "(each run's is in its row).",
        "",
        "## Targets",
        "",
        render_targets(report),
        "",
        "## Shapes",
        "",
        render_shapes(report),
        "",
        "## Runs (medians)",
        "",
        render(report),
        "",
        *([f"- {n}" for n in report.get("notes", [])] + [""] if report.get("notes") else []),
    ]
    return "\n".join(parts)


if __name__ == "__main__":
    main()
