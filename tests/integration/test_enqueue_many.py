"""enqueue_many sends its columns as binary-format arrays and builds the Jobs it returns
from what it sent and the time the statement stored: what comes back is what a later read
of each job says, in the specs' order, for the values a text-format array would have had
to quote (and for arrays that are all NULL), through the pool and through a caller's
connection with its own row type and time zone.

A batch of RING_FROM_JOBS or more through the pool goes in chunks, pipelined in one
transaction: the first chunk reaches the server before the caller's iterable is asked for
the next spec, the Jobs are still what reads say, a unique key in a later chunk still gets
its holder, and a failure in the last chunk (a bad row, or the iterable raising) leaves
none of the call's jobs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import psycopg
import pytest

from helpers import fetch
from pgjobs.client import CHUNK_MAX, RING_FROM_JOBS, Client, spec_chunks
from pgjobs.errors import InvalidJobError
from pgjobs.jobspec import INT32, JobSpec, new_job_id
from pgjobs.sync import SyncClient
from pgjobs.types import Job

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


def _many_specs(n: int) -> list[JobSpec]:
    """n specs cycling through _specs()'s awkward values (each with an id of its own)."""
    shapes = _specs()
    return [replace(shapes[i % len(shapes)], id=new_job_id()) for i in range(n)]


async def _stored(dsn: str, ids: list[object]) -> dict[object, Job]:
    rows = await fetch(dsn, "SELECT * FROM pgjobs.jobs WHERE id = ANY(%s)", [ids])
    return {r["id"]: Job.from_row(r) for r in rows}


def test_a_large_batch_is_cut_into_growing_chunks() -> None:
    sizes = [len(c) for c in spec_chunks(iter(range(5 * CHUNK_MAX)))]
    assert sizes[0] == RING_FROM_JOBS
    assert sizes[1] == 2 * RING_FROM_JOBS
    assert max(sizes) == CHUNK_MAX
    assert sum(sizes) == 5 * CHUNK_MAX
    assert [len(c) for c in spec_chunks([])] == []


async def test_a_chunked_batch_returns_what_is_stored(dsn: str, client: Client) -> None:
    specs = _many_specs(RING_FROM_JOBS * 3 + 7)  # three chunks, the last one short
    jobs = await client.enqueue_many(iter(specs))
    assert [j.id for j in jobs] == [s.id for s in specs]
    stored = await _stored(dsn, [s.id for s in specs])
    assert jobs == [stored[s.id] for s in specs]
    assert len({j.created_at for j in jobs}) == 1  # one transaction

    sync_specs = _many_specs(RING_FROM_JOBS + 1)

    def enqueue() -> list[Job]:
        with SyncClient(dsn) as sync_client:
            return sync_client.enqueue_many(iter(sync_specs))

    sync_jobs = await asyncio.to_thread(enqueue)
    stored = await _stored(dsn, [s.id for s in sync_specs])
    assert sync_jobs == [stored[s.id] for s in sync_specs]


async def test_columns_all_jobs_share_are_stored_for_each(dsn: str, client: Client) -> None:
    """A column whose values are all equal goes as one value: every job still gets it, and
    a column that differs in one job only still goes whole."""
    run_at = datetime(2030, 1, 1, tzinfo=UTC)
    same = JobSpec("acme", "render", {"a": [1, "é"]}, "task-1", 5, run_at, 7)
    odd = JobSpec("acme", "render", {"a": 2}, None, -5, None, 1)
    for shapes in ([same] * 40, [same] * 20 + [odd] + [same] * 20, [same], [odd]):
        batch = [replace(s, id=new_job_id()) for s in shapes]
        jobs = await client.enqueue_many(batch)
        stored = await _stored(dsn, [s.id for s in batch])
        assert jobs == [stored[s.id] for s in batch]
        assert [
            (j.input, j.source_task_id, j.priority, j.run_at, j.max_attempts) for j in jobs
        ] == [
            (s.input, s.source_task_id, s.priority, s.run_at or j.created_at, s.max_attempts)
            for s, j in zip(batch, jobs, strict=True)
        ]
        assert all(j.input is not jobs[0].input for j in jobs[1:]), "an input dict per Job"


