"""What each row of a bulk enqueue costs: the audit row, its company index, and a row per
statement instead, measured by adding one more of each.

``python -m bench.enqueue_rows [--rounds 5] [--batches 30] [--size 1000] [--pgqueuer]``

Removing pgjobs' own audit row would mean rewriting its insert trigger for the benchmark;
adding a second one, filled the same way, prices it without touching what pgjobs runs.
Each variant is a fresh migrated database with some SQL run on it before the clock:

* ``as is``;
* ``+ audit row``: a copy of ``pgjobs.job_events`` (``LIKE ... INCLUDING ALL``: the same
  columns, defaults, identity, CHECK and indexes) that a statement trigger on
  ``pgjobs.job_rows`` fills with each inserted job's queued event, as pgjobs' trigger
  fills the real one;
* ``+ audit row, no company index``: the same without its ``(company_id, xid, id)``
  index, the one the company stream reads;
* ``+ row per statement``: instead, one row per statement and company (company, xid,
  time, count) with a ``(company_id, xid, id)`` index: the rows a company stream would
  read if a bulk enqueue's queued events were kept as one entry each;
* ``COPY``: the same rows as ``as is``, the job rows sent by ``COPY ... FROM STDIN``
  (text format, in pieces of ``COPY_PIECE`` rows so that the server inserts while Python
  writes the rest) instead of ``job_insert_many`` (``copy_many``): what the issue's
  "COPY or set-based statements" would give pgjobs.

The difference from ``as is`` is what one more such row per job (or per statement) costs.
Then ``Client.enqueue_many`` of ``--size`` ``JobSpec("bench", "noop")``, ``--batches``
times after a warm-up call (scenario 2's bulk mode), reporting per job: the pool's one
backend's CPU, the client's, and the wall rate. Rounds run every variant once, in order,
so a drift in the shared machine's load falls on all alike. With ``--pgqueuer``, each
round also measures pgqueuer's list enqueue the same way (its server processes' CPU all
together, its client's): where the two queues' time goes. Linux only. Behind
docs/benchmarks.md's "Bulk enqueue".
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
from psycopg import sql

from bench import pg, systems
from bench.cpusplit import cpu_readings, postmaster_of
from bench.procs import cpu_seconds
from bench.stats import fmt, summary

# A second audit log, filled from the inserted job rows as pgjobs' insert trigger fills
# pgjobs.job_events (one queued event per job, in the same statement).
_SECOND_AUDIT = """
CREATE TABLE pgjobs.bench_events (LIKE pgjobs.job_events INCLUDING ALL);
CREATE FUNCTION pgjobs.bench_events_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgjobs.bench_events (job_id, company_id, seq, type, status, attempt,
                                     worker_id, payload)
    SELECT n.id, n.company_id, n.event_seq, n.last_event, n.status, n.attempts,
           n.worker_id, '{}'::jsonb
    FROM new_rows n;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_events_fill AFTER INSERT ON pgjobs.job_rows
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION pgjobs.bench_events_fill();
"""

_ROW_PER_STATEMENT = """
CREATE TABLE pgjobs.bench_batches (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    company_id text NOT NULL,
    xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT now(),
    jobs int NOT NULL);
CREATE INDEX ON pgjobs.bench_batches (company_id, xid, id);
CREATE FUNCTION pgjobs.bench_batches_fill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO pgjobs.bench_batches (company_id, jobs)
    SELECT company_id, count(*) FROM new_rows GROUP BY company_id;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_batches_fill AFTER INSERT ON pgjobs.job_rows
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT
    EXECUTE FUNCTION pgjobs.bench_batches_fill();
"""

VARIANTS: dict[str, str | None] = {
    "as is": None,
    "+ audit row": _SECOND_AUDIT,
    "+ audit row, no company index": _SECOND_AUDIT
    + "DROP INDEX pgjobs.bench_events_company_id_xid_id_idx;",
    "+ row per statement": _ROW_PER_STATEMENT,
    "COPY": None,
}
METRICS = ("server_us", "client_us", "jobs_per_s")

COPY_JOBS = (
    "COPY pgjobs.job_rows (id, company_id, job_type, input, source_task_id, priority, run_at,"
    " max_attempts) FROM STDIN"
)
COPY_PIECE = 250  # rows per write: as Client.enqueue_many's first chunk
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_line(spec: Any, input_json: str, now: Any) -> str:
    """One job row in COPY's text format (its backslashes, tabs and line ends escaped)."""
    source = "\\N" if spec.source_task_id is None else spec.source_task_id.translate(_COPY_ESCAPES)
    return (
        f"{spec.id}\t{spec.company_id.translate(_COPY_ESCAPES)}\t"
        f"{spec.job_type.translate(_COPY_ESCAPES)}\t{input_json.translate(_COPY_ESCAPES)}\t"
        f"{source}\t{spec.priority}\t{(spec.run_at or now).isoformat()}\t{spec.max_attempts}\n"
    )


