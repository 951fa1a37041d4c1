"""sql/0021: a queued or running job's state lives in its queue row, an ended job's in its
job row, and the schema keeps the two in step: queue rows come and go only with their
job's status, a live job's state changes only on its queue row, and the end of a live job
continues the queue row's seq (one audit row each, gap-free), by hand in psql too."""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest

from helpers import (
    assert_histories_valid,
    assert_queue_matches_jobs,
    claim_one,
    fetch,
    finish_params,
)
from pgjobs import doorbell, events
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES


async def _refused(dsn: str, error: type[psycopg.Error], match: str, sql: str, *args: Any) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(error, match=match):
            await conn.execute(sql, list(args))  # type: ignore[arg-type]


async def test_queue_rows_are_not_added_or_removed_by_hand(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    await _refused(
        dsn,
        psycopg.errors.InsufficientPrivilege,
        "added and removed with their job",
        "DELETE FROM pgjobs.job_queue WHERE job_id = %s",
        job.id,
    )
    ended = await client.enqueue("acme", "echo")
    await client.cancel("acme", ended.id)
    await _refused(
        dsn,
        psycopg.errors.InsufficientPrivilege,
        "added and removed with their job",
        "INSERT INTO pgjobs.job_queue (job_id, company_id, job_type, priority, run_at)"
        " VALUES (%s, 'acme', 'echo', 0, now())",
        ended.id,
    )
    await assert_queue_matches_jobs(dsn)


async def test_a_live_jobs_state_is_not_changed_on_its_job_row(dsn: str, client: Client) -> None:
    """The job row of a queued or running job holds what it held when the job became live;
    a transition written there (not on the queue row) would leave the view showing the
    queue row's state and the audit log another."""
    job = await client.enqueue("acme", "echo")
    await claim_one(dsn, "w1")
    await _refused(
        dsn,
        psycopg.errors.CheckViolation,
        "without a transition",
        "UPDATE pgjobs.job_rows SET event_seq = event_seq + 1,"
        " last_event = 'content_job.progress' WHERE id = %s",
        job.id,
    )


async def test_a_live_jobs_end_continues_its_queue_rows_seq(dsn: str, client: Client) -> None:
    """Ending a running job on its job row: the seq must be the queue row's plus one (the
    job row's own is 1 still, from the enqueue), and the queue row goes with it."""
    job = await client.enqueue("acme", "echo")
    claimed = await claim_one(dsn, "w1")
    assert claimed["event_seq"] == 2
    end = (
        "UPDATE pgjobs.job_rows SET status = 'cancelled', finished_at = now(),"
        " lease_expires_at = NULL, event_seq = %s, last_event = 'content_job.cancelled'"
        " WHERE id = %s"
    )
    await _refused(dsn, psycopg.errors.CheckViolation, "without a transition", end, 2, job.id)
    await _refused(dsn, psycopg.errors.CheckViolation, "without a transition", end, 4, job.id)
    await fetch(dsn, end, [3, job.id])
    assert await fetch(
        dsn, "SELECT status, event_seq FROM pgjobs.jobs WHERE id = %s", [job.id]
    ) == [{"status": "cancelled", "event_seq": 3}]
    assert await fetch(dsn, "SELECT job_id FROM pgjobs.job_queue") == []
    assert await assert_histories_valid(dsn) == 1


async def test_writes_through_the_view_reach_the_tables_with_their_rules(
    dsn: str, client: Client
) -> None:
    """INSERT, UPDATE and DELETE of pgjobs.jobs (a view) are routed to the tables row by row:
    a live job's transition to its queue row, its end to its job row, each audited; a
    change without its seq bump is refused as on the tables."""
    (row,) = await fetch(
        dsn,
        "INSERT INTO pgjobs.jobs (id, company_id, job_type) VALUES (gen_random_uuid(), 'acme',"
        " 'echo') RETURNING id, status, event_seq",
    )
    job_id = row["id"]
    assert (row["status"], row["event_seq"]) == ("queued", 1)
    await fetch(
        dsn,
        "UPDATE pgjobs.jobs SET progress_message = 'x', event_seq = event_seq + 1,"
        " last_event = 'content_job.progress' WHERE id = %s",
        [job_id],
    )
    (queue,) = await fetch(
        dsn, "SELECT progress_message, event_seq FROM pgjobs.job_queue WHERE job_id = %s", [job_id]
    )
    assert (queue["progress_message"], queue["event_seq"]) == ("x", 2)
    await _refused(
        dsn,
        psycopg.errors.CheckViolation,
        "without a transition",
        "UPDATE pgjobs.jobs SET status = 'cancelled', finished_at = now(),"
        " last_event = 'content_job.cancelled' WHERE id = %s",
        job_id,
    )
    await fetch(
        dsn,
        "UPDATE pgjobs.jobs SET status = 'cancelled', finished_at = now(),"
        " event_seq = event_seq + 1, last_event = 'content_job.cancelled' WHERE id = %s",
        [job_id],
    )
    events = await fetch(
        dsn, "SELECT seq, type FROM pgjobs.job_events WHERE job_id = %s ORDER BY seq", [job_id]
    )
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, "content_job.queued"),
        (2, "content_job.progress"),
        (3, "content_job.cancelled"),
    ]
    await assert_queue_matches_jobs(dsn)
    await fetch(dsn, "DELETE FROM pgjobs.jobs WHERE id = %s", [job_id])
    assert await fetch(dsn, "SELECT id FROM pgjobs.job_rows") == []


@pytest.mark.parametrize("outcome", ["error", "done"])
async def test_a_ringing_finish_sends_no_items_whether_it_ends_or_retries(
    dsn: str, client: Client, outcome: str
) -> None:
    """The finish has one doorbell mark (in its UPDATE of the job rows) for two UPDATEs:
    a batch of retries alone writes only queue rows, and its commit must still carry no
    event items (the mark is a one-time filter, evaluated though no job row changes)."""
    await client.enqueue_many(JobSpec("acme", "echo", max_attempts=2) for _ in range(2))
    claimed = [await claim_one(dsn, "w1"), await claim_one(dsn, "w1")]
    marker = f"marker-{uuid.uuid4()}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {events.EVENTS_CHANNEL}")
        finish = doorbell.ringing(QUERIES["job_finish_many_if_leased"])
        rows = await fetch(dsn, finish, finish_params(claimed, outcome))
        await fetch(dsn, "SELECT pg_notify(%s, %s)", [events.EVENTS_CHANNEL, marker])
        heard = []
        async for note in listener.notifies(timeout=60):
            if note.payload == marker:
                break
            heard.append(note.payload)
    assert sorted(r["status"] for r in rows) == ["queued" if outcome == "error" else "done"] * 2
    assert heard == [], "a ringing finish sent event items"
    (n,) = await fetch(
        dsn,
        "SELECT count(*) AS n FROM pgjobs.job_events WHERE type = %s",
        ["content_job.retrying" if outcome == "error" else "content_job.done"],
    )
    assert n["n"] == 2
