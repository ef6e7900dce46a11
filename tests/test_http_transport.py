"""The transport under LightningStoreClient (agl_async.http.transport): which one is chosen, and
that aiohttp's failures reach the client as the httpx exceptions its retry logic expects.

The behaviour of the client over both transports is specified by tests/test_http_client.py,
which runs every test once per transport."""

from __future__ import annotations

import pickle

import anyio
import httpx
import pytest
from anyio.abc import SocketAttribute, SocketStream

from agl_async import InMemoryLightningStore, LightningStoreClient
from agl_async.http.transport import TRANSPORT_ENV, AiohttpTransport, resolve_transport
from agl_async.testing import free_port, serve_store

pytestmark = pytest.mark.anyio
TIMEOUT = 20


@pytest.fixture(autouse=True)
def _no_transport_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRANSPORT_ENV, raising=False)


# ---------------------------------------------------------------------------- which transport
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_auto_is_aiohttp_on_asyncio_for_http_else_httpx(anyio_backend: str) -> None:
    on_asyncio = anyio_backend == "asyncio"
    assert resolve_transport("auto", "http://h:1") == ("aiohttp" if on_asyncio else "httpx")
    assert resolve_transport("auto", "https://h:1") == "httpx"
    assert resolve_transport("httpx", "http://h:1") == "httpx"
    if on_asyncio:
        assert resolve_transport("aiohttp", "http://h:1") == "aiohttp"
    else:
        with pytest.raises(ValueError, match="asyncio"):
            resolve_transport("aiohttp", "http://h:1")


async def test_environment_forces_httpx_and_rejects_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRANSPORT_ENV, "httpx")
    assert resolve_transport("auto", "http://h:1") == "httpx"
    assert resolve_transport("aiohttp", "http://h:1") == "aiohttp"  # an explicit choice wins
    monkeypatch.setenv(TRANSPORT_ENV, "curl")
    with pytest.raises(ValueError, match=TRANSPORT_ENV):
        resolve_transport("auto", "http://h:1")


async def test_client_uses_the_chosen_transport_and_keeps_it_when_pickled() -> None:
    async with serve_store(InMemoryLightningStore()) as auto:
        assert isinstance(auto._client()._transport, AiohttpTransport)
        plain = pickle.loads(
            pickle.dumps(LightningStoreClient(auto.endpoint, auth_token="", transport="httpx"))
        )
        assert plain.transport == "httpx"
        assert isinstance(plain._client()._transport, httpx.AsyncHTTPTransport)
        rollout = await plain.enqueue_rollout("via httpx")
        assert (await auto.get_rollout_by_id(rollout.rollout_id)) == rollout
        await plain.close()
    with pytest.raises(ValueError, match="transport must be one of"):
        LightningStoreClient("http://127.0.0.1:1", transport="curl")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- failures, mapped
async def _request(transport: AiohttpTransport, url: str, read: float = 5.0) -> httpx.Response:
    timeout = httpx.Timeout(read, connect=5.0).as_dict()
    request = httpx.Request("POST", url, content=b"{}", extensions={"timeout": timeout})
    return await transport.handle_async_request(request)


async def test_refused_connection_is_a_connect_error() -> None:
    transport = AiohttpTransport()
    with anyio.fail_after(TIMEOUT), pytest.raises(httpx.ConnectError):
        await _request(transport, f"http://127.0.0.1:{free_port()}/v1/statistics")
    await transport.aclose()


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [("close", httpx.RemoteProtocolError), ("reset", httpx.ReadError), ("silent", httpx.ReadTimeout)],
)
async def test_a_connection_lost_or_silent_before_the_answer_is_the_httpx_error(
    behaviour: str, expected: type[Exception]
) -> None:
    async def handle(stream: SocketStream) -> None:
        await stream.receive()  # the request arrives
        if behaviour == "close":
            await stream.aclose()
        elif behaviour == "reset":
            import socket
            import struct

            raw = stream.extra(SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()  # RST instead of FIN
        else:
            await anyio.sleep_forever()

    transport = AiohttpTransport()
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(listener.serve, handle)
        with anyio.fail_after(TIMEOUT), pytest.raises(expected):
            await _request(transport, f"http://127.0.0.1:{port}/v1/statistics", read=0.3)
        await transport.aclose()
        tg.cancel_scope.cancel()


async def test_cancelled_request_closes_its_connection() -> None:
    """A request abandoned mid-flight must not leave a half-used connection in the pool: the next
    request opens a fresh one (the server sees a second connection) and gets its own answer."""
    connections = 0
    requests: list[bytes] = []

    async def handle(stream: SocketStream) -> None:
        nonlocal connections
        connections += 1
        async with stream:
            async for chunk in stream:
                requests.append(chunk)
                if len(requests) > 1:  # answer only the second request
                    body = b"{}"
                    head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n".encode()
                    await stream.send(head + body)

    transport = AiohttpTransport()
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(SocketAttribute.local_port)
        tg.start_soon(listener.serve, handle)
        url = f"http://127.0.0.1:{port}/v1/statistics"
        with anyio.fail_after(TIMEOUT):
            with anyio.move_on_after(0.3):
                await _request(transport, url)
            response = await _request(transport, url)
        assert response.status_code == 200 and response.content == b"{}"
        assert connections == 2
        await transport.aclose()
        tg.cancel_scope.cancel()
