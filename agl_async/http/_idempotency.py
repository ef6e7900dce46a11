"""The idempotency cache of the store server: a retried mutating request is answered, not re-applied.

A mutating request may carry an ``Idempotency-Key`` header (the client sends one per call, the
same on each retry). The cache remembers the answers to the most recent keys and replays them;
a retry that arrives while its original is still running waits for the original's answer.

Retries come within the client's retry budget (seconds), so a bounded recent window is all that
is needed: at most ``size`` answers and ``max_bytes`` of them, oldest evicted first; an answer
larger than a quarter of ``max_bytes`` is not kept. Cancellation: a retry cancelled while it
waits for its original changes nothing; an original that is cancelled or fails without an answer
is forgotten, and the next retry runs again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["IdempotencyCache"]


class IdempotencyCache:
    """Answers ``(status, body)`` of the most recent keyed requests, and the keys being answered."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.done: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self.running: dict[str, anyio.Event] = {}

    def remember(self, key: str, status: int, body: bytes) -> None:
        if self.size <= 0 or len(body) > self.max_bytes // 4:
            return
        self.done[key] = (status, body)
        self.bytes += len(body)
        while len(self.done) > self.size or self.bytes > self.max_bytes:
            _, (_, evicted) = self.done.popitem(last=False)
            self.bytes -= len(evicted)

    async def answer(
        self, key: str, run: Callable[[], Awaitable[tuple[int, bytes]]], *, keep: Callable[[int], bool]
    ) -> tuple[int, bytes, bool]:
        """``(status, body, replayed)``: the remembered answer to ``key``, or ``run()``'s, which is
        remembered when ``keep(status)``."""
        while (running := self.running.get(key)) is not None:
            await running.wait()  # a retry that overtook its original: wait for its answer
        if (done := self.done.get(key)) is not None:
            self.done.move_to_end(key)
            return done[0], done[1], True
        self.running[key] = event = anyio.Event()
        try:
            status, body = await run()
            if keep(status):
                self.remember(key, status, body)
        finally:
            del self.running[key]
            event.set()
        return status, body, False
