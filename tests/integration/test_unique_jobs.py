"""Unique jobs (issue 18): enqueue with a unique key returns the job holding it, across
connections and in races, for the states and window asked for; enqueue_many says which
specs were duplicates; a released key goes to the next job; the cleanup deletes only
released keys."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import demo, rescuer
from pgjobs.client import Client
from pgjobs.errors import InvalidJobError
from pgjobs.jobspec import JobSpec
from pgjobs.sync import SyncClient
from pgjobs.types import Job


async def _job_count(dsn: str, company: str = "acme") -> int:
    rows = await fetch(
        dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE company_id = %s", [company]
    )
    return int(rows[0]["n"])


async def test_a_held_key_returns_the_holder_and_creates_nothing(dsn: str, client: Client) -> None:
    first = await client.enqueue("acme", "render", {"v": 1}, unique_key="video-42")
    assert first.created is True
    again = await client.enqueue("acme", "render", {"v": 2}, unique_key="video-42")
    assert again.created is False
    assert again.id == first.id
    assert again.input == {"v": 1}  # the holder, not the new request
    # Keys are per company, and a job without a key is never a duplicate.
    other = await client.enqueue("globex", "render", unique_key="video-42")
    plain = await client.enqueue("acme", "render")
    assert other.created
    assert plain.created
    assert await _job_count(dsn) == 2


async def test_the_key_is_released_when_the_holder_leaves_its_states(client: Client) -> None:
    first = await client.enqueue("acme", "render", unique_key="k")
    await client.cancel("acme", first.id)
    second = await client.enqueue("acme", "render", unique_key="k")
    assert second.created is True
    assert second.id != first.id
    # And the key now belongs to the second: a third is its duplicate.
    third = await client.enqueue("acme", "render", unique_key="k")
    assert (third.id, third.created) == (second.id, False)


async def test_unique_while_can_hold_the_key_in_finished_states(client: Client) -> None:
    states = ("queued", "running", "done", "cancelled")
    first = await client.enqueue("acme", "report", unique_key="night-1", unique_while=states)
    await client.cancel("acme", first.id)
    again = await client.enqueue("acme", "report", unique_key="night-1", unique_while=states)
    assert (again.id, again.created) == (first.id, False)


async def test_unique_for_window(dsn: str, client: Client) -> None:
    first = await client.enqueue("acme", "render", unique_key="w", unique_for=timedelta(hours=1))
    within = await client.enqueue("acme", "render", unique_key="w", unique_for=timedelta(hours=1))
    assert (within.id, within.created) == (first.id, False)
    # Time is an input: the window is moved into the past instead of waited out.
    await fetch(
        dsn,
        "UPDATE pgjobs.job_unique_keys SET expires_at = now() - interval '1 second'"
        " WHERE unique_key = 'w'",
    )
    after = await client.enqueue("acme", "render", unique_key="w", unique_for=timedelta(hours=1))
    assert after.created is True
    assert after.id != first.id
    # The first is still queued: the window, not the state, released the key.
    assert (await client.get("acme", first.id)).status.value == "queued"


async def test_enqueue_many_reports_duplicates_in_spec_order(dsn: str, client: Client) -> None:
    held = await client.enqueue("acme", "render", unique_key="a")
    specs = [
        JobSpec("acme", "render", unique_key="a"),  # held before
        JobSpec("acme", "render", unique_key="b"),  # new
        JobSpec("acme", "render"),  # no key
        JobSpec("acme", "render", unique_key="b"),  # same batch, after the new one
    ]
    jobs = await client.enqueue_many(specs)
    assert [j.created for j in jobs] == [False, True, True, False]
    assert jobs[0].id == held.id
    assert jobs[1].id == specs[1].id
    assert jobs[3].id == specs[1].id
    assert jobs[2].id == specs[2].id
    assert await _job_count(dsn) == 3
    # Each is the job as stored, the holders and the batch's own duplicate included.
    for job in jobs:
        assert job == await client.get("acme", job.id)  # (created is not compared)


async def test_concurrent_enqueues_on_many_connections_create_one_job(dsn: str) -> None:
    clients = [await Client.connect(dsn, max_size=1) for _ in range(12)]
    try:
        jobs = await asyncio.gather(
            *(c.enqueue("acme", "render", unique_key="race") for c in clients for _ in range(3))
        )
    finally:
        for c in clients:
            await c.close()
    assert len({j.id for j in jobs}) == 1
    assert sum(j.created for j in jobs) == 1
    assert await _job_count(dsn) == 1


async def test_concurrent_takeovers_of_a_released_key_create_one_job(dsn: str) -> None:
    clients = [await Client.connect(dsn, max_size=1) for _ in range(12)]
    try:
        old = await clients[0].enqueue("acme", "render", unique_key="again")
        await clients[0].cancel("acme", old.id)
        jobs = await asyncio.gather(
            *(c.enqueue("acme", "render", unique_key="again") for c in clients)
        )
    finally:
        for c in clients:
            await c.close()
    assert len({j.id for j in jobs}) == 1
    assert old.id not in {j.id for j in jobs}
    assert sum(j.created for j in jobs) == 1
    assert await _job_count(dsn) == 2


async def _waiting_on_a_lock(dsn: str, pid: int) -> bool:
    rows = await fetch(dsn, "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
    return bool(rows) and rows[0]["wait_event_type"] == "Lock"


async def _blocked_enqueue(
    dsn: str, client: Client, **kwargs: Any
) -> tuple[asyncio.Task[Job], psycopg.AsyncConnection[Any]]:
    """An enqueue of key "k" on a connection of its own, started and seen waiting."""
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row)
    pid = conn.info.backend_pid
    task = asyncio.create_task(
        client.enqueue("acme", "render", unique_key="k", conn=conn, **kwargs)
    )
    await wait_until(lambda: _waiting_on_a_lock(dsn, pid), message="the enqueue to wait")
    return task, conn


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_an_enqueue_waits_for_an_open_transaction_holding_the_new_key(
    dsn: str, client: Client, outcome: str
) -> None:
    """The second waits on the unique index; it gets the first's job if that commits, and
    creates its own if it rolls back. Deterministic: the wait is seen in pg_stat_activity."""
    async with await psycopg.AsyncConnection.connect(dsn) as first_conn:
        first = await client.enqueue("acme", "render", unique_key="k", conn=first_conn)
        task, conn = await _blocked_enqueue(dsn, client)
        try:
            if outcome == "commit":
                await first_conn.commit()
            else:
                await first_conn.rollback()
            second = await task
        finally:
            await conn.close()
    if outcome == "commit":
        assert (second.id, second.created) == (first.id, False)
    else:
        assert second.created is True
        assert second.id != first.id
    assert await _job_count(dsn) == 1


async def test_an_enqueue_waits_for_an_open_takeover_and_returns_its_job(
    dsn: str, client: Client
) -> None:
    """A key being handed to a new job in an open transaction: the second enqueue waits on
    the key row's lock and, once the first commits, returns the new holder (it must not
    read the changed row as released and take it a second time)."""
    old = await client.enqueue("acme", "render", unique_key="k")
    await client.cancel("acme", old.id)
    async with await psycopg.AsyncConnection.connect(dsn) as first_conn:
        first = await client.enqueue("acme", "render", unique_key="k", conn=first_conn)
        assert first.created
        task, conn = await _blocked_enqueue(dsn, client)
        try:
            await first_conn.commit()
            second = await task
        finally:
            await conn.close()
    assert (second.id, second.created) == (first.id, False)
    assert await _job_count(dsn) == 2


async def test_a_rolled_back_enqueue_releases_its_key(dsn: str, client: Client) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await client.enqueue("acme", "render", unique_key="k", conn=conn)
        await conn.rollback()
    job = await client.enqueue("acme", "render", unique_key="k")
    assert job.created is True
    assert await _job_count(dsn) == 1


async def test_a_callers_transaction_stays_open_until_it_commits(dsn: str, client: Client) -> None:
    """On a non-autocommit connection the key and the job are the caller's to commit."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        job = await client.enqueue("acme", "render", unique_key="k", conn=conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        assert await _job_count(dsn) == 0
        await conn.commit()
    assert (await client.get("acme", job.id)).id == job.id


