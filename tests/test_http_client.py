"""LightningStoreClient: pickling into another process, retries and their bound, idempotent retries,
error mapping, HTTP timeouts around long waits, cancellation of long polls.

Every test runs on both transports (agl_async.http.transport): the default (aiohttp's pool on
asyncio) and httpx's own, forced through ``AGL_HTTP_TRANSPORT=httpx``."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from anyio.abc import SocketStream, TaskStatus
from conftest import make_span

from agl_async import InMemoryLightningStore, LightningStoreClient, LightningStoreServer
from agl_async.http.client import StoreConnectionError
from agl_async.testing import free_port, serve_store

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True, params=["auto", "httpx"])
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The transport every client of the test uses (inherited by spawned processes)."""
    if request.param == "httpx":
        monkeypatch.setenv("AGL_HTTP_TRANSPORT", "httpx")
    else:
        monkeypatch.delenv("AGL_HTTP_TRANSPORT", raising=False)
    return str(request.param)


@asynccontextmanager
async def _server(store: InMemoryLightningStore | None = None) -> AsyncIterator[LightningStoreServer]:
    async with LightningStoreServer(
        store or InMemoryLightningStore(), host="127.0.0.1", port=0, auth_token=""
    ) as server:
        yield server


async def _until_in_flight(server: LightningStoreServer, n: int) -> None:
    """Wait (bounded by the caller's fail_after) until the server has exactly ``n`` requests in flight."""
    assert server._server is not None
    while len(server._server.server_state.tasks) != n:  # noqa: ASYNC110 - uvicorn offers no event for it
        await anyio.sleep(0.01)


# --------------------------------------------------------------------------- processes
def _child_runner(client: LightningStoreClient, expected_input: str) -> None:
    """Runs in a spawned process: claim the rollout with the unpickled client and finish it."""

    async def main() -> None:
        async with client:
            claimed = await client.dequeue_rollout(worker_id="child", timeout=30)
            assert claimed is not None and claimed.input == expected_input
            await client.update_attempt(claimed.rollout_id, claimed.attempt.attempt_id, status="succeeded")

    asyncio.run(main())


async def test_client_pickles_into_a_spawned_process_and_works_there() -> None:
    async with _server() as server:
        client = LightningStoreClient(server.endpoint, auth_token="", retry_delays=(0.1, 0.2))
        rollout = await client.enqueue_rollout("for the child")  # the pool exists; pickling skips it
        assert len(pickle.dumps(client)) < 1000
        ctx = multiprocessing.get_context("spawn")
        proc = ctx.Process(target=_child_runner, args=(client, "for the child"))
        proc.start()
        try:
            with anyio.fail_after(120):
                finished = await client.wait_for_rollouts(rollout_ids=[rollout.rollout_id], timeout=None)
                await anyio.to_thread.run_sync(proc.join, 60)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert proc.exitcode == 0
        assert [r.status for r in finished] == ["succeeded"]
        attempt = await client.get_latest_attempt(rollout.rollout_id)
        assert attempt is not None and attempt.worker_id == "child"
        await client.close()
    assert multiprocessing.active_children() == []


def test_client_is_usable_from_successive_event_loops() -> None:
    store = InMemoryLightningStore()

    async def serve_and_use_twice() -> None:
        async with _server(store) as server:
            client = LightningStoreClient(server.endpoint, auth_token="")
            await client.enqueue_rollout(1)
            # Another loop in another thread uses the same client object: it gets its own pool.
            await anyio.to_thread.run_sync(lambda: asyncio.run(client.enqueue_rollout(2)))
            await client.enqueue_rollout(3)
            await client.close()

    asyncio.run(serve_and_use_twice())
    assert len(asyncio.run(store.query_rollouts())) == 3


# --------------------------------------------------------------------------- failures
async def test_server_down_raises_connection_error_within_the_retry_budget() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    delays = (0.05, 0.1, 0.2)
    client = LightningStoreClient(endpoint, auth_token="", retry_delays=delays)
    started = time.monotonic()
    with anyio.fail_after(20), pytest.raises(StoreConnectionError, match=endpoint) as info:
        await client.enqueue_rollout("lost?")
    assert time.monotonic() - started >= sum(delays)  # it did retry with the backoff
    assert isinstance(info.value, ConnectionError)
    assert "4 tries" in str(info.value)
    assert not await client.health()
    await client.close()


async def test_no_retries_when_asked() -> None:
    client = LightningStoreClient(f"http://127.0.0.1:{free_port()}", auth_token="", retry_delays=())
    with anyio.fail_after(10), pytest.raises(StoreConnectionError, match="1 tries"):
        await client.statistics()


async def test_value_errors_come_back_as_value_errors_with_the_server_message() -> None:
    async with serve_store(InMemoryLightningStore()) as client:
        with pytest.raises(ValueError, match="rollout 'ro-nope' not found"):
            await client.update_rollout("ro-nope", status="failed")
        with pytest.raises(ValueError, match="max_attempts"):
            await client.enqueue_rollout(1, config={"max_attempts": 0})
        with pytest.raises(ValueError, match="input cannot be stored as JSON"):
            await client.enqueue_rollout(object())
        with pytest.raises(ValueError, match="Span"):
            await client.add_span("not a span")  # type: ignore[arg-type]


