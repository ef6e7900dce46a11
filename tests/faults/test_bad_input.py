"""Scenario 6: bad input at scale, against a standalone server process (``agl-async serve``).

Every route is taken from the server's own OpenAPI document (``GET /v1/openapi.json``), and
request bodies are generated from the document's JSON schemas with hypothesis, then broken on
purpose: a required field dropped, an unknown field added, a field of the wrong type, a body that
is not an object, malformed or truncated JSON. Also: wrong methods on every path, bodies over the
size limit on every route, unknown ids on every route, and requests without (or with a wrong)
token to a token-protected server. The server answers 4xx (the specific one where the input
determines it) with a JSON ``{"error", "detail"}`` body, never 5xx, logs no internal error,
keeps serving normal requests, and stops cleanly afterwards. The whole module runs twice: over
plain HTTP and over HTTPS (a throwaway CA's certificate, ``serve --ssl-certfile/--ssl-keyfile``).

(tests/test_http_errors.py specifies each error class with hand-written cases and a body fuzz
on the route table; this drives everything from the published document, over a real process.)

schemathesis would do the generation from the document too, but pulls in a large dependency tree
(requests, jsonschema, werkzeug, graphql-core, ...) for what ~60 lines of hypothesis do here.
"""

from __future__ import annotations

import json
import signal
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from conftest import TLSFiles
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agl_async.http.otlp import TRACES_PATH
from agl_async.http.protocol import ROUTES
from agl_async.testing import free_port

from .fleet import popen, stop_session

TOKEN = "fault-token"
MAX_BODY = 8 * 1024 * 1024  # agl-async serve uses the server's default limit
AUTH = {"authorization": f"Bearer {TOKEN}"}

JSONish = dict[str, Any]


class Served:
    def __init__(self, proc: Any, endpoint: str, verify: Any) -> None:
        self.proc, self.endpoint, self.verify = proc, endpoint, verify
        self.http = httpx.Client(base_url=endpoint, headers=AUTH, timeout=30, verify=verify)
        self.document: JSONish = self.http.get("/v1/openapi.json").raise_for_status().json()
        self.requests = 0
        self.statuses: dict[int, int] = {}

    def post(self, path: str, content: bytes, **kwargs: Any) -> httpx.Response:
        response = self.http.post(path, content=content, **kwargs)
        self.requests += 1
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        return response


@pytest.fixture(scope="module", params=["http", "https"])
def served(request: pytest.FixtureRequest, tls_files: TLSFiles) -> Iterator[Served]:
    """``agl-async serve`` with a token on a free port (plain, or HTTPS); after the module: it must
    still serve, stop cleanly on SIGINT (exit 0) and have logged no internal error."""
    port = free_port()
    tls: list[str] = []
    verify: Any = False
    if request.param == "https":
        tls = ["--ssl-certfile", str(tls_files.cert), "--ssl-keyfile", str(tls_files.key)]
        verify = ssl.create_default_context(cafile=str(tls_files.ca))
    proc = popen("agl_async.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--token", TOKEN, *tls)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")  # type: ignore[union-attr]
        server = Served(proc, f"{request.param}://127.0.0.1:{port}", verify)
        yield server
        ok = server.http.post("/v1/enqueue_rollout", json={"input": "still serving"})
        assert ok.status_code == 200 and ok.json()["input"] == "still serving"
        server.http.close()
        print(f"\nbad input: {server.requests} requests, statuses {dict(sorted(server.statuses.items()))}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "internal_error" not in err and "unexpected" not in err, err
    finally:
        stop_session(proc)


def _routes(doc: JSONish) -> list[tuple[str, JSONish]]:
    """(path, request body schema) of every POST route of the document."""
    out = []
    for path, item in doc["paths"].items():
        if "post" in item and path != TRACES_PATH:  # OTLP's bodies and errors: tests/test_otlp.py
            out.append((path, item["post"]["requestBody"]["content"]["application/json"]["schema"]))
    return sorted(out, key=lambda r: r[0])


def _resolve(schema: JSONish, doc: JSONish) -> JSONish:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def from_schema(schema: JSONish, doc: JSONish, depth: int = 0) -> st.SearchStrategy[Any]:
    """Values that match ``schema`` (the subset of JSON schema msgspec generates)."""
    schema = _resolve(schema, doc)
    if "anyOf" in schema:
        return st.one_of([from_schema(s, doc, depth) for s in schema["anyOf"]])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema.get("type")
    if kind == "object" and "properties" in schema and depth < 3:
        required = set(schema.get("required", ()))
        props = schema["properties"]
        return st.fixed_dictionaries(
            {k: from_schema(v, doc, depth + 1) for k, v in props.items() if k in required},
            optional={k: from_schema(v, doc, depth + 1) for k, v in props.items() if k not in required},
        )
    if kind == "object":
        return st.dictionaries(st.text(max_size=8), any_json, max_size=3)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {}), doc, depth + 1), max_size=3)
    simple = {
        "string": st.text(max_size=12),
        "integer": st.integers(min_value=-(2**63), max_value=2**63 - 1),
        "number": st.floats(allow_nan=False, allow_infinity=False),
        "boolean": st.booleans(),
        "null": st.none(),
    }
    return simple.get(kind, any_json)  # type: ignore[arg-type]


