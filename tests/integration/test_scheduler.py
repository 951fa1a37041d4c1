"""Periodic jobs on PostgreSQL: each slot enqueued once across workers, catch-up on
start-up, declared and run-time schedules (pgjobs.scheduler, sql/0012_schedules.sql).

Time is an input (``Scheduler.tick(now=...)``) except in the test of running workers,
whose schedule fires every second and whose conditions are polled with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from bouncer import Bouncer
from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db, scheduler
from pgjobs.context import JobContext
from pgjobs.jobspec import new_job_id
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.scheduler import Scheduler
from pgjobs.schedules import SLOT_INPUT_KEY, Schedule

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


@contextlib.asynccontextmanager
async def pools(dsn: str, n: int) -> AsyncIterator[list[AsyncConnectionPool[db.AsyncConn]]]:
    opened = [await db.open_pool(dsn, min_size=1, max_size=2, name=f"sched-{i}") for i in range(n)]
    try:
        yield opened
    finally:
        for pool in opened:
            await pool.close()


async def add(dsn: str, schedule: Schedule, now: datetime = T0) -> None:
    async with await db.connect(dsn) as conn:
        await scheduler.add(conn, schedule, now=now)


async def slot_rows(dsn: str) -> list[dict[str, object]]:
    return await fetch(
        dsn, "SELECT schedule_name, slot_at, job_id FROM pgjobs.schedule_slots ORDER BY slot_at"
    )


async def jobs_of(dsn: str, job_type: str) -> list[dict[str, object]]:
    return await fetch(
        dsn,
        "SELECT id, input, company_id FROM pgjobs.jobs WHERE job_type = %s ORDER BY id",
        [job_type],
    )


async def test_three_schedulers_enqueue_each_slot_once(dsn: str) -> None:
    await add(dsn, Schedule("every-5", "*/5 * * * *", "report", "acme", {"kind": "5m"}))
    async with pools(dsn, 3) as opened:
        schedulers = [Scheduler(pool, {}) for pool in opened]
        # Three workers look at the same moments: 09:05:01, 09:10:01, ... 09:30:01.
        for minute in range(5, 35, 5):
            now = T0 + timedelta(minutes=minute, seconds=1)
            await asyncio.gather(*(s.tick(now=now) for s in schedulers))
            await asyncio.gather(*(s.tick(now=now) for s in schedulers))  # and again
        enqueued = [job for s in schedulers for job in s.enqueued]

    jobs = await jobs_of(dsn, "report")
    assert sorted(j["id"] for j in jobs) == sorted(enqueued)  # type: ignore[type-var]
    slots = sorted(str(j["input"][SLOT_INPUT_KEY]) for j in jobs)  # type: ignore[index]
    assert slots == [(T0 + timedelta(minutes=m)).isoformat() for m in range(5, 35, 5)]
    assert all(j["input"]["kind"] == "5m" for j in jobs)  # type: ignore[index]
    rows = await slot_rows(dsn)
    assert [r["job_id"] for r in rows] == [
        next(j["id"] for j in jobs if j["input"][SLOT_INPUT_KEY] == s)  # type: ignore[index]
        for s in slots
    ]
    # Each enqueue is audited like any other: one queued event per job.
    events = await fetch(
        dsn, "SELECT job_id, type FROM pgjobs.job_events WHERE job_id = ANY(%s)", [enqueued]
    )
    assert sorted(e["job_id"] for e in events) == sorted(enqueued)  # type: ignore[type-var]
    assert {e["type"] for e in events} == {"content_job.queued"}


async def test_the_slot_key_is_the_lock_between_concurrent_workers(dsn: str) -> None:
    """Worker B records the slot worker A has recorded but not yet committed: B waits
    on A's key, then records nothing. (The staleness guard alone cannot see A's row.)"""
    await add(dsn, Schedule("every-5", "*/5 * * * *", "report", "acme"))
    slot = T0 + timedelta(minutes=5)
    params = {
        "name": "every-5",
        "slot_at": slot,
        "company_id": "acme",
        "job_type": "report",
        "input": "{}",
        "priority": 0,
        "max_attempts": 3,
        "now": None,
    }
    query = QUERIES["schedule_slot_record_once"]
    async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as a:
        first = await (await a.execute(query, {**params, "job_id": new_job_id()})).fetchone()
        assert first is not None
        assert first["recorded"]
        second = asyncio.create_task(fetch(dsn, query, {**params, "job_id": new_job_id()}))

        async def b_waits_on_a() -> bool:
            rows = await fetch(
                dsn,
                "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()",
            )
            return bool(rows)

        await wait_until(b_waits_on_a, within=30, message="the second insert to wait")
        await a.commit()
        (row,) = await second
    assert row == {"recorded": False, "job_id": None}
    assert len(await jobs_of(dsn, "report")) == 1


async def test_missed_slot_is_caught_up_once_within_the_window(dsn: str) -> None:
    await add(dsn, Schedule("nightly", "0 2 * * *", "report", "acme", catch_up=timedelta(hours=6)))
    async with pools(dsn, 1) as (pool,):
        first = Scheduler(pool, {})
        # No worker ran at 02:00 on the 6th; one starts at 05:00.
        start = datetime(2026, 1, 6, 5, 0, tzinfo=UTC)
        assert len(await first.tick(now=start)) == 1
        # A second worker starting a moment later, and the first one's next passes.
        assert await Scheduler(pool, {}).tick(now=start + timedelta(seconds=3)) == []
        assert await first.tick(now=start + timedelta(hours=2)) == []
    (job,) = await jobs_of(dsn, "report")
    assert job["input"] == {SLOT_INPUT_KEY: "2026-01-06T02:00:00+00:00"}


async def test_missed_slot_beyond_the_window_is_skipped_and_logged(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    await add(dsn, Schedule("nightly", "0 2 * * *", "report", "acme", catch_up=timedelta(hours=1)))
    async with pools(dsn, 1) as (pool,):
        sched = Scheduler(pool, {})
        with caplog.at_level(logging.WARNING, logger="pgjobs.scheduler"):
            assert await sched.tick(now=datetime(2026, 1, 8, 5, 0, tzinfo=UTC)) == []
            assert await sched.tick(now=datetime(2026, 1, 8, 5, 1, tzinfo=UTC)) == []
        # The next night's slot is on time again.
        assert len(await sched.tick(now=datetime(2026, 1, 9, 2, 0, 5, tzinfo=UTC))) == 1
    assert [(r["slot_at"], r["job_id"] is None) for r in await slot_rows(dsn)] == [
        (datetime(2026, 1, 8, 2, tzinfo=UTC), True),
        (datetime(2026, 1, 9, 2, tzinfo=UTC), False),
    ]
    messages = [r.getMessage() for r in caplog.records]
    # Logged once, by the pass that recorded the skip, with the earlier nights passed over.
    assert sum("skipped" in m for m in messages) == 1, messages
    assert any("2 missed slot(s) from 2026-01-06T02:00:00+00:00 passed over" in m for m in messages)


async def test_a_stale_worker_cannot_record_an_older_slot(dsn: str) -> None:
    await add(dsn, Schedule("every-5", "*/5 * * * *", "report", "acme"))
    params = {
        "name": "every-5",
        "company_id": "acme",
        "job_type": "report",
        "input": "{}",
        "priority": 0,
        "max_attempts": 3,
        "now": None,
    }
    newer, older = T0 + timedelta(minutes=10), T0 + timedelta(minutes=5)
    first = await fetch(
        dsn, QUERIES["schedule_slot_record_once"], {**params, "slot_at": newer, "job_id": None}
    )
    late = await fetch(
        dsn, QUERIES["schedule_slot_record_once"], {**params, "slot_at": older, "job_id": None}
    )
    assert (first[0]["recorded"], late[0]["recorded"]) == (True, False)
    assert [r["slot_at"] for r in await slot_rows(dsn)] == [newer]


async def test_declared_schedules_are_upserted_and_run_only_by_their_registry(dsn: str) -> None:
    registry = Registry()
    registry.periodic("0 * * * *", job_type="report", company_id="acme", input={"v": 1})
    other = Schedule("other-service", "30 * * * *", "cleanup", "acme")
    async with await db.connect(dsn) as conn:
        await scheduler.declare(conn, [other], now=T0)  # another service's registry
        await scheduler.declare(conn, registry.schedules.values(), now=T0)
        # Restarting with a changed definition updates the row, keeping created_at.
        changed = Schedule("acme:report", "30 * * * *", "report", "acme", {"v": 2})
        await scheduler.declare(conn, [changed], now=T0 + timedelta(days=1))
        rows = {r.name: r for r in await scheduler.list_schedules(conn)}
    assert rows["acme:report"].cron == "30 * * * *"
    assert (rows["acme:report"].source, rows["acme:report"].created_at) == ("code", T0)
    async with pools(dsn, 1) as (pool,):
        sched = Scheduler(pool, {"acme:report": changed})
        await sched.tick(now=T0 + timedelta(hours=3, minutes=30, seconds=2))
    assert [j["input"]["v"] for j in await jobs_of(dsn, "report")] == [2]  # type: ignore[index]
    assert await jobs_of(dsn, "cleanup") == []  # its own workers enqueue it, not this one


async def test_old_slot_rows_are_pruned_but_each_schedule_keeps_its_latest(dsn: str) -> None:
    await add(dsn, Schedule("hourly", "0 * * * *", "report", "acme"))
    await add(dsn, Schedule("daily", "0 0 * * *", "report", "acme"))
    async with pools(dsn, 1) as (pool,):
        sched = Scheduler(pool, {})
        for hour in range(1, 49):
            await sched.tick(now=T0 + timedelta(hours=hour))
        async with pool.connection() as conn:
            await conn.execute(
                QUERIES["schedule_slot_prune_old"],
                {"now": T0 + timedelta(hours=48), "keep": timedelta(hours=6)},
            )
    rows = await slot_rows(dsn)
    hourly = [r["slot_at"] for r in rows if r["schedule_name"] == "hourly"]
    daily = [r["slot_at"] for r in rows if r["schedule_name"] == "daily"]
    assert hourly == [T0 + timedelta(hours=h) for h in range(42, 49)]
    assert daily == [datetime(2026, 1, 7, tzinfo=UTC)]  # older than 6 h, but the latest


async def test_three_running_workers_enqueue_each_second_once(dsn: str, storage_dir: Path) -> None:
    ran: list[str] = []
    registry = Registry()

    @registry.periodic("* * * * * *", job_type="tick", company_id="acme", input={"n": 1})
    @registry.handler("tick")
    async def tick(ctx: JobContext) -> None:
        ran.append(ctx.job.input[SLOT_INPUT_KEY])

    settings = fast_settings(storage_dir, schedule_interval_seconds=0.1)
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(running_worker(dsn, registry, settings))

        async def enqueued_some() -> bool:
            return len(await jobs_of(dsn, "tick")) >= 4

        await wait_until(enqueued_some, within=60, message="4 slots enqueued")

    jobs = await jobs_of(dsn, "tick")
    slots = [j["input"][SLOT_INPUT_KEY] for j in jobs]  # type: ignore[index]
    assert len(slots) == len(set(slots)), slots
    rows = await slot_rows(dsn)
    assert sorted(r["job_id"] for r in rows if r["job_id"]) == sorted(j["id"] for j in jobs)  # type: ignore[type-var]
    assert len(ran) == len(set(ran))


async def test_schedulers_through_pgbouncer_in_transaction_mode(
    dsn: str, pgbouncer: Bouncer
) -> None:
    """No session state: declare, list and record work however PgBouncer hands out server
    connections (and without prepared statements, which it would break)."""
    bouncer_dsn = pgbouncer.dsn(dsn)
    declared = Schedule("every-5", "*/5 * * * *", "report", "acme")
    async with pools(bouncer_dsn, 3) as opened:
        async with opened[0].connection() as conn:
            await scheduler.declare(conn, [declared], now=T0)
        schedulers = [Scheduler(pool, {"every-5": declared}) for pool in opened]
        for minute in range(5, 65, 5):
            now = T0 + timedelta(minutes=minute, seconds=2)
            await asyncio.gather(*(s.tick(now=now) for s in schedulers))
    jobs = await jobs_of(dsn, "report")
    slots = sorted(str(j["input"][SLOT_INPUT_KEY]) for j in jobs)  # type: ignore[index]
    assert slots == [(T0 + timedelta(minutes=m)).isoformat() for m in range(5, 65, 5)]
