"""OTLP/HTTP trace ingestion (``POST /v1/traces``): the real OpenTelemetry SDK and OTLP exporter
against the store server, the JSON encoding, gzip, partial success, malformed bodies, auth."""

from __future__ import annotations

import base64
import gzip
import json
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode, Tracer

from agl_async import AttemptedRollout, InMemoryLightningStore, LightningStore, LightningStoreServer, Span
from agl_async.http import otlp
from agl_async.semconv import ATTEMPT_ID, ROLLOUT_ID, SPAN_SEQUENCE_ID

pytestmark = pytest.mark.anyio

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
TIMEOUT = 30


@pytest.fixture
async def store() -> InMemoryLightningStore:
    return InMemoryLightningStore()


@pytest.fixture
async def server(store: InMemoryLightningStore) -> AsyncIterator[LightningStoreServer]:
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as running:
        yield running


@pytest.fixture
async def http(server: LightningStoreServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.endpoint, timeout=TIMEOUT) as client:
        yield client


def ids_of(rollout: AttemptedRollout) -> dict[str, str]:
    return {ROLLOUT_ID: rollout.rollout_id, ATTEMPT_ID: rollout.attempt.attempt_id}


def record(resource: dict[str, Any], build: Callable[[Tracer], None]) -> list[ReadableSpan]:
    """The spans ``build`` makes with a real SDK tracer whose resource has ``resource``."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(resource))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    build(provider.get_tracer("tests.otlp"))
    provider.shutdown()
    return list(exporter.get_finished_spans())


def flat(n: int, **attributes: Any) -> Callable[[Tracer], None]:
    def build(tracer: Tracer) -> None:
        for i in range(n):
            with tracer.start_as_current_span(f"span-{i}", attributes=attributes or None):
                pass

    return build


async def export(
    server: LightningStoreServer, spans: Sequence[ReadableSpan], **kwargs: Any
) -> SpanExportResult:
    """Export with the real OTLP/HTTP (protobuf) exporter, from a worker thread (it blocks)."""
    exporter = OTLPSpanExporter(endpoint=f"{server.endpoint}/v1/traces", timeout=10, **kwargs)
    try:
        return await anyio.to_thread.run_sync(exporter.export, spans)
    finally:
        exporter.shutdown()


def protobuf_body(spans: Sequence[ReadableSpan]) -> bytes:
    return bytes(encode_spans(spans).SerializeToString())


def partial_success(response: httpx.Response) -> tuple[int, str]:
    assert response.status_code == 200, response.content
    if response.headers["content-type"].startswith(PROTOBUF):
        message = ExportTraceServiceResponse()
        message.ParseFromString(response.content)
        return message.partial_success.rejected_spans, message.partial_success.error_message
    partial = response.json().get("partialSuccess", {})
    return int(partial.get("rejectedSpans", 0)), partial.get("errorMessage", "")


# ------------------------------------------------------------------------ the real exporter
async def test_spans_from_the_real_exporter_become_spans_of_their_attempt(
    server: LightningStoreServer, store: LightningStore
) -> None:
    first = await store.start_rollout({"task": 1})
    second = await store.start_rollout({"task": 2})

    def build(tracer: Tracer) -> None:
        attributes = {"s": "text", "i": 7, "f": 0.5, "b": True, "ls": ("a", "b"), "li": (1, 2)}
        with tracer.start_as_current_span("agent", attributes=attributes) as root:
            root.add_event("thinking", {"step": 1})
            with tracer.start_as_current_span("llm") as llm:
                llm.set_status(StatusCode.ERROR, "rate limited")
        # span-level ids win over the resource's: this one belongs to the second rollout
        with tracer.start_as_current_span("elsewhere", attributes=ids_of(second)):
            pass

    readable = record(ids_of(first), build)
    assert await export(server, readable) == SpanExportResult.SUCCESS

    stored = await store.query_spans(first.rollout_id)
    by_name = {span.name: span for span in stored}
    assert sorted(by_name) == ["agent", "llm"]
    sdk = {span.name: span for span in readable}
    for name, span in by_name.items():
        context = sdk[name].get_span_context()
        assert context is not None
        assert (span.rollout_id, span.attempt_id) == (first.rollout_id, first.attempt.attempt_id)
        assert span.trace_id == f"{context.trace_id:032x}" and len(span.trace_id) == 32
        assert span.span_id == f"{context.span_id:016x}" and len(span.span_id) == 16
        assert span.start_time == pytest.approx(sdk[name].start_time / 1e9)  # type: ignore[operator]
        assert span.end_time == pytest.approx(sdk[name].end_time / 1e9)  # type: ignore[operator]
        assert span.sequence_id >= 1
    agent, llm = by_name["agent"], by_name["llm"]
    assert agent.parent_id is None and llm.parent_id == agent.span_id
    assert agent.attributes == {"s": "text", "i": 7, "f": 0.5, "b": True, "ls": ["a", "b"], "li": [1, 2]}
    [event] = agent.events
    assert event["name"] == "thinking" and event["attributes"] == {"step": 1}
    assert event["time"] == pytest.approx(sdk["agent"].events[0].timestamp / 1e9)
    assert (agent.status_code, agent.status_message) == ("unset", None)
    assert (llm.status_code, llm.status_message) == ("error", "rate limited")
    [elsewhere] = await store.query_spans(second.rollout_id)
    assert elsewhere.name == "elsewhere" and elsewhere.attempt_id == second.attempt.attempt_id


async def test_gzip_from_the_real_exporter(server: LightningStoreServer, store: LightningStore) -> None:
    rollout = await store.start_rollout(None)
    readable = record(ids_of(rollout), flat(20, payload="x" * 200))
    assert await export(server, readable, compression=Compression.Gzip) == SpanExportResult.SUCCESS
    assert len(await store.query_spans(rollout.rollout_id)) == 20


async def test_span_sequence_id_attribute_sets_the_sequence(
    http: httpx.AsyncClient, store: LightningStore
) -> None:
    rollout = await store.start_rollout(None)

    def build(tracer: Tracer) -> None:
        for name, seq in (("ten", 10), ("eleven", "11"), ("bad", "x"), ("zero", 0), ("auto", None)):
            attributes = {} if seq is None else {SPAN_SEQUENCE_ID: seq}
            with tracer.start_as_current_span(name, attributes=attributes):
                pass

    response = await http.post(
        "/v1/traces",
        content=protobuf_body(record(ids_of(rollout), build)),
        headers={"content-type": PROTOBUF},
    )
    assert partial_success(response) == (0, "")
    stored = await store.query_spans(rollout.rollout_id)
    # explicit ids are kept; unusable ones (not an integer >= 1) are numbered by the store
    assert [(s.name, s.sequence_id) for s in stored] == [
        ("ten", 10),
        ("eleven", 11),
        ("bad", 12),
        ("zero", 13),
        ("auto", 14),
    ]


async def test_all_spans_of_a_request_are_written_with_one_store_call() -> None:
    class Counting(InMemoryLightningStore):
        calls: list[str] = []

        async def add_many_spans(self, spans: Sequence[Span]) -> list[Span]:
            self.calls.append(f"add_many_spans:{len(spans)}")
            return await super().add_many_spans(spans)

        async def add_span(self, span: Span) -> Span | None:
            self.calls.append("add_span")
            return await super().add_span(span)

    store = Counting()
    rollouts = [await store.start_rollout(i) for i in range(3)]

    def build(tracer: Tracer) -> None:
        for i in range(60):
            with tracer.start_as_current_span(f"s{i}", attributes=ids_of(rollouts[i % 3])):
                pass

    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        assert await export(server, record({}, build)) == SpanExportResult.SUCCESS
    assert store.calls == ["add_many_spans:60"]
    assert [len(await store.query_spans(r.rollout_id)) for r in rollouts] == [20, 20, 20]


# ------------------------------------------------------------------------------- JSON encoding
def any_value(value: Any) -> dict[str, Any]:
    return {"stringValue": value}


def json_request(spans: list[dict[str, Any]], resource: list[dict[str, Any]] | None = None) -> bytes:
    return json.dumps(
        {"resourceSpans": [{"resource": {"attributes": resource or []}, "scopeSpans": [{"spans": spans}]}]}
    ).encode()


async def test_json_encoding_with_every_kind_of_value(http: httpx.AsyncClient, store: LightningStore) -> None:
    rollout = await store.start_rollout(None)
    resource = [
        {"key": ROLLOUT_ID, "value": any_value(rollout.rollout_id)},
        {"key": ATTEMPT_ID, "value": any_value(rollout.attempt.attempt_id)},
    ]
    span = {
        "traceId": "5B8EFFF798038103D269B633813FC60C",
        "spanId": "EEE19B7EC3C1B174",
        "parentSpanId": "EEE19B7EC3C1B173",
        "name": "llm",
        "kind": 3,
        "startTimeUnixNano": "1544712660000000000",
        "endTimeUnixNano": 1544712661500000000,
        "attributes": [
            {"key": "s", "value": {"stringValue": "hi"}},
            {"key": "b", "value": {"boolValue": False}},
            {"key": "i", "value": {"intValue": "9007199254740993"}},
            {"key": "i2", "value": {"intValue": 3}},
            {"key": "d", "value": {"doubleValue": 2.5}},
            {"key": "arr", "value": {"arrayValue": {"values": [{"intValue": "1"}, {"stringValue": "x"}]}}},
            {"key": "kv", "value": {"kvlistValue": {"values": [{"key": "k", "value": {"doubleValue": 1}}]}}},
            {"key": "raw", "value": {"bytesValue": "AAEC"}},
            {"key": "empty", "value": {}},
        ],
        "events": [{"timeUnixNano": "1544712661000000000", "name": "chunk", "attributes": []}],
        "status": {"code": 2, "message": "boom"},
        "unknownField": {"ignored": True},
    }
    ok = {
        "traceId": "0" * 31 + "1",
        "spanId": "0" * 15 + "2",
        "name": "ok",
        "status": {"code": "STATUS_CODE_OK"},
    }
    response = await http.post(
        "/v1/traces", content=json_request([span, ok], resource), headers={"content-type": JSON}
    )
    assert response.headers["content-type"].startswith(JSON)
    assert response.json() == {}
    stored = {s.name: s for s in await store.query_spans(rollout.rollout_id)}
    llm = stored["llm"]
    assert (llm.trace_id, llm.span_id, llm.parent_id) == (
        "5b8efff798038103d269b633813fc60c",
        "eee19b7ec3c1b174",
        "eee19b7ec3c1b173",
    )
    assert (llm.start_time, llm.end_time) == (pytest.approx(1544712660.0), pytest.approx(1544712661.5))
    assert llm.attributes == {
        "s": "hi",
        "b": False,
        "i": 9007199254740993,
        "i2": 3,
        "d": 2.5,
        "arr": [1, "x"],
        "kv": {"k": 1.0},
        "raw": "AAEC",
        "empty": None,
    }
    assert llm.events == [{"name": "chunk", "time": pytest.approx(1544712661.0), "attributes": {}}]
    assert (llm.status_code, llm.status_message) == ("error", "boom")
    assert (stored["ok"].status_code, stored["ok"].start_time, stored["ok"].parent_id) == ("ok", None, None)


async def test_json_from_protobufs_generic_mapping_with_base64_ids(
    http: httpx.AsyncClient, store: LightningStore
) -> None:
    # json_format writes the official message with base64 ids (not OTLP/JSON's hex): accepted too.
    rollout = await store.start_rollout(None)

    def build(tracer: Tracer) -> None:
        with (
            tracer.start_as_current_span("parent"),
            tracer.start_as_current_span("child", attributes={"n": 5}),
        ):
            pass

    readable = record(ids_of(rollout), build)
    body = json_format.MessageToJson(encode_spans(readable)).encode()
    assert b"traceId" in body and base64.b64encode(readable[0].context.trace_id.to_bytes(16, "big")) in body
    response = await http.post(
        "/v1/traces", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert partial_success(response) == (0, "")
    stored = {s.name: s for s in await store.query_spans(rollout.rollout_id)}
    child = readable[0]
    assert stored["child"].trace_id == f"{child.context.trace_id:032x}"
    assert stored["child"].span_id == f"{child.context.span_id:016x}"
    assert stored["child"].parent_id == stored["parent"].span_id
    assert stored["child"].attributes == {"n": 5}  # intValue arrives as a string here


async def test_gzip_json(http: httpx.AsyncClient, store: LightningStore) -> None:
    rollout = await store.start_rollout(None)
    body = json_request([{"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "zipped", "attributes": []}])
    body = body.replace(b'"attributes": []', json.dumps({"attributes": [
        {"key": ROLLOUT_ID, "value": any_value(rollout.rollout_id)},
        {"key": ATTEMPT_ID, "value": any_value(rollout.attempt.attempt_id)},
    ]})[1:-1].encode(), 1)  # fmt: skip
    response = await http.post(
        "/v1/traces",
        content=gzip.compress(body),
        headers={"content-type": JSON, "content-encoding": "gzip"},
    )
    assert partial_success(response) == (0, "")
    [span] = await store.query_spans(rollout.rollout_id)
    assert span.name == "zipped" and span.trace_id == "ab" * 16


# ---------------------------------------------------------------------------- partial success
@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
async def test_spans_that_cannot_be_placed_are_rejected_and_counted(
    http: httpx.AsyncClient, store: LightningStore, content_type: str
) -> None:
    rollout = await store.start_rollout(None)
    good = ids_of(rollout)
    unknown_attempt = {ROLLOUT_ID: rollout.rollout_id, ATTEMPT_ID: "at-nope"}
    unknown_rollout = {ROLLOUT_ID: "ro-nope", ATTEMPT_ID: "at-nope"}
    only_rollout = {ROLLOUT_ID: rollout.rollout_id}

    def build(tracer: Tracer) -> None:
        for name, attributes in [
            ("good-1", good),
            ("no-ids", {}),
            ("only-rollout", only_rollout),
            ("unknown-attempt", unknown_attempt),
            ("unknown-rollout", unknown_rollout),
            ("good-2", good),
        ]:
            with tracer.start_as_current_span(name, attributes=attributes):
                pass

    readable = record({}, build)
    message = encode_spans(readable)
    body = (
        bytes(message.SerializeToString())
        if content_type == PROTOBUF
        else json_format.MessageToJson(message).encode()
    )
    response = await http.post("/v1/traces", content=body, headers={"content-type": content_type})
    assert response.headers["content-type"].startswith(content_type)
    rejected, error = partial_success(response)
    assert rejected == 4
    assert "2 spans: no agentlightning.rollout_id / agentlightning.attempt_id" in error
    assert "unknown rollout 'ro-nope'" in error
    assert f"unknown attempt 'at-nope' of rollout '{rollout.rollout_id}'" in error
    assert [s.name for s in await store.query_spans(rollout.rollout_id)] == ["good-1", "good-2"]


@pytest.mark.parametrize("content_type", [PROTOBUF, JSON])
async def test_a_fully_accepted_or_empty_request_has_no_partial_success(
    http: httpx.AsyncClient, content_type: str
) -> None:
    for body in (b"", b"{}" if content_type == JSON else b""):
        response = await http.post("/v1/traces", content=body, headers={"content-type": content_type})
        assert response.status_code == 200
        assert response.content == (b"{}" if content_type == JSON else b"")


# ------------------------------------------------------------------------------ refused requests
def status_of(response: httpx.Response) -> tuple[int, str]:
    """The google.rpc.Status of an error answer, in the request's encoding."""
    if response.headers["content-type"].startswith(PROTOBUF):
        status = status_pb2.Status()
        status.ParseFromString(response.content)
        return status.code, status.message
    body = response.json()
    return body["code"], body["message"]


