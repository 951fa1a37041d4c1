"""A database (or role) whose DateStyle is not ISO: pgjobs' own connections read times as
ISO anyway (pgjobs.db.dates_iso). psycopg reads only ISO text; before, enqueue_many failed
with NotImplementedError ("can't parse timestamptz with DateStyle 'SQL, DMY'")."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from bouncer import Bouncer
from helpers import fast_settings, running_worker, wait_until
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.sync import SyncClient


def _set_datestyle(dsn: str, style: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"ALTER DATABASE {conn.info.dbname} SET DateStyle = '{style}'")


@pytest.mark.parametrize("style", ["SQL, DMY", "German", "Postgres, MDY"])
async def test_clients_and_a_worker_read_times_whatever_the_datestyle(
    dsn: str, storage_dir: Path, style: str
) -> None:
    _set_datestyle(dsn, style)
    async with await Client.connect(dsn) as client:
        jobs = await client.enqueue_many(JobSpec("acme", "echo", {"n": n}) for n in range(50))
        assert (await client.get("acme", jobs[0].id)).created_at == jobs[0].created_at
        async with running_worker(dsn, demo.registry, fast_settings(storage_dir), burst=True):

            async def all_done() -> bool:
                listed = await client.list("acme", limit=100)
                return all(job.status.value == "done" for job in listed.jobs)

            await wait_until(all_done, within=60, message="50 jobs done")
        [event, *_] = await client.events("acme", jobs[0].id)
        assert event.created_at >= jobs[0].created_at
    with SyncClient(dsn) as sync:
        job = sync.enqueue("acme", "echo", {})
        assert sync.get("acme", job.id).created_at == job.created_at


async def test_through_pgbouncer(dsn: str, pgbouncer: Bouncer) -> None:
    """PgBouncer keeps each client's DateStyle and sets it on the server connection the
    client gets: the setting holds for every statement of a transaction-pooled client."""
    _set_datestyle(dsn, "SQL, DMY")
    bouncer_dsn = pgbouncer.dsn(dsn)
    async with await Client.connect(bouncer_dsn, max_size=1) as client:
        # Another client holding a server connection in a transaction on every other
        # round: the bouncer gives this one another server connection then.
        with psycopg.connect(bouncer_dsn, prepare_threshold=None) as other:
            for i in range(6):
                if i % 2:
                    other.execute("SELECT 1")
                [job] = await client.enqueue_many([JobSpec("acme", "echo", {})])
                assert (await client.get("acme", job.id)).created_at == job.created_at
                other.commit()
