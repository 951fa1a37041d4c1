"""The company stream's (xid, id) cursor: transactions committing out of order, a client
resuming with Last-Event-ID, tenant isolation, and stream tokens."""

from __future__ import annotations

import asyncio
import random
import threading
import uuid
from pathlib import Path
from typing import Any

import psycopg
from gateway_helpers import (
    RunningGateway,
    Sse,
    collect,
    kill_listener,
    notifies_lost,
    serve_gateway,
    settings,
)
from psycopg.rows import dict_row

from helpers import fetch, seqs_in_company_stream_order
from pgjobs.client import Client

EVENTS = "/api/companies/acme/events"


async def all_event_ids(dsn: str, company: str) -> list[int]:
    rows = await fetch(
        dsn, "SELECT id FROM pgjobs.job_events WHERE company_id = %s ORDER BY id", [company]
    )
    return [r["id"] for r in rows]


async def test_late_committing_transaction_is_neither_skipped_nor_repeated(
    gateway: RunningGateway, dsn: str
) -> None:
    client = gateway.state.client
    await client.enqueue("acme", "echo", {"n": 0})
    first = await collect(gateway, EVENTS, last_event_id="0-0", stop_after=1)
    assert first[0].data["type"] == "content_job.queued"

    async with (
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn_a,
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn_b,
    ):
        # A inserts first (smaller event id) but commits last.
        await client.enqueue("acme", "echo", {"tx": "A"}, conn=conn_a)
        await client.enqueue("acme", "echo", {"tx": "B"}, conn=conn_b)
        await conn_b.commit()
        # B is committed, but A (an older xid) is still open: the stream holds B back
        # rather than send it and later skip A.
        held = await collect_for(gateway, last_event_id=first[0].id, seconds=1.5)
        assert held == []
        await conn_a.commit()
    rest = await collect(gateway, EVENTS, last_event_id=first[0].id, stop_after=2)
    got = [first[0].data["jobId"]] + [e.data["jobId"] for e in rest]
    assert len(set(got)) == 3
    ids = [int((e.id or "").split("-")[1]) for e in [*first, *rest]]
    assert sorted(ids) == await all_event_ids(dsn, "acme")
    # Replayed after Last-Event-ID: `event: status`, as on the job streams.
    assert {e.event for e in [*first, *rest]} == {"status"}


async def test_a_jobs_events_arrive_in_seq_order_when_an_older_transaction_writes_the_later(
    gateway: RunningGateway, dsn: str
) -> None:
    """A transaction that took its xid first (here by an enqueue; in a worker, a finish
    batch that waited on the job's lock) writes a job's later event after a younger one
    wrote the earlier: the company stream still sends that job's events in seq order."""
    client = gateway.state.client
    job = await client.enqueue("acme", "echo", {"n": 0})
    first = await collect(gateway, EVENTS, last_event_id="0-0", stop_after=1)
    async with (
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn_a,
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn_b,
    ):
        await client.enqueue("acme", "echo", {"tx": "A"}, conn=conn_a)  # A's xid, the older
        await client.cancel("acme", job.id, conn=conn_b)  # seq 2, by the younger B
        await conn_b.commit()
        await client.retry("acme", job.id, conn=conn_a)  # seq 3, by the older A
        await conn_a.commit()
    rest = await collect(gateway, EVENTS, last_event_id=first[0].id, stop_after=3)
    seqs = [e.data["seq"] for e in rest if e.data["jobId"] == str(job.id)]
    assert seqs == [2, 3]
    assert await seqs_in_company_stream_order(dsn, job.id) == [1, 2, 3]


async def collect_for(gateway: RunningGateway, *, last_event_id: str, seconds: float) -> list[Sse]:
    events: list[Sse] = []
    try:
        async with asyncio.timeout(seconds):
            await collect(gateway, EVENTS, last_event_id=last_event_id, on_event=_append(events))
    except TimeoutError:
        pass
    return events


def _append(events: list[Sse]):  # type: ignore[no-untyped-def]
    async def on_event(ev: Sse) -> None:
        events.append(ev)

    return on_event


