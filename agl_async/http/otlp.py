"""OTLP/HTTP trace ingestion: ``POST /v1/traces`` on :class:`~agl_async.LightningStoreServer`.

Any OpenTelemetry-instrumented program can export spans to the store server with a stock OTLP/HTTP
span exporter pointed at ``<endpoint>/v1/traces``; each span is stored as a
:class:`~agl_async.Span` of the attempt it names.

Encodings
    ``Content-Type: application/x-protobuf`` is decoded with the official ``opentelemetry-proto``
    messages (the ``otel`` extra: ``pip install "agl-async[otel]"``; without it such a request is
    answered 415 naming the extra). ``application/json`` is the OTLP JSON encoding (lowerCamelCase
    keys, hex trace/span ids; base64 ids, which protobuf's generic JSON mapping writes, are
    accepted too), decoded with msgspec: it needs no extra. ``Content-Encoding: gzip`` is
    accepted; the server's body limit applies to the body as sent and again once decompressed.

Placement
    A span belongs to the attempt named by :data:`~agl_async.semconv.ROLLOUT_ID` and
    :data:`~agl_async.semconv.ATTEMPT_ID`, each looked up on the span's attributes first, then on
    its resource; :data:`~agl_async.semconv.SPAN_SEQUENCE_ID` (same lookup), when it is an
    integer >= 1, is its ``sequence_id``, otherwise the store numbers it. Stored: ``trace_id`` /
    ``span_id`` / ``parent_id`` as lowercase hex, ``name``, ``start_time`` / ``end_time`` in
    seconds, ``attributes`` (OTLP values as JSON values: bytes as base64 text, key-value lists as
    objects), ``events`` (``{"name", "time", "attributes"}``) and the status. Not stored: span
    kind, links, trace state, the resource and the instrumentation scope.

Answer
    200 with an ``ExportTraceServiceResponse`` in the request's encoding. Spans that cannot be
    placed — no rollout or attempt id, an unknown rollout or attempt, malformed ids or values —
    are not stored and are counted in ``partial_success.rejected_spans``, with an
    ``error_message`` that says why. All spans of one request are written with one
    ``add_many_spans`` call (a second one only when some span names an unknown attempt: the
    unknown ones are then found with ``query_attempts`` and the rest written without them).

Errors
    As OTLP/HTTP prescribes, a ``google.rpc.Status`` (``code``, ``message``) in the request's
    encoding: 400 for a body that does not decode (never a 500), 401 for a missing or wrong bearer
    token (the store routes' auth), 413 for a body over the limit, 415 for another content type or
    encoding, or protobuf without the extra. A refused request changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import functools
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from .. import semconv
from ..store.base import LightningStore
from ..types import AUTO_SEQUENCE_ID, Span

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from .app import StoreApp

__all__ = [
    "JSON",
    "OTEL_EXTRA_HINT",
    "PROTOBUF",
    "TRACES_PATH",
    "DecodedSpans",
    "decode_json",
    "decode_protobuf",
    "encode_response",
    "install",
    "openapi_paths",
    "traces_endpoint",
    "write_spans",
]

TRACES_PATH = "/v1/traces"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
OTEL_EXTRA_HINT = 'pip install "agl-async[otel]"'

_STATUS_CODES = {0: "unset", 1: "ok", 2: "error"}
_STATUS_NAMES = {"STATUS_CODE_UNSET": "unset", "STATUS_CODE_OK": "ok", "STATUS_CODE_ERROR": "error"}
# google.rpc.Code values of the error answers, by HTTP status.
_RPC_CODES = {400: 3, 401: 16, 413: 8, 415: 12}
_MAX_REASONS = 5
#: Marks a parent span id that is present but malformed.
_INVALID = "invalid"
_NO_IDS = f"no {semconv.ROLLOUT_ID} / {semconv.ATTEMPT_ID} (on the span or its resource)"


class DecodedSpans:
    """What a request decoded to: the spans it places and why the others were rejected."""

    __slots__ = ("rejected", "spans")

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.rejected: Counter[str] = Counter()


class _Refused(Exception):
    """A request answered with an error status and a ``google.rpc.Status`` body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------ placement
class _Resource:
    """The placement attributes of one resource (the fallback for its spans)."""

    __slots__ = ("attempt_id", "rollout_id", "sequence_id")

    def __init__(self, attributes: Mapping[str, Any]) -> None:
        self.rollout_id = attributes.get(semconv.ROLLOUT_ID)
        self.attempt_id = attributes.get(semconv.ATTEMPT_ID)
        self.sequence_id = attributes.get(semconv.SPAN_SEQUENCE_ID)


