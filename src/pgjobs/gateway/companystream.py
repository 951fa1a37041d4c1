"""The company stream: all of a company's events, in commit-safe order, gap-free.

*Never ahead* holds as for job streams (``pgjobs.gateway.sse``): events come from a
NOTIFY, delivered after the commit, or from a read of committed rows.

*Never missing, per company.* Event ids come from an identity column, handed out at
insert, not at commit: a transaction can commit a smaller id after a larger one was
read, so ``id > last`` could skip it. The company stream's cursor is ``(xid, id)`` and it
reads only rows whose transaction id is below the snapshot's ``xmin``: every transaction
below that horizon has ended, and every later one gets a larger xid, so in (xid, id)
order nothing can still appear behind the cursor. The SSE id is ``"<xid>-<id>"``. The
table is read on every NOTIFY for the company (items or a ring), after every LISTEN
reconnect, when the job reader's periodic catch-up finds events after the feed's cursor
(a ring lost after its commit), and on a timer while rows are held back by the horizon
(it moves when an unrelated transaction ends, which sends no NOTIFY; see
``CompanyFeed``). The trade-off: a long-running write
transaction anywhere in the database holds the horizon, and so every company stream,
back until it ends.

*Across a retention cut.* ``pgjobs prune --events-older-than`` deletes old rows, and
with them the events a cursor behind the cut would have read next. Each catch-up page
says, from the same snapshot, whether the company has a deleted row after the cursor
(``pgjobs.job_events_pruned``, moved by the prune in its delete's transaction); if so
the stream sends the current state of the company's unfinished jobs, read with a
horizon, and goes on from that horizon (``unfinished_jobs_state``), instead of a silent
gap.

One reader per company (``CompanyFeed``) reads the table for all of that company's
streams in this process and encodes each event once for all of them; a resuming stream
catches up from the table on its own first (a set-up read, which takes its turn for the
pool), then follows the feed.

*Delivery.* A stream that follows the feed and has nothing waiting is written to by the
feed itself (``EventStream.push``): one write in the feed's task per stream, no wake-up
of the stream's own task. A stream whose writer is busy (a send in progress: a slow
client) gets the feed's reads in its inbox instead, and sends everything there in one
write when its writer is free; one that falls a whole inbox behind is ended (it
resumes with Last-Event-ID), so it never holds the feed or the other streams back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import psycopg

from pgjobs import db
from pgjobs.gateway.fanout import Subscription
from pgjobs.gateway.sse import (
    PAGE,
    read_rows,
    reconnect_frame,
    row_event,
    setup_read,
    status_event,
)

if TYPE_CHECKING:
    from pgjobs.gateway.state import GatewayState

log = logging.getLogger(__name__)

_COMPANY_CURSOR = re.compile(r"^(\d{1,20})-(\d{1,19})$")


def parse_company_cursor(raw: str | None) -> tuple[str, int] | None:
    """Last-Event-ID of a company stream: ``"<xid>-<eventId>"``."""
    if raw is None or raw == "":
        return None
    match = _COMPANY_CURSOR.match(raw)
    if match is None or int(match.group(1)) >= 2**64:
        raise ValueError("Last-Event-ID must be the id of an event from this stream")
    return match.group(1), int(match.group(2))


async def company_horizon(state: GatewayState) -> tuple[str, int]:
    (row,) = await read_rows(state, "job_events_horizon", {})
    return str(row["xid"]), 0


class FeedPage(NamedTuple):
    rows: list[dict[str, Any]]
    held_back: bool
    """Rows of the company were held back by the horizon (committed, not yet readable)."""
    behind_retention: bool
    """Retention deleted rows of the company after the cursor: the page does not follow
    on from it."""


async def company_feed_page(
    state: GatewayState, company_id: str, cursor: tuple[str, int], *, setup: bool = False
) -> FeedPage:
    """The company's next page after ``cursor`` below the horizon. Read by the feed, and
    by a resuming stream's catch-up (``setup``: it takes its turn, see setup_read)."""
    read = setup_read if setup else read_rows
    rows = await read(
        state,
        "job_events_company_feed",
        {"company_id": company_id, "xid": cursor[0], "id": cursor[1], "limit": PAGE},
    )
    return FeedPage(
        [row for row in rows if row["id"] is not None],
        bool(rows[0]["held_back"]),
        bool(rows[0]["behind_retention"]),
    )


async def unfinished_jobs_state(state: GatewayState, company_id: str) -> tuple[str, bytes]:
    """What a stream resuming from before a retention cut gets instead of the events it
    can no longer have: a ``status`` frame of each of the company's queued and running
    jobs in its current state, and the horizon of the snapshot they were read in, which
    is every frame's cursor and where the stream goes on from. Events of transactions
    not yet ended then (at or above the horizon) follow, so a job's state can be followed
    by events it already reflects (same or lower seq); a client keeps a job's highest seq.
    Finished jobs are not repeated: their final state is in the REST API."""
    rows = await setup_read(
        state, "job_list_unfinished_for_company_stream", {"company_id": company_id}
    )
    horizon = str(rows[0]["horizon"])
    event_id = f"{horizon}-0"
    return horizon, b"".join(status_event(row, event_id) for row in rows if row["id"] is not None)


class CompanyFrame(NamedTuple):
    """One company event, encoded once for every stream that sends it."""

    xid: int
    id: int
    data: bytes

    @classmethod
    def of(cls, row: dict[str, Any]) -> CompanyFrame:
        return cls(int(row["xid"]), row["id"], _company_event(row))