async def test_many_out_of_order_writers_and_a_resuming_client(
    gateway: RunningGateway, dsn: str
) -> None:
    """Twenty writers each hold a transaction open for a random time and commit in random
    order, while other companies write too; a client reads a few events at a time and
    reconnects with Last-Event-ID. It ends with every acme event exactly once."""
    client = gateway.state.client
    rng = random.Random(7)

    async def writer(i: int) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn:
            await client.enqueue("acme", "echo", {"i": i}, conn=conn)
            await client.enqueue("globex", "echo", {"i": i}, conn=conn)
            await asyncio.sleep(rng.uniform(0, 0.6))
            if i % 7 == 3:
                await conn.rollback()  # aborted: its events never existed
            else:
                await conn.commit()

    async def writers() -> None:
        await asyncio.gather(*(writer(i) for i in range(20)))
        await client.enqueue("acme", "echo", {"last": True})

    seen: list[Sse] = []
    task = asyncio.create_task(writers())
    cursor = "0-0"
    async with asyncio.timeout(60):
        while True:
            batch = await collect_for(gateway, last_event_id=cursor, seconds=0.7)
            seen += batch[:3]  # keep only the first few, as if the client dropped then
            if batch:
                cursor = batch[: len(batch[:3])][-1].id or cursor
            if task.done() and not batch:
                break
    await task
    ids = [int((e.id or "").split("-")[1]) for e in seen]
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert sorted(ids) == await all_event_ids(dsn, "acme"), "an event was skipped"
    assert {e.data["jobId"] for e in seen} <= {
        str(r["id"])
        for r in await fetch(dsn, "SELECT id FROM pgjobs.jobs WHERE company_id = 'acme'")
    }


async def test_company_stream_is_live_and_tenant_bound(gateway: RunningGateway) -> None:
    received: list[Sse] = []
    done = asyncio.Event()

    async def on_event(ev: Sse) -> None:
        received.append(ev)
        if ev.data["jobId"] == last_id:
            done.set()

    last_id = ""
    reader = asyncio.create_task(collect(gateway, EVENTS, on_event=on_event))

    async def subscribed() -> bool:
        # Attached to the company feed: the stream's starting point is fixed by then.
        return gateway.state.company_feeds.clients == 1

    from helpers import wait_until

    await wait_until(subscribed, message="company stream open")
    client: Client = gateway.state.client
    await client.enqueue("globex", "echo", {"secret": "globex"})
    last_id = str((await client.enqueue("acme", "echo", {})).id)
    if any(e.data["jobId"] == last_id for e in received):
        done.set()  # the event beat the enqueue's return
    await asyncio.wait_for(done.wait(), 10)
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    assert all(e.data["jobId"] != "" for e in received)
    assert {e.event for e in received} == {"status"}
    assert {e.data["type"] for e in received} == {"content_job.queued"}
    assert "globex" not in str([e.data for e in received])
    async with gateway.http() as http:
        r = await http.get("/api/companies/globex/events")
        assert r.status_code == 403
        for bad in ("x", "1", "1-", "-1-2", "1-2-3", "99999999999999999999999-1"):
            r = await http.get(EVENTS, headers={"Last-Event-ID": bad})
            assert r.status_code == 400, bad


