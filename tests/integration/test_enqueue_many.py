"""enqueue_many sends its columns as binary-format arrays and builds the Jobs it returns
from what it sent and the time the statement stored: what comes back is what a later read
of each job says, in the specs' order, for the values a text-format array would have had
to quote (and for arrays that are all NULL), through the pool and through a caller's
connection with its own row type and time zone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import psycopg

from pgjobs.client import Client
from pgjobs.jobspec import INT32, JobSpec
from pgjobs.sync import SyncClient

# Values a text array literal quotes or reads specially: NULL, braces, commas, quotes,
# backslashes, spaces, and non-ASCII text.
AWKWARD = ["NULL", "{a,b}", 'say "hi"', "back\\slash", " spaced ", "ünïcødé ✓"]


def _specs() -> list[JobSpec]:
    specs = [
        JobSpec(
            company,
            f"type {company}",
            {"text": company, "nested": {"list": [1, 2.5, None, True]}, "n": i},
            source_task_id=company if i % 2 else None,
            priority=(INT32, -INT32, 0, 1)[i % 4],
            run_at=datetime(2030, 1, 1, i, tzinfo=UTC) if i % 3 else None,
            max_attempts=i + 1,
        )
        for i, company in enumerate(AWKWARD)
    ]
    # Columns that are NULL for every job of a batch.
    specs.append(JobSpec("acme", "plain"))
    return specs


async def test_enqueue_many_returns_what_is_stored_in_spec_order(dsn: str, client: Client) -> None:
    specs = _specs()
    jobs = await client.enqueue_many(specs)
    assert [j.id for j in jobs] == [s.id for s in specs]
    for spec, job in zip(specs, jobs, strict=True):
        assert (job.company_id, job.job_type, job.input, job.source_task_id) == (
            spec.company_id,
            spec.job_type,
            spec.input,
            spec.source_task_id,
        )
        assert (job.priority, job.max_attempts) == (spec.priority, spec.max_attempts)
        assert job.run_at == (spec.run_at or job.created_at)
        assert job == await client.get(spec.company_id, spec.id)

    alone = await client.enqueue_many([JobSpec("acme", "plain")])  # every array all NULL
    assert alone[0] == await client.get("acme", alone[0].id)


async def test_enqueue_many_on_a_callers_connection_keeps_its_row_type(
    dsn: str, client: Client
) -> None:
    specs = _specs()
    # Tuple rows, not autocommit: the enqueue joins the caller's transaction.
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        jobs = await client.enqueue_many(specs, conn=conn)
        assert (await (await conn.execute("SELECT 1")).fetchone()) == (1,)
    assert jobs == [await client.get(s.company_id, s.id) for s in specs]


async def test_sync_enqueue_many_returns_what_is_stored(dsn: str, client: Client) -> None:
    specs = _specs()

    def enqueue() -> list[object]:
        with SyncClient(dsn) as sync_client:
            return list(sync_client.enqueue_many(specs))

    jobs = await asyncio.to_thread(enqueue)
    assert jobs == [await client.get(s.company_id, s.id) for s in specs]


async def test_enqueue_many_shows_times_in_the_sessions_time_zone_as_a_read_does(
    dsn: str, client: Client
) -> None:
    """The Jobs are built, not read back: their times still come in the session's time
    zone, so the API's JSON of a job is the same text as a later read's."""
    specs = _specs()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET TIME ZONE 'Asia/Kolkata'")
        jobs = await client.enqueue_many(specs, conn=conn)
        read = [await client.get(s.company_id, s.id, conn=conn) for s in specs]
    assert jobs == read
    assert [(j.to_json(), j.run_at.isoformat()) for j in jobs] == [
        (j.to_json(), j.run_at.isoformat()) for j in read
    ]
    assert jobs[1].run_at.isoformat().endswith("+05:30")  # a spec's run_at, given in UTC