def test_endpoint_must_be_a_url() -> None:
    with pytest.raises(ValueError, match="endpoint"):
        LightningStoreClient("127.0.0.1:4747")


# --------------------------------------------------------------------------- idempotency
class DroppingProxy:
    """A loopback TCP proxy that forwards requests to the server but loses the server's answer
    while ``dropped < drop`` (it closes the client's connection instead)."""

    def __init__(self, upstream_port: int, drop: int) -> None:
        self.upstream_port = upstream_port
        self.drop = drop
        self.dropped = 0
        self.port = 0

    async def serve(self, *, task_status: TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, downstream: SocketStream) -> None:
        async with downstream, await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream:
            async with anyio.create_task_group() as tg:

                async def forward_requests() -> None:
                    async for chunk in downstream:
                        await upstream.send(chunk)
                    tg.cancel_scope.cancel()

                tg.start_soon(forward_requests)
                async for chunk in upstream:
                    if self.dropped < self.drop:
                        self.dropped += 1  # the server answered; the client never sees it
                        break
                    await downstream.send(chunk)
                tg.cancel_scope.cancel()


async def test_retried_mutations_are_applied_once() -> None:
    store = InMemoryLightningStore()
    async with _server(store) as server, anyio.create_task_group() as tg:
        proxy = DroppingProxy(server.port, drop=0)
        await tg.start(proxy.serve)
        client = LightningStoreClient(
            f"http://127.0.0.1:{proxy.port}", auth_token="", retry_delays=(0.05,) * 3
        )

        proxy.drop += 1
        rollout = await client.enqueue_rollout("once")
        assert proxy.dropped == 1  # the first answer was lost and the call retried
        assert [r.rollout_id for r in await store.query_rollouts()] == [rollout.rollout_id]

        proxy.drop += 1
        many = await client.enqueue_many_rollouts([{"input": i} for i in range(3)])
        assert proxy.dropped == 2
        assert len(await store.query_rollouts()) == 1 + len(many) == 4

        proxy.drop += 1
        claimed = await client.dequeue_rollout(worker_id="w")
        assert proxy.dropped == 3 and claimed is not None
        assert len(await store.query_attempts(claimed.rollout_id)) == 1
        assert (await store.statistics())["queue_length"] == 3  # claimed once, not twice

        proxy.drop += 1
        await client.add_span(make_span(claimed.rollout_id, claimed.attempt.attempt_id))
        assert proxy.dropped == 4
        assert len(await store.query_spans(claimed.rollout_id)) == 1

        await client.close()
        tg.cancel_scope.cancel()


async def test_same_idempotency_key_replays_the_first_answer() -> None:
    store = InMemoryLightningStore()
    async with _server(store) as server, httpx.AsyncClient(base_url=server.endpoint) as http:
        headers = {"idempotency-key": "k-1"}
        first = await http.post("/v1/enqueue_rollout", json={"input": 1}, headers=headers)
        again = await http.post("/v1/enqueue_rollout", json={"input": 1}, headers=headers)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        # The key is bound to its request (another route is another request: 422, see
        # test_idempotency_binding.py); other keys apply normally.
        reused = await http.post("/v1/add_resources", json={"resources": {}}, headers=headers)
        assert reused.status_code == 422
        await http.post("/v1/enqueue_rollout", json={"input": 1}, headers={"idempotency-key": "k-2"})
        assert len(await store.query_rollouts()) == 2
        assert len(await store.query_resources()) == 0


async def test_a_retry_overtaking_its_original_waits_for_its_answer() -> None:
    store = InMemoryLightningStore()
    async with _server(store) as server, httpx.AsyncClient(base_url=server.endpoint, timeout=30) as http:
        headers = {"idempotency-key": "poll-1"}
        answers: list[httpx.Response] = []

        async def poll() -> None:
            answers.append(await http.post("/v1/dequeue_rollout", json={"timeout": 20}, headers=headers))

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll)
                await _until_in_flight(server, 1)
                tg.start_soon(poll)  # same key while the first still waits
                await _until_in_flight(server, 2)
                await store.enqueue_rollout("one")
        assert [a.status_code for a in answers] == [200, 200]
        assert answers[0].json() == answers[1].json() and answers[0].json()["input"] == "one"
        assert len(await store.query_attempts(answers[0].json()["rollout_id"])) == 1


# --------------------------------------------------------------------------- waits and timeouts
async def test_waits_longer_than_the_request_timeout_are_honoured() -> None:
    store = InMemoryLightningStore()
    async with _server(store) as server:
        client = LightningStoreClient(server.endpoint, auth_token="", request_timeout=0.3)
        rollout = await client.enqueue_rollout(1)
        started = time.monotonic()
        with anyio.fail_after(30):
            assert await client.wait_for_rollouts(rollout_ids=[rollout.rollout_id], timeout=1.0) == []
            assert time.monotonic() - started >= 1.0
            empty_started = time.monotonic()
            assert await client.dequeue_rollout(timeout=1.0) is not None  # the queued one, at once
            assert await client.dequeue_rollout(timeout=1.0) is None
            assert time.monotonic() - empty_started >= 1.0
        await client.close()


