"""Timing one drain: N no-op jobs already queued, K worker processes, clock from "go" (all
processes imported and set up) to the last process's run call returning (the queue
found empty, every completion committed). Shared by the drain, NOTIFY and growth
scenarios."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bench import pg, systems
from bench.context import Ctx
from bench.procs import WorkerGroup

ENQUEUE_CHUNK = 10_000
# A hang guard, not a timing: filling 100,000 jobs takes seconds on a quiet machine.
FILL_TIMEOUT = 600.0
# How long a drain may go without one more job finishing before it is given up as
# stalled. The harness looks every stall / 6 seconds of waiting, at most every 10 s
# (one count of finished jobs per look, so none in a drain shorter than that).
STALL_SECONDS = 60.0


class Stalled(RuntimeError):
    """A drain in which no job finished for STALL_SECONDS (or whose processes did not
    return once all were done)."""


async def _fill(system: str, dsn: str, n: int) -> None:
    async with asyncio.timeout(FILL_TIMEOUT), systems.producer(system, dsn) as prod:
        left = n
        while left > 0:
            chunk = min(ENQUEUE_CHUNK, left)
            await prod.enqueue_bulk(chunk)
            left -= chunk


@contextmanager
def queue_db(ctx: Ctx, system: str, n: int) -> Iterator[str]:
    """A fresh database holding n queued no-op jobs of ``system``, analyzed and
    checkpointed so that every queue starts from the same state."""
    with pg.database(ctx.server_dsn, migrate=system == "pgjobs") as dsn:
        asyncio.run(systems.install(system, dsn))  # under its own hang guard
        if n:
            asyncio.run(_fill(system, dsn, n))
        settle(dsn)
        yield dsn


def settle(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")


def drain(
    ctx: Ctx,
    system: str,
    dsn: str,
    n: int,
    processes: int,
    config: systems.WorkerConfig | None = None,
    timeout: float = 900.0,
    *,
    stall: float | None = None,
    before_go: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time one drain of the n jobs queued in dsn. ``timeout`` bounds the whole wait;
    with ``stall`` (seconds) the harness also gives up, raising Stalled, once no job has
    finished for that long. Every count runs under a statement timeout
    (bench.systems.COUNT_TIMEOUT). ``before_go`` is called once every process is ready,
    just before "go" (bench.cpusplit starts counting CPU there)."""
    config = config or systems.WORKER_DEFAULTS[system]
    done_before, _ = systems.counts(system, dsn, with_left=False)
    # awa's worker stops once its completion count reaches this (it has no burst mode).
    expect = done_before + n if system == "awa" else None
    started = time.monotonic()
    with WorkerGroup.of_queue(
        system, dsn, config, processes, log_dir=ctx.logs, expect=expect
    ) as group:
        if before_go is not None:
            before_go()
        t0 = group.go()
        watch = _Watchdog(system, dsn, n, done_before, stall) if stall else None
        finished = group.wait(timeout, watch, every=min(10.0, (stall or 60.0) / 6))
    seconds = max(finished) - t0
    checked = time.monotonic()
    done, left = systems.counts(system, dsn)
    done -= done_before
    if done != n or left != 0:
        raise RuntimeError(f"{system}: drained {done} of {n} jobs, {left} left (see {ctx.logs})")
    # Off the clock, logged by the drain scenario: where a slow measurement's time went.
    phases = {"start": t0 - started, "check": time.monotonic() - checked}
    return {"seconds": seconds, "jobs_per_s": n / seconds, "jobs": n, "phases": phases}


class _Watchdog:
    """Called while the harness waits for a drain's processes: counts finished jobs and
    raises Stalled once the count has not moved for ``stall`` seconds."""

    def __init__(self, system: str, dsn: str, n: int, done_before: int, stall: float) -> None:
        self.system, self.dsn, self.n, self.stall = system, dsn, n, stall
        self.done = done_before
        self.before = done_before
        self.since = time.monotonic()

    def __call__(self) -> None:
        done, _ = systems.counts(self.system, self.dsn, with_left=False)
        now = time.monotonic()
        if done != self.done:
            self.done, self.since = done, now
        elif now - self.since >= self.stall:
            raise Stalled(
                f"{self.system}: no job finished for {now - self.since:.0f}s "
                f"({done - self.before:,} of {self.n:,} done)"
            )


def pgjobs_batches(dsn: str) -> dict[str, Any]:
    """How many jobs pgjobs' claims and completions carried per commit, read from the
    audit log (one xid per transaction)."""
    q = """
        SELECT type, count(*) AS commits, avg(n)::float AS mean,
               percentile_cont(0.5) WITHIN GROUP (ORDER BY n)::float AS median
        FROM (SELECT type, xid, count(*) AS n FROM pgjobs.job_events
              WHERE type IN ('content_job.running', 'content_job.done') GROUP BY 1, 2) t
        GROUP BY type"""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(q).fetchall()
    return {
        r[0].removeprefix("content_job."): {"commits": r[1], "mean": r[2], "median": r[3]}
        for r in rows
    }