def _id_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _sequence_id(value: Any) -> int:
    """A usable sequence id (an integer >= 1, possibly as decimal text), else the store's numbering."""
    if isinstance(value, bool):
        return AUTO_SEQUENCE_ID
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            return AUTO_SEQUENCE_ID
    return value if isinstance(value, int) and value >= 1 else AUTO_SEQUENCE_ID


def _seconds(nanos: int) -> float | None:
    return nanos / 1e9 if nanos else None


def _place(
    out: DecodedSpans,
    resource: _Resource,
    attributes: dict[str, Any],
    trace_id: str | None,
    span_id: str | None,
    parent_id: str | None,
    name: str,
    start: int,
    end: int,
    events: list[dict[str, Any]],
    status_code: str,
    status_message: str,
) -> None:
    rollout_id = _id_text(attributes.get(semconv.ROLLOUT_ID, resource.rollout_id))
    attempt_id = _id_text(attributes.get(semconv.ATTEMPT_ID, resource.attempt_id))
    if rollout_id is None or attempt_id is None:
        out.rejected[_NO_IDS] += 1
        return
    if trace_id is None or span_id is None or parent_id is _INVALID:
        out.rejected["malformed trace_id, span_id or parent_span_id"] += 1
        return
    out.spans.append(
        Span(
            rollout_id=rollout_id,
            attempt_id=attempt_id,
            sequence_id=_sequence_id(attributes.get(semconv.SPAN_SEQUENCE_ID, resource.sequence_id)),
            trace_id=trace_id,
            span_id=span_id,
            parent_id=parent_id,
            name=name,
            start_time=_seconds(start),
            end_time=_seconds(end),
            attributes=attributes,
            events=events,
            status_code=status_code,  # type: ignore[arg-type]  # one of the three by construction
            status_message=status_message or None,
        )
    )


# ------------------------------------------------------------------------------------- protobuf
@functools.cache
def _protobuf_request_type() -> Any:
    """The ``ExportTraceServiceRequest`` message class, or ``None`` without opentelemetry-proto."""
    try:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    except ImportError:
        return None
    return trace_service_pb2.ExportTraceServiceRequest


def _pb_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_pb_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    return getattr(value, kind)


def _pb_attributes(key_values: Iterable[Any]) -> dict[str, Any]:
    return {kv.key: _pb_value(kv.value) for kv in key_values}


def _pb_id(raw: bytes, size: int) -> str | None:
    return raw.hex() if len(raw) == size else None


def decode_protobuf(body: bytes) -> DecodedSpans:
    """Decode an OTLP/protobuf ``ExportTraceServiceRequest`` into spans to store.

    ``ValueError`` when the body is not such a message; ``RuntimeError`` when opentelemetry-proto
    is not installed (the ``otel`` extra)."""
    request_type = _protobuf_request_type()
    if request_type is None:
        raise RuntimeError(f"OTLP/protobuf needs opentelemetry-proto: {OTEL_EXTRA_HINT}")
    from google.protobuf.message import DecodeError

    request = request_type()
    try:
        request.ParseFromString(body)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not an OTLP ExportTraceServiceRequest: {exc}") from None
    out = DecodedSpans()
    for resource_spans in request.resource_spans:
        try:
            resource = _Resource(_pb_attributes(resource_spans.resource.attributes))
        except RecursionError:
            resource = _Resource({})
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    status = span.status
                    parent = span.parent_span_id
                    _place(
                        out,
                        resource,
                        _pb_attributes(span.attributes),
                        _pb_id(span.trace_id, 16),
                        _pb_id(span.span_id, 8),
                        (_pb_id(parent, 8) or _INVALID) if parent else None,
                        span.name,
                        span.start_time_unix_nano,
                        span.end_time_unix_nano,
                        [
                            {
                                "name": event.name,
                                "time": _seconds(event.time_unix_nano),
                                "attributes": _pb_attributes(event.attributes),
                            }
                            for event in span.events
                        ],
                        _STATUS_CODES.get(status.code, "unset"),
                        status.message,
                    )
                except RecursionError:
                    out.rejected["attribute values nested too deeply"] += 1
    return out


