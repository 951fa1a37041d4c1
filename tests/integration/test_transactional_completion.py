"""ctx.transaction(): a handler's own writes and its job's completion in one commit."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import (
    assert_histories_valid,
    claim_one,
    fast_settings,
    fetch,
    running_worker,
    wait_until,
)
from pgjobs import db
from pgjobs.client import Client
from pgjobs.context import JobContext
from pgjobs.errors import LeaseLostError
from pgjobs.events import EVENTS_CHANNEL, parse_events_channel
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.txcomplete import TransactionalCompletion
from pgjobs.types import EventType, Job, JobStatus

CHARGES = "CREATE TABLE public.charges (job_id uuid NOT NULL, attempt int NOT NULL)"
INSERT_CHARGE = "INSERT INTO public.charges (job_id, attempt) VALUES (%s, %s)"


@pytest.fixture
async def charges(dsn: str) -> None:
    """The application's table, in the same database as the queue."""
    await fetch(dsn, CHARGES)


async def _status(client: Client, job_id: object, status: JobStatus) -> bool:
    return (await client.get("acme", job_id)).status is status  # type: ignore[arg-type]


async def _event_kinds(client: Client, job_id: Any) -> list[tuple[EventType, int, str | None]]:
    return [(e.type, e.attempt, e.worker_id) for e in await client.events("acme", job_id)]


async def _xmins(dsn: str, job_id: Any) -> tuple[set[int], set[int], set[int]]:
    """The transactions that wrote the charge rows, the job row and the done event."""
    charge = await fetch(dsn, "SELECT xmin::text::bigint AS x FROM public.charges")
    job = await fetch(
        dsn, "SELECT xmin::text::bigint AS x FROM pgjobs.job_rows WHERE id = %s", [job_id]
    )
    done = await fetch(
        dsn,
        "SELECT xmin::text::bigint AS x FROM pgjobs.job_events "
        "WHERE job_id = %s AND type = 'content_job.done'",
        [job_id],
    )
    return {r["x"] for r in charge}, {r["x"] for r in job}, {r["x"] for r in done}


async def test_handler_writes_and_done_commit_in_one_transaction(
    dsn: str, client: Client, storage_dir: Path, charges: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgjobs")
    registry = Registry()

    @registry.handler("charge")
    async def charge(ctx: JobContext) -> None:
        async with ctx.transaction(result={"charged": ctx.input["cents"]}) as conn:
            await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
        assert ctx.completed

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {EVENTS_CHANNEL}")
        job = await client.enqueue("acme", "charge", {"cents": 500})
        async with running_worker(dsn, registry, fast_settings(storage_dir)) as worker:
            await wait_until(lambda: _status(client, job.id, JobStatus.DONE), message="done")
            await wait_until(
                lambda: asyncio.sleep(0, result=not worker._running), message="job let go"
            )
        # Everything was committed before this point, so its NOTIFYs are waiting here.
        # The claim rang (the worker's doorbell); the handler's own transaction, which
        # does not ask for the doorbell, carried its done item in its commit.
        published = [
            (e.type, e.status)
            async for note in listener.notifies(timeout=2.0)
            if isinstance(parsed := parse_events_channel(note.payload), list)
            for e in parsed
            if e.job_id == job.id
        ]
    assert published[-1] == ("content_job.done", "done"), "the done event was published"
    done = await client.get("acme", job.id)
    assert done.result == {"charged": 500}
    charge_x, job_x, done_x = await _xmins(dsn, job.id)
    assert len(charge_x) == 1
    assert charge_x == job_x == done_x, "one transaction wrote all three"
    assert await _event_kinds(client, job.id) == [
        (EventType.QUEUED, 0, None),
        (EventType.RUNNING, 1, worker.id),
        (EventType.DONE, 1, worker.id),
    ]
    # The completer did not try to write the job again (it would find it lost).
    assert "result discarded" not in caplog.text
    assert "lease lost" not in caplog.text
    assert await assert_histories_valid(dsn) == 1


async def test_sync_handler_completes_in_its_transaction(
    dsn: str, client: Client, storage_dir: Path, charges: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgjobs")
    registry = Registry()

    @registry.handler("charge")
    def charge(ctx: JobContext) -> None:
        with ctx.transaction_sync(result={"charged": True}) as conn:
            conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))

    job = await client.enqueue("acme", "charge", {})
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, job.id, JobStatus.DONE), message="done")
    assert (await client.get("acme", job.id)).result == {"charged": True}
    charge_x, job_x, done_x = await _xmins(dsn, job.id)
    assert len(charge_x) == 1
    assert charge_x == job_x == done_x
    assert "result discarded" not in caplog.text
    assert await assert_histories_valid(dsn) == 1


