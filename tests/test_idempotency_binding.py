"""An ``Idempotency-Key`` is bound to the request it was first sent with (method, path and body).

Specified here (the IETF httpapi idempotency-key draft's rules, and the order of checks):

1. the same key with the same request replays the first answer (``Idempotent-Replayed: true``);
2. the same key with a different body, or on another route, is a 422 and changes nothing —
   neither the new request nor a second run of the first is applied; also while the first is
   still being answered;
3. a replay is answered only after the request has passed the checks every request passes:
   without the token it is a 401 (and the remembered answer is not shown), with a body over the
   limit a 413, with a malformed body a 422 — never the remembered 200.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

from agl_async import InMemoryLightningStore, LightningStoreServer

pytestmark = pytest.mark.anyio

TOKEN = "idem-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
LIMIT = 64 * 1024


@asynccontextmanager
async def served(
    store: InMemoryLightningStore,
) -> AsyncIterator[tuple[LightningStoreServer, httpx.AsyncClient]]:
    async with LightningStoreServer(store, "127.0.0.1", 0, auth_token=TOKEN, max_body_bytes=LIMIT) as server:
        async with httpx.AsyncClient(base_url=server.endpoint, headers=AUTH, timeout=30) as http:
            yield server, http


def _error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body: dict[str, str] = response.json()
    assert set(body) == {"error", "detail"}
    assert "idempotent-replayed" not in response.headers
    return body


async def test_the_same_request_again_gets_the_first_answer() -> None:
    store = InMemoryLightningStore()
    async with served(store) as (_, http):
        key = {"idempotency-key": "same"}
        body = json.dumps({"input": {"a": 1}})  # the same bytes (what a retry sends)
        first = await http.post("/v1/enqueue_rollout", content=body, headers=key)
        again = await http.post("/v1/enqueue_rollout", content=body, headers=key)
        assert first.status_code == again.status_code == 200
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
        assert len(await store.query_rollouts()) == 1


async def test_a_different_body_under_a_used_key_is_422_and_changes_nothing() -> None:
    store = InMemoryLightningStore()
    async with served(store) as (_, http):
        key = {"idempotency-key": "bound"}
        first = await http.post("/v1/enqueue_rollout", json={"input": "first"}, headers=key)
        assert first.status_code == 200
        reused = await http.post("/v1/enqueue_rollout", json={"input": "second"}, headers=key)
        body = _error(reused, 422)
        assert body["error"] == "idempotency_key_reused" and "Idempotency-Key" in body["detail"]
        # on another route too: the key names one request, whatever the route
        other = await http.post("/v1/add_resources", json={"resources": {"x": 1}}, headers=key)
        _error(other, 422)
        rollouts = await store.query_rollouts()
        assert [r.input for r in rollouts] == ["first"]
        assert await store.query_resources() == []
        # the first request is still replayed as it was
        again = await http.post("/v1/enqueue_rollout", json={"input": "first"}, headers=key)
        assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"


async def test_a_different_body_while_the_first_is_still_answered_is_422() -> None:
    store = InMemoryLightningStore()
    async with served(store) as (server, http):
        key = {"idempotency-key": "in-flight"}
        answers: dict[str, httpx.Response] = {}

        async def first() -> None:
            answers["first"] = await http.post("/v1/dequeue_rollout", json={"timeout": 20}, headers=key)

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                tg.start_soon(first)
                assert server._server is not None
                while not server._server.server_state.tasks:  # noqa: ASYNC110 - uvicorn has no event for it
                    await anyio.sleep(0.01)
                reused = await http.post("/v1/dequeue_rollout", json={"timeout": 5}, headers=key)
                _error(reused, 422)
                await store.enqueue_rollout("only one")
        assert answers["first"].status_code == 200 and answers["first"].json()["input"] == "only one"
        assert len(await store.query_attempts(answers["first"].json()["rollout_id"])) == 1


async def test_a_replay_without_the_token_is_401_and_shows_nothing() -> None:
    store = InMemoryLightningStore()
    async with served(store) as (server, http):
        key = {"idempotency-key": "secret-answer"}
        first = await http.post("/v1/enqueue_rollout", json={"input": "private"}, headers=key)
        assert first.status_code == 200
        async with httpx.AsyncClient(base_url=server.endpoint, timeout=30) as anonymous:
            for auth in ({}, {"authorization": "Bearer wrong"}):
                replay = await anonymous.post(
                    "/v1/enqueue_rollout", json={"input": "private"}, headers={**key, **auth}
                )
                _error(replay, 401)
                assert "private" not in replay.text and first.json()["rollout_id"] not in replay.text


async def test_a_replay_with_a_body_over_the_limit_is_413() -> None:
    store = InMemoryLightningStore()
    async with served(store) as (_, http):
        key = {"idempotency-key": "big"}
        assert (await http.post("/v1/enqueue_rollout", json={"input": 1}, headers=key)).status_code == 200
        huge = b'{"input": "' + b"x" * (10 * 1024 * 1024) + b'"}'
        _error(await http.post("/v1/enqueue_rollout", content=huge, headers=key), 413)

        # streamed without a Content-Length: the limit is enforced while reading
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(LIMIT // 1024 + 2):
                yield b" " * 1024

        _error(await http.post("/v1/enqueue_rollout", content=chunks(), headers=key), 413)
        assert len(await store.query_rollouts()) == 1


async def test_a_replay_with_a_malformed_body_is_not_answered_200() -> None:
    store = InMemoryLightningStore()
    async with served(store) as (_, http):
        key = {"idempotency-key": "malformed"}
        assert (await http.post("/v1/enqueue_rollout", json={"input": 1}, headers=key)).status_code == 200
        response = await http.post("/v1/enqueue_rollout", content=b'{"input": 1', headers=key)
        assert response.status_code in (400, 422)
        _error(response, response.status_code)
        assert len(await store.query_rollouts()) == 1
