"""Retention: deleting finished jobs, old audit rows and their assets' files.

``prune`` is what ``pgjobs prune`` runs and what one worker at a time applies as the
configured policy (``Policy``, ``run_policy``). What it guarantees:

* *Small transactions.* Jobs and audit rows go in batches of ``BATCH`` rows, one short
  transaction each, walking indexes in creation order (jobs by their UUIDv7 primary key,
  audit rows company by company in the company stream's (xid, id) order, sql/0016), so
  no batch holds a lock for long and nothing is rewritten. Job rows another transaction
  holds are skipped (SKIP LOCKED) and re-checked once locked, so a prune never waits on,
  or undoes, a worker or the gateway.
* *The audit log stays append-only* for everything but the retention path
  (pgjobs.prune_events, sql/0013 and 0016), and has its own cut-off: "what happened to
  job X" outlives the job row.
* *Files after rows.* With ``assets``, a batch deletes its jobs' asset rows and queues
  their keys in ``pgjobs.asset_deletions`` in the same transaction; the files are
  deleted after the commit, and a key leaves the queue only once its file is gone. A
  delete that fails is logged and stays queued (with its error and attempt count); every
  later prune with assets starts by retrying the queue. A reader therefore never finds
  an asset row whose file is gone, and a crash between commit and delete loses nothing.
* *Dry run.* Each batch runs and is rolled back, so the counts are what a real run would
  have removed at that moment.

``run_policy`` is called periodically by every worker; one of them applies it per
interval: a first transaction takes ``pg_try_advisory_xact_lock`` (a transaction lock, so
it works through PgBouncer in transaction mode) and claims the interval by a guarded
update of ``pgjobs.retention.last_run_at``; then every batch transaction takes the lock
again, waiting up to ``LEADER_LOCK_WAIT_SECONDS`` for it (the other workers' checks hold
it for a moment each), and the run stops if another session holds it longer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgjobs import db
from pgjobs.errors import ConfigurationError
from pgjobs.queries import QUERIES
from pgjobs.storage import Storage

log = logging.getLogger(__name__)

BATCH = 1000
POLICY_INTERVAL_SECONDS = 3600.0
"""How often (at most) the workers apply the retention policy, all workers together."""
LEADER_LOCK_WAIT_SECONDS = 1.0
"""How long a leader's batch waits for the retention lock before it stops the run. Every
worker's check of the interval holds the lock for a moment (a try-lock, an UPDATE that
finds the interval taken, the commit); another prune holds it for whole batches."""
LEADER_LOCK_RETRY_SECONDS = 0.02

_DURATION = re.compile(r"^([1-9][0-9]{0,5})([dhm])$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}
_FIRST_UUID = uuid.UUID(int=0)
_STATUSES = ("done", "failed", "cancelled")


class _DryRun(Exception):
    """Raised inside a dry run's batch transaction to roll it back."""


def parse_duration(text: str, name: str = "duration") -> timedelta:
    """A retention period: a positive whole number and one unit, ``d`` (days), ``h``
    (hours) or ``m`` (minutes): ``30d``, ``12h``, ``90m``. Anything else raises
    ConfigurationError naming ``name``."""
    match = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ConfigurationError(
            f"{name} must be a whole number and a unit d, h or m (e.g. 30d, 12h, 90m), got {text!r}"
        )
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


@dataclass(frozen=True, slots=True)
class Policy:
    """What to keep: finished jobs for ``jobs``, audit rows for ``events`` (None: keep
    for ever), and whether pruned jobs' assets go too."""

    jobs: timedelta | None = None
    events: timedelta | None = None
    assets: bool = False

    @property
    def enabled(self) -> bool:
        return self.jobs is not None or self.events is not None


@dataclass(slots=True)
class PruneReport:
    """What a prune removed (or, in a dry run, would have)."""

    dry_run: bool = False
    jobs: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_STATUSES, 0))
    events: int = 0
    assets: int = 0
    files_deleted: int = 0
    files_failed: int = 0
    batches: int = 0
    longest_batch_seconds: float = 0.0
    """The longest batch transaction, begin to commit: an upper bound on how long the
    prune held any row lock."""

    def lines(self) -> list[str]:
        verb = "would remove" if self.dry_run else "removed"
        by_status = ", ".join(f"{n} {status}" for status, n in self.jobs.items())
        lines = [
            f"{verb} {sum(self.jobs.values())} finished jobs ({by_status})",
            f"{verb} {self.events} audit events",
            f"{verb} {self.assets} assets",
        ]
        if not self.dry_run and (self.files_deleted or self.files_failed):
            lines.append(
                f"deleted {self.files_deleted} asset files; {self.files_failed} failed "
                "(kept in pgjobs.asset_deletions, retried by the next prune with assets)"
            )
        if self.batches:
            lines.append(
                f"{self.batches} batches, the longest transaction "
                f"{self.longest_batch_seconds * 1000:.1f} ms"
            )
        return lines


