"""CPU per job of a bulk enqueue, for A/B comparisons of pgjobs versions.

``python -m bench.enqueue_cpu [--rounds 3] [--batches 20] [--size 1000] SRC [SRC ...]``

Each SRC is a pgjobs checkout (a directory holding ``src/pgjobs`` and ``sql/``; ``.`` for
this one, ``git archive <commit> | tar -x -C DIR`` for another commit). One PostgreSQL
(bench.pg.server) serves the whole run; each round runs every SRC once, in order, so the
versions are interleaved under the same load. One run is a child process with that
SRC's ``src`` first on its path: a fresh database migrated by that version, one warm-up
batch, then ``--batches`` ``Client.enqueue_many`` calls of ``--size`` ``JobSpec("bench",
"noop")`` jobs (as scenario 2's bulk mode). It reports, per job: the client's CPU
(``time.process_time`` around the calls, spec building included), the CPU of the pool's
one backend and of the server's other processes (walwriter, checkpointer, autovacuum:
/proc, between two readings), and the wall rate. Prints each run and the medians with
min–max per SRC. Linux only. Behind docs/benchmarks.md's "Bulk enqueue".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bench import pg
from bench.cpusplit import cpu_readings, postmaster_of
from bench.procs import cpu_seconds

BENCH_ROOT = Path(__file__).resolve().parent.parent
METRICS = ("client_us", "backend_us", "server_other_us", "jobs_per_s")


async def _measure(dsn: str, batches: int, size: int) -> dict[str, float]:
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with await Client.connect(dsn, max_size=1) as client:
        async with client.pool.connection() as conn:
            backend = conn.info.backend_pid
        await client.enqueue_many(JobSpec("bench", "noop") for _ in range(size))  # warm-up
        postmaster = postmaster_of(dsn)
        before = cpu_readings("\0", postmaster)  # no worker processes: the marker never matches
        b0, c0, t0 = cpu_seconds(backend), time.process_time(), time.monotonic()
        for _ in range(batches):
            await client.enqueue_many(JobSpec("bench", "noop") for _ in range(size))
        c1, t1, b1 = time.process_time(), time.monotonic(), cpu_seconds(backend)
        after = cpu_readings("\0", postmaster)
    jobs = batches * size
    server = sum(t - before["postgres"].get(pid, 0.0) for pid, t in after["postgres"].items())
    return {
        "client_us": (c1 - c0) / jobs * 1e6,
        "backend_us": (b1 - b0) / jobs * 1e6,
        "server_other_us": (server - (b1 - b0)) / jobs * 1e6,
        "jobs_per_s": jobs / (t1 - t0),
    }


def child(server_dsn: str, batches: int, size: int) -> None:
    from pgjobs import migrate

    name = f"bench_enq_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server_dsn, dbname=name)
    try:
        migrate.apply(dsn)
        pg.checkpoint(dsn)
        print(json.dumps(asyncio.run(_measure(dsn, batches, size))))
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def _run(src: Path, server_dsn: str, batches: int, size: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": f"{src / 'src'}{os.pathsep}{BENCH_ROOT}"}
    argv = [sys.executable, "-m", "bench.enqueue_cpu", "--child", server_dsn]
    argv += ["--batches", str(batches), "--size", str(size)]
    out = subprocess.run(  # noqa: S603 - our own interpreter and module
        argv, env=env, cwd=BENCH_ROOT, capture_output=True, text=True, check=False
    )
    if out.returncode:
        raise RuntimeError(f"{src}: run failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.enqueue_cpu")
    p.add_argument("srcs", nargs="*", type=Path, metavar="SRC")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--size", type=int, default=1000)
    p.add_argument("--child", metavar="SERVER_DSN", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.batches, args.size)
        return
    srcs = [s.resolve() for s in args.srcs] or [BENCH_ROOT]
    runs: dict[Path, list[dict[str, float]]] = {s: [] for s in srcs}
    with pg.server() as server_dsn:
        for r in range(args.rounds):
            for src in srcs:
                res = _run(src, server_dsn, args.batches, args.size)
                runs[src].append(res)
                cells = ", ".join(f"{k} {res[k]:,.1f}" for k in METRICS)
                print(f"round {r + 1} {src}: {cells}", flush=True)
    for src, results in runs.items():
        print(f"{src} ({len(results)} runs of {args.batches} x {args.size:,} jobs):")
        for key in METRICS:
            values = [res[key] for res in results]
            print(
                f"  {key}: median {statistics.median(values):,.1f} "
                f"({min(values):,.1f}–{max(values):,.1f})"
            )


if __name__ == "__main__":
    main()