MALFORMED = [
    pytest.param(PROTOBUF, None, b"\xff\xff\xff\xff not protobuf", 400, "not an OTLP", id="protobuf-garbage"),
    pytest.param(PROTOBUF, None, b"\x0a\x05\x0a\x03", 400, "not an OTLP", id="protobuf-truncated"),
    pytest.param(JSON, None, b"{not json", 400, "not an OTLP/JSON", id="json-garbage"),
    pytest.param(JSON, None, b'{"resourceSpans": 5}', 400, "resourceSpans", id="json-wrong-type"),
    pytest.param(JSON, None, b"[1, 2]", 400, "not an OTLP/JSON", id="json-array"),
    pytest.param(JSON, None, b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"name": 5}]}]}]}', 400,
                 "name", id="json-name-type"),
    pytest.param(JSON, "gzip", b"not gzip at all", 400, "malformed gzip", id="gzip-garbage"),
    pytest.param(JSON, "gzip", gzip.compress(b"{}" * 100)[:20], 400, "truncated gzip", id="gzip-truncated"),
    pytest.param("text/plain", None, b"{}", 415, "expected 'application/x-protobuf'", id="content-type"),
    pytest.param(None, None, b"{}", 415, "Content-Type 'none'", id="no-content-type"),
    pytest.param(JSON, "br", b"{}", 415, "Content-Encoding 'br'", id="content-encoding"),
]  # fmt: skip


