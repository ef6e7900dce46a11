"""Side-by-side benchmark report: agl_async against Agent-Lightning 0.3.0, same workloads, same run.

    python benchmarks/report.py                      # agl_async only (the peer is skipped with a note)
    AGL_PEER_PYTHON=/path/to/agentlightning-venv/bin/python python benchmarks/report.py
    python benchmarks/report.py --quick              # smoke test: tiny sizes, one repetition
    python benchmarks/report.py --docs-only          # re-render docs/performance.md from the latest JSON

``nox -s bench`` runs it on agl_async alone (plus the stand-alone store and model benchmarks);
``nox -s bench_compare`` first makes a venv with ``agentlightning==0.3.0`` and passes its interpreter.

How it measures. Each system gets one long-lived worker process running its own interpreter
(``benchmarks/workloads.py serve`` for agl_async, ``benchmarks/peer/agl_workloads.py serve`` for
Agent-Lightning, which is never imported here); the driver sends both the same commands, A then B,
for every configuration of a figure, repetition after repetition (A B A B …: drift of the machine
hits both). Import time and the start-up/shutdown/memory figures need a fresh interpreter per
sample and run as separate processes, interleaved the same way. Every figure is the median of
``--repeat`` samples (default 5), shown with min and max; ``ratio`` is agl_async ÷ Agent-Lightning.

Figures (see the issue "One-command, side-by-side benchmark report"):

1. no-op rollouts/s (``benchmarks/execution.py``'s workload): shm 1/4/16 runners, cs 1/2/4 processes;
2. the same with a 5 ms sleeping agent, shm with 16/64 runners (efficiency = rollouts/s ÷ runners/5 ms);
3. cs start-up (``execute`` start → first completed rollout) and shutdown (algorithm return →
   ``execute`` return), 2 runner processes;
4. ``import`` time in a fresh interpreter; peak RSS of one cs runner process;
5. store over HTTP (``benchmarks/http_store.py``): p50/p99 of dequeue and of update, 1/16 clients;
6. "minimal production scale", scaled: 4,096 rollouts in batches of 256, 32 runners (cs: 4
   processes x 8 concurrent agent loops), a 0.5 s agent writing 5 spans; efficiency = rollouts/s ÷
   (32 / 0.5 s).

Results: ``benchmarks/results/latest.json`` and ``latest.md`` (plus a time-stamped JSON copy), and
``docs/performance.md`` rendered from them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DOCS_PAGE = ROOT / "docs" / "performance.md"
OURS_SCRIPT = HERE / "workloads.py"
PEER_SCRIPT = HERE / "peer" / "agl_workloads.py"
PEER_NAME = "Agent-Lightning 0.3.0"
# `import pkg`, then every name of its __all__ resolved (agl_async imports its parts lazily, on first
# use of a name; agentlightning imports everything up front): wall and CPU seconds of both.
IMPORT_SNIPPET = (
    "import time; t, c = time.perf_counter(), time.process_time(); import {pkg} as m; "
    "a, b = time.perf_counter() - t, time.process_time() - c; "
    "[getattr(m, n) for n in getattr(m, '__all__', ())]; "
    "print(a, b, time.perf_counter() - t, time.process_time() - c)"
)
LOG_DIR = Path(tempfile.gettempdir()) / "agl-bench-logs"
SAMPLE_LOG: Path | None = None  # set by main(): one JSON line per sample


# ---------------------------------------------------------------------------- what is measured
@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 1


@dataclass
class Cell:
    """One configuration of a figure: the same command for both systems, one sample per call."""

    figure: str
    label: str
    kind: str  # "worker": a command to the long-lived worker; "fresh": a new interpreter per sample
    command: dict[str, Any]
    metrics: list[Metric]
    timeout: float
    derive: Callable[[dict[str, Any]], dict[str, float]] | None = None
    peer_from: Cell | None = None  # the peer's workload is identical to that cell's: not re-measured
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {"ours": [], "peer": []})
    errors: dict[str, list[str]] = field(default_factory=lambda: {"ours": [], "peer": []})


RPS = Metric("rollouts_per_s", "rollouts/s", "1/s", True, 0)
CPU = Metric("cpu_ms_per_rollout", "CPU per rollout, whole run (all processes)", "ms", False, 3)
EFF = Metric("efficiency", "efficiency", "", True, 3)


def _efficiency(ideal: float) -> Callable[[dict[str, Any]], dict[str, float]]:
    return lambda sample: {"efficiency": sample["rollouts_per_s"] / ideal}


FIGURE_TITLES = {
    "1": "No-op workload: rollouts/s (algorithm enqueues N and waits; runners dequeue + succeed)",
    "2": "5 ms `anyio.sleep` agent, shared-memory strategy: rollouts/s",
    "3": "Client-server start-up and shutdown (2 runner processes), seconds",
    "4": "Import time (fresh interpreter) and peak RSS of one client-server runner process",
    "5": "Store over HTTP: latency of dequeue and update (ms)",
    "6": 'Agent-Lightning\'s "minimal production scale", scaled: 4,096 rollouts, batches of 256, '
    "32 runners, 0.5 s agent writing 5 spans",
}


def build_cells(quick: bool, figures: set[str]) -> list[Cell]:
    cells: list[Cell] = []
    n1 = 200 if quick else 2000
    if "1" in figures:
        for mode, counts in (("shm", (1, 4, 16)), ("cs", (1, 2, 4))):
            for runners in counts:
                plural = runners > 1
                what = f"runner{'s' * plural}" if mode == "shm" else f"runner process{'es' * plural}"
                cells.append(
                    Cell(
                        "1",
                        f"{mode}, {runners} {what}, {n1} rollouts",
                        "worker",
                        {"fn": "noop", "args": {"mode": mode, "runners": runners, "n": n1}},
                        [RPS, CPU],
                        300,
                    )
                )
        # Our runner loop ends an attempt and claims the next rollout in one request
        # (finish_and_dequeue); Agent-Lightning has no such call, so its side is the row above.
        plain = {c.command["args"]["runners"]: c for c in cells if c.command["args"].get("mode") == "cs"}
        for runners, same in plain.items():
            args = {"mode": "cs", "runners": runners, "n": n1, "finish": True}
            cells.append(
                Cell(
                    "1",
                    f"{same.label}; agl_async: finish_and_dequeue",
                    "worker",
                    {"fn": "execution", "args": args},
                    [RPS, CPU],
                    300,
                    peer_from=same,
                )
            )
    if "2" in figures:
        for runners in (16, 64):
            cells.append(
                Cell(
                    "2",
                    f"shm, {runners} runners, {n1} rollouts",
                    "worker",
                    {"fn": "execution", "args": {"mode": "shm", "runners": runners, "n": n1, "sleep": 0.005}},
                    [RPS, EFF],
                    300,
                    derive=_efficiency(runners / 0.005),
                )
            )
    if "3" in figures or "4" in figures:
        life_n = 50 if quick else 200
        cells.append(
            Cell(
                "3",
                f"cs, 2 runner processes, {life_n} no-op rollouts (fresh interpreter)",
                "fresh",
                {"fn": "lifecycle", "args": {"runners": 2, "n": life_n}},
                [
                    Metric("startup_s", "start-up: execute → first completed rollout", "s", False, 3),
                    Metric("shutdown_s", "shutdown: algorithm return → execute return", "s", False, 3),
                    Metric("overhead_s", "start-up + shutdown", "s", False, 3),
                    Metric("runner_rss_mib", "peak RSS of one runner process (figure 4)", "MiB", False, 1),
                    Metric(
                        "runner_private_mib",
                        "… of which private (not shared with the parent)",
                        "MiB",
                        False,
                        1,
                    ),
                ],
                300,
                derive=lambda s: {"overhead_s": s["startup_s"] + s["shutdown_s"]},
            )
        )
    if "4" in figures:
        cells.append(
            Cell(
                "4",
                "`import` of the package, fresh interpreter (agl_async / agentlightning)",
                "import",
                {},
                [
                    Metric("import_s", "`import pkg` (wall)", "s", False, 3),
                    Metric("import_cpu_s", "`import pkg` (CPU)", "s", False, 3),
                    Metric("import_all_s", "`import pkg` + every name in `__all__` (wall)", "s", False, 3),
                    Metric("import_all_cpu_s", "`import pkg` + every name in `__all__` (CPU)", "s", False, 3),
                ],
                180,
            )
        )
    if "5" in figures:
        duration = 0.5 if quick else 3.0
        for clients in (1, 16):
            cells.append(
                Cell(
                    "5",
                    f"{clients} concurrent client{'s' if clients > 1 else ''}, {duration:g} s",
                    "worker",
                    {"fn": "http", "args": {"clients": clients, "duration": duration}},
                    [
                        Metric("dequeue_p50_ms", "dequeue p50", "ms", False, 2),
                        Metric("dequeue_p99_ms", "dequeue p99", "ms", False, 2),
                        Metric("update_p50_ms", "update p50", "ms", False, 2),
                        Metric("update_p99_ms", "update p99", "ms", False, 2),
                        Metric("rollouts_per_s", "dequeue+update cycles/s", "1/s", True, 0),
                    ],
                    240,
                )
            )
    if "6" in figures:
        n6, batch6, sleep6 = (64, 32, 0.1) if quick else (4096, 256, 0.5)
        for mode, runners, concurrency in (("shm", 32, 1), ("cs", 4, 8)):
            what = "32 runners" if mode == "shm" else "4 runner processes x 8 agent loops"
            cells.append(
                Cell(
                    "6",
                    f"{mode}, {what}, {n6} rollouts",
                    "worker",
                    {
                        "fn": "execution",
                        "args": {
                            "mode": mode,
                            "runners": runners,
                            "n": n6,
                            "sleep": sleep6,
                            "spans": 5,
                            "batch": batch6,
                            "concurrency": concurrency,
                        },
                    },
                    [RPS, EFF],
                    900,
                    derive=_efficiency(32 / sleep6),
                )
            )
    return cells


# ---------------------------------------------------------------------------- the two systems
class Worker:
    """A long-lived ``serve`` process of one system: one JSON command in, one JSON answer out."""

    def __init__(self, name: str, python: str, script: Path, env: dict[str, str]) -> None:
        self.name, self.python, self.script, self.env = name, python, script, env
        self.proc: subprocess.Popen[str] | None = None
        self.answers: queue.Queue[str | None] = queue.Queue()
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-worker.log"

    def _start(self) -> subprocess.Popen[str]:
        log = open(self.log_path, "a")
        proc = subprocess.Popen(
            [self.python, str(self.script), "serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=self.env,
            cwd=ROOT,
            start_new_session=True,  # its own process group: a hung sample can be killed whole
        )
        self.answers = queue.Queue()
        stdout, answers = proc.stdout, self.answers

        def read() -> None:
            assert stdout is not None
            for line in stdout:
                answers.put(line)
            answers.put(None)

        threading.Thread(target=read, daemon=True).start()
        self.proc = proc
        return proc

    def call(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self.proc if self.proc is not None and self.proc.poll() is None else self._start()
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(command) + "\n")
        proc.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return {"error": f"no answer within {timeout:.0f} s (worker killed; log: {self.log_path})"}
        if line is None:
            self.kill()
            return {"error": f"worker exited (log: {self.log_path}): {_tail(self.log_path)}"}
        answer: dict[str, Any] = json.loads(line)
        return answer

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.proc = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None


def _tail(path: Path, chars: int = 1500) -> str:
    try:
        return path.read_text()[-chars:]
    except OSError:
        return ""


@dataclass
class System:
    key: str  # "ours" / "peer"
    name: str
    python: str
    script: Path
    package: str
    env: dict[str, str]
    worker: Worker | None = None

    def sample(self, cell: Cell) -> dict[str, Any]:
        if cell.kind == "worker":
            if self.worker is None:
                self.worker = Worker(self.key, self.python, self.script, self.env)
            return self.worker.call(cell.command, cell.timeout)
        if cell.kind == "import":
            argv = [self.python, "-c", IMPORT_SNIPPET.format(pkg=self.package)]
            return self._fresh(argv, cell.timeout, _parse_import)
        args = [f"--{k}={v}" for k, v in cell.command["args"].items()]
        argv = [self.python, str(self.script), cell.command["fn"], *args]
        return self._fresh(argv, cell.timeout, json.loads)

    def _fresh(self, argv: list[str], timeout: float, parse: Callable[[str], Any]) -> dict[str, Any]:
        try:
            done = subprocess.run(
                argv, capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=timeout
            )
        except subprocess.TimeoutExpired:
            return {"error": f"{argv[1:3]} took more than {timeout:.0f} s"}
        if done.returncode != 0:
            return {"error": f"exit {done.returncode}: {done.stderr[-1500:]}"}
        return {"ok": parse(done.stdout.strip().splitlines()[-1])}

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def warm_up(self) -> None:
        """Import the package once (writing its bytecode caches), outside any measurement."""
        subprocess.run([self.python, "-c", f"import {self.package}"], env=self.env, cwd=ROOT, timeout=300)


def _parse_import(out: str) -> dict[str, float]:
    wall, cpu, full_wall, full_cpu = map(float, out.split())
    return {"import_s": wall, "import_cpu_s": cpu, "import_all_s": full_wall, "import_all_cpu_s": full_cpu}


def _clean_env(extra: dict[str, str]) -> dict[str, str]:
    # PYTHONDONTWRITEBYTECODE would make every import of agl_async (an editable install) compile
    # its sources, while the peer's site-packages come with the .pyc files pip wrote: unfair.
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    return env


def make_systems(peer_python: str | None) -> tuple[System, System | None, str | None]:
    ours = System("ours", "agl_async", sys.executable, OURS_SCRIPT, "agl_async", _clean_env({}))
    if not peer_python:
        return ours, None, "AGL_PEER_PYTHON is not set (and no --peer): Agent-Lightning columns skipped"
    if not Path(peer_python).exists():
        return ours, None, f"peer interpreter {peer_python} does not exist: Agent-Lightning columns skipped"
    env = _clean_env({"LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    peer = System("peer", PEER_NAME, peer_python, PEER_SCRIPT, "agentlightning", env)
    return ours, peer, None


# ---------------------------------------------------------------------------- running
def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run_cells(
    cells: list[Cell],
    systems: list[System],
    repeat: int,
    log: Callable[[str], None],
    budget: float | None = None,
) -> None:
    """Every cell ``repeat`` times, each system in turn (A B A B …), figure by figure. With a
    ``budget`` (seconds), no further repetition starts once the last one's duration would overrun it
    (at least one always runs); each figure's sample count is recorded with it."""
    started = time.monotonic()
    for figure in dict.fromkeys(cell.figure for cell in cells):
        these = [c for c in cells if c.figure == figure]
        last = 0.0
        for rep in range(repeat):
            if budget is not None and rep > 0 and time.monotonic() - started + last > budget:
                log(f"[fig {figure}] time budget of {budget:.0f} s reached after {rep} repetitions")
                break
            rep_started = time.monotonic()
            for cell in these:
                for system in systems:
                    if system.key == "peer" and cell.peer_from is not None:
                        continue
                    started = time.perf_counter()
                    answer = system.sample(cell)
                    took = time.perf_counter() - started
                    if SAMPLE_LOG is not None:  # raw samples as they come: survives a crash of the driver
                        with SAMPLE_LOG.open("a") as sink:
                            record = {"figure": figure, "cell": cell.label, "system": system.key, **answer}
                            sink.write(json.dumps(record) + "\n")
                    if "ok" in answer:
                        sample = dict(answer["ok"])
                        if cell.derive is not None:
                            sample.update(cell.derive(sample))
                        cell.samples[system.key].append(sample)
                        shown = ", ".join(
                            f"{m.key}={sample.get(m.key, float('nan')):.4g}" for m in cell.metrics
                        )
                    else:
                        cell.errors[system.key].append(answer["error"])
                        shown = "ERROR " + answer["error"].strip().splitlines()[-1][:200]
                    log(
                        f"[fig {figure} rep {rep + 1}/{repeat}] {system.key:4} {cell.label}: {shown}"
                        f"  ({took:.1f} s, load {loadavg()[:1]})"
                    )
            last = time.monotonic() - rep_started


