"""The two NOTIFY channels as the database sends them, read with pgjobs.events.

pgjobs_events carries every transition (for the gateway); pgjobs_work only what a worker
acts on: jobs made claimable, one item per job type per statement, and cancellations of
running jobs (sql/0007_worker_channel.sql). Each test reads the real trigger's output
and parses it with the one Python definition of its format.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import claim_one, fast_settings, fetch, finish_params, running_worker, wait_until
from pgjobs import demo, doorbell, events, rescuer
from pgjobs.client import RING_FROM_JOBS, Client
from pgjobs.context import JobContext
from pgjobs.events import Cancelled, Claimable, EventType
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.sync import SyncClient
from pgjobs.types import JobStatus
from pgjobs.worker import Worker

Conn = psycopg.AsyncConnection[Any]


async def _listening(dsn: str, channel: str) -> Conn:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(f"LISTEN {channel}")
    return conn


async def _until_marker(dsn: str, listener: Conn, channel: str) -> list[str]:
    """Every payload the listener gets on ``channel`` before a marker committed now: any
    transaction that committed earlier was delivered first (a bounded wait, not a sleep)."""
    marker = f"marker-{uuid.uuid4()}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
        await other.execute("SELECT pg_notify(%s, %s)", [channel, marker])
    before: list[str] = []
    async for note in listener.notifies(timeout=10):
        if note.payload == marker:
            return before
        assert note.channel == channel
        before.append(note.payload)
    raise AssertionError("the marker NOTIFY never arrived")


async def _work(dsn: str, listener: Conn) -> list[events.WorkItem]:
    """The worker-channel items sent since the last call, parsed; each payload is checked
    to round-trip through encode_work."""
    items: list[events.WorkItem] = []
    for payload in await _until_marker(dsn, listener, events.WORK_CHANNEL):
        assert len(payload.encode()) < 8000
        parsed = events.parse_work(payload)
        assert events.parse_work(events.encode_work(parsed)) == parsed
        items.extend(parsed)
    return items


async def _run(dsn: str, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    return await fetch(dsn, QUERIES[query], params)


async def test_event_items_parse_into_what_the_audit_log_holds(dsn: str, client: Client) -> None:
    """Every transition's NOTIFY item on pgjobs_events, parsed by pgjobs.events, has the
    values of its audit row (messages cut to 300 characters), re-encodes to the same
    events, and gives the same SSE data as the row."""
    async with await _listening(dsn, events.EVENTS_CHANNEL) as listener:
        job = await client.enqueue("acme", "echo", max_attempts=2)
        claimed = await claim_one(dsn, "w1")
        params = {"id": job.id, "lease_token": claimed["lease_token"], "now": None}
        await _run(dsn, "job_progress_if_leased", {**params, "fraction": 0.5, "message": "é" * 400})
        retry = {**finish_params(claimed, "error"), "retry_delays": [30.0]}
        await _run(dsn, "job_finish_many_if_leased", retry)
        await client.cancel("acme", job.id)
        payloads = await _until_marker(dsn, listener, events.EVENTS_CHANNEL)
    live = [e for p in payloads for e in events.parse_events(p)]
    for payload in payloads:
        parsed = events.parse_events(payload)
        assert events.parse_events(events.encode_events(parsed)) == parsed
    rows = await fetch(
        dsn, "SELECT * FROM pgjobs.job_events WHERE job_id = %s ORDER BY seq", [job.id]
    )
    assert [e.type for e in live] == [
        EventType.QUEUED,
        EventType.RUNNING,
        EventType.PROGRESS,
        EventType.RETRYING,
        EventType.CANCELLED,
    ]
    assert len(rows) == len(live)
    for event, row in zip(live, rows, strict=True):
        assert (event.event_id, event.job_id, event.company_id, event.seq) == (
            row["id"],
            row["job_id"],
            row["company_id"],
            row["seq"],
        )
        assert (event.type, event.status, event.attempt) == (
            row["type"],
            row["status"],
            row["attempt"],
        )
        published = {k: row["payload"][k] for k in events.PUBLISHED_KEYS if k in row["payload"]}
        assert set(event.extra) == set(published)
        data = events.event_data(
            event.job_id, event.status, event.type, event.attempt, event.seq, event.extra
        )
        from_row = events.event_data(
            row["job_id"], row["status"], row["type"], row["attempt"], row["seq"], published
        )
        if "progress" in published:  # cut to 300 characters, in the item and in the data
            assert data["progress"] == {"fraction": 0.5, "message": "é" * 300}
        if "runAt" in published:  # the same time, whatever its text
            assert dt.datetime.fromisoformat(data["runAt"]) == dt.datetime.fromisoformat(
                from_row["runAt"]
            )
            from_row["runAt"] = data["runAt"]
        assert data == from_row


async def test_work_channel_carries_claimable_jobs_and_cancellations_only(
    dsn: str, client: Client
) -> None:
    """What a worker acts on, and nothing else: an enqueue, a retry, a release, a rescue
    and a manual retry make jobs claimable (one item per job type per statement, runAt
    only when none is due yet); a running job's cancellation names it. The claim,
    progress, completions and a queued job's cancellation send nothing on this channel."""
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    async with await _listening(dsn, events.WORK_CHANNEL) as listener:
        await client.enqueue_many(  # one statement: fewer than RING_FROM_JOBS jobs
            [JobSpec("acme", "echo") for _ in range(RING_FROM_JOBS - 10)]
            + [JobSpec("globex", "render", {"n": n}) for n in range(3)]
            + [JobSpec("globex", "sleep", run_at=later)]
        )
        items = await _work(dsn, listener)
        assert sorted(items, key=repr) == sorted(
            [Claimable("echo"), Claimable("render"), Claimable("sleep", later)], key=repr
        )

        # The hot path: claim, progress, done. Nothing for workers.
        jobs = await _run(
            dsn,
            "job_claim_batch",
            {"now": None, "limit": 2, "worker_id": "w1", "lease_seconds": 30.0,
             "job_types": ["render"], "after_company": None},
        )  # fmt: skip
        first, second = jobs
        await _run(
            dsn,
            "job_progress_if_leased",
            {"id": first["id"], "lease_token": first["lease_token"], "now": None,
             "fraction": 0.5, "message": "half"},
        )  # fmt: skip
        await _run(dsn, "job_finish_many_if_leased", finish_params(first))
        queued = await client.list("globex", status="queued", limit=10)
        sleeper = next(j for j in queued.jobs if j.job_type == "sleep")
        await client.cancel("globex", sleeper.id)  # queued: no worker runs it
        assert await _work(dsn, listener) == []

        # A failed attempt with a backoff: claimable again, not before its run_at.
        retry = {**finish_params(second, "error"), "retry_delays": [60.0]}
        await _run(dsn, "job_finish_many_if_leased", retry)
        (retried,) = await _work(dsn, listener)
        row = (await fetch(dsn, "SELECT run_at FROM pgjobs.jobs WHERE id = %s", [second["id"]]))[0]
        assert retried == Claimable("render", row["run_at"])

        # A release (worker shutdown) and a rescue (expired lease): claimable at once.
        (held,) = await _run(
            dsn,
            "job_claim_batch",
            {"now": None, "limit": 1, "worker_id": "w1", "lease_seconds": 30.0,
             "job_types": ["echo"], "after_company": None},
        )  # fmt: skip
        await _run(
            dsn,
            "job_release_if_leased",
            {"now": None, "ids": [held["id"]], "lease_tokens": [held["lease_token"]]},
        )
        assert await _work(dsn, listener) == [Claimable("echo")]
        await _run(
            dsn,
            "job_claim_batch",
            {"now": None, "limit": 1, "worker_id": "w2", "lease_seconds": 0.000001,
             "job_types": ["echo"], "after_company": None},
        )  # fmt: skip  # a lease over by the time the rescue runs
        assert len(await rescuer.rescue_expired_with(dsn)) == 1
        assert await _work(dsn, listener) == [Claimable("echo")]

        # A running job's cancellation; then its manual retry makes it claimable.
        running = await claim_one(dsn, "w3")
        assert await _work(dsn, listener) == []
        await client.cancel("acme", running["id"])
        assert await _work(dsn, listener) == [Cancelled(running["id"])]
        await client.retry("acme", running["id"])
        assert await _work(dsn, listener) == [Claimable("echo")]


