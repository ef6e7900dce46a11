"""The runner's tracer: agents' OpenTelemetry spans become spans of their attempt, in both modes,
with several rollouts in flight, sync and async agents, the application's own provider, and no
span missing at the moment a rollout turns terminal.

OpenTelemetry's global provider can be set only once per process: tests about which provider is
used (the application's, none, a foreign one, the tracer turned off, no SDK at all) run in fresh
interpreters. The others share this process's provider, installed by the first run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import BOTH_BACKENDS
from opentelemetry import context as otel_context
from opentelemetry import trace
from traced_agents import CheckAtTerminal, agent_spans, async_agent, sync_agent, tasks

from agl_async import InMemoryLightningStore, LightningStore, Trainer
from agl_async.testing import free_port
from agl_async.traces import find_final_reward, span_tree
from agl_async.tracing import current_attempt, tracing_enabled
from agl_async.trainer import REWARD_SPAN_NAME, runner_loop

TIMEOUT = 120  # hang guard only
TESTS = Path(__file__).parent
tracer = trace.get_tracer("tests.tracing")


def check_each_rollout_has_exactly_its_own_spans(
    algorithm: CheckAtTerminal, n: int, spans: int, status: str = "succeeded"
) -> None:
    """What the algorithm read when each rollout turned terminal: every span of the agent, each
    attributed to the right attempt, one trace per rollout, the reward span last."""
    assert len(algorithm.seen) == n
    for rollout_id, (got_status, task_id, stored) in algorithm.seen.items():
        assert got_status == status
        mine = agent_spans(stored)
        assert len(mine) == spans, f"rollout {rollout_id}: {len(mine)} of {spans} spans at terminal"
        assert {s.attributes["task"] for s in mine} == {task_id}
        assert {s.rollout_id for s in stored} == {rollout_id} and len({s.attempt_id for s in stored}) == 1
        assert len({s.trace_id for s in mine}) == 1
        [root] = span_tree(mine)
        assert root.span.name == "agent" and [c.span.name for c in root.children] == [
            f"step-{k}" for k in range(spans - 1)
        ]
        sequence = [s.sequence_id for s in stored]
        assert sorted(set(sequence)) == sequence
        if status == "succeeded":
            assert stored[-1].name == REWARD_SPAN_NAME and find_final_reward(stored) == float(task_id)


# ---------------------------------------------------------------------------- shared memory
@pytest.mark.parametrize("agent", [async_agent, sync_agent], ids=["async", "sync"])
def test_rollouts_in_flight_together_keep_their_spans_apart(agent: Any) -> None:
    # Four runners in one process: their agent calls interleave at every step.
    algorithm = CheckAtTerminal()
    Trainer(n_runners=4, algorithm=algorithm).fit(agent, tasks(24, spans=5, sleep=0.002))
    check_each_rollout_has_exactly_its_own_spans(algorithm, 24, 5)
    assert tracing_enabled()


def test_spans_of_a_failing_agent_are_kept_and_written_before_it_is_marked_failed() -> None:
    algorithm = CheckAtTerminal()
    Trainer(n_runners=2, algorithm=algorithm).fit(async_agent, tasks(6, spans=3, fail=True))
    check_each_rollout_has_exactly_its_own_spans(algorithm, 6, 3, status="failed")
    for _, _, stored in algorithm.seen.values():
        root = next(s for s in stored if s.name == "agent")
        assert root.status_code == "error" and "failed on purpose" in (root.status_message or "")
        assert any(event["name"] == "exception" for event in root.events)


def test_no_span_is_missing_when_a_rollout_turns_terminal_1000_rollouts() -> None:
    algorithm = CheckAtTerminal(poll=0.01)
    Trainer(n_runners=4, algorithm=algorithm).fit(async_agent, tasks(1000, spans=10))
    check_each_rollout_has_exactly_its_own_spans(algorithm, 1000, 10)


# ----------------------------------------------------------------------------- client-server
@pytest.mark.parametrize("agent", [async_agent, sync_agent], ids=["async", "sync"])
def test_client_server_runner_processes_send_their_agents_spans(
    agent: Any, no_leftover_processes: None
) -> None:
    algorithm = CheckAtTerminal()
    strategy = {"type": "cs", "server_host": "127.0.0.1", "server_port": free_port()}
    Trainer(strategy=strategy, n_runners=2, algorithm=algorithm).fit(agent, tasks(20, spans=4, sleep=0.002))
    check_each_rollout_has_exactly_its_own_spans(algorithm, 20, 4)


def test_client_server_no_span_missing_when_a_rollout_turns_terminal_1000_rollouts(
    no_leftover_processes: None,
) -> None:
    algorithm = CheckAtTerminal(poll=0.01)
    strategy = {"type": "cs", "server_host": "127.0.0.1", "server_port": free_port()}
    Trainer(strategy=strategy, n_runners=2, algorithm=algorithm).fit(async_agent, tasks(1000, spans=10))
    check_each_rollout_has_exactly_its_own_spans(algorithm, 1000, 10)


# ------------------------------------------------------------------------- the runner loop
class Event:
    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()


async def run_one_runner(store: LightningStore, agent: Any, ids: list[str]) -> None:
    event = Event()
    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner_loop, store, 0, event, agent)
            await store.wait_for_rollouts(rollout_ids=ids)
            event.set()


@pytest.fixture(params=BOTH_BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_the_agent_knows_its_attempt_and_spans_outside_agent_calls_are_not_recorded() -> None:
    store = InMemoryLightningStore()
    rollout = await store.enqueue_rollout("t")
    seen: list[Any] = []

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        seen.append(current_attempt())
        with tracer.start_as_current_span("inside"):
            pass
        return 1.0

    with tracer.start_as_current_span("outside-before"):
        pass
    await run_one_runner(store, agent, [rollout.rollout_id])
    with tracer.start_as_current_span("outside-after"):
        pass
    attempt = await store.get_latest_attempt(rollout.rollout_id)
    assert attempt is not None and seen == [(rollout.rollout_id, attempt.attempt_id)]
    assert current_attempt() is None
    assert [s.name for s in await store.query_spans(rollout.rollout_id)] == ["inside", REWARD_SPAN_NAME]


@pytest.mark.anyio
async def test_a_thread_the_agent_starts_records_spans_under_a_propagated_parent() -> None:
    store = InMemoryLightningStore()
    rollout = await store.enqueue_rollout("t")

    def in_plain_thread(parent: otel_context.Context) -> None:
        token = otel_context.attach(parent)  # what OpenTelemetry users do to cross into a thread
        try:
            with tracer.start_as_current_span("in-thread"):
                pass
        finally:
            otel_context.detach(token)

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        with tracer.start_as_current_span("agent"):
            thread = threading.Thread(target=in_plain_thread, args=(otel_context.get_current(),))
            thread.start()
            await anyio.to_thread.run_sync(thread.join)
        return 1.0

    await run_one_runner(store, agent, [rollout.rollout_id])
    roots = {root.span.name: root for root in span_tree(await store.query_spans(rollout.rollout_id))}
    assert sorted(roots) == ["agent", REWARD_SPAN_NAME]
    assert [child.span.name for child in roots["agent"].children] == ["in-thread"]


@pytest.mark.anyio
async def test_a_span_that_ends_after_its_call_is_written_with_the_next_batch() -> None:
    store = InMemoryLightningStore()
    first = await store.enqueue_rollout("first")
    second = await store.enqueue_rollout("second")
    release = threading.Event()
    ended = threading.Event()
    workers: list[threading.Thread] = []

    def left_running(span: Any) -> None:
        release.wait(TIMEOUT)
        span.end()
        ended.set()

    async def agent(task: str, resources: dict[str, Any]) -> float:
        if task == "first":
            span = tracer.start_span("left-open")  # ended by a thread after the call returned
            workers.append(threading.Thread(target=left_running, args=(span,)))
            workers[0].start()
        else:
            release.set()
            await anyio.to_thread.run_sync(ended.wait, TIMEOUT)
        return 1.0

    await run_one_runner(store, agent, [first.rollout_id, second.rollout_id])
    workers[0].join(TIMEOUT)
    assert [s.name for s in await store.query_spans(first.rollout_id)] == [REWARD_SPAN_NAME, "left-open"]


@pytest.mark.anyio
async def test_a_cancelled_agent_call_writes_the_spans_that_ended() -> None:
    store = InMemoryLightningStore()
    rollout = await store.enqueue_rollout("t")
    started = anyio.Event()

    async def agent(task: Any, resources: dict[str, Any]) -> float:
        with tracer.start_as_current_span("done-before-cancel"):
            pass
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    with anyio.fail_after(TIMEOUT):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner_loop, store, 0, Event(), agent)
            await started.wait()
            tg.cancel_scope.cancel()
    attempt = await store.get_latest_attempt(rollout.rollout_id)
    assert attempt is not None and attempt.status == "failed"
    assert [s.name for s in await store.query_spans(rollout.rollout_id)] == ["done-before-cancel"]


# ------------------------------------------------------------------ providers (fresh interpreters)
RUN = """
import json, logging, sys
from agl_async import Trainer
from traced_agents import CheckAtTerminal, agent_spans, sync_agent, tasks
logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

