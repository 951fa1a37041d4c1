"""The floor under pgjobs' SQL: the least any queue honouring pgjobs' contract writes.

``python -m bench.floor [--jobs 100000] [--repeat 3] [--python]``

The contract (README, "Delivery guarantees"): every transition of a job commits its job
row, one append-only audit row and a NOTIFY together. A drain makes two transitions per
job (claim, completion). The *floor* is that and nothing else, in the narrowest schema
that still serves the reads pgjobs needs — job rows keyed by time-ordered UUIDs (as
pgjobs' ids are), a queue table with the claim and lease indexes, audit rows keyed by
(job_id, seq) with the company stream's (company_id, xid) index, one NOTIFY per commit
naming the events — written by plain CTEs, run by pgbench with no Python in the loop.

Then pgjobs' own choices are added to that floor one at a time (the job row's other
columns, the audit row's id and columns, locking the job row in the claim, lock-then-update
in the completion, the queue and the audit log kept by statement triggers), and the last
row runs pgjobs' shipped statements on its real schema (scenario 7's script). Each row is
a fresh database with the same N queued jobs, drained by 2 pgbench clients, each loop
"claim 100, then finish those 100", one commit each; every row checks that all N jobs
ended done and that every transition wrote its audit row.

The model rows are approximations of pgjobs' features, written for this measurement; the
gap between the last of them and the shipped row is what they leave out (the CHECK
constraints, JSON NOTIFY payloads, the wider company index, the assets CTE). Scenario 7
reports the floor's first row beside pgbench on the shipped SQL in every run.

``--python`` adds a second table: the floor's statements and pgjobs' own, each driven by
the least Python worker (bench.leanworker: claim, a no-op handler per job, finish), with
the CPU each side spends per job. It answers what pgbench cannot: how fast any Python
worker could drain on that SQL, on the same two cores.
"""

# The pgbench scripts and DDL are assembled from this module's own constants; nothing in
# them comes from input.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from bench import pg, systems
from bench.cpusplit import cpu_readings, cpu_used
from bench.drain import _fill, settle
from bench.procs import WorkerGroup
from bench.stats import fmt, summary

BATCH = 100
CLIENTS = 2

# Time-ordered ids in UUIDv7's layout (48 bits of milliseconds, version 7, random bits),
# 300 per millisecond, as a bulk enqueue makes them (pgjobs.jobspec.new_job_id).
_UUID7 = (
    "(lpad(to_hex(1700000000000 + g / 300), 12, '0') || '7' || substr(md5(g::text), 1, 3)"
    " || '8' || substr(md5(g::text), 4, 15))::uuid"
)

# The job row's other columns in pgjobs.jobs (sql/0001), with a small input document.
_WIDE_JOB = """,
    job_type text NOT NULL DEFAULT 'noop', input jsonb NOT NULL DEFAULT '{"n": 1}',
    priority int NOT NULL DEFAULT 0, run_at timestamptz NOT NULL DEFAULT now(),
    max_attempts int NOT NULL DEFAULT 3, result jsonb, result_asset_id uuid,
    error_message text, source_task_id text, progress_fraction real, progress_message text,
    lease_expires_at timestamptz, last_event text NOT NULL DEFAULT 'content_job.queued',
    started_at timestamptz, finished_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()"""
# The audit row's other columns in pgjobs.job_events, and its identity key.
_WIDE_EVENT = """,
    id bigint GENERATED ALWAYS AS IDENTITY UNIQUE, status text NOT NULL DEFAULT 'running',
    attempt int NOT NULL DEFAULT 1, worker_id text, payload jsonb NOT NULL DEFAULT '{}'"""

_QUEUE_TRIGGER = """
CREATE FUNCTION sync_queue() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH pairs AS (
        SELECT n.id, n.status IN ('queued', 'running') AS active,
               o.status IN ('queued', 'running') AS was_active, n.status = 'running' AS running
        FROM new_rows n JOIN old_rows o USING (id)
    ), gone AS (
        DELETE FROM queue q USING pairs p WHERE q.job_id = p.id AND p.was_active AND NOT p.active
    )
    UPDATE queue q SET lease_expires_at = now() + interval '30 s'
    FROM pairs p WHERE q.job_id = p.id AND p.active AND p.running;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_queue AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION sync_queue();
"""
_EVENT_TRIGGER = """
CREATE FUNCTION publish() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE sent text;
BEGIN
    WITH pairs AS (
        SELECT n.id, n.event_seq, n.company_id, n.status
        FROM new_rows n JOIN old_rows o USING (id) WHERE n.event_seq <> o.event_seq
    ), inserted AS (
        INSERT INTO events (job_id, seq, company_id, type)
        SELECT id, event_seq, company_id, status FROM pairs RETURNING job_id, seq
    )
    SELECT pg_notify('floor', string_agg(job_id::text || ':' || seq, ',')) INTO sent
    FROM inserted;
    RETURN NULL;
END $$;
CREATE TRIGGER jobs_publish AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION publish();
"""