@pytest.mark.parametrize(("content_type", "encoding", "body", "status", "message"), MALFORMED)
async def test_malformed_requests_are_4xx_and_the_server_goes_on(
    http: httpx.AsyncClient,
    store: LightningStore,
    content_type: str | None,
    encoding: str | None,
    body: bytes,
    status: int,
    message: str,
) -> None:
    headers = {"content-type": content_type or ""}
    if encoding:
        headers["content-encoding"] = encoding
    response = await http.post("/v1/traces", content=body, headers=headers)
    assert response.status_code == status, response.content
    code, text = status_of(response)
    assert code == {400: 3, 415: 12}[status] and message in text
    # the server is alive and still ingests
    assert (await http.get("/v1/health")).status_code == 200
    rollout = await store.start_rollout(None)
    ok = await http.post(
        "/v1/traces",
        content=protobuf_body(record(ids_of(rollout), flat(1))),
        headers={"content-type": PROTOBUF},
    )
    assert partial_success(ok) == (0, "")


async def test_a_span_with_malformed_ids_is_rejected_not_the_request(
    http: httpx.AsyncClient, store: LightningStore
) -> None:
    rollout = await store.start_rollout(None)
    placed = [{"key": k, "value": any_value(v)} for k, v in ids_of(rollout).items()]
    spans = [
        {"traceId": "zz" * 16, "spanId": "01" * 8, "name": "bad-trace", "attributes": placed},
        {"traceId": "01" * 16, "spanId": "01" * 3, "name": "bad-span", "attributes": placed},
        {"traceId": "01" * 16, "spanId": "01" * 8, "parentSpanId": "xyz", "name": "bad-parent",
         "attributes": placed},
        {"traceId": "01" * 16, "spanId": "02" * 8, "name": "bad-int",
         "attributes": [*placed, {"key": "n", "value": {"intValue": "ten"}}]},
        {"traceId": "01" * 16, "spanId": "03" * 8, "name": "fine", "attributes": placed},
    ]  # fmt: skip
    response = await http.post("/v1/traces", content=json_request(spans), headers={"content-type": JSON})
    rejected, error = partial_success(response)
    assert rejected == 4 and "malformed trace_id, span_id or parent_span_id" in error
    assert [s.name for s in await store.query_spans(rollout.rollout_id)] == ["fine"]


