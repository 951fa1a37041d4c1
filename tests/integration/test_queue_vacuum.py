"""The workers vacuum pgjobs.job_queue themselves (pgjobs.queue_vacuum, issue 16): a look
removes the dead tuples claims left, one worker among all vacuums per interval, a role
that may not vacuum the table says so once and the worker works on, and 0 turns it off.

Marked quiet_databases: a CREATE or DROP DATABASE running meanwhile holds a transaction
id, and VACUUM keeps what a transaction that old may still see, so "no dead tuple left"
would depend on the other tests' databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db, queue_vacuum
from pgjobs.client import Client
from pgjobs.config import WorkerSettings
from pgjobs.context import JobContext
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES
from pgjobs.queue_vacuum import Outcome, QueueVacuum
from pgjobs.registry import Registry

pytestmark = pytest.mark.quiet_databases

STATS = """SELECT n_dead_tup, vacuum_count, autovacuum_count
FROM pg_stat_user_tables WHERE relid = 'pgjobs.job_queue'::regclass"""


async def _stats(dsn: str) -> dict[str, Any]:
    (row,) = await fetch(dsn, STATS)
    return row


async def _claim_all(dsn: str, client: Client, n: int) -> None:
    """Enqueue ``n`` jobs and claim them: each claim leaves its queue row's old version
    dead. Returns once the server's statistics count them (a backend reports its counts
    when it goes idle or exits, not at once)."""
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(n))
    claimed = await fetch(
        dsn,
        QUERIES["job_claim_batch"],
        {
            "now": None,
            "limit": n,
            "worker_id": "w1",
            "lease_seconds": 60.0,
            "job_types": None,
            "after_company": None,
        },
    )
    assert len(claimed) == n

    async def counted() -> bool:
        return bool((await _stats(dsn))["n_dead_tup"] >= n)

    await wait_until(counted, within=60, message=f"{n} dead tuples in job_queue's statistics")


async def _db_now(dsn: str) -> datetime:
    (row,) = await fetch(dsn, "SELECT now() AS now")
    now: datetime = row["now"]
    return now


@pytest.fixture
async def pool(dsn: str) -> AsyncIterator[db.GuardedPool]:
    p = await db.open_pool(dsn, min_size=1, max_size=3)
    yield p
    await p.close()


async def test_a_look_vacuums_away_the_dead_tuples_claims_left(
    dsn: str, client: Client, pool: db.GuardedPool
) -> None:
    await _claim_all(dsn, client, 30)
    before = await _stats(dsn)
    vacuum = QueueVacuum(pool, interval_seconds=5.0, min_dead=1)

    assert await vacuum.look() is Outcome.VACUUMED

    after = await _stats(dsn)
    assert after["vacuum_count"] == before["vacuum_count"] + 1
    assert after["n_dead_tup"] == 0
    assert vacuum.vacuums == 1
    assert vacuum.last_seconds is not None


async def _assert_not_due(dsn: str, vacuum: QueueVacuum) -> None:
    """The look declines, and the table's vacuum count stays as it was."""
    before = await _stats(dsn)
    assert await vacuum.look() is Outcome.NOT_DUE
    assert (await _stats(dsn))["vacuum_count"] == before["vacuum_count"]


async def test_too_few_dead_tuples_is_no_vacuum(
    dsn: str, client: Client, pool: db.GuardedPool
) -> None:
    await _claim_all(dsn, client, 5)
    await _assert_not_due(dsn, QueueVacuum(pool, interval_seconds=5.0, min_dead=1000))


async def test_two_workers_do_not_both_vacuum_in_one_interval(
    dsn: str, client: Client, pool: db.GuardedPool
) -> None:
    await _claim_all(dsn, client, 20)
    before = await _stats(dsn)
    # Times an hour ahead of the server's clock: whatever autovacuum did is long past.
    t0 = await _db_now(dsn) + timedelta(hours=1)
    async with await db.open_pool(dsn, min_size=1, max_size=3) as other_pool:
        one = QueueVacuum(pool, interval_seconds=10.0, min_dead=1)
        two = QueueVacuum(other_pool, interval_seconds=10.0, min_dead=1)

        # At the same moment: one claims the interval, the other finds it claimed.
        outcomes = await asyncio.gather(one.look(now=t0), two.look(now=t0))
        assert sorted(o.value for o in outcomes) == ["not due", "vacuumed"]
        assert (await _stats(dsn))["vacuum_count"] == before["vacuum_count"] + 1

        # More dead tuples, still within the interval: neither vacuums.
        await _claim_all(dsn, client, 20)
        assert await one.look(now=t0 + timedelta(seconds=9)) is Outcome.NOT_DUE
        assert await two.look(now=t0 + timedelta(seconds=9)) is Outcome.NOT_DUE
        assert (await _stats(dsn))["vacuum_count"] == before["vacuum_count"] + 1

        # The next interval: one of them again.
        later = t0 + timedelta(seconds=11)
        outcomes = [await two.look(now=later), await one.look(now=later)]
        assert [o.value for o in outcomes] == ["vacuumed", "not due"]
    (row,) = await fetch(dsn, "SELECT runs FROM pgjobs.queue_vacuum")
    assert row["runs"] == 2
    assert one.vacuums + two.vacuums == 2


