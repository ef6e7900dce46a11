"""The idempotency cache of the store server: a retried mutating request is answered, not re-applied.

A mutating request may carry an ``Idempotency-Key`` header (the client sends one per call, the
same on each retry). The cache remembers the answers to the most recent keys and replays them;
a retry that arrives while its original is still running waits for the original's answer.

Retries come within the client's retry budget (seconds), so a bounded recent window is all that
is needed: at most ``size`` answers and ``max_bytes`` of them, oldest evicted first; an answer
larger than a quarter of ``max_bytes`` is not kept. Cancellation: a retry cancelled while it
waits for its original changes nothing; an original that is cancelled or fails without an answer
is forgotten, and the next retry runs again.

A key is bound to the request it first came with by a fingerprint (:func:`fingerprint`: a hash
of method, path and body), as the IETF httpapi idempotency-key draft asks: the same key with
another fingerprint — a different body, another route — is not a retry but a different request
reusing the key, and :meth:`IdempotencyCache.answer` raises :class:`IdempotencyKeyReused` (the
server's 422) without running or replaying anything, also while the first is still running.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import anyio

__all__ = ["IdempotencyCache", "IdempotencyKeyReused", "fingerprint"]


def fingerprint(method: str, path: str, body: bytes) -> bytes:
    """What binds an ``Idempotency-Key`` to its request: a hash of method, path and body bytes."""
    return hashlib.sha256(f"{method} {path}\n".encode() + body).digest()


class IdempotencyKeyReused(Exception):
    """A key that names another request (another fingerprint) than the one it came with now."""

    def __init__(self, key: str) -> None:
        super().__init__(
            f"Idempotency-Key {key[:64]!r} was already used for a different request (another body or "
            "route); a new request needs a new key"
        )
        self.key = key


class IdempotencyCache:
    """Answers ``(status, body)`` of the most recent keyed requests with their requests'
    fingerprints, and the keys being answered."""

    def __init__(self, size: int, max_bytes: int) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0
        self.done: OrderedDict[str, tuple[int, bytes, bytes]] = OrderedDict()  # status, body, print
        self.running: dict[str, tuple[bytes, anyio.Event]] = {}

    def remember(self, key: str, status: int, body: bytes, bound: bytes = b"") -> None:
        if self.size <= 0 or len(body) > self.max_bytes // 4:
            return
        self.done[key] = (status, body, bound)
        self.bytes += len(body)
        while len(self.done) > self.size or self.bytes > self.max_bytes:
            _, (_, evicted, _) = self.done.popitem(last=False)
            self.bytes -= len(evicted)

    async def answer(
        self,
        key: str,
        bound: bytes,
        run: Callable[[], Awaitable[tuple[int, bytes]]],
        *,
        keep: Callable[[int], bool],
    ) -> tuple[int, bytes, bool]:
        """``(status, body, replayed)``: the remembered answer to ``key``, or ``run()``'s, which is
        remembered when ``keep(status)``. ``bound`` is the request's :func:`fingerprint`; a key
        known with another one raises :class:`IdempotencyKeyReused`."""
        while (running := self.running.get(key)) is not None:
            if running[0] != bound:
                raise IdempotencyKeyReused(key)
            await running[1].wait()  # a retry that overtook its original: wait for its answer
        if (done := self.done.get(key)) is not None:
            if done[2] != bound:
                raise IdempotencyKeyReused(key)
            self.done.move_to_end(key)
            return done[0], done[1], True
        event = anyio.Event()
        self.running[key] = (bound, event)
        try:
            status, body = await run()
            if keep(status):
                self.remember(key, status, body, bound)
        finally:
            del self.running[key]
            event.set()
        return status, body, False
