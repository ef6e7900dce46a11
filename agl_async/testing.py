"""Helpers for tests (ours and users'): a store served over HTTP on a free loopback port, and a
fresh store of each implementation (:func:`open_test_store`, :func:`store_fixture`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from ._net import free_port
from .http.client import LightningStoreClient
from .http.server import LightningStoreServer
from .store.base import LightningStore
from .store.locked import LightningStoreLocked
from .store.memory import InMemoryLightningStore

__all__ = ["HTTP_KINDS", "STORE_KINDS", "free_port", "open_test_store", "serve_store", "store_fixture"]


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


# ---------------------------------------------------------------------------- store fixtures
StoreKind = Literal["memory", "locked", "http", "sqlite", "http-sqlite"]
#: The store implementations :func:`open_test_store` can make.
STORE_KINDS: tuple[StoreKind, ...] = ("memory", "locked", "http", "sqlite", "http-sqlite")
#: The kinds served over HTTP (asyncio only: the server is uvicorn).
HTTP_KINDS: frozenset[StoreKind] = frozenset({"http", "http-sqlite"})


@asynccontextmanager
async def _sqlite_in_temporary_directory() -> AsyncIterator[LightningStore]:
    from .store.sqlite import SqliteLightningStore  # sqlite3 only when asked for

    with tempfile.TemporaryDirectory(prefix="agl-async-store-") as directory:
        async with SqliteLightningStore(os.path.join(directory, "store.db")) as sqlite_store:
            yield sqlite_store


@asynccontextmanager
async def open_test_store(kind: StoreKind = "memory") -> AsyncIterator[LightningStore]:
    """A fresh, empty store of one kind, closed on exit (for tests; not to be confused with
    :func:`agl_async.open_store`, which makes a store from a URL).

    ``"memory"``: :class:`~agl_async.InMemoryLightningStore`; ``"locked"``: the same behind
    :class:`~agl_async.LightningStoreLocked` (what shared-memory mode hands to bundles);
    ``"http"``: a :class:`~agl_async.LightningStoreClient` talking to a server on a free loopback
    port (asyncio only), as runners see the store in client-server mode; ``"sqlite"``: a
    :class:`~agl_async.SqliteLightningStore` on a file in a temporary directory, removed on exit;
    ``"http-sqlite"``: the HTTP client in front of a server over such a SQLite store.
    """
    if kind in ("memory", "locked"):
        memory = InMemoryLightningStore()
        store: LightningStore = memory if kind == "memory" else LightningStoreLocked(memory)
        try:
            yield store
        finally:
            await store.close()
    elif kind == "http":
        async with serve_store(InMemoryLightningStore()) as client:
            yield client
    elif kind == "sqlite":
        async with _sqlite_in_temporary_directory() as sqlite_store:
            yield sqlite_store
    elif kind == "http-sqlite":
        async with _sqlite_in_temporary_directory() as sqlite_store, serve_store(sqlite_store) as client:
            yield client
    else:
        raise ValueError(f"unknown store kind {kind!r}; expected one of {list(STORE_KINDS)}")


def store_fixture(*kinds: StoreKind, name: str = "store") -> Any:
    """Make a pytest fixture that yields a fresh store, parametrised over ``kinds``.

    For suites run with anyio's pytest plugin (``@pytest.mark.anyio``). In a ``conftest.py``::

        from agl_async.testing import store_fixture

        store = store_fixture("memory", "http")  # every test taking `store` runs twice

    ``kinds`` defaults to all of :data:`STORE_KINDS`. The :data:`HTTP_KINDS` are skipped on trio
    (the server runs on asyncio). pytest is imported only when this is called.
    """
    import pytest

    for kind in kinds:
        if kind not in STORE_KINDS:
            raise ValueError(f"unknown store kind {kind!r}; expected one of {list(STORE_KINDS)}")

    @pytest.fixture(name=name, params=list(kinds or STORE_KINDS))
    async def _store(request: Any, anyio_backend: Any) -> AsyncIterator[LightningStore]:
        backend = anyio_backend[0] if isinstance(anyio_backend, tuple) else anyio_backend
        if request.param in HTTP_KINDS and backend != "asyncio":
            pytest.skip("the HTTP store server runs on asyncio")
        async with open_test_store(request.param) as store:
            yield store

    return _store
