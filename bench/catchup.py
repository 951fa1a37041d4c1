"""What the gateway's periodic catch-up costs (pgjobs.gateway.jobreader).

``python -m bench.catchup [--subscribers 10000] [--rounds 20] [--stale 0 100]``

Every ``PGJOBS_GATEWAY_CATCH_UP_SECONDS`` the gateway's job reader runs one round for
every job stream of the process (one query: each watched job's events after the seq its
streams have reached) and one query for its company feeds (which have events after
their cursor). This times that round, in process, on a real GatewayState (its pool, its
fan-out, its job reader; the LISTEN connection is up but nothing is sent):

On a fresh database of a private embedded server (bench.pg), ``--subscribers`` running
jobs of one company, each with a claim and two progress events, plus ``--others``
finished jobs of other companies (their events fill the table and its indexes), one
fan-out subscription per running job (as a job stream holds, its seq reached = the job's
current seq) and one company stream's feed. Then ``--rounds`` catch-up rounds for each
``--stale`` count and ``--keys-per-query`` (interleaved, the order reversed every other
round): before each round, that many of the watched jobs get a
progress transition committed with the doorbell on and never rung, which the round must
deliver. Per round: wall time and this process's CPU (the gateway's side: building the
parameters, decoding and delivering rows), medians (min–max); and the CPU of the pool's
PostgreSQL backends (from /proc, whose 10 ms ticks are too coarse for one round: their
total over a count's rounds, divided by the rounds); and the longest stall of the event
loop during the round (a task that wakes every millisecond records how late it woke),
which is what the round adds at worst to a live event's latency. Linux only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg

from bench import pg
from bench.procs import cpu_seconds


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


async def _fill(dsn: str, subscribers: int, others: int) -> list[tuple[uuid.UUID, int]]:
    """The watched jobs (running, two progress events each) and the others (done);
    returns the watched jobs' (id, lease token)."""
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with await Client.connect(dsn, max_size=2) as client:
        for start in range(0, others, 5_000):
            n = min(5_000, others - start)
            await client.enqueue_many(
                [JobSpec(f"other-{i % 100}", "bench.other") for i in range(n)]
            )
        for start in range(0, subscribers, 5_000):
            n = min(5_000, subscribers - start)
            await client.enqueue_many([JobSpec("bench", "bench.sse") for _ in range(n)])
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "UPDATE pgjobs.jobs SET status = 'done', event_seq = event_seq + 1,"
            " last_event = 'content_job.done', finished_at = now(), updated_at = now()"
            " WHERE job_type = 'bench.other'"
        )
        await conn.execute(
            "UPDATE pgjobs.jobs SET status = 'running', attempts = 1, lease_token = 1,"
            " worker_id = 'bench', lease_expires_at = now() + interval '1 hour',"
            " started_at = now(), event_seq = event_seq + 1,"
            " last_event = 'content_job.running', updated_at = now()"
            " WHERE job_type = 'bench.sse'"
        )
        for step in (1, 2):
            await conn.execute(
                "UPDATE pgjobs.jobs SET progress_fraction = %s, progress_message = 'step',"
                " event_seq = event_seq + 1, last_event = 'content_job.progress',"
                " updated_at = now() WHERE job_type = 'bench.sse'",
                [step / 10],
            )
        await conn.execute("VACUUM ANALYZE pgjobs.job_rows")
        await conn.execute("VACUUM ANALYZE pgjobs.job_events")
        cur = await conn.execute(
            "SELECT id, lease_token FROM pgjobs.jobs WHERE job_type = 'bench.sse'"
        )
        return [(row[0], row[1]) for row in await cur.fetchall()]


async def _unrung(dsn: str, jobs: list[tuple[uuid.UUID, int]]) -> None:
    """A progress transition on each of ``jobs``, committed with the doorbell on, no ring."""
    from pgjobs import doorbell
    from pgjobs.queries import QUERIES

    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    async with conn, conn.transaction():
        await doorbell.doorbell_on(conn)
        for job_id, lease in jobs:
            params = {
                "id": job_id,
                "lease_token": lease,
                "fraction": 0.5,
                "message": "unrung",
                "now": None,
            }
            await conn.execute(QUERIES["job_progress_if_leased"], params)


