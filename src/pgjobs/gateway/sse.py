"""Server-Sent-Event streams: one job's events, or all of a company's.

Both streams promise the same two things: a browser never sees an event before a GET
of the job would show it, and never misses one, across reconnects of the browser
(Last-Event-ID) and of the gateway's own LISTEN connection.

*Never ahead.* Events reach a stream only two ways: from a NOTIFY, which PostgreSQL
delivers after the commit, or from a read of ``pgjobs.job_events``, which sees only
committed rows. So any event sent has already committed.

*Never missing, per job.* A stream subscribes to the fan-out first and reads the job
second, so nothing committed after the read can slip past. The SSE id is the job's
``seq``, bumped by exactly one per transition under the row lock: for one job commit
order is seq order, and ``seq > last`` is a gap-free cursor. A live event that is not
``last + 1`` (a NOTIFY was missed), or a backfill marker (the LISTEN connection came
back), makes the stream read ``seq > last`` from the table before going on. A stream ends
after a terminal status; a browser that reconnects after it gets 204, which tells
EventSource to stop.

*Never missing, per company.* Event ids come from an identity column, handed out at
insert, not at commit: a transaction can commit a smaller id after a larger one was
read, so ``id > last`` could skip it. The company stream's cursor is ``(xid, id)`` and it
reads only rows whose transaction id is below the snapshot's ``xmin``: every transaction
below that horizon has ended, and every later one gets a larger xid, so in (xid, id)
order nothing can still appear behind the cursor. The SSE id is ``"<xid>-<id>"``. The
table is read on every NOTIFY for the company, after every LISTEN reconnect, and on a
timer while rows are held back by the horizon (it moves when an unrelated transaction
ends, which sends no NOTIFY; see ``CompanyFeed``). The
trade-off: a long-running write transaction anywhere in the database holds the horizon,
and so every company stream, back until it ends.

Data on every event: ``{jobId, status, type, attempt, seq, progress?, resultAssetId?,
errorMessage?, runAt?}``, JSON on one ``data:`` line (``frame`` drops line breaks from
``id``/``event``; ``json.dumps`` escapes them in data), so no field value can inject SSE
lines. The streams yield encoded frames (``pgjobs.gateway.eventstream`` sends them); a
company's feed encodes each event once for all of that company's streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg

from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.gateway.fanout import BACKFILL, CLOSED, LiveEvent, Subscription

if TYPE_CHECKING:
    from pgjobs.gateway.state import GatewayState

log = logging.getLogger(__name__)

TERMINAL = frozenset({"done", "failed", "cancelled"})
# A stream that cannot reach the database (pool exhausted, database down) ends with a
# reconnect hint instead of an HTTP error: EventSource treats any answer but 200 as final
# and never reconnects, so a 503 in a reconnect storm (a gateway restart: every browser
# at once) or an outage would stop those browsers' streams for good. A 200 stream that
# ends brings them back, with their Last-Event-ID, after the ``retry`` delay, spread at
# random over this range (ms) so that the herd does not return in step.
RECONNECT_MS = (1_000, 5_000)
STREAM_SETUP_WAIT_SECONDS = 30.0
PAGE = 500
_EXTRA_KEYS = ("progress", "resultAssetId", "errorMessage", "runAt")
_COMPANY_CURSOR = re.compile(r"^(\d{1,20})-(\d{1,19})$")
_LINE_BREAK = re.compile(r"[\r\n]")


def event_data(
    job_id: object, status: str, type_: str, attempt: int, seq: int, extra: dict[str, Any]
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "jobId": str(job_id),
        "status": status,
        "type": type_,
        "attempt": attempt,
        "seq": seq,
    }
    data.update({k: extra[k] for k in _EXTRA_KEYS if extra.get(k) is not None})
    return data


def frame(event: str, data: dict[str, Any], event_id: str) -> bytes:
    """One encoded SSE event. ``ensure_ascii``: the data line is plain ASCII whatever a
    job's messages contain, and JSON escapes every line break in it."""
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return (
        f"id: {_one_line(event_id)}\r\nevent: {_one_line(event)}\r\ndata: {body}\r\n\r\n".encode()
    )


def _one_line(value: str) -> str:
    # A line break in an id or event name would start a field of the attacker's choosing.
    return _LINE_BREAK.sub("", value) if "\r" in value or "\n" in value else value


def reconnect_frame() -> bytes:
    """Tell the client to reconnect later (the stream then ends)."""
    return b": database busy, reconnect later\r\nretry: %d\r\n\r\n" % random.randint(*RECONNECT_MS)


async def only(data: bytes) -> AsyncGenerator[bytes, None]:
    """A stream of one frame."""
    yield data


