"""How much do the statement-level publish triggers cost, against writing the same event
rows and NOTIFYs inline in each transition's statement (the "one SQL function per
transition" alternative)?

    .venv/bin/python bench/transition_cost.py [--jobs 20000] [--batch 100] [--repeat 3]

Each run enqueues N jobs, then claims and completes them in batches of B, one commit per
batch, on one connection, and reports jobs/s (claim + complete) as the median of the runs.
Runs on the embedded server unless PGJOBS_DSN is set; it creates and drops its own database.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from pgjobs import db, migrate
from pgjobs.queries import QUERIES

# The inline alternative: the claim's own statement inserts the events and sends one
# NOTIFY per batch. (Completion is analogous; claim shows the difference.)
INLINE_CLAIM = """
WITH next AS (
    SELECT id FROM pgjobs.jobs WHERE status = 'queued' AND run_at <= now()
    ORDER BY priority DESC, run_at, id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE pgjobs.jobs j SET status = 'running', attempts = j.attempts + 1, worker_id = 'bench',
        lease_token = j.lease_token + 1, lease_expires_at = now() + interval '30 seconds',
        started_at = now(), event_seq = j.event_seq + 1, last_event = 'content_job.running',
        updated_at = now()
    FROM next WHERE j.id = next.id RETURNING j.*
), events AS (
    INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt, worker_id)
    SELECT id, company_id, event_seq, last_event, status, attempts, worker_id FROM claimed
    RETURNING id, job_id, company_id, seq, type, status, attempt
)
SELECT c.*, (SELECT count(pg_notify('pgjobs_events', payload)) FROM (
                 SELECT json_build_object('events', json_agg(e))::text AS payload
                 FROM (SELECT e.*, (row_number() OVER () - 1) / 30 AS chunk FROM events e) e
                 GROUP BY chunk) p) AS notifies
FROM claimed c
"""


def run(dsn: str, jobs: int, batch: int, inline: bool) -> float:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE pgjobs.jobs")
        conn.execute("ALTER TABLE pgjobs.job_events DISABLE TRIGGER job_events_append_only")
        conn.execute("TRUNCATE pgjobs.job_events")
        conn.execute("ALTER TABLE pgjobs.job_events ENABLE TRIGGER job_events_append_only")
        conn.execute(
            "INSERT INTO pgjobs.jobs (id, company_id, job_type) "
            "SELECT gen_random_uuid(), 'bench', 'noop' FROM generate_series(1, %s)",
            [jobs],
        )
        conn.execute("VACUUM ANALYZE pgjobs.jobs")
        if inline:
            conn.execute("ALTER TABLE pgjobs.jobs DISABLE TRIGGER jobs_publish_update")
        try:
            started = time.perf_counter()
            done = 0
            while done < jobs:
                if inline:
                    rows = conn.execute(INLINE_CLAIM, {"limit": batch}).fetchall()  # type: ignore[arg-type]
                else:
                    rows = conn.execute(
                        QUERIES["job_claim_batch"],
                        {
                            "now": None,
                            "limit": batch,
                            "worker_id": "bench",
                            "lease_seconds": 30.0,
                            "job_types": None,
                        },
                    ).fetchall()
                if not rows:
                    break
                done += len(rows)
            return done / (time.perf_counter() - started)
        finally:
            conn.execute("ALTER TABLE pgjobs.jobs ENABLE TRIGGER jobs_publish_update")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    server = db.resolve_dsn(None)
    name = f"pgjobs_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server, dbname=name)
    try:
        migrate.apply(dsn)
        for label, inline in (("trigger", False), ("inline", True)):
            rates = [run(dsn, args.jobs, args.batch, inline) for _ in range(args.repeat)]
            print(
                f"{label:>8}: claim {statistics.median(rates):8.0f} jobs/s "
                f"(min {min(rates):.0f}, max {max(rates):.0f}; batch {args.batch})"
            )
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
