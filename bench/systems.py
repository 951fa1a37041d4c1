"""The four queues behind one small interface: install, enqueue, count finished jobs.

Each queue is driven through its own public API, with the settings its documentation
gives for throughput (see WORKER_DEFAULTS and docs/benchmarks.md):

* pgjobs: ``pgjobs.client.Client.enqueue_many`` (one statement), ``pgjobs.worker.Worker``
  in burst mode (the code ``pgjobs worker`` runs), asyncio's default loop as the CLI uses.
* procrastinate: ``Task.batch_defer_async``, ``App.run_worker_async(wait=False)``.
* pgqueuer: ``Queries.enqueue`` with lists (one statement), ``QueueManager.run`` in drain
  mode over asyncpg, under uvloop as its CLI runs it.
* awa (``awa-pg``: a Rust runtime with a Python SDK): ``AsyncClient.enqueue_many_copy``
  (COPY straight into its queue storage, the bulk path its README names for
  high-volume Python producers), ``AsyncClient.start`` with one queue config
  (max_workers, claimers, claim_batch_size) on asyncio's loop as its docs run it; it has
  no burst mode (see bench.worker.run_awa).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

SYSTEMS = ("pgjobs", "procrastinate", "pgqueuer", "awa")


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process's settings. concurrency: jobs in flight (awa: the queue's
    max_workers); batch: pgqueuer's batch_size, awa's claim_batch_size (pgjobs sizes its
    claims from free slots, procrastinate claims one job); claimers: awa's claim loops
    per queue (0: its default); claim: pgjobs' "plain" claim, without fairness
    (bench.plain_claim; "": the fair claim, as shipped)."""

    concurrency: int
    batch: int = 0
    driver: str = ""
    claimers: int = 0
    claim: str = ""

    def label(self) -> str:
        parts = [f"concurrency {self.concurrency or 'unbounded'}"]
        if self.batch:
            parts.append(f"batch {self.batch}")
        if self.claimers:
            parts.append(f"claimers {self.claimers}")
        if self.driver:
            parts.append(self.driver)
        if self.claim:
            parts.append(f"{self.claim} claim")
        return ", ".join(parts)


# Chosen by a sweep on this machine: each queue's fastest configuration for no-op jobs (a
# full run sweeps again and reports the sweep in its summary.md).
WORKER_DEFAULTS: dict[str, WorkerConfig] = {
    # pgjobs: 400, room for two whole claims of 200 out at once (pgjobs.worker: one
    # process +20% jobs/s over 200, docs/benchmarks.md "The claim's shape").
    "pgjobs": WorkerConfig(concurrency=400),
    "procrastinate": WorkerConfig(concurrency=20),
    "pgqueuer": WorkerConfig(concurrency=0, batch=100, driver="asyncpg"),
    # awa: max_workers 500 with its default claim batch and claimers; a quick sweep on a
    # loaded machine (100 to 2,000 workers, 2 and 4 claimers, batches of 100 to 1,000)
    # put 500 ahead of every other setting.
    "awa": WorkerConfig(concurrency=500),
}


def asyncpg_uri(dsn: str) -> str:
    """asyncpg takes URIs only; turn a libpq key=value DSN (Unix socket) into one."""
    params = conninfo_to_dict(dsn)
    user = params.get("user", "postgres")
    query = f"host={params['host']}" if "host" in params else ""
    if "port" in params:
        query += f"&port={params['port']}"
    return f"postgresql://{user}@/{params.get('dbname', 'postgres')}?{query}"


def awa_url(dsn: str) -> str:
    """awa's pool (sqlx) takes URLs only and refuses asyncpg's empty host: the socket
    directory goes in the ``host`` parameter, which overrides the placeholder host."""
    return asyncpg_uri(dsn).replace("@/", "@localhost/", 1)


class Producer(Protocol):
    async def enqueue_one(self, key: str | None = None) -> None: ...
    async def enqueue_bulk(self, n: int) -> None: ...


