"""Streams fed by rings: transitions committed with the doorbell on (no NOTIFY items) and
announced after their commit by ``pgjobs.doorbell.ring``, whose events the gateway's job
reader reads from ``pgjobs.job_events`` (``pgjobs.gateway.jobreader``); and its periodic
catch-up, for a ring that never came."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gateway_helpers import RunningGateway, Sse, collect, serve_gateway, settings
from psycopg.rows import dict_row

from helpers import finish_params, wait_until
from pgjobs import doorbell, events
from pgjobs.gateway import companystream, jobreader, sse
from pgjobs.gateway.fanout import BACKFILL, Fanout
from pgjobs.gateway.settings import GatewaySettings
from pgjobs.queries import QUERIES

JOBS = "/api/companies/acme/content-jobs"
COMPANY_EVENTS = "/api/companies/acme/events"
# Rings only: the catch-up never runs within a test that does not ask for it.
RINGS_ONLY = settings(catch_up_seconds=3600.0)


@pytest.fixture
def gateway_settings() -> GatewaySettings:
    return RINGS_ONLY


class DoorbellWriter:
    """Transitions as a ringing worker commits them: each in a transaction with the
    doorbell on (its audit rows, no NOTIFY items), then, unless told not to, a ring after
    the commit naming the job."""

    def __init__(self, conn: psycopg.AsyncConnection[dict[str, Any]]) -> None:
        self.conn = conn

    async def write(
        self, query: str, params: dict[str, Any], ring: list[tuple[str, uuid.UUID]] | None
    ) -> list[dict[str, Any]]:
        async with self.conn.transaction():
            await doorbell.doorbell_on(self.conn)
            rows = await (await self.conn.execute(QUERIES[query], params)).fetchall()
        if ring:
            assert await doorbell.ring(self.conn, ring)
        return rows

    async def claim(self, job_id: uuid.UUID, *, ring: bool = True, job_type: str = "echo") -> int:
        """Claim the next due job of ``job_type`` (``job_id``: the only one queued); its
        lease token."""
        params = {
            "now": None,
            "limit": 1,
            "worker_id": "w1",
            "lease_seconds": 60.0,
            "job_types": [job_type],
            "after_company": None,
        }
        (row,) = await self.write("job_claim_batch", params, [("acme", job_id)] if ring else None)
        assert row["id"] == job_id
        (job,) = await fetch_job(self.conn, job_id)
        return int(job["lease_token"])

    async def progress(
        self, job_id: uuid.UUID, lease: int, fraction: float, message: str, *, ring: bool = True
    ) -> None:
        params = {
            "id": job_id,
            "lease_token": lease,
            "fraction": fraction,
            "message": message,
            "now": None,
        }
        (row,) = await self.write(
            "job_progress_if_leased", params, [("acme", job_id)] if ring else None
        )
        assert row  # the lease held

    async def done(self, job_id: uuid.UUID, lease: int) -> None:
        params = finish_params({"id": job_id, "lease_token": lease}, "done")
        await self.write("job_finish_many_if_leased", params, [("acme", job_id)])


async def fetch_job(
    conn: psycopg.AsyncConnection[dict[str, Any]], job_id: uuid.UUID
) -> list[dict[str, Any]]:
    cur = await conn.execute("SELECT * FROM pgjobs.jobs WHERE id = %s", [job_id])
    return await cur.fetchall()


@contextlib.asynccontextmanager
async def writer(dsn: str) -> AsyncIterator[DoorbellWriter]:
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        yield DoorbellWriter(conn)


class Follower:
    """A stream read in the background: its events so far, and waits on them."""

    def __init__(self, gateway: RunningGateway, path: str, **kwargs: Any) -> None:
        self.events: list[Sse] = []
        self._changed = asyncio.Event()

        async def seen(ev: Sse) -> None:
            self.events.append(ev)
            self._changed.set()

        self.task = asyncio.create_task(collect(gateway, path, on_event=seen, **kwargs))

    async def until(self, check: Callable[[list[Sse]], bool], within: float = 30.0) -> None:
        async with asyncio.timeout(within):
            while not check(self.events):
                if self.task.done():
                    self.task.result()
                    assert check(self.events), [e.data for e in self.events]
                self._changed.clear()
                await self._changed.wait()

    async def has(self, n: int) -> None:
        await self.until(lambda evs: len(evs) >= n)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def enqueue(gateway: RunningGateway, job_type: str = "echo") -> uuid.UUID:
    job = await gateway.state.client.enqueue("acme", job_type)
    return job.id


async def company_stream_joined(gateway: RunningGateway) -> Follower:
    follower = Follower(gateway, COMPANY_EVENTS)

    async def joined() -> bool:
        return gateway.state.company_feeds.clients == 1

    await wait_until(joined, message="company stream joined its feed")
    return follower


def seqs(evs: list[Sse], job_id: uuid.UUID | None = None) -> list[int]:
    return [e.data["seq"] for e in evs if job_id is None or e.data["jobId"] == str(job_id)]


async def test_rung_transitions_reach_job_and_company_streams_gap_free_in_order(
    gateway: RunningGateway, dsn: str
) -> None:
    """A claim, progress and the finish, each committed with the doorbell on and rung:
    the job stream gets every event once, in seq order, to the end; the company stream
    gets them too, in order. They come from the job reader's reads and the woken company
    feed, not from a backfill of every stream (what an unreadable payload costs)."""
    job_id = await enqueue(gateway)
    job_stream = Follower(gateway, f"{JOBS}/{job_id}/events")
    await job_stream.has(1)  # subscribed, and its start read
    company = await company_stream_joined(gateway)
    fanout, reader = gateway.state.fanout, gateway.state.job_reader
    backfills = fanout.backfills
    async with writer(dsn) as w:
        lease = await w.claim(job_id)
        for step in range(1, 6):
            await w.progress(job_id, lease, step / 10, f"step {step}")
        await w.done(job_id, lease)
    await asyncio.wait_for(job_stream.task, timeout=30)  # the stream ends after done
    await company.until(lambda evs: seqs(evs, job_id)[-1:] == [8])
    await company.close()
    assert seqs(job_stream.events) == list(range(1, 9))
    assert [e.id for e in job_stream.events] == [str(n) for n in range(1, 9)]
    assert [e.data["type"] for e in job_stream.events][1:3] == [
        events.EventType.RUNNING,
        events.EventType.PROGRESS,
    ]
    assert job_stream.events[3].data["progress"] == {"fraction": 0.2, "message": "step 2"}
    assert job_stream.events[-1].data["status"] == "done"
    assert seqs(company.events, job_id) == list(range(2, 9))
    assert fanout.rings == 7
    assert fanout.backfills == backfills
    assert reader.reads >= 1
    assert reader.catch_ups == 0
    # The notification lag metric samples the reads after rings too (by audit row key).
    assert any(key[0] == job_id and key[1] >= 2 for key, _ in gateway.state.lag.samples)


async def test_a_transition_never_rung_reaches_both_streams_by_the_catch_up(
    dsn: str, storage_dir: Path
) -> None:
    """A progress committed with the doorbell on whose ring was never sent (its writer
    died after the commit): the periodic catch-up brings it to the job stream and wakes
    the company's feed, which reads it."""
    # The company feed's own safety-net poll out of the way: only the catch-up can help.
    quick = settings(catch_up_seconds=0.2, company_idle_poll_seconds=3600.0)
    async with serve_gateway(dsn, storage_dir, quick) as gateway:
        job_id = await enqueue(gateway)
        job_stream = Follower(gateway, f"{JOBS}/{job_id}/events")
        await job_stream.has(1)
        company = await company_stream_joined(gateway)
        backfills = gateway.state.fanout.backfills
        async with writer(dsn) as w:
            lease = await w.claim(job_id, ring=False)
            await w.progress(job_id, lease, 0.5, "unannounced", ring=False)
        await job_stream.has(3)
        await company.until(lambda evs: seqs(evs, job_id) == [2, 3])
        await job_stream.close()
        await company.close()
        assert seqs(job_stream.events) == [1, 2, 3]
        assert job_stream.events[2].data["progress"]["message"] == "unannounced"
        assert gateway.state.fanout.backfills == backfills
        assert gateway.state.fanout.rings == 0
        assert gateway.state.job_reader.catch_ups >= 1


