"""What streams may cost (reliability.md G10-G14): caps, keep-alives, slow consumers,
overflow, and no leak after many connect/disconnect cycles."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gateway_helpers import RunningGateway, Sse, collect, serve_gateway, settings, uvicorn_log

from helpers import wait_until
from pgjobs.events import LiveEvent
from pgjobs.gateway.fanout import Fanout
from pgjobs.jobspec import JobSpec

EVENTS = "/api/companies/{}/events"


async def test_stream_caps_per_company_and_global_are_429(dsn: str, storage_dir: Path) -> None:
    capped = settings(max_streams=3, max_streams_per_company=2)
    async with serve_gateway(dsn, storage_dir, capped) as gateway:
        readers = []

        async def open_stream(company: str) -> None:
            readers.append(
                asyncio.create_task(
                    collect(gateway, EVENTS.format(company), company=company, within=60)
                )
            )
            n = len(readers)

            async def opened() -> bool:
                return gateway.state.slots.total == n

            await wait_until(opened, within=10, message="stream open")

        await open_stream("acme")
        await open_stream("acme")
        async with gateway.http() as http:
            r = await http.get(EVENTS.format("acme"))
            assert r.status_code == 429
            assert r.headers["retry-after"] == "5"
            assert "company" in r.json()["error"]
            # The REST API stays usable while streams are capped.
            assert (await http.get("/api/companies/acme/content-jobs")).status_code == 200
        await open_stream("globex")
        async with gateway.http("globex") as http:
            r = await http.get(EVENTS.format("globex"))
            assert r.status_code == 429
            assert "server" in r.json()["error"]
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

        async def released() -> bool:
            return gateway.state.slots.total == 0 and gateway.state.fanout.subscribers == 0

        await wait_until(released, within=10, message="slots released")


async def test_keep_alive_comments(dsn: str, storage_dir: Path) -> None:
    async with serve_gateway(dsn, storage_dir, settings(ping_seconds=0.2)) as gateway:
        async with gateway.http() as http, http.stream("GET", EVENTS.format("acme")) as r:
            lines = []
            async with asyncio.timeout(10):
                async for line in r.aiter_lines():
                    lines.append(line)
                    if sum(1 for x in lines if x.startswith(":")) >= 2:
                        break
        assert any(x.startswith(": ping") for x in lines)


async def test_slow_consumer_is_dropped_while_others_keep_receiving(
    dsn: str, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """...and the drop is one INFO line, not an ERROR from uvicorn for a response the
    gateway ended without completing (it cannot: every send waits for the stuck client)."""
    caplog.set_level(logging.INFO, logger="pgjobs.gateway.eventstream")
    fast_timeout = settings(send_timeout_seconds=1.0, ping_seconds=0.5)
    async with (
        serve_gateway(dsn, storage_dir, fast_timeout, sndbuf=8192) as gateway,
        uvicorn_log() as uvicorn_records,
    ):
        host, port = gateway.url.removeprefix("http://").split(":")
        # A client that asks for the stream and then never reads: tiny receive window.
        frozen = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        frozen.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        frozen.connect((host, int(port)))
        frozen.sendall(
            f"GET /api/companies/acme/events HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {gateway.tokens['acme']}\r\n\r\n".encode()
        )

        async def frozen_open() -> bool:
            return gateway.state.company_feeds.clients == 1

        await wait_until(frozen_open, message="frozen stream open")
        healthy: list[Sse] = []
        total = 4000
        done = asyncio.Event()

        async def on_event(ev: Sse) -> None:
            healthy.append(ev)
            if len(healthy) >= total:
                done.set()

        reader = asyncio.create_task(
            collect(gateway, EVENTS.format("acme"), on_event=on_event, within=60)
        )

        async def both_open() -> bool:
            return gateway.state.company_feeds.clients == 2

        await wait_until(both_open, message="healthy stream open")
        for _ in range(4):
            specs = [JobSpec("acme", "echo", {"filler": "x" * 10}) for _ in range(total // 4)]
            await gateway.state.client.enqueue_many(specs)
        await asyncio.wait_for(done.wait(), 40)

        async def frozen_dropped() -> bool:
            return gateway.state.fanout.company_subscribers == 1

        await wait_until(frozen_dropped, within=20, message="frozen client dropped")
        assert len({e.id for e in healthy}) == total
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        # uvicorn closes the dropped client's connection once the response returns: read
        # what is buffered up to the end, so its handling of the return is over.
        frozen.setblocking(False)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(20):
            while await loop.sock_recv(frozen, 65536):
                pass
        frozen.close()
    dropped = [r for r in caplog.records if "stopped reading" in r.getMessage()]
    assert [r.levelno for r in dropped] == [logging.INFO]
    assert [r.getMessage() for r in uvicorn_records if r.levelno >= logging.WARNING] == []


def test_a_full_queue_ends_only_that_subscriber() -> None:
    fanout = Fanout(queue_size=4)
    job_id = uuid.uuid4()
    slow = fanout.subscribe_job("acme", job_id)
    fast = fanout.subscribe_job("acme", job_id)
    spy = fanout.subscribe_job("globex", job_id)  # same id, other company: never fed
    for seq in range(1, 6):
        event = {
            "eventId": seq, "jobId": str(job_id), "companyId": "acme", "seq": seq,
            "type": "content_job.progress", "status": "running", "attempt": 1,
        }  # fmt: skip
        fanout.on_notify(json.dumps({"events": [event]}))
        if seq <= 4:
            item = fast.queue.get_nowait()
            assert isinstance(item, LiveEvent)
            assert item.seq == seq
    assert slow.overflowed
    assert not fast.overflowed
    assert fast.queue.qsize() == 1
    assert spy.queue.qsize() == 0
    assert fanout.overflows == 1
    fanout.on_notify("not json")  # unreadable: everyone backfills from the table
    assert fast.queue.qsize() == 2
    for sub in (slow, fast, spy):
        fanout.unsubscribe(sub)
    assert fanout.subscribers == 0


async def test_a_thousand_connect_disconnect_cycles_leak_nothing(
    gateway: RunningGateway,
) -> None:
    job = await gateway.state.client.enqueue("acme", "echo", {})
    path = f"/api/companies/acme/content-jobs/{job.id}/events"

    async def cycle(n: int) -> None:
        async with gateway.http() as http:
            for i in range(n):
                url = path if i % 2 else EVENTS.format("acme")
                async with http.stream("GET", url) as r:
                    assert r.status_code == 200
                    if url == path:
                        async for line in r.aiter_lines():
                            if line.startswith("data:"):
                                break

    await cycle(20)  # warm up: connection pools, lazily created tasks

    async def at_baseline() -> bool:
        return gateway.state.fanout.subscribers == 0 and gateway.state.slots.total == 0

    await wait_until(at_baseline, message="warm-up streams released")
    baseline_tasks = len(asyncio.all_tasks())
    await asyncio.gather(*(cycle(100) for _ in range(10)))

    async def back_to_baseline() -> bool:
        return await at_baseline() and len(asyncio.all_tasks()) <= baseline_tasks

    await wait_until(back_to_baseline, within=20, message="subscribers and tasks at baseline")
    assert gateway.state.slots.by_company == {}


async def test_a_stream_that_cannot_reach_the_database_asks_to_reconnect_later(
    dsn: str, storage_dir: Path
) -> None:
    """No 503 for an event stream: EventSource never reconnects after a non-200 answer,
    so a pool exhausted by a reconnect storm would end those browsers' streams for good.
    Instead a 200 stream with a jittered ``retry:`` and no event, and then the end."""
    import re

    tight = settings(pool_size=1, pool_timeout_seconds=0.3)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        job = await gateway.state.client.enqueue("acme", "echo", {})
        base = "/api/companies/acme"
        job_path = f"{base}/content-jobs/{job.id}/events"
        async with gateway.http() as http:
            r = await http.post(f"{base}/stream-tokens", json={"jobId": str(job.id)})
            job_token = r.json()["token"]
            company_token = (await http.post(f"{base}/stream-tokens")).json()["token"]
        async with gateway.http(None) as anon:
            async with gateway.state.pool.connection():  # the pool's only connection
                for path, token in ((job_path, job_token), (EVENTS.format("acme"), company_token)):
                    r = await anon.get(path, params={"streamToken": token})
                    assert r.status_code == 200, r.text
                    assert r.headers["content-type"].startswith("text/event-stream")
                    delay = re.search(r"^retry: (\d+)\r?$", r.text, re.MULTILINE)
                    assert delay is not None, r.text
                    assert 1_000 <= int(delay.group(1)) <= 5_000
                    assert "data:" not in r.text
            assert gateway.state.fanout.subscribers == 0, "the refused streams let go"
            # With the connection back, the same request streams the job.
            async with anon.stream("GET", job_path, params={"streamToken": job_token}) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        assert json.loads(line[5:])["jobId"] == str(job.id)
                        break


async def open_at_once(gateway: RunningGateway, paths: list[str], **kwargs: Any) -> list[list[Sse]]:
    """acme's streams opened all at once, as EventSource opens them: with a stream token
    (whose parent API token each stream looks up as a set-up read)."""
    async with gateway.http() as http:
        token = (await http.post("/api/companies/acme/stream-tokens")).json()["token"]
    return await asyncio.gather(
        *(
            collect(gateway, f"{path}?streamToken={token}", company=None, **kwargs)  # type: ignore[arg-type]
            for path in paths
        )
    )


async def test_a_burst_of_job_streams_queues_for_the_pool_instead_of_being_sent_away(
    dsn: str, storage_dir: Path
) -> None:
    """Thirty browsers open their job streams at once on a pool of 2 with one waiter
    allowed: stream set-ups take turns (one at a time here) instead of overflowing the
    pool's waiting line, so every stream starts with its job's state, none is told to
    come back later."""
    tight = settings(pool_size=2, pool_max_waiting=1, pool_timeout_seconds=5.0)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        jobs = await gateway.state.client.enqueue_many([JobSpec("acme", "echo") for _ in range(30)])
        paths = [f"/api/companies/acme/content-jobs/{j.id}/events" for j in jobs]
        results = await open_at_once(gateway, paths, stop_after=1)
    assert [r[0].data["jobId"] for r in results] == [str(j.id) for j in jobs]
    assert all(r[0].event == "status" for r in results)


async def test_a_burst_of_resuming_company_streams_queues_for_the_pool(
    dsn: str, storage_dir: Path
) -> None:
    """Thirty dashboards come back at once with a Last-Event-ID (a gateway restart): each
    catches up from the table before following the feed. Those reads take turns like job
    stream set-ups, so on a pool of 2 with one waiter allowed every stream gets the events
    after its cursor, and none is told to come back later."""
    tight = settings(pool_size=2, pool_max_waiting=1, pool_timeout_seconds=5.0)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        await gateway.state.client.enqueue_many([JobSpec("acme", "echo") for _ in range(3)])
        async with await psycopg.AsyncConnection.connect(dsn) as conn:
            cur = await conn.execute(
                "SELECT xid, id FROM pgjobs.job_events WHERE company_id = 'acme'"
                " ORDER BY xid, id LIMIT 1"
            )
            first = await cur.fetchone()
        assert first is not None
        results = await open_at_once(
            gateway,
            [EVENTS.format("acme")] * 30,
            last_event_id=f"{first[0]}-{first[1]}",
            stop_after=2,
        )
    assert [len(r) for r in results] == [2] * 30
    assert all(ev.event == "status" for r in results for ev in r)
    assert all(ev.data["type"] == "content_job.queued" for r in results for ev in r)


async def test_a_burst_of_resuming_job_streams_queues_for_the_pool(
    dsn: str, storage_dir: Path
) -> None:
    """Thirty browsers come back at once to jobs they were watching (a gateway restart),
    each 1,000 events behind (two pages). A resuming job stream reads its job, then its
    pages of missed events: every page takes its turn with the set-ups (a second page
    outside the turns once overflowed the pool's waiting line and sent a stream still
    setting up away), so on a pool of 2 with one waiter allowed every stream gets the
    events after its Last-Event-ID, and none is told to come back later."""
    tight = settings(pool_size=2, pool_max_waiting=1, pool_timeout_seconds=5.0)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        jobs = await gateway.state.client.enqueue_many([JobSpec("acme", "echo") for _ in range(30)])
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            # 1,000 progress transitions per job, each statement a transition of all 30
            # (the publish trigger writes their audit rows), on the queue rows as a
            # worker's progress is (through the pgjobs.jobs view's row triggers: ~75 s).
            await conn.execute(
                """DO $$ BEGIN FOR i IN 1..1000 LOOP
                     UPDATE pgjobs.job_queue SET event_seq = event_seq + 1,
                            last_event = 'content_job.progress', progress_fraction = i / 1000.0
                     WHERE company_id = 'acme';
                     COMMIT;
                   END LOOP; END $$"""
            )
        paths = [f"/api/companies/acme/content-jobs/{j.id}/events" for j in jobs]
        results = await open_at_once(gateway, paths, last_event_id="1", stop_after=1000)
    assert [[ev.id for ev in r] for r in results] == [[str(s) for s in range(2, 1002)]] * 30
    assert all(ev.event == "status" for r in results for ev in r)
    assert all(ev.data["type"] == "content_job.progress" for r in results for ev in r)


async def test_a_set_up_read_waits_out_a_full_waiting_line_of_the_pool(
    dsn: str, storage_dir: Path
) -> None:
    """A stream's set-up or catch-up read that has its turn, but finds the pool's waiting
    line full of the gateway's other reads (the job reader's rounds, a REST call), waits
    for its connection instead of ending its stream with a reconnect frame: a resuming
    stream's second page was sent away so under load."""
    from pgjobs.gateway import sse

    tight = settings(pool_size=2, pool_max_waiting=1, pool_timeout_seconds=5.0)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        (job,) = await gateway.state.client.enqueue_many([JobSpec("acme", "echo")])
        pool = gateway.state.pool
        await pool.wait()
        held = [await pool.getconn(), await pool.getconn()]  # both connections in use
        waiter = asyncio.create_task(pool.getconn())  # the waiting line's one place

        async def queued() -> bool:
            return pool.get_stats().get("requests_waiting", 0) == 1

        await wait_until(queued, message="a request in the pool's waiting line")
        params = {"id": job.id, "company_id": "acme"}
        read = asyncio.create_task(sse.setup_read(gateway.state, "job_get_for_stream", params))
        await asyncio.sleep(0.3)
        assert not read.done()  # not refused: still asking
        await pool.putconn(held.pop())  # the waiter gets this one
        await pool.putconn(await waiter)
        rows = await asyncio.wait_for(read, 10)
        await pool.putconn(held.pop())
    assert [r["id"] for r in rows] == [job.id]