def run():
    algorithm = CheckAtTerminal()
    Trainer(n_runners=2, algorithm=algorithm).fit(sync_agent, tasks(4, spans=3))
    return sorted(len(agent_spans(spans)) for _, _, spans in algorithm.seen.values())
"""


def fresh_interpreter(body: str, env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """Run ``RUN + body`` in a new interpreter; its last stdout line is JSON."""
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", RUN + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": path, **(env or {})},
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_an_application_provider_is_kept_with_its_exporters() -> None:
    result, _ = fresh_interpreter(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        exporter = InMemorySpanExporter()
        mine = TracerProvider(resource=Resource.create({"service.name": "my-app"}))
        mine.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(mine)
        stored = run()
        print(json.dumps({"stored": stored, "same_provider": trace.get_tracer_provider() is mine,
                          "exported": len(exporter.get_finished_spans())}))
        """
    )
    assert result == {"stored": [3, 3, 3, 3], "same_provider": True, "exported": 12}


def test_without_an_application_provider_the_runner_installs_the_sdks() -> None:
    result, _ = fresh_interpreter(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        stored = run()
        print(json.dumps({"stored": stored, "sdk": isinstance(trace.get_tracer_provider(), TracerProvider)}))
        """
    )
    assert result == {"stored": [3, 3, 3, 3], "sdk": True}


def test_a_provider_that_is_not_the_sdks_is_left_alone_with_a_warning() -> None:
    result, stderr = fresh_interpreter(
        """
        from opentelemetry import trace
        trace.set_tracer_provider(trace.NoOpTracerProvider())
        print(json.dumps({"stored": run()}))
        """
    )
    assert result == {"stored": [0, 0, 0, 0]}
    assert "NoOpTracerProvider, not the SDK's TracerProvider" in stderr


def test_the_tracer_can_be_turned_off() -> None:
    result, _ = fresh_interpreter(
        """
        from opentelemetry import trace
        from agl_async.tracing import tracing_enabled
        stored = run()
        print(json.dumps({"stored": stored, "enabled": tracing_enabled(),
                          "proxy": isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)}))
        """,
        env={"AGL_AGENT_TRACING": "false"},
    )
    assert result == {"stored": [0, 0, 0, 0], "enabled": False, "proxy": True}


def test_without_the_sdk_nothing_of_opentelemetry_is_imported() -> None:
    script = textwrap.dedent(
        """
        import json, sys
        sys.modules["opentelemetry"] = None  # as if no OpenTelemetry package were installed
        from agl_async import Trainer
        from agl_async.algorithm import Baseline

        def agent(task, resources):
            return float(task)

        trainer = Trainer(n_runners=2, algorithm=Baseline())
        trainer.fit(agent, [1, 2, 3])
        import anyio
        spans = [s.name for r in anyio.run(trainer.store.query_rollouts)
                 for s in anyio.run(trainer.store.query_spans, r.rollout_id)]
        loaded = sorted(m for m, module in sys.modules.items() if m.startswith("opentelemetry") and module)
        print(json.dumps({"spans": spans, "loaded": loaded}))
        """
    )
    path = os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": path},
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"spans": [REWARD_SPAN_NAME] * 3, "loaded": []}


def test_the_runners_span_writes_are_not_traced_by_an_instrumented_http_client() -> None:
    # httpx instrumented globally: the runner's add_many_spans requests (over HTTP here) must
    # neither reach the application's exporter nor come back as spans of the attempt.
    result, _ = fresh_interpreter(
        """
        import anyio
        from opentelemetry import trace
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from agl_async import InMemoryLightningStore
        from agl_async.testing import serve_store
        from agl_async.trainer import runner_loop
        from traced_agents import async_agent

        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        HTTPXClientInstrumentor().instrument()

        class Stop:
            def __init__(self): self.event = anyio.Event()
            def is_set(self): return self.event.is_set()
            async def wait(self): await self.event.wait()

        async def main():
            # httpx's own transport: the instrumentation under test hooks httpx's send
            async with serve_store(InMemoryLightningStore(), transport="httpx") as client:
                rollout = await client.enqueue_rollout({"id": 7, "spans": 3, "sleep": 0})
                stop = Stop()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(runner_loop, client, 0, stop, async_agent)
                    await client.wait_for_rollouts(rollout_ids=[rollout.rollout_id])
                    stop.event.set()
                return [s.name for s in await client.query_spans(rollout.rollout_id)]

        stored = anyio.run(main)
        urls = [str(s.attributes.get("http.url", "")) for s in exporter.get_finished_spans()]
        calls = sorted({u.rsplit("/", 1)[-1] for u in urls if u})
        print(json.dumps({"stored": stored, "traced_store_calls": calls,
                          "agent_spans_exported": sorted(s.name for s in exporter.get_finished_spans()
                                                         if not s.attributes.get("http.url"))}))
        """
    )
    assert result["stored"] == ["step-0", "step-1", "agent", REWARD_SPAN_NAME]
    assert "add_many_spans" not in result["traced_store_calls"]
    assert "enqueue_rollout" in result["traced_store_calls"]  # the instrumentation is really on
    assert result["agent_spans_exported"] == ["agent", "step-0", "step-1"]