class FeedRead(NamedTuple):
    """What one read of the feed found: its frames in (xid, id) order, and their bytes
    joined once for every stream that sends them all."""

    frames: list[CompanyFrame]
    data: bytes

    @classmethod
    def of(cls, frames: list[CompanyFrame]) -> FeedRead:
        return cls(frames, b"".join(frame.data for frame in frames))

    def after(self, sent: tuple[int, int]) -> bytes:
        """The frames after ``sent``, as one write (empty if there are none)."""
        first = self.frames[0]
        if (first.xid, first.id) > sent:
            return self.data
        return b"".join(f.data for f in self.frames if (f.xid, f.id) > sent)


class FeedClient:
    """One company stream's inbox from its company's feed (see the module docstring).

    Once its stream follows the feed (``follow``), a read the feed offers goes straight
    out through ``push`` (the stream's ``EventStream.push``) while the stream waits in
    ``next`` with nothing in the inbox; otherwise it waits in the inbox, bounded to
    ``size`` reads. A client that falls a whole inbox behind is marked overflowed: it
    takes no more, and its stream ends once it has sent what it has."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.inbox: list[FeedRead] = []
        self.overflowed = False
        self.closed = False
        self.push: Callable[[bytes], bool] | None = None
        # (xid, id) of the last frame this stream has sent or taken to send; None until
        # it follows the feed.
        self.sent: tuple[int, int] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, read: FeedRead) -> None:
        if self.overflowed or self.closed:
            return
        waiter, sent = self._waiter, self.sent
        if sent is not None and waiter is not None and not waiter.done() and not self.inbox:
            # The stream waits for frames and has none to take: send from here.
            data = read.after(sent)
            if not data:
                return
            if self.push is not None and self.push(data):
                last = read.frames[-1]
                self.sent = (last.xid, last.id)
                return
        if len(self.inbox) >= self.size:
            self.overflowed = True
        else:
            self.inbox.append(read)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next(self) -> bytes | None:
        """The frames after ``sent`` in the inbox, as one write, waiting for some if there
        are none; None once the stream is to end (closed, or overflowed and all sent)."""
        assert self.sent is not None, "follow() first"
        while True:
            if self.closed:
                return None
            if self.inbox:
                reads, self.inbox = self.inbox, []
                parts = []
                for read in reads:
                    parts.append(read.after(self.sent))
                    last = read.frames[-1]
                    self.sent = max(self.sent, (last.xid, last.id))
                data = b"".join(parts)
                if data:
                    return data
                continue
            if self.overflowed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def follow(self, sent: tuple[int, int]) -> None:
        """The stream has sent everything up to ``sent`` and follows the feed from here."""
        self.sent = sent

    def close(self) -> None:
        self.closed = True
        self.inbox.clear()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


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
                    rows, held_back, _ = await company_feed_page(
                        self.state, self.company_id, self.cursor
                    )
                    self.reads += 1
                    if rows:
                        self.cursor = (rows[-1]["xid"], rows[-1]["id"])
                        read = FeedRead.of([CompanyFrame.of(row) for row in rows])
                        for client in list(self.clients):
                            client.offer(read)
                    if len(rows) < PAGE:
                        break
            except psycopg.OperationalError as exc:  # PoolTimeout included
                # The cursor has not moved: the next tick reads the same rows again.
                log.warning(
                    "company feed %s: read failed, retrying: %s",
                    self.company_id,
                    db.describe_error(exc),
                )
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

    def cursors(self) -> list[tuple[str, tuple[str, int]]]:
        """Each live feed's company and (xid, id) cursor (the job reader's catch-up asks
        which of them have events after it)."""
        return [(company_id, feed.cursor) for company_id, feed in self._feeds.items()]

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
    state: GatewayState,
    sub: Subscription,
    cursor: tuple[str, int] | None,
    client: FeedClient,
    feed_cursor: tuple[str, int],
) -> AsyncGenerator[bytes, None]:
    """All of a company's events, in (xid, id) order, until the client or server leaves.

    The caller has joined the company's feed (``CompanyFeeds.attach``, which gave
    ``client`` and ``feed_cursor``) before the response started, so a client that sees the
    response start and then reads the company's jobs misses nothing in between. A new
    stream (no Last-Event-ID) starts where the feed is, with no database read of its own,
    so a burst of connections costs nothing; a resuming one catches up from the table from
    its cursor. Then follow the feed, skipping what the catch-up already sent."""
    reset = False
    try:
        while cursor is not None:
            rows, _, behind = await company_feed_page(state, sub.company_id, cursor, setup=True)
            if behind and not reset:
                # Retention deleted events after this cursor: instead of a silent gap, the
                # current state of the company's unfinished jobs, then on from there.
                reset = True
                horizon, states = await unfinished_jobs_state(state, sub.company_id)
                if states:
                    yield states
                cursor = (horizon, 0)
                continue
            if rows:
                # A page is one write, not one per event (see sse.job_stream).
                cursor = (rows[-1]["xid"], rows[-1]["id"])
                yield b"".join(_company_event(row) for row in rows)
            if len(rows) < PAGE:
                break
    except (psycopg.OperationalError, TimeoutError) as exc:
        # Busy or unreachable database, or no turn for the pool within
        # STREAM_SETUP_WAIT_SECONDS: end; the browser resumes from Last-Event-ID.
        log.warning("company stream catch-up failed: %s", db.describe_error(exc))
        yield reconnect_frame()
        return
    if cursor is None:
        cursor = feed_cursor
    client.follow((int(cursor[0]), cursor[1]))
    # Frames the feed pushes while this waits in next() are not seen here (see FeedClient).
    while not sub.closed:
        data = await client.next()
        if data is None:
            return  # closed, or fell a whole inbox behind: resume with Last-Event-ID
        yield data


def _company_event(row: dict[str, Any]) -> bytes:
    return row_event(row, f"{row['xid']}-{row['id']}")
