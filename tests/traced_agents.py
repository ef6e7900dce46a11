"""Agents that trace themselves with OpenTelemetry, and an algorithm that checks their spans at
the moment each rollout turns terminal. Module level: runner processes import them from here.

A task is ``{"id": i, "spans": n, "sleep": s}``: the agent makes one span ``agent`` with ``n - 1``
children ``step-k`` (each tagged ``task = i``), sleeping ``s`` seconds in each step so that
rollouts in flight together interleave. ``"fail": true`` raises after the spans.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import anyio
from opentelemetry import trace

from agl_async import Algorithm, Span
from agl_async.semconv import REWARD_SPAN_NAME

tracer = trace.get_tracer("tests.traced_agents")  # taken before any provider is set: a proxy


def tasks(n: int, spans: int = 3, sleep: float = 0.0, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": i, "spans": spans, "sleep": sleep, **extra} for i in range(n)]


async def async_agent(task: dict[str, Any], resources: dict[str, Any]) -> float:
    with tracer.start_as_current_span("agent", attributes={"task": task["id"]}):
        for k in range(task["spans"] - 1):
            with tracer.start_as_current_span(f"step-{k}", attributes={"task": task["id"]}):
                await anyio.sleep(task["sleep"])
        if task.get("fail"):
            raise RuntimeError(f"task {task['id']} failed on purpose")
    return float(task["id"])


def sync_agent(task: dict[str, Any], resources: dict[str, Any]) -> float:
    with tracer.start_as_current_span("agent", attributes={"task": task["id"]}):
        for k in range(task["spans"] - 1):
            with tracer.start_as_current_span(f"step-{k}", attributes={"task": task["id"]}):
                time.sleep(task["sleep"])
        if task.get("fail"):
            raise RuntimeError(f"task {task['id']} failed on purpose")
    return float(task["id"])


def agent_spans(spans: Sequence[Span]) -> list[Span]:
    return [span for span in spans if span.name != REWARD_SPAN_NAME]


class CheckAtTerminal(Algorithm):
    """Enqueues the dataset; each time ``wait_for_rollouts`` reports a rollout terminal, reads its
    spans at once. ``seen[rollout_id] = (status, task id, spans)``."""

    def __init__(self, poll: float = 0.05) -> None:
        self.poll = poll
        self.seen: dict[str, tuple[str, int, list[Span]]] = {}

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        store = self.store
        rollouts = await store.enqueue_many_rollouts([{"input": task} for task in train_dataset or []])
        pending = {r.rollout_id: r.input["id"] for r in rollouts}
        with anyio.fail_after(300):
            while pending:
                finished = await store.wait_for_rollouts(rollout_ids=list(pending), timeout=self.poll)
                for rollout in finished:
                    spans = await store.query_spans(rollout.rollout_id)
                    self.seen[rollout.rollout_id] = (rollout.status, pending.pop(rollout.rollout_id), spans)