# (label, features), each row adding one of pgjobs' choices to the one above.
STEPS: tuple[tuple[str, frozenset[str]], ...] = (
    ("the floor: job row + audit row + NOTIFY per transition", frozenset()),
    ("+ the job row's other columns", frozenset({"wide"})),
    ("+ the audit row's identity id and other columns", frozenset({"wide", "event"})),
    ("+ the claim locks the job row too", frozenset({"wide", "event", "lock_job"})),
    ("+ the completion locks, then updates", frozenset({"wide", "event", "lock_job", "lock_fin"})),
    (
        "+ the queue kept by a statement trigger",
        frozenset({"wide", "event", "lock_job", "lock_fin", "trig_queue"}),
    ),
    (
        "+ audit rows and NOTIFY by a statement trigger",
        frozenset({"wide", "event", "lock_job", "lock_fin", "trig_queue", "trig_event"}),
    ),
)
SHIPPED = "pgjobs as shipped (scenario 7's script)"


def schema(features: frozenset[str]) -> str:
    wide = _WIDE_JOB if "wide" in features else ""
    event = _WIDE_EVENT if "event" in features else ""
    ddl = f"""
CREATE TABLE jobs (
    id uuid PRIMARY KEY, company_id text NOT NULL, status text NOT NULL,
    attempts int NOT NULL DEFAULT 0, lease_token int NOT NULL DEFAULT 0, worker_id text,
    event_seq int NOT NULL DEFAULT 1, updated_at timestamptz{wide}
) WITH (fillfactor = 50);
CREATE TABLE queue (
    job_id uuid PRIMARY KEY, priority int NOT NULL DEFAULT 0,
    run_at timestamptz NOT NULL DEFAULT now(), lease_expires_at timestamptz
);
CREATE INDEX queue_claim ON queue (priority DESC, run_at, job_id) WHERE lease_expires_at IS NULL;
CREATE INDEX queue_lease ON queue (lease_expires_at) WHERE lease_expires_at IS NOT NULL;
CREATE TABLE events (
    job_id uuid NOT NULL, seq int NOT NULL, company_id text NOT NULL, type text NOT NULL,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT now(){event},
    PRIMARY KEY (job_id, seq)
);
CREATE INDEX events_company_xid ON events (company_id, xid);
"""
    if "trig_queue" in features:
        ddl += _QUEUE_TRIGGER
    if "trig_event" in features:
        ddl += _EVENT_TRIGGER
    return ddl


def fill(jobs: int) -> str:
    return f"""
CREATE TEMP TABLE ids AS SELECT {_UUID7} AS id FROM generate_series(1, {jobs}) g;
INSERT INTO jobs (id, company_id, status) SELECT id, 'company-1', 'queued' FROM ids;
INSERT INTO queue (job_id) SELECT id FROM ids;
INSERT INTO events (job_id, seq, company_id, type) SELECT id, 1, 'company-1', 'queued' FROM ids;
"""


