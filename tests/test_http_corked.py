"""Corked writes under the store server (agl_async/http/_corked.py): what a connection writes in one
event-loop iteration leaves in one write of the real transport, in order, and nothing is lost or
reordered by close/abort. The server's behaviour over real sockets is the whole HTTP suite's."""

from __future__ import annotations

import asyncio

import pytest

from agl_async.http._corked import _CorkedTransport, corked

pytestmark = pytest.mark.anyio


class Recording(asyncio.Transport):
    """The real transport's side of the wrapper: what was written, and in how many writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 4747) if name == "sockname" else default


async def _next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_writes_of_one_iteration_leave_in_one_write() -> None:
    real = Recording()
    corked_transport = _CorkedTransport(real, asyncio.get_running_loop())
    corked_transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    corked_transport.write(b"{}")
    assert real.writes == []  # not yet: the iteration is not over
    await _next_iteration()
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    corked_transport.write(b"next")
    await _next_iteration()
    assert real.writes[1:] == [b"next"]
    assert corked_transport.get_extra_info("sockname") == ("127.0.0.1", 4747)  # the rest is the real one's


async def test_close_writes_what_is_pending_first_and_abort_drops_it() -> None:
    real = Recording()
    corked_transport = _CorkedTransport(real, asyncio.get_running_loop())
    corked_transport.write(b"last words")
    corked_transport.close()
    assert real.writes == [b"last words"] and real.closed
    await _next_iteration()
    assert real.writes == [b"last words"]  # the scheduled flush found nothing left

    other = Recording()
    aborted = _CorkedTransport(other, asyncio.get_running_loop())
    aborted.write(b"never")
    aborted.abort()
    await _next_iteration()
    assert other.writes == [] and other.aborted


async def test_nothing_is_written_to_a_closing_transport() -> None:
    real = Recording()
    corked_transport = _CorkedTransport(real, asyncio.get_running_loop())
    corked_transport.write(b"too late")
    real.closed = True  # the peer went away meanwhile
    await _next_iteration()
    assert real.writes == []


def test_corked_protocol_is_the_uvicorn_protocol_with_a_corked_transport() -> None:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    cls = corked(HttpToolsProtocol)
    assert issubclass(cls, HttpToolsProtocol) and cls.__name__ == "CorkedHttpToolsProtocol"


async def test_the_server_answers_through_corked_connections() -> None:
    from agl_async import InMemoryLightningStore, LightningStoreClient, LightningStoreServer

    store = InMemoryLightningStore()
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token="") as server:
        async with LightningStoreClient(server.endpoint, auth_token="") as client:
            rollout = await client.enqueue_rollout("x")
            assert (await client.get_rollout_by_id(rollout.rollout_id)) == rollout
            assert server._server is not None
            connections = list(server._server.server_state.connections)
            assert connections
            assert all(isinstance(c.transport, _CorkedTransport) for c in connections)  # type: ignore[attr-defined]
