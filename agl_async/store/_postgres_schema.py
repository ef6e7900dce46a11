"""The PostgreSQL store's schema: tables, indexes, and the version that later releases migrate from.

Every table is prefixed ``agl_``; put the store in its own PostgreSQL schema with the DSN's
``options=-csearch_path=NAME`` when the database is shared with other applications.

Layout (JSON values are stored as ``text`` holding the exact JSON the store encoded, so that what
comes back decodes to what went in, key order included; ``jsonb`` would reorder keys):

``agl_rollouts``
    one row per rollout. ``seq`` is the creation order; ``queue_pos`` is the rollout's place in
    the queue (``NULL`` when not queued: a dequeue takes the smallest, an unclaim puts it back
    with a negative one so that it comes first); ``n_attempts`` / ``latest_attempt_id`` describe
    its attempts; ``timeout_s`` / ``unresponsive_s`` copy its config's limits for the watchdog.
``agl_attempts``
    one row per attempt. ``deadline`` is when the watchdog will end it if nothing happens (a
    live attempt under a supervising config), ``NULL`` otherwise; ``next_span_seq`` is the next
    span sequence id it issues.
``agl_spans``
    one row per span, the whole span as JSON in ``data``; ``id`` orders spans added with equal
    sequence ids.
``agl_resources``
    one row per snapshot; ``touched`` (from a sequence) makes the latest one the one with the
    highest value.
``agl_workers``
    one row per worker; ``worker_key`` is the worker id as JSON (so ``0`` and ``"0"`` differ).
``agl_meta``
    ``schema_version``.

Creating and migrating happen in one transaction under an advisory lock, so any number of
processes may open a fresh database at the same moment.
"""

from __future__ import annotations

from typing import Any

__all__ = ["NOTIFY_CHANNEL", "SCHEMA_VERSION", "WATCHDOG_LOCK_KEY", "ensure_schema"]

#: Version of the layout below; a database with a newer one is refused, an older one migrated.
SCHEMA_VERSION = 1
#: The LISTEN/NOTIFY channel of the store's wake-ups (see ``_postgres_events``).
NOTIFY_CHANNEL = "agl_async_store"
#: Advisory lock held by the one process per database that runs the watchdog.
WATCHDOG_LOCK_KEY = 0x61676C5F77640001  # "agl_wd" + 1
#: Advisory lock serialising schema creation and migration.
_SCHEMA_LOCK_KEY = 0x61676C5F73630001  # "agl_sc" + 1

_CREATE_V1 = """
CREATE TABLE IF NOT EXISTS agl_meta (
    key text PRIMARY KEY,
    value text NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS agl_queue_seq;
CREATE SEQUENCE IF NOT EXISTS agl_queue_head_seq INCREMENT BY -1 MAXVALUE -1 START WITH -1;
CREATE SEQUENCE IF NOT EXISTS agl_resources_touch_seq;
CREATE TABLE IF NOT EXISTS agl_rollouts (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    rollout_id text PRIMARY KEY,
    input text NOT NULL,
    start_time double precision NOT NULL,
    end_time double precision,
    mode text,
    resources_id text,
    status text NOT NULL,
    config text NOT NULL,
    metadata text NOT NULL,
    queue_pos bigint,
    n_attempts integer NOT NULL DEFAULT 0,
    latest_attempt_id text,
    timeout_s double precision,
    unresponsive_s double precision
);
CREATE UNIQUE INDEX IF NOT EXISTS agl_rollouts_seq ON agl_rollouts (seq);
CREATE INDEX IF NOT EXISTS agl_rollouts_queue ON agl_rollouts (queue_pos) WHERE queue_pos IS NOT NULL;
CREATE INDEX IF NOT EXISTS agl_rollouts_status ON agl_rollouts (status);
CREATE TABLE IF NOT EXISTS agl_attempts (
    attempt_id text PRIMARY KEY,
    rollout_id text NOT NULL REFERENCES agl_rollouts (rollout_id) ON DELETE CASCADE,
    sequence_id integer NOT NULL,
    start_time double precision NOT NULL,
    end_time double precision,
    status text NOT NULL,
    worker_id text,
    last_heartbeat_time double precision,
    metadata text NOT NULL DEFAULT '{}',
    next_span_seq bigint NOT NULL DEFAULT 1,
    timeout_s double precision,
    unresponsive_s double precision,
    deadline double precision,
    UNIQUE (rollout_id, sequence_id)
);
CREATE INDEX IF NOT EXISTS agl_attempts_deadline ON agl_attempts (deadline) WHERE deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS agl_attempts_status ON agl_attempts (status);
CREATE TABLE IF NOT EXISTS agl_spans (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id text NOT NULL,
    attempt_id text NOT NULL,
    attempt_seq integer NOT NULL,
    sequence_id bigint NOT NULL,
    data text NOT NULL
);
CREATE INDEX IF NOT EXISTS agl_spans_order ON agl_spans (rollout_id, attempt_seq, sequence_id, id);
CREATE TABLE IF NOT EXISTS agl_resources (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    resources_id text PRIMARY KEY,
    resources text NOT NULL,
    create_time double precision NOT NULL,
    update_time double precision NOT NULL,
    version integer NOT NULL DEFAULT 1,
    touched bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS agl_resources_touched ON agl_resources (touched);
CREATE TABLE IF NOT EXISTS agl_workers (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    worker_key text PRIMARY KEY,
    status text NOT NULL DEFAULT 'unknown',
    heartbeat_stats text,
    last_heartbeat_time double precision,
    last_dequeue_time double precision,
    last_busy_time double precision,
    last_idle_time double precision,
    current_rollout_id text,
    current_attempt_id text
);
"""

#: ``version -> SQL`` bringing a database from ``version - 1`` to ``version``.
_MIGRATIONS: dict[int, str] = {}


async def ensure_schema(conn: Any) -> int:
    """Create the tables on a fresh database, migrate an older layout, refuse a newer one.

    Returns the version found before (0 for a fresh database). Raises ``RuntimeError`` when the
    database was made by a newer release.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
        exists = await conn.fetchval("SELECT to_regclass('agl_meta') IS NOT NULL")
        found = 0
        if exists:
            value = await conn.fetchval("SELECT value FROM agl_meta WHERE key = 'schema_version'")
            found = int(value) if value is not None else 0
        if found > SCHEMA_VERSION:
            raise RuntimeError(
                f"the database's agl_async schema is version {found}, newer than this release's "
                f"({SCHEMA_VERSION}); upgrade agl_async to open it"
            )
        if found == SCHEMA_VERSION:
            return found
        if found == 0:
            await conn.execute(_CREATE_V1)
        else:
            for version in range(found + 1, SCHEMA_VERSION + 1):
                await conn.execute(_MIGRATIONS[version])
        await conn.execute(
            "INSERT INTO agl_meta (key, value) VALUES ('schema_version', $1) "
            "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            str(SCHEMA_VERSION),
        )
        return found