async def test_a_block_that_raises_rolls_back_and_the_job_retries(
    dsn: str, client: Client, storage_dir: Path, charges: None
) -> None:
    registry = Registry()

    @registry.handler("charge")
    async def charge(ctx: JobContext) -> None:
        async with ctx.transaction(result={"attempt": ctx.attempt}) as conn:
            await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
            if ctx.attempt == 1:
                raise RuntimeError("payment provider said 503")

    job = await client.enqueue("acme", "charge", {})
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, job.id, JobStatus.DONE), message="done")
    assert (await client.get("acme", job.id)).result == {"attempt": 2}
    rows = await fetch(dsn, "SELECT job_id, attempt FROM public.charges")
    assert rows == [{"job_id": job.id, "attempt": 2}], "attempt 1's insert was rolled back"
    assert [k[:2] for k in await _event_kinds(client, job.id)] == [
        (EventType.QUEUED, 0),
        (EventType.RUNNING, 1),
        (EventType.RETRYING, 1),
        (EventType.RUNNING, 2),
        (EventType.DONE, 2),
    ]


async def test_a_fenced_stale_attempt_leaves_none_of_its_writes(
    dsn: str, client: Client, storage_dir: Path, charges: None, caplog: pytest.LogCaptureFixture
) -> None:
    """Attempt 1 is inside its block when its lease expires and attempt 2 (the "fresh"
    worker) claims the job. When attempt 1's block ends, its guarded completion matches no
    row: LeaseLostError, its insert rolls back, nothing is recorded for it. Attempt 2 then
    completes in its own transaction: one row, one done event, attempt 2's."""
    caplog.set_level(logging.INFO, logger="pgjobs")
    inside, release = asyncio.Event(), asyncio.Event()
    raised: list[BaseException] = []
    registry = Registry()

    @registry.handler("charge")
    async def charge(ctx: JobContext) -> None:
        try:
            async with ctx.transaction(result={"attempt": ctx.attempt}) as conn:
                await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
                inside.set()
                await release.wait()
        except BaseException as exc:
            raised.append(exc)
            raise

    job = await client.enqueue("acme", "charge", {})
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    # No heartbeat before the test is done: it would find the lease gone and stop the
    # handler first, which also rolls back, but is not what this test is about.
    settings = fast_settings(storage_dir, heartbeat_seconds=600.0, lease_seconds=900.0)
    async with running_worker(dsn, registry, settings, worker_id="stale") as worker:
        await asyncio.wait_for(inside.wait(), timeout=20)
        # The lease runs out (time as an input) and another attempt takes the job; run_at
        # an hour ahead keeps the stale worker's own claims from taking it back.
        await fetch(dsn, QUERIES["job_rescue_expired"], {"now": later, "limit": 10})
        fresh = Job.from_row(await claim_one(dsn, "fresh", now=later))
        assert fresh.attempts == 2
        release.set()
        await wait_until(lambda: asyncio.sleep(0, result=not worker._running), message="let go")
    assert len(raised) == 1, raised
    assert isinstance(raised[0], LeaseLostError), raised
    assert "job was not completed by this attempt" in str(raised[0])
    assert await fetch(dsn, "SELECT * FROM public.charges") == [], "the stale insert rolled back"
    assert (await client.get("acme", job.id)).status is JobStatus.RUNNING  # attempt 2's

    pool = await db.open_pool(dsn, min_size=1, max_size=2, name="fresh")
    try:
        completion = TransactionalCompletion(fresh, pool, dsn)
        async with completion.transaction(result={"attempt": 2}) as conn:
            await conn.execute(INSERT_CHARGE, (fresh.id, fresh.attempts))
    finally:
        await pool.close()
    assert completion.committed
    rows = await fetch(dsn, "SELECT job_id, attempt FROM public.charges")
    assert rows == [{"job_id": job.id, "attempt": 2}]
    assert await _event_kinds(client, job.id) == [
        (EventType.QUEUED, 0, None),
        (EventType.RUNNING, 1, "stale"),
        (EventType.RETRYING, 1, "stale"),  # the rescue
        (EventType.RUNNING, 2, "fresh"),
        (EventType.DONE, 2, "fresh"),  # one done event; nothing recorded for attempt 1
    ]
    assert "will retry" not in caplog.text, "the lost attempt is not logged as a failure"
    assert "this worker no longer holds the job" in caplog.text
    assert await assert_histories_valid(dsn) == 1