async def test_the_first_chunk_is_sent_before_the_next_spec_is_asked_for(
    dsn: str, client: Client
) -> None:
    """The server inserts a chunk while the caller's iterable builds the next: when the
    iterable is asked for the spec after the first chunk, another session already sees
    the enqueue's transaction holding its insert lock on pgjobs.job_rows (sql/0021)."""
    seen_inserting: list[bool] = []

    def inserting() -> bool:
        with psycopg.connect(dsn, autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'pgjobs.job_rows'::regclass"
                " AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()"
            ).fetchone()
            return row is not None and row[0] > 0

    def specs() -> Iterator[JobSpec]:
        for n in range(RING_FROM_JOBS * 2):
            if n == RING_FROM_JOBS:
                # Polled with a deadline (the generator runs on the event loop, so a
                # blocking wait): only a first chunk not yet sent keeps this false.
                deadline = time.monotonic() + 15
                while not inserting() and time.monotonic() < deadline:
                    time.sleep(0.02)
                seen_inserting.append(inserting())
            yield JobSpec("acme", "echo", {"n": n})

    jobs = await client.enqueue_many(specs())
    assert seen_inserting == [True]
    assert len(jobs) == RING_FROM_JOBS * 2


async def test_a_bad_row_in_the_last_chunk_leaves_no_job(dsn: str, client: Client) -> None:
    specs = [JobSpec("acme", "echo", {"n": n}) for n in range(RING_FROM_JOBS * 3 + 10)]
    specs[-1] = JobSpec("acme", "echo", id=specs[0].id)  # the first chunk's id again
    assert len(list(spec_chunks(specs))) == 3
    with pytest.raises(psycopg.errors.UniqueViolation):
        await client.enqueue_many(iter(specs))
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_events")
    assert rows[0]["n"] == 0
    assert await _stored(dsn, [s.id for s in specs]) == {}
    # The pool's connection is usable again.
    assert len(await client.enqueue_many(iter(specs[:-1]))) == len(specs) - 1


async def test_an_iterable_failing_in_the_last_chunk_leaves_no_job(
    dsn: str, client: Client
) -> None:
    made: list[JobSpec] = []

    def specs() -> Iterator[JobSpec]:
        for n in range(RING_FROM_JOBS * 3):
            made.append(JobSpec("acme", "echo", {"n": n}))
            yield made[-1]
        yield JobSpec("acme", "")  # InvalidJobError: job_type is required

    with pytest.raises(InvalidJobError, match="job_type is required"):
        await client.enqueue_many(specs())

    def sync_enqueue() -> None:
        with SyncClient(dsn) as sync_client:
            sync_client.enqueue_many(specs())

    with pytest.raises(InvalidJobError, match="job_type is required"):
        await asyncio.to_thread(sync_enqueue)
    assert len(made) == RING_FROM_JOBS * 6
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs")
    assert rows[0]["n"] == 0


async def test_a_unique_key_in_a_later_chunk_gets_its_holder(dsn: str, client: Client) -> None:
    holder = await client.enqueue("acme", "render", unique_key="video-42")
    specs = [JobSpec("acme", "echo", {"n": n}) for n in range(RING_FROM_JOBS + 5)]
    specs.append(JobSpec("acme", "render", unique_key="video-42"))
    specs.append(JobSpec("acme", "render", unique_key="video-43"))
    specs.append(JobSpec("acme", "echo"))
    jobs = await client.enqueue_many(iter(specs))
    assert [j.created for j in jobs] == [True] * (len(specs) - 3) + [False, True, True]
    assert jobs[-3] == holder
    created = [s.id for s in specs if s.unique_key != "video-42"]
    stored = await _stored(dsn, created)
    assert [j for j in jobs if j.created] == [stored[i] for i in created]
