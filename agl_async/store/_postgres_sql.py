"""Every SQL statement of the PostgreSQL store, by name (the tables: ``_postgres_schema``).

Parameters are asyncpg's ``$n``. Times are epoch seconds (``float8``) of the store's clock; JSON
values are ``text``; worker ids are stored as their JSON (``worker_key`` / ``worker_id``).
"""

from __future__ import annotations

__all__ = [
    "ADD_SPAN_FAST",
    "ATTEMPTS_BY_ID",
    "ATTEMPT_COLS",
    "CLAIM",
    "CLAIMED_BY_ATTEMPT_IDS",
    "COUNT_ROLLOUT",
    "DELETE_ATTEMPT",
    "DELETE_ATTEMPT_SPANS",
    "DUE_ATTEMPTS",
    "DUE_ROLLOUTS",
    "ENQUEUE",
    "EXISTING_RESOURCES",
    "FLUSH",
    "GET_ATTEMPT",
    "GET_RESOURCES",
    "GET_ROLLOUT",
    "GET_WORKER",
    "HEARTBEAT_ATTEMPT",
    "INSERT_ATTEMPT",
    "INSERT_RESOURCES",
    "INSERT_SPANS",
    "LATEST_ATTEMPT",
    "LATEST_RESOURCES",
    "LIVE_ATTEMPTS",
    "LOCK_ROLLOUT",
    "LOCK_ROLLOUTS",
    "LOCK_ROLLOUT_SKIP_LOCKED",
    "LOCK_ROLLOUT_WITH_ATTEMPT",
    "NEXT_DEADLINE",
    "NEXT_SPAN_SEQ",
    "NOTIFY",
    "PREVIOUS_ATTEMPT_ID",
    "QUERY_ATTEMPTS",
    "QUERY_RESOURCES",
    "QUERY_ROLLOUTS",
    "QUERY_ROLLOUTS_BY_ID",
    "QUERY_WORKERS",
    "RAISE_SPAN_SEQ",
    "RESOURCES_COLS",
    "ROLLOUTS_BY_ID",
    "ROLLOUT_COLS",
    "ROLLOUT_ORDERS",
    "ROLLOUT_STATUSES_BY_ID",
    "SAVE_ATTEMPT",
    "SAVE_ROLLOUT_FIELDS",
    "SAVE_ROLLOUT_STATUS",
    "SPANS_HEARTBEAT",
    "SPANS_OF_ATTEMPT",
    "SPANS_OF_LATEST_ATTEMPT",
    "SPANS_OF_ROLLOUT",
    "START_ROLLOUT",
    "STATISTICS",
    "TERMINAL_ROLLOUTS_BY_ID",
    "TOUCH_ROLLOUT_FOR_ATTEMPT",
    "UNCLAIM_ROLLOUT",
    "UPDATE_RESOURCES",
    "UPDATE_ROLLOUT_FIELDS_FAST",
    "UPSERT_WORKER_HEARTBEAT",
    "WORKER_BUSY",
    "WORKER_COLS",
    "WORKER_IDLE_DEQUEUE",
    "WORKER_RELEASE",
]

ROLLOUT_COLS = (
    "rollout_id, input, start_time, end_time, mode, resources_id, status, config, metadata, "
    "queue_pos, n_attempts, latest_attempt_id"
)
ATTEMPT_COLS = (
    "rollout_id, attempt_id, sequence_id, start_time, end_time, status, worker_id, "
    "last_heartbeat_time, metadata, timeout_s, unresponsive_s, deadline"
)
WORKER_COLS = (
    "worker_key, status, heartbeat_stats, last_heartbeat_time, last_dequeue_time, last_busy_time, "
    "last_idle_time, current_rollout_id, current_attempt_id"
)
RESOURCES_COLS = "resources_id, resources, create_time, update_time, version"

NOTIFY = "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p"