async def _tick(stalls: list[float]) -> None:
    """Wakes every millisecond; records how late each wake-up was: the event loop's stalls,
    which is what a catch-up round adds to a live event's latency at worst."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + 0.001
        await asyncio.sleep(0.001)
        stalls.append(max(0.0, loop.time() - due))


async def _backend_cpu(dsn: str) -> float:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgjobs-gateway'"
            " AND datname = current_database()"
        )
        pids = [row[0] for row in await cur.fetchall()]
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):  # a pool connection replaced meanwhile
            total += cpu_seconds(pid)
    return total


async def _measure(args: argparse.Namespace, dsn: str) -> dict[str, Any]:
    from pgjobs.gateway.settings import GatewaySettings
    from pgjobs.gateway.state import GatewayState
    from pgjobs.storage import LocalStorage

    jobs = await _fill(dsn, args.subscribers, args.others)
    settings = GatewaySettings(catch_up_seconds=3600.0, pool_size=2)
    state = GatewayState(dsn, settings, LocalStorage(Path(args.storage)))
    await state.start()
    try:
        await asyncio.wait_for(state.listener.connected.wait(), timeout=30)
        for job_id, _ in jobs:
            state.fanout.subscribe_job("bench", job_id).reached(4)
        await state.company_feeds.attach("bench")
        reader = state.job_reader
        await reader.catch_up()  # warm: plans cached, pool connections open
        from pgjobs.gateway import jobreader

        variants = [(k, n) for k in args.keys_per_query for n in args.stale]
        results: dict[tuple[int, int], dict[str, list[float]]] = {
            v: {"ms": [], "gateway_cpu_ms": [], "db_cpu_ms": [], "delivered": [], "stall_ms": []}
            for v in variants
        }
        cursor = 0
        for r in range(args.rounds):
            for k, n in variants if r % 2 == 0 else variants[::-1]:
                jobreader.KEYS_PER_QUERY = k  # type: ignore[misc]  # the variant under test
                stale = jobs[cursor : cursor + n]
                cursor = (cursor + n) % max(1, len(jobs) - n)
                if stale:
                    await _unrung(dsn, stale)
                db0, cpu0, t0 = await _backend_cpu(dsn), time.process_time(), time.perf_counter()
                stalls: list[float] = []
                ticker = asyncio.create_task(_tick(stalls))
                delivered = await reader.catch_up()
                wall = time.perf_counter() - t0
                ticker.cancel()
                cpu = time.process_time() - cpu0
                db = await _backend_cpu(dsn) - db0
                # Empty the queues, as the streams would have.
                for subs in list(state.fanout._by_job.values()):
                    for sub in subs:
                        while not sub.queue.empty():
                            sub.queue.get_nowait()
                row = results[(k, n)]
                row["ms"].append(wall * 1000)
                row["gateway_cpu_ms"].append(cpu * 1000)
                row["db_cpu_ms"].append(db * 1000)
                row["delivered"].append(float(delivered))
                row["stall_ms"].append(max(stalls, default=0.0) * 1000)
        return {f"{k} {n}": r for (k, n), r in results.items()}
    finally:
        await state.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--others", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--stale", type=int, nargs="+", default=[0, 100])
    # The job reader's keys per query (jobreader.KEYS_PER_QUERY), each a variant.
    parser.add_argument("--keys-per-query", type=int, nargs="+", default=[1_000])
    parser.add_argument("--storage", default="/tmp/pgjobs-bench-catchup-storage")  # noqa: S108
    args = parser.parse_args()
    with pg.server() as server, pg.database(server) as dsn:
        res = asyncio.run(_measure(args, dsn))
    print(f"catch-up round, {args.subscribers:,} job subscribers, {args.rounds} rounds each:")
    print(
        "| keys per query | stale jobs | events delivered | wall (ms) | gateway CPU (ms) "
        "| longest event-loop stall (ms) | PostgreSQL CPU (ms, mean) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, r in res.items():
        k, n = key.split()
        print(
            f"| {k} | {n} | {statistics.median(r['delivered']):.0f} | {_spread(r['ms'])} | "
            f"{_spread(r['gateway_cpu_ms'])} | {_spread(r['stall_ms'])} | "
            f"{statistics.mean(r['db_cpu_ms']):.2f} |"
        )


if __name__ == "__main__":
    main()
