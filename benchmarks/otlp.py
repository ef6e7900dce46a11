"""Benchmark: traces into the store — OTLP/HTTP ingestion, and the runner's tracer.

    PYTHONPATH=. .venv/bin/python benchmarks/otlp.py [--duration 3] [--repeat 3] [--batches 1,64,512]
    AGL_PEER_PYTHON=/work/peer-venv/bin/python PYTHONPATH=. .venv/bin/python benchmarks/otlp.py

Needs the ``otel`` extra (and ``opentelemetry-proto`` to build the requests). Prints one JSON object.

**Ingestion** (``ingestion``): spans/s that one store server process takes in through
``POST /v1/traces`` (protobuf). The server (an in-memory store with ``--attempts`` started
rollouts) runs in its own process; this process sends pre-encoded ``ExportTraceServiceRequest``
bodies of 1, 64 or 512 spans from ``--connections`` keep-alive connections for ``--duration``
seconds (a minimal asyncio HTTP/1.1 client, the same bytes for both servers, so only the server
differs). Each span looks like an LLM call: 11 attributes of the GenAI conventions (a 300-character
prompt among them), one event, a parent, the attempt's ids on the resource. Reported: the median
over ``--repeat`` runs of spans/s and requests/s, request p50/p99, and the server's CPU per span
(from /proc, independent of how busy the client is). After the runs the server's store is asked
how many spans it holds: ``verified`` says every acknowledged span is there. With
``AGL_PEER_PYTHON`` naming Agent-Lightning 0.3.0's interpreter, its LightningStoreServer
(``benchmarks/peer/agl_otlp_server.py``) takes the same requests in the same run, interleaved
(ours, theirs, ours, …); ``ratio`` = ours / theirs. ``json_512`` is our server with the same
spans in the OTLP JSON encoding (Agent-Lightning's server takes only protobuf).

**Runner tracer** (``tracer``): what recording costs per span in a runner, as CPU time of the
runner process. Fresh interpreters run ``runner_loop`` over ``--rollouts`` rollouts whose async
agent starts ``--spans`` spans each (3 attributes), against an in-memory store (``memory``) or a
store server in another process (``http``: the spans go over HTTP with ``add_many_spans``, one
request per batch). Three setups: ``off`` (no OpenTelemetry SDK provider: spans are no-ops),
``sdk`` (the application's SDK TracerProvider, the runner's tracer off), ``traced`` (the runner's
tracer on). ``tracer_us_per_span`` = traced - sdk: what the runner's tracer adds to a span the SDK
records anyway; ``sdk_us_per_span`` = sdk - off. The setups alternate, and the least CPU time of
the ``--repeat`` runs of each is used (other processes on the machine only ever add to it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = Path(__file__).parent / "peer" / "agl_otlp_server.py"
PROTOBUF = "application/x-protobuf"


# ------------------------------------------------------------------------------ our server process
def serve_ours(port: int, attempts: int) -> None:
    """The server process for our side: same JSON-lines protocol as the peer's script."""
    import anyio
    import anyio.to_thread

    from agl_async import InMemoryLightningStore, LightningStoreServer

    async def main() -> None:
        store = InMemoryLightningStore()
        started = [await store.start_rollout({"i": i}) for i in range(attempts)]
        ids = [[r.rollout_id, r.attempt.attempt_id] for r in started]
        async with LightningStoreServer(store, "127.0.0.1", port, auth_token=""):
            print(json.dumps({"port": port, "attempts": ids}), flush=True)
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    break
                if line.strip() == "count":
                    total = sum([len(await store.query_spans(rid)) for rid, _ in ids])
                    print(json.dumps({"spans": total}), flush=True)

    anyio.run(main)


