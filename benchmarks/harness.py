"""The standard-library half of the side-by-side workers, shared by both interpreters.

``benchmarks/workloads.py`` (agl_async) and ``benchmarks/peer/agl_workloads.py`` (Agent-Lightning,
run by its own interpreter) implement the same workloads on their own system; what does not
depend on the system — memory and CPU accounting, the JSON-lines command loop, the command line —
lives here, so both sides measure and answer in exactly the same way. Standard library only.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["main", "memory_status", "with_cpu", "write_memory_status"]


def memory_status() -> dict[str, float]:
    """This process's peak RSS, RSS and private (unshared) memory in MiB, from ``/proc``."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) / 1024
        private = 0
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
        out["private"] = private / 1024
    except OSError:  # not Linux: use what getrusage knows
        out["VmHWM"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def write_memory_status(path: Path) -> None:
    """Write :func:`memory_status` as JSON (once, when a runner ends: blocking is harmless)."""
    path.write_text(json.dumps(memory_status()))


def with_cpu(n: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``run()``'s sample plus the CPU time the whole run cost (this process, all its threads, and
    its children, which are reaped by the end of a run), per rollout: a figure that, unlike the
    rates, barely depends on what else the machine is doing."""

    def times() -> tuple[float, float]:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime

    before = times()
    sample = run()
    after = times()
    sample["cpu_ms_per_rollout"] = 1000 * (after[0] - before[0] + after[1] - before[1]) / n
    sample["cpu_children_ms_per_rollout"] = 1000 * (after[1] - before[1]) / n
    return sample


def _serve(commands: Mapping[str, Callable[..., dict[str, Any]]]) -> None:
    """Answer JSON commands (``{"fn": ..., "args": {...}}``) from stdin, one JSON line each on the
    original stdout; stdout itself is pointed at stderr so that nothing a child process prints
    can corrupt the answers."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            answer: dict[str, Any] = {"ok": commands[command["fn"]](**command.get("args", {}))}
        except Exception:
            answer = {"error": traceback.format_exc(limit=8)}
        answers.write(json.dumps(answer) + "\n")


def main(commands: Mapping[str, Callable[..., dict[str, Any]]]) -> None:
    """``serve`` (the command loop) or ``lifecycle [--runners R] [--n N]`` (one sample, printed)."""
    if sys.argv[1:2] == ["serve"]:
        _serve(commands)
    elif sys.argv[1:2] == ["lifecycle"]:
        import argparse

        parser = argparse.ArgumentParser(description="one lifecycle sample (figures 3 and 4)")
        parser.add_argument("lifecycle")
        parser.add_argument("--runners", type=int, default=2)
        parser.add_argument("--n", type=int, default=200)
        args = parser.parse_args()
        print(json.dumps(commands["lifecycle"](args.runners, args.n)))
    else:
        sys.exit(f"usage: {sys.argv[0]} serve | lifecycle [--runners R] [--n N]")
