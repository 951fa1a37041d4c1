"""bench.enqueue_rows prices a row by adding one: its variants must still apply to the
schema and write what they say, a second audit row per job just like pgjobs' own (with
the same indexes, or all but the company stream's), or one row per statement and
company."""

from __future__ import annotations

import psycopg
import pytest
from bench.enqueue_rows import VARIANTS
from psycopg import sql

from helpers import fetch
from pgjobs.client import RING_FROM_JOBS, Client
from pgjobs.jobspec import JobSpec

JOBS = RING_FROM_JOBS + 50  # a chunked call: more than one statement


async def _enqueue(dsn: str, setup: str) -> list[JobSpec]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(setup))  # type: ignore[arg-type]
    specs = [JobSpec(("acme", "beta")[i % 3 == 0], "echo") for i in range(JOBS)]
    async with await Client.connect(dsn, max_size=1) as client:
        await client.enqueue_many(specs)
    return specs


async def _indexes(dsn: str, table: str) -> list[str]:
    rows = await fetch(
        dsn,
        "SELECT regexp_replace(indexdef, '^.* USING ', '') AS def FROM pg_indexes "
        "WHERE schemaname = 'pgjobs' AND tablename = %s ORDER BY 1",
        [table],
    )
    return [r["def"] for r in rows]


@pytest.mark.parametrize("variant", ["+ audit row", "+ audit row, no company index"])
async def test_a_second_audit_row_per_job_as_pgjobs_writes_its_own(dsn: str, variant: str) -> None:
    setup = VARIANTS[variant]
    assert setup is not None
    await _enqueue(dsn, setup)
    columns = "job_id, company_id, seq, type, status, attempt, worker_id, payload, xid"
    ours = await fetch(dsn, f"SELECT {columns} FROM pgjobs.job_events ORDER BY job_id")
    copy = await fetch(dsn, f"SELECT {columns} FROM pgjobs.bench_events ORDER BY job_id")
    assert len(ours) == JOBS
    assert copy == ours
    indexes = await _indexes(dsn, "job_events")
    if variant == "+ audit row, no company index":
        indexes.remove("btree (company_id, xid, id)")
    assert await _indexes(dsn, "bench_events") == indexes


async def test_a_row_per_statement_and_company(dsn: str) -> None:
    setup = VARIANTS["+ row per statement"]
    assert setup is not None
    specs = await _enqueue(dsn, setup)
    rows = await fetch(
        dsn,
        "SELECT company_id, count(*) AS statements, sum(jobs) AS jobs, "
        "count(DISTINCT xid) AS transactions FROM pgjobs.bench_batches GROUP BY 1 ORDER BY 1",
    )
    assert [(r["company_id"], r["jobs"], r["transactions"]) for r in rows] == [
        (c, sum(s.company_id == c for s in specs), 1) for c in ("acme", "beta")
    ]
    assert all(r["statements"] > 1 for r in rows)  # one per chunk
