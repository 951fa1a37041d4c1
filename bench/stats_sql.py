"""The dashboard's stats SQL at scale, for docs/benchmarks.md: ``python -m bench.stats_sql``.

A database with ``--rows`` finished jobs and their 3 events each, spread over 50 companies
and all older than a day (bench/growth_sql.py, as the growth scenario loads them), plus
what an hour of a busy queue leaves: ``--recent`` jobs done within the last hour (their
3 events each, one transaction per company) and ``--queued`` jobs queued. Then, a median
of ``--repeat`` runs each, the statements behind ``GET /api/companies/{c}/stats`` (the
window's start, the counts, the completions per minute, for one company) and ``GET
/api/stats`` (the companies, the counts, the completions per minute, for all), exactly as
src/pgjobs/gateway/queries.sql has them; and EXPLAIN (ANALYZE, BUFFERS) of each, written
to ``--out``, with whether any plan reads a whole table (a sequential scan of jobs or
job_events).
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

COMPANIES = 50
COMPANY = "company-7"
WINDOW_SECONDS = 3600

# Jobs done within the last hour (ago 0) or just before it (ago 3700): the window's
# events, and some from before it, one transaction per company each, so that their xids
# are above every generated row's and the window's start (the xid of the newest ended
# event before it) is a transaction of a few rows, as on a live queue, not one of the
# bulk load's million-row transactions.
RECENT = """
WITH ins AS (
    INSERT INTO pgjobs.job_rows (id, company_id, job_type, status, input, attempts, worker_id,
                             lease_token, event_seq, last_event, run_at, started_at,
                             finished_at, created_at, updated_at)
    SELECT gen_random_uuid(), %(company)s::text, 'noop', 'done', '{}', 1, 'generated',
           1, 3, 'content_job.done', t.ts, t.ts, t.ts + interval '5 ms', t.ts,
           t.ts + interval '5 ms'
    FROM generate_series(1, %(n)s::int) AS g,
         LATERAL (SELECT now() - make_interval(secs => %(ago)s::float8 + random() * 3500)
                  AS ts) AS t
    RETURNING id, company_id, created_at
)
INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id,
                               created_at)
SELECT ins.id, ins.company_id, e.seq, e.type, e.status, e.attempt,
       CASE WHEN e.seq > 1 THEN 'generated' END,
       ins.created_at + e.seq * interval '1 ms'
FROM ins CROSS JOIN (VALUES (1, 'content_job.queued', 'queued', 0),
                            (2, 'content_job.running', 'running', 1),
                            (3, 'content_job.done', 'done', 1)) AS e(seq, type, status, attempt)
"""


def add_recent(dsn: str, n: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgjobs.job_rows DISABLE TRIGGER job_rows_inserted")
        for c in range(COMPANIES):
            conn.execute(RECENT, {"company": f"company-{c}", "n": 10, "ago": 3700})
        for c in range(COMPANIES):
            conn.execute(RECENT, {"company": f"company-{c}", "n": n // COMPANIES, "ago": 0})
        conn.execute("ALTER TABLE pgjobs.job_rows ENABLE TRIGGER job_rows_inserted")


def _run(conn: psycopg.Connection[dict[str, Any]], sql: str, params: dict[str, Any]) -> Any:
    return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def company_stats(conn: psycopg.Connection[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The statements of GET /api/companies/{c}/stats, in order, with their parameters."""
    from pgjobs.gateway.auth import GATEWAY_QUERIES as Q

    params: dict[str, Any] = {"company_id": COMPANY, "window_seconds": WINDOW_SECONDS, "now": None}
    start = _run(conn, Q["job_events_window_start_xid"], params)
    steps = [("job_events_window_start_xid", dict(params))]
    params["since_xid"] = start[0]["xid"]
    steps += [("job_stats_by_company", params), ("job_completions_per_minute", params)]
    return steps


def all_stats() -> list[tuple[str, dict[str, Any]]]:
    """The statements of GET /api/stats, in order, with their parameters."""
    params: dict[str, Any] = {"window_seconds": WINDOW_SECONDS, "now": None}
    return [
        ("job_list_companies", {}),
        ("job_stats_all_companies", params),
        ("job_completions_per_minute_all_companies", params),
    ]


def measure(dsn: str, repeat: int, out: Path) -> dict[str, Any]:
    from pgjobs.gateway.auth import GATEWAY_QUERIES as Q

    result: dict[str, Any] = {}
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        for endpoint, steps in (
            ("company", company_stats(conn)),
            ("all", all_stats()),
        ):
            totals: list[float] = []
            per_step: dict[str, list[float]] = {name: [] for name, _ in steps}
            for _ in range(repeat):
                total = 0.0
                for name, params in steps:
                    t = time.perf_counter()
                    _run(conn, Q[name], params)
                    ms = (time.perf_counter() - t) * 1000
                    per_step[name].append(ms)
                    total += ms
                totals.append(total)
            full_scans = []
            for name, params in steps:
                cur = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + Q[name], params)  # type: ignore[operator]
                plan = "\n".join(r["QUERY PLAN"] for r in cur.fetchall())
                (out / f"{name}.plan.txt").write_text(plan + "\n")
                if "Seq Scan on jobs" in plan or "Seq Scan on job_events" in plan:
                    full_scans.append(name)
            result[endpoint] = {
                "median_ms": statistics.median(totals),
                "steps_median_ms": {k: statistics.median(v) for k, v in per_step.items()},
                "full_scans": full_scans,
            }
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM pgjobs.jobs) AS jobs,"
            " (SELECT count(*) FROM pgjobs.job_events) AS events,"
            " (SELECT count(*) FROM pgjobs.job_queue) AS queued"
        ).fetchone()
    result["rows"] = counts
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.stats_sql")
    p.add_argument("--rows", type=int, default=10_000_000, help="finished jobs, a day old")
    p.add_argument("--recent", type=int, default=20_000, help="jobs done in the last hour")
    p.add_argument("--queued", type=int, default=25_000)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("bench/results/stats_sql"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with pg.server() as server, pg.database(server) as dsn:
        t = time.monotonic()
        generate(dsn, 0, args.rows)
        add_recent(dsn, args.recent)
        asyncio.run(_fill("pgjobs", dsn, args.queued))
        settle(dsn)
        print(f"loaded in {time.monotonic() - t:.0f} s", flush=True)
        report = measure(dsn, args.repeat, args.out)
    report["args"] = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / "stats_sql.json").write_text(json.dumps(report, indent=2, default=str))
    print(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