async def test_long_poll_is_woken_by_an_enqueue_from_another_client() -> None:
    async with _server() as server:
        waiting = LightningStoreClient(server.endpoint, auth_token="")
        other = LightningStoreClient(server.endpoint, auth_token="")
        got = []
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:

                async def poll() -> None:
                    got.append(await waiting.dequeue_rollout(worker_id=7, timeout=60))

                tg.start_soon(poll)
                await _until_in_flight(server, 1)
                await other.enqueue_rollout("wake up")
        assert got[0] is not None and got[0].input == "wake up" and got[0].attempt.worker_id == 7
        await waiting.close()
        await other.close()


async def test_cancelled_long_poll_claims_nothing() -> None:
    store = InMemoryLightningStore()
    async with _server(store) as server:
        client = LightningStoreClient(server.endpoint, auth_token="")
        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: client.dequeue_rollout(timeout=60))
                await _until_in_flight(server, 1)
                tg.cancel_scope.cancel()
            await _until_in_flight(server, 0)  # the server noticed the disconnect and stopped waiting
        rollout = await store.enqueue_rollout("nobody took me")
        assert (await store.get_rollout_by_id(rollout.rollout_id)).status == "queuing"  # type: ignore[union-attr]
        await client.close()


async def test_finish_and_dequeue_is_one_request() -> None:
    store = InMemoryLightningStore()
    async with _server(store) as server:
        client = LightningStoreClient(server.endpoint, auth_token="")
        requests: list[str] = []

        first = await store.enqueue_rollout(1)
        second = await store.enqueue_rollout(2)
        claimed = await client.dequeue_rollout(worker_id="w")
        assert claimed is not None and claimed.rollout_id == first.rollout_id
        send = client._send

        async def count(url: str, *args: Any) -> tuple[int, bytes]:
            requests.append(httpx.URL(url).path)
            return await send(url, *args)

        client._send = count
        nxt = await client.finish_and_dequeue(claimed.rollout_id, claimed.attempt.attempt_id, worker_id="w")
        assert requests == ["/v1/finish_and_dequeue"]
        assert nxt is not None and nxt.rollout_id == second.rollout_id
        assert (await store.get_rollout_by_id(first.rollout_id)).status == "succeeded"  # type: ignore[union-attr]
        await client.close()


def test_client_works_on_trio() -> None:
    """The server needs asyncio (uvicorn); the client is backend-neutral (httpx on anyio)."""
    import anyio.from_thread

    store = InMemoryLightningStore()
    with anyio.from_thread.start_blocking_portal(backend="asyncio") as portal:
        server = LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="")
        portal.call(server.start)
        try:

            async def use() -> None:
                async with LightningStoreClient(server.endpoint, auth_token="") as client:
                    with anyio.fail_after(10):
                        rollout = await client.enqueue_rollout("from trio")
                        claimed = await client.dequeue_rollout(worker_id=0, timeout=5)
                        assert claimed is not None and claimed.rollout_id == rollout.rollout_id
                        assert await client.dequeue_rollout(timeout=0.1) is None

            anyio.run(use, backend="trio")
        finally:
            portal.call(server.stop)


def test_idempotency_memory_is_bounded_by_count_and_bytes() -> None:
    from agl_async.http._idempotency import IdempotencyCache as _IdempotencyCache

    cache = _IdempotencyCache(size=3, max_bytes=400)
    for i in range(5):
        cache.remember(f"k{i}", 200, b"x" * 10)
    assert list(cache.done) == ["k2", "k3", "k4"]
    cache.remember("big", 200, b"x" * 101)  # over a quarter of the byte budget: not kept
    assert "big" not in cache.done
    for i in range(4):
        cache.remember(f"m{i}", 200, b"y" * 100)
    assert cache.bytes <= 400 and list(cache.done) == ["m1", "m2", "m3"]


async def test_a_server_that_never_answers_times_out_per_request() -> None:
    """Accepts connections, reads, never answers: each call ends after its HTTP timeout
    (``request_timeout``, plus the wait for long polls) with a clear error, never hangs."""
    async with anyio.create_task_group() as tg:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)

        async def swallow(stream: SocketStream) -> None:
            async with stream:
                async for _ in stream:
                    pass

        tg.start_soon(listener.serve, swallow)
        client = LightningStoreClient(f"http://127.0.0.1:{port}", auth_token="", request_timeout=0.3)
        with anyio.fail_after(10):
            with pytest.raises(StoreConnectionError, match="did not answer statistics in time"):
                await client.statistics()
            started = time.monotonic()
            with pytest.raises(StoreConnectionError, match="did not answer dequeue_rollout in time"):
                await client.dequeue_rollout(timeout=0.5)
            assert time.monotonic() - started >= 0.8  # the long poll's wait was allowed for
        await client.close()
        tg.cancel_scope.cancel()
