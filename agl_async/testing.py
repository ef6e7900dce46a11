"""Helpers for tests (ours and users'): a store served over HTTP on a free loopback port."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .http.client import LightningStoreClient
from .http.server import LightningStoreServer
from .store.base import LightningStore

__all__ = ["free_port", "serve_store"]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (prefer ``port=0`` where possible)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def serve_store(
    store: LightningStore, *, auth_token: str | None = None, **client_kwargs: Any
) -> AsyncIterator[LightningStoreClient]:
    """Serve ``store`` on 127.0.0.1 (a free port, bound race-free with ``port=0``) and yield a
    connected client. On exit the client is closed and the server stopped (asyncio only).

    ``auth_token`` is given to both sides; ``None`` means no token (``AGL_SERVER_TOKEN`` in the
    environment is ignored here, so tests are not affected by it).
    """
    token = auth_token or ""
    async with LightningStoreServer(store, host="127.0.0.1", port=0, auth_token=token) as server:
        async with LightningStoreClient(server.endpoint, auth_token=token, **client_kwargs) as client:
            yield client
