"""Agent-Lightning 0.3.0's side of benchmarks/production.py (run by ITS interpreter, never ours).

    LITELLM_LOCAL_MODEL_COST_MAP=True /work/peer-venv/bin/python benchmarks/peer/agl_production.py \\
        trainer --url http://127.0.0.1:PORT --shape '{...}' --runners 32 --poll-interval 0.1

One run of the production workload (``benchmarks/production_workload.py``, shared with our side)
with Agent-Lightning's own pieces, as its store benchmark runs them: its ``Trainer`` with the
client-server strategy and ``managed_store=False`` (its ``LightningStoreClient`` to a store server
started separately), one runner process per in-flight rollout (its ``LitAgentRunner``, at the
given ``poll_interval``), its default tracer (AgentOps; spans reach the store over OTLP) and
``emit_reward``. The agent is decorated with ``agl.rollout`` and writes the workload's spans with
OpenTelemetry. Prints one JSON line: the algorithm's outcome and the CPU of this process and its
reaped children.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ (standard library only)

import agentlightning as agl
import production_workload as W
from agentlightning.store.client_server import LightningStoreClient
from agentlightning.types import EnqueueRolloutRequest
from agentlightning.utils.otel import get_tracer

RESULT: dict[str, Any] = {}
LATENCY: W.LatencyLog | None = None
WAIT_PATH = "/waits/rollouts"  # waits by design: not a latency sample


class TimedClient(LightningStoreClient):
    """Agent-Lightning's store client, timing every request that does not wait."""

    async def _request_json(self, method: Any, path: str, **kwargs: Any) -> Any:  # type: ignore[override]
        if path.endswith(WAIT_PATH) or LATENCY is None:
            return await super()._request_json(method, path, **kwargs)
        started = time.perf_counter()
        result = await super()._request_json(method, path, **kwargs)
        LATENCY.record(time.perf_counter() - started)
        return result


def make_agent(max_rounds: int, sleep: float) -> Any:
    @agl.rollout
    async def agent(task: str, llm: agl.LLM) -> None:
        tracer = get_tracer()
        plan = W.plan_rollout(task, max_rounds, sleep)
        for round_ in plan.rounds:
            head, *children = round_.steps
            with tracer.start_as_current_span(head.name):
                for step in children:
                    with tracer.start_as_current_span(step.name) as span:
                        await asyncio.sleep(step.sleep)
                        span.set_attributes(step.attributes)
            if round_.reward is not None:
                agl.emit_reward(round_.reward)
        with tracer.start_as_current_span(plan.final.name) as span:
            await asyncio.sleep(plan.final.sleep)
            span.set_attributes(plan.final.attributes)
        agl.emit_reward(plan.final_reward)

    return agent


class PeerAdapter:
    """``production_workload.Adapter`` over Agent-Lightning's store (its waits: at most 0.1 s)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    async def add_resources(self, tag: int) -> None:
        await self.store.add_resources(
            {"llm": agl.LLM(endpoint=f"http://localhost:{tag}/v1", model=f"test-model-{tag}")}
        )

    async def enqueue(self, tasks: list[str]) -> list[str]:
        rollouts = await self.store.enqueue_many_rollouts(
            [EnqueueRolloutRequest(input=t, mode="train") for t in tasks]
        )
        return [r.rollout_id for r in rollouts]

    async def finished(self, rollout_ids: list[str], poll: float) -> list[tuple[str, str]]:
        rollouts = await self.store.wait_for_rollouts(rollout_ids=rollout_ids, timeout=min(poll, 0.1))
        return [(r.rollout_id, r.status) for r in rollouts]

    async def wait_one(self, rollout_id: str) -> str:
        while True:
            done = await self.store.wait_for_rollouts(rollout_ids=[rollout_id], timeout=0.1)
            if done:
                return str(done[0].status)

    async def workers(self) -> int:
        return len(list(await self.store.query_workers()))

    async def spans(self, rollout_id: str) -> tuple[list[dict[str, Any]], float | None, int]:
        spans = list(await self.store.query_spans(rollout_id=rollout_id, attempt_id="latest"))
        return [dict(s.attributes) for s in spans], agl.find_final_reward(spans), len(spans)


class ProductionAlgorithm(agl.Algorithm):
    def __init__(self, shape: dict[str, Any]) -> None:
        super().__init__()
        self.shape = shape

    async def run(self, train_dataset: Any = None, val_dataset: Any = None) -> None:  # type: ignore[override]
        shape = self.shape
        RESULT.update(await W.run_algorithm(PeerAdapter(self.get_store()), ready=shape["in_flight"], **shape))


def cmd_trainer(args: argparse.Namespace) -> None:
    import resource

    global LATENCY
    LATENCY = W.LatencyLog(args.latency_dir)
    logging.disable(logging.WARNING)  # its INFO logging per rollout is not what we measure
    shape = json.loads(args.shape)
    store = TimedClient(args.url)
    trainer = agl.Trainer(
        store=store,
        algorithm=ProductionAlgorithm(shape),
        n_runners=args.runners,
        strategy={"type": "cs", "managed_store": False},
        runner={"type": "agentlightning.LitAgentRunner", "poll_interval": args.poll_interval},
    )
    trainer.fit(make_agent(shape["max_rounds"], shape["sleep"]))
    LATENCY.flush()
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    RESULT["algorithm_cpu_s"] = me.ru_utime + me.ru_stime
    RESULT["children_cpu_s"] = kids.ru_utime + kids.ru_stime
    print(json.dumps(RESULT), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    trainer = sub.add_parser("trainer")
    trainer.add_argument("--url", required=True)
    trainer.add_argument("--shape", required=True)
    trainer.add_argument("--runners", type=int, required=True)
    trainer.add_argument("--poll-interval", type=float, default=5.0)
    trainer.add_argument("--latency-dir")
    args = parser.parse_args()
    cmd_trainer(args)


if __name__ == "__main__":
    main()