async def test_stream_tokens_for_eventsource(gateway: RunningGateway) -> None:
    client = gateway.state.client
    job = await client.enqueue("acme", "echo", {})
    other = await client.enqueue("acme", "echo", {})
    await client.cancel("acme", job.id)
    base = "/api/companies/acme"
    async with gateway.http() as http:
        r = await http.post(f"{base}/stream-tokens", json={"jobId": str(job.id)})
        assert r.status_code == 201
        job_token = r.json()["token"]
        assert r.json()["expiresAt"]
        r = await http.post(f"{base}/stream-tokens")
        company_token = r.json()["token"]
        for body in ({"ttlSeconds": 0}, {"ttlSeconds": 301}, {"jobId": 5}, {"x": 1}):
            assert (await http.post(f"{base}/stream-tokens", json=body)).status_code == 400
        globex_job = await client.enqueue("globex", "echo", {})
        r = await http.post(f"{base}/stream-tokens", json={"jobId": str(globex_job.id)})
        assert r.status_code == 404

    async with gateway.http(None) as anon:
        path = f"{base}/content-jobs/{job.id}/events"
        async with anon.stream("GET", path, params={"streamToken": job_token}) as r:
            assert r.status_code == 200
            body = (await r.aread()).decode()
            assert "cancelled" in body
        # Only the job it was issued for, only on event routes, never as a Bearer token.
        r = await anon.get(
            f"{base}/content-jobs/{other.id}/events", params={"streamToken": job_token}
        )
        assert r.status_code == 403
        r = await anon.get(EVENTS, params={"streamToken": job_token})
        assert r.status_code == 403
        r = await anon.get(f"{base}/content-jobs/{job.id}", params={"streamToken": job_token})
        assert r.status_code == 401
        r = await anon.get(
            f"{base}/content-jobs", headers={"Authorization": f"Bearer {company_token}"}
        )
        assert r.status_code == 401
        r = await anon.get("/api/companies/globex/events", params={"streamToken": company_token})
        assert r.status_code == 403
        tampered = company_token[:-2] + ("AA" if not company_token.endswith("AA") else "BB")
        r = await anon.get(EVENTS, params={"streamToken": tampered})
        assert r.status_code == 401
        # A valid company token opens the company stream.
        async with anon.stream("GET", EVENTS, params={"streamToken": company_token}) as r:
            assert r.status_code == 200


PARENT = uuid.UUID(int=1)  # the API token a stream token was minted with


def test_expired_stream_token_is_refused() -> None:
    from pgjobs.gateway import auth

    token, _ = auth.mint_stream_token(b"k" * 32, "acme", None, 60, parent=PARENT, now=1000.0)
    assert auth.verify_stream_token(b"k" * 32, token, now=1059.0) is not None
    assert auth.verify_stream_token(b"k" * 32, token, now=1060.0) is None
    assert auth.verify_stream_token(b"j" * 32, token, now=1000.0) is None


def test_a_stream_token_with_non_ascii_characters_is_refused_not_an_error() -> None:
    # Found by the route fuzzer: a 500 from hmac.compare_digest on non-ASCII text.
    from pgjobs.gateway import auth

    token, _ = auth.mint_stream_token(b"k" * 32, "acme", None, 60, parent=PARENT, now=1000.0)
    payload, signature = token.split(".")
    for forged in (f"{payload}.{signature[:-1]}é", f"{payload}é.{signature}", "é.é"):
        assert auth.verify_stream_token(b"k" * 32, forged, now=1000.0) is None


async def test_many_company_streams_share_one_reader(gateway: RunningGateway) -> None:
    """Fifty streams of one company: one feed reads the table for all of them, and each
    stream gets every event once. (One read per stream per event ran the pool dry at a
    few hundred streams in the benchmark.)"""
    from helpers import wait_until

    streams = 50
    jobs = 20
    readers = [
        asyncio.create_task(collect(gateway, EVENTS, stop_after=jobs, within=60))
        for _ in range(streams)
    ]

    async def all_open() -> bool:
        return gateway.state.company_feeds.clients == streams

    await wait_until(all_open, within=20, message="streams open")
    assert gateway.state.company_feeds.feeds == 1
    reads_before = gateway.state.company_feeds.reads
    for _ in range(jobs):
        await gateway.state.client.enqueue("acme", "echo", {})
    results = await asyncio.gather(*readers)
    assert all(len({e.id for e in r}) == jobs for r in results)
    assert len({tuple(e.id for e in r) for r in results}) == 1, "same events, same order"
    # Reads grow with events and poll ticks, not with streams x events.
    assert gateway.state.company_feeds.reads - reads_before < 3 * jobs

    async def all_closed() -> bool:
        return gateway.state.fanout.subscribers == 0 and gateway.state.company_feeds.feeds == 0

    await wait_until(all_closed, within=10, message="feeds stop with their last stream")