# Everything a transaction changed in attempts, rollouts and workers, plus its notifications, in
# one statement (one round trip). Each part takes parallel arrays (empty: nothing to do).
#   attempts  $1..$9: id, status, end_time, worker_id, last_heartbeat_time, metadata, timeout_s,
#                     unresponsive_s, deadline
#   rollouts  $10..$13: id, status, end_time, queue move ('tail' / 'out' / 'keep')
#   busy      $14..$18: worker key, now, rollout id, attempt id, last_dequeue_time (NULL: keep)
#   release   $19..$22: worker key, status, now, attempt id (only if it still holds that attempt)
#   notify    $23 channel, $24 payloads
# A worker appears at most once across busy and release (callers run repeats one by one).
FLUSH = """
WITH a AS (
    UPDATE agl_attempts t SET status = u.status, end_time = u.end_time, worker_id = u.worker_id,
        last_heartbeat_time = u.hb, metadata = u.metadata, timeout_s = u.timeout_s,
        unresponsive_s = u.unresponsive_s, deadline = u.deadline
    FROM unnest($1::text[], $2::text[], $3::float8[], $4::text[], $5::float8[], $6::text[], $7::float8[],
                $8::float8[], $9::float8[])
        AS u(id, status, end_time, worker_id, hb, metadata, timeout_s, unresponsive_s, deadline)
    WHERE t.attempt_id = u.id
    RETURNING 1
), r AS (
    UPDATE agl_rollouts t SET status = u.status, end_time = u.end_time,
        queue_pos = CASE u.move WHEN 'tail' THEN nextval('agl_queue_seq') WHEN 'out' THEN NULL
                    ELSE t.queue_pos END
    FROM unnest($10::text[], $11::text[], $12::float8[], $13::text[]) AS u(id, status, end_time, move)
    WHERE t.rollout_id = u.id
    RETURNING 1
), busy AS (
    INSERT INTO agl_workers AS w (worker_key, status, last_busy_time, current_rollout_id, current_attempt_id,
                                  last_dequeue_time)
    SELECT k, 'busy', at, rid, aid, deq
    FROM unnest($14::text[], $15::float8[], $16::text[], $17::text[], $18::float8[])
        AS u(k, at, rid, aid, deq)
    ON CONFLICT (worker_key) DO UPDATE SET
        status = 'busy', last_busy_time = EXCLUDED.last_busy_time,
        current_rollout_id = EXCLUDED.current_rollout_id, current_attempt_id = EXCLUDED.current_attempt_id,
        last_dequeue_time = COALESCE(EXCLUDED.last_dequeue_time, w.last_dequeue_time)
    RETURNING 1
), released AS (
    UPDATE agl_workers w SET status = u.st, last_idle_time = u.at, current_rollout_id = NULL,
        current_attempt_id = NULL
    FROM unnest($19::text[], $20::text[], $21::float8[], $22::text[]) AS u(k, st, at, aid)
    WHERE w.worker_key = u.k AND (w.current_attempt_id IS NULL OR w.current_attempt_id = u.aid)
    RETURNING 1
), registered AS (
    INSERT INTO agl_workers (worker_key, status, last_idle_time)
    SELECT k, st, at FROM unnest($19::text[], $20::text[], $21::float8[]) AS u(k, st, at)
    ON CONFLICT (worker_key) DO NOTHING
    RETURNING 1
), n AS (
    SELECT pg_notify($23, p) FROM unnest($24::text[]) AS p
)
SELECT (SELECT count(*) FROM a) + (SELECT count(*) FROM r) + (SELECT count(*) FROM busy)
     + (SELECT count(*) FROM released) + (SELECT count(*) FROM registered) + (SELECT count(*) FROM n)
"""

