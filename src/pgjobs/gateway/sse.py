"""Server-Sent-Event streams of one job's events, and what every stream shares.

Both kinds of stream (this one, and the company stream in
``pgjobs.gateway.companystream``) promise the same two things: a browser never sees an
event before a GET of the job would show it, and never misses one, across reconnects of
the browser (Last-Event-ID) and of the gateway's own LISTEN connection.

*Never ahead.* Events reach a stream only two ways: from a NOTIFY item, which PostgreSQL
delivers after the commit, or from a read of ``pgjobs.job_events``, which sees only
committed rows (the stream's own, or the job reader's after a ring,
``pgjobs.gateway.jobreader``). So any event sent has already committed.

*Never missing, per job.* A stream subscribes to the fan-out first and reads the job
second, so nothing committed after the read can slip past. The SSE id is the job's
``seq``, bumped by exactly one per transition under the row lock: for one job commit
order is seq order, and ``seq > last`` is a gap-free cursor. A live event that is not
``last + 1`` (a NOTIFY was missed), or a backfill marker (the LISTEN connection came
back), makes the stream read ``seq > last`` from the table before going on; if retention
deleted events after ``last``, that read sends the job's current state instead (see
``job_stream``'s ``from_table``). A stream ends
after a terminal status; a browser that reconnects after it gets 204, which tells
EventSource to stop.

*One event name.* This module owns the frame format of both kinds of stream. Every job
event, whether it is a job stream's first frame, a live transition, a replay after
Last-Event-ID or a backfill after a LISTEN loss, and on the company stream too, is
``event: status`` (``EVENT``), as the content-jobs API this service replaces sends it and
its browser code listens for it; the transition is the data's ``type``
(``content_job.progress``, ...). Only an unknown job gets ``event: error``
(``NOT_FOUND_FRAME``).

Data on every event: ``{jobId, status, type, attempt, seq, progress?, resultAssetId?,
errorMessage?, runAt?}`` (``pgjobs.events.event_data``, the event contract's public
form, built alike from an audit row, a NOTIFY item and a job row), JSON on one ``data:``
line (``frame`` drops line breaks from the ``id``; ``json.dumps`` escapes them in data),
so no field value can inject SSE lines. The streams yield encoded frames
(``pgjobs.gateway.eventstream`` sends them).

Every database read of a stream goes through ``read_rows`` (never cancelled half-way),
and a stream's set-up and catch-up reads through ``setup_read`` (they take turns for the
pool).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import uuid
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any, Final

import psycopg
from psycopg_pool import TooManyRequests

from pgjobs import db
from pgjobs.events import LiveEvent, event_data
from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.gateway.fanout import BACKFILL, CLOSED, Subscription

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
SETUP_RETRY_SECONDS = 0.02
"""How long a set-up read whose turn came waits before asking the pool again when the
pool's waiting line is full (see setup_read)."""
PAGE = 500
_LINE_BREAK = re.compile(r"[\r\n]")

EVENT: Final = "status"
"""The SSE event name of every job event on every stream (see the module docstring)."""
# EventSource reconnects after a stream ends; a day's retry delay stops it in practice
# for a job that does not exist (or belongs to another company: the same answer).
NOT_FOUND_RETRY_MS: Final = 86_400_000
NOT_FOUND_FRAME: Final = (
    b'retry: %d\r\nevent: error\r\ndata: {"error":"Job not found"}\r\n\r\n' % NOT_FOUND_RETRY_MS
)
"""The whole stream of an unknown job (the contract: one ``event: error`` carrying
``{"error": "Job not found"}``, then the end)."""


def frame(data: dict[str, Any], event_id: str) -> bytes:
    """One encoded job event (``event: status``). ``ensure_ascii``: the data line is
    plain ASCII whatever a job's messages contain, and JSON escapes every line break in
    it."""
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"id: {_one_line(event_id)}\r\nevent: {EVENT}\r\ndata: {body}\r\n\r\n".encode()


def _one_line(value: str) -> str:
    # A line break in an id would start a field of the attacker's choosing.
    return _LINE_BREAK.sub("", value) if "\r" in value or "\n" in value else value


def reconnect_frame() -> bytes:
    """Tell the client to reconnect later (the stream then ends)."""
    return b": database busy, reconnect later\r\nretry: %d\r\n\r\n" % random.randint(*RECONNECT_MS)


async def only(data: bytes) -> AsyncGenerator[bytes, None]:
    """A stream of one frame."""
    yield data


def row_event(row: dict[str, Any], event_id: str | None = None) -> bytes:
    """A ``pgjobs.job_events`` row as a frame; its SSE id is the job's seq unless given
    (the company stream's is ``"<xid>-<id>"``)."""
    data = event_data(
        row["job_id"], row["status"], row["type"], row["attempt"], row["seq"], row["payload"]
    )
    return frame(data, str(row["seq"]) if event_id is None else event_id)


def live_event(event: LiveEvent) -> bytes:
    """An event as NOTIFY carried it, as a frame; its SSE id is the job's seq."""
    data = event_data(event.job_id, event.status, event.type, event.attempt, event.seq, event.extra)
    return frame(data, str(event.seq))


def status_event(job: dict[str, Any], event_id: str | None = None) -> bytes:
    """A job's current state as a frame: a job stream's first frame without
    Last-Event-ID, or what a stream resuming from before a retention cut gets. Its SSE id
    is the seq of the job's last event unless given (a company stream's cursor)."""
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
    return frame(data, str(job["event_seq"]) if event_id is None else event_id)


