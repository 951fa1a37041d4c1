"""The workers' retention policy: one worker per interval prunes, through the advisory
lock and the guarded claim of the interval; off unless configured."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from helpers import claim_one, fast_settings, fetch, finish_params, running_worker, wait_until
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.config import WorkerSettings
from pgjobs.errors import ConfigurationError
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
