"""Rescue: jobs whose worker stopped renewing their lease go back to the queue.

Every worker runs this loop; there is no leader, because the rescue statement is safe to
run concurrently: it claims expired rows with SKIP LOCKED and re-checks status and expiry
on the row it locked, so two rescuers never move the same job and a heartbeat or a
completion that commits first always wins. Rescue is driven by the job's own lease, never
by the workers table, so a pruned or re-registered worker row cannot strand a job.
Each rescue is an audited transition (``content_job.retrying``, or ``content_job.failed``
when no attempt is left) like any other.
"""

from __future__ import annotations

import logging
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from pgjobs import db, metrics
from pgjobs.queries import QUERIES
from pgjobs.types import Job

log = logging.getLogger(__name__)

BATCH = 500
STALE_WORKER_SECONDS = 300.0


async def rescue_expired(
    pool: AsyncConnectionPool[db.AsyncConn], *, now: datetime | None = None, limit: int = BATCH
) -> list[Job]:
    """One rescue pass: returns the jobs moved (to queued or failed)."""
    async with pool.connection() as conn:
        rescued = await _rescue(conn, now, limit)
    for job in rescued:
        log.warning(
            "rescued job %s from worker %s (lease expired, attempt %d of %d) -> %s",
            job.id,
            job.worker_id,
            job.attempts,
            job.max_attempts,
            job.status.value,
            extra=job.log_fields(),
        )
    return rescued


async def prune_stale_workers(
    pool: AsyncConnectionPool[db.AsyncConn], *, now: datetime | None = None
) -> None:
    async with pool.connection() as conn:
        await conn.execute(
            QUERIES["worker_prune_stale"], {"now": now, "stale_seconds": STALE_WORKER_SECONDS}
        )


async def delete_released_keys(
    pool: AsyncConnectionPool[db.AsyncConn], *, now: datetime | None = None, limit: int = BATCH
) -> int:
    """Delete up to ``limit`` unique-job keys whose holder let go (sql/0011: finished,
    pruned or past unique_for) and as many expired HTTP Idempotency-Keys; returns how
    many rows went. Keys are released lazily whether or not this runs; it only keeps the
    two tables from growing with every key ever used."""
    params = {"now": now, "limit": limit}
    async with pool.connection() as conn:
        cur = await conn.execute(QUERIES["job_unique_key_delete_released"], params)
        deleted = len(await cur.fetchall())
        cur = await conn.execute(QUERIES["idempotency_key_delete_expired"], params)
        deleted += len(await cur.fetchall())
    return deleted


async def rescue_expired_with(dsn: str, *, now: datetime | None = None) -> list[Job]:
    """One rescue pass on a short-lived connection (operators' scripts, tests)."""
    async with await db.connect(dsn) as conn:
        return await _rescue(conn, now, BATCH)


async def _rescue(conn: db.AsyncConn, now: datetime | None, limit: int) -> list[Job]:
    cur = await conn.execute(QUERIES["job_rescue_expired"], {"now": now, "limit": limit})
    rescued = [Job.from_row(row) for row in await cur.fetchall()]
    for job in rescued:
        metrics.RESCUES.labels(job.job_type).inc()
        event = "retrying" if job.status.value == "queued" else "failed"
        metrics.TRANSITIONS.labels(job.job_type, event).inc()
    return rescued