async def test_a_burst_of_new_company_streams_needs_no_database_reads(
    gateway: RunningGateway,
) -> None:
    """40 fresh streams at once on a 4-connection pool: each costs one read (its token);
    they join the feed where it is, without a read of their own, so none is refused."""
    from helpers import wait_until

    streams = 40
    readers = [
        asyncio.create_task(collect(gateway, EVENTS, stop_after=1, within=60))
        for _ in range(streams)
    ]

    async def all_open() -> bool:
        return gateway.state.company_feeds.clients == streams

    await wait_until(all_open, within=30, message="every stream joined the feed")
    job = await gateway.state.client.enqueue("acme", "echo", {})
    results = await asyncio.gather(*readers)
    assert {r[0].data["jobId"] for r in results} == {str(job.id)}


async def test_an_idle_company_feed_does_not_read_the_table(gateway: RunningGateway) -> None:
    """With nothing held back by the horizon, the feed waits for a NOTIFY instead of
    polling (the test gateway's poll is 0.5 s, its idle poll the default 30 s)."""
    from helpers import wait_until

    reader = asyncio.create_task(collect(gateway, EVENTS, stop_after=2, within=30))

    async def open_() -> bool:
        return gateway.state.company_feeds.clients == 1

    await wait_until(open_, within=20, message="stream open")
    first = await gateway.state.client.enqueue("acme", "echo", {})

    async def read_it() -> bool:
        return gateway.state.company_feeds.reads >= 2  # the start, then the NOTIFY's

    await wait_until(read_it, within=20, message="the feed read the first event")
    reads = gateway.state.company_feeds.reads
    await asyncio.sleep(4 * gateway.state.settings.company_poll_seconds)
    assert gateway.state.company_feeds.reads == reads, "an idle feed polled the table"
    second = await gateway.state.client.enqueue("acme", "echo", {})
    events = await reader
    assert [e.data["jobId"] for e in events] == [str(first.id), str(second.id)]


def test_gateway_tests_run_with_no_test_database_cloned_or_dropped(databases: Any) -> None:
    """A clone or drop of another test's database holds the horizon the feeds read below:
    the idle feed above would poll (tests/gateway/conftest.py marks every gateway test
    quiet_databases)."""
    assert databases.quiet_owner == threading.get_ident()


async def test_a_row_held_back_by_the_horizon_arrives_without_another_notify(
    gateway: RunningGateway, dsn: str
) -> None:
    """An unrelated open transaction holds the horizon: the committed event is announced
    but cannot be read yet. The feed keeps polling while it knows rows are held back, so
    the event arrives once that transaction ends, which sends no NOTIFY of its own."""
    from helpers import wait_until

    # Well inside the idle poll (30 s): only the held-back poll can deliver in time.
    reader = asyncio.create_task(collect(gateway, EVENTS, stop_after=1, within=15))

    async def open_() -> bool:
        return gateway.state.company_feeds.clients == 1

    await wait_until(open_, within=10, message="stream open")
    async with await psycopg.AsyncConnection.connect(dsn) as holder:
        await holder.execute("SELECT pg_current_xact_id()")  # an xid: holds the horizon
        job = await gateway.state.client.enqueue("acme", "echo", {})

        async def held() -> bool:
            return any(f.held_back for f in gateway.state.company_feeds._feeds.values())

        await wait_until(held, within=20, message="the feed saw the event held back")
        await asyncio.sleep(2 * gateway.state.settings.company_poll_seconds)
        assert not reader.done(), "sent before the horizon passed it"
        await holder.commit()  # writes nothing: no NOTIFY
    events = await reader
    assert events[0].data["jobId"] == str(job.id)