class ServerProcess:
    """A store server in its own process (ours or the peer's), driven over stdin/stdout."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        import tempfile

        self.log = tempfile.TemporaryFile("w+")  # its stderr, shown if it fails
        self.proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            bufsize=1,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.log.seek(0)
            raise RuntimeError(
                f"server {command[:2]} did not start (exit {self.proc.wait()}): {self.log.read()[-3000:]}"
            )
        hello = json.loads(line)
        self.port: int = hello["port"]
        self.attempts: list[list[str]] = hello["attempts"]

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stored_spans(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("count\n")
        self.proc.stdin.flush()
        return int(json.loads(self.proc.stdout.readline())["spans"])

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_ours(attempts: int) -> ServerProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    port = _free_port()
    command = [sys.executable, __file__, "_serve", "--port", str(port), "--attempts", str(attempts)]
    return ServerProcess(command, env)


def start_peer(python: str, attempts: int) -> ServerProcess:
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    env.pop("PYTHONPATH", None)
    port = _free_port()
    command = [python, str(PEER_SCRIPT), "--port", str(port), "--attempts", str(attempts)]
    return ServerProcess(command, env)


# ------------------------------------------------------------------------------------ the requests
def build_request(rollout_id: str, attempt_id: str, n_spans: int, rng: random.Random) -> Any:
    """An ExportTraceServiceRequest of ``n_spans`` LLM-call-like spans of one attempt (one trace)."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource
    from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

    def kv(key: str, value: Any) -> KeyValue:
        if isinstance(value, bool):
            return KeyValue(key=key, value=AnyValue(bool_value=value))
        if isinstance(value, int):
            return KeyValue(key=key, value=AnyValue(int_value=value))
        if isinstance(value, float):
            return KeyValue(key=key, value=AnyValue(double_value=value))
        if isinstance(value, list):
            return KeyValue(
                key=key,
                value=AnyValue(array_value=ArrayValue(values=[AnyValue(string_value=v) for v in value])),
            )
        return KeyValue(key=key, value=AnyValue(string_value=value))

    resource = Resource(
        attributes=[
            kv("service.name", "agent"),
            kv("telemetry.sdk.name", "opentelemetry"),
            kv("telemetry.sdk.language", "python"),
            kv("agentlightning.rollout_id", rollout_id),
            kv("agentlightning.attempt_id", attempt_id),
        ]
    )
    trace_id = rng.randbytes(16)
    root_id = rng.randbytes(8)
    now = time.time_ns()
    prompt = ("You are a careful assistant. " * 11)[:300]
    spans = []
    for i in range(n_spans):
        start = now + i * 1_000_000
        spans.append(
            Span(
                trace_id=trace_id,
                span_id=root_id if i == 0 else rng.randbytes(8),
                parent_span_id=b"" if i == 0 else root_id,
                name="chat gpt-4o-mini",
                kind=Span.SPAN_KIND_CLIENT,
                start_time_unix_nano=start,
                end_time_unix_nano=start + 900_000,
                attributes=[
                    kv("gen_ai.operation.name", "chat"),
                    kv("gen_ai.provider.name", "openai"),
                    kv("gen_ai.request.model", "gpt-4o-mini"),
                    kv("gen_ai.request.temperature", 0.7),
                    kv("gen_ai.response.model", "gpt-4o-mini-2024-07-18"),
                    kv("gen_ai.response.id", f"chatcmpl-{rng.getrandbits(64):016x}"),
                    kv("gen_ai.response.finish_reasons", ["stop"]),
                    kv("gen_ai.usage.input_tokens", rng.randint(50, 500)),
                    kv("gen_ai.usage.output_tokens", rng.randint(5, 200)),
                    kv("server.address", "api.openai.com"),
                    kv("gen_ai.input.messages", prompt),
                ],
                events=[
                    Span.Event(
                        time_unix_nano=start + 500_000, name="gen_ai.choice", attributes=[kv("index", 0)]
                    )
                ],
                status=Status(code=Status.STATUS_CODE_OK),
            )
        )
    scope = InstrumentationScope(name="opentelemetry.instrumentation.openai", version="0.40.0")
    return ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[ScopeSpans(scope=scope, spans=spans)])]
    )


