"""The wire protocol of the HTTP store: one ``POST /v1/<method>`` route per store method.

Request bodies are msgspec structs (decoded *and validated* at the server's edge: unknown fields,
wrong types and missing fields are rejected with 422 before the store is touched); responses are
the data model's own structs encoded as compact JSON. Values the store itself checks (statuses,
modes, ids) are sent as plain strings so that the store's ``ValueError`` message, not a schema
message, reaches the caller: the HTTP store answers exactly like the in-memory one.

"Leave as is" (``UNSET`` in ``update_*``) is an absent field on the wire (``msgspec.UNSET``).

Both the client and the server build from :data:`ROUTES`, so they cannot drift apart; the
server's OpenAPI document is generated from it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from ..types import Attempt, AttemptedRollout, ResourcesUpdate, Rollout, RolloutConfig, Span, Worker

__all__ = [
    "API_PREFIX",
    "ERROR_MEDIA_TYPE",
    "IDEMPOTENCY_HEADER",
    "ROUTES",
    "ErrorBody",
    "RouteSpec",
    "openapi_document",
]

API_PREFIX = "/v1"
#: Header carrying the idempotency key of a mutating request; retries reuse the same key.
IDEMPOTENCY_HEADER = "idempotency-key"
ERROR_MEDIA_TYPE = "application/json"

WireWorkerId = str | int


class _Body(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Base of request bodies: keyword fields, defaults omitted, unknown fields rejected."""


class ErrorBody(msgspec.Struct):
    """Every error response: ``error`` is a short machine-readable kind, ``detail`` says what was wrong."""

    error: str
    detail: str


class NoArgs(_Body):
    pass


class EnqueueRolloutBody(_Body):
    input: Any
    mode: str | None = None
    resources_id: str | None = None
    config: RolloutConfig | None = None
    metadata: dict[str, Any] | None = None


class StartRolloutBody(EnqueueRolloutBody, kw_only=True):
    worker_id: WireWorkerId | None = None


class EnqueueManyBody(_Body):
    rollouts: list[EnqueueRolloutBody]


class DequeueBody(_Body):
    worker_id: WireWorkerId | None = None
    timeout: float | None = None


class DequeueManyBody(_Body):
    limit: int = 1
    worker_id: WireWorkerId | None = None


class StartAttemptBody(_Body):
    rollout_id: str
    worker_id: WireWorkerId | None = None


class UpdateRolloutBody(_Body):
    rollout_id: str
    input: Any | UnsetType = UNSET
    mode: str | UnsetType | None = UNSET
    resources_id: str | UnsetType | None = UNSET
    status: str | UnsetType = UNSET
    config: RolloutConfig | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType | None = UNSET


class UpdateAttemptBody(_Body):
    rollout_id: str
    attempt_id: str
    status: str | UnsetType = UNSET
    worker_id: WireWorkerId | UnsetType | None = UNSET
    last_heartbeat_time: float | UnsetType = UNSET
    metadata: dict[str, Any] | UnsetType | None = UNSET


class FinishAndDequeueBody(_Body):
    rollout_id: str
    attempt_id: str
    status: str = "succeeded"
    worker_id: WireWorkerId | None = None
    timeout: float | None = None


class WaitForRolloutsBody(_Body):
    rollout_ids: list[str]
    timeout: float | None = None


class RolloutIdBody(_Body):
    rollout_id: str


class QueryRolloutsBody(_Body):
    status_in: list[str] | None = None
    rollout_id_in: list[str] | None = None
    rollout_id_contains: str | None = None
    sort_by: str | None = None
    sort_order: str = "asc"
    limit: int = -1
    offset: int = 0


class AddManySpansBody(_Body):
    spans: list[Span]


class QuerySpansBody(_Body):
    rollout_id: str
    attempt_id: str | None = None


class SpanSequenceBody(_Body):
    rollout_id: str
    attempt_id: str


class AddResourcesBody(_Body):
    resources: dict[str, Any]


class UpdateResourcesBody(_Body):
    resources_id: str
    resources: dict[str, Any]


class ResourcesIdBody(_Body):
    resources_id: str


class QueryWorkersBody(_Body):
    status_in: list[str] | None = None


class WorkerIdBody(_Body):
    worker_id: WireWorkerId


class UpdateWorkerBody(_Body):
    worker_id: WireWorkerId
    heartbeat_stats: dict[str, Any] | UnsetType = UNSET


