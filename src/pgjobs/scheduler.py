"""The scheduler: stores schedules and enqueues each slot exactly once.

Every worker runs it (a loop every ``WorkerSettings.schedule_interval_seconds``, 1 s by
default); there is no leader. Each pass reads every schedule with the slot recorded
last, computes the due slot with ``pgjobs.schedules.due`` (time is an input), and
records it with ``schedule_slot_record_once``: one statement that inserts the
(schedule, slot time) row and the job together, so the slot table's primary key is the
lock. However many workers compute the same slot, one inserts it and the others insert
nothing; no session state (advisory lock, LISTEN) is involved, so this works through
PgBouncer in transaction mode. The slot row stays after its job finishes, so a slot can
never be enqueued twice (a unique key on the job would stop holding once the job is
done). Old slot rows are pruned after ``SLOT_RETENTION``, except each schedule's latest.

Which schedules a worker enqueues: every schedule added at run time (source
'database'), and of those declared in code (source 'code') only the ones its own
registry declares, with its own definition. A declared schedule whose code no longer
runs anywhere stays in the table (listed, removable with ``pgjobs schedules remove``)
but enqueues nothing.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from pgjobs import db
from pgjobs.errors import ConfigurationError
from pgjobs.jobspec import new_job_id
from pgjobs.queries import QUERIES
from pgjobs.schedules import Schedule, due

log = logging.getLogger(__name__)

SLOT_RETENTION = timedelta(days=7)
PRUNE_EVERY = 600  # passes


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    """A stored schedule as ``pgjobs schedules list`` shows it."""

    schedule: Schedule | None  # None: the row no longer parses (see ``problem``)
    name: str
    cron: str
    timezone: str
    company_id: str
    job_type: str
    source: str
    created_at: datetime
    last_slot_at: datetime | None
    last_job_id: uuid.UUID | None
    last_job_slot_at: datetime | None
    last_job_status: str | None
    problem: str | None

    @property
    def after(self) -> datetime:
        """Every slot up to here is dealt with: the last recorded one, else creation."""
        return self.last_slot_at or self.created_at

    def next_run(self, now: datetime) -> datetime | None:
        if self.schedule is None:
            return None
        return self.schedule.next_slot(max(self.after, now))


def _row(row: Mapping[str, Any]) -> ScheduleRow:
    problem = None
    try:
        schedule: Schedule | None = Schedule(
            name=row["name"],
            cron=row["cron"],
            job_type=row["job_type"],
            company_id=row["company_id"],
            input=row["input"],
            timezone=row["timezone"],
            catch_up=timedelta(seconds=row["catch_up_seconds"]),
            priority=row["priority"],
            max_attempts=row["max_attempts"],
        )
    except ConfigurationError as exc:  # e.g. a time zone this host's tzdata lacks
        schedule, problem = None, str(exc)
    return ScheduleRow(
        schedule=schedule,
        name=row["name"],
        cron=row["cron"],
        timezone=row["timezone"],
        company_id=row["company_id"],
        job_type=row["job_type"],
        source=row["source"],
        created_at=row["created_at"],
        last_slot_at=row["last_slot_at"],
        last_job_id=row["last_job_id"],
        last_job_slot_at=row["last_job_slot_at"],
        last_job_status=row["last_job_status"],
        problem=problem,
    )


def _params(schedule: Schedule, now: datetime | None) -> dict[str, Any]:
    return {
        "name": schedule.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "company_id": schedule.company_id,
        "job_type": schedule.job_type,
        "input": Jsonb(dict(schedule.input)),
        "priority": schedule.priority,
        "max_attempts": schedule.max_attempts,
        "catch_up": schedule.catch_up,
        "now": now,
    }


async def list_schedules(conn: db.AsyncConn) -> list[ScheduleRow]:
    return [
        _row(r) for r in await db.fetch_dicts(conn, QUERIES["schedule_list_with_last_slot"], {})
    ]


async def add(conn: db.AsyncConn, schedule: Schedule, *, now: datetime | None = None) -> None:
    """Store a run-time schedule; ConfigurationError if the name is taken."""
    rows = await db.fetch_dicts(conn, QUERIES["schedule_insert_if_absent"], _params(schedule, now))
    if not rows:
        raise ConfigurationError(
            f"a schedule named {schedule.name!r} already exists; remove it first "
            "(pgjobs schedules remove) or choose another name"
        )


async def remove(conn: db.AsyncConn, name: str) -> str | None:
    """Delete a schedule and its slot rows; its source ('code' or 'database'), or None if
    there was none by that name."""
    rows = await db.fetch_dicts(conn, QUERIES["schedule_delete"], {"name": name})
    return str(rows[0]["source"]) if rows else None


async def declare(
    conn: db.AsyncConn, schedules: Iterable[Schedule], *, now: datetime | None = None
) -> None:
    """Upsert the schedules a registry declares (source 'code')."""
    for schedule in schedules:
        await conn.execute(QUERIES["schedule_upsert_declared"], _params(schedule, now))


class Scheduler:
    """One worker's share of the scheduling: ``tick`` records due slots; ``run`` ticks
    every ``interval`` seconds until cancelled."""

    def __init__(
        self,
        pool: AsyncConnectionPool[db.AsyncConn],
        declared: Mapping[str, Schedule],
        *,
        interval: float = 1.0,
    ) -> None:
        self.pool = pool
        self.declared = dict(declared)
        self.interval = interval
        self.enqueued: list[uuid.UUID] = []  # the jobs this scheduler enqueued
        self._passes = 0
        self._reported: set[str] = set()  # schedules whose row could not be read, logged

    async def run(self) -> None:
        while True:
            # Jittered, so the workers' passes spread out instead of meeting on the lock.
            await asyncio.sleep(self.interval * random.uniform(0.8, 1.2))
            try:
                await self.tick()
                self._passes += 1
                if self._passes % PRUNE_EVERY == 0:
                    async with self.pool.connection() as conn:
                        await conn.execute(
                            QUERIES["schedule_slot_prune_old"],
                            {"now": None, "keep": SLOT_RETENTION},
                        )
            except (*db.TRANSIENT, psycopg.DataError) as exc:
                log.warning("scheduler pass failed (%s)", db.describe_error(exc))

    async def tick(self, now: datetime | None = None) -> list[uuid.UUID]:
        """One pass at ``now``: record every schedule's due slot. Returns the jobs this
        pass enqueued (none for slots another worker recorded).

        By default ``now`` is the database's clock, read once per pass, so workers whose
        own clocks disagree still agree on which slots are due (and enqueue none early).
        A time given here is also the enqueued jobs' created_at."""
        db_now = now
        enqueued: list[uuid.UUID] = []
        async with self.pool.connection() as conn:
            rows = await list_schedules(conn)
            if rows and now is None:
                clock = await db.fetch_dicts(conn, QUERIES["schedule_clock_now"], {})
                now = clock[0]["now"]
            for row in rows:
                assert now is not None
                schedule = self._runnable(row)
                if schedule is None:
                    continue
                job_id = await self._record(conn, schedule, row.after, now, db_now)
                if job_id is not None:
                    enqueued.append(job_id)
        self.enqueued.extend(enqueued)
        return enqueued

    def _runnable(self, row: ScheduleRow) -> Schedule | None:
        if row.source == "code":
            # Declared in code: enqueued by the workers whose registry declares it.
            return self.declared.get(row.name)
        if row.schedule is None and row.name not in self._reported:
            self._reported.add(row.name)
            log.error("schedule %r cannot run: %s", row.name, row.problem)
        return row.schedule

    async def _record(
        self,
        conn: db.AsyncConn,
        schedule: Schedule,
        after: datetime,
        now: datetime,
        db_now: datetime | None,
    ) -> uuid.UUID | None:
        decision = due(schedule, after, now)
        if decision is None:
            return None
        job_id = new_job_id() if decision.enqueue else None
        rows = await db.fetch_dicts(
            conn,
            QUERIES["schedule_slot_record_once"],
            {
                "name": schedule.name,
                "slot_at": decision.slot,
                "job_id": job_id,
                "company_id": schedule.company_id,
                "job_type": schedule.job_type,
                "input": schedule.job_input(decision.slot),
                "priority": schedule.priority,
                "max_attempts": schedule.max_attempts,
                "now": db_now,
            },
        )
        if not rows or not rows[0]["recorded"]:
            return None  # another worker recorded this slot (or a later one) first
        if decision.passed_over:
            log.warning(
                "schedule %r: %d missed slot(s) from %s passed over (no worker ran then)",
                schedule.name,
                decision.passed_over,
                decision.first_passed_over.isoformat() if decision.first_passed_over else "?",
            )
        if job_id is None:
            log.warning(
                "schedule %r: slot %s skipped: %s late, beyond its catch-up window (%s)",
                schedule.name,
                decision.slot.isoformat(),
                now - decision.slot,
                schedule.catch_up,
            )
            return None
        log.info(
            "schedule %r: enqueued job %s for slot %s",
            schedule.name,
            job_id,
            decision.slot.isoformat(),
            extra={"job_id": str(job_id), "company_id": schedule.company_id},
        )
        return job_id