def row_event(row: dict[str, Any]) -> bytes:
    data = event_data(
        row["job_id"], row["status"], row["type"], row["attempt"], row["seq"], row["payload"]
    )
    return frame(row["type"], data, str(row["seq"]))


def status_event(job: dict[str, Any]) -> bytes:
    extra: dict[str, Any] = {
        "resultAssetId": str(job["result_asset_id"]) if job["result_asset_id"] else None,
        "errorMessage": job["error_message"],
    }
    if job["progress_fraction"] is not None or job["progress_message"] is not None:
        extra["progress"] = {
            "fraction": job["progress_fraction"],
            "message": job["progress_message"],
        }
    data = event_data(
        job["id"], job["status"], job["last_event"], job["attempts"], job["event_seq"], extra
    )
    return frame("status", data, str(job["event_seq"]))


def parse_job_cursor(raw: str | None) -> int | None:
    """Last-Event-ID of a job stream: the seq of the last event the client has."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > 2**31 - 1:
        raise ValueError("Last-Event-ID must be the id of an event from this stream")
    return int(raw)


def parse_company_cursor(raw: str | None) -> tuple[str, int] | None:
    """Last-Event-ID of a company stream: ``"<xid>-<eventId>"``."""
    if raw is None or raw == "":
        return None
    match = _COMPANY_CURSOR.match(raw)
    if match is None or int(match.group(1)) >= 2**64:
        raise ValueError("Last-Event-ID must be the id of an event from this stream")
    return match.group(1), int(match.group(2))


_READS: set[asyncio.Task[Any]] = set()  # reads finishing after their stream was cancelled


async def read_rows(
    state: GatewayState, query: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every database read of the streams: one named gateway query through the pool, run
    to its end even if the stream awaiting it is cancelled (an event stream is cancelled
    the moment its client disconnects). A query cancelled mid-flight makes psycopg close
    its connection, so a burst of browsers leaving while their streams start would empty
    the pool and refuse everyone else with 503."""
    task = asyncio.ensure_future(_fetch_all(state, query, params))
    _READS.add(task)
    task.add_done_callback(_read_done)
    return await asyncio.shield(task)


