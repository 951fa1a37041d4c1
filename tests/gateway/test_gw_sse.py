"""Per-job event streams: first event, live events to the terminal one, resume with
Last-Event-ID, never ahead of the database, and no gap when the gateway's LISTEN
connection is killed mid-job."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
from pathlib import Path

import psycopg
from gateway_helpers import RunningGateway, Sse, collect, kill_listener, notifies_lost

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import demo

JOBS = "/api/companies/acme/content-jobs"
COMPANY_EVENTS = "/api/companies/acme/events"


async def enqueue(gateway: RunningGateway, job_type: str, input: dict[str, object]) -> str:
    async with gateway.http() as http:
        r = await http.post(JOBS, json={"jobType": job_type, "input": input})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["jobId"]
    return job_id


def assert_gap_free(events: list[Sse], first_seq: int = 1) -> None:
    seqs = [int(e.id or 0) for e in events]
    assert seqs == list(range(first_seq, first_seq + len(seqs))), seqs
    assert [e.data["seq"] for e in events] == seqs


def assert_all_status(events: list[Sse]) -> None:
    """The contract: every frame is `event: status`; `type` names the transition."""
    assert events
    assert {e.event for e in events} == {"status"}, [e.event for e in events]


def types(events: list[Sse]) -> list[str]:
    return [e.data["type"] for e in events]


async def test_status_first_then_live_events_until_done(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    job_id = await enqueue(gateway, "sleep", {"seconds": 0.3})
    path = f"{JOBS}/{job_id}/events"
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        events = await collect(gateway, path)  # returns only because the stream ends
    # The first frame and every live one after it: `event: status`, whatever the type.
    assert_all_status(events)
    assert events[0].data["status"] in ("queued", "running")
    assert_gap_free(events, int(events[0].id or 0))
    assert events[-1].data["type"] == "content_job.done"
    assert events[-1].data["status"] == "done"
    assert "content_job.progress" in types(events[1:]) or events[0].data["status"] == "running"
    progress = [e.data["progress"] for e in events if e.data["type"] == "content_job.progress"]
    assert all(0 <= p["fraction"] <= 1 for p in progress)
    assert set(events[-1].data) >= {"jobId", "status", "type", "attempt", "seq"}
    # The stream is done with; the slot and the subscription are given back.
    assert gateway.state.fanout.subscribers == 0
    assert gateway.state.slots.total == 0


async def test_finished_job_gets_its_status_then_204_on_resume(gateway: RunningGateway) -> None:
    job_id = await enqueue(gateway, "echo", {})
    await gateway.state.client.cancel("acme", job_id)
    path = f"{JOBS}/{job_id}/events"
    (event,) = await collect(gateway, path)
    assert event.event == "status"
    assert event.data["status"] == "cancelled"
    assert event.id == "2"
    async with gateway.http() as http:
        r = await http.get(path, headers={"Last-Event-ID": "2"})
        assert r.status_code == 204
        # An id the job never issued: treated like no id at all.
        (again,) = await collect(gateway, path, last_event_id="99")
        assert again.event == "status"


async def test_unknown_job_and_bad_last_event_id(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        for job_id in (str(uuid.uuid4()), "nope"):
            r = await http.get(f"{JOBS}/{job_id}/events")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            # One error event, a retry delay that stops EventSource, and the end.
            assert "event: error" in r.text
            assert "event: status" not in r.text
            assert 'data: {"error":"Job not found"}' in r.text
            assert "retry: 86400000" in r.text
        job_id = await enqueue(gateway, "echo", {})
        for bad in ("abc", "-1", "1.5", "99999999999999"):
            r = await http.get(f"{JOBS}/{job_id}/events", headers={"Last-Event-ID": bad})
            assert r.status_code == 400, bad
    assert gateway.state.fanout.subscribers == 0
    assert gateway.state.slots.total == 0


async def test_resume_with_last_event_id_under_concurrent_workers(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """Read a few events, drop the connection, resume from the last id: every event once,
    in order, across several jobs and two workers."""
    jobs = [await enqueue(gateway, "sleep", {"seconds": 0.4}) for _ in range(4)]
    settings = fast_settings(storage_dir, concurrency=2)

    async def follow(job_id: str) -> list[Sse]:
        path = f"{JOBS}/{job_id}/events"
        seen = await collect(gateway, path, last_event_id="0", stop_after=3)
        for _ in range(20):
            more = await collect(gateway, path, last_event_id=seen[-1].id, stop_after=4)
            seen += more
            if seen[-1].data["status"] == "done":
                return seen
        raise AssertionError("job never finished")

    async with (
        running_worker(dsn, demo.registry, settings, worker_id="w1"),
        running_worker(dsn, demo.registry, settings, worker_id="w2"),
    ):
        streams = await asyncio.gather(*(follow(j) for j in jobs))
    for job_id, events in zip(jobs, streams, strict=True):
        assert_gap_free(events, 1)
        # Replayed from the table after Last-Event-ID: `status` frames like live ones.
        assert_all_status(events)
        assert types(events)[0] == "content_job.queued"
        assert types(events)[-1] == "content_job.done"
        rows = await fetch(dsn, "SELECT seq FROM pgjobs.job_events WHERE job_id = %s", [job_id])
        assert len(events) == len(rows)


async def test_an_event_is_never_ahead_of_the_database(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """On every event received, a GET of the job already shows that state or a newer one."""
    jobs = [await enqueue(gateway, "sleep", {"seconds": 0.2}) for _ in range(6)]
    checked = 0

    async def follow(job_id: str) -> list[Sse]:
        async with gateway.http() as http:

            async def check(ev: Sse) -> None:
                nonlocal checked
                r = await http.get(f"{JOBS}/{job_id}")
                assert r.status_code == 200
                (row,) = await fetch(
                    dsn, "SELECT event_seq FROM pgjobs.jobs WHERE id = %s", [job_id]
                )
                assert row["event_seq"] >= ev.data["seq"]
                if ev.data["status"] in ("done", "failed", "cancelled"):
                    assert r.json()["status"] == ev.data["status"]
                checked += 1

            return await collect(gateway, f"{JOBS}/{job_id}/events", on_event=check)

    settings = fast_settings(storage_dir, concurrency=3)
    async with (
        running_worker(dsn, demo.registry, settings, worker_id="w1"),
        running_worker(dsn, demo.registry, settings, worker_id="w2"),
    ):
        streams = await asyncio.gather(*(follow(j) for j in jobs))
    for events in streams:
        assert_gap_free(events, int(events[0].id or 0))
        assert events[-1].data["status"] == "done"
    assert checked >= len(jobs) * 3


async def test_listen_backend_terminated_mid_stream_loses_nothing(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    job_id = await enqueue(gateway, "sleep", {"seconds": 2.0})
    terminated = 0

    async def kill_listener_once(ev: Sse) -> None:
        nonlocal terminated
        if ev.data["type"] == "content_job.progress" and terminated == 0:
            terminated = await kill_listener(dsn)

    reconnects = gateway.state.listener.reconnects
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        events = await collect(gateway, f"{JOBS}/{job_id}/events", on_event=kill_listener_once)
    assert terminated == 1
    assert gateway.state.listener.reconnects > reconnects
    assert_gap_free(events, int(events[0].id or 0))
    assert events[-1].data["status"] == "done"
    assert_all_status(events)
    assert types(events).count("content_job.progress") >= 5


async def test_an_event_backfilled_after_a_listen_loss_is_a_status_event(
    gateway: RunningGateway, dsn: str
) -> None:
    """An event whose NOTIFY was lost reaches the job stream from the table once the
    LISTEN connection is back, as the same `event: status` frame a live one is."""
    job_id = await enqueue(gateway, "echo", {})
    received: list[Sse] = []

    async def on_event(ev: Sse) -> None:
        received.append(ev)

    reader = asyncio.create_task(collect(gateway, f"{JOBS}/{job_id}/events", on_event=on_event))

    async def got(n: int) -> bool:
        if reader.done():
            reader.result()  # raise what ended it
        return len(received) >= n

    await wait_until(lambda: got(1), message="the stream's first frame")
    backfills = gateway.state.fanout.backfills
    with notifies_lost(gateway) as lost:
        await progress_transitions(dsn, uuid.UUID(job_id), 1)

        async def dropped() -> bool:
            return bool(lost)

        await wait_until(dropped, message="the progress NOTIFY, dropped")
    assert len(received) == 1  # nothing else could have sent it
    assert await kill_listener(dsn) == 1
    await wait_until(lambda: got(2), message="the progress event, backfilled")
    assert gateway.state.fanout.backfills > backfills
    await gateway.state.client.cancel("acme", job_id)
    events = await asyncio.wait_for(reader, 10)
    assert_all_status(events)
    assert types(events) == ["content_job.queued", "content_job.progress", "content_job.cancelled"]
    assert_gap_free(events)


async def test_field_values_cannot_inject_sse_lines(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    evil = "boom\r\n\r\nevent: content_job.done\ndata: {}\rid: 999\n\n"
    async with gateway.http() as http:
        r = await http.post(
            JOBS, json={"jobType": "fail", "input": {"message": evil}, "maxAttempts": 1}
        )
    job_id = r.json()["jobId"]
    async with contextlib.AsyncExitStack() as stack:

        async def start_worker_once_subscribed(ev: Sse) -> None:
            # Only now: a job that failed before the stream opened would arrive as the
            # stream's first frame, not as the live event under test.
            if ev.data["type"] == "content_job.queued":
                await stack.enter_async_context(
                    running_worker(dsn, demo.registry, fast_settings(storage_dir))
                )

        events = await collect(
            gateway, f"{JOBS}/{job_id}/events", on_event=start_worker_once_subscribed
        )
    assert_gap_free(events, int(events[0].id or 0))
    assert_all_status(events)
    assert events[-1].data["type"] == "content_job.failed"
    assert evil in events[-1].data["errorMessage"]
    assert types(events).count("content_job.done") == 0


async def test_cancel_ends_the_stream(gateway: RunningGateway) -> None:
    job_id = await enqueue(gateway, "echo", {})

    async def cancel_after_first(ev: Sse) -> None:
        if ev.data["status"] == "queued":
            await gateway.state.client.cancel("acme", job_id)

    events = await collect(gateway, f"{JOBS}/{job_id}/events", on_event=cancel_after_first)
    assert [(e.event, e.data["type"]) for e in events] == [
        ("status", "content_job.queued"),
        ("status", "content_job.cancelled"),
    ]


async def test_streams_close_cleanly_on_shutdown(dsn: str, storage_dir: Path) -> None:
    from gateway_helpers import serve_gateway

    async with serve_gateway(dsn, storage_dir) as gateway:
        job_id = await enqueue(gateway, "echo", {})
        opened = asyncio.Event()

        async def mark(ev: Sse) -> None:
            opened.set()

        job_reader = asyncio.create_task(
            collect(gateway, f"{JOBS}/{job_id}/events", on_event=mark, within=20)
        )
        company_reader = asyncio.create_task(collect(gateway, COMPANY_EVENTS, within=20))

        async def both_open() -> bool:
            return opened.is_set() and gateway.state.company_feeds.clients == 1

        await wait_until(both_open, within=10, message="both streams open")
        gateway.server.should_exit = True
        # Both streams end by themselves as complete responses: the server tells them to
        # end as shutdown begins. (Left to uvicorn, they would be cancelled after its
        # grace period and the connection cut mid-response, which collect raises on.)
        job_events = await asyncio.wait_for(job_reader, 15)
        await asyncio.wait_for(company_reader, 15)
        assert [e.event for e in job_events][:1] == ["status"]

    async def gone() -> bool:
        return gateway.state.fanout.subscribers == 0

    await wait_until(gone, within=20, message="subscriptions released")


async def test_head_on_a_stream_answers_headers_and_ends(gateway: RunningGateway) -> None:
    # Starlette answers HEAD on every GET route; a stream must not stay open for it.
    async with gateway.http() as http:
        r = await asyncio.wait_for(http.head(COMPANY_EVENTS), 5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-store"

    async def released() -> bool:
        return gateway.state.slots.total == 0 and gateway.state.fanout.subscribers == 0

    await wait_until(released, within=20, message="slot released")


async def test_served_gateway_keeps_full_collections_out_of_the_streams_way(
    dsn: str, storage_dir: Path
) -> None:
    # `pgjobs gateway` freezes what exists once it has started and makes full
    # collections rarer: a full collection stops the loop, in the middle of a fan-out.
    from gateway_helpers import serve_gateway

    from pgjobs.gcpolicy import FULL_GC_EVERY

    threshold = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    try:
        async with serve_gateway(dsn, storage_dir, tune_gc=True) as gateway:
            assert gc.get_freeze_count() > 10_000
            assert gc.get_threshold()[2] == FULL_GC_EVERY != threshold[2]
            async with gateway.http() as http:
                assert (await http.get("/readyz")).status_code == 200
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_a_resumed_stream_writes_each_page_of_missed_events_at_once(
    gateway: RunningGateway, dsn: str
) -> None:
    """A browser 600 events behind gets them as two writes, the table's two pages (500,
    then 100), not 600: in a reconnect storm of browsers that were watching, the send
    per event was what the gateway spent its time on. The frames themselves are the
    same, gap-free and in order."""
    from pgjobs.gateway import sse

    job_id = uuid.UUID(await enqueue(gateway, "echo", {}))
    await progress_transitions(dsn, job_id, 600)
    state = gateway.state
    sub = state.fanout.subscribe_job("acme", job_id)
    try:
        job = await sse.load_job(state, "acme", job_id)
        assert job is not None
        stream = sse.job_stream(state, sub, job, 1)
        chunks = [await anext(stream), await anext(stream)]
        await stream.aclose()
    finally:
        state.fanout.unsubscribe(sub)
    frames = [c.split(b"\r\n\r\n")[:-1] for c in chunks]
    assert [len(f) for f in frames] == [500, 100]
    ids = [f.split(b"\r\n")[0] for f in frames[0] + frames[1]]
    assert ids == [b"id: %d" % seq for seq in range(2, 602)]


async def progress_transitions(dsn: str, job_id: uuid.UUID, n: int) -> None:
    """n progress transitions of the job in one transaction (the publish trigger writes
    their audit rows), so a stream can be any number of events behind."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn, conn.transaction():
        for i in range(n):
            await conn.execute(
                "UPDATE pgjobs.jobs SET event_seq = event_seq + 1,"
                " last_event = 'content_job.progress', progress_fraction = %s WHERE id = %s",
                [(i + 1) / n, job_id],
            )
