"""The on-disk layout of :class:`~agl_async.store.sqlite.SqliteLightningStore` and how a file is
opened: pragmas, schema creation on first open, and the version check that lets a later release
migrate a file written by this one.

Versioning: the schema version lives in the database header (``PRAGMA user_version``), written in
the same transaction as the tables it describes, so a file is either empty (version 0) or
complete. ``PRAGMA application_id`` marks the file as ours, so that opening some other SQLite
database by mistake is refused instead of adding tables to it. A later release that changes the
layout bumps :data:`SCHEMA_VERSION` and adds a step to :data:`MIGRATIONS`; every step from the
file's version up runs in one write transaction when the file is opened.

Everything here is blocking and runs on the store's worker thread, never on the event loop.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Literal

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "Synchronous", "connect"]

#: Version of the layout below; ``PRAGMA user_version`` of every file this release writes.
SCHEMA_VERSION = 1
#: ``PRAGMA application_id`` of our files ("AGLA").
APPLICATION_ID = 0x41474C41

#: How hard a commit waits for the disk; see :func:`connect`.
Synchronous = Literal["normal", "full"]

# Objects are stored whole as msgspec JSON (``data``) next to the few columns that queries filter
# or sort on; those columns are written together with ``data`` and always agree with it.
_SCHEMA_V1 = (
    # creation order = id; queue_pos orders the queue (NULL when not queued; negative after unclaim)
    """CREATE TABLE rollouts (
        id INTEGER PRIMARY KEY,
        rollout_id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        queue_pos INTEGER,
        data BLOB NOT NULL
    )""",
    "CREATE INDEX rollouts_queue ON rollouts (queue_pos) WHERE queue_pos IS NOT NULL",
    "CREATE INDEX rollouts_status ON rollouts (status)",
    # deadline: when the watchdog judges this live attempt (NULL when ended or unsupervised)
    """CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        attempt_id TEXT NOT NULL UNIQUE,
        rollout INTEGER NOT NULL REFERENCES rollouts (id),
        sequence_id INTEGER NOT NULL,
        status TEXT NOT NULL,
        deadline REAL,
        next_span_seq INTEGER NOT NULL DEFAULT 1,
        data BLOB NOT NULL,
        UNIQUE (rollout, sequence_id)
    )""",
    "CREATE INDEX attempts_deadline ON attempts (deadline) WHERE deadline IS NOT NULL",
    "CREATE INDEX attempts_status ON attempts (status)",
    """CREATE TABLE spans (
        id INTEGER PRIMARY KEY,
        attempt INTEGER NOT NULL REFERENCES attempts (id),
        sequence_id INTEGER NOT NULL,
        data BLOB NOT NULL
    )""",
    "CREATE INDEX spans_by_attempt ON spans (attempt, sequence_id)",
    """CREATE TABLE resources (
        id INTEGER PRIMARY KEY,
        resources_id TEXT NOT NULL UNIQUE,
        data BLOB NOT NULL
    )""",
    # worker_key: the worker id as JSON, so that the worker 0 and the worker "0" stay apart
    """CREATE TABLE workers (
        id INTEGER PRIMARY KEY,
        worker_key TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        data BLOB NOT NULL
    )""",
    # small named values: the latest resources id, the span count (statistics without a scan)
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "INSERT INTO settings (key, value) VALUES ('total_spans', 0)",
)

#: ``MIGRATIONS[v]`` upgrades a file from version ``v`` to ``v + 1`` (inside the open transaction).
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}


def _create(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        conn.execute(statement)


def _prepare(conn: sqlite3.Connection, path: str) -> None:
    """Create the schema in an empty file, check the version of an existing one, migrate an older
    one. Runs under the write lock, so two processes opening a new file at once agree."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID) or (
            version == 0 and conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        ):
            raise ValueError(f"{path} is an SQLite database but not an agl_async store")
        if version > SCHEMA_VERSION:
            raise ValueError(
                f"{path} was written by a newer agl_async (store schema version {version}; this "
                f"release reads up to {SCHEMA_VERSION}): upgrade agl_async to open it"
            )
        if version == 0:
            _create(conn)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        else:
            for step in range(version, SCHEMA_VERSION):
                MIGRATIONS[step](conn)
        if version != SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def connect(path: str, synchronous: Synchronous, busy_timeout: float) -> sqlite3.Connection:
    """Open ``path`` (creating the file and the schema if needed) in WAL mode.

    ``synchronous``: ``"normal"`` (WAL's usual setting) makes every commit a write of the WAL file
    into the operating system before the call returns, without waiting for the disk: a commit
    survives the death of the process (SIGKILL included) but not an operating-system crash or a
    power cut, which may lose the last commits (never corrupt the file). ``"full"`` also waits for
    the WAL to reach the disk (fsync) at every commit: durable against power loss, at the price of
    one fsync per store call. ``busy_timeout``: how long a call waits for another process's write
    transaction on the same file before failing.

    Raises ``OSError`` when the file cannot be opened, ``ValueError`` when it is not a store this
    release can read.
    """
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise OSError(f"cannot open the SQLite store {path!r}: {exc}") from None
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OSError(
                f"cannot use write-ahead logging for the SQLite store {path!r} (journal mode {mode})"
            )
        conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        _prepare(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise OSError(f"cannot open the SQLite store {path!r}: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn
