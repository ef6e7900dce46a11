"""The server's parts: routes added beside the store's (auth, the one error path, the body limit),
middleware, extensions, the route table as the source of both sides, and the server as a
structured task (``tg.start(server.serve)``, ``async with``)."""

from __future__ import annotations

import inspect
import socket
import sys
import types
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from agl_async import InMemoryLightningStore, LightningStore, LightningStoreClient, LightningStoreServer
from agl_async.http import server as server_module
from agl_async.http.app import HTTPError, StoreApp
from agl_async.http.protocol import ROUTES

pytestmark = pytest.mark.anyio

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def _add_extra_routes(app: StoreApp) -> None:
    async def echo(request: Request) -> Response:
        body = await app.read_body(request)
        if body == b"bad":
            raise HTTPError(400, "bad_request", "a bad body")
        if body == b"bug":
            raise KeyError("a bug")
        return Response(body, media_type="application/octet-stream")

    async def public(request: Request) -> Response:
        return Response(b"open")

    app.add_route("/v1/echo", echo, methods=("POST",))
    app.add_route("/public", public, auth=False)


async def test_added_routes_share_auth_errors_and_body_limit() -> None:
    server = LightningStoreServer(
        InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token=TOKEN, max_body_bytes=100
    )
    _add_extra_routes(server.app)
    async with server, httpx.AsyncClient(base_url=server.endpoint) as http:
        unauthorized = await http.post("/v1/echo", content=b"hi")
        assert unauthorized.status_code == 401 and unauthorized.json()["error"] == "unauthorized"
        ok = await http.post("/v1/echo", content=b"hi", headers=AUTH)
        assert ok.status_code == 200 and ok.content == b"hi"
        bad = await http.post("/v1/echo", content=b"bad", headers=AUTH)
        assert bad.status_code == 400 and bad.json() == {"error": "bad_request", "detail": "a bad body"}
        bug = await http.post("/v1/echo", content=b"bug", headers=AUTH)
        assert bug.status_code == 500 and bug.json()["error"] == "internal_error"
        large = await http.post("/v1/echo", content=b"x" * 101, headers=AUTH)
        assert large.status_code == 413 and large.json()["error"] == "payload_too_large"
        wrong_method = await http.get("/v1/echo", headers=AUTH)
        assert wrong_method.status_code == 405 and wrong_method.json()["error"] == "method_not_allowed"
        assert (await http.get("/public")).content == b"open"
        # The store routes still answer, through their own fast path.
        assert (await http.post("/v1/statistics", json={}, headers=AUTH)).status_code == 200


async def test_middleware_wraps_store_routes_and_added_routes() -> None:
    seen: list[tuple[str, str]] = []

    def record(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                seen.append((scope["method"], scope["path"]))
            await app(scope, receive, send)

        return middleware

    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="")
    server.app.add_middleware(record)
    async with server, LightningStoreClient(server.endpoint, auth_token="") as client:
        await client.enqueue_rollout(1)
        async with httpx.AsyncClient(base_url=server.endpoint) as http:
            await http.get("/v1/health")
    assert seen == [("POST", "/v1/enqueue_rollout"), ("GET", "/v1/health")]


@pytest.fixture
def extension_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    module = types.ModuleType("agl_test_extension")
    module.install = _add_extra_routes  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(server_module, "APP_EXTENSIONS", [f"{module.__name__}:install"])
    yield module.__name__


async def test_app_extensions_are_installed_on_every_server(extension_module: str) -> None:
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="")
    async with server, httpx.AsyncClient(base_url=server.endpoint) as http:
        assert (await http.get("/public")).content == b"open"


async def test_serve_is_a_structured_task() -> None:
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="")
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve)
        assert server.started
        async with LightningStoreClient(server.endpoint, auth_token="") as client:
            assert (await client.statistics())["total_rollouts"] == 0
        with anyio.fail_after(10):
            await server.stop()  # serve returns: the task group has nothing left to wait for
    assert not server.started


async def test_async_with_raises_a_bind_error_and_the_block_error_as_themselves() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
            async with LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=port):
                pass
    with pytest.raises(KeyError, match="from the block"):
        async with LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0):
            raise KeyError("from the block")


async def test_async_with_keeps_serving_while_its_block_is_cancelled() -> None:
    """A shutdown inside a cancelled block (what the client-server strategy does on Ctrl-C) can
    still reach the server; it stops after the block, gracefully."""
    answered: list[int] = []
    server = LightningStoreServer(InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token="")
    with anyio.CancelScope() as scope:
        async with server:
            scope.cancel()
            try:
                await anyio.sleep_forever()
            finally:
                with anyio.CancelScope(shield=True), anyio.fail_after(10):
                    async with LightningStoreClient(server.endpoint, auth_token="") as client:
                        answered.append((await client.statistics())["total_rollouts"])
    assert answered == [0] and not server.started


def test_every_store_method_has_a_route_whose_body_is_its_parameters() -> None:
    """The route table covers the store API (but ``unclaim_rollout``, which only the server calls,
    and ``close``), and each generated body has the method's parameter names and defaults."""
    methods = {
        name
        for name, fn in vars(LightningStore).items()
        if inspect.iscoroutinefunction(fn) and name not in ("close", "unclaim_rollout")
    }
    assert set(ROUTES) == methods
    for name, route in ROUTES.items():
        if name == "add_span":
            continue  # its body is the Span itself
        params = list(inspect.signature(getattr(LightningStore, name)).parameters.values())[1:]
        fields = msgspec.structs.fields(route.body)
        assert [f.name for f in fields] == [p.name for p in params], name
        for field, param in zip(fields, params, strict=True):
            default: Any = field.default if field.default is not msgspec.NODEFAULT else param.empty
            assert default is param.default or default == param.default, (name, field.name)
