"""Scenario 4: retries after connection faults never duplicate anything.

Two client processes (``python -m faults.fleet mutate``, 8 concurrent clients each) call every
mutating route that must be applied once — ``enqueue_rollout``, ``enqueue_many_rollouts``,
``dequeue_rollout``, ``add_span``, ``add_many_spans``, ``update_attempt`` — through a loopback
proxy that injects faults at random (seeded): it lets the server apply a request and then loses
the answer (the connection to the client is reset, or closed mid-answer), or resets a connection
before its request reaches the server. The client retries with the same idempotency key; the
store must hold exactly what the callers were told they got.

(tests/test_http_client.py pins the mechanism with one deterministic drop per route; this is the
same property under concurrency, resets and many faults at once.)
"""

from __future__ import annotations

import json
import random
import socket
import struct
from collections import Counter
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from agl_async import InMemoryLightningStore, LightningStoreServer

from .fleet import popen, stop_session, wait_exit, wait_no_session_left

pytestmark = pytest.mark.anyio

CLIENT_PROCESSES = 2
CLIENTS = 8
ROUNDS = 12
GUARD = 90.0


def _reset(stream: SocketStream) -> None:
    """Make the coming close an RST (SO_LINGER 0), as a crashed peer or middlebox would."""
    sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class FaultyProxy:
    """Loopback TCP proxy to ``upstream_port`` that, per server answer, with probability
    ``p_lose`` loses it after the server applied the request (RST or a half-sent answer), and per
    new connection, with probability ``p_refuse``, resets it before forwarding anything."""

    def __init__(self, upstream_port: int, p_lose: float, p_refuse: float, seed: int) -> None:
        self.upstream_port = upstream_port
        self.p_lose, self.p_refuse = p_lose, p_refuse
        self.random = random.Random(seed)
        self.port = 0
        self.counts: Counter[str] = Counter()

    async def serve(self, *, task_status: TaskStatus[None]) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(SocketAttribute.local_port)
        task_status.started()
        await listener.serve(self._handle)

    async def _handle(self, downstream: SocketStream) -> None:
        self.counts["connections"] += 1
        if self.random.random() < self.p_refuse:
            self.counts["reset_before_forwarding"] += 1
            _reset(downstream)
            await downstream.aclose()
            return
        async with downstream, await anyio.connect_tcp("127.0.0.1", self.upstream_port) as upstream:
            async with anyio.create_task_group() as tg:

                async def forward_requests() -> None:
                    try:
                        async for chunk in downstream:
                            await upstream.send(chunk)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(forward_requests)
                try:
                    async for chunk in upstream:
                        roll = self.random.random()
                        if roll < self.p_lose / 2:
                            self.counts["answer_lost_rst"] += 1
                            _reset(downstream)
                            break
                        if roll < self.p_lose:
                            self.counts["answer_lost_half_sent"] += 1
                            await downstream.send(chunk[: len(chunk) // 2])
                            break
                        self.counts["answers_forwarded"] += 1
                        await downstream.send(chunk)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                    pass
                tg.cancel_scope.cancel()


async def test_retries_through_lost_answers_and_resets_duplicate_nothing(
    figures: Callable[..., None],
) -> None:
    store = InMemoryLightningStore()
    results: list[dict[str, Any]] = []
    async with (
        LightningStoreServer(store, host="127.0.0.1", port=0, auth_token="") as server,
        anyio.create_task_group() as tg,
    ):
        proxy = FaultyProxy(server.port, p_lose=0.15, p_refuse=0.1, seed=20261126)
        await tg.start(proxy.serve)
        procs = [
            popen(
                "mutate",
                "--port",
                str(proxy.port),
                "--clients",
                str(CLIENTS),
                "--rounds",
                str(ROUNDS),
                "--tag",
                f"p{n}",
            )
            for n in range(CLIENT_PROCESSES)
        ]
        try:
            for proc in procs:
                code, out, err = await wait_exit(proc, GUARD)
                assert code == 0, err
                results.append(json.loads(out.strip().splitlines()[-1]))
                await wait_no_session_left(proc.pid)
        finally:
            for proc in procs:
                stop_session(proc)
        tg.cancel_scope.cancel()

    errors = [e for r in results for e in r["errors"]]
    assert errors == []
    calls: Counter[str] = Counter()
    for r in results:
        calls.update(r["calls"])
    lost = proxy.counts["answer_lost_rst"] + proxy.counts["answer_lost_half_sent"]
    assert lost > 20 and proxy.counts["reset_before_forwarding"] > 5, proxy.counts  # faults did happen

    # Enqueues: exactly what the callers were told, each input once.
    enqueued = [rid for r in results for rid in r["enqueued"]]
    expected = CLIENT_PROCESSES * CLIENTS * ROUNDS * 4
    rollouts = await store.query_rollouts()
    assert len(enqueued) == len(set(enqueued)) == expected
    assert sorted(r.rollout_id for r in rollouts) == sorted(enqueued)
    inputs = Counter(json.dumps(r.input, sort_keys=True) for r in rollouts)
    assert max(inputs.values()) == 1

    # Dequeues: every claim made one attempt, on a distinct rollout, and nothing else was claimed.
    claimed = [rid for r in results for rid in r["claimed"]]
    assert len(claimed) == len(set(claimed)) == CLIENT_PROCESSES * CLIENTS * ROUNDS
    attempts = {r.rollout_id: await store.query_attempts(r.rollout_id) for r in rollouts}
    assert {rid for rid, a in attempts.items() if a} == set(claimed)
    assert all(len(attempts[rid]) == 1 and attempts[rid][0].status == "succeeded" for rid in claimed)

    # Spans: one add_span and one add_many_spans (2 spans) per claim; no copies.
    spans = [s for rid in claimed for s in await store.query_spans(rid)]
    assert len(spans) == 3 * len(claimed)
    assert Counter((s.rollout_id, s.sequence_id) for s in spans).most_common(1)[0][1] == 1
    stats = await store.statistics()
    assert stats["total_spans"] == len(spans) and stats["total_rollouts"] == expected

    figures(
        calls=sum(calls.values()),
        calls_by_route=dict(calls),
        proxy=dict(proxy.counts),
        answers_lost=lost,
        errors_seen=len(errors),
        duplicates=0,
    )