@dataclass(frozen=True)
class RouteSpec:
    """One store method on the wire: its request body, its result and whether it changes state.

    ``mutating`` routes honour the idempotency header (a retried request is answered from the
    server's memory of the first one instead of being applied twice). ``blocking`` routes may
    wait (long poll); the server ends their wait early when it stops or the client goes away.
    """

    name: str
    body: type[msgspec.Struct]
    result: Any
    mutating: bool
    blocking: bool = False
    summary: str = ""

    @property
    def path(self) -> str:
        return f"{API_PREFIX}/{self.name}"


def _r(
    name: str, body: type[msgspec.Struct], result: Any, mutating: bool, blocking: bool = False
) -> RouteSpec:
    return RouteSpec(name, body, result, mutating, blocking, summary=f"LightningStore.{name}")


ROUTES: dict[str, RouteSpec] = {
    spec.name: spec
    for spec in (
        _r("enqueue_rollout", EnqueueRolloutBody, Rollout, True),
        _r("enqueue_many_rollouts", EnqueueManyBody, list[Rollout], True),
        _r("dequeue_rollout", DequeueBody, AttemptedRollout | None, True, blocking=True),
        _r("dequeue_many_rollouts", DequeueManyBody, list[AttemptedRollout], True),
        _r("finish_and_dequeue", FinishAndDequeueBody, AttemptedRollout | None, True, blocking=True),
        _r("start_rollout", StartRolloutBody, AttemptedRollout, True),
        _r("start_attempt", StartAttemptBody, AttemptedRollout, True),
        _r("update_rollout", UpdateRolloutBody, Rollout, True),
        _r("update_attempt", UpdateAttemptBody, Attempt, True),
        _r("wait_for_rollouts", WaitForRolloutsBody, list[Rollout], False, blocking=True),
        _r("get_rollout_by_id", RolloutIdBody, Rollout | None, False),
        _r("query_rollouts", QueryRolloutsBody, list[Rollout], False),
        _r("query_attempts", RolloutIdBody, list[Attempt], False),
        _r("get_latest_attempt", RolloutIdBody, Attempt | None, False),
        _r("add_span", Span, Span | None, True),
        _r("add_many_spans", AddManySpansBody, list[Span], True),
        _r("query_spans", QuerySpansBody, list[Span], False),
        _r("get_next_span_sequence_id", SpanSequenceBody, int, True),
        _r("add_resources", AddResourcesBody, ResourcesUpdate, True),
        _r("update_resources", UpdateResourcesBody, ResourcesUpdate, True),
        _r("get_latest_resources", NoArgs, ResourcesUpdate | None, False),
        _r("get_resources_by_id", ResourcesIdBody, ResourcesUpdate | None, False),
        _r("query_resources", NoArgs, list[ResourcesUpdate], False),
        _r("query_workers", QueryWorkersBody, list[Worker], False),
        _r("get_worker_by_id", WorkerIdBody, Worker | None, False),
        _r("update_worker", UpdateWorkerBody, Worker, True),
        _r("statistics", NoArgs, dict[str, Any], False),
    )
}


def openapi_document(title: str = "agl_async LightningStore", version: str = "1") -> dict[str, Any]:
    """An OpenAPI 3.1 description of every route, generated from :data:`ROUTES` with msgspec."""
    specs = list(ROUTES.values())
    types: list[Any] = [ErrorBody]
    for spec in specs:
        types += [spec.body, spec.result]
    schemas, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    error_schema = schemas[0]

    def error_response(description: str) -> dict[str, Any]:
        return {"description": description, "content": {ERROR_MEDIA_TYPE: {"schema": error_schema}}}

    paths: dict[str, Any] = {
        f"{API_PREFIX}/health": {
            "get": {
                "summary": "Liveness check (no authentication)",
                "operationId": "health",
                "responses": {"200": {"description": "The server is up"}},
            }
        }
    }
    for i, spec in enumerate(specs):
        body_schema, result_schema = schemas[1 + 2 * i], schemas[2 + 2 * i]
        parameters = []
        if spec.mutating:
            parameters.append(
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": False,
                    "schema": {"type": "string", "maxLength": 200},
                    "description": "Retries of one request reuse the key; the first answer is replayed.",
                }
            )
        paths[spec.path] = {
            "post": {
                "summary": spec.summary,
                "operationId": spec.name,
                "parameters": parameters,
                "requestBody": {"required": True, "content": {"application/json": {"schema": body_schema}}},
                "responses": {
                    "200": {
                        "description": "The method's result",
                        "content": {"application/json": {"schema": result_schema}},
                    },
                    "400": error_response("Malformed JSON, or the store rejected the arguments (ValueError)"),
                    "401": error_response("Missing or wrong bearer token"),
                    "413": error_response("Request body over the server's limit"),
                    "422": error_response("The body does not match the schema"),
                },
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
