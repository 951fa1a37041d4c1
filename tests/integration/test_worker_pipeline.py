"""How a worker overlaps handlers with the commits that record them (issue 4's throughput
work): a handler's slot frees when it returns, not when its completion commits, and a
completion that cannot be written fails loudly instead of hanging its job."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import claim_one, fast_settings, fetch, finish_params, running_worker, wait_until
from pgjobs import db, rescuer
from pgjobs.assets import GeneratedAsset, StoredAsset
from pgjobs.client import Client
from pgjobs.completer import Completer, Outcome
from pgjobs.context import JobContext
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES
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
        # Hold the first job's queue row (where a running job's state is, sql/0020) so its
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
    completer = Completer(pool, LocalStorage(storage_dir), flush_interval=0)

    async def broken_write(batch: list[Outcome]) -> dict[object, str]:
        raise RuntimeError("statement refused")

    completer._write = broken_write  # type: ignore[method-assign,assignment]
    recorded: asyncio.Future[bool | Exception] = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(completer.run())
    try:
        completer.submit(Outcome(job, "done", on_recorded=recorded.set_result))
        result = await asyncio.wait_for(recorded, timeout=10)
        assert isinstance(result, RuntimeError)
        assert str(result) == "statement refused"
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


@pytest.mark.parametrize("query", ["job_claim_batch", "job_claim_batch_limited"])
async def test_a_claimed_job_is_its_row_as_the_claim_left_it(
    dsn: str, client: Client, query: str
) -> None:
    """Both claims return only the columns the worker reads (types.CLAIMED_COLUMNS), and
    the worker fills in what the claim itself set (status, worker_id, progress,
    updated_at): the Jobs it hands to handlers must equal Job.from_row of the whole rows,
    for a first attempt and for a retry that carries its last error."""
    await client.enqueue("acme", "echo", {"text": "é", "n": [1, 2.5, None]}, source_task_id="t")
    retried = await client.enqueue("globex", "echo", priority=2)
    first = await claim_one(dsn, "w0")
    assert first["id"] == retried.id
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(first, "error"))
    await fetch(dsn, "UPDATE pgjobs.jobs SET run_at = now() WHERE id = %s", [retried.id])
    params = {
        "now": None, "limit": 10, "worker_id": "w1", "lease_seconds": 30.0, "job_types": None,
        "after_company": None, "count_running": True,
    }  # fmt: skip
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(
            row_factory=lambda c: claimed_jobs([d.name for d in c.description or ()], "w1")
        )
        await cur.execute(QUERIES[query], params)
        claimed = await cur.fetchall()
    rows = await fetch(
        dsn, "SELECT * FROM pgjobs.jobs WHERE id = ANY(%s)", [[j.id for j in claimed]]
    )
    assert sorted(claimed, key=str) == sorted((Job.from_row(r) for r in rows), key=str)
    assert len(claimed) == 2
    again = next(job for job in claimed if job.id == retried.id)
    assert (again.attempts, again.error_message) == (2, "boom")


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
        assert await completer._write(outcomes) == {
            job.id: status for job, status in zip(as_jobs, statuses, strict=True)
        }
        only_nulls = [await client.enqueue("acme", "echo")]
        bare = Job.from_row(await claim_one(dsn, "w1"))
        assert bare.id == only_nulls[0].id
        assert await completer._write([Outcome(bare, "done")]) == {bare.id: "done"}
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


async def test_one_claim_is_out_at_a_time_for_all_free_slots_and_each_job_runs_once(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """A worker sends one claim at a time (CLAIMS_IN_FLIGHT), asking for all its free
    slots up to MAX_CLAIM_BATCH: two claims out at once walk the same head of the queue,
    the second skipping every row the first locked. Reserving slots at send time keeps
    every job claimed once."""
    registry = Registry()

    @registry.handler("tick")
    async def tick(ctx: JobContext) -> None:
        await asyncio.sleep(0)

    await client.enqueue_many(JobSpec("acme", "tick") for _ in range(1000))
    worker = Worker(dsn, registry, fast_settings(storage_dir, concurrency=300), burst=True)
    claim = worker._claim
    asked: list[int] = []
    in_flight = most_in_flight = 0

    async def slow_claim(limit: int) -> list[Job]:
        nonlocal in_flight, most_in_flight
        asked.append(limit)
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await asyncio.sleep(0.02)  # a claim that takes a while, as under load
            return await claim(limit)
        finally:
            in_flight -= 1

    worker._claim = slow_claim  # type: ignore[method-assign]
    await asyncio.wait_for(worker.run(), timeout=60)
    assert most_in_flight == CLAIMS_IN_FLIGHT == 1
    assert asked[0] == MAX_CLAIM_BATCH == 200  # 300 slots free, one claim of at most 200
    assert max(asked) == 200
    rows = await fetch(dsn, "SELECT status, attempts, count(*) AS n FROM pgjobs.jobs GROUP BY 1, 2")
    assert rows == [{"status": "done", "attempts": 1, "n": 1000}]


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
