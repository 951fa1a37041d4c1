"""pgjobs.job_queue (sql/0004): the claim's and rescuer's narrow view of the queued and
running jobs, kept in step with pgjobs.jobs by triggers whatever writes the job row."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import (
    assert_histories_valid,
    assert_queue_matches_jobs,
    claim_one,
    fetch,
    finish_params,
)
from pgjobs import rescuer
from pgjobs.client import Client
from pgjobs.errors import InvalidTransitionError
from pgjobs.queries import QUERIES
from pgjobs.types import JobStatus


async def _queue_ids(dsn: str) -> set[object]:
    return {r["job_id"] for r in await fetch(dsn, "SELECT job_id FROM pgjobs.job_queue")}


async def _unfinished(dsn: str) -> int:
    rows = await fetch(
        dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status IN ('queued', 'running')"
    )
    return int(rows[0]["n"])


async def test_queue_follows_every_transition(dsn: str, client: Client) -> None:
    now = dt.datetime.now(dt.UTC)
    later = now + dt.timedelta(hours=1)
    first = await client.enqueue("acme", "echo", priority=5)
    future = await client.enqueue("acme", "echo", run_at=later)
    third = await client.enqueue("acme", "echo", max_attempts=2)
    fourth = await client.enqueue("acme", "echo")
    await assert_queue_matches_jobs(dsn)
    assert await _queue_ids(dsn) == {first.id, future.id, third.id, fourth.id}

    # Claim (highest priority first), progress, heartbeat, completion.
    claimed = await claim_one(dsn, "w1")
    assert claimed["id"] == first.id
    await assert_queue_matches_jobs(dsn)
    progress = {"id": first.id, "lease_token": claimed["lease_token"], "now": None}
    await fetch(
        dsn, QUERIES["job_progress_if_leased"], {**progress, "fraction": 0.5, "message": "m"}
    )
    held = {"ids": [first.id], "lease_tokens": [claimed["lease_token"]], "now": None}
    assert await fetch(dsn, QUERIES["job_extend_leases"], {**held, "lease_seconds": 600.0})
    await assert_queue_matches_jobs(dsn)
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(claimed))
    await assert_queue_matches_jobs(dsn)
    assert first.id not in await _queue_ids(dsn)

    # An error with attempts left: back to queued, later; the claim does not see it now.
    claimed = await claim_one(dsn, "w1")
    assert claimed["id"] == third.id
    errored = {**finish_params(claimed, "error"), "retry_delays": [3600.0]}
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], errored)
    await assert_queue_matches_jobs(dsn)
    assert (await claim_one(dsn, "w1"))["id"] == fourth.id

    # Release (graceful shutdown) of the running job.
    running = await fetch(dsn, "SELECT id, lease_token FROM pgjobs.jobs WHERE status = 'running'")
    released = {
        "ids": [r["id"] for r in running],
        "lease_tokens": [r["lease_token"] for r in running],
        "now": None,
    }
    assert len(await fetch(dsn, QUERIES["job_release_if_leased"], released)) == 1
    await assert_queue_matches_jobs(dsn)

    await client.cancel("acme", fourth.id)
    await assert_queue_matches_jobs(dsn)

    # Rescue of expired leases: back to queued, or failed on the last attempt.
    hours = [later + dt.timedelta(hours=n) for n in range(4)]
    claimed_ids = {(await claim_one(dsn, "w1", now=hours[1]))["id"] for _ in range(2)}
    assert claimed_ids == {future.id, third.id}
    rescued = await rescuer.rescue_expired_with(dsn, now=hours[2])
    assert {(j.id, j.status) for j in rescued} == {
        (future.id, JobStatus.QUEUED),
        (third.id, JobStatus.FAILED),
    }
    await assert_queue_matches_jobs(dsn)
    assert await _queue_ids(dsn) == {future.id}

    # Manual retry brings a failed job back; cancel takes a queued or running one out.
    await client.retry("acme", third.id)
    await assert_queue_matches_jobs(dsn)
    assert await _queue_ids(dsn) == {future.id, third.id}
    await client.cancel("acme", third.id)
    claimed = await claim_one(dsn, "w1", now=hours[3])
    await client.cancel("acme", claimed["id"])  # type: ignore[arg-type]
    await assert_queue_matches_jobs(dsn)
    assert await _queue_ids(dsn) == set()

    # An operator's own UPDATE and DELETE with psql keep it in step too.
    fifth = await client.enqueue("acme", "echo")
    await fetch(dsn, "UPDATE pgjobs.jobs SET priority = 9 WHERE id = %s RETURNING id", [fifth.id])
    await assert_queue_matches_jobs(dsn)
    await fetch(dsn, "DELETE FROM pgjobs.jobs WHERE id = %s RETURNING id", [fifth.id])
    await assert_queue_matches_jobs(dsn)
    assert await _queue_ids(dsn) == set()


async def test_job_id_cannot_change(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    with pytest.raises(psycopg.errors.CheckViolation, match="id cannot change"):
        await fetch(
            dsn,
            "UPDATE pgjobs.jobs SET id = gen_random_uuid() WHERE id = %s RETURNING id",
            [job.id],
        )
    await fetch(dsn, "UPDATE pgjobs.jobs SET id = id WHERE id = %s RETURNING id", [job.id])
    await assert_queue_matches_jobs(dsn)


async def test_the_claim_leaves_the_job_row_and_the_end_rewrites_it_in_place(
    dsn: str, client: Client
) -> None:
    """sql/0021: a claim updates queue rows only, never the job row; the end of a job
    rewrites its job row once, inside its page (a HOT update: no column an index of
    pgjobs.job_rows covers changes, so no index entry is written) while the page has room."""
    for _ in range(5):
        await client.enqueue("acme", "echo")
    counts = (
        "SELECT pg_stat_get_xact_tuples_updated('pgjobs.job_rows'::regclass) AS updated,"
        " pg_stat_get_xact_tuples_hot_updated('pgjobs.job_rows'::regclass) AS hot,"
        " pg_stat_get_xact_tuples_updated('pgjobs.job_queue'::regclass) AS queue_updated"
    )
    params = {
        "now": None,
        "limit": 5,
        "worker_id": "w",
        "lease_seconds": 60.0,
        "job_types": None,
        "after_company": None,
    }
    async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
        # Transaction-level counters: this session's own updates, before the stats flush.
        claimed = await (await conn.execute(QUERIES["job_claim_batch"], params)).fetchall()
        assert await (await conn.execute(counts)).fetchone() == {
            "updated": 0,
            "hot": 0,
            "queue_updated": 5,
        }
        finish = finish_params(claimed)
        assert (
            len(await (await conn.execute(QUERIES["job_finish_many_if_leased"], finish)).fetchall())
            == 5
        )
        assert await (await conn.execute(counts)).fetchone() == {
            "updated": 5,
            "hot": 5,
            "queue_updated": 5,
        }
        await conn.commit()
    await assert_queue_matches_jobs(dsn)


async def test_listing_by_status_pages_through_each_status(dsn: str, client: Client) -> None:
    # queued and running are listed through pgjobs.job_queue, the others by filtering
    # the company's jobs: both keyset-paginated newest first, the same for the caller.
    jobs = [await client.enqueue("acme", "echo", {"n": n}) for n in range(5)]
    await client.enqueue("other", "echo")
    running = await claim_one(dsn, "w1")
    done = await claim_one(dsn, "w1")
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(done))

    queued_ids = [j.id for j in reversed(jobs) if j.id not in (running["id"], done["id"])]
    first = await client.list("acme", status="queued", limit=2)
    assert [j.id for j in first.jobs] == queued_ids[:2]
    assert first.next_cursor is not None
    rest = await client.list("acme", status="queued", limit=2, cursor=first.next_cursor)
    assert [j.id for j in rest.jobs] == queued_ids[2:]
    assert rest.next_cursor is None
    assert [j.id for j in (await client.list("acme", status="running")).jobs] == [running["id"]]
    assert [j.id for j in (await client.list("acme", status="done")).jobs] == [done["id"]]
    assert (await client.list("acme", status="failed")).jobs == []

    # failed and cancelled are listed through the audit log's failed/cancelled events;
    # a job retried since has such an event but is no longer listed under it.
    failed = await claim_one(dsn, "w1")
    fail = finish_params(failed, "fail")
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], fail)
    retried = await claim_one(dsn, "w1")
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(retried, "fail"))
    await client.retry("acme", retried["id"])  # type: ignore[arg-type]
    cancelled = await client.cancel("acme", queued_ids[0])
    assert [j.id for j in (await client.list("acme", status="failed")).jobs] == [failed["id"]]
    assert [j.id for j in (await client.list("acme", status="cancelled")).jobs] == [cancelled.id]
    assert (await client.list("other", status="cancelled")).jobs == []
    assert retried["id"] in [j.id for j in (await client.list("acme", status="queued")).jobs]


async def test_failed_or_cancelled_status_needs_its_event(dsn: str, client: Client) -> None:
    # The listing of failed and cancelled jobs finds them by their events: a job row
    # cannot say failed (or cancelled) without its last event saying so.
    job = await client.enqueue("acme", "echo")
    with pytest.raises(psycopg.errors.CheckViolation, match="jobs_state_consistent"):
        await fetch(
            dsn,
            "UPDATE pgjobs.jobs SET status = 'cancelled', finished_at = now(),"
            " event_seq = event_seq + 1, last_event = 'content_job.failed',"
            " error_message = 'x' WHERE id = %s RETURNING id",
            [job.id],
        )


async def test_claims_race_cancels_finishes_and_rescues_without_deadlock(
    dsn: str, client: Client
) -> None:
    """The locking rule of sql/0004: writers lock the job row, then (trigger) the queue
    row; the claim and the rescuer lock both SKIP LOCKED and never wait. Were the claim
    to wait for a job row while holding its queue row, a cancel of a queued job racing it
    would deadlock (PostgreSQL aborts one after deadlock_timeout; any error fails this
    test). Everything races on 300 jobs; the histories and the queue stay valid."""
    import random

    from pgjobs.jobspec import JobSpec

    jobs = await client.enqueue_many(JobSpec("acme", "echo", max_attempts=2) for _ in range(300))
    ids = [j.id for j in jobs]
    settling = asyncio.Event()  # the canceller is done: stop rescuing, claim what is left
    stop = asyncio.Event()
    # The rescuer's clock runs 5 minutes ahead, and a rescue puts the job back with that
    # run_at: while settling, claimers read the clock further ahead still, or a job rescued
    # to queued would wait five minutes (the test failed 4 runs in 20 that way).
    ahead = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)

    async def claimer(name: str) -> None:
        params = {
            "limit": 5,
            "worker_id": name,
            "lease_seconds": 30.0,
            "job_types": None,
            "after_company": None,
        }
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            conn.row_factory = dict_row
            while not stop.is_set():
                now = ahead if settling.is_set() else None
                cur = await conn.execute(QUERIES["job_claim_batch"], {**params, "now": now})
                claimed = await cur.fetchall()
                if claimed:
                    outcome = random.choice(["done", "error", "fail"])
                    await conn.execute(
                        QUERIES["job_finish_many_if_leased"], finish_params(claimed, outcome)
                    )
                else:
                    await asyncio.sleep(0.001)

    async def canceller() -> None:
        for job_id in random.sample(ids, len(ids)):
            with contextlib.suppress(InvalidTransitionError):
                await client.cancel("acme", job_id)
            if random.random() < 0.2:
                with contextlib.suppress(InvalidTransitionError):
                    await client.retry("acme", job_id)

    async def rescuer_loop() -> None:
        # Every running lease looks expired to it: rescues race completions and claims.
        while not settling.is_set():
            later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
            await rescuer.rescue_expired_with(dsn, now=later)
            await asyncio.sleep(0.005)

    async def until_settled() -> None:
        await canceller()
        settling.set()
        for _ in range(500):
            if await _unfinished(dsn) == 0:
                break
            await asyncio.sleep(0.02)
        stop.set()

    await asyncio.gather(*(claimer(f"c{n}") for n in range(4)), rescuer_loop(), until_settled())
    assert await assert_histories_valid(dsn) == 300
    assert await _unfinished(dsn) == 0


async def test_a_claim_passes_over_a_job_a_cancel_holds(dsn: str, client: Client) -> None:
    """A claim must never wait for a row another writer holds (the locking rule in
    job_claim_batch's header). Pinned here: a row trigger sleeps inside the cancel once it
    holds the queue row and the job row (it locks the queue row first, sql/0021; a BEFORE
    ROW trigger runs on the locked job row), and a claim runs meanwhile: it passes the
    job over. Before sql/0021, a claim that locked only the queue row and then updated the
    job row waited for it, and PostgreSQL raised its deadlock error in one of the two."""
    job = await client.enqueue("acme", "echo")
    await fetch(
        dsn,
        "CREATE FUNCTION hold_in_cancel() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN PERFORM pg_sleep(1); RETURN NEW; END $$;"
        " CREATE TRIGGER hold_cancel BEFORE UPDATE ON pgjobs.job_rows FOR EACH ROW"
        " WHEN (NEW.status = 'cancelled') EXECUTE FUNCTION hold_in_cancel()",
    )
    cancel = asyncio.create_task(client.cancel("acme", job.id))
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        conn.row_factory = dict_row
        for _ in range(500):  # until the cancel sleeps in its trigger
            cur = await conn.execute(
                "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event = 'PgSleep'"
            )
            if (await cur.fetchone() or {}).get("n"):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the cancel never reached its trigger")
        params = {
            "now": None, "limit": 10, "worker_id": "w", "lease_seconds": 30.0,
            "job_types": None, "after_company": None,
        }  # fmt: skip
        claimed = await (await conn.execute(QUERIES["job_claim_batch"], params)).fetchall()
    assert claimed == []
    assert (await cancel).status == JobStatus.CANCELLED
    assert await assert_histories_valid(dsn) == 1