# ----------------------------------------------------------------------------------------- JSON
# The OTLP JSON encoding, as msgspec structs: lowerCamelCase keys, unknown keys ignored, 64-bit
# integers as numbers or decimal strings.
class _JArray(msgspec.Struct):
    values: list[_JValue] = []


class _JKeyValueList(msgspec.Struct):
    values: list[_JKeyValue] = []


class _JValue(msgspec.Struct, rename="camel"):
    string_value: str | None = None
    bool_value: bool | None = None
    int_value: int | str | None = None
    double_value: float | str | None = None
    array_value: _JArray | None = None
    kvlist_value: _JKeyValueList | None = None
    bytes_value: str | None = None


class _JKeyValue(msgspec.Struct):
    key: str
    value: _JValue | None = None


class _JEvent(msgspec.Struct, rename="camel"):
    time_unix_nano: int | str | None = None
    name: str = ""
    attributes: list[_JKeyValue] = []


class _JStatus(msgspec.Struct):
    code: int | str | None = None
    message: str | None = None


class _JSpan(msgspec.Struct, rename="camel"):
    trace_id: str | None = None
    span_id: str | None = None
    parent_span_id: str | None = None
    name: str = ""
    start_time_unix_nano: int | str | None = None
    end_time_unix_nano: int | str | None = None
    attributes: list[_JKeyValue] = []
    events: list[_JEvent] = []
    status: _JStatus | None = None


class _JScopeSpans(msgspec.Struct):
    spans: list[_JSpan] = []


class _JResource(msgspec.Struct):
    attributes: list[_JKeyValue] = []


class _JResourceSpans(msgspec.Struct, rename="camel"):
    resource: _JResource | None = None
    scope_spans: list[_JScopeSpans] = []


class _JRequest(msgspec.Struct, rename="camel"):
    resource_spans: list[_JResourceSpans] = []


_json_decoder = msgspec.json.Decoder(_JRequest)


def _j_value(value: _JValue | None) -> Any:
    if value is None:
        return None
    if value.string_value is not None:
        return value.string_value
    if value.bool_value is not None:
        return value.bool_value
    if value.int_value is not None:
        return int(value.int_value)
    if value.double_value is not None:
        return float(value.double_value)
    if value.array_value is not None:
        return [_j_value(v) for v in value.array_value.values]
    if value.kvlist_value is not None:
        return {kv.key: _j_value(kv.value) for kv in value.kvlist_value.values}
    if value.bytes_value is not None:
        return value.bytes_value  # already base64 text
    return None


def _j_attributes(key_values: list[_JKeyValue]) -> dict[str, Any]:
    return {kv.key: _j_value(kv.value) for kv in key_values}


def _j_id(value: str | None, size: int) -> str | None:
    """Hex as OTLP JSON writes ids; base64 as protobuf's generic JSON mapping does."""
    if not value:
        return None
    try:
        if len(value) == 2 * size:
            return bytes.fromhex(value).hex()
        raw = base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        return None
    return raw.hex() if len(raw) == size else None


def _j_nanos(value: int | str | None) -> int:
    return int(value) if value is not None else 0


def decode_json(body: bytes) -> DecodedSpans:
    """Decode an OTLP/JSON ``ExportTraceServiceRequest`` into spans to store; ``ValueError``
    when the body is not one."""
    try:
        request = _json_decoder.decode(body or b"{}")
    except (msgspec.DecodeError, RecursionError) as exc:  # ValidationError is a DecodeError
        raise ValueError(f"not an OTLP/JSON ExportTraceServiceRequest: {exc}") from None
    out = DecodedSpans()
    for resource_spans in request.resource_spans:
        try:
            res = resource_spans.resource
            resource = _Resource(_j_attributes(res.attributes) if res is not None else {})
        except (ValueError, RecursionError):  # an unusable resource places nothing
            resource = _Resource({})
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    status = span.status
                    code: Any = status.code if status is not None else None
                    parent = span.parent_span_id
                    _place(
                        out,
                        resource,
                        _j_attributes(span.attributes),
                        _j_id(span.trace_id, 16),
                        _j_id(span.span_id, 8),
                        (_j_id(parent, 8) or _INVALID) if parent else None,
                        span.name,
                        _j_nanos(span.start_time_unix_nano),
                        _j_nanos(span.end_time_unix_nano),
                        [
                            {
                                "name": event.name,
                                "time": _seconds(_j_nanos(event.time_unix_nano)),
                                "attributes": _j_attributes(event.attributes),
                            }
                            for event in span.events
                        ],
                        _STATUS_NAMES.get(code, "unset")
                        if isinstance(code, str)
                        else _STATUS_CODES.get(code or 0, "unset"),
                        (status.message or "") if status is not None else "",
                    )
                except (ValueError, RecursionError):
                    out.rejected["malformed attribute value or timestamp"] += 1
    return out


