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
import itertools
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, LiteralString

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgjobs import db, doorbell, events, unique
from pgjobs.errors import InvalidJobError, InvalidTransitionError, JobNotFoundError
from pgjobs.jobspec import DEFAULT_MAX_ATTEMPTS, DEFAULT_UNIQUE_WHILE, JobSpec
from pgjobs.queries import QUERIES
from pgjobs.types import Asset, Job, JobEvent, JobStatus, enqueued_jobs

MAX_PAGE_SIZE = 500
RING_FROM_JOBS = 250
"""The smallest batch ``enqueue_many`` sends through the pool in chunks, pipelined in one
transaction that rings after its commit (``pgjobs.doorbell``), instead of one statement
whose NOTIFY items go in its commit. The first chunk is this size (taking it from the
caller's iterable tells whether the batch is this large), each next one twice the last, up
to CHUNK_MAX. Why chunks: the server inserts one while Python builds the next, so a call
takes about the longer of the two instead of their sum. Why a ring: PostgreSQL spends ~2 µs
per job less without the items; the ring costs the producer ~1 µs per job (encoding the
ids) and the transaction a few round trips (docs/benchmarks.md, "Bulk enqueue")."""
CHUNK_MAX = 2000
"""The largest chunk: each statement costs PostgreSQL a fixed ~0.26 ms (its two statement
triggers), which chunks of this size make small, while the first, small ones start the
server early."""

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


def _column(values: list[Any]) -> tuple[list[Any] | None, Any]:
    """A job_insert_many column as (array, value): all its values equal (a batch's one
    company, type, priority, no run_at...), the value alone and no array, which unnest
    pads with NULLs; else the array. psycopg writes an array element by element in Python
    (~0.2 µs each), and the server reads each one."""
    first = values[0]
    for value in values:
        if value != first:
            return values, None
    return None, first


def plan_insert(
    specs: Iterable[JobSpec], now: datetime | None = None
) -> tuple[LiteralString, Params]:
    specs = list(specs)
    params: Params = {"now": now, "ids": [s.id for s in specs]}
    columns: dict[tuple[str, str], list[Any]] = {  # each column's array, and its one value
        ("company_ids", "same_company_id"): [s.company_id for s in specs],
        ("job_types", "same_job_type"): [s.job_type for s in specs],
        ("inputs", "same_input"): [s.input_json() for s in specs],
        ("source_task_ids", "same_source_task_id"): [s.source_task_id for s in specs],
        ("priorities", "same_priority"): [s.priority for s in specs],
        ("run_ats", "same_run_at"): [s.run_at for s in specs],
        ("max_attempts", "same_max_attempts"): [s.max_attempts for s in specs],
    }
    for (array, same), values in columns.items():
        params[array], params[same] = _column(values)
    return QUERIES["job_insert_many"], params


def inserted_jobs(specs: list[JobSpec], params: Params, now: datetime) -> list[Job]:
    """The Jobs ``job_insert_many`` stored for ``specs`` (``params`` from ``plan_insert``)
    at ``now`` (the time the statement returns, or the transaction's it was given), in the
    specs' order, built from what was sent (``types.enqueued_jobs``). Each input is decoded
    from the JSON text sent, as a read decodes the stored jsonb (numbers written with an
    exponent may come back as a float here and an int there: equal values), a dict of its
    own for each job."""
    texts = params["inputs"]
    if texts is None:  # one input for all (plan_insert's _column)
        texts = [params["same_input"]] * len(specs)
    return enqueued_jobs(
        (
            (s.id, s.company_id, s.job_type, {} if text == "{}" else json.loads(text),
             s.priority, s.run_at, s.max_attempts, s.source_task_id)
            for s, text in zip(specs, texts, strict=True)
        ),
        now,
    )  # fmt: skip


def spec_chunks(specs: Iterable[JobSpec]) -> Iterator[list[JobSpec]]:
    """``specs`` in lists of RING_FROM_JOBS, then each twice the last, up to CHUNK_MAX
    (the last may be shorter), each taken from the iterable only when asked for."""
    it = iter(specs)
    size = RING_FROM_JOBS
    chunk = list(itertools.islice(it, size))
    while chunk:
        yield chunk
        size = min(2 * size, CHUNK_MAX)
        chunk = list(itertools.islice(it, size))