async def test_many_cancellations_are_packed_under_the_notify_limit(
    dsn: str, client: Client
) -> None:
    jobs = await client.enqueue_many(JobSpec("acme", "echo") for _ in range(400))
    claimed = await _run(
        dsn,
        "job_claim_batch",
        {"now": None, "limit": 400, "worker_id": "w1", "lease_seconds": 30.0, "job_types": None,
         "after_company": None},
    )  # fmt: skip
    assert len(claimed) == 400
    async with await _listening(dsn, events.WORK_CHANNEL) as listener:
        await _cancel_all(dsn)
        payloads = await _until_marker(dsn, listener, events.WORK_CHANNEL)
    assert 1 < len(payloads) <= len(jobs) // 40, "packed, not one NOTIFY per job"
    assert all(len(p.encode()) < 8000 for p in payloads)
    cancelled = [i for p in payloads for i in events.parse_work(p)]
    assert sorted(cancelled, key=repr) == sorted((Cancelled(j.id) for j in jobs), key=repr)


async def test_a_statements_items_fill_each_notify_up_to_the_limit(
    dsn: str, client: Client
) -> None:
    """Each channel's payloads hold as many of a statement's items as fit under the
    8000-byte limit (sql/0010): every payload but the last is nearly full."""
    events_listener = await _listening(dsn, events.EVENTS_CHANNEL)
    work_listener = await _listening(dsn, events.WORK_CHANNEL)
    async with events_listener, work_listener:
        # One job type per job: one worker-channel item per job. On a connection of the
        # test's own, whose commit carries the items (through the pool, a batch this big
        # rings after its commit instead).
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            specs = (JobSpec("acme", f"type-{n}") for n in range(1000))
            jobs = await client.enqueue_many(specs, conn=conn)
        sent_events = await _until_marker(dsn, events_listener, events.EVENTS_CHANNEL)
        sent_work = await _until_marker(dsn, work_listener, events.WORK_CHANNEL)
    for payloads, items in (
        (sent_events, [e.job_id for p in sent_events for e in events.parse_events(p)]),
        (sent_work, [w for p in sent_work for w in events.parse_work(p)]),
    ):
        assert len(items) == len(jobs)
        sizes = sorted(len(p.encode()) for p in payloads)
        assert sizes[-1] < 8000
        # A payload ends when the next item would not fit: ~200 bytes short at most here
        # (0007 cut them at about half the limit).
        assert len(sizes) > 2
        assert all(size > 7500 for size in sizes[1:]), sizes


