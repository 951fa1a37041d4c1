"""The workers' retention policy: one worker per interval prunes, through the advisory
lock and the guarded claim of the interval; off unless configured."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import pytest

from bouncer import Bouncer
from helpers import claim_one, fast_settings, fetch, finish_params, running_worker, wait_until
from pgjobs import db, demo, retention
from pgjobs.client import Client
from pgjobs.config import WorkerSettings
from pgjobs.errors import ConfigurationError
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES


async def _finished_job(dsn: str, client: Client, *, days_ago: int) -> object:
    await client.enqueue("acme", "echo")
    job = await claim_one(dsn, "w0")
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(job))
    await fetch(
        dsn,
        "UPDATE pgjobs.jobs SET created_at = now() - make_interval(days => %s),"
        " finished_at = now() - make_interval(days => %s) WHERE id = %s",
        [days_ago + 1, days_ago, job["id"]],
    )
    return job["id"]


async def test_two_workers_one_prune_per_interval(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    old = await _finished_job(dsn, client, days_ago=40)
    recent = await _finished_job(dsn, client, days_ago=2)
    settings = fast_settings(
        storage_dir,
        retention_jobs=dt.timedelta(days=30),
        retention_interval_seconds=3600.0,
        retention_check_seconds=0.05,
    )

    async def gone() -> bool:
        return not await fetch(dsn, "SELECT 1 FROM pgjobs.jobs WHERE id = %s", [old])

    async with (
        running_worker(dsn, demo.registry, settings, worker_id="w1") as w1,
        running_worker(dsn, demo.registry, settings, worker_id="w2") as w2,
    ):
        await wait_until(gone, message="the old job pruned")

        async def both_checked_often() -> bool:
            assert w1.retention is not None
            assert w2.retention is not None
            return w1.retention.checks >= 10 and w2.retention.checks >= 10

        await wait_until(both_checked_often, message="both workers checked 10 times")
        assert w1.retention is not None
        assert w2.retention is not None
        assert w1.retention.runs + w2.retention.runs == 1
    (row,) = await fetch(dsn, "SELECT runs FROM pgjobs.retention")
    assert row["runs"] == 1
    assert await fetch(dsn, "SELECT 1 FROM pgjobs.jobs WHERE id = %s", [recent])


async def test_off_by_default(dsn: str, client: Client, storage_dir: Path) -> None:
    assert WorkerSettings.from_env().retention_jobs is None
    old = await _finished_job(dsn, client, days_ago=4000)
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)) as worker:
        assert worker.retention is not None
        assert not worker.retention.policy.enabled
        assert "retention" not in await worker.readiness()
    assert await fetch(dsn, "SELECT 1 FROM pgjobs.jobs WHERE id = %s", [old])


def test_policy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGJOBS_RETENTION_JOBS", "30d")
    monkeypatch.setenv("PGJOBS_RETENTION_EVENTS", "180d")
    settings = WorkerSettings.from_env()
    assert settings.retention_jobs == dt.timedelta(days=30)
    assert settings.retention_events == dt.timedelta(days=180)
    assert settings.retention_interval_seconds == 3600.0
    monkeypatch.setenv("PGJOBS_RETENTION_JOBS", "30 days")
    with pytest.raises(ConfigurationError, match="PGJOBS_RETENTION_JOBS must be"):
        WorkerSettings.from_env()


async def test_prune_while_a_worker_runs_only_takes_finished_jobs(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """Pruning in a loop, with a cut-off that every finished job is past, while a worker
    drains: each job is deleted only once finished, so every job's audit history still
    ends with its done event and the worker never loses a completion."""
    jobs = await client.enqueue_many(JobSpec("acme", "echo", {"n": i}) for i in range(300))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=40)
    pruned = 0

    async def prune_until_empty() -> bool:
        nonlocal pruned
        report = await retention.prune(
            dsn, jobs_older_than=dt.timedelta(days=30), now=later, batch=50
        )
        pruned += sum(report.jobs.values())
        return not await fetch(dsn, "SELECT 1 FROM pgjobs.jobs LIMIT 1")

    async with running_worker(dsn, demo.registry, fast_settings(storage_dir, concurrency=4)):
        await wait_until(prune_until_empty, within=120, message="every job done and pruned")
    assert pruned == len(jobs)
    last = await fetch(
        dsn,
        "SELECT DISTINCT ON (job_id) job_id, type FROM pgjobs.job_events ORDER BY job_id, seq DESC",
    )
    assert len(last) == len(jobs)
    assert {row["type"] for row in last} == {"content_job.done"}


async def test_policy_through_pgbouncer_in_transaction_mode(
    dsn: str, client: Client, pgbouncer: Bouncer
) -> None:
    old = await _finished_job(dsn, client, days_ago=40)
    policy = retention.Policy(jobs=dt.timedelta(days=30), events=dt.timedelta(days=30))
    async with await db.connect(pgbouncer.dsn(dsn)) as conn:
        report = await retention.run_policy(conn, policy, storage=None)
        assert report is not None
        assert report.jobs["done"] == 1
        assert report.events == 0  # the events were written just now
        # The interval is taken: a second call (another worker) does nothing.
        assert await retention.run_policy(conn, policy, storage=None) is None
    assert not await fetch(dsn, "SELECT 1 FROM pgjobs.jobs WHERE id = %s", [old])


async def test_loop_outlives_a_timed_out_run(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run cut short by the pool's use limit (a half-open connection: TimeoutError)
    or a storage error is logged, and the loop checks again: neither ends it for the
    worker's life."""
    failures: list[BaseException] = [TimeoutError(), OSError("disk gone")]

    async def failing(*args: object, **kwargs: object) -> None:
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(retention, "run_policy", failing)
    pool = await db.open_pool(dsn, max_size=1)
    loop = retention.PolicyLoop(
        pool,
        retention.Policy(dt.timedelta(days=30), None, False),
        storage=None,
        interval_seconds=3600,
        check_seconds=0.01,
    )
    task = asyncio.create_task(loop.run())
    try:

        async def checked_after_both() -> bool:
            return loop.checks >= 3 and not task.done()

        await wait_until(checked_after_both, within=10, message="the loop went on")
    finally:
        task.cancel()
        await pool.close()
    assert sum("retention run failed" in r.getMessage() for r in caplog.records) == 2
