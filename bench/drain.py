"""Timing one drain: N no-op jobs already queued, K worker processes, clock from "go" (all
processes imported and set up) to the last process's run call returning (the queue
found empty, every completion committed). Shared by the drain, NOTIFY and growth
scenarios."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from bench import pg, systems
from bench.context import Ctx
from bench.procs import WorkerGroup

ENQUEUE_CHUNK = 10_000


async def _fill(system: str, dsn: str, n: int) -> None:
    async with systems.producer(system, dsn) as prod:
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
        asyncio.run(systems.install(system, dsn))
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
) -> dict[str, Any]:
    config = config or systems.WORKER_DEFAULTS[system]
    done_before, _ = systems.counts(system, dsn, with_left=False)
    with WorkerGroup.of_queue(system, dsn, config, processes, log_dir=ctx.logs) as group:
        t0 = group.go()
        finished = group.wait(timeout)
    seconds = max(finished) - t0
    done, left = systems.counts(system, dsn)
    done -= done_before
    if done != n or left != 0:
        raise RuntimeError(f"{system}: drained {done} of {n} jobs, {left} left (see {ctx.logs})")
    return {"seconds": seconds, "jobs_per_s": n / seconds, "jobs": n}


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