def http_head(port: int, length: int, content_type: str) -> bytes:
    return (
        f"POST /v1/traces HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


class Request:
    """One pre-encoded request whose trace and span ids are replaced by fresh random ones each
    time it is sent (Agent-Lightning's store skips a span id it already holds, ours does not:
    every span sent must be new for both to do the same work). The ids are patched in place in
    the encoded bytes; the patching costs the client well under a microsecond per span."""

    def __init__(self, port: int, message: Any, content_type: str = PROTOBUF) -> None:
        body = message.SerializeToString() if content_type == PROTOBUF else _json(message)
        self.head = http_head(port, len(body), content_type)
        self.body = bytearray(body)
        self.patch: list[tuple[int, list[int]]] = []  # (id size, offsets of every occurrence)
        if content_type != PROTOBUF:
            return  # our server keeps repeated ids as they are: nothing to refresh
        spans = message.resource_spans[0].scope_spans[0].spans
        ids = [(16, spans[0].trace_id)] + [(8, span.span_id) for span in spans]
        for size, value in ids:
            offsets, start = [], 0
            while (at := body.find(value, start)) >= 0:
                offsets.append(at)
                start = at + size
            self.patch.append((size, offsets))
        self.random = sum(size for size, _ in self.patch)

    def fresh(self) -> bytes:
        if self.patch:
            data, body, at = os.urandom(self.random), self.body, 0
            for size, offsets in self.patch:
                chunk = data[at : at + size]
                at += size
                for offset in offsets:
                    body[offset : offset + size] = chunk
        return self.head + self.body


def _json(message: Any) -> bytes:
    from google.protobuf import json_format

    return json_format.MessageToJson(message, indent=None).encode()


# --------------------------------------------------------------------------------------- the load
async def _connection(
    port: int, requests: list[Request], spans_per_request: int, deadline: float, latencies: list[float]
) -> tuple[int, int]:
    """Send the requests round-robin on one keep-alive connection until the deadline (at least one)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = spans = 0
    perf = time.perf_counter
    try:
        i = 0
        while i == 0 or perf() < deadline:
            request = requests[i % len(requests)].fresh()
            t0 = perf()
            writer.write(request)
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if status != 200:
                raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
            latencies.append(perf() - t0)
            sent += 1
            spans += spans_per_request
    finally:
        writer.close()
    return sent, spans


def drive(
    port: int, requests: list[Request], spans_per_request: int, duration: float, connections: int
) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        latencies: list[float] = []
        # warm-up: one request per connection, not counted
        await asyncio.gather(*(_connection(port, requests, 0, 0.0, []) for _ in range(connections)))
        started = time.perf_counter()
        deadline = started + duration
        results = await asyncio.gather(
            *(_connection(port, requests, spans_per_request, deadline, latencies) for _ in range(connections))
        )
        elapsed = time.perf_counter() - started
        sent = sum(r[0] for r in results)
        spans = sum(r[1] for r in results)
        ordered = sorted(latencies)
        return {
            "spans_per_s": spans / elapsed,
            "requests_per_s": sent / elapsed,
            "p50_ms": 1000 * ordered[len(ordered) // 2] if ordered else None,
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
            "spans": spans,
        }

    return asyncio.run(main())


def address(message: Any, rollout_id: str, attempt_id: str) -> None:
    """Point a request built by :func:`build_request` at one attempt (its resource attributes)."""
    resource = message.resource_spans[0].resource
    resource.attributes[3].value.string_value = rollout_id
    resource.attributes[4].value.string_value = attempt_id


def ingestion(args: argparse.Namespace, peer_python: str | None) -> dict[str, Any]:
    batches = [int(b) for b in args.batches.split(",")]
    sides: dict[str, ServerProcess] = {"agl_async": start_ours(args.attempts)}
    if peer_python:
        sides["agentlightning_0.3.0"] = start_peer(peer_python, args.attempts)
    rng = random.Random(0)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {side: {} for side in sides}
    acknowledged = dict.fromkeys(sides, 0)
    json_runs: list[dict[str, Any]] = []
    try:
        for batch in batches:
            # the same spans for both sides, addressed to each side's attempts
            messages = [build_request("", "", batch, rng) for _ in range(16)]
            bodies: dict[str, list[Request]] = {}
            for side, server in sides.items():
                bodies[side] = []
                for k, message in enumerate(messages):
                    address(message, *server.attempts[k % len(server.attempts)])
                    bodies[side].append(Request(server.port, message))
            for _ in range(args.repeat):
                for side, server in sides.items():  # interleaved: ours, theirs, ours, ...
                    cpu = server.cpu_seconds()
                    sample = drive(server.port, bodies[side], batch, args.duration, args.connections)
                    sample["server_cpu_us_per_span"] = (
                        1e6 * (server.cpu_seconds() - cpu) / max(1, sample["spans"])
                    )
                    acknowledged[side] += sample["spans"] + args.connections * batch  # + the warm-ups
                    runs[side].setdefault(str(batch), []).append(sample)
            if batch == 512:  # our server, the OTLP JSON encoding of the same spans
                ours = sides["agl_async"]
                json_bodies = []
                for k, message in enumerate(messages):
                    address(message, *ours.attempts[k % len(ours.attempts)])
                    json_bodies.append(Request(ours.port, message, "application/json"))
                for _ in range(args.repeat):
                    cpu = ours.cpu_seconds()
                    sample = drive(ours.port, json_bodies, batch, args.duration, args.connections)
                    sample["server_cpu_us_per_span"] = (
                        1e6 * (ours.cpu_seconds() - cpu) / max(1, sample["spans"])
                    )
                    acknowledged["agl_async"] += sample["spans"] + args.connections * batch
                    json_runs.append(sample)
        stored = {side: server.stored_spans() for side, server in sides.items()}
    finally:
        for server in sides.values():
            server.close()

    def median(samples: list[dict[str, Any]]) -> dict[str, Any]:
        keys = ("spans_per_s", "requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_span")
        return {
            key: round(statistics.median(s[key] for s in samples), 3 if "ms" in key or "us" in key else 1)
            for key in keys
        }

    out: dict[str, Any] = {}
    for side in sides:
        out[side] = {f"protobuf_{batch}": median(runs[side][str(batch)]) for batch in batches}
        out[side]["verified"] = {"acknowledged_spans": acknowledged[side], "stored_spans": stored[side]}
    if json_runs:
        out["agl_async"]["json_512"] = median(json_runs)
    if "agentlightning_0.3.0" in out:
        out["ratio_spans_per_s"] = {
            f"protobuf_{b}": round(
                out["agl_async"][f"protobuf_{b}"]["spans_per_s"]
                / out["agentlightning_0.3.0"][f"protobuf_{b}"]["spans_per_s"],
                2,
            )
            for b in batches
        }
    return out


# ------------------------------------------------------------------------------- the runner tracer
TRACER_RUN = r"""
import json, os, sys, time
import anyio
setup, store_kind, endpoint = sys.argv[1:4]
rollouts, spans = int(sys.argv[4]), int(sys.argv[5])
if setup == "sdk":
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    trace.set_tracer_provider(TracerProvider())
from opentelemetry import trace
from agl_async import InMemoryLightningStore, LightningStoreClient
from agl_async.trainer import runner_loop
from agl_async.tracing import tracing_enabled

tracer = trace.get_tracer("bench")

async def agent(task, resources):
    with tracer.start_as_current_span("agent", attributes={"task": task, "kind": "root", "n": spans}):
        for i in range(spans - 1):
            with tracer.start_as_current_span("step", attributes={"task": task, "i": i, "tool": "search"}):
                pass
    return 1.0

class Stop:
    def __init__(self): self.e = anyio.Event()
    def is_set(self): return self.e.is_set()
    async def wait(self): await self.e.wait()

async def once(store, n):
    ids = [r.rollout_id for r in await store.enqueue_many_rollouts([{"input": i} for i in range(n)])]
    stop = Stop()
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner_loop, store, 0, stop, agent)
        await store.wait_for_rollouts(rollout_ids=ids)
        stop.e.set()
    return ids

