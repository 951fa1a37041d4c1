"""How a worker overlaps handlers with the commits that record them (issue 4's throughput
work): a handler's slot frees when it returns, not when its completion commits, and a
completion that cannot be written fails loudly instead of hanging its job."""

from __future__ import annotations

import asyncio
import gc
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import claim_one, fast_settings, fetch, finish_params, running_worker, wait_until
from pgjobs import db, doorbell, gcpolicy, rescuer
from pgjobs import worker as worker_module
from pgjobs.assets import GeneratedAsset, StoredAsset
from pgjobs.client import Client
from pgjobs.completer import Completer, Outcome
from pgjobs.context import JobContext
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES, compact, positional
from pgjobs.registry import Registry
from pgjobs.storage import LocalStorage
from pgjobs.types import (
    EventType,
    Job,
    JobStatus,
    Progress,
    claimed_jobs,
    job_rows,
    job_status,
)
from pgjobs.worker import CLAIMS_IN_FLIGHT, MAX_CLAIM_BATCH, Worker


async def test_next_job_starts_while_previous_completion_waits_for_its_commit(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    first = await client.enqueue("acme", "step", {"name": "first"}, priority=1)
    second = await client.enqueue("acme", "step", {"name": "second"})
    started: list[str] = []
    release_first = asyncio.Event()
    registry = Registry()

    @registry.handler("step")
    async def step(ctx: JobContext) -> None:
        started.append(ctx.input["name"])
        if ctx.input["name"] == "first":
            await release_first.wait()

    async def has_started(name: str) -> bool:
        return name in started

    settings = fast_settings(storage_dir, concurrency=1)
    async with running_worker(dsn, registry, settings):
        await wait_until(lambda: has_started("first"), message="first handler started")
        # Hold the first job's queue row (where a running job's state is, sql/0021) so its
        # completion cannot commit, then let its handler return: the single slot must go
        # to the second job right away.
        async with await psycopg.AsyncConnection.connect(dsn) as blocker:
            await blocker.execute(
                "SELECT 1 FROM pgjobs.job_queue WHERE job_id = %s FOR UPDATE", [first.id]
            )
            release_first.set()
            await wait_until(
                lambda: has_started("second"), within=20, message="second handler started"
            )
            assert (await client.get("acme", first.id)).status is JobStatus.RUNNING
            await blocker.rollback()

        async def both_done() -> bool:
            jobs = [await client.get("acme", j.id) for j in (first, second)]
            return all(j.status is JobStatus.DONE for j in jobs)

        await wait_until(both_done, message="both jobs done")
    assert started == ["first", "second"]


async def test_concurrency_bounds_handlers_and_held_jobs(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    in_handler = 0
    most_in_handler = 0
    most_held = 0
    registry = Registry()
    worker_box: list[Worker] = []

    @registry.handler("tick")
    async def tick(ctx: JobContext) -> None:
        nonlocal in_handler, most_in_handler, most_held
        in_handler += 1
        try:
            most_in_handler = max(most_in_handler, in_handler)
            most_held = max(most_held, len(worker_box[0]._running))
            await asyncio.sleep(0.002)
        finally:
            in_handler -= 1

    async def all_done() -> bool:
        rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
        return bool(rows[0]["n"] == 150)

    async with running_worker(dsn, registry, fast_settings(storage_dir, concurrency=3)) as w:
        worker_box.append(w)  # before any job exists: handlers read it
        await client.enqueue_many(JobSpec("acme", "tick") for _ in range(150))
        await wait_until(all_done, message="150 jobs done")
    assert most_in_handler == 3
    retried = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE attempts <> 1")
    assert retried[0]["n"] == 0, "every job ran once, no handler failed"
    assert most_held <= 6  # handlers plus completions waiting for their commit


async def test_a_completion_that_cannot_be_written_fails_its_handler_instead_of_hanging(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    job = await client.enqueue("acme", "echo")
    pool = await db.open_pool(dsn, min_size=1, max_size=2, name="test-completer")
    batches: list[list[Outcome]] = []
    completer = Completer(
        pool, LocalStorage(storage_dir), flush_interval=0, on_batch=batches.append
    )

    async def broken_write(batch: list[Outcome]) -> dict[object, str]:
        raise RuntimeError("statement refused")

    completer._write = broken_write  # type: ignore[method-assign,assignment]
    recorded: asyncio.Future[bool | Exception] = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(completer.run())
    try:
        outcome = Outcome(job, "done", on_recorded=recorded.set_result)
        completer.submit(outcome)
        result = await asyncio.wait_for(recorded, timeout=10)
        assert isinstance(result, RuntimeError)
        assert str(result) == "statement refused"
        # The worker hears of the batch too (and lets its jobs go), written or not.
        assert batches == [[outcome]]
    finally:
        completer.close()
        await asyncio.wait_for(runner, timeout=10)
        await pool.close()


async def test_job_rows_decode_to_the_jobs_from_row_builds(dsn: str, client: Client) -> None:
    """Whole job rows (enqueue_many's) decode with job_rows (tuples, columns found by
    name) instead of dicts and Job.from_row; both must give the same Job for every kind
    of row."""
    await client.enqueue("acme", "echo", {"text": "queued"}, source_task_id="task-1", priority=3)
    for _ in range(3):
        await client.enqueue("acme", "echo", {"n": [1, 2]})
    with_progress = await claim_one(dsn, "w1")
    await fetch(
        dsn,
        QUERIES["job_progress_if_leased"],
        {
            "id": with_progress["id"],
            "lease_token": with_progress["lease_token"],
            "fraction": 0.5,
            "message": "half",
            "now": None,
        },
    )
    finish = QUERIES["job_finish_many_if_leased"]
    await fetch(dsn, finish, finish_params(await claim_one(dsn, "w1")))
    await fetch(dsn, finish, finish_params(await claim_one(dsn, "w1"), "fail"))
    async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
        query = "SELECT * FROM pgjobs.jobs ORDER BY created_at, id"
        expected = [Job.from_row(row) for row in await (await conn.execute(query)).fetchall()]
        cur = conn.cursor(row_factory=job_rows)
        await cur.execute(query)
        decoded = await cur.fetchall()
    assert decoded == expected
    assert {job.status for job in decoded} == {
        JobStatus.QUEUED,
        JobStatus.RUNNING,
        JobStatus.DONE,
        JobStatus.FAILED,
    }
    assert Progress(0.5, "half") in [job.progress for job in decoded]
    assert "task-1" in [job.source_task_id for job in decoded]


# The claim's own time (None: the database's now), and the lease: one ending across the
# end of daylight saving time in the session's zone (01:59:50 EDT + 30 s is 01:00:20 EST,
# not 02:00:20), a lease that is not a whole number of microseconds (rounded up).
CLAIM_TIMES = [(None, 30.0), (datetime(2027, 11, 7, 5, 59, 50, tzinfo=UTC), 30.0000007)]


@pytest.mark.parametrize(("now", "lease_seconds"), CLAIM_TIMES)
@pytest.mark.parametrize("query", ["job_claim_batch", "job_claim_batch_limited"])
async def test_a_claimed_job_is_its_row_as_the_claim_left_it(
    dsn: str, client: Client, query: str, now: datetime | None, lease_seconds: float
) -> None:
    """Both claims return only the columns the worker reads (types.CLAIMED_COLUMNS), and
    the worker fills in what the claim itself set (status, worker_id, progress,
    updated_at, lease_expires_at): the Jobs it hands to handlers must equal Job.from_row
    of the whole rows, for a first attempt and for a retry that carries its last error,
    in a session whose time zone has daylight saving time."""
    await client.enqueue("acme", "echo", {"text": "é", "n": [1, 2.5, None]}, source_task_id="t")
    retried = await client.enqueue("globex", "echo", priority=2)
    first = await claim_one(dsn, "w0")
    assert first["id"] == retried.id
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(first, "error"))
    await fetch(dsn, "UPDATE pgjobs.jobs SET run_at = now() WHERE id = %s", [retried.id])
    params = {
        "now": now, "limit": 10, "worker_id": "w1", "lease_seconds": lease_seconds,
        "job_types": None, "after_company": None, "count_running": True,
    }  # fmt: skip
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET TimeZone = 'America/New_York'")
        cur = conn.cursor(
            row_factory=lambda c: claimed_jobs(
                [d.name for d in c.description or ()], "w1", lease_seconds
            )
        )
        await cur.execute(QUERIES[query], params)
        claimed = await cur.fetchall()
        # Read in the same zone: Python never finds a time in a fold (01:00:20 EST, the
        # second 01:00:20 that night) equal to one in another zone (PEP 495).
        read = conn.cursor(row_factory=dict_row)
        await read.execute(
            "SELECT * FROM pgjobs.jobs WHERE id = ANY(%s)", [[j.id for j in claimed]]
        )
        rows = await read.fetchall()
    assert sorted(claimed, key=str) == sorted((Job.from_row(r) for r in rows), key=str)
    assert len(claimed) == 2
    again = next(job for job in claimed if job.id == retried.id)
    assert (again.attempts, again.error_message) == (2, "boom")
    if now is not None:  # the lease ends in the second 01:00 hour of that night
        assert again.lease_expires_at is not None
        assert again.lease_expires_at.fold == 1
        ends = datetime(2027, 11, 7, 6, 0, 20, 1, tzinfo=UTC)
        assert again.lease_expires_at.astimezone(UTC) == ends


async def test_job_rows_names_the_columns_a_result_lacks(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = conn.cursor(row_factory=job_rows)
        with pytest.raises(TypeError, match=r"no column\(s\) company_id, job_type"):
            await cur.execute("SELECT id FROM pgjobs.jobs")


def test_job_status_reads_known_values_and_refuses_others() -> None:
    assert job_status("running") is JobStatus.RUNNING
    with pytest.raises(ValueError, match="'paused' is not a valid JobStatus"):
        job_status("paused")


async def test_one_batch_records_results_errors_and_assets_side_by_side(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """The completer sends an array that holds only NULLs as one NULL (the statement reads
    each by position): a batch mixing outcomes must still record each one as given."""
    jobs = [await client.enqueue("acme", "echo") for _ in range(4)]
    claimed = [await claim_one(dsn, "w1") for _ in jobs]
    pool = await db.open_pool(dsn, min_size=1, max_size=2, name="test-completer")
    completer = Completer(pool, LocalStorage(storage_dir), flush_interval=0)
    as_jobs = [Job.from_row(row) for row in claimed]
    asset = StoredAsset(
        id=uuid.uuid4(),
        key="acme/report.txt",
        content_type="text/plain",
        byte_size=5,
        sha256="0" * 64,
        filename="report.txt",
    )
    outcomes = [
        Outcome(as_jobs[0], "done", result={"words": 3}),
        Outcome(as_jobs[1], "done"),
        Outcome(as_jobs[2], "done", result={"file": True}, asset=asset),
        Outcome(as_jobs[3], "fail", error="refused"),
    ]
    try:
        statuses = ["done", "done", "done", "failed"]
        # By the text of their ids (as the completer looks them up).
        assert await completer._write(outcomes) == {
            str(job.id): status for job, status in zip(as_jobs, statuses, strict=True)
        }
        only_nulls = [await client.enqueue("acme", "echo")]
        bare = Job.from_row(await claim_one(dsn, "w1"))
        assert bare.id == only_nulls[0].id
        assert await completer._write([Outcome(bare, "done")]) == {str(bare.id): "done"}
    finally:
        await pool.close()
    rows = {
        row["id"]: row
        for row in await fetch(
            dsn, "SELECT id, status, result, error_message, result_asset_id FROM pgjobs.jobs"
        )
    }
    assert rows[as_jobs[0].id]["result"] == {"words": 3}
    assert rows[as_jobs[1].id]["result"] is None
    assert rows[as_jobs[2].id]["result_asset_id"] == asset.id
    assert rows[as_jobs[3].id]["status"] == "failed"
    assert rows[as_jobs[3].id]["error_message"] == "refused"
    assert rows[bare.id]["status"] == "done"
    assert [a["id"] for a in await fetch(dsn, "SELECT id FROM pgjobs.assets")] == [asset.id]


async def test_the_batch_literals_are_read_back_exactly(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """The completer writes ids, lease tokens, outcomes and retry delays as array literals
    (finish_params): PostgreSQL reads each back as the worker had it, a retry delay that
    is not a round number of microseconds included (rounded as make_interval rounds).
    A written batch is handed to on_batch once its outcomes are resolved (here the same
    batch again, whose leases are gone by then)."""
    for _ in range(3):
        await client.enqueue("acme", "echo", max_attempts=3)
    claimed = [Job.from_row(await claim_one(dsn, "w1")) for _ in range(3)]
    delay = 0.1 + 0.2  # 0.30000000000000004
    outcomes = [
        Outcome(claimed[0], "error", error="boom", retry_delay=delay),
        Outcome(claimed[1], "done"),
        Outcome(claimed[2], "fail", error="refused"),
    ]
    pool = await db.open_pool(dsn, min_size=1, max_size=2, name="test-completer")
    batches: list[list[Outcome]] = []
    try:
        completer = Completer(
            pool, LocalStorage(storage_dir), flush_interval=0, on_batch=batches.append
        )
        finished = await completer._write(outcomes)
        assert batches == []  # _write only writes
        await completer._write_batch(outcomes)  # the same batch again: every lease lost
        assert batches == [outcomes]
        assert [o.recorded for o in outcomes] == [True] * 3
    finally:
        await pool.close()
    assert finished == {
        str(claimed[0].id): "queued",
        str(claimed[1].id): "done",
        str(claimed[2].id): "failed",
    }
    (retried,) = await fetch(
        dsn, "SELECT run_at, updated_at FROM pgjobs.jobs WHERE id = %s", [claimed[0].id]
    )
    assert retried["run_at"] - retried["updated_at"] == timedelta(microseconds=300_000)


@pytest.mark.parametrize(("concurrency", "most"), [(200, 1), (400, CLAIMS_IN_FLIGHT)])
async def test_a_second_claim_goes_out_only_as_a_whole_batch_and_each_job_runs_once(
    dsn: str, client: Client, storage_dir: Path, concurrency: int, most: int
) -> None:
    """A claim asks for all the free slots up to MAX_CLAIM_BATCH; a second one goes out
    while another is out only for a whole MAX_CLAIM_BATCH: with 200 slots, one claim at a
    time; with 400, two of 200 (a claim of 100 costs PostgreSQL more per job than one of
    200). Reserving slots at send time keeps every job claimed once."""
    registry = Registry()

    @registry.handler("tick")
    async def tick(ctx: JobContext) -> None:
        await asyncio.sleep(ctx.job.id.int % 10 / 1000)  # slots free one by one

    await client.enqueue_many(JobSpec("acme", "tick") for _ in range(1000))
    settings = fast_settings(storage_dir, concurrency=concurrency)
    worker = Worker(dsn, registry, settings, burst=True)
    claim = worker._claim
    asked: list[tuple[int, int]] = []  # (limit, claims already out when it was sent)
    in_flight = most_in_flight = 0

    async def slow_claim(limit: int) -> list[Job]:
        nonlocal in_flight, most_in_flight
        asked.append((limit, in_flight))
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await asyncio.sleep(0.02)  # a claim that takes a while, as under load
            return await claim(limit)
        finally:
            in_flight -= 1

    worker._claim = slow_claim  # type: ignore[method-assign]
    await asyncio.wait_for(worker.run(), timeout=60)
    assert most_in_flight == most
    assert asked[0] == (MAX_CLAIM_BATCH, 0)
    assert MAX_CLAIM_BATCH == 200
    assert max(limit for limit, _ in asked) == 200
    assert all(limit == MAX_CLAIM_BATCH for limit, out in asked if out)
    rows = await fetch(dsn, "SELECT status, attempts, count(*) AS n FROM pgjobs.jobs GROUP BY 1, 2")
    assert rows == [{"status": "done", "attempts": 1, "n": 1000}]


async def test_the_claim_goes_numbered_on_a_raw_cursor(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker sends its claim's text already numbered (queries.positional) on a raw
    cursor, so psycopg does not convert its ~13,000 characters again on every claim; the
    values go in the numbers' order."""
    sent: list[tuple[Any, Any]] = []
    execute = psycopg.AsyncRawCursor.execute

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        sent.append((query, params))
        return await execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.AsyncRawCursor, "execute", recording)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        pass

    job = await client.enqueue("acme", "echo")
    worker = Worker(dsn, registry, fast_settings(storage_dir), burst=True)
    await asyncio.wait_for(worker.run(), timeout=60)
    assert worker.ran == [job.id]
    text, names = positional(compact(doorbell.ringing(QUERIES["job_claim_batch"])))
    claims = [params for query, params in sent if query == text]
    assert claims, "the claim went on a raw cursor"
    first = dict(zip(names, claims[0], strict=True))
    assert (first["worker_id"], first["job_types"], first["after_company"]) == (
        worker.id,
        ["echo"],
        None,
    )


@pytest.mark.parametrize(("setting", "prepared"), [("auto", True), ("off", None)])
async def test_the_claim_is_prepared_at_its_first_run_on_a_connection(
    dsn: str,
    client: Client,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    prepared: bool | None,
) -> None:
    """Issue 16: PostgreSQL plans the claim ~10 times on each connection before it keeps
    a plan (psycopg's 5 unprepared runs, then the plan cache's 5 custom plans), ~2-4 ms
    each; four worker processes have four times the connections, each running a quarter
    of the claims, and planned the claim 191 times in a 100,000-job drain where one
    process planned it 45 times. So the claim is prepared at its first run on a
    connection (``prepare=True``), unless statements are not prepared at all (through a
    pooler, PGJOBS_PREPARED_STATEMENTS=off: psycopg's default, None)."""
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", setting)
    asked: list[Any] = []
    execute = psycopg.AsyncRawCursor.execute

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        asked.append((query, kwargs.get("prepare")))
        return await execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.AsyncRawCursor, "execute", recording)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        pass

    job = await client.enqueue("acme", "echo")
    worker = Worker(dsn, registry, fast_settings(storage_dir), burst=True)
    await asyncio.wait_for(worker.run(), timeout=60)
    assert worker.ran == [job.id]
    text, _ = positional(compact(doorbell.ringing(QUERIES["job_claim_batch"])))
    claims = [prepare for query, prepare in asked if query == text]
    assert claims, "the claim went on a raw cursor"
    assert set(claims) == {prepared}


@pytest.mark.parametrize(("setting", "mode"), [("auto", "force_generic_plan"), ("off", "auto")])
async def test_the_workers_connections_plan_a_prepared_statement_once(
    dsn: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch, setting: str, mode: str
) -> None:
    """Issue 16: a prepared statement got five custom plans per connection before the plan
    cache kept a generic one (the claim ~2-4 ms each, ~100 plans at four processes). The
    worker's connections force generic plans where they prepare statements; with prepared
    statements off (or through a pooler, where the session setting would stay on the
    server connection for the next client) the setting is left alone, and other pools
    (clients, the gateway) keep PostgreSQL's default."""
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", setting)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        pass

    async with running_worker(dsn, registry, fast_settings(storage_dir)) as worker:
        assert worker._pool is not None
        async with worker._pool.connection() as conn:
            row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
        assert row is not None
        assert row["plan_cache_mode"] == mode
    async with await db.open_pool(dsn, max_size=1) as pool, pool.connection() as conn:
        row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
    assert row is not None
    assert row["plan_cache_mode"] == "auto"


async def test_a_handlers_transaction_plans_as_the_server_says(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """The worker's pool forces generic plans for its own statements; a handler's
    ctx.transaction() block runs on that pool, and its statements are planned as the
    server's setting says (here PostgreSQL's default, auto), not forced generic."""
    registry = Registry()
    seen: list[str] = []

    @registry.handler("plans")
    async def plans(ctx: JobContext) -> None:
        async with ctx.transaction() as conn:
            row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
            assert row is not None
            seen.append(row["plan_cache_mode"])

    job = await client.enqueue("acme", "plans")

    async def done() -> bool:
        return (await client.get("acme", job.id)).status.value == "done"

    async with running_worker(dsn, registry, fast_settings(storage_dir)) as worker:
        await wait_until(done, within=30, message="the job done")
        assert worker._pool is not None
        async with worker._pool.connection() as conn:
            row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
    assert row is not None
    assert row["plan_cache_mode"] == "force_generic_plan"
    assert seen == ["auto"]


@pytest.mark.parametrize(("setting", "prepared"), [("auto", True), ("off", None)])
async def test_the_completion_is_prepared_at_its_first_run_on_a_connection(
    dsn: str,
    client: Client,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str,
    prepared: bool | None,
) -> None:
    """The completer's statement (doorbell.execute) is prepared at its first run on a
    connection that prepares statements, as the claim is: before, each connection planned
    it at its first five runs (~180 plans in a 100,000-job drain at four processes)."""
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", setting)
    asked: list[Any] = []
    execute = psycopg.AsyncCursor.execute

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        asked.append((query, kwargs.get("prepare")))
        return await execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", recording)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        pass

    job = await client.enqueue("acme", "echo")
    worker = Worker(dsn, registry, fast_settings(storage_dir), burst=True)
    await asyncio.wait_for(worker.run(), timeout=60)
    assert worker.ran == [job.id]
    finish = QUERIES["job_finish_many_if_leased"]
    texts = {compact(finish), compact(doorbell.ringing(finish))}
    finishes = [prepare for query, prepare in asked if query in texts]
    assert finishes, "the completion went through doorbell.execute"
    assert set(finishes) == {prepared}


async def test_the_claims_row_maker_is_made_once_per_result_shape(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every claim's result has the same columns: the worker makes its Job maker once
    (worker._claim_shape), not per claim."""
    made: list[list[str]] = []

    def counting(names: list[str], worker_id: str, lease_seconds: float) -> Any:
        made.append(names)
        return claimed_jobs(names, worker_id, lease_seconds)

    monkeypatch.setattr(worker_module, "claimed_jobs", counting)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        pass

    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(5))
    # Claims of one job at a time: five claims with a job, then one that finds none.
    settings = fast_settings(storage_dir, concurrency=1)
    worker = Worker(dsn, registry, settings, burst=True)
    claims = 0
    claim = worker._claim

    async def counted(limit: int) -> tuple[list[Job], list[str] | None]:
        nonlocal claims
        claims += 1
        return await claim(limit)

    worker._claim = counted  # type: ignore[method-assign]
    await asyncio.wait_for(worker.run(), timeout=60)
    assert len(worker.ran) == 5
    assert claims >= 6
    assert len(made) == 1
    assert "after_company" in made[0]


async def test_each_claimed_job_starts_with_its_id_text_read_from_the_claims_result(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """The claim hands each job's id as PostgreSQL wrote it (_ClaimNote.id_texts) to
    _start, which keys the job, its rings and its finish by it: the same text as
    str(job.id), for every job of every claim, so no job is made its text again."""
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        pass

    await client.enqueue_many(JobSpec(f"co{i % 3}", "echo") for i in range(25))
    worker = Worker(dsn, registry, fast_settings(storage_dir, concurrency=10), burst=True)
    started: list[tuple[uuid.UUID, str]] = []
    start = worker._start

    def recording(job: Job, id_text: str) -> str:
        started.append((job.id, id_text))
        return start(job, id_text)

    worker._start = recording  # type: ignore[method-assign]
    await asyncio.wait_for(worker.run(), timeout=60)
    assert len(started) == 25
    assert [text for _, text in started] == [str(job_id) for job_id, _ in started]
    done = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
    assert done[0]["n"] == 25


async def test_a_worker_that_owns_its_process_collects_young_objects_less_often(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """tune_gc: the young generation is collected after gcpolicy.WORKER_YOUNG_GC_AFTER
    objects, not CPython's 700 (a claim's jobs set off several collections at 700)."""
    registry = Registry()
    thresholds: list[int] = []

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        thresholds.append(gc.get_threshold()[0])

    await client.enqueue("acme", "echo")
    before = gc.get_threshold()
    try:
        worker = Worker(dsn, registry, fast_settings(storage_dir), burst=True, tune_gc=True)
        await asyncio.wait_for(worker.run(), timeout=60)
    finally:
        gc.unfreeze()  # process-wide: give the rest of the test run CPython's defaults
        gc.set_threshold(*before)
    assert len(thresholds) == 1
    assert thresholds[0] > 700
    assert thresholds == [gcpolicy.WORKER_YOUNG_GC_AFTER]


async def test_a_claim_that_fails_unexpectedly_stops_the_worker_with_its_error(
    dsn: str, storage_dir: Path
) -> None:
    """Claims run as tasks: an error that is not a lost connection must still end the
    worker's run (as it did when the claim ran inline), not vanish into a task."""
    worker = Worker(dsn, Registry(), fast_settings(storage_dir), burst=True)

    async def broken_claim(limit: int) -> list[Job]:
        raise RuntimeError("claim statement refused")

    worker._claim = broken_claim  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="claim statement refused"):
        await asyncio.wait_for(worker.run(), timeout=30)


async def test_an_attempt_that_lost_its_job_leaves_neither_a_result_nor_a_file(
    dsn: str, client: Client, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker's half of fencing, deterministically: the job is rescued while attempt
    1's handler runs (the rescue pass is given a clock past the lease), then the handler
    returns a generated file. The completion matches no row, so the result is dropped
    and the stored file deleted: the job stays queued for attempt 2 with no asset."""
    job = await client.enqueue("acme", "render")
    started, release = asyncio.Event(), asyncio.Event()
    registry = Registry()

    @registry.handler("render")
    async def render(ctx: JobContext) -> GeneratedAsset:
        started.set()
        await release.wait()
        return GeneratedAsset(b"attempt 1", "out.txt", result={"attempt": ctx.attempt})

    async def is_set() -> bool:
        return started.is_set()

    async def discarded() -> bool:
        return "attempt 1: result discarded" in caplog.text

    # No heartbeat or rescue of its own during the test: only the one below moves the job.
    settings = fast_settings(
        storage_dir, heartbeat_seconds=30, lease_seconds=60, rescue_interval_seconds=30
    )
    caplog.set_level("WARNING", logger="pgjobs.completer")
    async with running_worker(dsn, registry, settings):
        await wait_until(is_set, message="attempt 1 started")
        later = datetime.now(UTC) + timedelta(seconds=120)
        rescued = await rescuer.rescue_expired_with(dsn, now=later)
        assert [j.id for j in rescued] == [job.id]
        release.set()
        await wait_until(discarded, message="attempt 1's result discarded")
    after = await client.get("acme", job.id)
    assert (after.status, after.attempts, after.result) == (JobStatus.QUEUED, 1, None)
    assert after.result_asset_id is None
    assert await fetch(dsn, "SELECT id FROM pgjobs.assets") == []
    assert await asyncio.to_thread(_files, storage_dir) == [], "the file was deleted"
    events = [e.type for e in await client.events("acme", job.id)]
    assert events == [EventType.QUEUED, EventType.RUNNING, EventType.RETRYING]


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]
