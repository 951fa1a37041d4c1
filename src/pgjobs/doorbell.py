"""Rings: announcing transitions after their commit instead of in it.

A transaction that runs ``doorbell_on`` first (or a statement made by ``ringing``, which
sets it itself) writes its transitions' audit rows without NOTIFY items
(sql/0019_doorbell.sql); after it commits, its writer calls ``ring`` with the
``(company_id, job_id)`` of each job it changed, and listeners read those jobs' events
from ``pgjobs.job_events`` (the format: ``pgjobs.events.encode_ring``). Why: a commit that
carries a NOTIFY holds a database-wide lock through its WAL flush, so the claims and
finishes of several workers could not share flushes (docs/benchmarks.md).

A ring is a doorbell: one lost between the commit and its send (a crash, a dropped
connection) leaves committed events unannounced until the listeners' periodic catch-up,
never lost from the table. ``ring`` is therefore best-effort: it never raises for a
database error, it logs it.

A worker rings through one ``Ringer``: its claims, finish batches and progress reports
hand it their committed pairs and go on; it sends whatever is pending as one ring, and
what commits while that ring is in flight goes in the next. A ring costs the worker a
round trip whatever it carries (its statement sent through libpq directly: ~14 µs of
CPU, against ~40 through a psycopg cursor), so under load the rings per second are
bounded by round trips, not by commits; and it holds one pool connection for them,
since a checkout and return per ring cost ~60 µs more (docs/benchmarks.md, "In the
worker").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from typing import Any, LiteralString

import psycopg

from pgjobs import db, events
from pgjobs.events import RungJob
from pgjobs.queries import QUERIES, compact, positional

log = logging.getLogger(__name__)


async def doorbell_on(conn: psycopg.AsyncConnection[Any]) -> None:
    """Ask for a ring instead of NOTIFY items for the rest of ``conn``'s transaction."""
    await conn.execute(QUERIES["events_doorbell_on"])


def doorbell_on_sync(conn: psycopg.Connection[Any]) -> None:
    """``doorbell_on`` for a blocking connection."""
    conn.execute(QUERIES["events_doorbell_on"])


# Where a statement that can ring sets the doorbell (queries.sql): replaced by ringing().
_MARK = "(SELECT true /* doorbell */)"
_ringing: dict[str, LiteralString] = {}


def ringing(query: LiteralString) -> LiteralString:
    """``query`` asking for the doorbell itself: its ``(SELECT true /* doorbell */)``
    replaced by ``events_doorbell_on`` (still true), evaluated once before the statement
    changes a row, so before its triggers. Why not ``doorbell_on`` first: the two
    statements would need a pipeline (one implicit transaction), which costs the worker
    ~35 µs of CPU more than one statement (docs/benchmarks.md, "In the worker").
    ValueError for a query without exactly one such mark."""
    ring = _ringing.get(query)
    if ring is None:
        if query.count(_MARK) != 1:
            raise ValueError("a query that rings needs one (SELECT true /* doorbell */)")
        # A line comment in events_doorbell_on ends at its newline, kept here.
        ring = query.replace(_MARK, "((" + QUERIES["events_doorbell_on"] + "\n) IS NOT NULL)")
        _ringing[query] = ring
    return ring


async def execute(
    cur: psycopg.AsyncCursor[Any], query: LiteralString, params: Mapping[str, Any], *, ring: bool
) -> None:
    """Run one statement in a transaction of its own (autocommit): with ``ring``, as
    ``ringing(query)``, so its commit carries no NOTIFY items and its caller rings after
    it. Sent without its comments (``queries.compact``), short enough for psycopg to
    keep its conversion. Prepared at its first run on a connection that prepares
    statements, as the worker's claim is (worker._execute_positional): the completion's
    statement was planned at each of its first five runs on every connection."""
    query = compact(ringing(query) if ring else query)
    await cur.execute(query, params, prepare=db.prepare_at_first_run(cur.connection))


async def ring(conn: psycopg.AsyncConnection[Any], jobs: Iterable[RungJob]) -> bool:
    """Ring for ``(company_id, job_id)`` pairs whose transitions have committed: call it
    after the commit, on a connection outside a transaction (autocommit). False if it
    could not be sent (logged; the listeners' catch-up covers it)."""
    return await ring_payloads(conn, events.encode_ring(jobs))


async def ring_payloads(conn: psycopg.AsyncConnection[Any], payloads: list[str]) -> bool:
    """``ring`` for payloads already encoded (``events.encode_ring``)."""
    if not payloads:
        return True
    # One payload but for a ring of more than ~200 jobs (a bulk enqueue's): those go in one
    # statement, one round trip instead of one per payload (~60 µs of the producer's CPU
    # each, with the wait).
    if len(payloads) == 1:
        query, param = QUERIES["events_ring"], payloads[0]
    else:
        query, param = QUERIES["events_ring_many"], _text_array(payloads)
    try:
        async with conn.lock:  # as psycopg's own execute: one statement at a time
            await _send_ring(conn.pgconn, query, param.encode())
    except psycopg.Error as exc:
        return _not_sent(payloads, exc)
    return True


