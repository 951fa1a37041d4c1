"""The audit views (sql/0011) at scale, for docs/benchmarks.md: ``python -m bench.views``.

The database of bench.stats_sql: ``--rows`` finished jobs and their 3 events each, all
older than a day (bench/growth_sql.py), ``--recent`` jobs done in the last hour (and 10 per
company just before it), ``--queued`` jobs queued; then ``--running`` of those claimed (a
10-minute lease, so running, none expired) and no worker registered, so every queued due
job is in stuck_jobs (no live worker serves it): the views' worst case for that branch.
Then, for each cookbook query of the README (on the views), the median of ``--repeat``
runs, and EXPLAIN (ANALYZE, BUFFERS) written to ``--out``, with whether the plan reads a
whole table (a sequential scan of pgjobs.jobs or pgjobs.job_events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import pg
from bench.drain import _fill, settle
from bench.scenarios.growth import generate
from bench.stats_sql import add_recent
from pgjobs.queries import QUERIES

# What the README's cookbook asks of each view (job_timeline for one finished job).
QUERIES_BY_VIEW = {
    "job_timeline": (
        "SELECT seq, at, event, status, attempt, worker_id, error"
        " FROM pgjobs.job_timeline WHERE job_id = %(job_id)s ORDER BY seq"
    ),
    "running_jobs": (
        "SELECT job_id, job_type, worker_id, hostname, lease_age, lease_remaining"
        " FROM pgjobs.running_jobs ORDER BY lease_age DESC LIMIT 20"
    ),
    "stuck_jobs": (
        "SELECT reason, company_id, job_type, count(*) AS jobs, max(stuck_for) AS longest"
        " FROM pgjobs.stuck_jobs GROUP BY 1, 2, 3 ORDER BY longest DESC"
    ),
    "throughput": (
        "SELECT granularity, job_type, sum(completed), sum(failed), sum(retried)"
        " FROM pgjobs.throughput GROUP BY 1, 2"
    ),
    "queue_depth": (
        "SELECT company_id, sum(queued), sum(running), sum(scheduled), max(oldest_queued_age)"
        " FROM pgjobs.queue_depth GROUP BY company_id ORDER BY 2 DESC"
    ),
}


def claim(dsn: str, n: int) -> None:
    """``n`` queued jobs claimed by a worker that never registered, leases of 10 minutes."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        left = n
        while left > 0:
            batch = min(100, left)
            params = {
                "now": None,
                "limit": batch,
                "worker_id": "bench",
                "lease_seconds": 600.0,
                "job_types": None,
                "after_company": None,
            }
            conn.execute(QUERIES["job_claim_batch"], params)  # type: ignore[arg-type]
            left -= batch


def measure(dsn: str, repeat: int, out: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute(
            "SELECT id FROM pgjobs.job_rows TABLESAMPLE SYSTEM (1) WHERE status = 'done' LIMIT 1"
        ).fetchone()
        params = {"job_id": row["id"] if row else None}
        for view, sql in QUERIES_BY_VIEW.items():
            times: list[float] = []
            rows = 0
            for _ in range(repeat):
                t = time.perf_counter()
                rows = len(conn.execute(sql, params).fetchall())  # type: ignore[arg-type]
                times.append((time.perf_counter() - t) * 1000)
            cur = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + sql, params)  # type: ignore[operator]
            plan = "\n".join(r["QUERY PLAN"] for r in cur.fetchall())
            (out / f"{view}.plan.txt").write_text(plan + "\n")
            result[view] = {
                "median_ms": statistics.median(times),
                "min_ms": min(times),
                "rows": rows,
                "full_scan": "Seq Scan on jobs" in plan or "Seq Scan on job_events" in plan,
            }
        result["counts"] = conn.execute(
            "SELECT (SELECT count(*) FROM pgjobs.jobs) AS jobs,"
            " (SELECT count(*) FROM pgjobs.job_events) AS events,"
            " (SELECT count(*) FROM pgjobs.job_queue) AS active"
        ).fetchone()
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.views")
    p.add_argument("--rows", type=int, default=10_000_000, help="finished jobs, a day old")
    p.add_argument("--recent", type=int, default=20_000, help="jobs done in the last hour")
    p.add_argument("--queued", type=int, default=25_000)
    p.add_argument("--running", type=int, default=1_000, help="of the queued, claimed")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("bench/results/views"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with pg.server() as server, pg.database(server) as dsn:
        t = time.monotonic()
        generate(dsn, 0, args.rows)
        add_recent(dsn, args.recent)
        asyncio.run(_fill("pgjobs", dsn, args.queued))
        claim(dsn, args.running)
        settle(dsn)
        print(f"loaded in {time.monotonic() - t:.0f} s", flush=True)
        report = measure(dsn, args.repeat, args.out)
    report["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "views.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