# ------------------------------------------------------------------------------------ rollouts
GET_ROLLOUT = f"SELECT {ROLLOUT_COLS} FROM agl_rollouts WHERE rollout_id = $1"
LOCK_ROLLOUT = GET_ROLLOUT + " FOR UPDATE"
LOCK_ROLLOUT_SKIP_LOCKED = LOCK_ROLLOUT + " SKIP LOCKED"
COUNT_ROLLOUT = "SELECT count(*) FROM agl_rollouts WHERE rollout_id = $1"
# A rollout ($1), locked, with one of its attempts ($2; 'latest': its latest; NULL: none) in
# columns prefixed ``a_`` (NULL when there is no such attempt).
LOCK_ROLLOUT_WITH_ATTEMPT = (
    f"SELECT {', '.join('r.' + c.strip() for c in ROLLOUT_COLS.split(','))}, "
    f"{', '.join('a.' + c.strip() + ' AS a_' + c.strip() for c in ATTEMPT_COLS.split(','))} "
    "FROM agl_rollouts r LEFT JOIN agl_attempts a ON a.rollout_id = r.rollout_id "
    "AND a.attempt_id = CASE WHEN $2::text = 'latest' THEN r.latest_attempt_id ELSE $2::text END "
    "WHERE r.rollout_id = $1 FOR UPDATE OF r"
)
LOCK_ROLLOUTS = (
    f"SELECT {ROLLOUT_COLS} FROM agl_rollouts WHERE rollout_id = ANY($1::text[]) "
    "ORDER BY rollout_id FOR UPDATE"
)
ROLLOUTS_BY_ID = f"SELECT {ROLLOUT_COLS} FROM agl_rollouts WHERE rollout_id = ANY($1::text[])"
ROLLOUT_STATUSES_BY_ID = "SELECT rollout_id, status FROM agl_rollouts WHERE rollout_id = ANY($1::text[])"
TERMINAL_ROLLOUTS_BY_ID = ROLLOUTS_BY_ID + " AND status IN ('succeeded', 'failed', 'cancelled')"
# Filtered ($1 statuses, $2 a substring of the id), ordered by {order}, paged ($3 limit or NULL
# for all, $4 offset). {order} is one of ROLLOUT_ORDERS: never a caller's text.
QUERY_ROLLOUTS = f"""
SELECT {ROLLOUT_COLS} FROM agl_rollouts
WHERE ($1::text[] IS NULL OR status = ANY($1::text[])) AND ($2::text IS NULL OR strpos(rollout_id, $2) > 0)
ORDER BY {{order}} LIMIT $3 OFFSET $4
"""
# sort_by -> ORDER BY: ties in creation order (reversed for desc), missing values last in both
# orders; text in code point order (COLLATE "C"), as Python compares strings.
ROLLOUT_ORDERS: dict[tuple[str | None, str], str] = {
    (None, "asc"): "seq",
    (None, "desc"): "seq",  # without sort_by: creation order, whatever sort_order says
    **{
        (field, direction): f"{column} {direction.upper()} NULLS LAST, seq {direction.upper()}"
        for field, column in (
            ("rollout_id", 'rollout_id COLLATE "C"'),
            ("status", 'status COLLATE "C"'),
            ("start_time", "start_time"),
            ("end_time", "end_time"),
        )
        for direction in ("asc", "desc")
    },
}
QUERY_ROLLOUTS_BY_ID = ROLLOUTS_BY_ID + " AND ($2::text[] IS NULL OR status = ANY($2::text[]))"

