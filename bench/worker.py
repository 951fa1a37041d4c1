"""One worker process of one queue, started by the harness:

    python -m bench.worker SYSTEM DSN [--concurrency N] [--batch B] [--driver D]
        [--claimers K] [--claim plain] [--mode M] [--expect C]

Protocol on stdin/stdout, so that every queue is timed the same way: the process imports
its library and builds its worker, prints ``ready``, waits for a ``go`` line, runs, and
prints ``done <time.monotonic()>`` the moment the library's run call returns (before
interpreter teardown). In ``drain`` mode the library stops by itself once nothing is left
(pgjobs burst mode, procrastinate ``wait=False``, pgqueuer drain mode; awa has none, see
run_awa); in ``serve`` mode it runs until a ``stop`` line (or end of input) arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from bench import stamps
from bench.systems import asyncpg_uri, awa_url


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _wait_line(expected: str) -> None:
    line = sys.stdin.readline().strip()
    if line != expected:
        raise SystemExit(f"bench.worker: expected {expected!r} on stdin, got {line!r}")


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """serve mode: call stop() in the loop when 'stop' or end of input arrives."""

    def reader() -> None:
        sys.stdin.readline()
        loop.call_soon_threadsafe(stop)

    threading.Thread(target=reader, daemon=True).start()


async def run_pgjobs(args: argparse.Namespace) -> None:
    from bench.handlers import registry
    from pgjobs.config import WorkerSettings
    from pgjobs.worker import Worker

    if args.claim == "plain":
        from bench.plain_claim import use_plain_claim

        use_plain_claim()  # pgjobs' claim without fairness (scenario 9)
    settings = WorkerSettings.from_env(concurrency=args.concurrency)
    # As `pgjobs worker` runs it (collector settings included).
    worker = Worker(args.dsn, registry, settings, burst=args.mode == "drain", tune_gc=True)
    _say("ready")
    await asyncio.to_thread(_wait_line, "go")
    if args.mode == "serve":
        _watch_stdin(asyncio.get_running_loop(), worker.stop)
    await worker.run()


async def run_procrastinate(args: argparse.Namespace) -> None:
    from bench.handlers import procrastinate_app

    app = procrastinate_app(args.dsn, pool_size=args.concurrency + 2)
    async with app.open_async():
        _say("ready")
        await asyncio.to_thread(_wait_line, "go")
        task = asyncio.create_task(
            app.run_worker_async(
                concurrency=args.concurrency,
                wait=args.mode == "serve",
                install_signal_handlers=False,
            )
        )
        if args.mode == "serve":
            _watch_stdin(asyncio.get_running_loop(), task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def run_pgqueuer(args: argparse.Namespace) -> None:
    from datetime import timedelta

    import asyncpg
    from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver, AsyncpgPoolDriver
    from pgqueuer.core.qm import QueueManager
    from pgqueuer.domain.types import QueueExecutionMode
    from pgqueuer.queries import Queries

    from bench.handlers import pgqueuer_register

    uri = asyncpg_uri(args.dsn)
    pool = None
    if args.driver == "asyncpg-pool":
        pool = await asyncpg.create_pool(uri, min_size=2, max_size=4)
        driver: Any = AsyncpgPoolDriver(pool)
    else:
        conn = await asyncpg.connect(uri)
        driver = AsyncpgDriver(conn)
    qm = QueueManager(Queries(driver))
    pgqueuer_register(qm)
    _say("ready")
    await asyncio.to_thread(_wait_line, "go")
    if args.mode == "serve":
        _watch_stdin(asyncio.get_running_loop(), qm.shutdown.set)
    await qm.run(
        batch_size=args.batch or 10,
        mode=QueueExecutionMode.drain if args.mode == "drain" else QueueExecutionMode.continuous,
        max_concurrent_tasks=args.concurrency or None,
        dequeue_timeout=timedelta(seconds=30),
    )
    if pool is not None:
        await pool.close()


# How often an awa drain counts its completions: a few ms of granularity on a drain of
# seconds, for one sub-millisecond query per poll.
AWA_DRAIN_POLL_SECONDS = 0.01
# A hang guard for starting and stopping awa's runtime (shutdown drains in-flight jobs
# for up to 5 s of it).
AWA_STOP_TIMEOUT = 60.0


async def run_awa(args: argparse.Namespace) -> None:
    """awa's runtime has no burst mode. In drain mode the harness passes ``--expect``: the
    count of completed jobs at which the drain is over (those completed before it plus
    the jobs queued; bench.drain.drain). This process starts the runtime and every
    AWA_DRAIN_POLL_SECONDS counts completions in awa's own tables
    (bench.systems.AWA_COMPLETED_SQL: sub-ms, where awa's awa.jobs view costs seconds at
    100,000 queued jobs); once the count reaches it, it calls ``shutdown``. Completions
    count once committed, so that is the moment pgjobs' burst mode and pgqueuer's drain
    mode return too; like theirs, the time reported includes stopping the runtime, and
    awa pays the polling on top (at most one interval). With several processes, each
    stops once all jobs (not only its own) are done. The harness then counts the jobs
    left through awa's view, so a count that ran ahead of the drain fails the run.
    Stopping is bounded (AWA_STOP_TIMEOUT): past it this process fails without its
    ``done`` line, and the harness reports the measurement as failed."""
    import awa
    import psycopg

    from bench.handlers import awa_register
    from bench.systems import AWA_COMPLETED_SQL

    if args.mode == "drain" and args.expect is None:
        raise SystemExit("bench.worker awa: drain mode needs --expect")

    async def completed(conn: psycopg.AsyncConnection[Any]) -> int:
        row = await (await conn.execute(AWA_COMPLETED_SQL)).fetchone()
        return int(row[0]) if row else 0

    client = awa.AsyncClient(awa_url(args.dsn), max_connections=20)
    awa_register(client)
    queue: dict[str, Any] = {"name": "bench", "max_workers": args.concurrency}
    if args.batch:
        queue["claim_batch_size"] = args.batch
    if args.claimers:
        queue["claimers"] = args.claimers
    poller = await psycopg.AsyncConnection.connect(args.dsn, autocommit=True)
    _say("ready")
    await asyncio.to_thread(_wait_line, "go")
    try:
        # 50 ms: the poll interval awa's own benchmarks run with (its default is 200 ms).
        async with asyncio.timeout(AWA_STOP_TIMEOUT):
            await client.start([queue], poll_interval_ms=50)
        if args.mode == "serve":
            stop = asyncio.Event()
            _watch_stdin(asyncio.get_running_loop(), stop.set)
            await stop.wait()
        else:
            # A query, not an event: nothing in-process knows the total. No deadline
            # here: the harness gives up on a drain that stops making progress.
            while True:
                if await completed(poller) >= args.expect:
                    break
                await asyncio.sleep(AWA_DRAIN_POLL_SECONDS)
    finally:
        async with asyncio.timeout(AWA_STOP_TIMEOUT):
            await client.shutdown(timeout_ms=5000)
            await client.close()
            await poller.close()


RUNNERS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "pgjobs": run_pgjobs,
    "procrastinate": run_procrastinate,
    "pgqueuer": run_pgqueuer,
    "awa": run_awa,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker")
    parser.add_argument("system", choices=sorted(RUNNERS))
    parser.add_argument("dsn")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--batch", type=int, default=0)
    parser.add_argument("--driver", default="")
    parser.add_argument("--claimers", type=int, default=0)
    parser.add_argument("--claim", choices=("fair", "plain"), default="fair", help="pgjobs")
    parser.add_argument("--mode", choices=("drain", "serve"), default="drain")
    parser.add_argument("--expect", type=int, help="awa drain: completed count at the end")
    args = parser.parse_args()
    os.environ.setdefault("PGJOBS_HOME", str(Path(tempfile.gettempdir()) / "pgjobs-bench-home"))
    coro = RUNNERS[args.system](args)
    if args.system in ("pgqueuer", "pgjobs"):
        # Both CLIs (`pgq run`, `pgjobs worker`) run on uvloop when it is installed, and
        # both depend on it. procrastinate's runs on asyncio's own loop.
        import uvloop

        uvloop.run(coro)
    else:
        # procrastinate's and awa's documented runs use asyncio's own loop.
        asyncio.run(coro)
    _say(f"done {time.monotonic()!r}")
    stamps.dump()


if __name__ == "__main__":
    main()