@contextlib.contextmanager
def counting_reads(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Every database read the streams, the company feeds and the job reader make (they
    all go through sse.read_rows), by query name."""
    names: list[str] = []
    real = sse.read_rows

    async def counted(state: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        names.append(query)
        return await real(state, query, params)

    for module in (sse, companystream, jobreader):
        monkeypatch.setattr(module, "read_rows", counted)
    yield names


async def test_a_ring_naming_only_jobs_nobody_watches_runs_no_query(
    gateway: RunningGateway, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job stream of acme watches one job; a ring for two other jobs of acme (and one
    of a company with no stream here) reaches the gateway: no query at all. A ring for
    the watched job then costs one read."""
    watched, other = await enqueue(gateway, "sleep"), await enqueue(gateway)
    job_stream = Follower(gateway, f"{JOBS}/{watched}/events")
    await job_stream.has(1)
    fanout = gateway.state.fanout
    backfills, notifies = fanout.backfills, fanout.notifies
    with counting_reads(monkeypatch) as reads:
        async with writer(dsn) as w:
            lease = await w.claim(other, ring=False)
            await w.progress(other, lease, 0.5, "nobody watches", ring=False)
            assert await doorbell.ring(
                w.conn, [("acme", other), ("acme", uuid.uuid4()), ("initech", uuid.uuid4())]
            )

            async def ring_heard() -> bool:
                return fanout.notifies > notifies

            await wait_until(ring_heard, message="the ring reached the fan-out")
            # The reader's task gets its turn: it would have read by the time the loop
            # has gone round a few times.
            for _ in range(10):
                await asyncio.sleep(0)
            assert reads == []
            assert await doorbell.ring(w.conn, [("acme", watched)])  # nothing new: 1 read

            async def read_once() -> bool:
                return reads == ["job_events_after_seq_for_jobs"]

            await wait_until(read_once, message="one read for the watched job")
    await job_stream.close()
    assert fanout.backfills == backfills
    assert seqs(job_stream.events) == [1]


async def test_a_ring_naming_another_companys_job_never_reaches_its_streams(
    gateway: RunningGateway, dsn: str
) -> None:
    """globex's stream on a job of acme (its id guessed: the route would refuse it, the
    fan-out is checked directly) never gets an event of it: neither from a ring naming
    the job under acme (read for acme's stream only), nor from a ring naming it under
    globex (read with globex's company: nothing)."""
    job_id = await enqueue(gateway)
    acme = Follower(gateway, f"{JOBS}/{job_id}/events")
    await acme.has(1)
    fanout = gateway.state.fanout
    spy = fanout.subscribe_job("globex", job_id)
    spy.reached(0)  # as a stream that has read where it starts: reads are planned for it
    try:
        async with writer(dsn) as w:
            lease = await w.claim(job_id)
            await acme.has(2)
            await w.progress(job_id, lease, 0.5, "secret", ring=False)
            reads = gateway.state.job_reader.reads
            assert await doorbell.ring(w.conn, [("globex", job_id)])

            async def read_for_globex() -> bool:
                return gateway.state.job_reader.reads > reads

            await wait_until(read_for_globex, message="the ring under globex was read")
            assert await doorbell.ring(w.conn, [("acme", job_id)])
            await acme.has(3)
        assert spy.queue.empty()
        assert acme.events[2].data["progress"]["message"] == "secret"
    finally:
        fanout.unsubscribe(spy)
        await acme.close()


async def test_items_and_rings_for_one_job_deliver_each_event_once_in_order(
    gateway: RunningGateway, dsn: str
) -> None:
    """One job's transitions, some in items and some rung, including an item that
    arrives before the ring of an earlier transition: every event once, in order."""
    job_id = await enqueue(gateway)
    stream = Follower(gateway, f"{JOBS}/{job_id}/events")
    await stream.has(1)
    backfills = gateway.state.fanout.backfills
    async with writer(dsn) as w:
        lease = await w.claim(job_id)  # 2, rung
        await stream.has(2)
        await w.progress(job_id, lease, 0.3, "rung late", ring=False)  # 3, not rung yet
        item = {"id": job_id, "lease_token": lease, "fraction": 0.4, "message": "item", "now": None}
        await w.conn.execute(QUERIES["job_progress_if_leased"], item)  # 4, an item
        await stream.has(4)  # the item's gap made the stream read 3 from the table
        assert await doorbell.ring(w.conn, [("acme", job_id)])  # the ring of 3, late
        await w.progress(job_id, lease, 0.5, "rung", ring=True)  # 5
        await stream.has(5)
        await w.conn.execute(QUERIES["job_progress_if_leased"], {**item, "fraction": 0.6})  # 6
        await w.progress(job_id, lease, 0.7, "rung again", ring=True)  # 7
    await gateway.state.client.cancel("acme", job_id)  # 8, an item: the end
    await asyncio.wait_for(stream.task, timeout=30)
    assert seqs(stream.events) == list(range(1, 9))
    assert [e.data.get("progress", {}).get("fraction") for e in stream.events[2:7]] == [
        pytest.approx(0.3),
        pytest.approx(0.4),
        pytest.approx(0.5),
        pytest.approx(0.6),
        pytest.approx(0.7),
    ]
    assert gateway.state.fanout.backfills == backfills


async def test_a_long_message_has_the_same_data_rung_replayed_or_in_an_item(
    gateway: RunningGateway, dsn: str
) -> None:
    """Messages are cut to 300 characters in a NOTIFY item; an event read after a ring,
    or replayed after Last-Event-ID, carries the same data, not the row's longer text."""
    job_id = await enqueue(gateway)
    path = f"{JOBS}/{job_id}/events"
    live = Follower(gateway, path)
    await live.has(1)
    async with writer(dsn) as w:
        lease = await w.claim(job_id)
        await w.progress(job_id, lease, 0.5, "é" * 400)  # 3, rung
        item = {"id": job_id, "lease_token": lease, "fraction": 0.6, "now": None}
        await w.conn.execute(QUERIES["job_progress_if_leased"], {**item, "message": "ü" * 400})
        await live.has(4)
    await live.close()
    replayed = await collect(gateway, path, last_event_id="2", stop_after=2)
    assert [e.data for e in replayed] == [e.data for e in live.events[2:4]]
    assert live.events[2].data["progress"] == {"fraction": 0.5, "message": "é" * 300}
    assert live.events[3].data["progress"] == {"fraction": pytest.approx(0.6), "message": "ü" * 300}


async def test_the_job_reader_outlives_a_failed_round(
    gateway: RunningGateway, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A round that fails for a reason nobody foresaw is logged and retried: the rung
    event still reaches its stream, and later rings are still read."""
    job_id = await enqueue(gateway)
    stream = Follower(gateway, f"{JOBS}/{job_id}/events")
    await stream.has(1)
    real = jobreader.read_rows
    failures: list[str] = []

    async def fails_once(state: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        if not failures:
            failures.append(query)
            raise RuntimeError("unforeseen")
        return await real(state, query, params)

    monkeypatch.setattr(jobreader, "read_rows", fails_once)
    async with writer(dsn) as w:
        lease = await w.claim(job_id)
        await stream.has(2)
        await w.progress(job_id, lease, 0.5, "after the failure")
        await stream.has(3)
    await stream.close()
    assert failures == ["job_events_after_seq_for_jobs"]
    assert seqs(stream.events) == [1, 2, 3]


def test_an_unreadable_payload_still_backfills_every_stream() -> None:
    """Whatever cannot be read as items or as a ring (here a ring whose job id is not
    one) sends every job stream a BACKFILL and wakes every company feed."""
    fanout = Fanout(queue_size=4)
    woken: list[str] = []
    fanout.on_company_wake = woken.append
    a = fanout.subscribe_job("acme", uuid.uuid4())
    b = fanout.subscribe_job("globex", uuid.uuid4())
    fanout.subscribe_company("initech")
    for payload in ('{"ring": {"acme": ["not-a-uuid"]}}', '{"ring": ["x"]}', "not json"):
        fanout.on_notify(payload)
    assert [a.queue.get_nowait() for _ in range(3)] == [BACKFILL] * 3
    assert [b.queue.get_nowait() for _ in range(3)] == [BACKFILL] * 3
    assert woken == ["initech"] * 3
    assert fanout.backfills == 3


def test_a_ring_notes_only_watched_jobs_of_the_named_company() -> None:
    """The fan-out's side of a ring: the named companies are woken; only (job, company)
    pairs with a live subscriber of that company are noted for the reader, which is told
    once per ring that added any."""
    fanout = Fanout()
    woken: list[str] = []
    told: list[None] = []
    fanout.on_company_wake = woken.append
    fanout.on_rung = lambda: told.append(None)
    watched, unwatched = uuid.uuid4(), uuid.uuid4()
    fanout.subscribe_job("acme", watched)
    fanout.on_notify(events.encode_ring([("globex", watched), ("acme", unwatched)])[0])
    assert fanout.take_rung() == set()
    assert told == []
    fanout.on_notify(events.encode_ring([("acme", watched), ("acme", unwatched)])[0])
    assert fanout.take_rung() == {(watched, "acme")}
    assert told == [None]
    assert woken == ["globex", "acme", "acme"]


def test_an_event_a_subscriber_already_has_is_not_queued_again() -> None:
    fanout = Fanout()
    job_id = uuid.uuid4()
    sub = fanout.subscribe_job("acme", job_id)
    sub.reached(3)

    def event(seq: int) -> events.LiveEvent:
        return events.LiveEvent(seq, job_id, "acme", seq, "content_job.progress", "running", 1, {})

    for seq in (2, 3, 4, 4, 5):
        fanout.deliver(event(seq))
    assert [sub.queue.get_nowait().seq for _ in range(sub.queue.qsize())] == [4, 5]  # type: ignore[union-attr]
    assert fanout.read_plan({(job_id, "acme")}) == [(job_id, "acme", 5)]


def test_the_catch_up_plans_every_started_stream_in_lists_of_the_given_size() -> None:
    """Per job and company the lowest seq its streams have reached; a stream still
    starting (no seq yet) or ended is left out; at most ``size`` keys a list."""
    fanout = Fanout(queue_size=1)
    jobs = [uuid.uuid4() for _ in range(5)]
    for n, job_id in enumerate(jobs):
        fanout.subscribe_job("acme", job_id).reached(n)
    fanout.subscribe_job("acme", jobs[0]).reached(7)
    fanout.subscribe_job("globex", jobs[0]).reached(9)
    fanout.subscribe_job("acme", jobs[1])  # starting
    overflowed = fanout.subscribe_job("acme", jobs[2])
    overflowed.reached(0)
    overflowed.overflowed = True
    plans = list(fanout.catch_up_plans(2))
    assert [len(p) for p in plans] == [3, 2, 1]
    assert sorted(key for plan in plans for key in plan) == sorted(
        [(jobs[0], "acme", 0), (jobs[0], "globex", 9)]
        + [(job_id, "acme", n) for n, job_id in enumerate(jobs) if n > 0]
    )