def test_sync_client_reports_duplicates(dsn: str) -> None:
    with SyncClient(dsn) as sync:
        first = sync.enqueue("acme", "render", unique_key="s")
        again = sync.enqueue("acme", "render", unique_key="s")
        jobs = sync.enqueue_many(
            [JobSpec("acme", "render", unique_key="s"), JobSpec("acme", "render", unique_key="t")]
        )
    assert first.created
    assert (again.id, again.created) == (first.id, False)
    assert [(j.created, j.id == first.id) for j in jobs] == [(False, True), (True, False)]


async def test_cleanup_deletes_released_keys_only(dsn: str, client: Client) -> None:
    held = await client.enqueue("acme", "render", unique_key="held")
    gone = await client.enqueue("acme", "render", unique_key="gone")
    await client.cancel("acme", gone.id)
    await client.enqueue("acme", "render", unique_key="late", unique_for=timedelta(minutes=1))
    await fetch(
        dsn,
        "UPDATE pgjobs.job_unique_keys SET expires_at = now() - interval '1 second'"
        " WHERE unique_key = 'late'",
    )
    deleted = await rescuer.delete_released_keys(client.pool)
    assert deleted == 2
    rows = await fetch(dsn, "SELECT unique_key, job_id FROM pgjobs.job_unique_keys")
    assert [(r["unique_key"], r["job_id"]) for r in rows] == [("held", held.id)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"unique_key": ""}, "unique_key is required"),
        ({"unique_key": "x" * 256}, "unique_key is longer than 255"),
        ({"unique_key": "k", "unique_for": timedelta(0)}, "unique_for must be a positive"),
        ({"unique_key": "k", "unique_while": ()}, "unique_while must name"),
        ({"unique_key": "k", "unique_while": ("queued", "paused")}, "unique_while must name"),
        ({"unique_key": "k", "unique_while": "queued"}, "not a string"),
    ],
)
def test_bad_unique_arguments_are_refused_before_any_sql(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidJobError, match=message):
        JobSpec("acme", "render", **kwargs)


async def test_workers_delete_released_keys_in_their_rescue_loop(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    gone = await client.enqueue("acme", "never-claimed", unique_key="gone")
    await client.cancel("acme", gone.id)
    await fetch(
        dsn,
        "INSERT INTO pgjobs.idempotency_keys (company_id, key, request_hash, job_id, response,"
        " expires_at) VALUES ('acme', 'old', repeat('0', 64), gen_random_uuid(), '{}',"
        " now() - interval '1 second')",
    )

    async def both_gone() -> bool:
        rows = await fetch(
            dsn,
            "SELECT (SELECT count(*) FROM pgjobs.job_unique_keys)"
            " + (SELECT count(*) FROM pgjobs.idempotency_keys) AS n",
        )
        return rows[0]["n"] == 0

    # Cleanup runs every 30th rescue pass; a short interval gets there quickly.
    settings = fast_settings(storage_dir, rescue_interval_seconds=0.01)
    async with running_worker(dsn, demo.registry, settings):
        await wait_until(both_gone, message="the released keys to be deleted")
