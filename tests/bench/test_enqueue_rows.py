"""bench.enqueue_rows prices a row by adding one: its variants must still apply to the
schema and write what they say, a second audit row per job just like pgjobs' own (with
the same indexes, or all but the company stream's), or one row per statement and
company. Its COPY variant must write what enqueue_many writes."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import psycopg
import pytest
from bench.enqueue_rows import VARIANTS, copy_many
from psycopg import sql

from helpers import fetch
from pgjobs import db
from pgjobs.client import RING_FROM_JOBS, Client
from pgjobs.jobspec import JobSpec, new_job_id
from pgjobs.types import Job

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


async def test_copy_writes_what_enqueue_many_writes(dsn: str) -> None:
    awkward = "tab\there\nline \\ back\\slash \r 'q' \"dq\" é"
    specs = [
        JobSpec(awkward if i % 2 else "acme", "echo" if i % 3 else awkward,
                {"text": awkward, "n": i, "list": [1, 2.5, None]} if i % 4 else None,
                source_task_id=awkward if i % 5 == 0 else None, priority=i % 7 - 3,
                run_at=dt.datetime(2030, 1, 1, i % 24, tzinfo=dt.UTC) if i % 6 == 0 else None,
                max_attempts=i % 4 + 1)
        for i in range(JOBS)
    ]  # fmt: skip
    twins = [replace(s, id=new_job_id()) for s in specs]
    async with await db.connect(dsn) as conn:
        copied = await copy_many(conn, specs)
    async with await Client.connect(dsn, max_size=1) as client:
        inserted = await client.enqueue_many(twins)
    rows = await fetch(dsn, "SELECT * FROM pgjobs.jobs WHERE id = ANY(%s)", [[s.id for s in specs]])
    stored = {r["id"]: Job.from_row(r) for r in rows}
    assert copied == [stored[s.id] for s in specs]  # the Jobs it returns are what it stored

    def same(job: Job) -> tuple[object, ...]:  # all but the id and the transaction's time
        run_at = None if job.run_at == job.created_at else job.run_at
        return (job.company_id, job.job_type, job.status, job.input, job.priority, run_at,
                job.attempts, job.max_attempts, job.source_task_id, job.event_seq)  # fmt: skip

    assert [same(j) for j in copied] == [same(j) for j in inserted]
    events = await fetch(
        dsn,
        "SELECT job_id, company_id, seq, type, status, payload FROM pgjobs.job_events"
        " WHERE job_id = ANY(%s)",
        [[s.id for s in specs]],
    )
    assert sorted((e["job_id"], e["company_id"], e["seq"], e["type"]) for e in events) == sorted(
        (s.id, s.company_id, 1, "content_job.queued") for s in specs
    )
