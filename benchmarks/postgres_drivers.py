"""Benchmark: asyncpg against psycopg 3 on the statement shapes of the PostgreSQL store — the
measurement behind its choice of driver.

    python benchmarks/postgres_drivers.py [--n 3000] [--repeat 2]

Needs asyncpg (the store's driver) and, for the comparison, ``psycopg[binary]`` and
``psycopg-pool`` (not dependencies of agl-async: install them to rerun this). A throwaway
cluster is started (``tests/throwaway_postgres.py``), each driver gets a fresh database per
repetition, and both use prepared statements (psycopg: ``prepare_threshold=0``). Prints JSON:

* ``select_us``: one ``SELECT`` by primary key (a getter);
* ``transaction_us``: BEGIN, ``SELECT … FOR UPDATE``, ``UPDATE``, COMMIT (a locked status change);
* ``one_statement_us``: one ``UPDATE … RETURNING`` + ``INSERT`` in a CTE (the store's fast paths);
* ``bulk_rows_per_s``: 20,000 rows inserted with one ``INSERT … SELECT FROM unnest(arrays)``;
* ``pool16_transactions_per_s``: 16 tasks running the locked transaction over a pool of 8.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from throwaway_postgres import PostgresCluster

SETUP = """
CREATE TABLE r (id text PRIMARY KEY, status text, data text, n int DEFAULT 0);
INSERT INTO r SELECT 'ro-' || i, 'queuing', '{"a":1}', 0 FROM generate_series(1, 5000) i;
CREATE TABLE s (id bigserial PRIMARY KEY, rid text, seq int, data text);
"""
CTE = (
    "WITH u AS (UPDATE r SET n = n + 1 WHERE id = {0} RETURNING id) "
    "INSERT INTO s (rid, seq, data) SELECT id, {1}, {2} FROM u RETURNING id"
)


async def bench_asyncpg(dsn: str, n: int) -> dict[str, float]:
    import asyncpg

    out: dict[str, float] = {}
    conn = await asyncpg.connect(dsn)
    await conn.execute(SETUP)
    t = time.perf_counter()
    for i in range(n):
        await conn.fetchrow("SELECT id, status, data FROM r WHERE id = $1", f"ro-{i % 5000 + 1}")
    out["select_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(n):
        async with conn.transaction():
            row = await conn.fetchrow("SELECT id, n FROM r WHERE id = $1 FOR UPDATE", f"ro-{i % 5000 + 1}")
            await conn.execute(
                "UPDATE r SET n = $2, status = 'running' WHERE id = $1", row["id"], row["n"] + 1
            )
    out["transaction_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(n):
        await conn.fetchval(CTE.format("$1", "$2", "$3"), f"ro-{i % 5000 + 1}", i, '{"x":1}')
    out["one_statement_us"] = (time.perf_counter() - t) / n * 1e6
    rows = [(f"ro-{i}", i, json.dumps({"attr": i, "name": "span"})) for i in range(20000)]
    t = time.perf_counter()
    await conn.execute(
        "INSERT INTO s (rid, seq, data) SELECT * FROM unnest($1::text[], $2::int[], $3::text[])",
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    )
    out["bulk_rows_per_s"] = len(rows) / (time.perf_counter() - t)
    await conn.close()
    pool = await asyncpg.create_pool(dsn, min_size=8, max_size=8)

    async def worker(k: int) -> None:
        for i in range(n // 16):
            async with pool.acquire() as c, c.transaction():
                row = await c.fetchrow(
                    "SELECT id, n FROM r WHERE id = $1 FOR UPDATE", f"ro-{(k * 1000 + i) % 5000 + 1}"
                )
                await c.execute("UPDATE r SET n = $2 WHERE id = $1", row["id"], row["n"] + 1)

    t = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(16)))
    out["pool16_transactions_per_s"] = (n // 16 * 16) / (time.perf_counter() - t)
    await pool.close()
    return out


async def bench_psycopg(dsn: str, n: int) -> dict[str, float]:
    import psycopg
    import psycopg_pool

    out: dict[str, float] = {}
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, prepare_threshold=0)
    await conn.execute(SETUP, prepare=False)
    t = time.perf_counter()
    for i in range(n):
        cur = await conn.execute("SELECT id, status, data FROM r WHERE id = %s", (f"ro-{i % 5000 + 1}",))
        await cur.fetchone()
    out["select_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(n):
        async with conn.transaction():
            cur = await conn.execute("SELECT id, n FROM r WHERE id = %s FOR UPDATE", (f"ro-{i % 5000 + 1}",))
            row: Any = await cur.fetchone()
            await conn.execute("UPDATE r SET n = %s, status = 'running' WHERE id = %s", (row[1] + 1, row[0]))
    out["transaction_us"] = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(n):
        cur = await conn.execute(CTE.format("%s", "%s", "%s"), (f"ro-{i % 5000 + 1}", i, '{"x":1}'))
        await cur.fetchone()
    out["one_statement_us"] = (time.perf_counter() - t) / n * 1e6
    rows = [(f"ro-{i}", i, json.dumps({"attr": i, "name": "span"})) for i in range(20000)]
    t = time.perf_counter()
    await conn.execute(
        "INSERT INTO s (rid, seq, data) SELECT * FROM unnest(%s::text[], %s::int[], %s::text[])",
        ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
    )
    out["bulk_rows_per_s"] = len(rows) / (time.perf_counter() - t)
    await conn.close()
    pool = psycopg_pool.AsyncConnectionPool(
        dsn, min_size=8, max_size=8, open=False, kwargs={"autocommit": True, "prepare_threshold": 0}
    )
    await pool.open(wait=True)

    async def worker(k: int) -> None:
        for i in range(n // 16):
            async with pool.connection() as c, c.transaction():
                cur = await c.execute(
                    "SELECT id, n FROM r WHERE id = %s FOR UPDATE", (f"ro-{(k * 1000 + i) % 5000 + 1}",)
                )
                row: Any = await cur.fetchone()
                await c.execute("UPDATE r SET n = %s WHERE id = %s", (row[1] + 1, row[0]))

    t = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(16)))
    out["pool16_transactions_per_s"] = (n // 16 * 16) / (time.perf_counter() - t)
    await pool.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="operations per figure")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions (A B A B …); the best is kept")
    args = parser.parse_args()
    drivers = {"asyncpg": bench_asyncpg}
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401

        drivers["psycopg"] = bench_psycopg
    except ImportError:
        print("psycopg[binary] / psycopg-pool not installed: measuring asyncpg only", file=sys.stderr)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in drivers}
    with PostgresCluster() as cluster:
        for _ in range(args.repeat):
            for name, bench in drivers.items():
                runs[name].append(asyncio.run(bench(cluster.create_database(), args.n)))
    best = {
        name: {
            key: round((min if key.endswith("_us") else max)(r[key] for r in results), 1)
            for key in results[0]
        }
        for name, results in runs.items()
    }
    print(
        json.dumps(
            {"benchmark": "postgres_drivers", "n": args.n, "repeat": args.repeat, "best": best, "runs": runs},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