async def _cancel_all(dsn: str) -> None:
    # One statement, as an operator's psql would cancel a batch (with its transitions): on
    # the job rows, each taking its queue row's seq plus one (sql/0021; an UPDATE of the
    # view pgjobs.jobs is routed row by row, a statement and a NOTIFY per job).
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute(
            "UPDATE pgjobs.job_rows j SET status = 'cancelled', finished_at = now(),"
            " lease_expires_at = NULL, attempts = q.attempts, worker_id = q.worker_id,"
            " lease_token = q.lease_token, started_at = q.started_at,"
            " event_seq = q.event_seq + 1, last_event = 'content_job.cancelled'"
            " FROM pgjobs.job_queue q WHERE q.job_id = j.id AND q.status = 'running'"
        )


# -- workers ----------------------------------------------------------------------------


def _record_notifies(worker: Worker) -> list[str]:
    """The payloads the worker's listener hands it from now on."""
    assert worker.listener is not None
    heard: list[str] = []
    on_notify = worker.listener.on_notify

    def record(payload: str) -> None:
        heard.append(payload)
        on_notify(payload)

    worker.listener.on_notify = record
    return heard


@pytest.mark.parametrize("bell", [True, False], ids=["doorbell", "items"])
async def test_a_worker_hears_only_claimable_jobs_not_their_progress(
    dsn: str, client: Client, storage_dir: Path, bell: bool
) -> None:
    """Jobs that report progress run to the end, and every NOTIFY the worker received
    was a worker-channel payload of claimable jobs: none of the running, progress and
    done events, nor the rings of a doorbell worker (which the gateway's channel
    carried)."""
    settings = fast_settings(storage_dir, poll_interval_seconds=60.0, concurrency=4, doorbell=bell)
    async with (
        await _listening(dsn, events.EVENTS_CHANNEL) as gateway_side,
        running_worker(dsn, demo.registry, settings) as worker,
    ):
        heard = _record_notifies(worker)
        jobs = [
            await client.enqueue("acme", "render", {"title": f"t{n}", "steps": 3}) for n in range(4)
        ]
        await wait_until(
            lambda: _all_done(client, [j.id for j in jobs]), within=30, message="jobs done"
        )
        transitions = await _until_marker(dsn, gateway_side, events.EVENTS_CHANNEL)
    parsed = [events.parse_events_channel(p) for p in transitions]
    if bell:
        rung = {i for r in parsed if isinstance(r, events.Ring) for i in r.jobs["acme"]}
        assert rung == {j.id for j in jobs}
    else:
        kinds = {e.type for p in parsed if isinstance(p, list) for e in p}
        assert {EventType.PROGRESS, EventType.DONE} <= kinds
    items = [item for payload in heard for item in events.parse_work(payload)]
    assert items == [Claimable("render")] * 4  # one per enqueue; nothing else


