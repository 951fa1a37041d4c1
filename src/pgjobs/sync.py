"""A blocking facade over the producer API, for Django/Flask-style code.

It reuses the client's query plans and row mapping (``pgjobs.client.plan_*``); only the
I/O is synchronous. Every method takes ``conn=`` (a psycopg ``Connection``, any row
factory) to run inside your own transaction: the job exists if, and only if, you commit.
As with the async client, the connection's row factory, autocommit flag and transaction
are left as they were (in autocommit mode the job commits at once).
"""

from __future__ import annotations

import builtins
import itertools
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any, LiteralString

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from pgjobs import db, doorbell, unique
from pgjobs.client import (
    RING_FROM_JOBS,
    ChunkedInsert,
    JobPage,
    Params,
    inserted_jobs,
    page_of,
    parse_job_id,
    plan_insert,
    plan_list,
    spec_chunks,
    transition_error,
)
from pgjobs.errors import JobNotFoundError
from pgjobs.jobspec import DEFAULT_MAX_ATTEMPTS, DEFAULT_UNIQUE_WHILE, JobSpec
from pgjobs.queries import QUERIES
from pgjobs.types import Asset, Job, JobEvent


def _enqueue_in_one(conn: db.CallerSyncConn, specs: list[JobSpec]) -> list[Job]:
    """``specs`` in one statement on ``conn`` (or ``pgjobs.unique``'s steps), as
    ``pgjobs.client._enqueue_in_one``."""
    if not specs:
        return []
    if unique.needs_steps(specs):
        return unique.run_sync(conn, specs)
    query, params = plan_insert(specs)
    rows = db.fetch_dicts_sync(conn, query, params)
    return inserted_jobs(specs, params, rows[0]["now"])