async def test_body_limit_applies_before_and_after_decompression() -> None:
    store = InMemoryLightningStore()
    async with (
        LightningStoreServer(store, "127.0.0.1", 0, auth_token="", max_body_bytes=64 * 1024) as server,
        httpx.AsyncClient(base_url=server.endpoint) as http,
    ):
        big = b"{" + b" " * (100 * 1024) + b"}"
        response = await http.post("/v1/traces", content=big, headers={"content-type": JSON})
        assert response.status_code == 413 and status_of(response)[0] == 8
        bomb = gzip.compress(big * 10)  # ~1 MB inflated from a few KB
        assert len(bomb) < 64 * 1024
        response = await http.post(
            "/v1/traces", content=bomb, headers={"content-type": JSON, "content-encoding": "gzip"}
        )
        assert response.status_code == 413 and "decompressed" in status_of(response)[1]
        assert (
            await http.post("/v1/traces", content=b"{}", headers={"content-type": JSON})
        ).status_code == 200


async def test_same_bearer_token_as_the_store_routes() -> None:
    store = InMemoryLightningStore()
    rollout = await store.start_rollout(None)
    readable = record(ids_of(rollout), flat(3))
    async with (
        LightningStoreServer(store, "127.0.0.1", 0, auth_token="s3cret") as server,
        httpx.AsyncClient(base_url=server.endpoint) as http,
    ):
        for headers in ({}, {"authorization": "Bearer wrong"}):
            response = await http.post(
                "/v1/traces", content=protobuf_body(readable), headers={"content-type": PROTOBUF, **headers}
            )
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
            assert status_of(response) == (16, "missing or wrong bearer token")
        assert await export(server, readable) == SpanExportResult.FAILURE
        assert await store.query_spans(rollout.rollout_id) == []
        assert (
            await export(server, readable, headers={"Authorization": "Bearer s3cret"})
            == SpanExportResult.SUCCESS
        )
    assert len(await store.query_spans(rollout.rollout_id)) == 3