async def _all_done(client: Client, ids: list[uuid.UUID]) -> bool:
    for job_id in ids:
        if (await client.get("acme", job_id)).status is not JobStatus.DONE:
            return False
    return True


async def test_a_worker_is_not_woken_by_jobs_it_does_not_claim_or_not_due(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """Claimable jobs of a type outside the worker's registry, or due only later, do not
    make it claim; a job it serves, due now, does (the poll is too slow to be what
    starts it)."""
    registry = Registry()

    @registry.handler("alpha")
    async def alpha(ctx: JobContext) -> None:
        pass

    settings = fast_settings(storage_dir, poll_interval_seconds=60.0)
    async with running_worker(dsn, registry, settings) as worker:
        heard = _record_notifies(worker)
        wakes = 0
        wake = worker._wake

        def counting_wake() -> None:
            nonlocal wakes
            wakes += 1
            wake()

        worker._wake = counting_wake  # type: ignore[method-assign]
        later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        await client.enqueue("acme", "gamma")
        await client.enqueue("acme", "alpha", run_at=later)
        await wait_until(lambda: _at_least(heard, 2), within=10, message="two notifications")
        items = [i for p in heard for i in events.parse_work(p)]
        assert items == [Claimable("gamma"), Claimable("alpha", later)]
        assert wakes == 0, "woken by a job it does not claim, or by one not due"
        job = await client.enqueue("acme", "alpha")
        await wait_until(lambda: _all_done(client, [job.id]), within=10, message="alpha done")
        assert wakes >= 1


async def _at_least(items: list[str], n: int) -> bool:
    return len(items) >= n


async def test_a_cancellation_reaches_the_worker_before_its_heartbeat(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """A heartbeat far longer than the test: only the worker channel's cancellation can
    stop the handler in time."""
    started = asyncio.Event()
    stopped = asyncio.Event()
    registry = Registry()

    @registry.handler("long")
    async def long(ctx: JobContext) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            stopped.set()
            raise

    job = await client.enqueue("acme", "long")
    settings = fast_settings(storage_dir, heartbeat_seconds=60.0, lease_seconds=120.0)
    async with running_worker(dsn, registry, settings):
        await asyncio.wait_for(started.wait(), 10)
        await client.cancel("acme", job.id)
        await asyncio.wait_for(stopped.wait(), 10)
    assert (await client.get("acme", job.id)).status is JobStatus.CANCELLED


async def test_a_wake_up_during_a_claim_that_holds_every_slot_is_not_lost(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: Any
) -> None:
    """The worker's claim holds all its free slots and was sent before a job committed;
    the job's NOTIFY arrives while that claim is out, so no second claim can be sent for
    it, and the claim comes back empty. The job still starts at once, not at the next poll
    (60 s here): the claim that was out during a wake-up does not mark the queue empty.
    (Seen on a loaded machine: four jobs enqueued during the worker's first claim waited
    for the poll.)"""
    registry = Registry()
    started: list[str] = []

    @registry.handler("alpha")
    async def alpha(ctx: JobContext) -> None:
        started.append(str(ctx.job.id))

    held, gate = asyncio.Event(), asyncio.Event()
    real_claim = Worker._claim

    async def claim_then_wait(self: Worker, limit: int) -> Any:
        jobs = await real_claim(self, limit)
        if not gate.is_set():  # the first claim: comes back only after the wake-up
            held.set()
            await gate.wait()
        return jobs

    monkeypatch.setattr(Worker, "_claim", claim_then_wait)
    settings = fast_settings(storage_dir, poll_interval_seconds=60.0, concurrency=1)
    async with running_worker(dsn, registry, settings) as worker:
        heard = _record_notifies(worker)
        await asyncio.wait_for(held.wait(), 20)
        job = await client.enqueue("acme", "alpha")
        await wait_until(lambda: _at_least(heard, 1), message="the job's NOTIFY")
        gate.set()
        await wait_until(
            lambda: _true(started == [str(job.id)]), message="the job started before the poll"
        )


async def _true(value: bool) -> bool:
    return value


async def _in_doorbell_transaction(dsn: str, query: str, params: dict[str, Any]) -> list[Any]:
    """Run a worker query in a transaction that asks for a ring (sql/0019_doorbell.sql)."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("SELECT set_config(%s, 'on', true)", [events.DOORBELL_SETTING])
        cur = await conn.execute(QUERIES[query], params)
        rows = await cur.fetchall()
        await conn.commit()
        return rows


async def test_a_doorbell_transaction_writes_its_audit_rows_and_sends_no_items(
    dsn: str, client: Client
) -> None:
    """With pgjobs.doorbell on, enqueue, claim, progress and a retrying failure write their
    audit rows and send nothing on pgjobs_events; the retry still wakes workers on
    pgjobs_work. A transaction that does not ask, on the same session kind, still sends
    items: the setting is transaction-local."""
    async with (
        await _listening(dsn, events.EVENTS_CHANNEL) as listener,
        await _listening(dsn, events.WORK_CHANNEL) as work,
    ):
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            await conn.execute("SELECT set_config(%s, 'on', true)", [events.DOORBELL_SETTING])
            job = await client.enqueue("acme", "echo", max_attempts=2, conn=conn)
            await conn.commit()
        claimed = await claim_one(dsn, "w1")  # not a doorbell transaction: items
        params = {"id": job.id, "lease_token": claimed["lease_token"], "now": None}
        await _in_doorbell_transaction(
            dsn, "job_progress_if_leased", {**params, "fraction": 0.5, "message": "half"}
        )
        retry = {**finish_params(claimed, "error"), "retry_delays": [0.0]}
        await _in_doorbell_transaction(dsn, "job_finish_many_if_leased", retry)

        payloads = await _until_marker(dsn, listener, events.EVENTS_CHANNEL)
        [[running]] = [events.parse_events(p) for p in payloads]
        assert (running.job_id, running.seq, running.type) == (job.id, 2, EventType.RUNNING)
        assert [type(i) for i in await _work(dsn, work)] == [Claimable, Claimable]
    rows = await fetch(
        dsn, "SELECT seq, type FROM pgjobs.job_events WHERE job_id = %s ORDER BY seq", [job.id]
    )
    assert [(r["seq"], r["type"]) for r in rows] == [
        (1, EventType.QUEUED),
        (2, EventType.RUNNING),
        (3, EventType.PROGRESS),
        (4, EventType.RETRYING),
    ]


async def test_a_ring_sent_after_the_commit_names_the_jobs_and_their_rows_are_there(
    dsn: str, client: Client
) -> None:
    """A claim in a doorbell transaction, then a ring after its commit: the listener gets
    the ring and no items, and the claim's audit rows are readable when it arrives."""
    jobs = [await client.enqueue(company, "echo") for company in ("acme", "beta", "acme")]
    claim = {
        "now": None,
        "limit": 10,
        "worker_id": "w1",
        "lease_seconds": 10.0,
        "job_types": None,
        "after_company": None,
    }
    async with await _listening(dsn, events.EVENTS_CHANNEL) as listener:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            async with conn.transaction():
                await doorbell.doorbell_on(conn)
                claimed = await (await conn.execute(QUERIES["job_claim_batch"], claim)).fetchall()
            assert len(claimed) == 3
            assert await doorbell.ring(conn, [(j.company_id, j.id) for j in jobs])
            assert await doorbell.ring(conn, [])  # nothing to ring: no statement
        async for note in listener.notifies(timeout=10):
            ring = events.parse_events_channel(note.payload)
            running = await fetch(
                dsn,
                "SELECT job_id FROM pgjobs.job_events WHERE seq = 2 AND job_id = ANY(%s)",
                [[j.id for j in jobs]],
            )
            break
        assert await _until_marker(dsn, listener, events.EVENTS_CHANNEL) == []
    assert ring == events.Ring({"acme": (jobs[0].id, jobs[2].id), "beta": (jobs[1].id,)})
    assert {r["job_id"] for r in running} == {j.id for j in jobs}


async def test_a_ring_that_cannot_be_sent_is_logged_not_raised(dsn: str) -> None:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.close()
    assert not await doorbell.ring(conn, [("acme", uuid.uuid4())])


async def test_a_pooled_batch_rings_after_its_commit_and_a_small_one_sends_items(
    dsn: str, client: Client
) -> None:
    """enqueue_many through the pool, async or sync, of RING_FROM_JOBS jobs or more: the
    listener gets rings naming exactly those jobs (no items), their queued rows are in
    the audit log when it reads them, and workers are still woken in the commit. A batch
    one smaller sends its items in the commit, as before."""
    n = RING_FROM_JOBS + 3
    specs = [JobSpec(("acme", "beta")[i % 2], "echo") for i in range(n)]
    sync_specs = [JobSpec("acme", "echo") for _ in range(n)]
    small = [JobSpec("acme", "echo") for _ in range(RING_FROM_JOBS - 1)]

    def sync_enqueue() -> None:
        with SyncClient(dsn) as sync_client:
            sync_client.enqueue_many(sync_specs)

    async with (
        await _listening(dsn, events.EVENTS_CHANNEL) as listener,
        await _listening(dsn, events.WORK_CHANNEL) as work,
    ):
        await client.enqueue_many(specs)
        rung = [
            events.parse_events_channel(p)
            for p in await _until_marker(dsn, listener, events.EVENTS_CHANNEL)
        ]
        queued = await fetch(
            dsn,
            "SELECT job_id FROM pgjobs.job_events WHERE seq = 1 AND type = %s AND job_id = ANY(%s)",
            [EventType.QUEUED.value, [s.id for s in specs]],
        )
        await asyncio.to_thread(sync_enqueue)
        rung_sync = [
            events.parse_events_channel(p)
            for p in await _until_marker(dsn, listener, events.EVENTS_CHANNEL)
        ]
        await client.enqueue_many(small)
        sent_small = await _until_marker(dsn, listener, events.EVENTS_CHANNEL)
        assert await _work(dsn, work) == [Claimable("echo")] * 3
    assert _rung_jobs(rung) == {
        "acme": [s.id for s in specs if s.company_id == "acme"],
        "beta": [s.id for s in specs if s.company_id == "beta"],
    }
    assert {r["job_id"] for r in queued} == {s.id for s in specs}
    assert _rung_jobs(rung_sync) == {"acme": [s.id for s in sync_specs]}
    items = [e for p in sent_small for e in events.parse_events(p)]
    assert [(e.job_id, e.type) for e in items] == [(s.id, EventType.QUEUED) for s in small]


async def test_a_ring_of_several_payloads_arrives_whole_and_in_order(dsn: str) -> None:
    """A ring for more jobs than one payload holds goes out in one statement (a text array
    of its payloads): each payload arrives as encoded, in order, whatever quotes,
    backslashes, braces or commas the company ids hold."""
    companies = ['say "hi"', "back\\slash", "{a,b}", "NULL", "ünïcødé ✓"]
    jobs = [(companies[n % len(companies)], uuid.uuid4()) for n in range(1000)]
    sent = events.encode_ring(jobs)
    assert len(sent) > 2
    async with await _listening(dsn, events.EVENTS_CHANNEL) as listener:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            assert await doorbell.ring(conn, jobs)
        received = await _until_marker(dsn, listener, events.EVENTS_CHANNEL)
    assert received == sent


def _rung_jobs(payloads: list[list[events.LiveEvent] | events.Ring]) -> dict[str, list[uuid.UUID]]:
    """The jobs the payloads ring for, by company, in order; each payload must be a ring
    (a batch this size takes several)."""
    jobs: dict[str, list[uuid.UUID]] = {}
    for payload in payloads:
        assert isinstance(payload, events.Ring), payload
        for company_id, ids in payload.jobs.items():
            jobs.setdefault(company_id, []).extend(ids)
    return jobs
