"""The producer API: enqueue, read, list, cancel and retry jobs.

Async first. Every call takes an optional ``conn``: pass your own psycopg connection (in
a transaction) and the job commits or rolls back with your writes; its NOTIFY, too, is
delivered only if you commit. The connection may have any row factory; pgjobs reads its
rows through a cursor of its own and leaves the connection's row factory, autocommit flag
and transaction as they were. A connection in autocommit mode commits the job at once; a
non-autocommit one with no transaction open begins one, as any psycopg statement does,
and your ``commit()`` or ``rollback()`` ends it. Without ``conn`` the client uses its pool
and each call is its own transaction.

The SQL and the mapping of rows live in ``_plan_*`` functions shared with the sync
facade (``pgjobs.sync``), which only differs in how it awaits.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, LiteralString

from psycopg_pool import AsyncConnectionPool

from pgjobs import db, doorbell, unique
from pgjobs.errors import InvalidJobError, InvalidTransitionError, JobNotFoundError
from pgjobs.jobspec import DEFAULT_MAX_ATTEMPTS, DEFAULT_UNIQUE_WHILE, JobSpec
from pgjobs.queries import QUERIES
from pgjobs.types import Asset, Job, JobEvent, JobStatus, enqueued_job

MAX_PAGE_SIZE = 500
RING_FROM_JOBS = 1000
"""The smallest batch ``enqueue_many`` announces by a ring after its commit (when it owns
the transaction) instead of NOTIFY items in it. Skipping the items saves PostgreSQL ~2 µs
per job; the ring costs the producer ~1 µs per job (encoding the ids) and ~0.35 ms per
batch (BEGIN, the doorbell setting, COMMIT and the ring: four statements instead of one).
Measured (bench.enqueue_cpu), the ring's change to the CPU per job of PostgreSQL and the
producer together: 6.7 µs more at 50 jobs a batch, 1.0 more at 500, 0.3 to 0.5 less at 1,000
(docs/benchmarks.md, "Bulk enqueue")."""

Params = dict[str, Any]


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None
    """Pass as ``cursor`` to get the next (older) page; None on the last page."""


def parse_job_id(job_id: uuid.UUID | str) -> uuid.UUID:
    """A UUID, or JobNotFoundError: a malformed id names no job."""
    if isinstance(job_id, uuid.UUID):
        return job_id
    try:
        return uuid.UUID(str(job_id))
    except ValueError:
        raise JobNotFoundError(job_id) from None


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|")
        parsed = datetime.fromisoformat(created)
        if parsed.tzinfo is None:
            raise ValueError("naive timestamp")
        return parsed, uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise InvalidJobError("cursor is malformed; pass back a next_cursor unchanged") from None


def plan_insert(
    specs: Iterable[JobSpec], now: datetime | None = None
) -> tuple[LiteralString, Params]:
    specs = list(specs)
    return QUERIES["job_insert_many"], {
        "now": now,
        "ids": [s.id for s in specs],
        "company_ids": [s.company_id for s in specs],
        "job_types": [s.job_type for s in specs],
        "inputs": [s.input_json() for s in specs],
        "source_task_ids": [s.source_task_id for s in specs],
        "priorities": [s.priority for s in specs],
        "run_ats": [s.run_at for s in specs],
        "max_attempts": [s.max_attempts for s in specs],
    }


def inserted_jobs(specs: list[JobSpec], params: Params, rows: list[dict[str, Any]]) -> list[Job]:
    """The Jobs ``job_insert_many`` stored for ``specs`` (``params`` from ``plan_insert``),
    in the specs' order, built from what was sent and the one row the statement returns
    (the time it stored, ``types.enqueued_job``). Each input is decoded from the JSON text
    sent, as a read decodes the stored jsonb (numbers written with an exponent may come
    back as a float here and an int there: equal values)."""
    now = rows[0]["now"]
    jobs = []
    for s, text in zip(specs, params["inputs"], strict=True):
        input_ = {} if text == "{}" else json.loads(text)
        job = enqueued_job(
            s.id, s.company_id, s.job_type, input_, s.priority, s.run_at, s.max_attempts,
            s.source_task_id, now,
        )  # fmt: skip
        jobs.append(job)
    return jobs


def plan_list(
    company_id: str,
    status: str | None,
    limit: int,
    cursor: str | None,
    job_type: str | None = None,
    source_task_id: str | None = None,
) -> tuple[LiteralString, Params]:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidJobError(f"limit must be between 1 and {MAX_PAGE_SIZE}")
    before_created, before_id = decode_cursor(cursor) if cursor else (None, None)
    # No index of pgjobs.jobs covers status (sql/0004): each rare status has its own path.
    if status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value):
        query = QUERIES["job_list_by_company_active"]
    elif status in (JobStatus.FAILED.value, JobStatus.CANCELLED.value):
        query = QUERIES["job_list_by_company_ended"]
    else:
        query = QUERIES["job_list_by_company"]
    return query, {
        "company_id": company_id,
        "status": status,
        "job_type": job_type,
        "source_task_id": source_task_id,
        "before_created_at": before_created,
        "before_id": before_id,
        # One extra row tells whether another page exists.
        "limit": limit + 1,
    }


def page_of(rows: list[dict[str, Any]], limit: int) -> JobPage:
    jobs = [Job.from_row(r) for r in rows[:limit]]
    return JobPage(jobs, encode_cursor(jobs[-1]) if len(rows) > limit else None)


def transition_error(action: str, job_id: uuid.UUID, current: Job | None) -> Exception:
    if current is None:
        return JobNotFoundError(job_id)
    return InvalidTransitionError(job_id, action, current.status.value)


class Client:
    """Async producer API over a connection pool. Create with ``await Client.connect()``."""

    def __init__(self, pool: AsyncConnectionPool[db.AsyncConn], *, owns_pool: bool = False):
        self.pool = pool
        self._owns_pool = owns_pool

    @classmethod
    async def connect(cls, dsn: str | None = None, *, max_size: int = 10) -> Client:
        """A client with its own pool. With no ``dsn``: PGJOBS_DSN, else the embedded
        server under ./.pgjobs (started if needed), as the ``pgjobs`` command does."""
        dsn = db.resolve_dsn(dsn)
        pool = await db.open_pool(dsn, max_size=max_size, name="pgjobs-client")
        try:
            async with pool.connection() as conn:
                await db.ensure_migrated(conn)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _fetch(
        self, query: LiteralString, params: Params, conn: db.CallerAsyncConn | None
    ) -> list[dict[str, Any]]:
        if conn is not None:
            return await db.fetch_dicts(conn, query, params)
        async with self.pool.connection() as pooled:
            return await db.fetch_dicts(pooled, query, params)

    async def enqueue(
        self,
        company_id: str,
        job_type: str,
        input: Mapping[str, Any] | None = None,
        *,
        source_task_id: str | None = None,
        priority: int = 0,
        run_at: datetime | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        unique_key: str | None = None,
        unique_for: timedelta | None = None,
        unique_while: tuple[str, ...] = DEFAULT_UNIQUE_WHILE,
        conn: db.CallerAsyncConn | None = None,
    ) -> Job:
        """Enqueue one job. With ``unique_key``: while a job of this company with that key
        is in one of ``unique_while``'s states (and, with ``unique_for``, took the key
        within that window), returns that job with ``created=False`` and creates nothing
        (see ``pgjobs.unique``)."""
        spec = JobSpec(
            company_id, job_type, input, source_task_id, priority, run_at, max_attempts,
            unique_key=unique_key, unique_for=unique_for, unique_while=unique_while,
        )  # fmt: skip
        (job,) = await self.enqueue_many([spec], conn=conn)
        return job

    async def enqueue_many(
        self, specs: Iterable[JobSpec], *, conn: db.CallerAsyncConn | None = None
    ) -> list[Job]:
        """Insert any number of jobs in one statement (one commit). Returns one Job per
        spec, in order; a spec with a unique key someone holds gets the holder, with
        ``created=False`` (a few statements more, in one transaction).

        Announcing them on ``pgjobs_events``: with ``conn``, the caller owns the commit,
        so the statement's NOTIFY items go out with it (nothing is sent if it rolls
        back). Without, a batch of ``RING_FROM_JOBS`` or more commits with the doorbell
        on and rings for its jobs after the commit (``pgjobs.doorbell``); smaller ones,
        and unique-key batches, send items. Workers are woken on ``pgjobs_work`` in the
        commit either way."""
        specs = list(specs)
        if not specs:
            return []
        if unique.needs_steps(specs):
            if conn is not None:
                return await unique.run(conn, specs)
            async with self.pool.connection() as pooled:
                return await unique.run(pooled, specs)
        query, params = plan_insert(specs)
        if conn is not None:
            return inserted_jobs(specs, params, await db.fetch_dicts(conn, query, params))
        async with self.pool.connection() as pooled:
            if len(specs) < RING_FROM_JOBS:
                return inserted_jobs(specs, params, await db.fetch_dicts(pooled, query, params))
            async with pooled.transaction():
                await doorbell.doorbell_on(pooled)
                jobs = inserted_jobs(specs, params, await db.fetch_dicts(pooled, query, params))
            await doorbell.ring(pooled, [(s.company_id, s.id) for s in specs])
            return jobs

    async def get(
        self, company_id: str, job_id: uuid.UUID | str, *, conn: db.CallerAsyncConn | None = None
    ) -> Job:
        jid = parse_job_id(job_id)
        rows = await self._fetch(QUERIES["job_get"], {"id": jid, "company_id": company_id}, conn)
        if not rows:
            raise JobNotFoundError(jid)
        return Job.from_row(rows[0])

    async def list(
        self,
        company_id: str,
        *,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        job_type: str | None = None,
        source_task_id: str | None = None,
        conn: db.CallerAsyncConn | None = None,
    ) -> JobPage:
        """The company's jobs, newest first, optionally only those of a status, a job type
        and a source task id."""
        plan = plan_list(company_id, status, limit, cursor, job_type, source_task_id)
        return page_of(await self._fetch(*plan, conn), limit)

    async def _transition(
        self,
        name: LiteralString,
        action: str,
        company_id: str,
        job_id: uuid.UUID | str,
        conn: db.CallerAsyncConn | None,
    ) -> Job:
        jid = parse_job_id(job_id)
        params = {"id": jid, "company_id": company_id, "now": None}
        rows = await self._fetch(QUERIES[name], params, conn)
        if rows:
            return Job.from_row(rows[0])
        current = await self._fetch(QUERIES["job_get"], params, conn)
        raise transition_error(action, jid, Job.from_row(current[0]) if current else None)

    async def cancel(
        self, company_id: str, job_id: uuid.UUID | str, *, conn: db.CallerAsyncConn | None = None
    ) -> Job:
        """Cancel a queued or running job. A running handler is told to stop, and any
        result it still reports is discarded."""
        return await self._transition("job_cancel", "cancel", company_id, job_id, conn)

    async def retry(
        self, company_id: str, job_id: uuid.UUID | str, *, conn: db.CallerAsyncConn | None = None
    ) -> Job:
        """Queue a failed or cancelled job again (granting one more attempt if needed)."""
        return await self._transition("job_retry", "retry", company_id, job_id, conn)

    async def events(
        self,
        company_id: str,
        job_id: uuid.UUID | str,
        *,
        after_seq: int = 0,
        conn: db.CallerAsyncConn | None = None,
    ) -> builtins.list[JobEvent]:
        """The job's audit trail in order (all of it, or what came after ``after_seq``)."""
        jid = parse_job_id(job_id)
        params = {"job_id": jid, "company_id": company_id, "after_seq": after_seq}
        rows = await self._fetch(QUERIES["job_events_for_job"], params, conn)
        return [JobEvent.from_row(r) for r in rows]

    async def get_asset(
        self, company_id: str, asset_id: uuid.UUID | str, *, conn: db.CallerAsyncConn | None = None
    ) -> Asset | None:
        try:
            aid = parse_job_id(asset_id)
        except JobNotFoundError:
            return None
        rows = await self._fetch(QUERIES["asset_get"], {"id": aid, "company_id": company_id}, conn)
        return Asset.from_row(rows[0]) if rows else None

    async def live_workers(
        self,
        job_types: Iterable[str],
        *,
        within_seconds: float,
        conn: db.CallerAsyncConn | None = None,
    ) -> dict[str, int]:
        """How many live workers (a heartbeat within ``within_seconds``) claim each type.
        A worker claims only its registry's types, so a queued job of a type with 0 stays
        queued until a worker that has its handler starts."""
        types = sorted(set(job_types))
        if not types:
            return {}
        params = {"job_types": types, "within_seconds": within_seconds, "now": None}
        rows = await self._fetch(QUERIES["worker_count_live_by_type"], params, conn)
        return {r["job_type"]: r["live_workers"] for r in rows}
