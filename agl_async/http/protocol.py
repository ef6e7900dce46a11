"""The wire protocol of the HTTP store: one ``POST /v1/<method>`` route per store method.

The route table below is the single source of truth for both sides. A row names a
:class:`~agl_async.store.base.LightningStore` method, its result type and whether it changes
state; the request body is generated from the method's own signature (one field per parameter,
same names, same defaults), so a store method is written once — the abstract method — and
reaches the wire through its row. The client sends the row's body and decodes the row's result;
the server decodes the body and calls the method of the same name with its fields.

Request bodies are msgspec structs, decoded *and validated* at the server's edge: unknown fields,
wrong types and missing fields are rejected with 422 before the store is touched. Values the store
itself checks (statuses, modes) travel as plain strings, so that the store's ``ValueError``
message, not a schema message, reaches the caller: the HTTP store answers exactly like the
in-memory one. "Leave as is" (``UNSET``) is an absent field: the store's ``UNSET`` *is* msgspec's.
Responses are the data model's own structs encoded as compact JSON.

Adding a store method: the abstract method in ``store/base.py``, its in-memory implementation, and
one row here (plus, for a method that waits or whose body is not its parameters, a hand-written
handler on each side: see ``special``).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar, overload

import msgspec

from ..store.base import LightningStore
from ..types import (
    Attempt,
    AttemptedRollout,
    EnqueueRolloutRequest,
    ResourcesUpdate,
    Rollout,
    Span,
    Worker,
)

__all__ = [
    "API_PREFIX",
    "ERROR_MEDIA_TYPE",
    "IDEMPOTENCY_HEADER",
    "ROUTES",
    "RUN_OVER_HEADER",
    "ErrorBody",
    "Route",
    "openapi_document",
]

API_PREFIX = "/v1"
#: Header carrying the idempotency key of a mutating request; retries reuse the same key.
IDEMPOTENCY_HEADER = "idempotency-key"
ERROR_MEDIA_TYPE = "application/json"
#: Response header of every store route once the server's run is over (``LightningStoreServer.end_run``):
#: clients learn from it that no more work will come, and runners stop.
RUN_OVER_HEADER = "agl-run-over"

R = TypeVar("R")


class ErrorBody(msgspec.Struct):
    """Every error response: ``error`` is a short snake_case kind, ``detail`` says what was wrong."""

    error: str
    detail: str


@dataclass(frozen=True)
class Route(Generic[R]):
    """One store method on the wire, typed by its result ``R``.

    ``mutating`` routes honour the idempotency header (a retried request is answered from the
    server's memory of the first one instead of being applied twice). ``blocking`` routes may wait
    (long poll); the server ends their wait early when it stops or the client goes away.
    ``special`` routes have a hand-written handler on each side (waits, or a body that is not
    the method's parameters); the others are dispatched generically.
    """

    name: str
    body: type[msgspec.Struct]
    result: Any  # the msgspec type expression of R (e.g. ``Rollout | None``)
    mutating: bool
    blocking: bool = False
    special: bool = False

    @property
    def path(self) -> str:
        return f"{API_PREFIX}/{self.name}"

    @property
    def summary(self) -> str:
        return f"LightningStore.{self.name}"


# ---------------------------------------------------------------------------- generated bodies
def _wire_type(tp: Any) -> Any:
    """The type a parameter travels as: literals as ``str`` (the store checks them), sequences as
    lists, mappings as dicts; everything else as it is."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return str
    if origin in (list, Sequence):
        return list[_wire_type(args[0])]  # type: ignore[misc]
    if origin in (dict, Mapping):
        return dict[args[0], _wire_type(args[1])]  # type: ignore[misc,valid-type]
    if args and (origin is typing.Union or type(tp).__name__ == "UnionType"):
        wired = tuple(dict.fromkeys(_wire_type(a) for a in args))
        return typing.Union[wired]  # noqa: UP007
    return tp


def _body_of(name: str, overrides: Mapping[str, Any]) -> type[msgspec.Struct]:
    """A request struct with one field per parameter of ``LightningStore.<name>``."""
    method = getattr(LightningStore, name)
    hints = typing.get_type_hints(method)
    fields: list[tuple[str, Any, Any]] = []
    for param in list(inspect.signature(method).parameters.values())[1:]:
        tp = overrides.get(param.name, _wire_type(hints[param.name]))
        if param.default is param.empty:
            fields.append((param.name, tp))  # type: ignore[arg-type]
        else:
            fields.append((param.name, tp, param.default))
    camel = "".join(part.title() for part in name.split("_"))
    return msgspec.defstruct(
        f"{camel}Body",
        fields,
        kw_only=True,
        omit_defaults=True,
        forbid_unknown_fields=True,
        module=__name__,
    )


@overload
def _route(
    name: str,
    result: type[R],
    *,
    mutating: bool,
    optional: Literal[False] = False,
    blocking: bool = False,
    special: bool = False,
    body: type[msgspec.Struct] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Route[R]: ...


@overload
def _route(
    name: str,
    result: type[R],
    *,
    mutating: bool,
    optional: Literal[True],
    blocking: bool = False,
    special: bool = False,
    body: type[msgspec.Struct] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Route[R | None]: ...


def _route(
    name: str,
    result: Any,
    *,
    mutating: bool,
    optional: bool = False,
    blocking: bool = False,
    special: bool = False,
    body: type[msgspec.Struct] | None = None,
    fields: Mapping[str, Any] | None = None,
) -> Route[Any]:
    """A row: ``body`` defaults to the struct generated from the method's signature, with the
    wire types of ``fields`` given explicitly."""
    return Route(
        name,
        body if body is not None else _body_of(name, fields or {}),
        result | None if optional else result,
        mutating,
        blocking,
        special or blocking,
    )


# ---------------------------------------------------------------------------- the route table
ENQUEUE_ROLLOUT = _route("enqueue_rollout", Rollout, mutating=True, body=EnqueueRolloutRequest)
ENQUEUE_MANY_ROLLOUTS = _route(
    "enqueue_many_rollouts", list[Rollout], mutating=True, fields={"rollouts": list[EnqueueRolloutRequest]}
)
DEQUEUE_ROLLOUT = _route("dequeue_rollout", AttemptedRollout, optional=True, mutating=True, blocking=True)
DEQUEUE_MANY_ROLLOUTS = _route("dequeue_many_rollouts", list[AttemptedRollout], mutating=True)
FINISH_AND_DEQUEUE = _route(
    "finish_and_dequeue", AttemptedRollout, optional=True, mutating=True, blocking=True
)
START_ROLLOUT = _route("start_rollout", AttemptedRollout, mutating=True)
START_ATTEMPT = _route("start_attempt", AttemptedRollout, mutating=True)
UPDATE_ROLLOUT = _route("update_rollout", Rollout, mutating=True)
UPDATE_ATTEMPT = _route("update_attempt", Attempt, mutating=True)
WAIT_FOR_ROLLOUTS = _route("wait_for_rollouts", list[Rollout], mutating=False, blocking=True)
GET_ROLLOUT_BY_ID = _route("get_rollout_by_id", Rollout, optional=True, mutating=False)
QUERY_ROLLOUTS = _route("query_rollouts", list[Rollout], mutating=False)
QUERY_ATTEMPTS = _route("query_attempts", list[Attempt], mutating=False)
GET_LATEST_ATTEMPT = _route("get_latest_attempt", Attempt, optional=True, mutating=False)
ADD_SPAN = _route("add_span", Span, optional=True, mutating=True, special=True, body=Span)
ADD_MANY_SPANS = _route("add_many_spans", list[Span], mutating=True)
QUERY_SPANS = _route("query_spans", list[Span], mutating=False)
GET_NEXT_SPAN_SEQUENCE_ID = _route("get_next_span_sequence_id", int, mutating=True)
ADD_RESOURCES = _route("add_resources", ResourcesUpdate, mutating=True)
UPDATE_RESOURCES = _route("update_resources", ResourcesUpdate, mutating=True)
GET_LATEST_RESOURCES = _route("get_latest_resources", ResourcesUpdate, optional=True, mutating=False)
GET_RESOURCES_BY_ID = _route("get_resources_by_id", ResourcesUpdate, optional=True, mutating=False)
QUERY_RESOURCES = _route("query_resources", list[ResourcesUpdate], mutating=False)
QUERY_WORKERS = _route("query_workers", list[Worker], mutating=False)
GET_WORKER_BY_ID = _route("get_worker_by_id", Worker, optional=True, mutating=False)
UPDATE_WORKER = _route("update_worker", Worker, mutating=True)
STATISTICS = _route("statistics", dict[str, Any], mutating=False)

#: Every route by store method name (the rows above, in their order).
ROUTES: dict[str, Route[Any]] = {r.name: r for r in list(globals().values()) if isinstance(r, Route)}


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
                    **(
                        {"204": {"description": "The run is over (end_run): nothing claimed"}}
                        if spec.name in ("dequeue_rollout", "finish_and_dequeue")
                        else {}
                    ),
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
