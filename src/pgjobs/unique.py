"""Unique jobs: enqueue with a key returns the job already holding it instead of a second.

What it guarantees: while a job of a company holds a key (its status is one of the
states it was enqueued with, ``unique_while``, and, with ``unique_for``, the window since
it took the key has not passed), every enqueue of that company and key, from any
process on any host, returns that job with ``created=False`` and creates nothing.

How: the key lives in ``pgjobs.job_unique_keys`` (sql/0011), whose primary key
(company_id, unique_key) is the unique index that enforces it. An enqueue runs, in one
transaction:

1. insert the key rows nobody has (``ON CONFLICT DO NOTHING``: a key another open
   transaction just inserted makes this one wait for it to commit or roll back, so two
   racing enqueues never both take a key);
2. lock the key rows others have, then read their holders (a new statement, so it sees
   a holder committed while this one waited);
3. hand each key whose holder no longer holds it (finished, pruned, expired) to the new
   job, guarded on the holder seen;
4. insert the jobs that got their key (and those without one) in one statement.

A key row is released lazily, when the key is next asked for: the job's transitions
never touch it, so claims and completions pay nothing for this (a partial index on
pgjobs.jobs' status would make every transition a non-HOT update, see sql/0004). Rows
whose holder let go are deleted by the cleanup in the workers' rescue loop.

The steps are written once, as a generator that yields each statement and receives its
rows (``enqueue_steps``); ``Client`` and ``SyncClient`` only differ in how they run them.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal, LiteralString

from psycopg import pq

from pgjobs import db
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES
from pgjobs.types import Job


@dataclass(frozen=True, slots=True)
class Step:
    """One statement of an enqueue: run ``query`` with ``params`` and send back its rows,
    as Jobs (``rows="jobs"``) or dicts."""

    query: LiteralString
    params: dict[str, Any]
    rows: Literal["jobs", "dicts"]


Steps = Generator[Step, list[Any], list[Job]]

# How many times a key row may vanish (cleanup) between the insert and the lock before
# enqueue gives up; each round means another session deleted it meanwhile, which the
# cleanup does only for released keys, so a second round finds it gone or taken.
MAX_ROUNDS = 10


def _key_params(specs: Sequence[JobSpec], now: datetime | None) -> dict[str, Any]:
    return {
        "now": now,
        "company_ids": [s.company_id for s in specs],
        "unique_keys": [s.unique_key for s in specs],
        "job_ids": [s.id for s in specs],
        "held_whiles": [",".join(s.unique_while) for s in specs],
        "unique_fors": [s.unique_for for s in specs],
    }


def enqueue_steps(specs: Sequence[JobSpec], now: datetime | None = None) -> Steps:
    """The statements that enqueue ``specs`` (some with a unique key), to be run in one
    transaction; returns one Job per spec, in order: the job created (``created=True``)
    or the one holding its key (``created=False``). Within ``specs``, a key asked for
    twice goes to the first; later ones get its result with ``created=False``."""
    from pgjobs.client import inserted_jobs, plan_insert  # client imports this module

    keyed: dict[tuple[str, str], JobSpec] = {}
    for spec in specs:
        if spec.unique_key is not None:
            keyed.setdefault((spec.company_id, spec.unique_key), spec)
    holders: dict[tuple[str, str], Job] = {}  # keys already held: the holder
    # Every enqueue inserts its keys in this (Python's) order and locks the existing ones
    # in the database's (job_unique_key_lock_many's ORDER BY), so in either step two
    # batches sharing keys wait on each other in one order instead of deadlocking.
    pending = sorted(keyed)
    for _ in range(MAX_ROUNDS):
        if not pending:
            break
        wanted = [keyed[k] for k in pending]
        taken = yield Step(QUERIES["job_unique_key_insert_many"], _key_params(wanted, now), "dicts")
        won = {(r["company_id"], r["unique_key"]) for r in taken}
        others = [k for k in pending if k not in won]
        if not others:
            pending = []
            break
        params = _key_params([keyed[k] for k in others], now)
        locked = yield Step(QUERIES["job_unique_key_lock_many"], params, "dicts")
        rows = {(r["company_id"], r["unique_key"]): r for r in locked}
        holder_ids = [r["job_id"] for r in locked]
        found: list[Job] = (
            (yield Step(QUERIES["job_get_many"], {"ids": holder_ids}, "jobs")) if holder_ids else []
        )
        jobs_by_id: dict[uuid.UUID, Job] = {job.id: job for job in found}
        released: list[tuple[str, str]] = []
        for key, row in rows.items():
            holder = jobs_by_id.get(row["job_id"])
            if (
                holder is not None
                and holder.status.value in row["held_while"]
                and not row["expired"]
            ):
                holders[key] = replace(holder, created=False)
            else:
                released.append(key)
        got: set[tuple[str, str]] = set()
        if released:
            take = _key_params([keyed[k] for k in released], now)
            take["old_job_ids"] = [rows[k]["job_id"] for k in released]
            moved = yield Step(QUERIES["job_unique_key_take_many_if_released"], take, "dicts")
            got = {(r["company_id"], r["unique_key"]) for r in moved}
        # Keys neither inserted nor found were deleted meanwhile, and a key not taken
        # changed hands (which the row lock rules out; checked all the same): again.
        pending = [k for k in others if k not in rows or (k in released and k not in got)]
    if pending:
        raise RuntimeError(f"pgjobs: could not take unique keys {pending} (deleted repeatedly)")
    to_insert = [
        s
        for s in specs
        if s.unique_key is None
        or (
            keyed[(s.company_id, s.unique_key)] is s and (s.company_id, s.unique_key) not in holders
        )
    ]
    created: list[Job] = []
    if to_insert:
        query, params = plan_insert(to_insert, now)
        stored = yield Step(query, params, "dicts")
        created = inserted_jobs(to_insert, params, stored[0]["now"])
    by_spec = {s.id: job for s, job in zip(to_insert, created, strict=True)}
    result: list[Job] = []
    for spec in specs:
        if spec.id in by_spec:
            result.append(by_spec[spec.id])
            continue
        key = (spec.company_id, spec.unique_key or "")
        first = holders.get(key) or by_spec[keyed[key].id]
        result.append(replace(first, created=False))
    return result


def needs_steps(specs: Sequence[JobSpec]) -> bool:
    """Whether any spec has a unique key (else enqueue is one plain insert)."""
    return any(s.unique_key is not None for s in specs)


async def run(conn: db.CallerAsyncConn, specs: Sequence[JobSpec]) -> list[Job]:
    """Run enqueue_steps on ``conn``, in a transaction of its own when the connection is
    in autocommit mode with none open (else in the caller's, which commits it)."""
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        async with conn.transaction():
            return await _drive(conn, enqueue_steps(specs))
    return await _drive(conn, enqueue_steps(specs))


async def _drive(conn: db.CallerAsyncConn, steps: Steps) -> list[Job]:
    try:
        step = next(steps)
        while True:
            if step.rows == "jobs":
                rows: list[Any] = await db.fetch_jobs(conn, step.query, step.params)
            else:
                rows = await db.fetch_dicts(conn, step.query, step.params)
            step = steps.send(rows)
    except StopIteration as done:
        result: list[Job] = done.value
        return result


def run_sync(conn: db.CallerSyncConn, specs: Sequence[JobSpec]) -> list[Job]:
    """run() for a blocking connection."""
    if conn.autocommit and conn.info.transaction_status == pq.TransactionStatus.IDLE:
        with conn.transaction():
            return _drive_sync(conn, enqueue_steps(specs))
    return _drive_sync(conn, enqueue_steps(specs))


def _drive_sync(conn: db.CallerSyncConn, steps: Steps) -> list[Job]:
    try:
        step = next(steps)
        while True:
            if step.rows == "jobs":
                rows: list[Any] = db.fetch_jobs_sync(conn, step.query, step.params)
            else:
                rows = db.fetch_dicts_sync(conn, step.query, step.params)
            step = steps.send(rows)
    except StopIteration as done:
        result: list[Job] = done.value
        return result