async def test_a_transaction_is_used_once_per_attempt(
    dsn: str, client: Client, storage_dir: Path, charges: None
) -> None:
    registry = Registry()
    errors: list[str] = []

    @registry.handler("charge")
    async def charge(ctx: JobContext) -> None:
        async with ctx.transaction() as conn:
            await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
        try:
            async with ctx.transaction():
                pass
        except RuntimeError as exc:
            errors.append(str(exc))

    job = await client.enqueue("acme", "charge", {})
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, job.id, JobStatus.DONE), message="done")
        await wait_until(lambda: asyncio.sleep(0, result=bool(errors)), message="second use")
    assert "already used by this attempt" in errors[0]
    assert len(await fetch(dsn, "SELECT * FROM public.charges")) == 1


async def test_the_heartbeat_does_not_stop_a_handler_after_its_job_completed(
    dsn: str, client: Client, storage_dir: Path, charges: None, caplog: pytest.LogCaptureFixture
) -> None:
    """After the block the job is done, not running: a heartbeat then finds no lease to
    renew, which for a job still running would mean "lost, stop the handler". The handler
    finishes what follows its block undisturbed."""
    caplog.set_level(logging.INFO, logger="pgjobs")
    committed, release = asyncio.Event(), asyncio.Event()
    after: list[str] = []
    registry = Registry()

    @registry.handler("charge")
    async def charge(ctx: JobContext) -> None:
        async with ctx.transaction() as conn:
            await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
        committed.set()
        await release.wait()
        after.append("cleaned up")

    async def heartbeat_at() -> Any:
        rows = await fetch(dsn, "SELECT last_heartbeat_at FROM pgjobs.workers")
        return rows[0]["last_heartbeat_at"]

    job = await client.enqueue("acme", "charge", {})
    async with running_worker(dsn, registry, fast_settings(storage_dir)) as worker:
        await asyncio.wait_for(committed.wait(), timeout=20)
        # Two heartbeats after the commit: the second began after the job was done.
        for _ in range(2):
            seen = await heartbeat_at()
            await wait_until(lambda seen=seen: _later(heartbeat_at(), seen), message="heartbeat")
        release.set()
        await wait_until(lambda: asyncio.sleep(0, result=not worker._running), message="let go")
    assert after == ["cleaned up"]
    assert "stopping handler" not in caplog.text
    assert (await client.get("acme", job.id)).status is JobStatus.DONE


async def _later(value: Any, than: Any) -> bool:
    return bool(await value > than)


async def test_a_block_longer_than_the_pools_use_limit_still_commits(
    dsn: str, client: Client, storage_dir: Path, charges: None
) -> None:
    """The worker's pool takes a connection used longer than PGJOBS_DB_USE_TIMEOUT_SECONDS
    for half-open and replaces it; a handler's own transaction is exempt: its length is
    the handler's."""
    registry = Registry()

    @registry.handler("slow_charge")
    async def slow_charge(ctx: JobContext) -> None:
        async with ctx.transaction(result={"ok": True}) as conn:
            await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
            await asyncio.sleep(1.5)  # the handler's work, past the 0.5 s use limit

    settings = fast_settings(storage_dir, db_use_timeout_seconds=0.5, lease_seconds=30.0)
    job = await client.enqueue("acme", "slow_charge", max_attempts=1)
    async with running_worker(dsn, registry, settings):
        await wait_until(
            lambda: _status(client, job.id, JobStatus.DONE),
            message="done (failed if the use limit cut the block)",
        )
    assert (await client.get("acme", job.id)).result == {"ok": True}
    assert len(await fetch(dsn, "SELECT * FROM public.charges")) == 1