# ------------------------------------------------------------------------------------ the store
async def write_spans(store: LightningStore, decoded: DecodedSpans) -> None:
    """Write the decoded spans with one ``add_many_spans`` call; spans naming an unknown rollout
    or attempt are moved to ``decoded.rejected`` (found with one ``query_attempts`` per rollout
    when the first call is refused) and the rest written without them."""
    spans = decoded.spans
    if not spans:
        return
    try:
        await store.add_many_spans(spans)
        return
    except ValueError:
        pass  # all-or-nothing: nothing was stored; find the spans the store cannot place
    known: dict[str, set[str]] = {}
    for rollout_id in dict.fromkeys(span.rollout_id for span in spans):
        known[rollout_id] = {attempt.attempt_id for attempt in await store.query_attempts(rollout_id)}
    placeable: list[Span] = []
    for span in spans:
        attempts = known[span.rollout_id]
        if not attempts:
            decoded.rejected[f"unknown rollout {span.rollout_id!r}"] += 1
        elif span.attempt_id not in attempts:
            decoded.rejected[f"unknown attempt {span.attempt_id!r} of rollout {span.rollout_id!r}"] += 1
        else:
            placeable.append(span)
    decoded.spans = placeable
    if placeable:
        try:
            await store.add_many_spans(placeable)
        except ValueError as exc:
            decoded.rejected[f"refused by the store: {exc}"] += len(placeable)
            decoded.spans = []


def _error_message(rejected: Counter[str]) -> str:
    reasons = rejected.most_common()
    shown = reasons[:_MAX_REASONS]
    text = "; ".join(f"{count} span{'s' if count > 1 else ''}: {reason}" for reason, count in shown)
    if len(reasons) > _MAX_REASONS:
        text += f"; and {len(reasons) - _MAX_REASONS} more reasons"
    return f"rejected {sum(rejected.values())} spans ({text})"


def encode_response(rejected: Counter[str], media_type: str) -> bytes:
    """An ``ExportTraceServiceResponse`` in ``media_type``: empty when every span was stored,
    else with ``partial_success`` (``rejected_spans`` and an ``error_message``)."""
    if media_type == PROTOBUF:
        if not rejected:
            return b""
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

        response = pb.ExportTraceServiceResponse(
            partial_success=pb.ExportTracePartialSuccess(
                rejected_spans=sum(rejected.values()), error_message=_error_message(rejected)
            )
        )
        return bytes(response.SerializeToString())
    if not rejected:
        return b"{}"
    partial = {"rejectedSpans": sum(rejected.values()), "errorMessage": _error_message(rejected)}
    return msgspec.json.encode({"partialSuccess": partial})


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _status_body(code: int, message: str, media_type: str) -> bytes:
    """A ``google.rpc.Status`` (written by hand: no protobuf runtime needed for an error)."""
    if media_type != PROTOBUF:
        return msgspec.json.encode({"code": code, "message": message})
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


# --------------------------------------------------------------------------------- the endpoint
def _gunzip(body: bytes, limit: int) -> bytes:
    """Decompress every gzip member of ``body``, refusing more than ``limit`` bytes of output."""
    out = bytearray()
    data = body
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit + 1 - len(out))
        except zlib.error as exc:
            raise _Refused(400, f"malformed gzip body: {exc}") from None
        if len(out) > limit:
            raise _Refused(413, f"decompressed request body exceeds the limit of {limit} bytes")
        if not inflater.eof:
            raise _Refused(400, "truncated gzip body")
        data = inflater.unused_data
    return bytes(out)


