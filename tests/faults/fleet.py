"""Processes of the fault scenarios: module-level bundles and agents (spawned children import them
from here) and the entry points run as separate processes (``python -m faults.fleet ...`` with
``tests/`` on ``PYTHONPATH``), plus the test-side helpers to start and watch those processes.

Entry points
    ``runner --port P --tag T``: one ``ClientServerExecutionStrategy(role="runner")`` process
    attached to the store server on 127.0.0.1:P, running the trainer's runner loop with
    :func:`marking_agent` under the worker id ``"T-<worker_id>"`` (unique in the fleet: every
    separate runner process numbers its runners from 0). SIGINT stops it cleanly (exit 0); a store
    it cannot reach makes it exit 1 with one ``runner failed: ...`` line on stderr.
    ``ctrlc``: a whole client-server ``run()`` (server + algorithm here, two runner processes)
    that prints ``READY`` once both runners have finished rollouts; a Ctrl-C makes it exit 130
    after ``interrupted`` on stderr.
    ``mutate --port P --clients N --rounds R``: N concurrent clients each calling every mutating
    route that must not duplicate (enqueue_rollout, enqueue_many_rollouts, dequeue_rollout,
    add_span, add_many_spans, update_attempt) R times; prints one JSON line of what it got.
    ``load --port P --clients N --seconds S [--ca-file CA]``: N concurrent store clients in this
    process, each looping dequeue -> running -> spans -> succeeded until S seconds have passed
    (over HTTPS, verified with CA, when ``--ca-file`` is given); prints one JSON line of counts and
    every request's latency.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from agl_async import (
    ClientServerExecutionStrategy,
    ExecutionEvent,
    InMemoryLightningStore,
    LightningStore,
    LightningStoreClient,
    Span,
)
from agl_async.trainer import runner_loop

TESTS_DIR = Path(__file__).resolve().parent.parent
HANG_GUARD = 60.0


# ---------------------------------------------------------------------------- agents and bundles
async def marking_agent(task_input: dict[str, Any], resources: dict[str, Any]) -> float:
    """Leave a marker ``<i>.<pid>`` in ``task_input["dir"]`` (so a test knows which process runs
    which task), then work for ``task_input["seconds"]``."""
    await anyio.Path(task_input["dir"], f"{task_input['i']}.{os.getpid()}.{uuid.uuid4().hex[:6]}").touch()
    await anyio.sleep(float(task_input.get("seconds", 0.0)))
    return 1.0


class FleetRunner:
    """Runner bundle: the trainer's runner loop under a fleet-unique worker id ``"<tag>-<n>"``."""

    def __init__(self, tag: str, heartbeat_interval: float = 10.0) -> None:
        self.tag = tag
        self.heartbeat_interval = heartbeat_interval

    async def __call__(self, store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
        await runner_loop(
            store, f"{self.tag}-{worker_id}", event, marking_agent, heartbeat_interval=self.heartbeat_interval
        )


async def no_algorithm(store: LightningStore, event: ExecutionEvent) -> None:
    raise AssertionError("role='runner' never runs the algorithm")


async def mixed_runner(store: LightningStore, worker_id: int, event: ExecutionEvent) -> None:
    """Worker 0 stops on the event; 1 ignores it (SIGINT ends it); 2 ignores SIGINT (terminate()
    ends it); 3 ignores SIGTERM too (only kill() ends it)."""
    import bundles  # tests/bundles.py: the execution tests' runners

    behaviours = (
        bundles.runner_until_event,
        bundles.runner_ignores_event,
        bundles.runner_ignores_sigint,
        bundles.runner_ignores_sigterm,
    )
    await behaviours[worker_id](store, worker_id, event)


async def endless_algorithm(store: LightningStore, event: ExecutionEvent) -> None:
    """Keep ~8 short rollouts queued; print READY once both runners have finished some."""
    ready = False
    while not event.is_set():
        stats = await store.statistics()
        if stats["queue_length"] < 8:
            await store.enqueue_many_rollouts(
                [{"input": {"i": n, "dir": os.environ["FAULTS_MARKERS"], "seconds": 0.05}} for n in range(8)]
            )
        if not ready:
            workers = {w.worker_id for w in await store.query_workers() if w.last_idle_time}
            if len(workers) >= 2:  # both runners have finished at least one rollout
                ready = True
                print("READY", flush=True)
        with anyio.move_on_after(0.1):
            await event.wait()


# ---------------------------------------------------------------------------- entry points
def _log_to_stderr() -> None:
    logging.basicConfig(format="%(processName)s %(name)s %(levelname)s: %(message)s", level=logging.WARNING)


def _runner_main(args: argparse.Namespace) -> int:
    strategy = ClientServerExecutionStrategy(
        role="runner", server_host="127.0.0.1", server_port=args.port, n_runners=1
    )
    try:
        strategy.run(no_algorithm, FleetRunner(args.tag, args.heartbeat), InMemoryLightningStore())
    except KeyboardInterrupt:
        print(f"runner {args.tag}: stopped by SIGINT", file=sys.stderr, flush=True)
        return 0
    except Exception as exc:
        print(f"runner {args.tag} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


def _ctrlc_main(args: argparse.Namespace) -> int:
    strategy = ClientServerExecutionStrategy(
        role="both",
        server_host="127.0.0.1",
        server_port=0,
        n_runners=2,
        graceful_timeout=args.graceful,
        terminate_timeout=args.terminate,
    )
    try:
        strategy.run(endless_algorithm, FleetRunner("r"), InMemoryLightningStore())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    return 0


async def _load_client(
    client: LightningStoreClient, worker_id: str, deadline: float, spans_per_rollout: int, out: dict[str, Any]
) -> None:
    latencies: list[float] = out["latencies"]

    async def timed(call: Any) -> Any:
        started = time.perf_counter()
        try:
            return await call
        except Exception as exc:
            out["errors"] += 1
            out["error_samples"].append(f"{type(exc).__name__}: {exc}"[:300])
            return None
        finally:
            latencies.append(time.perf_counter() - started)
            out["requests"] += 1

    while time.monotonic() < deadline:
        claimed = await timed(client.dequeue_rollout(worker_id=worker_id, timeout=0.5))
        if claimed is None:
            continue
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id
        await timed(client.update_attempt(rid, aid, status="running"))
        for seq in range(1, spans_per_rollout + 1):
            span = Span(
                rollout_id=rid,
                attempt_id=aid,
                sequence_id=seq,
                trace_id=uuid.uuid4().hex,
                span_id=uuid.uuid4().hex[:16],
                name="load",
                attributes={"worker": worker_id, "seq": seq},
            )
            if await timed(client.add_span(span)) is not None:
                out["spans_added"] += 1
        if await timed(client.update_attempt(rid, aid, status="succeeded")) is not None:
            out["rollouts_done"] += 1


async def _load(
    port: int, clients: int, seconds: float, spans: int, tag: str, ca_file: str | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": 0,
        "errors": 0,
        "error_samples": [],
        "spans_added": 0,
        "rollouts_done": 0,
        "latencies": [],
    }
    deadline = time.monotonic() + seconds
    endpoint = f"{'https' if ca_file else 'http'}://127.0.0.1:{port}"
    store_clients = [LightningStoreClient(endpoint, "", ca_file or True) for _ in range(clients)]
    try:
        async with anyio.create_task_group() as tg:
            for n, client in enumerate(store_clients):
                tg.start_soon(_load_client, client, f"{tag}-{n}", deadline, spans, out)
    finally:
        for client in store_clients:
            await client.close()
    out["latencies"] = [round(x, 6) for x in out["latencies"]]  # seconds, one per request
    out["error_samples"] = out["error_samples"][:5]
    return out


async def _mutate_client(
    client: LightningStoreClient, worker_id: str, rounds: int, out: dict[str, Any]
) -> None:
    """Every mutating route that must not duplicate on a retry, ``rounds`` times."""

    async def call(what: str, coro: Any) -> Any:
        out["calls"][what] = out["calls"].get(what, 0) + 1
        try:
            return await coro
        except Exception as exc:
            out["errors"].append(f"{what}: {type(exc).__name__}: {exc}"[:300])
            return None

    for r in range(rounds):
        one = await call("enqueue_rollout", client.enqueue_rollout({"w": worker_id, "r": r, "k": 0}))
        if one is not None:
            out["enqueued"].append(one.rollout_id)
        many = await call(
            "enqueue_many_rollouts",
            client.enqueue_many_rollouts([{"input": {"w": worker_id, "r": r, "k": k}} for k in (1, 2, 3)]),
        )
        out["enqueued"] += [m.rollout_id for m in many or []]
        claimed = await call("dequeue_rollout", client.dequeue_rollout(worker_id=worker_id, timeout=0.2))
        if claimed is None:
            continue
        out["claimed"].append(claimed.rollout_id)
        rid, aid = claimed.rollout_id, claimed.attempt.attempt_id

        spans = [
            Span(rollout_id=rid, attempt_id=aid, sequence_id=seq, trace_id=rid, span_id=f"{seq}", name="s")
            for seq in (1, 2, 3)
        ]
        await call("add_span", client.add_span(spans[0]))
        await call("add_many_spans", client.add_many_spans(spans[1:]))
        await call("update_attempt", client.update_attempt(rid, aid, status="succeeded"))


async def _mutate(port: int, clients: int, rounds: int, tag: str) -> dict[str, Any]:
    out: dict[str, Any] = {"calls": {}, "errors": [], "enqueued": [], "claimed": []}
    # A deep retry budget with short delays: the proxy loses ~1 answer in 6.
    delays = (0.01, 0.02, 0.05, 0.1, 0.1, 0.2, 0.2, 0.5)
    endpoint = f"http://127.0.0.1:{port}"
    store_clients = [
        LightningStoreClient(endpoint, auth_token="", retry_delays=delays) for _ in range(clients)
    ]
    try:
        async with anyio.create_task_group() as tg:
            for n, client in enumerate(store_clients):
                tg.start_soon(_mutate_client, client, f"{tag}-{n}", rounds, out)
    finally:
        for client in store_clients:
            await client.close()
    return out


def _mutate_main(args: argparse.Namespace) -> int:
    print(json.dumps(anyio.run(_mutate, args.port, args.clients, args.rounds, args.tag)), flush=True)
    return 0


def _load_main(args: argparse.Namespace) -> int:
    result = anyio.run(_load, args.port, args.clients, args.seconds, args.spans, args.tag, args.ca_file)
    print(json.dumps(result), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    _log_to_stderr()
    parser = argparse.ArgumentParser(prog="faults.fleet")
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("runner")
    runner.add_argument("--port", type=int, required=True)
    runner.add_argument("--tag", required=True)
    runner.add_argument("--heartbeat", type=float, default=10.0)
    runner.set_defaults(handler=_runner_main)
    ctrlc = commands.add_parser("ctrlc")
    ctrlc.add_argument("--graceful", type=float, default=5.0)
    ctrlc.add_argument("--terminate", type=float, default=5.0)
    ctrlc.set_defaults(handler=_ctrlc_main)
    load = commands.add_parser("load")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--clients", type=int, default=16)
    load.add_argument("--seconds", type=float, default=30.0)
    load.add_argument("--spans", type=int, default=3)
    load.add_argument("--tag", default="load")
    load.add_argument("--ca-file", default=None)
    load.set_defaults(handler=_load_main)
    mutate = commands.add_parser("mutate")
    mutate.add_argument("--port", type=int, required=True)
    mutate.add_argument("--clients", type=int, default=8)
    mutate.add_argument("--rounds", type=int, default=10)
    mutate.add_argument("--tag", default="m")
    mutate.set_defaults(handler=_mutate_main)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


# ---------------------------------------------------------------------------- test-side helpers
def popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m faults.fleet *args`` (or any ``python -m`` module when the first argument
    contains a dot) in a new session, so that its whole process tree can be found and signalled."""
    module, rest = (args[0], args[1:]) if "." in args[0] else ("faults.fleet", args)
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), full_env.get("PYTHONPATH")]))
    full_env.pop("AGL_SERVER_TOKEN", None)
    full_env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen(
        [sys.executable, "-m", module, *rest],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        start_new_session=True,
    )


def session_members(sid: int) -> set[int]:
    """Live (non-zombie) processes of session ``sid``: a process started by :func:`popen` and every
    descendant it has, even those reparented after their parent died."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields: state ppid pgrp session ...
        if fields[0] not in ("Z", "X") and int(fields[3]) == sid:
            found.add(int(entry.name))
    return found


def stop_session(proc: subprocess.Popen[str]) -> None:
    """Test cleanup: kill whatever is left of ``proc``'s session and reap ``proc``."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.communicate(timeout=10)
    except (subprocess.TimeoutExpired, ValueError):
        proc.kill()
        proc.wait()


async def wait_exit(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    """Wait (in a thread) for ``proc`` to exit, at most ``timeout`` s; its code, stdout, stderr."""
    out, err = await anyio.to_thread.run_sync(functools.partial(proc.communicate, timeout=timeout))
    return proc.returncode, out, err


async def wait_no_session_left(sid: int, timeout: float = 10.0) -> None:
    """Wait until no process of session ``sid`` is alive (a just-killed child may need a moment)."""
    with anyio.move_on_after(timeout):
        while session_members(sid):  # noqa: ASYNC110 - /proc offers no event to wait on
            await anyio.sleep(0.05)
    left = session_members(sid)
    assert not left, f"processes of session {sid} left behind: {sorted(left)}"


if __name__ == "__main__":
    sys.exit(main())