async def prune(
    dsn_or_conn: str | db.AsyncConn,
    *,
    jobs_older_than: timedelta | None,
    events_older_than: timedelta | None = None,
    storage: Storage | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    batch: int = BATCH,
    leader_only: bool = False,
) -> PruneReport:
    """Delete finished jobs that finished more than ``jobs_older_than`` before ``now``,
    audit rows written more than ``events_older_than`` before it, and with ``storage``
    the pruned jobs' assets (rows and files). ``leader_only``: every batch first takes
    the retention advisory lock, waiting up to ``LEADER_LOCK_WAIT_SECONDS``, and the
    prune stops if another session holds it longer."""
    if isinstance(dsn_or_conn, str):
        async with await db.connect(dsn_or_conn) as conn:
            await db.ensure_migrated(conn)
            return await prune(
                conn,
                jobs_older_than=jobs_older_than,
                events_older_than=events_older_than,
                storage=storage,
                dry_run=dry_run,
                now=now,
                batch=batch,
                leader_only=leader_only,
            )
    conn = dsn_or_conn
    now = now or datetime.now(UTC)
    report = PruneReport(dry_run=dry_run)
    if storage is not None and not dry_run:
        await delete_pending_files(conn, storage, report)
    if jobs_older_than is not None:
        await _prune_jobs(conn, now - jobs_older_than, now, storage, report, batch, leader_only)
    if events_older_than is not None:
        await _prune_events(conn, now - events_older_than, report, batch, leader_only)
    return report


async def _in_batch(
    conn: db.AsyncConn,
    query: str,
    params: dict[str, Any],
    report: PruneReport,
    *,
    leader_only: bool,
) -> dict[str, Any] | None:
    """One batch in its own transaction; None if ``leader_only`` and not the leader. A
    dry run's batch is rolled back after it ran."""
    row: dict[str, Any] | None = None
    started = time.monotonic()
    try:
        async with conn.transaction():
            if leader_only and not await _leader_lock(conn):
                return None  # another session is pruning
            row = await (await conn.execute(QUERIES[query], params)).fetchone()
            if report.dry_run:
                raise _DryRun
    except _DryRun:
        pass
    if row is not None:
        report.longest_batch_seconds = max(report.longest_batch_seconds, time.monotonic() - started)
    return row


async def _leader_lock(conn: db.AsyncConn) -> bool:
    """Take the retention lock for this transaction, asking again every
    ``LEADER_LOCK_RETRY_SECONDS`` for up to ``LEADER_LOCK_WAIT_SECONDS``; False if another
    session held it all that time. Asked again rather than tried once: a try lost to
    another worker's check of the interval, which holds the lock for a moment, ended this
    worker's run for the whole interval it had just claimed. Not a blocking lock under a
    lock_timeout: that timeout would stay on for the batch's own statement."""
    deadline = time.monotonic() + LEADER_LOCK_WAIT_SECONDS
    while True:
        lock = await (await conn.execute(QUERIES["retention_try_lock"])).fetchone()
        if lock is not None and lock["leader"]:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(LEADER_LOCK_RETRY_SECONDS)


async def _prune_jobs(
    conn: db.AsyncConn,
    before: datetime,
    now: datetime,
    storage: Storage | None,
    report: PruneReport,
    batch: int,
    leader_only: bool,
) -> None:
    after = _FIRST_UUID
    while True:
        row = await _in_batch(
            conn,
            "job_delete_finished_before",
            {
                "after_id": after,
                "limit": batch,
                "before": before,
                "assets": storage is not None,
                "now": now,
            },
            report,
            leader_only=leader_only,
        )
        if row is None:
            return
        report.batches += 1
        for status in _STATUSES:
            report.jobs[status] += row[f"{status}_jobs"]
        keys: list[str] = row["asset_keys"]
        report.assets += len(keys)
        if storage is not None and keys and not report.dry_run:
            # After the commit: a reader never finds an asset row whose file is gone.
            await _delete_files(conn, storage, keys, report)
        if row["done"] or row["last_id"] is None:
            return
        after = row["last_id"]