# $1 ids, $2 inputs, $3 modes, $4 resources ids (NULL: the latest), $5 configs, $6 metadata,
# $7 now, $8 timeouts, $9 unresponsive limits. Queue positions follow the order given.
ENQUEUE = """
INSERT INTO agl_rollouts (rollout_id, input, start_time, mode, resources_id, status, config, metadata,
                          queue_pos, timeout_s, unresponsive_s)
SELECT u.rid, u.input, $7, u.mode, COALESCE(u.res, latest.id), 'queuing', u.config, u.metadata,
       nextval('agl_queue_seq'), u.timeout_s, u.unresponsive_s
FROM (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                         $8::float8[], $9::float8[]) WITH ORDINALITY
        AS x(rid, input, mode, res, config, metadata, timeout_s, unresponsive_s, ord)
    ORDER BY ord
) u
LEFT JOIN (SELECT resources_id AS id FROM agl_resources ORDER BY touched DESC LIMIT 1) latest ON true
RETURNING rollout_id, resources_id
"""
# $1 id, $2 input, $3 now, $4 mode, $5 resources id (NULL: the latest), $6 config, $7 metadata,
# $8 timeout, $9 unresponsive limit. Not queued: the caller makes its first attempt at once.
START_ROLLOUT = f"""
INSERT INTO agl_rollouts (rollout_id, input, start_time, mode, resources_id, status, config, metadata,
                          timeout_s, unresponsive_s)
SELECT $1, $2, $3, $4,
       COALESCE($5, (SELECT resources_id FROM agl_resources ORDER BY touched DESC LIMIT 1)),
       'preparing', $6, $7, $8, $9
RETURNING {ROLLOUT_COLS}
"""
# Replace fields of a rollout that is not finished (or whose metadata is left alone): $2/$4/$6/$8
# say whether input ($3), mode ($5), resources id ($7, which must exist) and metadata ($9) are
# given. No row: unknown, missing resources or finished with new metadata (the locked path).
UPDATE_ROLLOUT_FIELDS_FAST = f"""
UPDATE agl_rollouts SET
    input = CASE WHEN $2 THEN $3 ELSE input END,
    mode = CASE WHEN $4 THEN $5 ELSE mode END,
    resources_id = CASE WHEN $6 THEN $7 ELSE resources_id END,
    metadata = CASE WHEN $8 THEN $9 ELSE metadata END
WHERE rollout_id = $1
  AND (NOT $8 OR status NOT IN ('succeeded', 'failed', 'cancelled'))
  AND (NOT $6 OR $7::text IS NULL OR EXISTS (SELECT 1 FROM agl_resources WHERE resources_id = $7))
RETURNING {ROLLOUT_COLS}
"""
SAVE_ROLLOUT_FIELDS = """
UPDATE agl_rollouts SET input = $2, mode = $3, resources_id = $4, config = $5, metadata = $6,
    timeout_s = $7, unresponsive_s = $8
WHERE rollout_id = $1
"""
# $4: 'tail' (enter the queue at its end), 'out' (leave it) or 'keep'.
SAVE_ROLLOUT_STATUS = """
UPDATE agl_rollouts SET status = $2, end_time = $3,
    queue_pos = CASE $4::text
        WHEN 'tail' THEN nextval('agl_queue_seq') WHEN 'out' THEN NULL ELSE queue_pos END
WHERE rollout_id = $1
"""
TOUCH_ROLLOUT_FOR_ATTEMPT = """
UPDATE agl_rollouts SET status = 'preparing', end_time = NULL, queue_pos = NULL,
    n_attempts = $2, latest_attempt_id = $3
WHERE rollout_id = $1
"""
# Back to the head of the queue: the head sequence counts down from -1.
UNCLAIM_ROLLOUT = """
UPDATE agl_rollouts SET status = $2, n_attempts = n_attempts - 1, latest_attempt_id = $3,
    queue_pos = nextval('agl_queue_head_seq')
WHERE rollout_id = $1
"""