def script(features: frozenset[str]) -> str:
    """One pgbench transaction pair: claim BATCH (ids and tokens kept in pgbench
    variables), then finish them. Parameters travel as in pgjobs (-M prepared)."""
    wide = "wide" in features
    claim_extra = (
        ", lease_expires_at = now() + interval '30 s', started_at = now(),"
        " last_event = 'content_job.running', progress_fraction = NULL, progress_message = NULL"
        if wide
        else ""
    )
    finish_extra = (
        ", lease_expires_at = NULL, finished_at = now(), last_event = 'content_job.done',"
        " result = NULL, error_message = NULL, result_asset_id = NULL"
        if wide
        else ""
    )
    returning = "jobs.*" if wide else "id, company_id, lease_token, event_seq"
    if "lock_job" in features:
        candidates = "queue JOIN jobs ON jobs.id = queue.job_id"
        lock = "FOR UPDATE OF queue, jobs SKIP LOCKED"
    else:
        candidates, lock = "queue", "FOR UPDATE SKIP LOCKED"
    by_trigger_q = "trig_queue" in features
    by_trigger_e = "trig_event" in features
    claim_queue = (
        ""
        if by_trigger_q
        else "claimed AS (UPDATE queue SET lease_expires_at = now() + interval '30 s'"
        " WHERE job_id IN (SELECT job_id FROM next) RETURNING job_id),\n"
    )
    finish_queue = (
        "" if by_trigger_q else "gone AS (DELETE FROM queue WHERE job_id = ANY(:ids::uuid[])),\n"
    )

    def audit(kind: str) -> str:
        if by_trigger_e:
            return ""
        return (
            ",\naudit AS (INSERT INTO events (job_id, seq, company_id, type)"
            f" SELECT id, event_seq, company_id, '{kind}' FROM j)"
        )

    notify = (
        "1"
        if by_trigger_e
        else "pg_notify('floor', (SELECT string_agg(id::text || ':' || event_seq, ',') FROM j))"
    )
    if "lock_fin" in features:
        finish = (
            "locked AS (SELECT jobs.id FROM unnest(:ids::uuid[], :toks::int[]) u(id, tok)"
            " JOIN jobs ON jobs.id = u.id AND jobs.lease_token = u.tok"
            " WHERE jobs.status = 'running' ORDER BY jobs.id FOR UPDATE OF jobs),\n"
            "j AS (UPDATE jobs SET status = 'done', event_seq = event_seq + 1,"
            f" updated_at = now(){finish_extra} FROM locked WHERE jobs.id = locked.id"
            " RETURNING jobs.id, company_id, event_seq)"
        )
    else:
        finish = (
            "j AS (UPDATE jobs SET status = 'done', event_seq = event_seq + 1,"
            f" updated_at = now(){finish_extra}"
            " FROM unnest(:ids::uuid[], :toks::int[]) u(id, tok)"
            " WHERE jobs.id = u.id AND jobs.lease_token = u.tok AND jobs.status = 'running'"
            " RETURNING jobs.id, company_id, event_seq)"
        )
    source = "next" if by_trigger_q else "claimed"
    return (
        f"\\set batch {BATCH}\n"
        f"WITH next AS (SELECT queue.job_id FROM {candidates}"
        " WHERE queue.lease_expires_at IS NULL"
        " ORDER BY queue.priority DESC, queue.run_at, queue.job_id"
        f" LIMIT :batch {lock}),\n"
        f"{claim_queue}"
        "j AS (UPDATE jobs SET status = 'running', attempts = attempts + 1,"
        " lease_token = lease_token + 1, worker_id = 'pgbench', event_seq = event_seq + 1,"
        f" updated_at = now(){claim_extra} WHERE id IN (SELECT job_id FROM {source})"
        f" RETURNING {returning}){audit('content_job.running')}\n"
        "SELECT coalesce(array_agg(id), '{}') AS ids,"
        " coalesce(array_agg(lease_token), '{}') AS toks,"
        f" {notify} AS notified FROM j\n"
        "\\gset\n"
        f"WITH {finish_queue}{finish}{audit('content_job.done')}\n"
        f"SELECT count(*), {notify} FROM j;\n"
    )


@contextmanager
def floor_db(server_dsn: str, features: frozenset[str], jobs: int) -> Iterator[str]:
    """A fresh database of the model schema holding ``jobs`` queued jobs; on leaving,
    raises unless every job ended done with an audit row per transition."""
    with pg.database(server_dsn, migrate=False) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(schema(features).encode())
            conn.execute(fill(jobs).encode())
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
        yield dsn
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM jobs WHERE status = 'done'),"
                " (SELECT count(*) FROM events), (SELECT count(*) FROM queue)"
            ).fetchone()
    assert row is not None
    done, events, left = row
    if (done, events, left) != (jobs, 3 * jobs, 0):
        raise RuntimeError(
            f"floor run ended with {done} of {jobs} jobs done, {events} audit rows "
            f"(expected {3 * jobs}), {left} left in the queue"
        )


@contextmanager
def pgjobs_db(server_dsn: str, jobs: int) -> Iterator[str]:
    """The same for pgjobs' own schema, the jobs enqueued as the drain scenario does."""
    with pg.database(server_dsn, migrate=True) as dsn:
        asyncio.run(_fill("pgjobs", dsn, jobs))
        settle(dsn)
        yield dsn
        done, left = systems.counts("pgjobs", dsn)
    if (done, left) != (jobs, 0):
        raise RuntimeError(f"pgjobs run ended with {done} of {jobs} jobs done, {left} left")


