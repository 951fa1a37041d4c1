"""pgjobs' hot statements before and after sql/0021_live_state.sql (issue 16, "N2").

``python -m bench.narrow [--jobs 20000] [--rounds 3] [--clients 1 2]``

What the live state in the queue row saves PostgreSQL per drained job. Side ``0020``: a
fresh database migrated to sql/0020_merged_checks.sql, driven by the statements pgjobs ran
then (tests/queries_before_live_state.sql, pgjobs/queries.sql before 0021, which the
migration tests move jobs with too: job_insert_many, job_claim_batch,
job_finish_many_if_leased on the table pgjobs.jobs). Side ``0021``: a
database migrated to the latest, driven by pgjobs.queries' statements of the same names.
(Before the live state was built, its side was a prototype of it, in this module's
history.)

Each run fills a fresh database with ``--jobs`` no-op jobs of one company in 1,000-job
batches (the doorbell on, as ``Client.enqueue_many`` sends such batches), then drains it
from ``clients`` connections, each looping as a worker's fetch loop does: claim 100 (the
doorbell setting and the claim in one pipeline, one commit), then finish those 100 as done
(the same), until a claim finds nothing. No handler, no ring after the commits (the same
for both). It reads the CPU time of the connections' backends around every statement
(/proc/<pid>/schedstat, nanoseconds): per job, ``enqueue_us``, and ``drain_us`` split into
``claim_us`` and ``finish_us``; and the server's other processes' during the drain
(walwriter, checkpointer, autovacuum: ``other_us``, /proc/<pid>/stat, clock ticks). It
checks that every job ended done with three audit rows and no queue row. Rounds are
interleaved (0020, 0021, for each client count, in every round); prints each run, then
medians with min–max. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from yoyo import read_migrations

from bench import pg
from bench.cpusplit import cpu_readings, postmaster_of
from bench.stats import fmt, summary


def run_ns(pid: int) -> int:
    """Nanoseconds a process has run on a CPU (/proc/<pid>/schedstat): finer than
    /proc/<pid>/stat's clock ticks, so one statement's share can be read."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


BATCH = 100
ENQUEUE_BATCH = 1_000
BASE = "0020_merged_checks"  # the schema both sides start from
VARIANTS = ("0020", "0021")
# The statements before 0021: one copy, the migration tests' (loaded on first use).
BEFORE_FILE = Path(__file__).resolve().parents[1] / "tests" / "queries_before_live_state.sql"
BEFORE = None


def _before() -> dict[str, Any]:
    global BEFORE
    if BEFORE is None:
        parts = re.split(
            r"^-- name: (\w+)\s*$", BEFORE_FILE.read_text(encoding="utf-8"), flags=re.MULTILINE
        )
        BEFORE = {n: b.strip().rstrip(";") for n, b in zip(parts[1::2], parts[2::2], strict=True)}
    return BEFORE


def statements(variant: str) -> tuple[Any, Any, Any]:
    """(insert, claim, finish) of ``variant``."""
    if variant == "0021":
        from pgjobs.queries import QUERIES

        return (
            QUERIES["job_insert_many"],
            QUERIES["job_claim_batch"],
            QUERIES["job_finish_many_if_leased"],
        )
    q = _before()
    return q["job_insert_many"], q["job_claim_batch"], q["job_finish_many_if_leased"]


def _migrate_to_base(dsn: str) -> None:
    from pgjobs import migrate

    backend = migrate._backend(dsn)
    try:
        migrations = read_migrations(str(migrate.migrations_dir()))
        wanted = migrations.filter(lambda m: m.id <= BASE)
        with backend.lock():
            backend.apply_migrations(backend.to_apply(wanted))
    finally:
        backend.connection.close()


@contextmanager
def variant_db(server_dsn: str, variant: str) -> Iterator[str]:
    with pg.database(server_dsn, migrate=False) as dsn:
        if variant == "0020":
            _migrate_to_base(dsn)
        else:
            from pgjobs import migrate

            migrate.apply(dsn)
        yield dsn


DOORBELL_ON = "SELECT set_config('pgjobs.doorbell', 'on', true)"


async def _in_pipeline(conn: psycopg.AsyncConnection[Any], query: Any, params: Any) -> list[Any]:
    """The doorbell setting and one statement in one implicit transaction, as
    pgjobs.doorbell.execute sends them."""
    async with conn.pipeline():
        await conn.execute(DOORBELL_ON)
        cur = await conn.execute(query, params)
    return await cur.fetchall() if cur.description else []


async def _enqueue(dsn: str, variant: str, jobs: int) -> float:
    """Backend CPU µs per job of enqueueing ``jobs`` in 1,000-job batches."""
    from pgjobs.client import plan_insert
    from pgjobs.jobspec import JobSpec

    insert = statements(variant)[0]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        backend = conn.info.backend_pid
        before = run_ns(backend)
        left = jobs
        while left > 0:
            n = min(ENQUEUE_BATCH, left)
            _, params = plan_insert(JobSpec("company-1", "noop") for _ in range(n))
            await _in_pipeline(conn, insert, params)
            left -= n
        used = run_ns(backend) - before
    return used / 1e3 / jobs