@asynccontextmanager
async def producer(system: str, dsn: str) -> AsyncIterator[Producer]:
    if system == "pgjobs":
        yield_ = _PgjobsProducer(dsn)
    elif system == "procrastinate":
        yield_ = _ProcrastinateProducer(dsn)  # type: ignore[assignment]
    elif system == "pgqueuer":
        yield_ = _PgqueuerProducer(dsn)  # type: ignore[assignment]
    elif system == "awa":
        yield_ = _AwaProducer(dsn)  # type: ignore[assignment]
    else:
        raise ValueError(system)
    await yield_.open()
    try:
        yield yield_
    finally:
        await yield_.close()


class _PgjobsProducer:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.client: Any = None

    async def open(self) -> None:
        from pgjobs.client import Client

        self.client = await Client.connect(self.dsn)

    async def close(self) -> None:
        await self.client.close()

    async def enqueue_one(self, key: str | None = None) -> None:
        await self.client.enqueue("bench", "noop", {"k": key} if key else None)

    async def enqueue_bulk(self, n: int) -> None:
        from pgjobs.jobspec import JobSpec

        await self.client.enqueue_many(JobSpec("bench", "noop") for _ in range(n))


class _ProcrastinateProducer:
    def __init__(self, dsn: str) -> None:
        from bench.handlers import procrastinate_app

        self.app = procrastinate_app(dsn, pool_size=10)

    async def open(self) -> None:
        await self.app.open_async()

    async def close(self) -> None:
        await self.app.close_async()

    async def enqueue_one(self, key: str | None = None) -> None:
        await self.app.tasks["noop"].defer_async(k=key)

    async def enqueue_bulk(self, n: int) -> None:
        await self.app.tasks["noop"].batch_defer_async(*({} for _ in range(n)))


class _PgqueuerProducer:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.pool: Any = None
        self.queries: Any = None

    async def open(self) -> None:
        import asyncpg
        from pgqueuer.adapters.drivers.asyncpg import AsyncpgPoolDriver
        from pgqueuer.queries import Queries

        self.pool = await asyncpg.create_pool(asyncpg_uri(self.dsn), min_size=1, max_size=10)
        self.queries = Queries(AsyncpgPoolDriver(self.pool))

    async def close(self) -> None:
        await self.pool.close()

    async def enqueue_one(self, key: str | None = None) -> None:
        await self.queries.enqueue("noop", key.encode() if key else None)

    async def enqueue_bulk(self, n: int) -> None:
        await self.queries.enqueue(["noop"] * n, [None] * n, [0] * n)


class _AwaProducer:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.client: Any = None

    async def open(self) -> None:
        import awa

        self.client = awa.AsyncClient(awa_url(self.dsn), max_connections=10)

    async def close(self) -> None:
        await self.client.close()

    async def enqueue_one(self, key: str | None = None) -> None:
        from bench.handlers import AwaNoop

        await self.client.insert(AwaNoop(key), kind="noop", queue="bench")

    async def enqueue_bulk(self, n: int) -> None:
        from bench.handlers import AwaNoop

        await self.client.enqueue_many_copy(
            [AwaNoop() for _ in range(n)], kind="noop", queue="bench"
        )


# Hang guards, not timings: each of these takes seconds at most on a quiet machine.
INSTALL_TIMEOUT = 300.0
COUNT_TIMEOUT = "120s"


async def install(system: str, dsn: str) -> None:
    """Create the queue's schema in a fresh database (pgjobs: already migrated), raising
    TimeoutError after INSTALL_TIMEOUT seconds."""
    async with asyncio.timeout(INSTALL_TIMEOUT):
        await _install(system, dsn)


