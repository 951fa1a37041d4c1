"""Retention: `pgjobs prune`, the append-only audit log's one way out, and asset files.

Time is an input: jobs finish at a chosen ``now`` and the prune runs at a later ``now``,
so nothing is backdated by hand and nothing sleeps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import uuid
from pathlib import Path

import psycopg
import pytest

from helpers import claim_one, fetch, finish_params
from pgjobs import db, retention
from pgjobs.client import Client
from pgjobs.errors import ConfigurationError
from pgjobs.queries import QUERIES
from pgjobs.storage import LocalStorage

NOW = dt.datetime.now(dt.UTC)
LATER = NOW + dt.timedelta(days=40)  # the prune's now: jobs finished at NOW are 40 days old


async def _finish(dsn: str, outcome: str, at: dt.datetime | None = None) -> uuid.UUID:
    """Claim the next queued job and end it with ``outcome`` at ``at``."""
    job = await claim_one(dsn, "w1")
    params = finish_params(job, outcome)
    params["now"] = at
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], params)
    return uuid.UUID(str(job["id"]))


async def _ids(dsn: str) -> set[uuid.UUID]:
    return {row["id"] for row in await fetch(dsn, "SELECT id FROM pgjobs.jobs")}


async def _add_asset(dsn: str, storage: LocalStorage, job_id: uuid.UUID) -> str:
    asset_id = uuid.uuid4()
    key = f"generated/{asset_id.hex[:2]}/{asset_id}"
    path = storage.path_for(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    await fetch(
        dsn,
        "INSERT INTO pgjobs.assets (id, company_id, namespace, object_key, content_type,"
        " byte_size, sha256, source_job_id) VALUES (%s, 'acme', 'generated', %s, 'text/plain',"
        " 1, %s, %s)",
        [asset_id, key, hashlib.sha256(b"x").hexdigest(), job_id],
    )
    return key


def test_durations_parse_strictly() -> None:
    assert retention.parse_duration("30d") == dt.timedelta(days=30)
    assert retention.parse_duration("12h") == dt.timedelta(hours=12)
    assert retention.parse_duration("90m") == dt.timedelta(minutes=90)
    for bad in ("30", "0d", "-1d", "1.5d", "30 days", "30D", "1w", "", "d", "1d2h"):
        with pytest.raises(ConfigurationError, match="whole number and a unit"):
            retention.parse_duration(bad)


async def test_prune_removes_only_finished_jobs_past_the_cut_off(dsn: str, client: Client) -> None:
    cancelled = (await client.enqueue("acme", "echo")).id
    await client.cancel("acme", cancelled)
    for _ in range(5):
        await client.enqueue("acme", "echo", max_attempts=1)
    old = {
        cancelled,
        await _finish(dsn, "done"),
        await _finish(dsn, "done"),
        await _finish(dsn, "fail"),
    }
    recent = await _finish(dsn, "done", at=NOW + dt.timedelta(days=35))
    running = uuid.UUID(str((await claim_one(dsn, "w1"))["id"]))
    queued = (await client.enqueue("acme", "echo")).id
    before = await _ids(dsn)

    report = await retention.prune(dsn, jobs_older_than=dt.timedelta(days=30), now=LATER, batch=2)

    assert report.jobs == {"done": 2, "failed": 1, "cancelled": 1}
    assert report.batches > 2  # walked in batches of 2
    assert await _ids(dsn) == before - old
    assert {recent, running, queued} <= await _ids(dsn)
    # The audit log keeps the pruned jobs' history (its own retention, default keep).
    rows = await fetch(
        dsn, "SELECT count(*) AS n FROM pgjobs.job_events WHERE job_id = ANY(%s)", [list(old)]
    )
    assert rows[0]["n"] > 0


async def test_dry_run_reports_and_keeps_everything(dsn: str, client: Client) -> None:
    await client.enqueue("acme", "echo")
    await _finish(dsn, "done")
    events = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_events")
    report = await retention.prune(
        dsn,
        jobs_older_than=dt.timedelta(days=30),
        events_older_than=dt.timedelta(days=30),
        now=LATER,
        dry_run=True,
    )
    assert report.jobs["done"] == 1
    assert report.events == events[0]["n"]
    assert report.lines()[0].startswith("would remove 1 finished jobs")
    assert len(await _ids(dsn)) == 1
    assert await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_events") == events


async def test_events_have_their_own_cut_off(dsn: str, client: Client) -> None:
    await client.enqueue("acme", "echo")
    await _finish(dsn, "done")
    (cut,) = await fetch(dsn, "SELECT now() AS t")
    await client.enqueue("acme", "echo")  # its event is written after the cut-off

    kept_jobs = await retention.prune(
        dsn,
        jobs_older_than=dt.timedelta(days=3650),
        events_older_than=dt.timedelta(days=30),
        now=cut["t"] + dt.timedelta(days=30),
        batch=1,
    )
    assert kept_jobs.jobs["done"] == 0
    assert kept_jobs.events == 3  # queued, running, done of the first job
    rows = await fetch(dsn, "SELECT type FROM pgjobs.job_events")
    assert [r["type"] for r in rows] == ["content_job.queued"]
    assert len(await _ids(dsn)) == 2  # jobs untouched: a longer retention


@pytest.mark.parametrize("batch", [1, 2, 1000])
async def test_events_are_pruned_company_by_company(dsn: str, client: Client, batch: int) -> None:
    """The walk goes through each company's rows in its stream's (xid, id) order (sql/0016):
    a company with only new rows, or new rows after its old ones, does not end the walk
    for the companies after it, whatever the batch size."""
    for company in ("beta", "beta", "beta", "gamma", "delta"):
        await client.enqueue(company, "echo")
    (cut,) = await fetch(dsn, "SELECT clock_timestamp() AS t")
    for company in ("alpha", "alpha", "beta", "delta"):  # written after the cut-off
        await client.enqueue(company, "echo")

    report = await retention.prune(
        dsn,
        jobs_older_than=None,
        events_older_than=dt.timedelta(days=30),
        now=cut["t"] + dt.timedelta(days=30),
        batch=batch,
    )
    assert report.events == 5
    left = await fetch(dsn, "SELECT company_id FROM pgjobs.job_events ORDER BY 1")
    assert [r["company_id"] for r in left] == ["alpha", "alpha", "beta", "delta"]
    marks = await fetch(dsn, "SELECT company_id FROM pgjobs.job_events_pruned ORDER BY 1")
    assert [r["company_id"] for r in marks] == ["beta", "delta", "gamma"]


async def test_audit_log_refuses_a_hand_written_delete(dsn: str, client: Client) -> None:
    await client.enqueue("acme", "echo")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("DELETE FROM pgjobs.job_events")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("UPDATE pgjobs.job_events SET status = 'x'")
        # The setting the prune function uses lets through only rows older than its
        # cut-off, and it ends with the function.
        async with conn.transaction():
            await conn.execute(
                "SELECT set_config('pgjobs.prune_events_before', '2000-01-01', true)"
            )
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                await conn.execute("DELETE FROM pgjobs.job_events")
        async with conn.transaction():
            await conn.execute("SELECT * FROM pgjobs.prune_events('2000-01-01', NULL, '0', 0, 10)")
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
                await conn.execute("DELETE FROM pgjobs.job_events")
    assert len(await fetch(dsn, "SELECT id FROM pgjobs.job_events")) == 1


async def test_pruned_events_move_each_companys_retention_mark(dsn: str, client: Client) -> None:
    await client.enqueue("acme", "echo")
    await client.enqueue("acme", "echo")
    await client.enqueue("globex", "echo")
    rows = await fetch(
        dsn,
        "SELECT DISTINCT ON (company_id) company_id, xid::text AS xid, id"
        " FROM pgjobs.job_events ORDER BY company_id, xid DESC, id DESC",
    )
    await retention.prune(
        dsn, jobs_older_than=None, events_older_than=dt.timedelta(days=1), now=LATER, batch=2
    )
    marks = await fetch(
        dsn,
        "SELECT company_id, xid::text AS xid, id FROM pgjobs.job_events_pruned ORDER BY 1",
    )
    assert marks == rows


async def test_assets_rows_then_files_and_a_failed_file_is_retried(
    dsn: str, client: Client, tmp_path: Path
) -> None:
    storage = LocalStorage(tmp_path)
    for _ in range(2):
        await client.enqueue("acme", "echo")
    first = await _finish(dsn, "done")
    second = await _finish(dsn, "done")
    key1 = await _add_asset(dsn, storage, first)
    key2 = await _add_asset(dsn, storage, second)

    class Flaky(LocalStorage):
        async def delete(self, key: str) -> None:
            if key == key2:
                raise OSError("disk says no")
            await super().delete(key)

    report = await retention.prune(
        dsn, jobs_older_than=dt.timedelta(days=30), storage=Flaky(tmp_path), now=LATER
    )
    assert (report.assets, report.files_deleted, report.files_failed) == (2, 1, 1)
    assert await fetch(dsn, "SELECT id FROM pgjobs.assets") == []
    assert not storage.path_for(key1).exists()
    assert storage.path_for(key2).exists()
    (pending,) = await fetch(
        dsn, "SELECT object_key, attempts, last_error FROM pgjobs.asset_deletions"
    )
    assert pending == {"object_key": key2, "attempts": 1, "last_error": "disk says no"}

    # The next prune with assets retries the file first, even with nothing else to prune.
    again = await retention.prune(
        dsn, jobs_older_than=dt.timedelta(days=30), storage=storage, now=LATER
    )
    assert (again.files_deleted, again.files_failed) == (1, 0)
    assert not storage.path_for(key2).exists()
    assert await fetch(dsn, "SELECT object_key FROM pgjobs.asset_deletions") == []


async def test_without_assets_the_asset_rows_stay(dsn: str, client: Client, tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    await client.enqueue("acme", "echo")
    key = await _add_asset(dsn, storage, await _finish(dsn, "done"))
    report = await retention.prune(dsn, jobs_older_than=dt.timedelta(days=30), now=LATER)
    assert (report.jobs["done"], report.assets) == (1, 0)
    assert len(await fetch(dsn, "SELECT id FROM pgjobs.assets")) == 1
    assert storage.path_for(key).exists()


async def test_a_locked_job_is_skipped_not_waited_for(dsn: str, client: Client) -> None:
    await client.enqueue("acme", "echo")
    job_id = await _finish(dsn, "done")
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT 1 FROM pgjobs.job_rows WHERE id = %s FOR UPDATE", [job_id])
        # A prune that waited for the lock would wait for ever: fail instead.
        async with asyncio.timeout(30):
            report = await retention.prune(dsn, jobs_older_than=dt.timedelta(days=30), now=LATER)
        await holder.rollback()
    assert report.jobs["done"] == 0
    assert job_id in await _ids(dsn)


async def test_a_leaders_batch_waits_out_a_check_holding_the_lock_for_a_moment(
    dsn: str, client: Client
) -> None:
    """Another worker's check of the interval holds the retention lock for a moment (its
    try-lock, the claim that finds the interval taken, the commit). A leader whose first
    batch came in that moment stopped, and the interval it had claimed went unpruned."""
    await client.enqueue("acme", "echo")
    job_id = await _finish(dsn, "done")
    async with (
        await psycopg.AsyncConnection.connect(dsn) as holder,
        await db.connect(dsn) as conn,
    ):
        await holder.execute(
            "SELECT pg_try_advisory_xact_lock(hashtext('pgjobs.retention')::bigint)"
        )

        async def check_ends() -> None:
            await asyncio.sleep(0.2)
            await holder.rollback()

        ending = asyncio.create_task(check_ends())
        report = await retention.prune(
            conn, jobs_older_than=dt.timedelta(days=30), now=LATER, leader_only=True
        )
        await ending
    assert report.jobs["done"] == 1
    assert job_id not in await _ids(dsn)


async def test_a_policy_run_yields_to_a_session_holding_the_retention_lock(
    dsn: str, client: Client
) -> None:
    await client.enqueue("acme", "echo")
    await _finish(dsn, "done")
    policy = retention.Policy(jobs=dt.timedelta(days=30))
    async with (
        await psycopg.AsyncConnection.connect(dsn) as holder,
        await db.connect(dsn) as conn,
    ):
        await holder.execute("SELECT pg_advisory_xact_lock(hashtext('pgjobs.retention')::bigint)")
        assert await retention.run_policy(conn, policy, storage=None, now=LATER) is None
        # A leader's batches stop too (the lock is taken again by every batch).
        report = await retention.prune(
            conn, jobs_older_than=dt.timedelta(days=30), now=LATER, leader_only=True
        )
        assert report.batches == 0
        await holder.rollback()
        ran = await retention.run_policy(conn, policy, storage=None, now=LATER)
    assert ran is not None
    assert ran.jobs["done"] == 1
    (row,) = await fetch(dsn, "SELECT runs FROM pgjobs.retention")
    assert row["runs"] == 1
