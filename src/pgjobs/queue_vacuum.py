"""The workers vacuum ``pgjobs.job_queue`` themselves, instead of waiting for autovacuum.

Why: a claim leaves the old version of each queue row it takes in the claim's partial
indexes (``job_queue_fair_idx``, ``job_queue_claim_idx``: ``WHERE lease_expires_at IS
NULL``) until VACUUM, and the claim's first probe of each company walks those entries, so
its cost grows with the jobs claimed since the last vacuum. Autovacuum visits a database
at most every ``autovacuum_naptime`` (60 s by default, a server-wide setting operators may
not own; the queue's own autovacuum parameters cannot make it come sooner). Under
sustained churn PostgreSQL's CPU per job climbed ~3x between its visits (README,
"Autovacuum under sustained load").

What it guarantees:

* *One vacuum per interval among all workers.* Every worker looks every quarter of
  ``interval_seconds`` (jittered); a look vacuums only after claiming the interval by a
  guarded update of ``pgjobs.queue_vacuum.last_run_at`` (query ``queue_vacuum_claim_run``,
  sql/0024), which also declines while the table was vacuumed by anyone (autovacuum
  included) within the interval, or has fewer than ``min_dead`` dead tuples (an idle
  queue is not vacuumed over and over). A row and not an advisory lock: VACUUM cannot
  run in a transaction, so a transaction lock cannot cover it, and a session lock is
  unsafe through PgBouncer in transaction mode.
* *Never in the claim's way.* ``VACUUM (SKIP_LOCKED, INDEX_CLEANUP ON, TRUNCATE false)``
  (query ``queue_vacuum``): a vacuum already running (autovacuum's) makes it skip rather
  than wait, and it never takes the ACCESS EXCLUSIVE lock a truncation needs. It runs on
  one of the worker's pool connections (every one is autocommit, as VACUUM requires), held
  for the vacuum's length only, outside the pool's use limit (a large queue's first
  vacuum may take longer than a query should) but within ``VACUUM_TIMEOUT_SECONDS``.
* *Only where it can work.* PostgreSQL lets only the table's owner (or the database's,
  a superuser, from 17 a role granted MAINTAIN) vacuum it; anyone else's VACUUM warns and
  does nothing. The first look checks that once (``queue_vacuum_check_permitted``); a role
  that may not logs one line saying what to do and the loop ends.
* *Never stops the worker.* A failed look or vacuum is logged, and the loop waits longer
  (doubling, up to ``MAX_BACKOFF_SECONDS``) before the next.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from datetime import datetime

import psycopg

from pgjobs import db, metrics
from pgjobs.queries import QUERIES

log = logging.getLogger(__name__)

MIN_DEAD = 1000
"""Fewer dead tuples than this in job_queue (pg_stat_user_tables.n_dead_tup): no vacuum.
A claim walks a thousand dead index entries in a few pages; autovacuum still comes."""
VACUUM_TIMEOUT_SECONDS = 300.0
MAX_BACKOFF_SECONDS = 300.0
LOCK_NOT_AVAILABLE = "55P03"  # VACUUM (SKIP_LOCKED)'s warning: another vacuum holds the table


class Outcome(enum.Enum):
    """What one look (``QueueVacuum.look``) did."""

    VACUUMED = "vacuumed"
    NOT_DUE = "not due"  # another worker's turn, a recent vacuum, or too few dead tuples
    BUSY = "busy"  # claimed, but another vacuum of the table was running: skipped
    NOT_PERMITTED = "not permitted"  # this role's VACUUM would do nothing


class QueueVacuum:
    """One worker's share of keeping ``pgjobs.job_queue`` vacuumed: ``look`` vacuums if
    this interval's vacuum is still to be made; ``run`` looks until cancelled, or until a
    look finds the role may not vacuum the table."""

    def __init__(
        self,
        pool: db.GuardedPool,
        *,
        interval_seconds: float,
        min_dead: int | None = None,
    ) -> None:
        """``min_dead``: default ``MIN_DEAD``, read when the worker starts."""
        self.pool = pool
        self.interval_seconds = interval_seconds
        self.min_dead = MIN_DEAD if min_dead is None else min_dead
        self.vacuums = 0  # vacuums this worker ran
        self.last_seconds: float | None = None  # how long the last of them took
        self._permitted: bool | None = None  # checked at the first look

    async def run(self) -> None:
        failures = 0
        while True:
            delay = self.interval_seconds / 4 * random.uniform(0.5, 1.5)
            if failures:
                delay = min(MAX_BACKOFF_SECONDS, self.interval_seconds * 2**failures)
            await asyncio.sleep(delay)
            try:
                outcome = await self.look()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                failures = min(failures + 1, 16)  # 2**16 intervals: past the cap anyway
                log.warning(
                    "vacuum of pgjobs.job_queue failed (%s); next try in %.0f s",
                    db.describe_error(exc),
                    min(MAX_BACKOFF_SECONDS, self.interval_seconds * 2**failures),
                )
                continue
            failures = 0
            if outcome is Outcome.NOT_PERMITTED:
                return

    async def look(self, *, now: datetime | None = None) -> Outcome:
        """One look at ``now`` (default: the database's clock): claim this interval's
        vacuum and run it, if it is this worker's to run."""
        if self._permitted is None:
            self._permitted = await self._check_permitted()
        if not self._permitted:
            return Outcome.NOT_PERMITTED
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                QUERIES["queue_vacuum_claim_run"],
                {
                    "now": now,
                    "interval_seconds": self.interval_seconds,
                    "min_dead": self.min_dead,
                },
            )
            if await cur.fetchone() is None:
                return Outcome.NOT_DUE
        return await self._vacuum()

    async def _vacuum(self) -> Outcome:
        # (severity, SQLSTATE, message) of each notice: a Diagnostic is readable only
        # while its handler runs (it points into the result psycopg then frees).
        notices: list[tuple[str | None, str | None, str | None]] = []

        def keep(notice: psycopg.errors.Diagnostic) -> None:
            notices.append((notice.severity_nonlocalized, notice.sqlstate, notice.message_primary))

        started = time.monotonic()
        async with (
            asyncio.timeout(VACUUM_TIMEOUT_SECONDS),
            self.pool.unbounded_connection() as conn,
        ):
            conn.add_notice_handler(keep)
            try:
                await conn.execute(QUERIES["queue_vacuum"])
            finally:
                conn.remove_notice_handler(keep)
        seconds = time.monotonic() - started
        for severity, sqlstate, message in notices:
            if sqlstate == LOCK_NOT_AVAILABLE:
                log.debug("vacuum of pgjobs.job_queue skipped: another vacuum of it is running")
                return Outcome.BUSY
            if severity == "WARNING":
                log.warning("vacuum of pgjobs.job_queue: %s", message)
        self.vacuums += 1
        self.last_seconds = seconds
        metrics.QUEUE_VACUUM_DURATION.observe(seconds)
        log.debug("vacuumed pgjobs.job_queue in %.3f s", seconds)
        return Outcome.VACUUMED

    async def _check_permitted(self) -> bool:
        async with self.pool.connection() as conn:
            cur = await conn.execute(QUERIES["queue_vacuum_check_permitted"])
            row = await cur.fetchone()
        if row is not None and row["permitted"]:
            return True
        owner, role = (row["owner"], row["role"]) if row is not None else ("?", "?")
        log.warning(
            "this worker's role %s may not vacuum pgjobs.job_queue (owned by %s), so the "
            "worker leaves it to autovacuum; under sustained load the claim then slows "
            "between autovacuum's visits: run the worker as %s, or lower the server's "
            'autovacuum_naptime (README, "Autovacuum under sustained load")',
            role,
            owner,
            owner,
        )
        return False