def parse_job_cursor(raw: str | None) -> int | None:
    """Last-Event-ID of a job stream: the seq of the last event the client has."""
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or int(raw) > 2**31 - 1:
        raise ValueError("Last-Event-ID must be the id of an event from this stream")
    return int(raw)


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
    """A stream's set-up or catch-up read: the job a job stream starts from, a page of a
    job stream's catch-up (resuming, or backfilling a gap in the live feed), or a page of
    a resuming company stream's catch-up. These reads take turns for the pool, at most
    half of it at once (the REST API and the company feeds keep the rest), each waiting
    up to STREAM_SETUP_WAIT_SECONDS for its turn and its connection (then TimeoutError;
    a full waiting line of the pool is waited out too). In a reconnect
    storm (every browser back at once after a gateway restart) they queue here at the
    cost of a coroutine each, instead of overflowing the pool's waiting line and being
    sent away to retry: with 1-5 s retries and no queue, 10,000 browsers arriving
    together kept coming back faster than one process set them up, and two minutes
    later some still had no stream."""
    async with asyncio.timeout(STREAM_SETUP_WAIT_SECONDS), state.stream_setups:
        while True:
            try:
                return await read_rows(state, query, params)
            except TooManyRequests:
                # The pool's waiting line is full of its other users (the job reader's
                # rounds, the company feeds, the REST API): this read has its turn, so it
                # asks again within the same wait instead of ending its stream (a
                # resuming stream's second page was sent away so under load).
                await asyncio.sleep(SETUP_RETRY_SECONDS)


async def load_job(
    state: GatewayState, company_id: str, job_id: uuid.UUID
) -> dict[str, Any] | None:
    """The job a stream starts from (a set-up read: it takes its turn)."""
    rows = await setup_read(state, "job_get_for_stream", {"id": job_id, "company_id": company_id})
    return rows[0] if rows else None


async def job_events_after(
    state: GatewayState, company_id: str, job_id: uuid.UUID, after_seq: int
) -> list[dict[str, Any]]:
    """A page of the job's events after ``after_seq``. Every page takes its turn (see
    setup_read), not only a resuming stream's first: in a reconnect storm of browsers
    that were all far behind, the later pages of the streams already set up filled the
    pool's waiting line and sent the set-ups still queued away with a reconnect frame."""
    return await setup_read(
        state,
        "job_events_after_seq",
        {"job_id": job_id, "company_id": company_id, "after_seq": after_seq, "limit": PAGE},
    )


async def job_stream(
    state: GatewayState, sub: Subscription, job: dict[str, Any], last: int | None
) -> AsyncGenerator[bytes, None]:
    """One job's events. ``sub`` was subscribed before ``job`` was read."""
    company_id, job_id = sub.company_id, job["id"]

    async def from_table(after: int) -> AsyncGenerator[tuple[bytes, int, bool], None]:
        """The job's events after ``after`` from the table: per page, its frames as one
        chunk (one write for the page, not one per event), the seq of its last event,
        and whether that one was terminal (the chunk ends there).

        Across a retention cut (``pgjobs prune --events-older-than`` deleted events
        after ``after``: the first row read is not ``after + 1``, or there is none while
        the job is known to be further on), the stream never skips silently: it sends a
        ``status`` frame of the job's current state, read now, and goes on after it."""
        first = True
        while True:
            rows = await job_events_after(state, company_id, job_id, after)
            if first and (rows[0]["seq"] > after + 1 if rows else job["event_seq"] > after):
                current = await load_job(state, company_id, job_id)
                if current is None:  # pruned with its events: nothing more to tell
                    return
                after = current["event_seq"]
                ended = current["status"] in TERMINAL
                yield status_event(current), after, ended
                if ended:
                    return
                rows = await job_events_after(state, company_id, job_id, after)
            first = False
            frames = []
            for row in rows:
                frames.append(row_event(row))
                after = row["seq"]
                if row["status"] in TERMINAL:
                    yield b"".join(frames), after, True
                    return
            if frames:
                yield b"".join(frames), after, False
            if len(rows) < PAGE:
                return

    # Where this stream starts, for the fan-out: events up to it are not queued for it.
    sub.reached(job["event_seq"] if last is None else last)
    try:
        if last is None:
            yield status_event(job)
            last = job["event_seq"]
            if job["status"] in TERMINAL:
                return
        else:
            async for chunk, seq, ended in from_table(last):
                sub.reached(seq)
                yield chunk
                last = seq
                if ended:
                    return
        while True:
            item = await sub.get()
            if item is CLOSED or sub.ended:
                # Shutdown, or this client fell a queue behind: end the stream; the
                # browser reconnects with Last-Event-ID and resumes from the table.
                return
            if item is BACKFILL or (isinstance(item, LiveEvent) and item.seq > last + 1):
                async for chunk, seq, ended in from_table(last):
                    sub.reached(seq)
                    yield chunk
                    last = seq
                    if ended:
                        return
            elif isinstance(item, LiveEvent) and item.seq == last + 1:
                yield live_event(item)
                last = item.seq
                if item.status in TERMINAL:
                    return
            # else: an event this stream already sent (seq <= last); drop it.
    except (psycopg.OperationalError, TimeoutError) as exc:  # PoolTimeout included
        # The database is busy or gone, or the catch-up got no turn for the pool within
        # STREAM_SETUP_WAIT_SECONDS: end the stream; the browser resumes from its
        # Last-Event-ID when it reconnects.
        log.warning("job stream %s ended: %s", job_id, db.describe_error(exc))
        yield reconnect_frame()