async def test_a_vacuum_by_anyone_within_the_interval_defers_it(
    dsn: str, client: Client, pool: db.GuardedPool
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("VACUUM pgjobs.job_queue")  # as autovacuum would
    await _claim_all(dsn, client, 20)
    await _assert_not_due(dsn, QueueVacuum(pool, interval_seconds=3600.0, min_dead=1))


async def test_a_vacuum_already_running_is_not_waited_for(
    dsn: str, client: Client, pool: db.GuardedPool
) -> None:
    await _claim_all(dsn, client, 20)
    before = await _stats(dsn)
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        # The lock a running VACUUM (autovacuum's) holds on the table.
        await holder.execute("LOCK TABLE pgjobs.job_queue IN SHARE UPDATE EXCLUSIVE MODE")
        vacuum = QueueVacuum(pool, interval_seconds=5.0, min_dead=1)
        outcome = await asyncio.wait_for(vacuum.look(), timeout=30)
        await holder.rollback()
    assert outcome is Outcome.BUSY
    assert vacuum.vacuums == 0
    assert (await _stats(dsn))["vacuum_count"] == before["vacuum_count"]


async def test_a_failed_look_is_logged_and_the_loop_goes_on(
    dsn: str, pool: db.GuardedPool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pgjobs.queue_vacuum")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DROP TABLE pgjobs.queue_vacuum")  # every claim now fails
    task = asyncio.create_task(QueueVacuum(pool, interval_seconds=1.0, min_dead=1).run())
    try:

        async def failed() -> bool:
            return any(
                "vacuum of pgjobs.job_queue failed" in r.getMessage() for r in caplog.records
            )

        await wait_until(failed, within=30, message="the failure logged")
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def other_role(dsn: str, pg_server_dsn: str) -> Iterator[str]:
    """A role that may use pgjobs' tables (as a worker needs) but owns none of them."""
    role = f"pgjobs_not_owner_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
        for statement in (
            "GRANT USAGE ON SCHEMA pgjobs, public TO {}",
            "GRANT ALL ON ALL TABLES IN SCHEMA pgjobs, public TO {}",
            "GRANT ALL ON ALL SEQUENCES IN SCHEMA pgjobs, public TO {}",
        ):
            conn.execute(sql.SQL(statement).format(sql.Identifier(role)))
    yield role
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


async def test_a_role_that_may_not_vacuum_says_so_once_and_the_worker_works_on(
    dsn: str,
    client: Client,
    other_role: str,
    storage_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="pgjobs.queue_vacuum")
    before = await _stats(dsn)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        return None

    settings = fast_settings(storage_dir, queue_vacuum_seconds=1.0)
    async with running_worker(
        make_conninfo(dsn, user=other_role), registry, settings, worker_id="not-owner"
    ) as worker:
        assert worker.queue_vacuum is not None
        tasks = [t for t in asyncio.all_tasks() if t.get_name() == "pgjobs-queue-vacuum"]
        assert len(tasks) == 1
        # The look found it may not vacuum, logged it and ended its loop.
        await asyncio.wait_for(asyncio.shield(tasks[0]), timeout=30)
        # ... and the worker still runs jobs.
        job = await client.enqueue("acme", "echo")

        async def done() -> bool:
            return (await client.get("acme", job.id)).status.value == "done"

        await wait_until(done, within=30, message="the job done")
    lines = [r.getMessage() for r in caplog.records if r.name == "pgjobs.queue_vacuum"]
    assert len(lines) == 1, lines
    assert f"role {other_role} may not vacuum pgjobs.job_queue" in lines[0]
    assert "autovacuum_naptime" in lines[0]
    assert (await _stats(dsn))["vacuum_count"] == before["vacuum_count"]


async def test_a_running_worker_vacuums_the_queue(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_vacuum, "MIN_DEAD", 1)
    before = await _stats(dsn)
    registry = Registry()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        return None

    settings = fast_settings(storage_dir, queue_vacuum_seconds=1.0)
    async with running_worker(dsn, registry, settings) as worker:
        await client.enqueue_many(JobSpec("acme", "echo") for _ in range(20))

        async def vacuumed() -> bool:
            return bool((await _stats(dsn))["vacuum_count"] > before["vacuum_count"])

        await wait_until(vacuumed, within=60, message="a vacuum of job_queue")
        assert worker.queue_vacuum is not None
    assert worker.queue_vacuum.vacuums >= 1


def test_zero_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGJOBS_QUEUE_VACUUM_SECONDS", "0")
    assert WorkerSettings.from_env().queue_vacuum_seconds == 0
    monkeypatch.setenv("PGJOBS_QUEUE_VACUUM_SECONDS", "0.5")
    with pytest.raises(Exception, match="0 \\(off\\) or at least 1"):
        WorkerSettings.from_env()
    monkeypatch.delenv("PGJOBS_QUEUE_VACUUM_SECONDS")
    assert WorkerSettings.from_env().queue_vacuum_seconds == 5.0


async def test_a_worker_with_it_off_runs_no_vacuum_loop(
    dsn: str, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_vacuum, "MIN_DEAD", 1)
    settings = fast_settings(storage_dir, queue_vacuum_seconds=0.0)
    async with running_worker(dsn, Registry(), settings) as worker:
        assert worker.queue_vacuum is None
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "pgjobs-queue-vacuum"]