async def copy_many(conn: Any, specs: list[Any]) -> list[Any]:
    """What ``Client.enqueue_many`` does for ``specs`` (none with a unique key), the job
    rows sent by COPY: one transaction begun by ``job_insert_many_begin`` (the doorbell
    on, the transaction's time), the same statement triggers (queue rows, audit rows),
    the Jobs built from what was sent (``client.inserted_jobs``), one ring after the
    commit."""
    from pgjobs import doorbell
    from pgjobs.client import inserted_jobs
    from pgjobs.queries import QUERIES

    inputs = [s.input_json() for s in specs]
    async with conn.transaction():
        cur = await conn.execute(QUERIES["job_insert_many_begin"])
        now = (await cur.fetchone())["now"]
        async with conn.cursor().copy(COPY_JOBS) as copy:
            for i in range(0, len(specs), COPY_PIECE):
                piece = range(i, min(i + COPY_PIECE, len(specs)))
                await copy.write("".join(_copy_line(specs[k], inputs[k], now) for k in piece))
    jobs = inserted_jobs(specs, {"inputs": inputs}, now)
    await doorbell.ring(conn, ((j.company_id, j.id) for j in jobs))
    return jobs


async def _per_job(
    call: Callable[[], Awaitable[object]], backend: int, batches: int, size: int
) -> dict[str, float]:
    """``batches`` calls of ``call`` (``size`` jobs each) after a warm-up call: per job, the
    CPU of the backend ``backend`` and of this client, and the wall rate."""
    await call()
    b0, c0, t0 = cpu_seconds(backend), time.process_time(), time.monotonic()
    for _ in range(batches):
        await call()
    c1, t1, b1 = time.process_time(), time.monotonic(), cpu_seconds(backend)
    jobs = batches * size
    return {
        "server_us": (b1 - b0) / jobs * 1e6,
        "client_us": (c1 - c0) / jobs * 1e6,
        "jobs_per_s": jobs / (t1 - t0),
    }


async def _pgjobs_copy(dsn: str, batches: int, size: int) -> dict[str, float]:
    from pgjobs import db
    from pgjobs.jobspec import JobSpec

    async with await db.connect(dsn) as conn:
        return await _per_job(
            lambda: copy_many(conn, [JobSpec("bench", "noop") for _ in range(size)]),
            conn.info.backend_pid,
            batches,
            size,
        )


async def _pgjobs(dsn: str, batches: int, size: int) -> dict[str, float]:
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with await Client.connect(dsn, max_size=1) as client:
        async with client.pool.connection() as conn:
            backend = conn.info.backend_pid
        return await _per_job(
            lambda: client.enqueue_many(JobSpec("bench", "noop") for _ in range(size)),
            backend,
            batches,
            size,
        )


async def _pgqueuer(dsn: str, batches: int, size: int) -> dict[str, float]:
    # pgqueuer's pool may use any of its connections: every process of the server counts.
    async with systems.producer("pgqueuer", dsn) as prod:
        await prod.enqueue_bulk(size)
        postmaster = postmaster_of(dsn)
        before = cpu_readings("\0", postmaster)  # no worker processes: never matches
        c0, t0 = time.process_time(), time.monotonic()
        for _ in range(batches):
            await prod.enqueue_bulk(size)
        c1, t1 = time.process_time(), time.monotonic()
        after = cpu_readings("\0", postmaster)
    server = sum(t - before["postgres"].get(pid, 0.0) for pid, t in after["postgres"].items())
    jobs = batches * size
    return {
        "server_us": server / jobs * 1e6,
        "client_us": (c1 - c0) / jobs * 1e6,
        "jobs_per_s": jobs / (t1 - t0),
    }


def _one(server_dsn: str, name: str, batches: int, size: int) -> dict[str, float]:
    system = "pgqueuer" if name == "pgqueuer" else "pgjobs"
    with pg.database(server_dsn, migrate=system == "pgjobs") as dsn:
        asyncio.run(systems.install(system, dsn))
        setup = VARIANTS.get(name)
        if setup:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(sql.SQL(setup))  # constant SQL of this module
        pg.checkpoint(dsn)
        measure = {"pgqueuer": _pgqueuer, "COPY": _pgjobs_copy}.get(name, _pgjobs)
        return asyncio.run(measure(dsn, batches, size))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.enqueue_rows")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--pgqueuer", action="store_true", help="measure pgqueuer's too")
    args = p.parse_args()
    names = list(VARIANTS) + (["pgqueuer"] if args.pgqueuer else [])
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with pg.server() as server_dsn:
        for r in range(args.rounds):
            for name in names:
                res = _one(server_dsn, name, args.batches, args.size)
                runs[name].append(res)
                cells = ", ".join(f"{k} {res[k]:,.1f}" for k in METRICS)
                print(f"round {r + 1} {name}: {cells}", flush=True)
    base = statistics.median(res["jobs_per_s"] for res in runs["as is"])
    print(f"\n{args.rounds} rounds of {args.batches} x {args.size:,} jobs, medians (min–max):")
    for name, results in runs.items():
        cells = "; ".join(
            f"{key} {fmt(summary([res[key] for res in results]), digits=1)}" for key in METRICS
        )
        rate = statistics.median(res["jobs_per_s"] for res in results)
        print(f"  {name}: {cells}; rate {rate / base:.2f}x as is")


if __name__ == "__main__":
    main()