async def test_a_page_or_a_read_of_company_events_is_one_write(gateway: RunningGateway) -> None:
    """A resuming dashboard's catch-up page goes out as one write, and so do the events
    its company's feed read at once (here: one enqueue of five jobs); the frames are the
    same, in (xid, id) order."""
    from pgjobs.gateway import companystream
    from pgjobs.jobspec import JobSpec

    client = gateway.state.client
    await client.enqueue_many([JobSpec("acme", "echo", {"n": i}) for i in range(30)])
    state = gateway.state
    sub = state.fanout.subscribe_company("acme")
    feed, inbox, feed_cursor = await state.company_feeds.attach("acme")
    try:
        stream = companystream.company_stream(state, sub, ("0", 0), inbox, feed_cursor)
        caught_up = await anext(stream)
        await client.enqueue_many([JobSpec("acme", "echo", {"n": i}) for i in range(5)])
        live = await asyncio.wait_for(anext(stream), timeout=10)
        await stream.aclose()
    finally:
        state.company_feeds.detach(feed, inbox)
        state.fanout.unsubscribe(sub)
    frames = [chunk.split(b"\r\n\r\n")[:-1] for chunk in (caught_up, live)]
    assert [len(f) for f in frames] == [30, 5]
    ids = [f.split(b"\r\n")[0].removeprefix(b"id: ").decode() for f in frames[0] + frames[1]]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert ids == await event_cursors(gateway, "acme")


async def event_cursors(gateway: RunningGateway, company: str) -> list[str]:
    rows = await fetch(
        gateway.state.dsn,
        "SELECT xid::text || '-' || id AS c FROM pgjobs.job_events WHERE company_id = %s"
        " ORDER BY xid::text::numeric, id",
        [company],
    )
    return [r["c"] for r in rows]


async def test_an_event_backfilled_after_a_listen_loss_is_a_status_event(
    dsn: str, storage_dir: Path
) -> None:
    """An event whose NOTIFY was lost reaches the company stream from the table once the
    LISTEN connection is back (the feed re-reads on every reconnect), as the same
    `event: status` frame as a live one and as its replay after Last-Event-ID."""
    from helpers import wait_until

    # No idle re-read within the test: the lost event can only come by the backfill.
    quiet = settings(company_idle_poll_seconds=600.0)
    async with serve_gateway(dsn, storage_dir, quiet) as gateway:
        client = gateway.state.client
        received: list[Sse] = []
        reader = asyncio.create_task(collect(gateway, EVENTS, on_event=_append(received)))

        async def got(n: int) -> bool:
            if reader.done():
                reader.result()  # raise what ended it
            return len(received) >= n

        async def open_() -> bool:
            return gateway.state.company_feeds.clients == 1

        await wait_until(open_, message="company stream open")
        live = await client.enqueue("acme", "echo", {})
        await wait_until(lambda: got(1), message="the live event")
        with notifies_lost(gateway) as lost:
            missed = await client.enqueue("acme", "echo", {})

            async def dropped() -> bool:
                return bool(lost)

            await wait_until(dropped, message="the NOTIFY, dropped")
        assert await kill_listener(dsn) == 1
        await wait_until(lambda: got(2), message="the lost event, backfilled")
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        replayed = await collect(gateway, EVENTS, last_event_id=received[0].id, stop_after=1)
    assert [e.data["jobId"] for e in received] == [str(live.id), str(missed.id)]
    assert [e.data["jobId"] for e in replayed] == [str(missed.id)]
    for ev in [*received, *replayed]:
        assert ev.event == "status"
        assert ev.data["type"] == "content_job.queued"


async def test_the_response_starts_only_once_the_stream_has_joined_its_feed(
    gateway: RunningGateway,
) -> None:
    """A dashboard opens the company stream, then (re)reads the company's jobs once the
    response has started: every event committed after that read must reach the stream.
    That holds only if the stream's starting point was fixed before the response started;
    here the feed's creation is held back to show that the headers wait for it."""
    feeds = gateway.state.company_feeds
    joined_at_headers: list[int] = []

    async def open_stream() -> None:
        async with gateway.http() as http, http.stream("GET", EVENTS) as response:
            assert response.status_code == 200
            joined_at_headers.append(feeds.clients)

    async with feeds._creating:  # no feed can start: the stream cannot join one yet
        opening = asyncio.create_task(open_stream())
        # Long enough for a response that did not wait for its feed to start.
        await asyncio.sleep(0.3)
        assert not opening.done()
    await asyncio.wait_for(opening, timeout=10)
    assert joined_at_headers == [1]
