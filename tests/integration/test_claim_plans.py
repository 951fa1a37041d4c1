"""The worker's claims are planned by index whatever job_queue's statistics say
(transaction_plans_by_index in queries.sql).

A VACUUM of an emptied queue that keeps its pages (the workers' queue vacuum runs with
TRUNCATE false) records 0 rows in them, and until the next VACUUM or ANALYZE the planner
estimates 0 rows however many jobs arrive. Planned so, each ordered probe of the claim's
ring became a bitmap scan of job_queue_claim_idx and a sort of every queued job. The
plan is read from what the claims did: job_queue_claim_idx's index entries read
(pg_stat_user_indexes) per claim. A sorting claim reads the whole index on each of its
ring's ~200 probes: ~200 x 30,000 entries. An index-ordered one reads it in its cut and
fill probes and, planned at 0 rows, in its heads' walks too: there job_queue_claim_idx
(with a company filter) and job_queue_fair_idx cost the same but for the fair index's
extra level, so the generic plan walks the claim index. Such a walk reads one entry
where the company's first job is free, and about COMPANIES more (the other companies'
jobs in between) where the worker's other claim out holds it: up to a few hundred
thousand entries per claim, never the millions of a sort. (With statistics, the next
queue vacuum's, the heads walk job_queue_fair_idx.) Never timings."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs.client import Client
from pgjobs.context import JobContext
from pgjobs.jobspec import JobSpec
from pgjobs.registry import Registry
from pgjobs.worker import Worker

COMPANIES = 300
# Below ~20,000 queued jobs the planner took the index walks even when estimating none.
JOBS = 30_000


def _registry() -> Registry:
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        return None

    return registry


async def _claim_index_reads(dsn: str) -> int:
    rows = await fetch(
        dsn,
        "SELECT idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = 'job_queue_claim_idx'",
    )
    return int(rows[0]["idx_tup_read"])


async def _claims(dsn: str) -> int:
    """Claims that took jobs: each claim's running events share its transaction id."""
    rows = await fetch(
        dsn,
        "SELECT count(DISTINCT xid) AS n FROM pgjobs.job_events WHERE type = 'content_job.running'",
    )
    return int(rows[0]["n"])


async def _no_worker_backends(dsn: str) -> bool:
    """A backend's statistics are written by the time it leaves pg_stat_activity."""
    rows = await fetch(
        dsn,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE datname = current_database()"
        " AND (application_name LIKE 'pgjobs-worker %%'"
        " OR application_name LIKE 'pgjobs-listen %%')",
    )
    return rows[0]["n"] == 0


@pytest.mark.timeout(300)
@pytest.mark.parametrize("limited", [False, True], ids=["plain", "limited"])
async def test_claims_after_the_queue_was_vacuumed_empty_walk_indexes_not_sorts(
    dsn: str, client: Client, storage_dir: Path, limited: bool
) -> None:
    registry = _registry()
    # No queue vacuum of the workers' own and no autovacuum on the queue: the statistics
    # stay those of the empty queue for the whole drain.
    settings = fast_settings(storage_dir, concurrency=200, queue_vacuum_seconds=0)
    await client.enqueue_many(JobSpec(f"c{i % COMPANIES:03d}", "echo") for i in range(500))
    await Worker(dsn, registry, settings, burst=True).run()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE pgjobs.job_queue SET (autovacuum_enabled = false)")
        await conn.execute("VACUUM (TRUNCATE false) pgjobs.job_queue")
        if limited:  # claims through job_claim_batch_limited; never binds
            await conn.execute(
                "INSERT INTO pgjobs.limits (job_type, max_running) VALUES ('echo', 1000000)"
            )
    (stats,) = await fetch(
        dsn, "SELECT reltuples, relpages FROM pg_class WHERE oid = 'pgjobs.job_queue'::regclass"
    )
    assert stats["reltuples"] == 0, stats
    assert stats["relpages"] > 0, stats

    await client.enqueue_many(JobSpec(f"c{i % COMPANIES:03d}", "echo") for i in range(JOBS))
    await wait_until(lambda: _no_worker_backends(dsn), message="the first drain's backends gone")
    before, claims_before = await _claim_index_reads(dsn), await _claims(dsn)

    async def some_done() -> bool:
        rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
        return rows[0]["n"] >= 500 + 1_000

    # A few claims are enough to tell the plans apart (sorting ones take seconds each).
    async with running_worker(dsn, registry, settings):
        await wait_until(some_done, within=120, message="1,000 jobs done")
    await wait_until(lambda: _no_worker_backends(dsn), message="the worker's backends gone")
    reads = await _claim_index_reads(dsn) - before
    claims = await _claims(dsn) - claims_before
    assert claims > 0
    # A sorting claim reads >= 200 x 28,500 entries (the docstring); a tenth of that per
    # claim tells the two apart with room on both sides.
    per_claim = reads / claims
    assert per_claim < 200 * JOBS / 10, f"job_queue_claim_idx: {reads:,} entries, {claims} claims"