def summarise(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def cell_report(cell: Cell, systems: list[str]) -> dict[str, Any]:
    if cell.peer_from is not None:
        cell.samples["peer"] = cell.peer_from.samples["peer"]
    metrics: dict[str, Any] = {}
    for metric in cell.metrics:
        entry: dict[str, Any] = {
            "label": metric.label,
            "unit": metric.unit,
            "higher_is_better": metric.higher_is_better,
            "digits": metric.digits,
        }
        for key in systems:
            entry[key] = summarise([s[metric.key] for s in cell.samples[key] if metric.key in s])
        ours, peer = entry.get("ours"), entry.get("peer")
        if ours and peer and peer["median"]:
            entry["ratio"] = ours["median"] / peer["median"]
        metrics[metric.key] = entry
    return {
        "figure": cell.figure,
        "label": cell.label,
        "command": cell.command,
        "metrics": metrics,
        "samples": {k: cell.samples[k] for k in systems},
        "errors": {k: v for k, v in cell.errors.items() if v},
    }


def machine_info(peer: System | None) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    if peer is not None:
        version = subprocess.run(
            [peer.python, "-c", "import platform, importlib.metadata as m; "
             "print(platform.python_version(), m.version('agentlightning'))"],
            capture_output=True, text=True, env=peer.env, timeout=60,
        ).stdout.split()  # fmt: skip
        if len(version) == 2:
            info["peer_python"], info["peer_version"] = version
    return info


def git_state() -> dict[str, Any]:
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


def extras(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """agl_async-only benchmarks (store ops/s, model costs): their own JSON, kept as they print it."""
    out: dict[str, Any] = {}
    runs = {
        "store_ops": ["--n", "2000" if quick else "20000"],
        "models": ["--number", "2000" if quick else "20000"],
    }
    for name, args in runs.items():
        log(f"[extras] {name}.py {' '.join(args)}")
        done = subprocess.run(
            [sys.executable, str(HERE / f"{name}.py"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=600,
        )
        out[name] = json.loads(done.stdout) if done.returncode == 0 else {"error": done.stderr[-1500:]}
    return out


# ---------------------------------------------------------------------------- targets and rendering
def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    cells = report["cells"]

    def metric(
        figure: str, key: str, prefix: str = "", finish: bool = False
    ) -> list[tuple[str, dict[str, Any]]]:
        return [
            (c["label"], c["metrics"][key])
            for c in cells
            if c["figure"] == figure
            and key in c["metrics"]
            and c["label"].startswith(prefix)
            and ("finish_and_dequeue" in c["label"]) == finish
        ]

    def ratio_target(
        name: str, rows: list[tuple[str, dict[str, Any]]], bound: float, at_least: bool
    ) -> dict[str, Any]:
        ratios = [(label, m.get("ratio")) for label, m in rows]
        known = [r for _, r in ratios if r is not None]
        if not known:
            return {"target": name, "measured": "no peer measurement", "met": None}
        worst = min(known) if at_least else max(known)
        met = all((r >= bound) if at_least else (r <= bound) for r in known) and len(known) == len(ratios)
        shown = ", ".join(_ratio(r) if r is not None else "n/a" for _, r in ratios)
        return {"target": name, "measured": shown, "worst": worst, "met": met}

    out = [
        ratio_target(
            "shared-memory rollouts/s ≥ 10x Agent-Lightning (fig. 1)",
            metric("1", "rollouts_per_s", "shm"),
            10,
            True,
        ),
        ratio_target(
            "client-server rollouts/s ≥ 3x Agent-Lightning (fig. 1, identical store calls)",
            metric("1", "rollouts_per_s", "cs"),
            3,
            True,
        ),
        ratio_target(
            "client-server rollouts/s ≥ 3x Agent-Lightning (fig. 1, agl_async runner: finish_and_dequeue)",
            metric("1", "rollouts_per_s", "cs", finish=True),
            3,
            True,
        ),
    ]
    imports, full = metric("4", "import_s"), metric("4", "import_all_s")
    if imports and full and imports[0][1].get("ours") and full[0][1].get("ours"):
        value, whole = imports[0][1]["ours"]["median"], full[0][1]["ours"]["median"]
        out.append(
            {
                "target": "import ≤ 0.3 s (fig. 4; verdict on the whole public surface)",
                "measured": f"{value:.3f} s (`import agl_async`), {whole:.3f} s (+ every public name)",
                "met": whole <= 0.3,
            }
        )
    out.append(
        ratio_target(
            "cs start-up + shutdown ≤ 1/3 of Agent-Lightning's (fig. 3)",
            metric("3", "overhead_s"),
            1 / 3,
            False,
        )
    )
    out.append(
        ratio_target(
            "runner-process peak RSS ≤ 1/3 of Agent-Lightning's (fig. 4)",
            metric("3", "runner_rss_mib"),
            1 / 3,
            False,
        )
    )
    return out


def _ratio(ratio: float | None) -> str:
    if not ratio:
        return "—"
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def _fmt(value: float, digits: int) -> str:
    if abs(value) >= 1000 and digits <= 1:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _stat(entry: dict[str, Any] | None, digits: int, expected: int) -> str:
    if not entry:
        return "—"
    n = f", n={entry['n']}" if entry["n"] != expected else ""
    return (
        f"**{_fmt(entry['median'], digits)}** ({_fmt(entry['min'], digits)}-{_fmt(entry['max'], digits)}{n})"
    )


def render_table(report: dict[str, Any]) -> str:
    has_peer = report.get("peer_skipped") is None
    head = "| figure | configuration | metric | agl_async median (min-max) |"
    rule = "|---|---|---|---|"
    if has_peer:
        head += f" {PEER_NAME} median (min-max) | ratio (agl_async ÷ AL) |"
        rule += "---|---|"
    lines = [head, rule]
    for cell in report["cells"]:
        for m in cell["metrics"].values():
            unit = f" ({m['unit']})" if m["unit"] else ""
            arrow = "↑" if m["higher_is_better"] else "↓"
            ours = _stat(m.get("ours"), m["digits"], report["repeat"])
            row = f"| {cell['figure']} | {cell['label']} | {m['label']}{unit} {arrow} | {ours} |"
            if has_peer:
                ratio = m.get("ratio")
                theirs = _stat(m.get("peer"), m["digits"], report["repeat"])
                row += f" {theirs} | {_ratio(ratio)} |"
            lines.append(row)
    return "\n".join(lines)


def render_targets(report: dict[str, Any]) -> str:
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    for t in report["targets"]:
        verdict = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {verdict} |")
    return "\n".join(lines)


def render_errors(report: dict[str, Any]) -> str:
    lines = []
    for cell in report["cells"]:
        for key, errors in cell["errors"].items():
            for error in errors:
                last = error.strip().splitlines()[-1] if error.strip() else "?"
                lines.append(f"- fig. {cell['figure']} {cell['label']} ({key}): {last[:300]}")
    return "\n".join(lines)


def render_machine(report: dict[str, Any]) -> str:
    m = report["machine"]
    parts = [
        f"- CPU: {m['cpu']}, {m['cores']} cores"
        + (f", {m['memory_gib']} GiB RAM" if "memory_gib" in m else ""),
        f"- OS: {m['platform']}",
        f"- Python {m['python']} (agl_async)"
        + (
            f"; Python {m['peer_python']} with agentlightning {m['peer_version']}"
            if "peer_python" in m
            else ""
        ),
        f"- load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}",
        f"- measured {report['started']} → {report['finished']} (UTC), agl_async at commit "
        f"`{report['git']['commit']}`{' (with uncommitted changes)' if report['git']['dirty'] else ''}",
        f"- {report['repeat']} repetitions per figure, interleaved; median (min-max)"
        + (" — **quick mode: tiny sizes, not representative**" if report["quick"] else "")
        + (" — interrupted before the end" if report.get("interrupted") else ""),
    ]
    return "\n".join(parts)


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# agl_async benchmark report ({report['started']})", "", render_machine(report), ""]
    if report.get("peer_skipped"):
        out += [f"> {report['peer_skipped']}", ""]
    out += ["## Targets", "", render_targets(report), "", "## Figures", "", render_table(report), ""]
    errors = render_errors(report)
    if errors:
        out += ["## Failed samples", "", errors, ""]
    if report.get("extras"):
        out += ["## agl_async-only benchmarks", ""]
        ops = report["extras"].get("store_ops", {}).get("results")
        if ops:
            out += ["Store operations per second (one task, asyncio; `benchmarks/store_ops.py`):", ""]
            out += ["| store | " + " | ".join(next(iter(ops.values()))) + " |"]
            out += ["|---|" + "---|" * len(next(iter(ops.values())))]
            out += [
                f"| {name} | " + " | ".join(f"{v:,}" for v in row.values()) + " |"
                for name, row in ops.items()
            ]
            out += [""]
        out += [
            "Full output of `store_ops.py` and `models.py`: `benchmarks/results/latest.json` (`extras`).",
            "",
        ]
    return "\n".join(out)


DOCS_INTRO = """\
# Performance

agl_async is measured side by side with [Agent-Lightning 0.3.0](https://pypi.org/project/agentlightning/)
— the same workloads, in the same run, on the same machine, each system in its own interpreter,
alternating A B A B so that drift of the machine hits both. This page is generated by
`benchmarks/report.py` from `benchmarks/results/latest.json`; do not edit it by hand.

## Reproduce

```bash
nox -s bench_compare      # makes .nox/agentlightning-0.3.0 (pip install agentlightning==0.3.0) on first use
nox -s bench              # agl_async alone
nox -s bench_production   # Agent-Lightning's production store workloads, both systems (about an hour)
# or, with an existing Agent-Lightning venv:
AGL_PEER_PYTHON=/path/to/venv/bin/python python benchmarks/report.py
```

What each figure runs is described in `benchmarks/report.py`, `benchmarks/workloads.py` (ours) and
`benchmarks/peer/agl_workloads.py` (Agent-Lightning, run by its own interpreter). Ratios are
agl_async ÷ Agent-Lightning; ↑ marks metrics where higher is better, ↓ where lower is. Both
systems run their stock in-memory store and their own strategies; Agent-Lightning's runners poll an
empty queue every 10 ms (its store has no long poll), ours long-poll.
"""


def render_docs(report: dict[str, Any]) -> str:
    parts = [DOCS_INTRO, "## Machine", "", render_machine(report), ""]
    if report.get("peer_skipped"):
        parts += [f"!!! note\n    {report['peer_skipped']}", ""]
    parts += ["## Targets", "", render_targets(report), ""]
    if report.get("notes"):
        parts += ["## Notes", "", *[f"- {n}" for n in report["notes"]], ""]
    parts += ["## Results", ""]
    for figure, title in FIGURE_TITLES.items():
        rows = [c for c in report["cells"] if c["figure"] == figure]
        if not rows:
            continue
        sub = dict(report, cells=rows)
        parts += [f"### {figure}. {title}", "", render_table(sub), ""]
    errors = render_errors(report)
    if errors:
        parts += ["## Failed samples", "", errors, ""]
    parts += render_production()
    return "\n".join(parts)


PRODUCTION_INTRO = """\
Agent-Lightning's maintainers benchmark their store with a synthetic agent and three algorithm
modes (`tests/benchmark/benchmark_store.py` and the matrix of `.github/workflows/benchmark.yml` in
their repository). `benchmarks/production.py` re-creates that workload (our own code:
`benchmarks/production_workload.py`) and runs it on both systems in the topology their benchmark
uses — a store server process, a trainer process with the client-server strategy and
`managed_store=False`, runner processes, everything over HTTP — scaled to this machine:
Agent-Lightning with one runner process per in-flight rollout, at its runner's default 5 s
empty-queue poll and tuned to 0.1 s; agl_async with a few processes x `concurrency`. The `scan-*`
shapes raise the in-flight count until the rate stops growing: each system's best configuration.
CPU per rollout counts every process (server, algorithm, runners) during the measured phase, which
starts once every runner is registered. Peak RSS of the runners is the sum of each runner-side
process's peak (Agent-Lightning's forked runners share pages with their parent, which RSS counts
in each). Run it with `nox -s bench_production` (or `python benchmarks/production.py --scan --peer
PYTHON`; `--quick` for a smoke run under 3 minutes).
"""


def render_production() -> list[str]:
    """The section of docs/performance.md for ``benchmarks/production.py``'s latest full run."""
    path = RESULTS / "production-latest.json"
    if not path.exists():
        return []
    import production  # benchmarks/production.py

    report = json.loads(path.read_text())
    return [
        "## Production workloads (Agent-Lightning's store benchmark, re-created)",
        "",
        PRODUCTION_INTRO,
        f"Measured {report['started']} → {report['finished']} on {report['cores']} cores; load average "
        f"{report.get('load_start')} at start, {report.get('load_end')} at end (each run's load is in "
        "its row; the figures of a loaded machine are not those of an idle one).",
        "",
        "### Targets",
        "",
        production.render_targets(report),
        "",
        "### Shapes",
        "",
        production.render_shapes(report),
        "",
        "### Runs (medians)",
        "",
        production.render(report),
        "",
        *([f"- {n}" for n in report.get("notes", [])] + [""] if report.get("notes") else []),
    ]


def write_outputs(report: dict[str, Any], docs: bool) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1, sort_keys=False)
    stamp = report["started"].replace(":", "").replace("-", "")
    (RESULTS / f"report-{stamp}{'-quick' if report['quick'] else ''}.json").write_text(text + "\n")
    (RESULTS / "latest.json").write_text(text + "\n")
    (RESULTS / "latest.md").write_text(render_markdown(report) + "\n")
    if docs:
        DOCS_PAGE.write_text(render_docs(report) + "\n")


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, 1 repetition")
    parser.add_argument("--repeat", type=int, help="repetitions per figure (default 5; --quick: 1)")
    parser.add_argument("--repeat-long", type=int, help="repetitions for figure 6 (default: --repeat)")
    parser.add_argument(
        "--budget-long", type=float, help="seconds for figure 6's repetitions (64+ s per sample)"
    )
    parser.add_argument(
        "--deadline", help="HH:MM (UTC): start no repetition of figure 6 that would end after it"
    )
    parser.add_argument(
        "--figures",
        default="1,2,3,4,5,6",
        help="comma-separated figure numbers; 7 also runs benchmarks/production.py (about an hour)",
    )
    parser.add_argument("--peer", default=os.environ.get("AGL_PEER_PYTHON"), help="Agent-Lightning's python")
    parser.add_argument("--no-peer", action="store_true", help="measure agl_async only")
    parser.add_argument("--extras", action="store_true", help="also run store_ops.py and models.py")
    parser.add_argument(
        "--reuse", type=Path, help="take the figures not measured now from this earlier report JSON"
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the docs page's notes")
    parser.add_argument(
        "--docs",
        action=argparse.BooleanOptionalAction,
        help="rewrite docs/performance.md (default: only for a full run with the peer measured)",
    )
    parser.add_argument("--docs-only", action="store_true", help="re-render the docs page from latest.json")
    args = parser.parse_args()

    if args.docs_only:
        report = json.loads((RESULTS / "latest.json").read_text())
        report["notes"] = report.get("notes", []) + args.note if args.note else report.get("notes", [])
        (RESULTS / "latest.json").write_text(json.dumps(report, indent=1) + "\n")
        (RESULTS / "latest.md").write_text(render_markdown(report) + "\n")
        DOCS_PAGE.write_text(render_docs(report) + "\n")
        print(f"wrote {DOCS_PAGE.relative_to(ROOT)}")
        return

    repeat = args.repeat or (1 if args.quick else 5)
    figures = {f.strip() for f in args.figures.split(",") if f.strip()}
    ours, peer, skipped = make_systems(None if args.no_peer else args.peer)
    systems = [ours] + ([peer] if peer else [])
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    global SAMPLE_LOG
    SAMPLE_LOG = LOG_DIR / f"samples-{started.replace(':', '')}.jsonl"
    LOG_DIR.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"agl_async benchmark report: figures {sorted(figures)}, {repeat} repetitions, load {loadavg()}")
    log(f"raw samples: {SAMPLE_LOG}; worker logs: {LOG_DIR}")
    if skipped:
        log(skipped)
    load_start = loadavg()
    cells = build_cells(args.quick, figures)

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)  # also when started in the background (SIGINT ignored there)
    signal.signal(signal.SIGTERM, stop)
    for system in systems:
        system.warm_up()
    interrupted = False
    try:
        short = [c for c in cells if c.figure != "6"]
        run_cells(short, systems, repeat, log)
        budget = args.budget_long
        if args.deadline:
            now = dt.datetime.now(dt.timezone.utc)
            hour, minute = map(int, args.deadline.split(":"))
            until = (now.replace(hour=hour, minute=minute, second=0, microsecond=0) - now).total_seconds()
            budget = until if budget is None else min(budget, until)
        run_cells([c for c in cells if c.figure == "6"], systems, args.repeat_long or repeat, log, budget)
        if "7" in figures:  # its own runs and result files; docs/performance.md includes them
            production = [sys.executable, str(HERE / "production.py"), "--scan"]
            production += ["--peer", peer.python] if peer is not None else []
            production += ["--quick"] if args.quick else []
            log(f"[fig 7] {' '.join(production)}")
            subprocess.run(production, cwd=ROOT, check=False)
    except KeyboardInterrupt:  # Ctrl-C: stop measuring, report what has been measured
        log("interrupted: the report covers the samples measured so far")
        interrupted = True
        for system in systems:
            if system.worker is not None:
                system.worker.kill()
    finally:
        for system in systems:
            system.close()
    report: dict[str, Any] = {
        "started": started,
        "finished": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick": args.quick,
        "repeat": repeat,
        "repeat_fig6": args.repeat_long or repeat,
        "interrupted": interrupted,
        "load_start": load_start,
        "load_end": loadavg(),
        "machine": machine_info(peer),
        "git": git_state(),
        "peer_skipped": skipped,
        "notes": args.note,
        "cells": [cell_report(c, [s.key for s in systems]) for c in cells],
    }
    if args.reuse:
        old = json.loads(args.reuse.read_text())
        kept = [c for c in old["cells"] if c["figure"] not in figures]
        for c in kept:
            c["reused_from"] = old["started"]
        report["cells"] = sorted(kept + report["cells"], key=lambda c: c["figure"])
        report["reused"] = {"from": old["started"], "load": [old["load_start"], old["load_end"]]}
    if args.extras:
        report["extras"] = extras(args.quick, log)
    report["targets"] = targets(report)
    docs = args.docs if args.docs is not None else (peer is not None and not args.quick)
    write_outputs(report, docs=docs)
    print(render_markdown(report))


if __name__ == "__main__":
    main()