WRONG_TYPE: JSONish = {  # a value of each JSON type
    "string": "text",
    "integer": 12345,
    "number": 1.5,
    "boolean": True,
    "object": {"k": 1},
    "array": [1, 2],
    "null": None,
}


def _json_types(schema: JSONish, doc: JSONish) -> set[str]:
    schema = _resolve(schema, doc)
    if "anyOf" in schema:
        return set().union(*(_json_types(s, doc) for s in schema["anyOf"]))
    if "enum" in schema:
        return {"string"}
    return {schema["type"]} if "type" in schema else set(WRONG_TYPE)


def _short_waits(body: Any) -> Any:
    """A fuzzed ``timeout`` must not park a long poll for long."""
    if isinstance(body, dict) and isinstance(body.get("timeout"), (int, float)):
        body["timeout"] = 0
    if isinstance(body, dict) and "rollout_ids" in body and "timeout" not in body:
        body["timeout"] = 0
    return body


@st.composite
def requests(draw: st.DrawFn, doc: JSONish) -> tuple[str, str, bytes, int | tuple[int, ...] | None]:
    """(path, mutation, body bytes, the status that mutation must get or None for "any 4xx/200")."""
    path, schema = draw(st.sampled_from(_routes(doc)))
    body_schema = _resolve(schema, doc)
    props: JSONish = body_schema.get("properties", {})
    required: list[str] = list(body_schema.get("required", ()))
    closed = body_schema.get("additionalProperties") is False
    body = _short_waits(draw(from_schema(schema, doc)))
    mutation = draw(
        st.sampled_from(["valid", "drop_required", "unknown_field", "wrong_type", "not_object", "malformed"])
    )
    expect: int | tuple[int, ...] | None = None
    if mutation == "drop_required" and required:
        del body[draw(st.sampled_from(required))]
        expect = 422
    elif mutation == "unknown_field":
        body["zz_" + draw(st.text(alphabet="abcdefgh", min_size=1, max_size=6))] = draw(any_json)
        expect = 422 if closed else None
    elif mutation == "wrong_type" and props:
        name = draw(st.sampled_from(sorted(props)))
        types = _json_types(props[name], doc)
        wrong = [
            v for t, v in WRONG_TYPE.items() if t not in types and not (t == "integer" and "number" in types)
        ]
        if wrong:
            body[name] = draw(st.sampled_from(wrong))
            expect = 422
    elif mutation == "not_object":
        body = draw(st.lists(any_json, max_size=3) | st.integers() | st.text() | st.just(None))
        expect = 422
    if mutation == "malformed":
        raw = json.dumps(body).encode()
        cut = draw(st.integers(min_value=0, max_value=max(len(raw) - 1, 0)))
        # (An empty body is the server's "no arguments", i.e. ``{}``: not malformed.)
        content = raw[:cut] + draw(st.sampled_from([b"", b"}", b"\xff", b",,", b'"'])) or b"{"
        try:
            json.loads(content)
        except ValueError:
            # msgspec validates while it parses: damage after a schema error reads as that error.
            return path, mutation, content, (400, 422)
        return path, mutation, content, None
    return path, mutation, json.dumps(body).encode(), expect