async def _install(system: str, dsn: str) -> None:
    if system == "procrastinate":
        from bench.handlers import procrastinate_app

        app = procrastinate_app(dsn, pool_size=2)
        async with app.open_async():
            await app.schema_manager.apply_schema_async()
    elif system == "pgqueuer":
        import asyncpg
        from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver
        from pgqueuer.queries import Queries

        conn = await asyncpg.connect(asyncpg_uri(dsn))
        try:
            await Queries(AsyncpgDriver(conn)).install()
        finally:
            await conn.close()
    elif system == "awa":
        import awa

        client = awa.AsyncClient(awa_url(dsn), max_connections=2)
        try:
            await client.migrate()
        finally:
            await client.close()
        # A fresh awa database starts on its "canonical" engine; the first worker to
        # start would switch it to queue storage only while awa.jobs is empty, and the
        # drain enqueues before any worker starts. awa's migration docs give this call
        # as the post-migrate step for fresh installs.
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute("SELECT awa.storage_auto_finalize_if_fresh('awa')")
            row = await cur.fetchone()
        if not row or row[0] is not True:
            raise RuntimeError("awa: storage_auto_finalize_if_fresh did not finalize")


# awa's completed jobs, read from its queue storage's own tables: completions land as
# receipt batches (a claim closed without a lease row) or terminal entries, and when the
# queue ring moves on, a slot whose jobs are all finished is pruned and its count added
# to queue_terminal_rollups (queue_lanes held it before 0.6; awa's migration moves it).
# The awa.jobs view forgets pruned jobs, and costs ~0.1-0.3 s per count at 20,000 jobs
# where this takes under a millisecond, so the awa worker polls it to find a drain's end.
AWA_COMPLETED_SQL = """
    SELECT (SELECT coalesce(sum(completed_count), 0) FROM awa.receipt_completion_batches)
         + (SELECT count(*) FROM awa.done_entries WHERE state = 'completed')
         + (SELECT coalesce(sum(pruned_completed_count), 0) FROM awa.queue_terminal_rollups)
         + (SELECT coalesce(sum(pruned_completed_count), 0) FROM awa.queue_lanes)"""

FINISHED_SQL = {
    "pgjobs": "SELECT count(*) FROM pgjobs.jobs WHERE status = 'done'",
    "procrastinate": "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'",
    "pgqueuer": "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'",
    "awa": AWA_COMPLETED_SQL,
}
LEFT_SQL = {
    "pgjobs": "SELECT count(*) FROM pgjobs.jobs WHERE status IN ('queued', 'running')",
    "procrastinate": "SELECT count(*) FROM procrastinate_jobs WHERE status IN ('todo', 'doing')",
    "pgqueuer": "SELECT count(*) FROM pgqueuer",
    # awa.jobs: awa's view over its queue storage, one row and state per job; jobs not
    # yet finished are never pruned from it.
    "awa": "SELECT count(*) FROM awa.jobs WHERE state IN ('available', 'running', 'scheduled', "
    "'retryable', 'waiting_external')",
}


def counts(system: str, dsn: str, *, with_left: bool = True) -> tuple[int, int]:
    """(finished successfully, still queued or running; -1 without ``with_left``), each
    count cancelled after COUNT_TIMEOUT (psycopg.errors.QueryCanceled). The second is
    skipped before a drain, where nothing counts it (awa's view costs seconds at
    100,000 queued jobs), and for awa follows an ANALYZE (below)."""
    with psycopg.connect(
        dsn, autocommit=True, options=f"-c statement_timeout={COUNT_TIMEOUT}"
    ) as conn:
        done = conn.execute(FINISHED_SQL[system]).fetchone()[0]  # type: ignore[index]
        if not with_left:
            return int(done), -1
        if system == "awa":
            # awa's view plans its union of queue-storage tables from their statistics;
            # after a drain of 100,000 jobs, before autovacuum came by, its count ran
            # past 60 s (2 s once analyzed).
            conn.execute("ANALYZE")
        left = conn.execute(LEFT_SQL[system]).fetchone()[0]  # type: ignore[index]
    return int(done), int(left)


def argv_for(config: WorkerConfig) -> Sequence[str]:
    argv = ["--concurrency", str(config.concurrency)]
    if config.batch:
        argv += ["--batch", str(config.batch)]
    if config.driver:
        argv += ["--driver", config.driver]
    if config.claimers:
        argv += ["--claimers", str(config.claimers)]
    if config.claim:
        argv += ["--claim", config.claim]
    return argv
