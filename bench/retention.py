"""Retention under churn, for docs/benchmarks.md: ``python -m bench.retention``.

``--jobs`` jobs go through a fresh database in rounds of ``--round``: bulk-enqueued
(1,000 per statement), claimed (batches of 100, the worker's job_claim_batch) and
completed (job_finish_many_if_leased), then pruned with pgjobs.retention.prune in
batches of 1,000 as ``pgjobs prune`` does. Retention is counted in rounds, with real
time as the clock: after round r, finished jobs from before round r - ``--keep-jobs``
began and audit rows from before round r - ``--keep-events`` began go. A plain VACUUM of
the queue's tables after each round stands in for autovacuum (no rewrite: space is
reused, not returned). Printed per round: the tables' and their indexes' sizes, the
prune's longest batch transaction (begin to commit: an upper bound on any row lock it
held) and the claim's speed (jobs/s inside the claim statements alone), against the
first round's, on empty tables.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import time
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import pg
from pgjobs import retention
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES

TABLES = ("jobs", "job_queue", "job_events", "assets")


async def _churn(conn: psycopg.AsyncConnection[Any], client: Client, n: int) -> float:
    """n jobs enqueued, claimed and completed; returns the seconds spent claiming."""
    for start in range(0, n, 1000):
        await client.enqueue_many(JobSpec("acme", "echo") for _ in range(min(1000, n - start)))
    claiming = 0.0
    while True:
        t0 = time.perf_counter()
        cur = await conn.execute(
            QUERIES["job_claim_batch"],
            {
                "now": None,
                "limit": 100,
                "worker_id": "bench",
                "lease_seconds": 60.0,
                "job_types": None,
                "after_company": None,
            },
        )
        jobs = await cur.fetchall()
        claiming += time.perf_counter() - t0
        if not jobs:
            return claiming
        nulls = [None] * len(jobs)
        await conn.execute(
            QUERIES["job_finish_many_if_leased"],
            {
                "now": None,
                "ids": [j["id"] for j in jobs],
                "lease_tokens": [j["lease_token"] for j in jobs],
                "outcomes": ["done"] * len(jobs),
                "results": ['{"ok": true}'] * len(jobs),
                "errors": nulls,
                "tracebacks": None,
                "retry_delays": [0.0] * len(jobs),
                "asset_ids": nulls,
                "asset_keys": nulls,
                "asset_content_types": nulls,
                "asset_sizes": nulls,
                "asset_sha256s": nulls,
                "asset_filenames": nulls,
            },
        )


async def _sizes(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    await conn.execute("VACUUM pgjobs.job_rows, pgjobs.job_queue, pgjobs.job_events")
    sizes: dict[str, int] = {}
    for table in TABLES:
        cur = await conn.execute(
            "SELECT pg_table_size(c.oid) AS t, pg_indexes_size(c.oid) AS i"
            " FROM pg_class c WHERE c.oid = %s::regclass",
            [f"pgjobs.{table}"],
        )
        row = await cur.fetchone()
        assert row is not None
        sizes[table] = row["t"]
        sizes[f"{table} indexes"] = row["i"]
    return sizes


async def run(dsn: str, total: int, per_round: int, keep_jobs: int, keep_events: int) -> None:
    starts: list[dt.datetime] = []
    rows: list[dict[str, Any]] = []
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        await Client.connect(dsn) as client,
    ):
        for r in range(total // per_round):
            starts.append(dt.datetime.now(dt.UTC))
            claiming = await _churn(conn, client, per_round)
            now = dt.datetime.now(dt.UTC)
            jobs_cut = starts[r - keep_jobs] if r >= keep_jobs else None
            events_cut = starts[r - keep_events] if r >= keep_events else None
            report = await retention.prune(
                dsn,
                jobs_older_than=None if jobs_cut is None else now - jobs_cut,
                events_older_than=None if events_cut is None else now - events_cut,
                now=now,
            )
            sizes = await _sizes(conn)
            row = {
                "round": r + 1,
                "jobs_through": (r + 1) * per_round,
                "claim_jobs_per_s": round(per_round / claiming),
                "pruned_jobs": sum(report.jobs.values()),
                "pruned_events": report.events,
                "longest_batch_ms": round(report.longest_batch_seconds * 1000, 1),
                "sizes_mib": {k: round(v / 2**20, 1) for k, v in sizes.items()},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    first, steady = rows[0], rows[-1]
    print(
        json.dumps(
            {
                "claim_vs_empty": round(steady["claim_jobs_per_s"] / first["claim_jobs_per_s"], 2),
                "longest_batch_ms": max(r["longest_batch_ms"] for r in rows),
                "total_mib_after_first_cut": sum(
                    rows[max(keep_events, keep_jobs)]["sizes_mib"].values()
                ),
                "total_mib_at_end": sum(steady["sizes_mib"].values()),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--round", type=int, default=10_000)
    parser.add_argument("--keep-jobs", type=int, default=2, help="rounds of finished jobs kept")
    parser.add_argument("--keep-events", type=int, default=4, help="rounds of audit rows kept")
    args = parser.parse_args()
    with pg.server() as server, pg.database(server) as dsn:
        asyncio.run(run(dsn, args.jobs, args.round, args.keep_jobs, args.keep_events))


if __name__ == "__main__":
    main()
