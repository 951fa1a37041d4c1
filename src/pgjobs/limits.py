"""Concurrency and rate limits per company, per job type, or per (company, job type).

A limit is a row of ``pgjobs.limits`` (sql/0014_limits.sql) naming a company, a job type
or both (None: all of them together) with ``max_running`` (at most this many of its jobs
running at once) and/or a rate (``max_starts`` per ``period_seconds``, fixed windows
aligned on the Unix epoch). A job covered by several limits keeps to each.

The claim enforces them, across every worker on every host, with no coordinator: a
worker that a limit can concern claims through ``job_claim_batch_limited``, which reads
each limit's running jobs (an upper bound kept in ``pgjobs.limit_running``, counted
exactly where the bound says the batch may not fit) and its window's starts, takes at
most the room left and adds what it took to the bounds and the rate windows, in a
transaction holding a transaction-level advisory lock per applicable limit
(``limit_lock_for_types``, in id order), taken before the claim, so that the claim
counts every claim committed before it. The worker sends the
two statements as one pipeline (one round trip, one implicit transaction), so the locks
are held for the claim's own execution and commit only. A job over its limit stays
queued; the completion that frees its slot wakes the completing worker, which claims
again (and a worker whose claim came back short while a rate limit applies looks again
when the window ends). A worker no limit concerns (none names one of its job types, or
all types) claims as before, through ``job_claim_batch``, which itself claims nothing
where such a limit exists (one probe of this small table in the claim statement) and
then returns one row of NULLs marked ``limited``: that answer tells the worker to claim
through the limited claim at once, as its next claims do until one finds no limit
covering its jobs. No claim asks before it.

A limit applies to claims that begin after it is committed. Setting one waits for the
claims running (they have read the limits; ``limit_lock_table_for_upsert``), so that every
job a limit covers was started by a claim that saw it, or before it existed: the bound
relies on that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row

from pgjobs import db
from pgjobs.errors import InvalidJobError, LockTimeoutError
from pgjobs.queries import QUERIES

# How long set_limit waits for the claims that have read pgjobs.limits (claims take
# milliseconds; every claim starting meanwhile waits behind it): past this, it fails and
# names what holds it, instead of holding every worker's claims behind a session left
# open.
LIMIT_SET_LOCK_WAIT_SECONDS = 5.0

_PERIODS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([a-z]+)\s*$")


@dataclass(frozen=True, slots=True)
class Limit:
    """One row of ``pgjobs.limits``, with what it counts now (from ``list_limits``)."""

    id: int
    company_id: str | None
    """None: every company's jobs together."""
    job_type: str | None
    """None: every job type together."""
    max_running: int | None
    max_starts: int | None
    period_seconds: float | None
    updated_at: datetime
    running: int | None = None
    """Its jobs running now (``list_limits`` only)."""
    started_this_window: int | None = None
    """Its jobs started in the current rate window (``list_limits`` only)."""

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Limit:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__ if k in row})


def parse_rate(text: str) -> tuple[int, float]:
    """``"60/min"``, ``"20/s"``, ``"1000/hour"``, ``"5/30s"`` -> (starts, period seconds)."""
    match = _RATE.match(text.lower())
    unit = _PERIODS.get(match.group(3)) if match else None
    if match is None or unit is None:
        raise InvalidJobError(
            f"rate {text!r} is not COUNT/PERIOD, e.g. 60/min, 20/s, 1000/hour or 5/30s"
        )
    multiple = float(match.group(2)) if match.group(2) else 1.0
    if multiple <= 0:
        raise InvalidJobError(f"rate {text!r}: the period must be longer than zero")
    return int(match.group(1)), multiple * unit


def _check_name(what: str, value: str | None) -> None:
    if value is not None and (not value.strip() or "\x00" in value):
        raise InvalidJobError(f"{what} must be a non-empty name, or None for all")


async def set_limit(
    conn: db.CallerAsyncConn,
    *,
    company_id: str | None = None,
    job_type: str | None = None,
    max_running: int | None = None,
    max_starts: int | None = None,
    period_seconds: float | None = None,
    now: datetime | None = None,
) -> Limit:
    """Create or change the limit of (company_id, job_type); None names all of them. Bounds
    left None keep their current value (a new limit needs one); a rate is ``max_starts``
    and ``period_seconds`` together."""
    _check_name("company_id", company_id)
    _check_name("job_type", job_type)
    if company_id is None and job_type is None:
        raise InvalidJobError("a limit names a company, a job type, or both")
    if (max_starts is None) != (period_seconds is None):
        raise InvalidJobError("a rate limit needs both max_starts and period_seconds")
    if max_running is None and max_starts is None:
        raise InvalidJobError("give max_running, a rate (max_starts per period_seconds), or both")
    if (max_running is not None and max_running < 0) or (max_starts is not None and max_starts < 0):
        raise InvalidJobError("limits cannot be negative")
    if period_seconds is not None and not period_seconds > 0:
        raise InvalidJobError("period_seconds must be longer than zero")
    params = {
        "company_id": company_id,
        "job_type": job_type,
        "max_running": max_running,
        "max_starts": max_starts,
        "period_seconds": period_seconds,
        "now": now,
    }
    # A limit's bound on its running jobs counts only the claims that see it: creating it
    # waits for the claims running now (limit_lock_table_for_upsert), for a bounded time.
    try:
        async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            await db.lock_timeout_for_transaction(conn, LIMIT_SET_LOCK_WAIT_SECONDS)
            await cur.execute(QUERIES["limit_lock_table_for_upsert"])
            await cur.execute(QUERIES["limit_upsert"], params)
            row = await cur.fetchone()
    except psycopg.errors.LockNotAvailable:
        raise LockTimeoutError(
            f"the limit was not set: pgjobs.limits could not be locked within "
            f"{LIMIT_SET_LOCK_WAIT_SECONDS:g}s, because a transaction that has read it is "
            "still open (a claim, or a session left idle in a transaction: look for "
            "'idle in transaction' in pg_stat_activity); end it, then set the limit again"
        ) from None
    assert row is not None  # an upsert always returns its row
    return Limit.from_row(row)


async def list_limits(conn: db.CallerAsyncConn, *, now: datetime | None = None) -> list[Limit]:
    """Every limit, with its running jobs and its current rate window's starts."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["limit_list"], {"now": now})
        return [Limit.from_row(row) for row in await cur.fetchall()]


async def clear_limit(
    conn: db.CallerAsyncConn, *, company_id: str | None = None, job_type: str | None = None
) -> bool:
    """Remove the limit of exactly (company_id, job_type); False if there was none."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(QUERIES["limit_delete"], {"company_id": company_id, "job_type": job_type})
        return await cur.fetchone() is not None
