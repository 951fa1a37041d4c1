"""The gateway's event-stream response against a fake ASGI server: no database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from helpers import wait_until
from pgjobs.gateway.eventstream import (
    PING,
    UVICORN_INCOMPLETE,
    DroppedStreamLogFilter,
    EventStream,
    quiet_dropped_streams,
)

SCOPE = {"type": "http", "method": "GET"}


class Client:
    """The server side of one connection: records what is sent; ``stuck_after`` makes
    every send after that many block, like a client that stopped reading."""

    def __init__(self, stuck_after: int | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.stuck_after = stuck_after
        self.gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if self.stuck_after is not None and len(self.sent) >= self.stuck_after:
            await asyncio.Event().wait()
        self.sent.append(message)

    async def receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    @property
    def bodies(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body"]


class Source:
    """An event source that records whether its clean-up ran."""

    def __init__(self, frames: list[bytes], then_wait: bool) -> None:
        self.frames = frames
        self.then_wait = then_wait
        self.closed = False

    async def __call__(self) -> AsyncGenerator[bytes, None]:
        try:
            for frame in self.frames:
                yield frame
            if self.then_wait:
                await asyncio.Event().wait()
        finally:
            self.closed = True


def stream(source: Source, released: list[int], **kw: float) -> EventStream:
    return EventStream(
        source(),
        lambda: released.append(1),
        ping_seconds=kw.get("ping", 15.0),
        send_timeout=kw.get("timeout", 10.0),
    )


async def test_sends_every_frame_then_ends_and_releases_once() -> None:
    client, released, source = Client(), [], Source([b"a", b"b"], then_wait=False)
    await stream(source, released)(SCOPE, client.receive, client.send)
    assert client.sent[0]["type"] == "http.response.start"
    assert dict(client.sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert client.bodies == [b"a", b"b", b""]
    assert client.sent[-1]["more_body"] is False
    assert released == [1]
    assert source.closed


async def test_a_client_that_leaves_ends_a_waiting_stream() -> None:
    client, released, source = Client(), [], Source([b"a"], then_wait=True)
    task = asyncio.create_task(stream(source, released)(SCOPE, client.receive, client.send))
    await asyncio.sleep(0.05)
    client.gone.set()
    await asyncio.wait_for(task, 2)
    assert released == [1]
    assert source.closed


async def test_a_stuck_client_is_dropped_after_the_send_timeout_without_busy_ticks() -> None:
    # The first body send never returns. The keep-alive is long overdue all the while,
    # but a ping cannot go out while a send is in progress, so the timer must wait for
    # the send's deadline instead of firing again and again.
    client, released, source = Client(stuck_after=1), [], Source([b"a"], then_wait=True)
    response = stream(source, released, ping=0.01, timeout=0.5)
    ticks = 0
    tick = response._tick

    def counting_tick(*args: Any) -> None:
        nonlocal ticks
        ticks += 1
        tick(*args)

    response._tick = counting_tick  # type: ignore[method-assign]
    await asyncio.wait_for(response(SCOPE, client.receive, client.send), 3)
    assert released == [1]
    assert source.closed
    assert client.bodies == []
    assert ticks <= 3, ticks


async def test_an_idle_stream_gets_keep_alive_comments() -> None:
    client, released, source = Client(), [], Source([], then_wait=True)
    task = asyncio.create_task(
        stream(source, released, ping=0.05)(SCOPE, client.receive, client.send)
    )
    await asyncio.sleep(0.4)
    client.gone.set()
    await asyncio.wait_for(task, 2)
    assert client.bodies.count(PING) >= 2


async def test_head_sends_headers_only() -> None:
    client, released, source = Client(), [], Source([b"a"], then_wait=True)
    await stream(source, released)({"type": "http", "method": "HEAD"}, client.receive, client.send)
    assert client.bodies == [b""]
    assert released == [1]


async def test_the_slot_is_released_even_if_the_source_fails_to_clean_up() -> None:
    # The stream is stopped while its first frame is being sent (the client is stuck),
    # so the source is suspended at that yield and its clean-up runs on close.
    async def broken() -> AsyncGenerator[bytes, None]:
        try:
            yield b"a"
        finally:
            raise RuntimeError("clean-up failed")

    client, released = Client(stuck_after=1), []
    response = EventStream(broken(), lambda: released.append(1), ping_seconds=0.1, send_timeout=0.2)
    with pytest.raises(RuntimeError, match="clean-up failed"):
        await asyncio.wait_for(response(SCOPE, client.receive, client.send), 3)
    assert released == [1]


async def test_end_stops_a_waiting_stream_as_a_complete_response() -> None:
    # What revoking the stream's token does (pgjobs.gateway.revocation).
    client, released, source = Client(), [], Source([b"a"], then_wait=True)
    response = stream(source, released)
    task = asyncio.create_task(response(SCOPE, client.receive, client.send))

    async def sent_a() -> bool:
        return client.bodies == [b"a"]

    await wait_until(sent_a, within=2, message="the first frame sent")
    response.end()
    await asyncio.wait_for(task, 2)
    assert client.bodies == [b"a", b""]
    assert client.sent[-1]["more_body"] is False
    assert released == [1]
    assert source.closed


async def test_end_before_the_response_starts_sends_its_headers_and_ends() -> None:
    client, released, source = Client(), [], Source([b"a"], then_wait=True)
    response = stream(source, released)
    response.end()
    await asyncio.wait_for(response(SCOPE, client.receive, client.send), 2)
    assert client.sent[0]["type"] == "http.response.start"
    assert client.bodies == [b""]
    assert released == [1]


async def test_uvicorns_error_is_filtered_only_for_a_stream_dropped_as_stuck() -> None:
    """uvicorn logs an unfinished response at ERROR from the request's task after the app
    returns: the filter drops that line for a stuck client's stream, and for nothing else."""
    line = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, UVICORN_INCOMPLETE, (), None)
    other = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, "Exception in ASGI", (), None)
    log_filter = DroppedStreamLogFilter()

    async def request(stuck: bool) -> tuple[bool, bool]:
        client, released = Client(stuck_after=1 if stuck else None), []
        source = Source([b"a"], then_wait=not stuck)
        response = stream(source, released, ping=0.1, timeout=0.2)
        if not stuck:
            client.gone.set()  # the client leaves: not a drop
        async with asyncio.timeout(3):  # not wait_for: that would run it in another task
            await response(SCOPE, client.receive, client.send)
        return bool(log_filter.filter(line)), bool(log_filter.filter(other))

    # Each in a task of its own, as uvicorn runs each request.
    assert await asyncio.create_task(request(stuck=True)) == (False, True)
    assert await asyncio.create_task(request(stuck=False)) == (True, True)
    assert log_filter.filter(line)


def test_the_filter_is_installed_once() -> None:
    logger = logging.getLogger("pgjobs-test-uvicorn-error")
    quiet_dropped_streams(logger)
    quiet_dropped_streams(logger)
    assert sum(isinstance(f, DroppedStreamLogFilter) for f in logger.filters) == 1