async def test_the_route_is_in_the_openapi_document(http: httpx.AsyncClient) -> None:
    document = (await http.get("/v1/openapi.json")).json()
    post = document["paths"]["/v1/traces"]["post"]
    assert set(post["requestBody"]["content"]) == {PROTOBUF, JSON}
    assert {"200", "400", "401", "413", "415"} <= set(post["responses"])
    assert (await http.get("/v1/traces")).status_code == 405


def test_protobuf_without_the_otel_extra_is_415_and_json_still_works() -> None:
    # A fresh interpreter in which opentelemetry and protobuf cannot be imported.
    script = textwrap.dedent(
        """
        import sys
        for name in ("opentelemetry", "google", "google.protobuf"):
            sys.modules[name] = None
        import anyio, httpx, json
        from agl_async import InMemoryLightningStore, LightningStoreServer

        async def main():
            store = InMemoryLightningStore()
            r = await store.start_rollout(None)
            attrs = [{"key": "agentlightning.rollout_id", "value": {"stringValue": r.rollout_id}},
                     {"key": "agentlightning.attempt_id", "value": {"stringValue": r.attempt.attempt_id}}]
            body = {"resourceSpans": [{"resource": {"attributes": attrs},
                    "scopeSpans": [{"spans": [{"traceId": "01" * 16, "spanId": "02" * 8, "name": "j"}]}]}]}
            async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
                async with httpx.AsyncClient(base_url=server.endpoint) as http:
                    pb = await http.post("/v1/traces", content=b"\\x0a\\x00",
                                         headers={"content-type": "application/x-protobuf"})
                    js = await http.post("/v1/traces", json=body)
            spans = await store.query_spans(r.rollout_id)
            pb_answer = [pb.status_code, pb.headers["content-type"], pb.content.decode("latin-1")]
            print(json.dumps({"pb": pb_answer,
                              "json": js.status_code, "spans": [s.name for s in spans],
                              "loaded": sorted(m for m in sys.modules if m.startswith("opentelemetry.")
                                               and sys.modules[m] is not None)}))

        anyio.run(main)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    status, content_type, body = result["pb"]
    assert status == 415 and content_type.startswith(PROTOBUF)
    assert 'pip install "agl-async[otel]"' in body
    assert result["json"] == 200 and result["spans"] == ["j"] and result["loaded"] == []


# ------------------------------------------------------------------------ decoding never crashes
any_json: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)
otlp_keys = st.sampled_from(
    ["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "attributes", "key", "value",
     "stringValue", "intValue", "arrayValue", "values", "kvlistValue", "status", "code", "events"]
)  # fmt: skip
otlp_like: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.integers() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(otlp_keys, children, max_size=4),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        any_json.map(lambda v: json.dumps(v).encode()),
        otlp_like.map(lambda v: json.dumps(v).encode()),
    )
)
def test_decoding_any_body_gives_spans_or_a_value_error(body: bytes) -> None:
    for decode in (otlp.decode_protobuf, otlp.decode_json):
        try:
            decoded = decode(body)
        except ValueError:
            continue
        assert all(isinstance(span, Span) for span in decoded.spans)