def traces_endpoint(app: StoreApp) -> Callable[[Request], Awaitable[Response]]:
    """The ``POST /v1/traces`` endpoint of ``app``: it writes to ``app.store``, with the app's
    bearer-token check and body limit, and answers errors as OTLP does (see the module docstring).

    Cancellation: a request cancelled (server stopping) while its spans are written has either
    been written whole or not at all, as one ``add_many_spans`` call is."""
    from starlette.requests import ClientDisconnect
    from starlette.responses import Response

    from .app import HTTPError

    store, limit = app.store, app.max_body_bytes

    def refuse(status: int, message: str, media_type: str) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        body = _status_body(_RPC_CODES.get(status, 2), message, media_type)
        return Response(body, status, headers=headers, media_type=media_type)

    async def otlp_traces(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        answer_type = PROTOBUF if content_type == PROTOBUF else JSON
        try:
            app.check_auth(request)
        except HTTPError as exc:
            return refuse(exc.status, exc.detail, answer_type)
        if content_type not in (PROTOBUF, JSON):
            shown = content_type or "none"
            return refuse(415, f"Content-Type {shown!r}: expected {PROTOBUF!r} or {JSON!r}", answer_type)
        if content_type == PROTOBUF and _protobuf_request_type() is None:
            message = (
                f"this server cannot decode OTLP/protobuf: install the otel extra ({OTEL_EXTRA_HINT}) "
                f"where it runs, or export with {JSON!r}"
            )
            return refuse(415, message, answer_type)
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("identity", "", "gzip"):
            return refuse(415, f"Content-Encoding {encoding!r}: expected 'gzip' or none", answer_type)
        try:
            body = await app.read_body(request)  # the store routes' limit (413)
            if encoding == "gzip":
                body = _gunzip(body, limit)
            try:
                decoded = decode_protobuf(body) if content_type == PROTOBUF else decode_json(body)
            except ValueError as exc:
                raise _Refused(400, str(exc)) from None
        except HTTPError as exc:
            return refuse(exc.status, exc.detail, answer_type)
        except _Refused as exc:
            return refuse(exc.status, exc.message, answer_type)
        except ClientDisconnect:
            return refuse(400, "incomplete request body", answer_type)
        await write_spans(store, decoded)
        return Response(encode_response(decoded.rejected, answer_type), 200, media_type=answer_type)

    return otlp_traces


def install(app: StoreApp) -> None:
    """Serve ``POST /v1/traces`` on ``app`` (a row of the server's ``APP_EXTENSIONS``). The route
    checks the bearer token itself, to answer a missing one as OTLP does."""
    app.add_route(TRACES_PATH, traces_endpoint(app), methods=("POST",), auth=False)


def openapi_paths() -> dict[str, Any]:
    """The OpenAPI description of ``POST /v1/traces`` (merged into the server's document)."""
    status = {
        "type": "object",
        "properties": {"code": {"type": "integer"}, "message": {"type": "string"}},
        "description": "google.rpc.Status (protobuf for protobuf requests)",
    }

    binary = {"type": "string", "format": "binary"}

    def error(description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {JSON: {"schema": status}, PROTOBUF: {"schema": binary}},
        }

    return {
        TRACES_PATH: {
            "post": {
                "summary": "OTLP/HTTP trace export (spans become Spans of the attempts they name)",
                "operationId": "otlp_traces",
                "description": (
                    f"An ExportTraceServiceRequest. Spans are placed by the attributes {semconv.ROLLOUT_ID}"
                    f" and {semconv.ATTEMPT_ID} (span first, then resource); {semconv.SPAN_SEQUENCE_ID} "
                    "optionally sets the sequence id. Content-Encoding: gzip is accepted. Protobuf "
                    f"needs the otel extra on the server ({OTEL_EXTRA_HINT})."
                ),
                "parameters": [
                    {
                        "name": "Content-Encoding",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string", "enum": ["gzip", "identity"]},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        PROTOBUF: {"schema": binary},
                        JSON: {"schema": {"type": "object", "description": "OTLP/JSON request"}},
                    },
                },
                "responses": {
                    "200": {
                        "description": (
                            "ExportTraceServiceResponse in the request's encoding; partialSuccess counts "
                            "the spans that were not stored (no or unknown rollout/attempt) and says why"
                        ),
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "partialSuccess": {
                                            "type": "object",
                                            "properties": {
                                                "rejectedSpans": {"type": "integer"},
                                                "errorMessage": {"type": "string"},
                                            },
                                        }
                                    },
                                }
                            },
                            PROTOBUF: {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    "400": error("The body does not decode as an ExportTraceServiceRequest"),
                    "401": error("Missing or wrong bearer token"),
                    "413": error("Request body (or its decompressed form) over the server's limit"),
                    "415": error("Other Content-Type or -Encoding, or protobuf without the otel extra"),
                },
            }
        }
    }