def _finish_params(rows: list[Any]) -> dict[str, Any]:
    n = len(rows)
    return {
        "now": None,
        "ids": [r[0] for r in rows],
        "lease_tokens": [r[12] for r in rows],  # CLAIMED_COLUMNS' lease_token
        "outcomes": ["done"] * n,
        "results": None, "errors": None, "tracebacks": None, "retry_delays": [0.0] * n,
        "asset_ids": None, "asset_keys": None, "asset_content_types": None,
        "asset_sizes": None, "asset_sha256s": None, "asset_filenames": None,
    }  # fmt: skip


async def _client(
    conn: psycopg.AsyncConnection[Any], claim: Any, finish: Any, spent: dict[str, int]
) -> int:
    """One worker's fetch loop; adds its backend's CPU (ns) in each statement to ``spent``."""
    backend = conn.info.backend_pid
    done, after = 0, None
    while True:
        params = {
            "now": None, "limit": BATCH, "worker_id": "bench", "lease_seconds": 30,
            "job_types": ["noop"], "after_company": after,
        }  # fmt: skip
        t0 = run_ns(backend)
        rows = await _in_pipeline(conn, claim, params)
        t1 = run_ns(backend)
        spent["claim"] += t1 - t0
        if not rows:
            return done
        after = rows[-1][-1]
        finished = await _in_pipeline(conn, finish, _finish_params(rows))
        spent["finish"] += run_ns(backend) - t1
        done += len(finished)


async def _drain(dsn: str, variant: str, clients: int) -> dict[str, float]:
    _, claim, finish = statements(variant)
    conns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(clients)]
    spent = {"claim": 0, "finish": 0}
    backends = {c.info.backend_pid for c in conns}
    try:
        postmaster = postmaster_of(dsn)
        server0 = cpu_readings("\0", postmaster)["postgres"]
        t0 = time.monotonic()
        done = sum(await asyncio.gather(*(_client(c, claim, finish, spent) for c in conns)))
        wall = time.monotonic() - t0
        server1 = cpu_readings("\0", postmaster)["postgres"]
    finally:
        for c in conns:
            await c.close()
    backends_s = (spent["claim"] + spent["finish"]) / 1e9
    other_s = sum(t - server0.get(pid, 0.0) for pid, t in server1.items() if pid not in backends)
    return {
        "done": done,
        "drain_us": backends_s / done * 1e6,
        "claim_us": spent["claim"] / 1e3 / done,
        "finish_us": spent["finish"] / 1e3 / done,
        "other_us": other_s / done * 1e6,
        "jobs_per_s": done / wall,
    }


def _check(dsn: str, variant: str, jobs: int) -> None:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM pgjobs.jobs WHERE status = 'done'),"
            " (SELECT count(*) FROM pgjobs.job_events),"
            " (SELECT count(*) FROM pgjobs.job_events WHERE seq = 3 AND type = 'content_job.done'),"
            " (SELECT count(*) FROM pgjobs.job_queue)"
        ).fetchone()
    assert row is not None
    if tuple(row) != (jobs, 3 * jobs, jobs, 0):
        raise RuntimeError(f"{variant}: (done, events, done events, queue rows) = {row}")


def run(server_dsn: str, variant: str, jobs: int, clients: int) -> dict[str, float]:
    with variant_db(server_dsn, variant) as dsn:
        enqueue_us = asyncio.run(_enqueue(dsn, variant, jobs))
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")
            conn.execute("CHECKPOINT")
        r = asyncio.run(_drain(dsn, variant, clients))
        if r["done"] != jobs:
            raise RuntimeError(f"{variant}: drained {r['done']} of {jobs}")
        _check(dsn, variant, jobs)
    return {**r, "enqueue_us": enqueue_us}


METRICS = ("drain_us", "claim_us", "finish_us", "other_us", "jobs_per_s", "enqueue_us")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.narrow", description=__doc__)
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 2])
    args = p.parse_args(argv)
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with pg.server() as server_dsn:
        for rnd in range(args.rounds):
            for clients in args.clients:
                for variant in VARIANTS:
                    r = run(server_dsn, variant, args.jobs, clients)
                    results.setdefault((variant, clients), []).append(r)
                    print(
                        f"[{rnd + 1}/{args.rounds}] {variant}, {clients} client(s): "
                        + ", ".join(f"{k} {r[k]:,.1f}" for k in METRICS),
                        flush=True,
                    )
    print(
        f"\n{args.jobs:,} jobs, claim+finish of {BATCH}, median (min–max) of {args.rounds}; "
        "CPU in µs per job:\n"
    )
    print(
        "| schema | clients | backends, drain | of which claim | of which finish "
        "| other server processes | jobs/s | enqueue (backend) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (variant, clients), runs in results.items():
        cells = [fmt(summary([r[k] for r in runs])) for k in METRICS]
        print(f"| {variant} | {clients} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
