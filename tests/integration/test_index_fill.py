"""A bulk enqueue adds each job at the right-hand end of every index it writes, so the
indexes come out as full as a REINDEX builds them: the job ids increase within a
millisecond (pgjobs.jobspec.new_job_id) and jobs_company_created_idx ascends
(sql/0022_company_created_asc). PostgreSQL then skips the descent from the root for each
insert and splits pages full; ids in random order within a millisecond, or an index in
descending order, left half-empty pages (1.3 and 1.8 times the REINDEXed size)."""

from __future__ import annotations

import psycopg
from psycopg import sql

from pgjobs.client import Client
from pgjobs.jobspec import JobSpec

INDEXES = (
    "jobs_pkey",
    "jobs_company_created_idx",
    "job_queue_pkey",
    "job_queue_claim_idx",
    "job_queue_fair_idx",
    "job_events_pkey",
    "job_events_company_xid_idx",
)
SIZES = "SELECT relname, pg_relation_size(oid) FROM pg_class WHERE relname = ANY(%s)"


async def test_a_bulk_enqueue_fills_index_pages_as_a_reindex_does(dsn: str, client: Client) -> None:
    for _ in range(20):
        await client.enqueue_many(JobSpec("acme", "echo") for _ in range(1000))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        grown = dict(await (await conn.execute(SIZES, (list(INDEXES),))).fetchall())
        for table in ("job_rows", "job_queue", "job_events"):
            await conn.execute(sql.SQL("REINDEX TABLE {}").format(sql.Identifier("pgjobs", table)))
        packed = dict(await (await conn.execute(SIZES, (list(INDEXES),))).fetchall())
    assert set(grown) == set(INDEXES)
    ratios = {name: grown[name] / packed[name] for name in INDEXES}
    assert all(ratio <= 1.1 for ratio in ratios.values()), ratios
