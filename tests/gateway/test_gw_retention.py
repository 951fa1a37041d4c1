"""Streams across a retention cut: a Last-Event-ID older than the retained audit log
gets the current state, then live events; never a silent gap."""

from __future__ import annotations

import datetime as dt
import uuid

import psycopg
from gateway_helpers import RunningGateway, Sse, collect

from helpers import fetch
from pgjobs import retention

JOBS = "/api/companies/acme/content-jobs"
EVENTS = "/api/companies/acme/events"
LATER = dt.datetime.now(dt.UTC) + dt.timedelta(days=40)


async def enqueue(gateway: RunningGateway) -> uuid.UUID:
    async with gateway.http() as http:
        r = await http.post(JOBS, json={"jobType": "echo", "input": {}})
    assert r.status_code == 202, r.text
    return uuid.UUID(r.json()["jobId"])


async def progress(dsn: str, job_id: uuid.UUID, n: int) -> None:
    """n progress transitions (the publish trigger writes their audit rows)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        for i in range(n):
            await conn.execute(
                "UPDATE pgjobs.jobs SET event_seq = event_seq + 1,"
                " last_event = 'content_job.progress', progress_fraction = %s WHERE id = %s",
                [(i + 1) / n, job_id],
            )


async def prune_all_events(dsn: str) -> None:
    report = await retention.prune(
        dsn, jobs_older_than=None, events_older_than=dt.timedelta(days=1), now=LATER
    )
    assert report.events > 0


async def test_job_stream_resuming_before_the_cut_gets_the_state_then_live(
    gateway: RunningGateway, dsn: str
) -> None:
    job_id = await enqueue(gateway)
    await progress(dsn, job_id, 3)  # seq 2..4
    await prune_all_events(dsn)  # events 1..4 are gone; the job row is at seq 4

    async def cancel_after_first(event: Sse) -> None:
        if event.id == "4":
            await gateway.state.client.cancel("acme", job_id)

    events = await collect(
        gateway, f"{JOBS}/{job_id}/events", last_event_id="1", on_event=cancel_after_first
    )
    assert [(e.event, e.id, e.data["type"], e.data["status"]) for e in events] == [
        ("status", "4", "content_job.progress", "queued"),
        ("status", "5", "content_job.cancelled", "cancelled"),
    ]
    assert events[0].data["progress"]["fraction"] == 1.0


async def test_job_stream_with_a_partly_pruned_history_gets_the_state(
    gateway: RunningGateway, dsn: str
) -> None:
    job_id = await enqueue(gateway)
    await progress(dsn, job_id, 2)  # seq 2, 3
    await prune_all_events(dsn)
    await progress(dsn, job_id, 1)  # seq 4, kept
    await gateway.state.client.cancel("acme", job_id)  # seq 5, kept
    # Events 2 and 3 are gone, 4 and 5 are there: not a silent jump from 1 to 4, but the
    # job's state read after the cut (which here is also its last event).
    events = await collect(gateway, f"{JOBS}/{job_id}/events", last_event_id="1")
    assert [(e.id, e.data["type"], e.data["status"]) for e in events] == [
        ("5", "content_job.cancelled", "cancelled")
    ]


async def test_company_stream_resuming_before_the_cut_gets_unfinished_jobs_then_live(
    gateway: RunningGateway, dsn: str
) -> None:
    first = await enqueue(gateway)
    (row,) = await fetch(
        dsn, "SELECT xid::text AS xid, id FROM pgjobs.job_events WHERE job_id = %s", [first]
    )
    cursor = f"{row['xid']}-{row['id']}"
    await progress(dsn, first, 2)  # seq 2, 3: the client never saw these
    second = await enqueue(gateway)
    done = await enqueue(gateway)
    await gateway.state.client.cancel("acme", done)  # finished: not repeated
    await prune_all_events(dsn)
    third = await enqueue(gateway)  # after the cut: kept

    async def cancel_when_caught_up(event: Sse) -> None:
        if event.data["jobId"] == str(third) and event.data["type"] == "content_job.queued":
            await gateway.state.client.cancel("acme", first)

    events = await collect(
        gateway, EVENTS, last_event_id=cursor, stop_after=4, on_event=cancel_when_caught_up
    )
    states = events[:3]
    assert {e.event for e in events} == {"status"}
    assert [(e.data["jobId"], e.data["type"], e.data["seq"]) for e in states] == sorted(
        [
            (str(first), "content_job.progress", 3),
            (str(second), "content_job.queued", 1),
            (str(third), "content_job.queued", 1),
        ]
    )
    # One cursor for all of them: the horizon they were read at; a reconnect goes on
    # from there.
    assert len({e.id for e in states}) == 1
    assert states[0].id is not None
    assert states[0].id.endswith("-0")
    # Then live.
    live = events[3]
    assert (live.data["jobId"], live.data["type"], live.data["seq"]) == (
        str(first),
        "content_job.cancelled",
        4,
    )


async def test_company_stream_after_the_cut_replays_as_before(
    gateway: RunningGateway, dsn: str
) -> None:
    """A cursor newer than every pruned row of the company resumes from the table, with
    no state frames: only a Last-Event-ID behind the cut is reset."""
    await enqueue(gateway)
    await prune_all_events(dsn)
    job = await enqueue(gateway)
    (row,) = await fetch(
        dsn, "SELECT xid::text AS xid, id FROM pgjobs.job_events WHERE job_id = %s", [job]
    )
    await gateway.state.client.cancel("acme", job)
    events = await collect(gateway, EVENTS, last_event_id=f"{row['xid']}-{row['id']}", stop_after=1)
    assert [(e.data["type"], e.data["seq"]) for e in events] == [("content_job.cancelled", 2)]