class SyncClient:
    """Blocking producer API over a connection pool. With no ``dsn``: PGJOBS_DSN, else the
    embedded server under ./.pgjobs (started if needed), as the ``pgjobs`` command does."""

    def __init__(self, dsn: str | None = None, *, max_size: int = 5) -> None:
        dsn = db.resolve_dsn(dsn)
        # The probe also says whether a pooler sits in between (then: no prepared statements).
        threshold = db.probe_sync(dsn)
        self.pool: ConnectionPool[db.SyncConn] = ConnectionPool(
            dsn,
            min_size=1,  # psycopg_pool's default (4) would refuse max_size < 4
            max_size=max_size,
            kwargs={
                "autocommit": True,
                "row_factory": dict_row,
                "context": db.ADAPTERS,
                "prepare_threshold": threshold,
                **db.connect_timeout_unless_set(dsn, db.CONNECT_TIMEOUT_SECONDS),
            },
            check=db.check_if_suspect_sync,
            configure=db.dates_iso_sync,
            open=False,
        )
        try:
            self.pool.open(wait=True, timeout=10)
        except Exception as exc:
            self.pool.close()
            raise db.unavailable(dsn, exc) from None
        try:
            with self.pool.connection() as conn:
                db.ensure_migrated_sync(conn)
        except BaseException:
            self.pool.close()
            raise

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fetch(
        self, query: LiteralString, params: Params, conn: db.CallerSyncConn | None
    ) -> list[dict[str, Any]]:
        if conn is not None:
            return db.fetch_dicts_sync(conn, query, params)
        with self.pool.connection() as pooled:
            return db.fetch_dicts_sync(pooled, query, params)

    def enqueue(
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
        conn: db.CallerSyncConn | None = None,
    ) -> Job:
        """Enqueue one job (see ``Client.enqueue``, unique keys included)."""
        spec = JobSpec(
            company_id, job_type, input, source_task_id, priority, run_at, max_attempts,
            unique_key=unique_key, unique_for=unique_for, unique_while=unique_while,
        )  # fmt: skip
        (job,) = self.enqueue_many([spec], conn=conn)
        return job

    def enqueue_many(
        self, specs: Iterable[JobSpec], *, conn: db.CallerSyncConn | None = None
    ) -> list[Job]:
        """Insert jobs in one commit (see ``Client.enqueue_many``: chunks, duplicates,
        and NOTIFY items or a ring)."""
        if conn is not None:
            return _enqueue_in_one(conn, list(specs))
        chunks = spec_chunks(specs)
        first = next(chunks, [])
        if not first:
            return []
        with self.pool.connection() as pooled:
            if len(first) < RING_FROM_JOBS or unique.needs_steps(first):
                return _enqueue_in_one(pooled, first + [s for c in chunks for s in c])
            with pooled.transaction():
                (began,) = db.fetch_dicts_sync(pooled, QUERIES["job_insert_many_begin"], {})
                bulk = ChunkedInsert(itertools.chain([first], chunks), began["now"])
                with psycopg.Cursor(pooled) as cur, pooled.pipeline():
                    for query, params in bulk.statements():
                        cur.execute(query, params)
                if bulk.keyed:
                    bulk.add_keyed(unique.run_sync(pooled, bulk.keyed))
            doorbell.ring_payloads_sync(pooled, bulk.ring)
            return bulk.jobs

    def get(
        self, company_id: str, job_id: uuid.UUID | str, *, conn: db.CallerSyncConn | None = None
    ) -> Job:
        jid = parse_job_id(job_id)
        rows = self._fetch(QUERIES["job_get"], {"id": jid, "company_id": company_id}, conn)
        if not rows:
            raise JobNotFoundError(jid)
        return Job.from_row(rows[0])

    def list(
        self,
        company_id: str,
        *,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        job_type: str | None = None,
        source_task_id: str | None = None,
        conn: db.CallerSyncConn | None = None,
    ) -> JobPage:
        plan = plan_list(company_id, status, limit, cursor, job_type, source_task_id)
        return page_of(self._fetch(*plan, conn), limit)

    def _transition(
        self,
        name: LiteralString,
        action: str,
        company_id: str,
        job_id: uuid.UUID | str,
        conn: db.CallerSyncConn | None,
    ) -> Job:
        jid = parse_job_id(job_id)
        params = {"id": jid, "company_id": company_id, "now": None}
        rows = self._fetch(QUERIES[name], params, conn)
        if rows:
            return Job.from_row(rows[0])
        current = self._fetch(QUERIES["job_get"], params, conn)
        raise transition_error(action, jid, Job.from_row(current[0]) if current else None)

    def cancel(
        self, company_id: str, job_id: uuid.UUID | str, *, conn: db.CallerSyncConn | None = None
    ) -> Job:
        """Cancel a queued or running job (see ``Client.cancel``)."""
        return self._transition("job_cancel", "cancel", company_id, job_id, conn)

    def retry(
        self, company_id: str, job_id: uuid.UUID | str, *, conn: db.CallerSyncConn | None = None
    ) -> Job:
        """Queue a failed or cancelled job again (see ``Client.retry``)."""
        return self._transition("job_retry", "retry", company_id, job_id, conn)

    def events(
        self,
        company_id: str,
        job_id: uuid.UUID | str,
        *,
        after_seq: int = 0,
        conn: db.CallerSyncConn | None = None,
    ) -> builtins.list[JobEvent]:
        params = {"job_id": parse_job_id(job_id), "company_id": company_id, "after_seq": after_seq}
        return [
            JobEvent.from_row(r) for r in self._fetch(QUERIES["job_events_for_job"], params, conn)
        ]

    def get_asset(
        self, company_id: str, asset_id: uuid.UUID | str, *, conn: db.CallerSyncConn | None = None
    ) -> Asset | None:
        try:
            aid = parse_job_id(asset_id)
        except JobNotFoundError:
            return None
        rows = self._fetch(QUERIES["asset_get"], {"id": aid, "company_id": company_id}, conn)
        return Asset.from_row(rows[0]) if rows else None
