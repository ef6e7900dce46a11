"""Processes of the multi-host scenario (tests/faults/test_netns_fleet.py), run inside network
namespaces with ``tests/`` on ``PYTHONPATH``.

``python -m faults.netfleet algorithm --host A --port P --certfile C --keyfile K --token-file T
--rollouts N --seconds S --unresponsive U --markers DIR``: a ``Trainer`` with
``ClientServerExecutionStrategy(role="algorithm")`` serving HTTPS with a token on ``A:P``. Its
algorithm enqueues N rollouts (each ``S`` seconds of agent work, watched with
``unresponsive_seconds=U`` and retried on ``unresponsive``), prints ``SERVING``, and then answers
commands read from stdin, one per line, with one JSON line on stdout each:

* ``snapshot``: every rollout with its status, end time and attempts (id, status, worker);
* ``finish``: the same, then the algorithm returns and the run (and the server) stops.

The control channel is the process's own pipes, so the test never sends traffic to a namespace
itself: the runner hosts are the only network clients.

:func:`host_agent` is the agent that ``agl-async runner`` processes run: it leaves a marker
``<i>.<host>.<pid>.<random>`` in ``task_input["dir"]`` (``host`` from env ``FLEET_HOST``) so the
test can tell which host ran what, then works ``task_input["seconds"]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
import anyio.to_thread

from agl_async import Algorithm, ClientServerExecutionStrategy, RolloutConfig, Trainer


async def host_agent(task_input: dict[str, Any], resources: dict[str, Any]) -> float:
    host = os.environ.get("FLEET_HOST", "?")
    marker = f"{task_input['i']}.{host}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
    await anyio.Path(task_input["dir"], marker).touch()
    await anyio.sleep(float(task_input["seconds"]))
    return 1.0


def idle_agent(task_input: Any, resources: dict[str, Any]) -> None:
    raise AssertionError("role='algorithm' runs no agent")


class ControlledAlgorithm(Algorithm):
    def __init__(self, rollouts: int, seconds: float, unresponsive: float, markers: str) -> None:
        self.rollouts, self.seconds, self.unresponsive, self.markers = (
            rollouts,
            seconds,
            unresponsive,
            markers,
        )

    async def _snapshot(self, ids: list[str]) -> dict[str, Any]:
        out = []
        for rollout in await self.store.query_rollouts(rollout_id_in=ids):
            attempts = await self.store.query_attempts(rollout.rollout_id)
            out.append(
                {
                    "rollout_id": rollout.rollout_id,
                    "i": rollout.input["i"],
                    "status": rollout.status,
                    "end_time": rollout.end_time,
                    "attempts": [
                        {"attempt_id": a.attempt_id, "status": a.status, "worker_id": a.worker_id}
                        for a in attempts
                    ],
                }
            )
        return {"rollouts": out}

    async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:
        config = RolloutConfig(
            unresponsive_seconds=self.unresponsive, max_attempts=5, retry_condition=["unresponsive"]
        )
        enqueued = await self.store.enqueue_many_rollouts(
            [
                {"input": {"i": i, "dir": self.markers, "seconds": self.seconds}, "config": config}
                for i in range(self.rollouts)
            ]
        )
        ids = [r.rollout_id for r in enqueued]
        print("SERVING", flush=True)
        while True:
            command = (await anyio.to_thread.run_sync(sys.stdin.readline)).strip()
            if command not in ("snapshot", "finish"):
                raise SystemExit(f"unknown command {command!r}" if command else "stdin closed")
            print(json.dumps(await self._snapshot(ids)), flush=True)
            if command == "finish":
                return


def _algorithm_main(args: argparse.Namespace) -> int:
    with open(args.token_file, encoding="utf-8") as f:
        token = f.read().strip()
    strategy = ClientServerExecutionStrategy(
        role="algorithm",
        server_host=args.host,
        server_port=args.port,
        auth_token=token,
        ssl_certfile=args.certfile,
        ssl_keyfile=args.keyfile,
    )
    algorithm = ControlledAlgorithm(args.rollouts, args.seconds, args.unresponsive, args.markers)
    Trainer(strategy=strategy, algorithm=algorithm).fit(idle_agent)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="faults.netfleet")
    commands = parser.add_subparsers(dest="command", required=True)
    algorithm = commands.add_parser("algorithm")
    algorithm.add_argument("--host", required=True)
    algorithm.add_argument("--port", type=int, required=True)
    algorithm.add_argument("--certfile", required=True)
    algorithm.add_argument("--keyfile", required=True)
    algorithm.add_argument("--token-file", required=True)
    algorithm.add_argument("--rollouts", type=int, default=24)
    algorithm.add_argument("--seconds", type=float, default=1.0)
    algorithm.add_argument("--unresponsive", type=float, default=3.0)
    algorithm.add_argument("--markers", required=True)
    algorithm.set_defaults(handler=_algorithm_main)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