# Claim up to $1 queued rollouts (FIFO, skipping rows another transaction holds), make their
# attempts ($2: new attempt ids in claim order, $3: now, $4: worker key or NULL), mark the worker
# busy with the last one, and announce the nearest new deadline on channel $5, in one statement.
# Returns the claimed rollouts in queue order.
CLAIM = """
WITH c0 AS (
    SELECT rollout_id, queue_pos FROM agl_rollouts
    WHERE queue_pos IS NOT NULL ORDER BY queue_pos LIMIT $1 FOR UPDATE SKIP LOCKED
), c AS (
    SELECT rollout_id, queue_pos, (row_number() OVER (ORDER BY queue_pos))::int AS k FROM c0
), r AS (
    UPDATE agl_rollouts t SET queue_pos = NULL, status = 'preparing', end_time = NULL,
        n_attempts = t.n_attempts + 1, latest_attempt_id = ($2::text[])[c.k]
    FROM c WHERE t.rollout_id = c.rollout_id
    RETURNING t.rollout_id, t.input, t.start_time, t.mode, t.resources_id, t.config, t.metadata,
              t.n_attempts, t.latest_attempt_id, t.timeout_s, t.unresponsive_s, c.k
), a AS (
    INSERT INTO agl_attempts (attempt_id, rollout_id, sequence_id, start_time, status, worker_id,
                              timeout_s, unresponsive_s, deadline)
    SELECT latest_attempt_id, rollout_id, n_attempts, $3, 'preparing', $4, timeout_s, unresponsive_s,
           LEAST($3 + timeout_s, $3 + unresponsive_s)
    FROM r
    RETURNING deadline
), w AS (
    INSERT INTO agl_workers AS w (worker_key, status, last_dequeue_time, last_busy_time,
                                  current_rollout_id, current_attempt_id)
    SELECT $4, 'busy', $3, $3, rollout_id, latest_attempt_id FROM r
    WHERE $4::text IS NOT NULL ORDER BY k DESC LIMIT 1
    ON CONFLICT (worker_key) DO UPDATE SET
        status = 'busy', last_dequeue_time = EXCLUDED.last_dequeue_time,
        last_busy_time = EXCLUDED.last_busy_time, current_rollout_id = EXCLUDED.current_rollout_id,
        current_attempt_id = EXCLUDED.current_attempt_id
), n AS (
    SELECT pg_notify($5, 'd ' || min(deadline)::text) FROM a HAVING min(deadline) IS NOT NULL
)
SELECT r.*, (SELECT count(*) FROM n) AS notified FROM r ORDER BY r.k
"""
# What a claim made, looked up by its new attempt ids (after a connection lost during the commit).
CLAIMED_BY_ATTEMPT_IDS = """
SELECT r.input, r.mode, r.resources_id, r.config, r.metadata, r.start_time,
       a.rollout_id, a.attempt_id AS latest_attempt_id, a.sequence_id AS n_attempts,
       a.start_time AS attempt_start
FROM agl_attempts a JOIN agl_rollouts r USING (rollout_id)
WHERE a.attempt_id = ANY($1::text[])
"""

# ------------------------------------------------------------------------------------ attempts
GET_ATTEMPT = f"SELECT {ATTEMPT_COLS} FROM agl_attempts WHERE attempt_id = $1 AND rollout_id = $2"
QUERY_ATTEMPTS = f"SELECT {ATTEMPT_COLS} FROM agl_attempts WHERE rollout_id = $1 ORDER BY sequence_id"
LATEST_ATTEMPT = QUERY_ATTEMPTS + " DESC LIMIT 1"
LIVE_ATTEMPTS = (
    f"SELECT {ATTEMPT_COLS} FROM agl_attempts WHERE rollout_id = $1 AND status IN ('preparing', 'running')"
)
ATTEMPTS_BY_ID = f"SELECT {ATTEMPT_COLS}, next_span_seq FROM agl_attempts WHERE attempt_id = ANY($1::text[])"
# Spans $2 (attempt ids) up to sequence ids $3 arrived at $1: heartbeats, and the next sequence ids.
SPANS_HEARTBEAT = """
UPDATE agl_attempts t SET last_heartbeat_time = $1, next_span_seq = GREATEST(t.next_span_seq, u.top + 1),
    deadline = CASE WHEN t.status IN ('preparing', 'running')
                    THEN LEAST(t.start_time + t.timeout_s, $1 + t.unresponsive_s) END
FROM unnest($2::text[], $3::bigint[]) AS u(id, top)
WHERE t.attempt_id = u.id
"""
PREVIOUS_ATTEMPT_ID = "SELECT attempt_id FROM agl_attempts WHERE rollout_id = $1 AND sequence_id = $2"
INSERT_ATTEMPT = """
INSERT INTO agl_attempts (attempt_id, rollout_id, sequence_id, start_time, status, worker_id,
                          timeout_s, unresponsive_s, deadline)
VALUES ($1, $2, $3, $4, 'preparing', $5, $6, $7, $8)
"""
SAVE_ATTEMPT = """
UPDATE agl_attempts SET status = $2, end_time = $3, worker_id = $4, last_heartbeat_time = $5,
    metadata = $6, timeout_s = $7, unresponsive_s = $8, deadline = $9
WHERE attempt_id = $1
"""
DELETE_ATTEMPT = "DELETE FROM agl_attempts WHERE attempt_id = $1"
# A heartbeat of a live attempt ($1) at $2, which pushes its unresponsive deadline back.
HEARTBEAT_ATTEMPT = """
UPDATE agl_attempts SET last_heartbeat_time = $2,
    deadline = LEAST(start_time + timeout_s, $2 + unresponsive_s)
WHERE attempt_id = $1 AND status IN ('preparing', 'running')
RETURNING 1
"""
# The next span sequence id of attempt $2 ('latest': the rollout's latest) of rollout $1.
NEXT_SPAN_SEQ = """
UPDATE agl_attempts SET next_span_seq = next_span_seq + 1
WHERE rollout_id = $1 AND attempt_id = CASE WHEN $2 = 'latest'
    THEN (SELECT latest_attempt_id FROM agl_rollouts WHERE rollout_id = $1) ELSE $2 END
RETURNING next_span_seq - 1
"""
RAISE_SPAN_SEQ = (
    "UPDATE agl_attempts SET next_span_seq = GREATEST(next_span_seq, $2 + 1) WHERE attempt_id = $1"
)