def _check_error(response: httpx.Response, status: int | tuple[int, ...] | None = None) -> None:
    assert response.status_code < 500, (response.status_code, response.text)
    if status is not None:
        allowed = status if isinstance(status, tuple) else (status,)
        assert response.status_code in allowed, (status, response.status_code, response.text)
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/json"
        body = response.json()
        assert set(body) == {"error", "detail"} and body["detail"], body


def test_the_document_describes_every_route(served: Served) -> None:
    paths = set(served.document["paths"])
    assert paths == {spec.path for spec in ROUTES.values()} | {"/v1/health", TRACES_PATH}


def test_fuzzed_requests_from_the_openapi_document_get_4xx_never_5xx(
    served: Served, figures: Callable[..., None]
) -> None:
    doc = served.document
    seen: dict[str, int] = {}

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=requests(doc))
    def fuzz(request: tuple[str, str, bytes, int | tuple[int, ...] | None]) -> None:
        path, mutation, content, expect = request
        seen[mutation] = seen.get(mutation, 0) + 1
        response = served.post(path, content)
        _check_error(response, expect)
        if mutation == "valid":  # schema-valid; value checks (ids, statuses, config ranges) may refuse it
            assert response.status_code in (200, 400, 422), response.text

    before = dict(served.statuses)
    fuzz()
    assert len(seen) == 6, seen  # every kind of damage was tried
    statuses = {k: v - before.get(k, 0) for k, v in served.statuses.items() if v - before.get(k, 0)}
    figures(fuzz_requests=sum(seen.values()), by_mutation=seen, statuses=statuses, status_5xx=0)


def test_unknown_ids_on_every_route(served: Served) -> None:
    """A minimal well-formed body whose ids exist nowhere: 200 (``null`` from getters, empty
    results) or 400 naming the id — never a 5xx."""
    doc = served.document
    for path, schema in _routes(doc):
        body_schema = _resolve(schema, doc)
        body: JSONish = {}
        for name in body_schema.get("required", ()):
            types = _json_types(body_schema["properties"][name], doc)
            if "string" in types:
                body[name] = f"unknown-{name}-{path.rsplit('/', 1)[1]}"
            elif "integer" in types:
                body[name] = 987654321
            elif "array" in types:
                body[name] = []
            elif "object" in types:
                body[name] = {}
        body = _short_waits(body)
        response = served.post(path, json.dumps(body).encode())
        _check_error(response)
        if response.status_code == 400:
            detail = response.json()["detail"]
            assert any(str(v) in detail for v in body.values() if isinstance(v, (str, int))), (path, detail)


def test_wrong_methods_on_every_path_are_405(served: Served) -> None:
    for path, item in served.document["paths"].items():
        allowed = {m.upper() for m in item}
        for method in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            if method in allowed or (method == "GET" and path == "/v1/openapi.json"):
                continue
            response = served.http.request(method, path, json={})
            served.requests += 1
            _check_error(response, 405)


def test_bodies_over_the_limit_are_413_on_every_route(served: Served) -> None:
    huge = b'{"input": "' + b"x" * MAX_BODY + b'"}'
    for path, _ in _routes(served.document):
        _check_error(served.post(path, huge), 413)


def test_unauthenticated_requests_get_401_on_every_route_but_health(
    served: Served, figures: Callable[..., None]
) -> None:
    with httpx.Client(base_url=served.endpoint, timeout=30, verify=served.verify) as anonymous:
        for path, item in served.document["paths"].items():
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": TOKEN}):
                if "get" in item:
                    response = anonymous.get(path, headers=headers)
                else:
                    response = anonymous.post(path, json={}, headers=headers)
                served.requests += 1
                if path == "/v1/health":
                    assert response.status_code == 200
                elif path == TRACES_PATH:  # OTLP/HTTP: the error is a google.rpc.Status
                    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
                    assert set(response.json()) == {"code", "message"}
                else:
                    _check_error(response, 401)
                    assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/v1/openapi.json").status_code == 401
    figures(module_requests_so_far=served.requests, post_statuses=dict(sorted(served.statuses.items())))
