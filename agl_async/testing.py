"""Helpers for tests (ours and users'): a store served over HTTP on a free loopback port, and a
fresh store of each implementation (:func:`open_test_store`, :func:`store_fixture`).

The PostgreSQL kinds need a server: :data:`POSTGRES_URL_ENV` (or a ``postgres_url`` pytest fixture,
which :func:`store_fixture` prefers) names a database on it from which a fresh database is made
for each store (and dropped afterwards); without one those kinds are skipped.
"""

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

__all__ = [
    "ASYNCIO_ONLY_KINDS",
    "HTTP_KINDS",
    "POSTGRES_URL_ENV",
    "STORE_KINDS",
    "free_port",
    "open_test_store",
    "serve_store",
    "store_fixture",
]


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
StoreKind = Literal["memory", "locked", "http", "sqlite", "http-sqlite", "postgres", "http-postgres"]
#: The store implementations :func:`open_test_store` can make.
STORE_KINDS: tuple[StoreKind, ...] = (
    "memory",
    "locked",
    "http",
    "sqlite",
    "http-sqlite",
    "postgres",
    "http-postgres",
)
#: The kinds served over HTTP (asyncio only: the server is uvicorn).
HTTP_KINDS: frozenset[StoreKind] = frozenset({"http", "http-sqlite", "http-postgres"})
#: The kinds that run on asyncio only (the HTTP server is uvicorn; asyncpg is asyncio-only).
ASYNCIO_ONLY_KINDS: frozenset[StoreKind] = HTTP_KINDS | {"postgres"}
#: Environment variable naming a PostgreSQL database (``postgresql://…``) on a server where the
#: PostgreSQL kinds may create (and drop) a fresh database per store.
POSTGRES_URL_ENV = "AGL_TEST_POSTGRES_URL"


@asynccontextmanager
async def _sqlite_in_temporary_directory() -> AsyncIterator[LightningStore]:
    from .store.sqlite import SqliteLightningStore  # sqlite3 only when asked for

    with tempfile.TemporaryDirectory(prefix="agl-async-store-") as directory:
        async with SqliteLightningStore(os.path.join(directory, "store.db")) as sqlite_store:
            yield sqlite_store


@asynccontextmanager
async def _postgres_in_fresh_database(server_url: str | None) -> AsyncIterator[LightningStore]:
    import asyncpg  # only when asked for

    from .store.postgres import PostgresLightningStore

    server_url = server_url or os.environ.get(POSTGRES_URL_ENV)
    if not server_url:
        raise RuntimeError(f"the PostgreSQL store kinds need a server: set {POSTGRES_URL_ENV}")
    name = f"agl_test_{os.urandom(6).hex()}"
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    finally:
        await admin.close()
    base, _, query = server_url.partition("?")
    dsn = base.rsplit("/", 1)[0] + "/" + name + (f"?{query}" if query else "")
    try:
        async with PostgresLightningStore(dsn) as pg_store:
            yield pg_store
    finally:
        admin = await asyncpg.connect(server_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@asynccontextmanager
async def open_test_store(
    kind: StoreKind = "memory", *, postgres_url: str | None = None
) -> AsyncIterator[LightningStore]:
    """A fresh, empty store of one kind, closed on exit (for tests; not to be confused with
    :func:`agl_async.open_store`, which makes a store from a URL).

    ``"memory"``: :class:`~agl_async.InMemoryLightningStore`; ``"locked"``: the same behind
    :class:`~agl_async.LightningStoreLocked` (what shared-memory mode hands to bundles);
    ``"http"``: a :class:`~agl_async.LightningStoreClient` talking to a server on a free loopback
    port (asyncio only), as runners see the store in client-server mode; ``"sqlite"``: a
    :class:`~agl_async.SqliteLightningStore` on a file in a temporary directory, removed on exit;
    ``"http-sqlite"``: the HTTP client in front of a server over such a SQLite store;
    ``"postgres"``: a :class:`~agl_async.PostgresLightningStore` on a fresh database of the server
    ``postgres_url`` (default: env :data:`POSTGRES_URL_ENV`) names, dropped on exit (asyncio only);
    ``"http-postgres"``: the HTTP client in front of a server over such a PostgreSQL store.
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
    elif kind == "postgres":
        async with _postgres_in_fresh_database(postgres_url) as pg_store:
            yield pg_store
    elif kind == "http-postgres":
        async with _postgres_in_fresh_database(postgres_url) as pg_store, serve_store(pg_store) as client:
            yield client
    else:
        raise ValueError(f"unknown store kind {kind!r}; expected one of {list(STORE_KINDS)}")


def store_fixture(*kinds: StoreKind, name: str = "store") -> Any:
    """Make a pytest fixture that yields a fresh store, parametrised over ``kinds``.

    For suites run with anyio's pytest plugin (``@pytest.mark.anyio``). In a ``conftest.py``::

        from agl_async.testing import store_fixture

        store = store_fixture("memory", "http")  # every test taking `store` runs twice

    ``kinds`` defaults to all of :data:`STORE_KINDS`. The :data:`ASYNCIO_ONLY_KINDS` are skipped
    on trio (uvicorn, asyncpg). The PostgreSQL kinds take their server from a ``postgres_url``
    fixture when the suite has one, else from env :data:`POSTGRES_URL_ENV`, and are skipped
    (saying why) without either. pytest is imported only when this is called.
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
        postgres_url = None
        if request.param in ("postgres", "http-postgres"):
            if backend != "asyncio":
                pytest.skip(
                    "PostgresLightningStore runs on asyncio only (its driver, asyncpg, is asyncio-only)"
                )
            try:
                postgres_url = request.getfixturevalue("postgres_url")  # may skip, saying why
            except pytest.FixtureLookupError:
                postgres_url = os.environ.get(POSTGRES_URL_ENV)
            if not postgres_url:
                pytest.skip(f"no PostgreSQL server: set {POSTGRES_URL_ENV} or provide a postgres_url fixture")
        async with open_test_store(request.param, postgres_url=postgres_url) as store:
            yield store

    return _store