async def _fetch_all(
    state: GatewayState, query: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    async with state.pool.connection() as conn:
        cur = await conn.execute(GATEWAY_QUERIES[query], params)
        return await cur.fetchall()


def _read_done(task: asyncio.Task[Any]) -> None:
    _READS.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: nobody waits for the result of an abandoned read


async def setup_read(
    state: GatewayState, query: str, params: dict[str, Any]
) -> list[dict[str, Any]]:
    """A stream set-up's read: the job a job stream starts from, or a page of a resuming
    company stream's catch-up. Set-ups take turns for the pool, at most half of it at
    once (the REST API and the company feeds keep the rest), each waiting up to
    STREAM_SETUP_WAIT_SECONDS for its turn (then TimeoutError). In a reconnect storm
    (every browser back at once after a gateway restart) they queue here at the cost of
    a coroutine each, instead of overflowing the pool's waiting line and being sent away
    to retry: with 1-5 s retries and no queue, 10,000 browsers arriving together kept
    coming back faster than one process set them up, and two minutes later some still
    had no stream."""
    async with asyncio.timeout(STREAM_SETUP_WAIT_SECONDS), state.stream_setups:
        return await read_rows(state, query, params)


async def load_job(
    state: GatewayState, company_id: str, job_id: uuid.UUID
) -> dict[str, Any] | None:
    """The job a stream starts from (a set-up read: it takes its turn)."""
    rows = await setup_read(state, "job_get_for_stream", {"id": job_id, "company_id": company_id})
    return rows[0] if rows else None


async def job_events_after(
    state: GatewayState, company_id: str, job_id: uuid.UUID, after_seq: int
) -> list[dict[str, Any]]:
    return await read_rows(
        state,
        "job_events_after_seq",
        {"job_id": job_id, "company_id": company_id, "after_seq": after_seq, "limit": PAGE},
    )


async def job_stream(
    state: GatewayState, sub: Subscription, job: dict[str, Any], last: int | None
) -> AsyncGenerator[bytes, None]:
    """One job's events. ``sub`` was subscribed before ``job`` was read."""
    company_id, job_id = sub.company_id, job["id"]

    async def from_table(after: int) -> AsyncGenerator[dict[str, Any], None]:
        while True:
            rows = await job_events_after(state, company_id, job_id, after)
            for row in rows:
                yield row
                after = row["seq"]
            if len(rows) < PAGE:
                return

    try:
        if last is None:
            yield status_event(job)
            last = job["event_seq"]
            if job["status"] in TERMINAL:
                return
        else:
            async for row in from_table(last):
                yield row_event(row)
                last = row["seq"]
                if row["status"] in TERMINAL:
                    return
        while True:
            item = await sub.get()
            if item is CLOSED or sub.ended:
                # Shutdown, or this client fell a queue behind: end the stream; the
                # browser reconnects with Last-Event-ID and resumes from the table.
                return
            if item is BACKFILL or (isinstance(item, LiveEvent) and item.seq > last + 1):
                async for row in from_table(last):
                    yield row_event(row)
                    last = row["seq"]
                    if row["status"] in TERMINAL:
                        return
            elif isinstance(item, LiveEvent) and item.seq == last + 1:
                yield frame(
                    item.type,
                    event_data(
                        item.job_id, item.status, item.type, item.attempt, item.seq, item.extra
                    ),
                    str(item.seq),
                )
                last = item.seq
                if item.status in TERMINAL:
                    return
            # else: an event this stream already sent (seq <= last); drop it.
    except psycopg.OperationalError as exc:  # PoolTimeout included
        # The database is busy or gone: end the stream; the browser resumes from its
        # Last-Event-ID when it reconnects.
        log.warning("job stream %s ended: %s", job_id, exc)
        yield reconnect_frame()


async def company_horizon(state: GatewayState) -> tuple[str, int]:
    (row,) = await read_rows(state, "job_events_horizon", {})
    return str(row["xid"]), 0


async def company_feed_page(
    state: GatewayState, company_id: str, cursor: tuple[str, int], *, setup: bool = False
) -> tuple[list[dict[str, Any]], bool]:
    """The company's next page after ``cursor`` below the horizon, and whether rows of
    the company were held back by the horizon (committed, not yet readable) when it was
    read. Read by the feed, and by a resuming stream's catch-up (``setup``: it takes its
    turn, see setup_read)."""
    read = setup_read if setup else read_rows
    rows = await read(
        state,
        "job_events_company_feed",
        {"company_id": company_id, "xid": cursor[0], "id": cursor[1], "limit": PAGE},
    )
    return [row for row in rows if row["id"] is not None], bool(rows[0]["held_back"])


class CompanyFrame(NamedTuple):
    """One company event, encoded once for every stream that sends it."""

    xid: int
    id: int
    data: bytes

    @classmethod
    def of(cls, row: dict[str, Any]) -> CompanyFrame:
        return cls(int(row["xid"]), row["id"], _company_event(row))


class FeedClient:
    """One company stream's inbox from its company's feed: bounded; a client that falls
    a whole queue behind is marked overflowed and its stream ends (it resumes with
    Last-Event-ID), so it can never hold the feed or the other streams back."""

    def __init__(self, size: int) -> None:
        self.queue: asyncio.Queue[list[CompanyFrame] | _Closed] = asyncio.Queue(size)
        self.overflowed = False

    def offer(self, frames: list[CompanyFrame]) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(frames)
        except asyncio.QueueFull:
            self.overflowed = True

    def close(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(_CLOSED)


class _Closed:
    pass


_CLOSED = _Closed()


class CompanyFeed:
    """The one reader of a company's events in this process.

    Every company stream would otherwise re-read ``pgjobs.job_events`` on each NOTIFY
    and each poll tick: N streams, N queries per event, and the pool runs dry at a few
    hundred streams. The feed reads once, below the horizon, from its own (xid, id)
    cursor, and hands the rows to every attached stream.

    It reads when a NOTIFY names its company (or the LISTEN connection came back), and
    on a timer only while the last read saw rows held back by the horizon: those become
    readable when some unrelated transaction ends, which sends no NOTIFY. Otherwise it
    only re-reads every ``company_idle_poll_seconds``, in case a doorbell went missing
    somewhere this code does not know of. (Polling every feed every second cost one
    query per company per second: at 1,000 companies with a dashboard open, ~19% of
    the gateway's core and 1,000 reads/s with nothing happening.)
    """

    def __init__(self, state: GatewayState, company_id: str, cursor: tuple[str, int]) -> None:
        self.state = state
        self.company_id = company_id
        self.cursor = cursor
        self.clients: set[FeedClient] = set()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.reads = 0
        self.held_back = False  # the last read saw rows the horizon still held back

    async def run(self) -> None:
        settings = self.state.settings
        while self.clients:
            # Cleared before reading: a NOTIFY that arrives during the read wakes the next.
            self.wake.clear()
            try:
                while True:
                    rows, held_back = await company_feed_page(
                        self.state, self.company_id, self.cursor
                    )
                    self.reads += 1
                    if rows:
                        self.cursor = (rows[-1]["xid"], rows[-1]["id"])
                        frames = [CompanyFrame.of(row) for row in rows]
                        for client in list(self.clients):
                            client.offer(frames)
                    if len(rows) < PAGE:
                        break
            except psycopg.OperationalError as exc:  # PoolTimeout included
                # The cursor has not moved: the next tick reads the same rows again.
                log.warning("company feed %s: read failed, retrying: %s", self.company_id, exc)
                held_back = True
            self.held_back = held_back
            poll = (
                settings.company_poll_seconds if held_back else settings.company_idle_poll_seconds
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll):
                    await self.wake.wait()


class CompanyFeeds:
    """The company feeds of one gateway process, created with their first stream and
    stopped with their last."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._feeds: dict[str, CompanyFeed] = {}
        # Serialises only the creation of a feed, so a burst of new streams for a company
        # reads its starting horizon once, not once per stream.
        self._creating = asyncio.Lock()
        state.fanout.on_company_wake = self.wake

    def wake(self, company_id: str) -> None:
        feed = self._feeds.get(company_id)
        if feed is not None:
            feed.wake.set()

    async def attach(self, company_id: str) -> tuple[CompanyFeed, FeedClient, tuple[str, int]]:
        """Join the company's feed; returns it, this stream's inbox, and the feed's cursor
        at the moment of joining: every row the inbox receives comes after it."""
        feed = self._feeds.get(company_id)
        if feed is None:
            async with self._creating:
                feed = self._feeds.get(company_id)
                if feed is None:
                    # A new feed starts at the current horizon, read *before* the
                    # stream's own catch-up read: that read then reaches at least this
                    # far, and the feed covers everything after it.
                    cursor = await company_horizon(self.state)
                    feed = CompanyFeed(self.state, company_id, cursor)
                    self._feeds[company_id] = feed
        client = FeedClient(self.state.settings.subscriber_queue_size)
        feed.clients.add(client)
        if feed.task is None or feed.task.done():
            feed.task = asyncio.create_task(feed.run(), name=f"pgjobs-feed-{company_id}"[:60])
        return feed, client, feed.cursor

    def detach(self, feed: CompanyFeed, client: FeedClient) -> None:
        feed.clients.discard(client)
        if not feed.clients and self._feeds.get(feed.company_id) is feed:
            del self._feeds[feed.company_id]
            # Not cancelled: a cancelled query makes psycopg discard its pooled connection,
            # and streams that come and go would churn the pool. Woken instead, the feed
            # finishes any read in flight and returns, having no client left.
            feed.wake.set()

    @property
    def feeds(self) -> int:
        return len(self._feeds)

    @property
    def clients(self) -> int:
        return sum(len(feed.clients) for feed in self._feeds.values())

    @property
    def reads(self) -> int:
        """Table reads made by the live feeds (for tests and metrics)."""
        return sum(feed.reads for feed in self._feeds.values())

    def close(self) -> None:
        for feed in list(self._feeds.values()):
            for client in feed.clients:
                client.close()
            if feed.task is not None:
                feed.task.cancel()
        self._feeds.clear()


async def company_stream(
    state: GatewayState, sub: Subscription, cursor: tuple[str, int] | None
) -> AsyncGenerator[bytes, None]:
    """All of a company's events, in (xid, id) order, until the client or server leaves.

    Attach to the company's feed first. A new stream (no Last-Event-ID) starts where the
    feed is, with no database read of its own, so a burst of connections costs nothing;
    a resuming one catches up from the table from its cursor. Then follow the feed,
    skipping what the catch-up already sent."""
    try:
        feed, client, feed_cursor = await state.company_feeds.attach(sub.company_id)
    except psycopg.OperationalError as exc:  # PoolTimeout included
        log.warning("company stream could not start: %s", exc)
        yield reconnect_frame()
        return
    try:
        try:
            while cursor is not None:
                rows, _ = await company_feed_page(state, sub.company_id, cursor, setup=True)
                for row in rows:
                    cursor = (row["xid"], row["id"])
                    yield _company_event(row)
                if len(rows) < PAGE:
                    break
        except (psycopg.OperationalError, TimeoutError) as exc:
            # Busy or unreachable database, or no turn for the pool within
            # STREAM_SETUP_WAIT_SECONDS: end; the browser resumes from Last-Event-ID.
            log.warning("company stream catch-up failed: %s", exc)
            yield reconnect_frame()
            return
        if cursor is None:
            cursor = feed_cursor
        sent = (int(cursor[0]), cursor[1])
        while not sub.closed:
            item = await client.queue.get()
            if isinstance(item, _Closed):
                return
            for event in item:
                if (event.xid, event.id) > sent:
                    sent = (event.xid, event.id)
                    yield event.data
            if client.overflowed and client.queue.empty():
                return  # fell a whole queue behind: resume with Last-Event-ID
    finally:
        state.company_feeds.detach(feed, client)


def _company_event(row: dict[str, Any]) -> bytes:
    data = event_data(
        row["job_id"], row["status"], row["type"], row["attempt"], row["seq"], row["payload"]
    )
    return frame(row["type"], data, f"{row['xid']}-{row['id']}")