def measure(server_dsn: str, features: frozenset[str], jobs: int, workdir: Path) -> float:
    """Jobs/s of 2 pgbench clients draining ``jobs`` jobs in the model schema."""
    from bench.scenarios import pglimit  # here: scenario 7 imports this module

    path = workdir / "floor.pgbench.sql"
    path.write_text(script(features))
    with floor_db(server_dsn, features, jobs) as dsn:
        r = pglimit.pgbench(dsn, path, CLIENTS, -(-jobs // (BATCH * CLIENTS)))
    return jobs / float(r["wall_seconds"])


def shipped(server_dsn: str, jobs: int, workdir: Path) -> float:
    """Scenario 7's pgbench run on pgjobs' own schema and statements, 2 clients."""
    from bench.scenarios import pglimit  # here: scenario 7 imports this module

    path = workdir / "pgjobs_batch.pgbench.sql"
    path.write_text(pglimit.script())
    with pgjobs_db(server_dsn, jobs) as dsn:
        r = pglimit.pgbench(dsn, path, CLIENTS, -(-jobs // (pglimit.BATCH * CLIENTS)))
    return jobs / float(r["wall_seconds"])


LEAN_PROCESSES = 2
LEAN_CONNECTIONS = 2
LEAN_ROWS = {
    "floor": "the floor's statements",
    "floor-tasks": "the floor's statements, each handler a task of its own with a deadline "
    "(as a worker running handlers side by side must)",
    "pgjobs": "pgjobs' statements (job_claim_batch, job_finish_many_if_leased)",
}


def python_drain(
    server_dsn: str,
    sql: str,
    jobs: int,
    processes: int = LEAN_PROCESSES,
    connections: int = LEAN_CONNECTIONS,
    prepare: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Jobs/s and CPU per job (µs, PostgreSQL and Python) of ``bench.leanworker``, the
    least Python worker, draining ``jobs`` jobs with ``sql`` (a key of LEAN_ROWS: the
    contract's floor, the same with a task per handler, or pgjobs' statements). Each
    process connects, says ready and waits;
    the clock and the CPU readings run from "go" to the last process's count, taken
    while every process and its server backends are still alive. ``prepare(dsn)`` runs
    on the filled database first (a variant's DDL, in experiments)."""
    ready = (
        pgjobs_db(server_dsn, jobs) if sql == "pgjobs" else floor_db(server_dsn, frozenset(), jobs)
    )
    with ready as dsn, tempfile.TemporaryDirectory() as logs:
        if prepare is not None:
            prepare(dsn)
        module = [MARKER, dsn, sql, str(connections)]
        with WorkerGroup("lean", module, processes, log_dir=Path(logs)) as group:
            before = cpu_readings(MARKER)
            start = group.go()
            done = sum(group.results(900))
            wall = time.monotonic() - start
            after = cpu_readings(MARKER)
            group.stop()
    if done != jobs:
        raise RuntimeError(f"the lean workers finished {done:.0f} of {jobs} jobs")

    used = cpu_used(before, after)
    return {
        "jobs_per_s": jobs / wall,
        "pg_us": used["postgres"] / jobs * 1e6,
        "py_us": used["worker"] / jobs * 1e6,
    }


MARKER = "bench.leanworker"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--python",
        action="store_true",
        help="also drive the floor and pgjobs' statements by the least Python worker "
        "(bench.leanworker), with CPU per job",
    )
    args = parser.parse_args(argv)
    rates: dict[str, list[float]] = {label: [] for label, _ in STEPS}
    rates[SHIPPED] = []
    lean: dict[str, list[dict[str, float]]] = {sql: [] for sql in LEAN_ROWS}
    workdir = Path(tempfile.mkdtemp(prefix="pgjobs-floor-"))
    with pg.server() as server_dsn:
        for rep in range(args.repeat):
            for label, features in STEPS:
                rates[label].append(measure(server_dsn, features, args.jobs, workdir))
                print(f"[{rep + 1}/{args.repeat}] {label}: {rates[label][-1]:,.0f} jobs/s")
            rates[SHIPPED].append(shipped(server_dsn, args.jobs, workdir))
            print(f"[{rep + 1}/{args.repeat}] {SHIPPED}: {rates[SHIPPED][-1]:,.0f} jobs/s")
            for sql in lean if args.python else ():
                lean[sql].append(python_drain(server_dsn, sql, args.jobs))
                print(f"[{rep + 1}/{args.repeat}] {LEAN_ROWS[sql]}: {lean[sql][-1]}")
    floor = summary(rates[STEPS[0][0]])["median"]
    print(f"\n{args.jobs:,} jobs, {CLIENTS} pgbench clients, median (min–max) of {args.repeat}:\n")
    print("| schema and statements | jobs/s | of the floor |")
    print("| --- | ---: | ---: |")
    for label, values in rates.items():
        s = summary(values)
        print(f"| {label} | {fmt(s)} | {s['median'] / floor:.0%} |")
    if args.python:
        print(
            f"\nThe least Python worker (bench.leanworker), {LEAN_PROCESSES} processes x "
            f"{LEAN_CONNECTIONS} connections, median (min–max) of {args.repeat}:\n"
        )
        print("| statements | jobs/s | PostgreSQL CPU per job | Python CPU per job |")
        print("| --- | ---: | ---: | ---: |")
        for sql, runs in lean.items():
            cpu = {k: summary([r[k] for r in runs])["median"] for k in ("pg_us", "py_us")}
            print(
                f"| {LEAN_ROWS[sql]} | {fmt(summary([r['jobs_per_s'] for r in runs]))} "
                f"| {cpu['pg_us']:.0f} µs | {cpu['py_us']:.0f} µs |"
            )


if __name__ == "__main__":
    main()
