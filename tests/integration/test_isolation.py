"""A database whose transactions default to an isolation above READ COMMITTED: the workers
say so at their start, with what to do, and still get the work done (their claims and
finishes fail with serialization errors there and are retried)."""

from __future__ import annotations

import logging
from pathlib import Path

import psycopg
import pytest

from helpers import fast_settings, running_worker, wait_until
from pgjobs import db, demo
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec


async def test_read_committed_is_not_warned_about(dsn: str) -> None:
    async with await db.connect(dsn) as conn:
        assert not await db.warn_unless_read_committed(conn, "test")


@pytest.mark.parametrize("isolation", ["repeatable read", "serializable"])
async def test_a_higher_default_is_warned_about_and_the_jobs_still_get_done(
    dsn: str, storage_dir: Path, caplog: pytest.LogCaptureFixture, isolation: str
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            f"ALTER DATABASE {conn.info.dbname} SET default_transaction_isolation = '{isolation}'"
        )
    caplog.set_level(logging.WARNING, logger="pgjobs.db")
    async with await Client.connect(dsn) as client:
        for company in ("acme", "beta"):
            await client.enqueue_many(JobSpec(company, "echo", {"n": n}) for n in range(300))
        settings = fast_settings(storage_dir, concurrency=200)
        async with (
            running_worker(dsn, demo.registry, settings, burst=True),
            running_worker(dsn, demo.registry, settings, burst=True),
        ):

            async def all_done() -> bool:
                with psycopg.connect(dsn) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pgjobs.jobs WHERE status = 'done'"
                    ).fetchone()
                return row is not None and row[0] == 600

            await wait_until(all_done, within=120, message="600 jobs done")
    warnings = [r.getMessage() for r in caplog.records if r.name == "pgjobs.db"]
    assert len(warnings) == 2, warnings  # one per worker, at its start
    assert f"transactions here default to {isolation}" in warnings[0]
    assert "ALTER ROLE" in warnings[0]
    assert "default_transaction_isolation = 'read committed'" in warnings[0]
