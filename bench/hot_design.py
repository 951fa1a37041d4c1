"""Would transitions that are HOT updates close the drain gap? (issue 4, next slice)

PostgreSQL can update a row inside its page without touching any index (a HOT update)
only when no indexed column changes — key, INCLUDE column or partial-index predicate.
Every pgjobs transition changes ``status``, which is in ``jobs_claim_idx``'s and
``jobs_lease_idx``'s predicates and is ``jobs_company_status_idx``'s key, so none is HOT
and each writes an entry in every index of ``pgjobs.jobs``.

This runs pgbench (scenario 7's method: the worker's claim + completion, 2 clients, 100
per batch, one commit each, triggers on) on the shipped schema and on a sketch of the
alternative, on the same server:

* ``hot``: ``pgjobs.jobs`` keeps only the indexes whose columns never change
  (``jobs_pkey``, ``jobs_company_created_idx``) and a fillfactor (default 50) that leaves
  room for HOT versions; the queued and running jobs also live in a narrow
  ``pgjobs.job_queue`` (claim and "running" partial indexes) that the claim updates and
  the completion deletes from, in the same statements.
* ``+evpk``: ``pgjobs.job_events`` keyed by ``(job_id, seq)`` instead of an id primary
  key plus a unique ``(job_id, seq)`` (one index less per event).
* ``+ffNN``: another fillfactor for ``pgjobs.jobs``.

    .venv/bin/python -m bench.hot_design [--repeat 2] cur hot hot+evpk hot+evpk+ff30

A sketch, not a migration: the statements are the shipped ones with the claim's source
and the completion's tail rewritten, and the lease, retry, rescue, cancel and listing
paths are not there. Measured at 9e295f3 (2 runs each, jobs/s): cur 20.6k / 21.8k;
hot+ff70 25.4k / 25.2k (55% of the job row updates HOT); hot+evpk+ff50 26.9k / 26.9k
(79%); hot+evpk+ff30 28.1k / 27.5k (all HOT): +24% to +29% over the shipped schema.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import tempfile
from pathlib import Path

import psycopg

from bench import pg, systems
from bench.drain import _fill, settle
from bench.scenarios import pglimit

JOBS = 50_000
CLIENTS = 2

HOT_SCHEMA = """
ALTER TABLE pgjobs.jobs SET (fillfactor = {ff});
DROP INDEX pgjobs.jobs_claim_idx;
DROP INDEX pgjobs.jobs_lease_idx;
DROP INDEX pgjobs.jobs_company_status_idx;
CREATE TABLE pgjobs.job_queue (
    job_id uuid PRIMARY KEY, priority int NOT NULL, run_at timestamptz NOT NULL,
    job_type text NOT NULL, lease_expires_at timestamptz);
CREATE INDEX job_queue_claim_idx ON pgjobs.job_queue (priority DESC, run_at, job_id)
    WHERE lease_expires_at IS NULL;
CREATE INDEX job_queue_running_idx ON pgjobs.job_queue (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL
"""
HOT_FILL = """
INSERT INTO pgjobs.job_queue
SELECT id, priority, run_at, job_type, NULL FROM pgjobs.jobs WHERE status = 'queued'
"""
EVENTS_KEYED_BY_JOB = """
ALTER TABLE pgjobs.job_events DROP CONSTRAINT job_events_pkey;
ALTER TABLE pgjobs.job_events DROP CONSTRAINT job_events_job_id_seq_key;
ALTER TABLE pgjobs.job_events ADD PRIMARY KEY (job_id, seq)
"""

HOT_NEXT = """WITH next AS (
    SELECT job_id AS id FROM pgjobs.job_queue
    WHERE lease_expires_at IS NULL AND run_at <= now()
    ORDER BY priority DESC, run_at, job_id
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
), q AS (
    UPDATE pgjobs.job_queue q SET lease_expires_at = now() + interval '30 s'
    WHERE q.job_id = ANY(ARRAY(SELECT id FROM next)) RETURNING q.job_id AS id
)"""
HOT_TAIL = """, gone AS (
    DELETE FROM pgjobs.job_queue g
    WHERE g.job_id = ANY(ARRAY(SELECT id FROM finished WHERE status <> 'queued'))
    RETURNING g.job_id
)
SELECT f.id, (SELECT count(*) FROM stored) AS assets_stored, (SELECT count(*) FROM gone)
FROM finished f;"""


def hot_script(shipped: str) -> str:
    """The shipped pgbench script with the claim reading job_queue and the completion
    deleting from it."""
    found = re.search(
        r"WITH next AS \(\n    SELECT id FROM pgjobs\.jobs\n.*?FOR UPDATE SKIP LOCKED\n\)",
        shipped,
        re.S,
    )
    tail = "SELECT f.id, (SELECT count(*) FROM stored) AS assets_stored FROM finished f;"
    if found is None or tail not in shipped:
        raise RuntimeError("the shipped statements changed: update bench/hot_design.py")
    script = shipped.replace(found.group(0), HOT_NEXT).replace(tail, HOT_TAIL)
    return script.replace(
        "WHERE j.id = ANY(ARRAY(SELECT id FROM next))", "WHERE j.id = ANY(ARRAY(SELECT id FROM q))"
    )


def _execute(dsn: str, statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements.split(";"):
            if statement.strip():
                conn.execute(statement.encode())


def run(server_dsn: str, variant: str, out: Path) -> None:
    kind, *options = variant.split("+")
    if kind not in ("cur", "hot"):
        raise SystemExit(f"unknown variant {variant!r}: cur or hot, then +evpk / +ffNN")
    ff = next((int(o[2:]) for o in options if o.startswith("ff")), 50)
    shipped = pglimit.script()
    with pg.database(server_dsn) as dsn:
        if kind == "hot":
            _execute(dsn, HOT_SCHEMA.format(ff=ff))
        if "evpk" in options:
            _execute(dsn, EVENTS_KEYED_BY_JOB)
        asyncio.run(systems.install("pgjobs", dsn))
        asyncio.run(_fill("pgjobs", dsn, JOBS))
        if kind == "hot":
            _execute(dsn, HOT_FILL)
        settle(dsn)
        script = out / f"hot_design_{kind}.pgbench.sql"
        script.write_text(hot_script(shipped) if kind == "hot" else shipped)
        r = pglimit.pgbench(dsn, script, CLIENTS, -(-JOBS // (pglimit.BATCH * CLIENTS)))
        with psycopg.connect(dsn) as conn:
            done = conn.execute("SELECT count(*) FROM pgjobs.jobs WHERE status = 'done'")
            (n_done,) = done.fetchone() or (0,)
            stats = conn.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'jobs'"
            ).fetchone() or (0, 0)
        if n_done != JOBS:
            raise RuntimeError(f"{variant}: {n_done} of {JOBS} jobs done")
        hot_share = stats[1] / stats[0] if stats[0] else 0.0
        print(
            f"{variant:16s} {JOBS / r['wall_seconds']:8,.0f} jobs/s, {hot_share:.0%} of the "
            "job row updates HOT",
            flush=True,
        )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hot_design")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("variants", nargs="*", default=["cur", "hot", "hot+evpk", "hot+evpk+ff30"])
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgjobs-hot-design-") as out, pg.server() as dsn:
        for _ in range(args.repeat):
            for variant in args.variants:
                run(dsn, variant, Path(out))


if __name__ == "__main__":
    main()