def _text_array(texts: list[str]) -> str:
    """A PostgreSQL text array literal of ``texts``: each element quoted, its quotes and
    backslashes escaped (str.replace, in C: psycopg's text-format dumper quotes character
    by character in Python)."""
    quoted = (t.replace("\\", "\\\\").replace('"', '\\"') for t in texts)
    return '{"' + '","'.join(quoted) + '"}'


async def _send_ring(pgconn: psycopg.pq.abc.PGconn, query: LiteralString, param: bytes) -> None:
    """Run ``events_ring`` (or ``events_ring_many``, ``param`` a text array literal of
    payloads) through libpq (psycopg.pq) rather than a cursor: the same statement and
    round trip for ~14 µs of the worker's CPU instead of ~40 (no query conversion,
    adapters, cursor or result objects), paid once per ring,
    which at small batches is once per few jobs (docs/benchmarks.md, "In the worker").
    Unnamed, as a statement through a pooler must be. The caller holds the connection's
    lock; raises psycopg.Error as a cursor would (a refused statement, a lost
    connection); a cancel leaves the connection mid-statement (the pool closes such a
    connection when it is given back)."""
    statement, _ = positional(compact(query))  # its one parameter as $1, made once
    loop = asyncio.get_running_loop()
    pgconn.send_query_params(statement, [param])
    while pgconn.flush():  # psycopg's connections are nonblocking: 1 while any is unsent
        await _ready(loop, pgconn.socket, write=True)
    while pgconn.is_busy():  # a check of what was read (no read before the reply comes)
        await _ready(loop, pgconn.socket, write=False)
        pgconn.consume_input()
    failed = None
    while (result := pgconn.get_result()) is not None:  # read to the end, then raise
        if result.status != psycopg.pq.ExecStatus.TUPLES_OK:
            failed = result
    if failed is not None:
        raise psycopg.errors.error_from_result(failed)


async def _ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool) -> None:
    """Wait until ``fd`` can be written (or read)."""
    ready = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def ring_sync(conn: psycopg.Connection[Any], jobs: Iterable[RungJob]) -> bool:
    """``ring`` for a blocking connection."""
    return ring_payloads_sync(conn, events.encode_ring(jobs))


def ring_payloads_sync(conn: psycopg.Connection[Any], payloads: list[str]) -> bool:
    """``ring_payloads`` for a blocking connection."""
    try:
        if len(payloads) == 1:
            conn.execute(QUERIES["events_ring"], {"payload": payloads[0]})
        elif payloads:
            conn.execute(QUERIES["events_ring_many"], {"payloads": _text_array(payloads)})
    except psycopg.Error as exc:
        return _not_sent(payloads, exc)
    return True


def _not_sent(payloads: list[str], exc: psycopg.Error) -> bool:
    log.warning(
        "ring for %d payload(s) not sent (%s); listeners catch up",
        len(payloads),
        db.describe_error(exc),
    )
    return False


class Ringer:
    """One worker's rings, coalesced. ``add`` queues committed pairs and returns at once;
    ``run`` sends everything queued as one ``ring``, at once when no ring is in flight (no
    delay when idle: the first pair goes out alone), else as soon as the one in flight is
    done, with all that came meanwhile. ``close`` makes ``run`` return once everything
    queued before it was sent. Best-effort, as ``ring``: a ring not sent, for whatever
    reason, is logged and never raised (``run`` goes on).

    ``run`` holds one connection of ``pool`` (a worker's pool counts it), used at most
    the pool's ``use_timeout`` per ring; after a ring that failed it gives the connection
    back (the pool replaces a broken one) and takes another for the next."""

    def __init__(self, pool: db.GuardedPool) -> None:
        self.pool = pool
        self._conn: db.AsyncConn | None = None
        self._pending: list[RungJob] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self.rings = 0
        """Rings tried (sent or not)."""

    def add(self, jobs: Iterable[RungJob]) -> None:
        """Ring for ``(company_id, job_id)`` pairs whose transitions have committed (call
        it after the commit: a ring is never ahead of the database)."""
        self._pending.extend(jobs)
        if self._pending:
            self._wakeup.set()

    def close(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def run(self) -> None:
        try:
            while self._pending or not self._closing:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                jobs, self._pending = self._pending, []
                await self._send(jobs)
        finally:
            await self._give_back()

    async def _send(self, jobs: list[RungJob]) -> None:
        self.rings += 1
        try:
            if self._conn is None:
                self._conn = await self.pool.getconn()
            async with asyncio.timeout(self.pool.use_timeout):
                if await ring(self._conn, jobs):
                    return
            # Not sent (logged by ring): the connection may be what failed.
        except Exception as exc:  # any: this loop must outlive it (listeners catch up)
            log.warning(
                "ring for %d job(s) not sent (%s); listeners catch up",
                len(jobs),
                db.describe_error(exc),
            )
        await self._give_back()

    async def _give_back(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # The pool closes one left mid-statement (a ring timed out) or broken.
            with contextlib.suppress(Exception):
                await self.pool.putconn(conn)
