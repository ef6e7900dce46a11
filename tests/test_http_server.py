"""LightningStoreServer: lifecycle, embedding (signals, tasks), addresses, auth, the OpenAPI document."""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
from unittest.mock import MagicMock

import anyio
import httpx
import pytest
from conftest import STORE_METHODS, required_kwargs

from agl_async import InMemoryLightningStore, LightningStore, LightningStoreClient, LightningStoreServer
from agl_async.http.client import StoreAuthError
from agl_async.http.protocol import ROUTES

pytestmark = pytest.mark.anyio


def _other_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


async def test_start_returns_when_accepting_and_stop_leaves_no_task() -> None:
    before = _other_tasks()
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0)
    await server.start()
    assert server.port != 0 and server.endpoint == f"http://127.0.0.1:{server.port}"
    # Accepting right away: no retry needed.
    async with httpx.AsyncClient(base_url=server.endpoint) as http:
        assert (await http.get("/v1/health")).json() == {"status": "ok"}
    async with LightningStoreClient(server.endpoint, auth_token="") as client:
        await client.enqueue_rollout(1)
        assert await client.dequeue_rollout() is not None
    await server.stop()
    assert _other_tasks() == before
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            await http.get("/v1/health")
    await server.stop()  # idempotent


async def test_async_with_and_restart() -> None:
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0)
    async with server:
        with pytest.raises(RuntimeError, match="already started"):
            await server.start()
    async with server:  # can be started again after a stop
        async with LightningStoreClient(server.endpoint, auth_token="") as client:
            assert (await client.statistics())["total_rollouts"] == 0


async def test_port_in_use_fails_at_once_naming_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=port)
        with anyio.fail_after(5), pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            await server.start()
        assert not server.started
        await server.stop()


async def test_server_does_not_capture_signals() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    async with LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0) as server:
        # Serving, and a request has been handled: the host's handlers are still in place.
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            assert (await http.get("/v1/health")).status_code == 200
        assert {sig: signal.getsignal(sig) for sig in before} == before


async def test_in_process_calls_go_to_the_wrapped_store() -> None:
    store = InMemoryLightningStore()
    server = LightningStoreServer(store, "127.0.0.1", 0)  # the contract's positional form
    assert isinstance(server, LightningStore) and (server.host, server.store) == ("127.0.0.1", store)
    # Not started: in-process calls work all the same.
    rollout = await server.enqueue_rollout({"x": 1})
    assert (await store.get_rollout_by_id(rollout.rollout_id)) == rollout
    claimed = await server.finish_and_dequeue(
        *(lambda a: (a.rollout_id, a.attempt.attempt_id))(await server.start_rollout(0)), worker_id="w"
    )
    assert claimed is not None and claimed.rollout_id == rollout.rollout_id


@pytest.mark.parametrize("name", STORE_METHODS)
async def test_every_store_method_called_in_process_is_forwarded(name: str) -> None:
    wrapped = MagicMock(spec=InMemoryLightningStore)
    server = LightningStoreServer(wrapped, host="127.0.0.1", port=0)
    kwargs = required_kwargs(name)
    assert await getattr(server, name)(**kwargs) is getattr(wrapped, name).return_value
    getattr(wrapped, name).assert_awaited_once_with(**kwargs)


async def test_stop_ends_long_polls_promptly() -> None:
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0, graceful_timeout=30)
    await server.start()
    client = LightningStoreClient(server.endpoint, auth_token="")
    results: list[object] = []

    async def poll() -> None:
        results.append(await client.dequeue_rollout(timeout=60))

    running = await server.start_rollout("never finishes")  # claimed at once: not in the queue

    async def wait() -> None:
        results.append(await client.wait_for_rollouts(rollout_ids=[running.rollout_id], timeout=None))

    with anyio.fail_after(10):  # far below the 60 s waits and the 30 s grace
        async with anyio.create_task_group() as tg:
            tg.start_soon(poll)
            tg.start_soon(wait)
            await _until_requests_in_flight(server, 2)
            await server.stop()
    assert sorted(map(repr, results)) == ["None", "[]"]
    await client.close()


async def _until_requests_in_flight(server: LightningStoreServer, n: int) -> None:
    """Wait (bounded by the caller's fail_after) until the server has ``n`` requests in flight."""
    assert server._server is not None
    while len(server._server.server_state.tasks) != n:  # noqa: ASYNC110 - uvicorn offers no event for it
        await anyio.sleep(0.01)