# ------------------------------------------------------------------------------------ watchdog
DUE_ROLLOUTS = """
SELECT DISTINCT rollout_id FROM (
    SELECT rollout_id FROM agl_attempts WHERE deadline <= $1 ORDER BY deadline LIMIT $2
) due
"""
DUE_ATTEMPTS = (
    f"SELECT {ATTEMPT_COLS} FROM agl_attempts WHERE rollout_id = $1 AND deadline <= $2 ORDER BY sequence_id"
)
NEXT_DEADLINE = "SELECT min(deadline) FROM agl_attempts WHERE deadline IS NOT NULL"

# ------------------------------------------------------------------------------------ spans
# A span ($3: its JSON, $4: its sequence id) of a *running* attempt $2 of rollout $1 at $5: stored
# and counted as a heartbeat in one statement. No row: not running or unknown (the locked path).
# A sequence id $4 of 0 (AUTO_SEQUENCE_ID) takes the attempt's next one. Returns the span's
# sequence id; no row: not running or unknown (the locked path).
ADD_SPAN_FAST = """
WITH a AS (
    UPDATE agl_attempts SET last_heartbeat_time = $5,
        next_span_seq = CASE WHEN $4 = 0 THEN next_span_seq + 1 ELSE GREATEST(next_span_seq, $4 + 1) END,
        deadline = LEAST(start_time + timeout_s, $5 + unresponsive_s)
    WHERE attempt_id = $2 AND rollout_id = $1 AND status = 'running'
    RETURNING sequence_id, CASE WHEN $4 = 0 THEN next_span_seq - 1 ELSE $4 END AS span_seq
)
INSERT INTO agl_spans (rollout_id, attempt_id, attempt_seq, sequence_id, data)
SELECT $1, $2, a.sequence_id, a.span_seq, $3 FROM a
RETURNING sequence_id
"""
INSERT_SPANS = """
INSERT INTO agl_spans (rollout_id, attempt_id, attempt_seq, sequence_id, data)
SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::bigint[], $5::text[])
"""
DELETE_ATTEMPT_SPANS = "DELETE FROM agl_spans WHERE attempt_id = $1"
# Spans are read as (data, sequence_id): the column holds the sequence id (a span added with 0 was
# numbered by the store after its JSON was written).
SPANS_OF_ROLLOUT = (
    "SELECT data, sequence_id FROM agl_spans WHERE rollout_id = $1 ORDER BY attempt_seq, sequence_id, id"
)
SPANS_OF_ATTEMPT = """
SELECT data, sequence_id FROM agl_spans WHERE rollout_id = $1 AND attempt_id = $2 ORDER BY sequence_id, id
"""
SPANS_OF_LATEST_ATTEMPT = """
SELECT s.data, s.sequence_id FROM agl_spans s
JOIN agl_rollouts r ON r.rollout_id = s.rollout_id AND r.latest_attempt_id = s.attempt_id
WHERE s.rollout_id = $1 ORDER BY s.sequence_id, s.id
"""

