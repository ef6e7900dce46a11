"""Bad input over HTTP: every case gets a 4xx with a JSON ``{"error", "detail"}`` body, never a 5xx,
and the server keeps serving. Raw requests (httpx) so that the client's own checks are bypassed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agl_async import InMemoryLightningStore, LightningStoreClient, LightningStoreServer
from agl_async.http.protocol import ROUTES

ROUTE_PATHS = sorted(spec.path for spec in ROUTES.values())


def _assert_error(response: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"} and body["detail"]
    if error is not None:
        assert body["error"] == error
    return dict(body)


@pytest.fixture(scope="module")
def server() -> Iterator[LightningStoreServer]:
    """One server for the module, run by a loop in a helper thread (so sync hypothesis tests can
    use it); small body limit so that 413 is cheap to provoke."""
    with anyio.from_thread.start_blocking_portal() as portal:
        srv = LightningStoreServer(
            InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="", max_body_bytes=64 * 1024
        )
        portal.call(srv.start)
        try:
            yield srv
        finally:
            portal.call(srv.stop)


@pytest.fixture
def http(server: LightningStoreServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.endpoint, timeout=10) as client:
        yield client


def _still_serving(http: httpx.Client) -> None:
    response = http.post("/v1/enqueue_rollout", json={"input": "still alive"})
    assert response.status_code == 200 and response.json()["input"] == "still alive"


def test_malformed_json_is_400(http: httpx.Client) -> None:
    for body in (b"{", b"not json", b'{"input": }', b"\xff\xfe", b'{"input": 1}}'):
        _assert_error(http.post("/v1/enqueue_rollout", content=body), 400, "malformed_json")
    _still_serving(http)


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/enqueue_rollout", {}, "input"),  # missing field
        ("/v1/enqueue_rollout", {"input": 1, "bogus": 2}, "bogus"),  # unknown field
        ("/v1/enqueue_rollout", {"input": 1, "metadata": "x"}, "metadata"),  # wrong type
        ("/v1/enqueue_rollout", {"input": 1, "config": {"max_attempts": 0}}, "max_attempts"),
        ("/v1/enqueue_many_rollouts", {"rollouts": {"input": 1}}, "rollouts"),
        ("/v1/dequeue_rollout", {"timeout": "soon"}, "timeout"),
        ("/v1/dequeue_many_rollouts", {"limit": 1.5}, "limit"),
        ("/v1/update_attempt", {"rollout_id": "r"}, "attempt_id"),
        ("/v1/add_span", {"rollout_id": "r"}, "attempt_id"),
        ("/v1/add_resources", {"resources": [1, 2]}, "resources"),
        ("/v1/get_worker_by_id", {"worker_id": [1]}, "worker_id"),
        ("/v1/wait_for_rollouts", [], "object"),
    ],
)
def test_schema_violations_are_422_naming_the_field(
    http: httpx.Client, path: str, body: Any, field: str
) -> None:
    error = _assert_error(http.post(path, json=body), 422, "validation_error")
    assert field in error["detail"]
    _still_serving(http)


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/v1/update_rollout", {"rollout_id": "ro-missing", "status": "failed"}, "ro-missing"),
        ("/v1/update_attempt", {"rollout_id": "ro-missing", "attempt_id": "latest"}, "ro-missing"),
        ("/v1/start_attempt", {"rollout_id": "ro-missing"}, "ro-missing"),
        ("/v1/update_resources", {"resources_id": "rs-missing", "resources": {}}, "rs-missing"),
        ("/v1/enqueue_rollout", {"input": 1, "resources_id": "rs-missing"}, "rs-missing"),
        ("/v1/enqueue_rollout", {"input": 1, "mode": "play"}, "play"),
        ("/v1/dequeue_rollout", {"timeout": -1}, "timeout"),
        ("/v1/wait_for_rollouts", {"rollout_ids": [], "timeout": -1}, "timeout"),
        ("/v1/get_next_span_sequence_id", {"rollout_id": "ro-missing", "attempt_id": "a"}, "ro-missing"),
        (
            "/v1/add_span",
            {
                "rollout_id": "ro-missing",
                "attempt_id": "a",
                "sequence_id": 1,
                "trace_id": "t",
                "span_id": "s",
                "name": "n",
            },
            "ro-missing",
        ),
        ("/v1/finish_and_dequeue", {"rollout_id": "ro-missing", "attempt_id": "latest"}, "ro-missing"),
    ],
)
def test_store_value_errors_are_400_with_the_store_message(
    http: httpx.Client, path: str, body: Any, needle: str
) -> None:
    error = _assert_error(http.post(path, json=body), 400, "value_error")
    assert needle in error["detail"]
    _still_serving(http)


def test_overlong_idempotency_key_is_400(http: httpx.Client) -> None:
    response = http.post("/v1/enqueue_rollout", json={"input": 1}, headers={"idempotency-key": "k" * 201})
    assert "idempotency-key" in _assert_error(response, 400, "bad_request")["detail"]
    _still_serving(http)


def test_unknown_ids_on_getters_are_null_not_errors(http: httpx.Client) -> None:
    assert http.post("/v1/get_rollout_by_id", json={"rollout_id": "nope"}).json() is None
    assert http.post("/v1/get_worker_by_id", json={"worker_id": 12345}).json() is None


def test_unknown_route_is_404_and_wrong_method_405(http: httpx.Client) -> None:
    _assert_error(http.post("/v1/no_such_method", json={}), 404, "not_found")
    _assert_error(http.get("/nothing/here"), 404, "not_found")
    response = http.get("/v1/enqueue_rollout")
    _assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]
    _assert_error(http.delete("/v1/statistics"), 405)
    _assert_error(http.post("/v1/health"), 405)
    _still_serving(http)


def test_oversize_body_is_413(http: httpx.Client, server: LightningStoreServer) -> None:
    big = json.dumps({"input": "x" * (server.max_body_bytes + 10)}).encode()
    error = _assert_error(http.post("/v1/enqueue_rollout", content=big), 413, "payload_too_large")
    assert str(server.max_body_bytes) in error["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"input": "'
        for _ in range(server.max_body_bytes // 1024 + 2):
            yield b"x" * 1024
        yield b'"}'

    _assert_error(http.post("/v1/enqueue_rollout", content=chunks()), 413, "payload_too_large")
    # Nothing of the refused bodies was applied.
    inputs = [r["input"] for r in http.post("/v1/query_rollouts", json={}).json()]
    assert not any(isinstance(i, str) and i.startswith("xxx") for i in inputs)
    _still_serving(http)


@pytest.mark.anyio
async def test_oversize_through_the_client_is_a_value_error() -> None:
    store = InMemoryLightningStore()
    async with LightningStoreServer(
        store, host="127.0.0.1", port=0, auth_token="", max_body_bytes=1024
    ) as srv:
        async with LightningStoreClient(srv.endpoint, auth_token="") as client:
            with pytest.raises(ValueError, match="exceeds the limit of 1024"):
                await client.add_resources({"blob": "y" * 4096})
            assert await client.query_resources() == []


# --------------------------------------------------------------------------- fuzzing
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    [
        "input", "mode", "resources_id", "config", "metadata", "rollouts", "worker_id", "timeout",
        "limit", "rollout_id", "attempt_id", "status", "rollout_ids", "status_in", "rollout_id_in",
        "spans", "resources", "heartbeat_stats", "sequence_id", "trace_id", "span_id", "name",
        "last_heartbeat_time", "max_attempts",
    ]
)  # fmt: skip
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(field_names, json_values, max_size=6).map(lambda v: json.dumps(v).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ROUTE_PATHS), body=bodies)
def test_fuzzed_bodies_never_get_a_5xx(http: httpx.Client, path: str, body: bytes) -> None:
    if path in ("/v1/dequeue_rollout", "/v1/finish_and_dequeue", "/v1/wait_for_rollouts"):
        # Keep long polls short: a fuzzed timeout must not stall the run.
        try:
            decoded = json.loads(body)
        except ValueError:
            decoded = None
        if isinstance(decoded, dict) and "timeout" in decoded:
            decoded["timeout"] = 0 if isinstance(decoded["timeout"], (int, float)) else decoded["timeout"]
            body = json.dumps(decoded).encode()
        elif isinstance(decoded, dict) and path == "/v1/wait_for_rollouts":
            decoded["timeout"] = 0
            body = json.dumps(decoded).encode()
    response = http.post(path, content=body)
    assert response.status_code < 500, (path, body, response.text)
    if response.status_code != 200:
        _assert_error(response, response.status_code)


def test_server_serves_normally_after_fuzzing(http: httpx.Client) -> None:
    _still_serving(http)
    assert http.get("/v1/health").status_code == 200