async def _prune_events(
    conn: db.AsyncConn, before: datetime, report: PruneReport, batch: int, leader_only: bool
) -> None:
    # The walk's cursor: a company, and the (xid, id) of the last row read of it.
    cursor: dict[str, Any] = {"after_company": None, "after_xid": "0", "after_id": 0}
    while True:
        row = await _in_batch(
            conn,
            "job_events_prune_before",
            {"before": before, "limit": batch, **cursor},
            report,
            leader_only=leader_only,
        )
        if row is None:
            return
        report.batches += 1
        report.events += row["deleted"]
        if row["done"]:
            return
        cursor = {
            "after_company": row["last_company"],
            "after_xid": row["last_xid"],
            "after_id": row["last_id"],
        }


async def delete_pending_files(conn: db.AsyncConn, storage: Storage, report: PruneReport) -> None:
    """Retry the files of pruned assets still queued in pgjobs.asset_deletions."""
    after = ""
    while True:
        cur = await conn.execute(
            QUERIES["asset_deletion_list_pending"], {"after_key": after, "limit": BATCH}
        )
        keys = [row["object_key"] for row in await cur.fetchall()]
        if not keys:
            return
        await _delete_files(conn, storage, keys, report)
        after = keys[-1]


async def _delete_files(
    conn: db.AsyncConn, storage: Storage, keys: list[str], report: PruneReport
) -> None:
    deleted: list[str] = []
    for key in keys:
        try:
            await storage.delete(key)
        except Exception as exc:  # any storage error: the key stays queued, retried later
            report.files_failed += 1
            log.warning("could not delete asset file %s (retried by the next prune): %s", key, exc)
            await conn.execute(
                QUERIES["asset_deletion_update_failed"], {"key": key, "error": str(exc)}
            )
        else:
            deleted.append(key)
    if deleted:
        report.files_deleted += len(deleted)
        await conn.execute(QUERIES["asset_deletion_delete_done"], {"keys": deleted})


async def run_policy(
    conn: db.AsyncConn,
    policy: Policy,
    *,
    storage: Storage | None,
    interval_seconds: float = POLICY_INTERVAL_SECONDS,
    now: datetime | None = None,
) -> PruneReport | None:
    """Apply ``policy`` if this interval's run is still to be made and no other session
    is pruning: the claim of the interval and every batch take the retention advisory
    lock. Returns the report, or None if another worker ran (or is running) it."""
    if not policy.enabled:
        return None
    async with conn.transaction():
        lock = await (await conn.execute(QUERIES["retention_try_lock"])).fetchone()
        if lock is None or not lock["leader"]:
            return None
        cur = await conn.execute(
            QUERIES["retention_claim_run"], {"now": now, "interval_seconds": interval_seconds}
        )
        if await cur.fetchone() is None:
            return None
    # The interval is claimed: if this run fails half-way, the next interval's run
    # picks up what is left.
    report = await prune(
        conn,
        jobs_older_than=policy.jobs,
        events_older_than=policy.events,
        storage=storage if policy.assets else None,
        now=now,
        leader_only=True,
    )
    if sum(report.jobs.values()) or report.events or report.assets:
        log.info("retention: %s", "; ".join(report.lines()))
    return report


class PolicyLoop:
    """A worker's retention loop: every ``check_seconds`` (jittered) it calls
    ``run_policy``, which runs only if this interval's run is still to be made and no
    other worker is pruning. So among all workers the policy runs about once per
    ``interval_seconds``, by whichever worker checks first after the interval is up."""

    def __init__(
        self,
        pool: AsyncConnectionPool[db.AsyncConn],
        policy: Policy,
        *,
        storage: Storage | None,
        interval_seconds: float,
        check_seconds: float,
    ) -> None:
        self.pool = pool
        self.policy = policy
        self.storage = storage
        self.interval_seconds = interval_seconds
        self.check_seconds = check_seconds
        self.checks = 0  # how many times this worker asked (for tests and logs)
        self.runs = 0  # how many of those it ran

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.check_seconds * random.uniform(0.5, 1.5))
            try:
                async with self.pool.connection() as conn:
                    report = await run_policy(
                        conn,
                        self.policy,
                        storage=self.storage,
                        interval_seconds=self.interval_seconds,
                    )
                if report is not None:
                    self.runs += 1
            # Nothing transient may end the loop for the process: a half-open connection
            # past the pool's use limit, a storage that failed mid-prune (db.TRANSIENT).
            except (*db.TRANSIENT, psycopg.errors.QueryCanceled) as exc:
                log.warning(
                    "retention run failed (%s); the next interval retries",
                    db.describe_error(exc),
                )
            self.checks += 1