async def main():
    if store_kind == "memory":
        store = InMemoryLightningStore()
    else:
        store = LightningStoreClient(endpoint, auth_token="")
    assert tracing_enabled() == (setup == "traced")
    await once(store, 20)  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    ids = await once(store, rollouts)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    stored = sum([len(await store.query_spans(i)) for i in ids[:50]])
    if store_kind != "memory":
        await store.close()
    print(json.dumps({"cpu_s": cpu, "wall_s": wall, "stored_in_first_50": stored}))

anyio.run(main)
"""


def tracer_cost(args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out: dict[str, Any] = {"rollouts": args.rollouts, "spans_per_rollout": args.spans}
    total_spans = args.rollouts * args.spans
    for store_kind in ("memory", "http"):
        server = start_ours(1) if store_kind == "http" else None
        endpoint = f"http://127.0.0.1:{server.port}" if server else "-"
        samples: dict[str, list[dict[str, Any]]] = {"off": [], "sdk": [], "traced": []}
        try:
            for _ in range(args.repeat):
                for setup in samples:
                    setup_env = {**env, "AGL_AGENT_TRACING": "true" if setup == "traced" else "false"}
                    command = [
                        sys.executable,
                        "-c",
                        TRACER_RUN,
                        setup,
                        store_kind,
                        endpoint,
                        str(args.rollouts),
                        str(args.spans),
                    ]
                    done = subprocess.run(command, env=setup_env, capture_output=True, text=True, timeout=600)
                    if done.returncode != 0:
                        raise RuntimeError(done.stderr[-3000:])
                    samples[setup].append(json.loads(done.stdout.strip().splitlines()[-1]))
        finally:
            if server is not None:
                server.close()
        # the least CPU time of the repetitions: interference from other processes only ever adds
        cpu = {setup: min(s["cpu_s"] for s in runs) for setup, runs in samples.items()}
        out[store_kind] = {
            "cpu_us_per_span": {setup: round(1e6 * c / total_spans, 2) for setup, c in cpu.items()},
            "tracer_us_per_span": round(1e6 * (cpu["traced"] - cpu["sdk"]) / total_spans, 2),
            "sdk_us_per_span": round(1e6 * (cpu["sdk"] - cpu["off"]) / total_spans, 2),
            "spans_stored_first_50_rollouts": {
                s: runs[0]["stored_in_first_50"] for s, runs in samples.items()
            },
        }
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        parser = argparse.ArgumentParser()
        parser.add_argument("_serve")
        parser.add_argument("--port", type=int, required=True)
        parser.add_argument("--attempts", type=int, default=64)
        serve_args = parser.parse_args()
        serve_ours(serve_args.port, serve_args.attempts)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per ingestion measurement")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument("--batches", default="1,64,512", help="spans per OTLP request")
    parser.add_argument("--connections", type=int, default=4, help="concurrent client connections")
    parser.add_argument("--attempts", type=int, default=64, help="attempts the spans are spread over")
    parser.add_argument("--rollouts", type=int, default=400, help="tracer: rollouts per run")
    parser.add_argument("--spans", type=int, default=50, help="tracer: spans per rollout")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: ingestion, tracer")
    args = parser.parse_args()
    peer_python = os.environ.get("AGL_PEER_PYTHON") or None
    if peer_python and not Path(peer_python).exists():
        peer_python = None
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {
        "benchmark": "otlp",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "skip"},
        "peer": peer_python or "skipped: AGL_PEER_PYTHON is not set",
    }
    if "ingestion" not in skip:
        report["ingestion"] = ingestion(args, peer_python)
    if "tracer" not in skip:
        report["tracer"] = tracer_cost(args)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
