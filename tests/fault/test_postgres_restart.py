"""A PostgreSQL restart in the middle of a run: nothing lost, nothing run twice.

Runs on a private embedded server (so restarting it cannot disturb other tests, and
so it runs the same wherever the rest of the suite gets its database).
"""

from __future__ import annotations

import asyncio
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import (
    assert_each_job_done_once,
    assert_histories_valid,
    fast_settings,
    fetch,
    running_worker,
    wait_until,
)
from pgjobs import demo, migrate
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec


@pytest.fixture
def restartable() -> Iterator[tuple[str, object]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(
            Path(tempfile.mkdtemp(prefix="pgjobs-restart-")), cleanup_mode="delete"
        )
    dsn = server.get_uri()
    migrate.apply(dsn)
    yield dsn, server
    server.cleanup()


def _restart(server: object) -> None:
    from pgserver._commands import pg_ctl

    pg_ctl(
        ["-w", "-m", "fast", "restart"],
        pgdata=server.pgdata,  # type: ignore[attr-defined]
        user=server.system_user,
        timeout=60,
    )  # type: ignore[attr-defined]


async def test_worker_survives_postgres_restart(
    restartable: tuple[str, object], storage_dir: Path
) -> None:
    dsn, server = restartable
    client = await Client.connect(dsn)
    try:
        jobs = await client.enqueue_many(
            JobSpec("acme", "sleep", {"seconds": 0.3}) for _ in range(120)
        )

        async def done_count() -> int:
            rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
            return int(rows[0]["n"])

        async with running_worker(dsn, demo.registry, fast_settings(storage_dir, concurrency=20)):
            await wait_until(lambda: _ge(done_count(), 20), within=30, message="some done")
            await asyncio.to_thread(_restart, server)
            await wait_until(
                lambda: _ge(done_count(), 120),
                within=90,
                message="every job done after the restart",
            )
    finally:
        await client.close()
    await assert_each_job_done_once(dsn, len(jobs))
    assert await assert_histories_valid(dsn) == len(jobs)


async def _ge(count: object, expected: int) -> bool:
    return await count >= expected  # type: ignore[operator, no-any-return]
