"""The claim under sustained churn, against the time since job_queue's last VACUUM (issue 16).

``python -m bench.churn [--seconds 150] [--rate 12000] [--depth 5000] [--rounds 2]
[--variants default vacuum=0]`` (also: table, naptime=5s, vacuum=10)

A claim leaves the old version of each queue row it takes in job_queue_fair_idx and
job_queue_claim_idx (partial indexes, WHERE lease_expires_at IS NULL) until VACUUM, and
the claim's first ring probe of a company walks those entries (killed ones cheaply, but
page by page). A drain of seconds never meets autovacuum; a worker running for hours meets
it at most every ``autovacuum_naptime``. This runs the hours' shape for ``--seconds``:

On one private embedded server (bench.pg), for each round and each variant in turn
(interleaved), a fresh database with ``--depth`` queued no-op jobs (settled: VACUUM
ANALYZE, CHECKPOINT), one bench.worker pgjobs process serving it (its default
concurrency), and producers in this process enqueueing chunks of 500 (Client.enqueue_many)
at up to ``--rate`` jobs/s while the queue is under ``--depth`` jobs (read from the audit
log's identity sequence: an enqueue, a claim and a finish write one event each). Every 5 s
a row: jobs done per second, the queue's depth, PostgreSQL CPU per job done (every process
of the server, the producers' inserts and autovacuum included) and the worker's, the ring's
first probe run alone (EXPLAIN ANALYZE: its time and the index pages it read),
job_queue_fair_idx pages read per job done (pg_statio), job_queue's dead tuples and
autovacuums and other vacuums (the worker's own, pgjobs.queue_vacuum; pg_stat_user_tables),
the index's size. A worker that keeps up runs at
``--rate``: compare CPU per job then. Where autovacuum's visits fall in a run depends on
the launcher's schedule, so compare runs by their rows, not only their medians.

Variants: ``default`` (the schema as migrated, the server's and the worker's defaults:
the worker vacuums the queue every 5 s); ``table`` (TABLE_PARAMS set on pgjobs.job_queue
first); ``naptime=<value>`` (autovacuum_naptime set on the server for the run, reset
after); ``vacuum=<seconds>`` (the worker's PGJOBS_QUEUE_VACUUM_SECONDS; ``vacuum=0``: the
worker leaves the queue to autovacuum). Results go to bench/results/churn/. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

from bench import pg, systems
from bench.cpusplit import Sampler, postmaster_of
from bench.drain import settle
from bench.procs import WorkerGroup

CHUNK = 500
VACUUM_ENV = "PGJOBS_QUEUE_VACUUM_SECONDS"
PRODUCERS = 2
SAMPLE_SECONDS = 5.0
TABLE_PARAMS = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "2000",
    "autovacuum_vacuum_insert_scale_factor": "0",
    "autovacuum_vacuum_insert_threshold": "2000",
    "autovacuum_vacuum_cost_delay": "0",
}
# The ring's first probe of a company, as job_claim_batch runs it after wrapping around.
PROBE = """EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
SELECT q.company_id, q.priority, q.run_at, q.job_id FROM pgjobs.job_queue q
WHERE q.lease_expires_at IS NULL
ORDER BY q.company_id, q.priority DESC, q.run_at, q.job_id LIMIT 1"""
STATS = """SELECT
    (SELECT last_value FROM pgjobs.job_events_id_seq) AS events,
    t.n_dead_tup, t.autovacuum_count, t.vacuum_count,
    extract(epoch FROM now() - t.last_autovacuum)::float8 AS since_autovacuum,
    i.idx_blks_hit + i.idx_blks_read AS fair_blocks,
    pg_relation_size('pgjobs.job_queue_fair_idx') AS fair_bytes,
    c.reltuples, c.relpages
FROM pg_stat_user_tables t, pg_statio_user_indexes i, pg_class c
WHERE t.relid = 'pgjobs.job_queue'::regclass
  AND i.indexrelid = 'pgjobs.job_queue_fair_idx'::regclass
  AND c.oid = t.relid"""


@dataclass
class Load:
    """What the producers share: jobs enqueued since the start, the event count then."""

    rate: float
    depth: int
    events0: int
    enqueued: int = 0
    next_at: float = 0.0

    def depth_from(self, events: int) -> int:
        """Queued jobs, estimated from the audit events written since the start (one
        per enqueue, claim and finish): claims are taken as half of the claims and
        finishes, short by half the jobs in flight, so the depth reads up to half the
        worker's concurrency high."""
        claimed = (events - self.events0 - self.enqueued) // 2
        return self.enqueued - claimed