def test_non_loopback_bind_without_token_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    """(More in tests/test_secure_defaults.py.) Refused, naming the host and both ways out."""
    with pytest.raises(ValueError, match=r"'0\.0\.0\.0'") as info:
        LightningStoreServer(InMemoryLightningStore(), host="0.0.0.0", port=0, auth_token="")
    for hint in ("auth_token", "AGL_SERVER_TOKEN", "allow_unauthenticated"):
        assert hint in str(info.value)
    with caplog.at_level(logging.WARNING, logger="agl_async"):
        LightningStoreServer(InMemoryLightningStore(), host="0.0.0.0", port=0, auth_token="s3cret")
        LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="")
        LightningStoreServer(InMemoryLightningStore(), auth_token="")
    assert not caplog.records


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="port"):
        LightningStoreServer(InMemoryLightningStore(), port=70000)
    with pytest.raises(TypeError, match="LightningStore"):
        LightningStoreServer(object(), port=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LightningStoreClient"):
        pickle.dumps(LightningStoreServer(InMemoryLightningStore(), port=0))


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGL_SERVER_TOKEN", "from-env")
    assert LightningStoreServer(InMemoryLightningStore(), port=0).auth_token == "from-env"
    assert LightningStoreServer(InMemoryLightningStore(), port=0, auth_token="").auth_token is None
    assert LightningStoreClient("http://127.0.0.1:1").auth_token == "from-env"
    assert LightningStoreClient("http://127.0.0.1:1", auth_token="").auth_token is None


async def test_auth_required_on_every_route_but_health() -> None:
    async with LightningStoreServer(
        InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="s3cret"
    ) as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            assert (await http.get("/v1/health")).status_code == 200
            paths = [("POST", spec.path) for spec in ROUTES.values()] + [("GET", "/v1/openapi.json")]
            for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
                for method, path in paths:
                    response = await http.request(method, path, content=b"{}", headers=headers)
                    assert response.status_code == 401, (path, headers)
                    assert response.json()["error"] == "unauthorized"
            good = {"authorization": "Bearer s3cret"}
            assert (await http.post("/v1/statistics", content=b"{}", headers=good)).status_code == 200
            assert (await http.get("/v1/openapi.json", headers=good)).status_code == 200
        async with LightningStoreClient(server.endpoint, auth_token="s3cret") as client:
            rollout = await client.enqueue_rollout("x")
            assert (await client.get_rollout_by_id(rollout.rollout_id)) == rollout
        async with LightningStoreClient(server.endpoint, auth_token="") as anonymous:
            with pytest.raises(StoreAuthError, match=server.endpoint):
                await anonymous.statistics()
            assert await anonymous.health()


async def test_no_auth_when_no_token() -> None:
    async with LightningStoreServer(
        InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token=""
    ) as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            assert (await http.post("/v1/statistics", content=b"{}")).status_code == 200


async def test_openapi_document_lists_every_route() -> None:
    async with LightningStoreServer(
        InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token=""
    ) as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            doc = (await http.get("/v1/openapi.json")).json()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {spec.path for spec in ROUTES.values()} | {"/v1/health", "/v1/traces"}
    enqueue = doc["paths"]["/v1/enqueue_rollout"]["post"]
    assert "Idempotency-Key" in [param["name"] for param in enqueue["parameters"]]
    schema_ref = enqueue["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert schema_ref.rsplit("/", 1)[-1] in doc["components"]["schemas"]


def test_start_on_trio_is_a_clear_error() -> None:
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0)
    with pytest.raises(RuntimeError, match="asyncio"):
        anyio.run(server.start, backend="trio")
    assert not server.started


async def test_client_gone_mid_body_is_quietly_dropped(caplog: pytest.LogCaptureFixture) -> None:
    store = InMemoryLightningStore()
    with caplog.at_level(logging.WARNING):
        async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server:
            stream = await anyio.connect_tcp("127.0.0.1", server.port)
            async with stream:
                await stream.send(
                    b"POST /v1/enqueue_rollout HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                    b'content-length: 100\r\n\r\n{"input": '
                )
                with anyio.fail_after(10):
                    await _until_requests_in_flight(server, 1)
            with anyio.fail_after(10):
                await _until_requests_in_flight(server, 0)
            async with LightningStoreClient(server.endpoint, auth_token="") as client:
                await client.enqueue_rollout("after")
    assert [r.input for r in await store.query_rollouts()] == ["after"]  # the cut one was not applied
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


class _BuggyStore(InMemoryLightningStore):
    async def statistics(self) -> dict[str, object]:
        raise RuntimeError("a bug in the store")


async def test_a_store_bug_is_a_logged_json_500_and_the_server_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with LightningStoreServer(_BuggyStore(), host="127.0.0.1", port=0, auth_token="") as server:
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            with caplog.at_level(logging.ERROR, logger="agl_async"):
                response = await http.post("/v1/statistics", content=b"{}")
            assert response.status_code == 500
            assert response.json() == {
                "error": "internal_error",
                "detail": "RuntimeError: a bug in the store",
            }
            assert "a bug in the store" in caplog.text
            assert (await http.post("/v1/enqueue_rollout", json={"input": 1})).status_code == 200
        async with LightningStoreClient(server.endpoint, auth_token="") as client:
            with pytest.raises(RuntimeError, match="HTTP 500"):
                await client.statistics()