# ------------------------------------------------------------------------------------ resources
EXISTING_RESOURCES = "SELECT resources_id FROM agl_resources WHERE resources_id = ANY($1::text[])"
GET_RESOURCES = f"SELECT {RESOURCES_COLS} FROM agl_resources WHERE resources_id = $1"
LATEST_RESOURCES = f"SELECT {RESOURCES_COLS} FROM agl_resources ORDER BY touched DESC LIMIT 1"
QUERY_RESOURCES = f"SELECT {RESOURCES_COLS} FROM agl_resources ORDER BY seq"
INSERT_RESOURCES = f"""
INSERT INTO agl_resources (resources_id, resources, create_time, update_time, version, touched)
VALUES ($1, $2, $3, $3, 1, nextval('agl_resources_touch_seq'))
RETURNING {RESOURCES_COLS}
"""
UPDATE_RESOURCES = f"""
UPDATE agl_resources SET resources = $2, update_time = $3, version = version + 1,
    touched = nextval('agl_resources_touch_seq')
WHERE resources_id = $1
RETURNING {RESOURCES_COLS}
"""

# ------------------------------------------------------------------------------------ workers
GET_WORKER = f"SELECT {WORKER_COLS} FROM agl_workers WHERE worker_key = $1"
QUERY_WORKERS = f"""
SELECT {WORKER_COLS} FROM agl_workers
WHERE ($1::text[] IS NULL OR status = ANY($1::text[])) ORDER BY seq
"""
WORKER_BUSY = """
INSERT INTO agl_workers AS w (worker_key, status, last_busy_time, current_rollout_id, current_attempt_id,
                              last_dequeue_time)
VALUES ($1, 'busy', $2, $3, $4, $5)
ON CONFLICT (worker_key) DO UPDATE SET
    status = 'busy', last_busy_time = EXCLUDED.last_busy_time,
    current_rollout_id = EXCLUDED.current_rollout_id, current_attempt_id = EXCLUDED.current_attempt_id,
    last_dequeue_time = COALESCE(EXCLUDED.last_dequeue_time, w.last_dequeue_time)
"""
# Release worker $1 from attempt $4 (status $2 at $3), unless it has moved on to another attempt.
WORKER_RELEASE = """
INSERT INTO agl_workers AS w (worker_key, status, last_idle_time) VALUES ($1, $2, $3)
ON CONFLICT (worker_key) DO UPDATE SET
    status = EXCLUDED.status, last_idle_time = EXCLUDED.last_idle_time,
    current_rollout_id = NULL, current_attempt_id = NULL
WHERE w.current_attempt_id IS NULL OR w.current_attempt_id = $4
"""
WORKER_IDLE_DEQUEUE = """
INSERT INTO agl_workers AS w (worker_key, status, last_dequeue_time) VALUES ($1, 'idle', $2)
ON CONFLICT (worker_key) DO UPDATE SET
    last_dequeue_time = EXCLUDED.last_dequeue_time,
    status = CASE WHEN w.current_attempt_id IS NULL THEN 'idle' ELSE w.status END
"""
UPSERT_WORKER_HEARTBEAT = f"""
INSERT INTO agl_workers AS w (worker_key, last_heartbeat_time, heartbeat_stats) VALUES ($1, $2, $3)
ON CONFLICT (worker_key) DO UPDATE SET
    last_heartbeat_time = EXCLUDED.last_heartbeat_time,
    heartbeat_stats = COALESCE(EXCLUDED.heartbeat_stats, w.heartbeat_stats)
RETURNING {WORKER_COLS}
"""

# ------------------------------------------------------------------------------------ statistics
STATISTICS = """
SELECT 'rollouts' AS kind, status, count(*) AS n FROM agl_rollouts GROUP BY status
UNION ALL SELECT 'attempts', status, count(*) FROM agl_attempts GROUP BY status
UNION ALL SELECT 'workers', status, count(*) FROM agl_workers GROUP BY status
UNION ALL SELECT 'spans', NULL, count(*) FROM agl_spans
UNION ALL SELECT 'resources', NULL, count(*) FROM agl_resources
UNION ALL SELECT 'queue', NULL, count(*) FROM agl_rollouts WHERE queue_pos IS NOT NULL
"""
