"""A traced agent against a local OpenAI-compatible server: the example behind ``agl-async demo --traced``.

The agent answers arithmetic questions by calling a chat model over HTTP — the mock of
:mod:`agl_async.examples.mock_openai`, served on 127.0.0.1 — through an ``httpx`` client that
``opentelemetry-instrumentation-httpx`` instruments when it is installed. It traces its work with
the plain OpenTelemetry API, as any instrumented agent does:

* ``solve`` (the whole task), with the question as an attribute;
* ``chat <model>`` around the model call, with the GenAI semantic-convention attributes
  (``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` /
  ``output_tokens``, ``gen_ai.response.finish_reasons``, …) and the messages;
* ``POST`` (the HTTP request, from the httpx instrumentation) under it;
* ``grade``, which checks the answer.

The runner's tracer (:mod:`agl_async.tracing`) stores every one of those spans as a span of the
rollout's attempt. The algorithm, :class:`PromptSearch`, never sees the agent: it reads each
rollout's spans from the store with :func:`~agl_async.traces.span_tree` (tokens of the ``chat``
spans) and :func:`~agl_async.traces.find_final_reward` (the reward), and picks the system prompt
with the best reward, then the fewest tokens. Needs the ``otel`` extra; the agent is a
module-level coroutine function, so runner processes (``--mode cs``) import it from here.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import anyio
import httpx
import msgspec
from opentelemetry import trace

from ..algorithm import Algorithm
from ..store.base import EnqueueRolloutRequest
from ..traces import SpanNode, find_final_reward, span_tree

__all__ = [
    "PROMPTS",
    "PromptResult",
    "PromptSearch",
    "agent",
    "make_questions",
    "print_tree",
    "run_traced_demo",
]

tracer = trace.get_tracer("agl_async.examples.traced")

#: The system prompts :class:`PromptSearch` compares.
PROMPTS = ("Answer with the number only.", "Think step by step, then give the answer.")
_NUMBER = re.compile(r"-?\d+")


def make_questions(n: int = 12, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` seeded addition questions with their answers."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        out.append({"id": i, "question": f"What is {a} + {b}?", "answer": a + b})
    return out


def _instrumented(client: httpx.AsyncClient) -> httpx.AsyncClient:
    """The client, instrumented by opentelemetry-instrumentation-httpx when it is installed."""
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:
        return client
    HTTPXClientInstrumentor.instrument_client(client)
    return client


async def agent(task: dict[str, Any], resources: dict[str, Any]) -> float:
    """Ask the model of ``resources["llm_endpoint"]`` the task's question under
    ``resources["system_prompt"]``; reward 1.0 for the right number, else 0.0."""
    endpoint, model = resources["llm_endpoint"], resources.get("model", "mock-arithmetic-1")
    system = resources.get("system_prompt", "")
    with tracer.start_as_current_span("solve", attributes={"task.question": task["question"]}):
        async with _instrumented(httpx.AsyncClient(base_url=endpoint, timeout=30)) as client:
            with tracer.start_as_current_span(
                f"chat {model}",
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": model,
                    "server.address": client.base_url.host,
                },
            ) as chat:
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": task["question"]},
                ]
                response = await client.post("/chat/completions", json={"model": model, "messages": messages})
                response.raise_for_status()
                data = response.json()
                text = data["choices"][0]["message"]["content"]
                chat.set_attributes(
                    {
                        "gen_ai.response.id": data["id"],
                        "gen_ai.response.model": data["model"],
                        "gen_ai.response.finish_reasons": [c["finish_reason"] for c in data["choices"]],
                        "gen_ai.usage.input_tokens": data["usage"]["prompt_tokens"],
                        "gen_ai.usage.output_tokens": data["usage"]["completion_tokens"],
                        "gen_ai.input.messages": msgspec.json.encode(messages).decode(),
                        "gen_ai.output.messages": msgspec.json.encode(
                            [{"role": "assistant", "content": text}]
                        ).decode(),
                    }
                )
        with tracer.start_as_current_span("grade") as grade:
            numbers = _NUMBER.findall(text)
            correct = bool(numbers) and int(numbers[-1]) == task["answer"]
            grade.set_attributes({"answer.expected": task["answer"], "answer.correct": correct})
    return 1.0 if correct else 0.0


class PromptResult(msgspec.Struct, kw_only=True):
    """What :class:`PromptSearch` measured for one system prompt, from the spans."""

    prompt: str
    rollouts: int
    mean_reward: float
    mean_tokens: float  # input + output tokens of the chat spans, per rollout
    model_calls: int


def _chat_tokens(roots: list[SpanNode]) -> tuple[int, int]:
    """(tokens, calls) of the ``chat`` spans of a tree."""
    tokens = calls = 0
    for root in roots:
        for node in root.walk():
            attributes = node.span.attributes
            if attributes.get("gen_ai.operation.name") == "chat":
                calls += 1
                tokens += int(attributes.get("gen_ai.usage.input_tokens", 0))
                tokens += int(attributes.get("gen_ai.usage.output_tokens", 0))
    return tokens, calls


class PromptSearch(Algorithm):
    """Run every question under each of ``prompts``; score each prompt from the rollouts' spans.

    Results are in :attr:`results` (one per prompt), the chosen prompt in :attr:`best`, and the
    span tree of the first rollout in :attr:`example_tree`. ``progress``: a stream for a line per
    prompt (``None``: quiet). Cancellation: ``run`` is cancelled at its current ``await``."""

    def __init__(
        self, llm_endpoint: str, prompts: Sequence[str] = PROMPTS, *, progress: TextIO | None = None
    ) -> None:
        self.llm_endpoint = llm_endpoint
        self.prompts = list(prompts)
        self.progress = progress
        self.results: list[PromptResult] = []
        self.best: str | None = None
        self.example_tree: list[SpanNode] = []

    async def run(
        self, train_dataset: Sequence[Any] | None = None, val_dataset: Sequence[Any] | None = None
    ) -> None:
        if not train_dataset:
            raise ValueError("PromptSearch needs a non-empty train_dataset")
        store = self.store
        for prompt in self.prompts:
            resources = await store.add_resources(
                {"llm_endpoint": self.llm_endpoint, "system_prompt": prompt}
            )
            rollouts = await store.enqueue_many_rollouts(
                [EnqueueRolloutRequest(input=q, resources_id=resources.resources_id) for q in train_dataset]
            )
            ids = [r.rollout_id for r in rollouts]
            with anyio.fail_after(300):
                while len(await store.wait_for_rollouts(rollout_ids=ids, timeout=1.0)) < len(ids):
                    pass
            rewards, tokens, calls = [], 0, 0
            for rollout_id in ids:
                # Everything the algorithm knows comes from the spans.
                spans = await store.query_spans(rollout_id, "latest")
                tree = span_tree(spans)
                rewards.append(find_final_reward(spans) or 0.0)
                t, c = _chat_tokens(tree)
                tokens, calls = tokens + t, calls + c
                if not self.example_tree:
                    self.example_tree = tree
            result = PromptResult(
                prompt=prompt,
                rollouts=len(ids),
                mean_reward=sum(rewards) / len(rewards),
                mean_tokens=tokens / len(ids),
                model_calls=calls,
            )
            self.results.append(result)
            if self.progress is not None:
                self.progress.write(
                    f"prompt {len(self.results)}/{len(self.prompts)} {prompt!r}: {result.rollouts} rollouts, "
                    f"mean reward {result.mean_reward:.3f}, mean tokens {result.mean_tokens:.1f}, "
                    f"{result.model_calls} model calls\n"
                )
                self.progress.flush()
        best = max(self.results, key=lambda r: (r.mean_reward, -r.mean_tokens))
        self.best = best.prompt


def print_tree(roots: Sequence[SpanNode], out: TextIO = sys.stdout) -> None:
    """Print span trees, one span a line: name, duration and the attributes worth a glance."""
    shown = (
        "gen_ai.request.model",
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.output_tokens",
        "http.method",
        "http.request.method",
        "http.status_code",
        "http.response.status_code",
        "answer.correct",
        "reward",
    )
    for root in roots:
        for node in root.walk():
            span = node.span
            took = (
                f"{1000 * (span.end_time - span.start_time):7.2f} ms"
                if span.start_time is not None and span.end_time is not None
                else " " * 10
            )
            extras = "  ".join(f"{k}={span.attributes[k]}" for k in shown if k in span.attributes)
            out.write(
                f"  {'  ' * node.depth}{span.name:<{36 - 2 * node.depth}} {took}  {extras}\n".rstrip() + "\n"
            )
    out.flush()


def run_traced_demo(
    *,
    mode: str = "shm",
    runners: int = 2,
    questions: int = 12,
    seed: int = 0,
    port: int | None = None,
    progress: TextIO | None = sys.stdout,
) -> PromptSearch:
    """Serve the mock model, run :class:`PromptSearch` with :func:`agent` (blocking), print what
    the spans told it, and return the algorithm. ``mode``: ``"shm"`` or ``"cs"`` (runner
    processes sending their spans over HTTP). ``RuntimeError`` when the OpenTelemetry SDK is
    missing (the ``otel`` extra)."""
    from ..testing import free_port
    from ..tracing import tracing_enabled
    from ..trainer import Trainer
    from .mock_openai import MockOpenAI

    if not tracing_enabled():
        raise RuntimeError(
            'the traced demo needs the OpenTelemetry SDK: pip install "agl-async[otel]" '
            "(and unset AGL_AGENT_TRACING if it is false)"
        )
    if mode == "shm":
        strategy: dict[str, Any] = {"type": "shm", "n_runners": runners}
    elif mode == "cs":
        strategy = {
            "type": "cs",
            "n_runners": runners,
            "server_host": "127.0.0.1",
            "server_port": port or free_port(),
        }
    else:
        raise ValueError(f"unknown mode {mode!r}: expected 'shm' or 'cs'")

    async def main() -> PromptSearch:
        async with MockOpenAI() as llm:
            if progress is not None:
                progress.write(f"mock OpenAI-compatible model at {llm.endpoint}\n")
            algorithm = PromptSearch(llm.endpoint, progress=progress)
            await Trainer(strategy=strategy, algorithm=algorithm).fit_async(
                agent, make_questions(questions, seed)
            )
            return algorithm

    algorithm = anyio.run(main)
    if progress is not None:
        progress.write(f"best prompt: {algorithm.best!r}\n\nthe spans of one rollout, as stored:\n")
        print_tree(algorithm.example_tree, progress)
    return algorithm
