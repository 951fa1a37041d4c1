"""A company feed's reads reaching its streams (FeedClient, EventStream.push), against a
fake ASGI server whose send waits only while its client does not read, as uvicorn's
does: no database (the streams start with no Last-Event-ID, so they never read it)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from helpers import wait_until
from pgjobs.gateway.companystream import CompanyFrame, FeedClient, FeedRead, company_stream
from pgjobs.gateway.eventstream import EventStream

SCOPE = {"type": "http", "method": "GET"}


class Conn:
    """The server side of one connection. Its send waits while ``reading`` is clear (a
    client that does not read: uvicorn waits for the transport to drain), and only then;
    ``begun`` is every body whose send began, ``sent`` every message written, in order."""

    def __init__(self) -> None:
        self.begun: list[bytes] = []
        self.sent: list[dict[str, Any]] = []
        self.reading = asyncio.Event()
        self.reading.set()
        self.gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            self.begun.append(message["body"])
        if not self.reading.is_set():
            await self.reading.wait()
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


def read(*ids: int) -> FeedRead:
    return FeedRead.of([CompanyFrame(1, i, b"e%d;" % i) for i in ids])


class Dashboard:
    """One company stream as the gateway serves it (routes.company_events): the feed's
    inbox for it, its frames, and the response, running in a task of its own."""

    def __init__(self, size: int = 8, timeout: float = 10.0, ping: float = 15.0) -> None:
        self.conn = Conn()
        self.inbox = FeedClient(size)
        self.released: list[int] = []
        frames = company_stream(
            None,  # type: ignore[arg-type]  # the state is only for catch-up reads
            SimpleNamespace(closed=False),  # type: ignore[arg-type]
            None,
            self.inbox,
            ("1", 0),
        )
        self.response = EventStream(
            frames, lambda: self.released.append(1), ping_seconds=ping, send_timeout=timeout
        )
        self.inbox.push = self.response.push
        self.task = asyncio.create_task(self.response(SCOPE, self.conn.receive, self.conn.send))

    async def following(self) -> None:
        async def waiting() -> bool:
            return self.inbox._waiter is not None

        await wait_until(waiting, within=2, message="the stream waits for the feed")


async def test_the_feed_writes_to_waiting_streams_from_its_own_task() -> None:
    dashboards = [Dashboard(), Dashboard()]
    for d in dashboards:
        await d.following()
    for ids in ((1,), (2, 3)):
        for d in dashboards:
            d.inbox.offer(read(*ids))
    # Written by offer itself: the streams' tasks have not run since.
    for d in dashboards:
        assert d.conn.bodies == [b"e1;", b"e2;e3;"]
        assert d.inbox._waiter is not None
        assert not d.inbox._waiter.done()
    for d in dashboards:
        d.conn.gone.set()
    await asyncio.wait_for(asyncio.gather(*(d.task for d in dashboards)), 2)
    assert [d.released for d in dashboards] == [[1], [1]]


async def test_a_slow_stream_sends_in_order_and_what_waited_in_one_write() -> None:
    d = Dashboard()
    await d.following()
    d.conn.reading.clear()
    d.inbox.offer(read(1))  # pushed; its send waits for the client
    d.inbox.offer(read(2))  # the writer is busy: to the inbox
    await asyncio.sleep(0.05)  # the writer takes it, and waits for the pushed send
    d.inbox.offer(read(3))
    d.inbox.offer(read(3, 4))  # an overlapping read: only what the stream has not sent
    assert d.conn.bodies == []
    assert d.conn.begun == [b"e1;"]  # one send at a time
    d.conn.reading.set()

    async def sent_all() -> bool:
        return d.conn.bodies == [b"e1;", b"e2;", b"e3;e4;"]

    await wait_until(sent_all, within=2, message="every frame, once, in order")
    d.inbox.offer(read(5))  # the stream is idle again: written from here
    assert d.conn.bodies[-1] == b"e5;"
    d.conn.gone.set()
    await asyncio.wait_for(d.task, 2)


async def test_a_stuck_stream_is_dropped_and_holds_no_other_back() -> None:
    # The stream's timer looks at its sends every max(ping, timeout) (eventstream).
    stuck, fine = Dashboard(timeout=0.3, ping=0.3), Dashboard(timeout=0.3, ping=0.3)
    await stuck.following()
    await fine.following()
    stuck.conn.reading.clear()  # and it never reads again
    for i in range(1, 6):
        for d in (stuck, fine):
            d.inbox.offer(read(i))
        assert fine.conn.bodies[-1] == b"e%d;" % i  # at once, whatever the stuck one does
    assert stuck.inbox.inbox  # the stuck one's frames after its first wait in its inbox
    await asyncio.wait_for(stuck.task, 3)  # dropped after the send timeout
    assert stuck.released == [1]
    assert b"e1;" not in stuck.conn.bodies
    # The timer saw the pushed send in progress: no keep-alive was sent behind it.
    assert stuck.conn.begun[-1] == b"e1;"
    assert not fine.task.done()
    fine.conn.gone.set()
    await asyncio.wait_for(fine.task, 2)


async def test_a_stream_a_whole_inbox_behind_sends_what_it_has_then_ends() -> None:
    d = Dashboard(size=2)
    await d.following()
    d.conn.reading.clear()
    d.inbox.offer(read(1))  # pushed, waiting for the client
    for i in range(2, 6):
        d.inbox.offer(read(i))
        await asyncio.sleep(0.01)
    # 2 went to the writer, 3 and 4 filled the inbox, 5 did not fit.
    assert d.inbox.overflowed
    d.conn.reading.set()
    await asyncio.wait_for(d.task, 2)
    assert d.conn.bodies == [b"e1;", b"e2;", b"e3;e4;", b""]
    assert d.conn.sent[-1]["more_body"] is False  # a complete response: the client resumes
    assert d.released == [1]


async def test_closing_the_feed_ends_a_waiting_stream() -> None:
    d = Dashboard()
    await d.following()
    d.inbox.close()
    await asyncio.wait_for(d.task, 2)
    assert d.conn.bodies == [b""]
    d.inbox.offer(read(1))  # after the end: nothing
    assert d.conn.bodies == [b""]