async def _produce(dsn: str, load: Load, until: float) -> None:
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with (
        await Client.connect(dsn, max_size=1) as client,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        while (now := time.monotonic()) < until:
            # Pacing at --rate: each chunk takes the next free slot.
            at = max(load.next_at, now)
            load.next_at = at + CHUNK / load.rate
            await asyncio.sleep(at - now)
            cur = await conn.execute("SELECT last_value FROM pgjobs.job_events_id_seq")
            row = await cur.fetchone()
            assert row is not None
            if load.depth_from(int(row[0])) >= load.depth:
                continue
            load.enqueued += CHUNK  # counted first: the other producer reads it meanwhile
            await client.enqueue_many(JobSpec("bench", "noop") for _ in range(CHUNK))


async def _stats(conn: psycopg.AsyncConnection[Any]) -> dict[str, Any]:
    out = await (await conn.cursor(row_factory=dict_row).execute(STATS)).fetchone()
    assert out is not None
    plan = (await (await conn.execute(PROBE)).fetchone())[0][0]  # type: ignore[index]
    out["probe_ms"] = plan["Execution Time"]
    out["probe_pages"] = plan["Plan"]["Shared Hit Blocks"] + plan["Plan"]["Shared Read Blocks"]
    return out


async def _run(dsn: str, load: Load, seconds: float, sampler: Sampler) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    until = t0 + seconds
    producers = [asyncio.create_task(_produce(dsn, load, until)) for _ in range(PRODUCERS)]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        last = await _stats(conn)
        last_cpu = {k: sampler.used(k) for k in ("postgres", "worker")}
        last_done, last_t = 0, t0
        for k in range(1, int(seconds / SAMPLE_SECONDS) + 1):
            await asyncio.sleep(max(0.0, t0 + k * SAMPLE_SECONDS - time.monotonic()))
            now, cur = time.monotonic(), await _stats(conn)
            cpu = {k: sampler.used(k) for k in ("postgres", "worker")}
            # finished = (events - enqueued - in flight) / 2, taken as (events - enqueued) / 2
            done = (cur["events"] - load.events0 - load.enqueued) // 2
            jobs = max(done - last_done, 1)
            rows.append(
                {
                    "t": round(now - t0),
                    "jobs_per_s": (done - last_done) / (now - last_t),
                    "depth": load.depth_from(cur["events"]),
                    "pg_us": (cpu["postgres"] - last_cpu["postgres"]) / jobs * 1e6,
                    "worker_us": (cpu["worker"] - last_cpu["worker"]) / jobs * 1e6,
                    "probe_ms": cur["probe_ms"],
                    "probe_pages": cur["probe_pages"],
                    "fair_pages_per_job": (cur["fair_blocks"] - last["fair_blocks"]) / jobs,
                    "dead": cur["n_dead_tup"],
                    "autovacuums": cur["autovacuum_count"] - last["autovacuum_count"],
                    "vacuums": cur["vacuum_count"] - last["vacuum_count"],
                    "since_autovacuum": cur["since_autovacuum"],
                    "fair_mb": cur["fair_bytes"] / 2**20,
                    # The planner's idea of job_queue (what VACUUM and ANALYZE leave).
                    "reltuples": cur["reltuples"],
                    "relpages": cur["relpages"],
                }
            )
            print(_line(rows[-1]), flush=True)
            last, last_cpu, last_done, last_t = cur, cpu, done, now
    await asyncio.gather(*producers)
    return rows


HEADER = (
    "   t  jobs/s  depth  PG µs/job  worker µs/job  probe ms  probe pages  fair pages/job"
    "    dead  autovac  vacuum  since av s  fair MB  reltuples"
)


def _line(r: dict[str, Any]) -> str:
    since = "-" if r["since_autovacuum"] is None else f"{r['since_autovacuum']:.0f}"
    return (
        f"{r['t']:4d} {r['jobs_per_s']:7,.0f} {r['depth']:6,d} {r['pg_us']:10.1f} "
        f"{r['worker_us']:14.1f} {r['probe_ms']:9.2f} {r['probe_pages']:12,d} "
        f"{r['fair_pages_per_job']:15.2f} {r['dead']:7,d} {r['autovacuums']:8d} "
        f"{r['vacuums']:7d} {since:>11} {r['fair_mb']:8.1f} {r['reltuples']:10,.0f}"
    )


def _set_naptime(server_dsn: str, value: str | None) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        if value is None:
            conn.execute("ALTER SYSTEM RESET autovacuum_naptime")
        else:
            conn.execute(
                sql.SQL("ALTER SYSTEM SET autovacuum_naptime = {}").format(sql.Literal(value))
            )
        conn.execute("SELECT pg_reload_conf()")


def one_run(
    server_dsn: str, variant: str, args: argparse.Namespace, logs: Path
) -> list[dict[str, Any]]:
    """One variant's run on a fresh database: the samples."""
    naptime = variant.removeprefix("naptime=") if variant.startswith("naptime=") else None
    vacuum = variant.removeprefix("vacuum=") if variant.startswith("vacuum=") else None
    with pg.database(server_dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            if variant == "table":
                conn.execute(
                    sql.SQL("ALTER TABLE pgjobs.job_queue SET ({})").format(
                        sql.SQL(", ").join(
                            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v))
                            for k, v in TABLE_PARAMS.items()
                        )
                    )
                )
            elif variant != "default" and naptime is None and vacuum is None:
                raise SystemExit(f"bench.churn: unknown variant {variant!r}")
        asyncio.run(_fill(dsn, args.depth))
        settle(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            events0 = conn.execute("SELECT last_value FROM pgjobs.job_events_id_seq").fetchone()
        load = Load(args.rate, args.depth, int(events0[0]) - args.depth)  # type: ignore[index]
        load.enqueued = args.depth
        if naptime is not None:
            _set_naptime(server_dsn, naptime)
        config = systems.WORKER_DEFAULTS["pgjobs"]
        sampler = Sampler(marker=f"bench.worker pgjobs {dsn}", postmaster=postmaster_of(dsn))
        sampler.start()
        # The worker processes inherit this process's environment (bench.procs).
        saved = os.environ.get(VACUUM_ENV)
        if vacuum is not None:
            os.environ[VACUUM_ENV] = vacuum
        try:
            with WorkerGroup.of_queue("pgjobs", dsn, config, 1, mode="serve", log_dir=logs) as g:
                sampler.from_now()
                g.go()
                rows = asyncio.run(_run(dsn, load, args.seconds, sampler))
                g.stop()
                g.wait(120.0)
        finally:
            sampler.stop.set()
            sampler.join()
            if saved is None:
                os.environ.pop(VACUUM_ENV, None)
            else:
                os.environ[VACUUM_ENV] = saved
            if naptime is not None:
                _set_naptime(server_dsn, None)
    return rows


async def _fill(dsn: str, n: int) -> None:
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with await Client.connect(dsn, max_size=1) as client:
        for start in range(0, n, CHUNK):
            await client.enqueue_many(
                JobSpec("bench", "noop") for _ in range(min(CHUNK, n - start))
            )


def summarize(rows: list[dict[str, Any]]) -> str:
    """Medians over a run's samples after the first 10 s (the worker warming up)."""
    kept = [r for r in rows if r["t"] > 10] or rows

    def med(key: str) -> float:
        return statistics.median(r[key] for r in kept)

    return (
        f"jobs/s {med('jobs_per_s'):,.0f}, PG {med('pg_us'):.1f} µs/job, worker "
        f"{med('worker_us'):.1f} µs/job, probe {med('probe_ms'):.2f} ms (max "
        f"{max(r['probe_ms'] for r in kept):.2f}), fair pages/job "
        f"{med('fair_pages_per_job'):.2f}, autovacuums {sum(r['autovacuums'] for r in rows)}, "
        f"vacuums {sum(r.get('vacuums', 0) for r in rows)}"
    )


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.churn")
    p.add_argument("--seconds", type=float, default=150.0)
    p.add_argument("--rate", type=float, default=12_000.0)
    p.add_argument("--depth", type=int, default=5_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["default", "vacuum=0"])
    p.add_argument("--out", type=Path, default=Path("bench/results/churn"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: list[dict[str, Any]] = []
    with pg.server() as server_dsn:
        for rnd in range(args.rounds):
            for variant in args.variants:
                print(f"\n== round {rnd + 1}, {variant}\n{HEADER}", flush=True)
                rows = one_run(server_dsn, variant, args, args.out / "logs")
                results.append({"round": rnd + 1, "variant": variant, "rows": rows})
                print(f"-- {variant}: {summarize(rows)}", flush=True)
                (args.out / f"{stamp}.json").write_text(
                    json.dumps(
                        {"args": vars(args) | {"out": str(args.out)}, "runs": results},
                        default=float,
                    )
                )
    print("\nsummary (medians of each run's 5 s samples after the first 10 s):")
    for r in results:
        print(f"round {r['round']} {r['variant']:>12}: {summarize(r['rows'])}")


if __name__ == "__main__":
    main()
