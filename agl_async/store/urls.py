"""``open_store(url)``: a store from a URL, as ``Trainer(store=url)`` and ``agl-async serve --store``
take it.

=========================================== ===============================================
``memory://``                               a fresh :class:`~agl_async.InMemoryLightningStore`
``sqlite:///relative/path.db``              :class:`~agl_async.SqliteLightningStore` on a path
                                            relative to the current directory
``sqlite:////absolute/path.db``             the same on an absolute path
``postgresql://user:password@host:port/db`` :class:`~agl_async.PostgresLightningStore`
                                            (``postgres://`` too)
=========================================== ===============================================

A SQLite URL may end in ``?synchronous=full`` (see :class:`~agl_async.SqliteLightningStore`).
Nothing is opened or connected here: the store does that on its first call, so a URL for an
unreachable database makes a store whose first call fails. The drivers (``sqlite3``,
``asyncpg``) are imported only when their scheme is used. A malformed URL or an unknown scheme is
a ``ValueError``.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from .base import LightningStore
from .memory import InMemoryLightningStore

__all__ = ["open_store"]

_SCHEMES = "memory://, sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user@host/db"


def open_store(url: str) -> LightningStore:
    """Make the store ``url`` names (see the module documentation); it connects on first use."""
    if not isinstance(url, str):
        raise ValueError(f"a store URL must be a string, got {type(url).__name__}")
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme:
        raise ValueError(f"not a store URL: {url!r}; expected {_SCHEMES}")
    scheme = scheme.lower()
    if scheme == "memory":
        if rest not in ("", "/"):
            raise ValueError(f"memory:// takes nothing after the scheme, got {url!r}")
        return InMemoryLightningStore()
    if scheme == "sqlite":
        return _sqlite(url, rest)
    if scheme in ("postgresql", "postgres"):
        return _postgres(url)
    raise ValueError(f"unknown store URL scheme {scheme + '://'!r} in {url!r}; expected {_SCHEMES}")


def _sqlite(url: str, rest: str) -> LightningStore:
    if not rest.startswith("/"):
        raise ValueError(
            "a SQLite URL has no host: sqlite:///relative/path.db or sqlite:////absolute/path.db, "
            f"got {url!r}"
        )
    path, _, query = rest[1:].partition("?")
    if not path or path.endswith("/"):
        raise ValueError(f"the SQLite URL {url!r} names no file")
    options: dict[str, Any] = {}
    for key, value in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)):
        if key != "synchronous":
            raise ValueError(f"unknown option {key!r} in the SQLite URL {url!r}; known: synchronous")
        options[key] = value.lower()
    from .sqlite import SqliteLightningStore

    return SqliteLightningStore(path, **options)


def _postgres(url: str) -> LightningStore:
    try:
        from .postgres import PostgresLightningStore  # type: ignore[import-not-found, unused-ignore]
    except ModuleNotFoundError as exc:
        if exc.name != f"{__package__}.postgres":
            raise  # the module is there but its driver is not: its own message says what to install
        raise RuntimeError(
            f"cannot open {url!r}: this build of agl_async has no PostgreSQL store (agl_async.store.postgres)"
        ) from None
    store: LightningStore = PostgresLightningStore(url)
    return store
