"""Runners as Ray actors vs as client-server processes, on this machine: what Ray costs per rollout.

    python benchmarks/ray_vs_cs.py                # needs the ray extra; JSON on stdout and in
                                                  # benchmarks/results/ray_vs_cs.json
    python benchmarks/ray_vs_cs.py --quick        # smoke test

Both sides run the same bundles (``benchmarks/workloads.py``'s ``BatchAlgorithm`` and
``AgentRunner``) against the same store served over HTTP from the driver process; the only
difference is where the runner bundles run: ``ClientServerExecutionStrategy`` child processes
(aiomultiprocess) or ``RayExecutionStrategy`` actors. Configurations alternate cs, ray, cs, ray …
for ``--repeat`` repetitions; each figure is the median (min and max beside it).

Workloads:

* ``noop``: ``--n`` rollouts enqueued at once; runners dequeue (long poll) and mark each succeeded;
  1 and 2 runners. Throughput of the execution layer itself.
* ``production``: Agent-Lightning's "minimal production scale" shape, scaled down to this machine:
  ``--prod-n`` rollouts in batches of 256, 4 runners x 8 concurrent agent loops, a 0.5 s agent
  writing 5 spans. Efficiency = rollouts/s / (32 / 0.5 s).
* ``lifecycle``: 2 runners; ``startup_s`` = ``execute`` start to the first rollout completed,
  ``shutdown_s`` = the algorithm's return to ``execute`` returning. For Ray with the session
  already open (as in the rows above) and with the strategy opening and closing Ray itself.

One Ray session (``ray.init`` here, ``num_cpus`` = this machine's CPUs) stays open during the
throughput rows of both sides, so that both run beside Ray's idle daemons. CPU per rollout =
(the driver process + the runner bundles' own CPU, which each runner reports when it ends + Ray's
daemons: the raylet, the GCS and the other ``ray`` processes of the session) / rollouts, all
measured over the same run; the runners' interpreter start-up is left out on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import anyio  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
import workloads  # noqa: E402  (benchmarks/workloads.py)
from workloads import AgentRunner, BatchAlgorithm  # noqa: E402

from agl_async import (  # noqa: E402
    ClientServerExecutionStrategy,
    ExecutionEvent,
    ExecutionStrategy,
    InMemoryLightningStore,
    LightningStore,
)
from agl_async.execution.ray import RayExecutionStrategy  # noqa: E402

RESULTS = HERE / "results"


def _write_cpu(path: Path, cpu_s: float) -> None:
    path.write_text(json.dumps({"cpu_s": cpu_s}))


class CpuReportingRunner:
    """``AgentRunner`` that writes the CPU seconds its bundle used to ``<dir>/<pid>-<id>.json``."""

    def __init__(self, inner: AgentRunner, directory: str) -> None:
        self.inner, self.directory = inner, directory

    async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        started = time.process_time()
        try:
            await self.inner(store, worker_id, event)
        finally:
            _write_cpu(Path(self.directory, f"{os.getpid()}-{worker_id}.json"), time.process_time() - started)


def _ray_daemon_cpu() -> float:
    """CPU seconds so far of this session's long-lived Ray processes (not the actors: they report
    their bundles' CPU themselves)."""
    total = 0.0
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if "RunnerActor" in cmd:
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _strategy(mode: str, runners: int, **kwargs: Any) -> ExecutionStrategy:
    if mode == "cs":
        return ClientServerExecutionStrategy(
            role="both", server_host="127.0.0.1", server_port=0, n_runners=runners
        )
    return RayExecutionStrategy(runners, server_host="127.0.0.1", **kwargs)