async def _enqueue_in_one(conn: db.CallerAsyncConn, specs: list[JobSpec]) -> list[Job]:
    """``specs`` in one statement on ``conn`` (or ``pgjobs.unique``'s steps, for unique
    keys), its NOTIFY items in its commit."""
    if not specs:
        return []
    if unique.needs_steps(specs):
        return await unique.run(conn, specs)
    query, params = plan_insert(specs)
    rows = await db.fetch_dicts(conn, query, params)
    return inserted_jobs(specs, params, rows[0]["now"])


@dataclass
class ChunkedInsert:
    """A large ``enqueue_many`` through the pool: ``job_insert_many`` statements of a
    chunk each, sent back to back (a pipeline) in one transaction that began with
    ``job_insert_many_begin`` (the doorbell on, generic plans, and ``now``, the
    transaction's time).

    ``statements`` yields each chunk's statement; when the driver asks for the next, the
    previous chunk's Jobs are built, and after the last, the ring for them all is
    encoded: while the server inserts a chunk, Python takes the next from the caller's
    iterable and does everything else it can. From the first chunk holding a spec with a
    unique key, the rest of the specs go to ``keyed`` instead, for ``pgjobs.unique``'s
    steps in the same transaction, whose Jobs the caller hands to ``add_keyed``."""

    chunks: Iterator[list[JobSpec]]
    now: datetime
    jobs: list[Job] = field(default_factory=list)
    keyed: list[JobSpec] = field(default_factory=list)
    ring: list[str] = field(default_factory=list)
    """The ring's payloads (``events.encode_ring``)."""

    def statements(self) -> Iterator[tuple[LiteralString, Params]]:
        for chunk in self.chunks:
            if unique.needs_steps(chunk):
                self.keyed = chunk + [s for rest in self.chunks for s in rest]
                return
            query, params = plan_insert(chunk, self.now)
            yield query, params
            self.jobs += inserted_jobs(chunk, params, self.now)
        self.ring = events.encode_ring((j.company_id, j.id) for j in self.jobs)

    def add_keyed(self, jobs: list[Job]) -> None:
        """The Jobs ``pgjobs.unique`` gave for ``keyed``; the ring then names every job
        the call created (not the holders a unique key returned)."""
        self.jobs += jobs
        self.ring = events.encode_ring((j.company_id, j.id) for j in self.jobs if j.created)


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
        """Insert any number of jobs in one commit. Returns one Job per spec, in order; a
        spec with a unique key someone holds gets the holder, with ``created=False`` (a
        few statements more, in the same transaction).

        Without ``conn``, a batch of ``RING_FROM_JOBS`` or more goes in chunks sent back
        to back in one transaction (``ChunkedInsert``), taken from ``specs`` as they are
        sent (a slow iterable keeps the transaction open meanwhile): an exception from
        the iterable, as a failing chunk, rolls the whole call back. Smaller batches,
        those whose first chunk has a unique key, and every batch on a caller's ``conn``
        are one statement (or ``pgjobs.unique``'s steps).

        Announcing them on ``pgjobs_events``: with ``conn``, the caller owns the commit,
        so the statement's NOTIFY items go out with it (nothing is sent if it rolls
        back). Without, a chunked batch commits with the doorbell on and rings for the
        jobs it created after the commit (``pgjobs.doorbell``); smaller ones, and
        unique-key batches, send items. Workers are woken on ``pgjobs_work`` in the
        commit either way (an item per job type and statement: a chunked batch may wake
        them once per chunk)."""
        if conn is not None:
            return await _enqueue_in_one(conn, list(specs))
        chunks = spec_chunks(specs)
        first = next(chunks, [])
        if not first:
            return []
        async with self.pool.connection() as pooled:
            if len(first) < RING_FROM_JOBS or unique.needs_steps(first):
                return await _enqueue_in_one(pooled, first + [s for c in chunks for s in c])
            async with pooled.transaction():
                (began,) = await db.fetch_dicts(pooled, QUERIES["job_insert_many_begin"], {})
                bulk = ChunkedInsert(itertools.chain([first], chunks), began["now"])
                async with psycopg.AsyncCursor(pooled) as cur, pooled.pipeline():
                    for query, params in bulk.statements():
                        await cur.execute(query, params)
                if bulk.keyed:
                    bulk.add_keyed(await unique.run(pooled, bulk.keyed))
            await doorbell.ring_payloads(pooled, bulk.ring)
            return bulk.jobs

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