def run_once(
    mode: str,
    runners: int,
    n: int,
    *,
    batch: int | None = None,
    sleep: float = 0.0,
    spans: int = 0,
    concurrency: int = 1,
    lifecycle: bool = False,
) -> dict[str, float]:
    workloads.RESULT.clear()
    with tempfile.TemporaryDirectory(prefix="agl-ray-bench-") as cpu_dir:
        runner = CpuReportingRunner(AgentRunner(sleep, spans, None, concurrency), cpu_dir)
        algorithm = BatchAlgorithm(
            n, batch or n, runners * concurrency, wait_ready=not lifecycle, first_alone=lifecycle
        )
        strategy = _strategy(mode, runners)
        me0, daemons0 = resource.getrusage(resource.RUSAGE_SELF), _ray_daemon_cpu()

        async def main() -> None:
            workloads.RESULT["execute"] = time.perf_counter()
            await strategy.execute(algorithm, runner, InMemoryLightningStore())
            workloads.RESULT["returned_execute"] = time.perf_counter()

        anyio.run(main, backend="asyncio")
        me1, daemons1 = resource.getrusage(resource.RUSAGE_SELF), _ray_daemon_cpu()
        reports = [json.loads(p.read_text()) for p in Path(cpu_dir).iterdir()]
    if len(reports) != runners:
        raise RuntimeError(f"{mode}: expected {runners} runner CPU reports, got {len(reports)}")
    t = workloads.RESULT
    driver = (me1.ru_utime + me1.ru_stime) - (me0.ru_utime + me0.ru_stime)
    runner_cpu = sum(r["cpu_s"] for r in reports)
    daemons = max(0.0, daemons1 - daemons0)
    seconds = t["end"] - t["start"]
    sample = {
        "rollouts_per_s": n / seconds,
        "ms_per_rollout": 1000 * seconds / n,
        "cpu_ms_per_rollout": 1000 * (driver + runner_cpu + daemons) / n,
        "cpu_driver_ms_per_rollout": 1000 * driver / n,
        "cpu_runners_ms_per_rollout": 1000 * runner_cpu / n,
        "cpu_ray_daemons_ms_per_rollout": 1000 * daemons / n,
        "wall_s": t["returned_execute"] - t["execute"],
        "shutdown_s": t["returned_execute"] - t["returned"],
    }
    if lifecycle:
        sample["startup_s"] = t["first"] - t["execute"]
    return sample


def lifecycle_own_session(runners: int, n: int) -> dict[str, float]:
    """The Ray strategy opening (``ray.init``) and closing (``ray.shutdown``) Ray itself."""
    assert not ray.is_initialized()
    return run_once("ray", runners, n, lifecycle=True)


def summarise(samples: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        out[key] = {
            "median": round(statistics.median(values), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
        }
    return out


def closing_note(figures: dict[str, Any]) -> str:
    """What Ray costs, in words, from the figures (the report's closing note)."""

    def m(name: str, mode: str, key: str) -> float:
        value: float = figures[name][mode][key]["median"]
        return value

    wall = [figures[k]["ray_overhead_ms_per_rollout"] for k in ("noop_1", "noop_2", "production")]
    cpu = [figures[k]["ray_cpu_overhead_ms_per_rollout"] for k in ("noop_1", "noop_2", "production")]
    own = figures["lifecycle_ray_own_session"]

    def spread(name: str, key: str) -> float:
        return max(
            figures[name][mode][key]["max"] - figures[name][mode][key]["min"] for mode in ("cs", "ray")
        )

    rows = ("noop_1", "noop_2", "production")
    inside = all(
        abs(figures[k]["ray_overhead_ms_per_rollout"]) <= spread(k, "ms_per_rollout")
        and abs(figures[k]["ray_cpu_overhead_ms_per_rollout"]) <= spread(k, "cpu_ms_per_rollout")
        for k in rows
    )
    verdict = "within" if inside else "not all within"
    return (
        "Per rollout: the actors reach the store over the same HTTP as "
        "client-server runner processes, and Ray is only in the control path (placing, stopping, "
        f"restarting actors). Ray minus cs, wall time per rollout: {wall[0]:+.2f} / {wall[1]:+.2f} ms "
        f"(no-op, 1 / 2 runners), {wall[2]:+.2f} ms (production shape); CPU per rollout: "
        f"{cpu[0]:+.2f} / {cpu[1]:+.2f} / {cpu[2]:+.2f} ms: {verdict} the spread (max - min) of the "
        "repeated samples of either side. "
        "Ray's cost is per run: start-up to the first completed rollout "
        f"{m('lifecycle', 'ray', 'startup_s'):.2f} s vs {m('lifecycle', 'cs', 'startup_s'):.2f} s with a Ray "
        f"session already open, {own['startup_s']['median']:.1f} s when the strategy starts a local Ray "
        f"itself (plus {own['shutdown_s']['median']:.1f} s for ray.shutdown); shutdown "
        f"{m('lifecycle', 'ray', 'shutdown_s'):.2f} s vs {m('lifecycle', 'cs', 'shutdown_s'):.2f} s "
        "(an actor's stop() is one call; cs joins and reaps processes)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000, help="no-op rollouts per sample")
    parser.add_argument("--prod-n", type=int, default=512, help="production-shape rollouts per sample")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_vs_cs.json")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.n, args.prod_n = 1, 200, 64

    configs: dict[str, dict[str, Any]] = {}
    for runners in (1, 2):
        configs[f"noop_{runners}"] = {"runners": runners, "n": args.n}
    configs["production"] = {
        "runners": 4, "n": args.prod_n, "batch": 256, "sleep": 0.5, "spans": 5, "concurrency": 8,
    }  # fmt: skip
    configs["lifecycle"] = {"runners": 2, "n": 50, "lifecycle": True}

    samples: dict[str, dict[str, list[dict[str, float]]]] = {k: {"cs": [], "ray": []} for k in configs}
    own_session: list[dict[str, float]] = []
    for rep in range(args.repeat):
        # Ray opened and closed by the strategy (first, while no session is open).
        own_session.append(lifecycle_own_session(2, 50))
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        try:
            for name, config in configs.items():
                for mode in ("cs", "ray"):
                    kwargs = {k: v for k, v in config.items() if k != "runners"}
                    sample = run_once(mode, config["runners"], **kwargs)
                    samples[name][mode].append(sample)
                    print(
                        f"rep {rep + 1}/{args.repeat} {name:11s} {mode:3s} "
                        f"{sample['rollouts_per_s']:8.1f} rollouts/s  {sample['cpu_ms_per_rollout']:6.2f} "
                        f"ms CPU/rollout  wall {sample['wall_s']:.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            ray.shutdown()

    figures: dict[str, Any] = {}
    for name in configs:
        cs, ry = summarise(samples[name]["cs"]), summarise(samples[name]["ray"])
        figures[name] = {"config": configs[name], "cs": cs, "ray": ry}
        if name.startswith("noop") or name == "production":
            figures[name]["ray_overhead_ms_per_rollout"] = round(
                ry["ms_per_rollout"]["median"] - cs["ms_per_rollout"]["median"], 4
            )
            figures[name]["ray_cpu_overhead_ms_per_rollout"] = round(
                ry["cpu_ms_per_rollout"]["median"] - cs["cpu_ms_per_rollout"]["median"], 4
            )
        if name == "production":
            ideal = configs[name]["runners"] * configs[name]["concurrency"] / configs[name]["sleep"]
            for mode in ("cs", "ray"):
                figures[name][mode]["efficiency"] = round(
                    figures[name][mode]["rollouts_per_s"]["median"] / ideal, 4
                )
    # CPU figures are left out here: Ray's daemons start and end inside the run, out of sight.
    keep = ("startup_s", "shutdown_s", "wall_s")
    figures["lifecycle_ray_own_session"] = summarise([{k: s[k] for k in keep} for s in own_session])
    report = {
        "benchmark": "ray_vs_cs",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "ray": ray.__version__,
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
        },
        "repeat": args.repeat,
        "figures": figures,
        "closing_note": closing_note(figures),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
