"""Connections: where the DSN comes from, pools, and turning driver errors into one line.

DSN precedence: an explicit ``--dsn``, then ``PGJOBS_DSN``, then the embedded server
(see ``pgjobs.embedded``). Every connection is autocommit; a multi-statement transaction
is always an explicit ``conn.transaction()`` block, so no transaction is left open by
accident while a handler runs.

Every connection opened here loads a timestamptz Python cannot represent (before year 1,
after 9999, infinity) as ``pgjobs.types.UnreadableTime`` instead of raising for the whole
result (``ADAPTERS``): one such row, written by hand or before sql/0005_time_bounds.sql,
must not make a company's job list, a job's page or its stream unreadable. The worker's
claim opts back into the strict loaders (``strict_times``): there, a row it cannot read
is failed rather than run.

Poolers. A connection through PgBouncer in transaction pooling mode may run each
transaction on a different server connection, so nothing may depend on session state.
pgjobs keeps none (no SET, no session advisory locks, no temporary tables, no cursor
outliving its transaction), except two things handled here and in
``pgjobs.notifier``: psycopg's prepared statements (a statement prepared on one server
connection is missing on the next; PgBouncer tracks them only from 1.22 with
``max_prepared_statements`` set) and LISTEN. Every connection opened here learns whether
a pooler sits in between (``behind_pooler``) and, if so, turns prepared statements off
(``PGJOBS_PREPARED_STATEMENTS``); anything that LISTENs connects to ``listen_dsn()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import select
import socket
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, LiteralString

import psycopg
from psycopg import abc
from psycopg.abc import AdaptContext, Buffer
from psycopg.adapt import AdaptersMap, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import Format
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from pgjobs import schema
from pgjobs.config import env_bool, env_float
from pgjobs.errors import (
    ConfigurationError,
    DatabaseUnavailableError,
    NotMigratedError,
    SchemaBehindError,
)
from pgjobs.queries import QUERIES
from pgjobs.types import Job, UnreadableTime, job_rows

AsyncConn = psycopg.AsyncConnection[DictRow]
SyncConn = psycopg.Connection[DictRow]
CallerAsyncConn = psycopg.AsyncConnection[Any]
"""A connection a caller passes in (``conn=``): any row factory, autocommit or not."""
CallerSyncConn = psycopg.Connection[Any]

log = logging.getLogger(__name__)

TRANSIENT = (psycopg.OperationalError, psycopg.errors.AdminShutdown, OSError, TimeoutError)
"""What a background loop logs and retries rather than dies of: a lost or refused
connection, a pool that timed out (``PoolTimeout`` is an ``OperationalError``), a use past
``GuardedPool``'s limit (``TimeoutError``), a socket or file error."""


async def fetch_dicts(
    conn: CallerAsyncConn, query: LiteralString, params: Mapping[str, Any]
) -> list[DictRow]:
    """Run ``query`` on any connection and return its rows as dicts.

    The cursor is built here, with its own row factory and class, instead of by
    ``conn.execute``: a caller's connection may return tuples, named tuples or its own
    row type, or make client-side cursors, and it keeps all of that. The statement runs
    in whatever transaction the connection is in (in autocommit mode it commits at once).
    """
    async with psycopg.AsyncCursor(conn, row_factory=dict_row) as cur:
        await cur.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def fetch_jobs(
    conn: CallerAsyncConn, query: LiteralString, params: Mapping[str, Any]
) -> list[Job]:
    """Run ``query`` (which returns pgjobs.jobs rows) on any connection and return them as
    Jobs, built from the result's tuples by ``types.job_rows``: for a bulk enqueue's
    thousand returned rows, a dict per row and ``Job.from_row`` cost ~2.5 µs per job more.
    The cursor is the caller-proof one of fetch_dicts."""
    async with psycopg.AsyncCursor(conn, row_factory=job_rows) as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


def fetch_jobs_sync(
    conn: CallerSyncConn, query: LiteralString, params: Mapping[str, Any]
) -> list[Job]:
    """fetch_jobs() for a blocking connection."""
    with psycopg.Cursor(conn, row_factory=job_rows) as cur:
        cur.execute(query, params)
        return cur.fetchall()


def fetch_dicts_sync(
    conn: CallerSyncConn, query: LiteralString, params: Mapping[str, Any]
) -> list[DictRow]:
    """fetch_dicts() for a blocking connection."""
    with psycopg.Cursor(conn, row_factory=dict_row) as cur:
        cur.execute(query, params)
        return cur.fetchall() if cur.description else []


_TIMESTAMPTZ = psycopg.adapters.types["timestamptz"].oid


def _loader(fmt: Format) -> type[abc.Loader]:
    loader = psycopg.adapters.get_loader(_TIMESTAMPTZ, fmt)
    assert loader is not None  # psycopg registers both formats of its built-in types
    return loader


_STRICT_TEXT = _loader(Format.TEXT)
_STRICT_BINARY = _loader(Format.BINARY)


class _TolerantTimestamptzLoader(Loader):
    """psycopg's own loader, except that a value it cannot represent becomes an
    UnreadableTime. Wraps rather than subclasses it: psycopg's C loaders are called
    directly by the C row maker, bypassing a Python override of ``load``."""

    def __init__(self, oid: int, context: AdaptContext | None = None):
        super().__init__(oid, context)
        self._strict = _STRICT_TEXT(oid, context)

    def load(self, data: Buffer) -> Any:
        try:
            return self._strict.load(data)
        except psycopg.DataError:
            return UnreadableTime.from_text(bytes(data).decode())


_JSON = json.JSONDecoder()


class _JsonbLoader(Loader):
    """jsonb in text format, read as psycopg's own loader reads it (``json.loads``), for
    less: PostgreSQL writes a jsonb value as one JSON text without whitespace around it,
    which the decoder's ``raw_decode`` reads alone, where ``json.loads`` of bytes first
    sniffs their encoding and strips whitespace on either side (~1 µs more per value, paid
    for every claimed job's input). Anything else goes to ``json.loads``, which raises
    as before for what is not JSON."""

    def load(self, data: Buffer) -> Any:
        text = str(data, "utf-8")
        try:
            value, end = _JSON.raw_decode(text)
        except ValueError:
            return json.loads(text)
        return value if end == len(text) else json.loads(text)


ADAPTERS = AdaptersMap(psycopg.adapters)
ADAPTERS.register_loader("timestamptz", _TolerantTimestamptzLoader)
ADAPTERS.register_loader("jsonb", _JsonbLoader)
# pgjobs reads results in text format. A binary-format reader gets the strict loader: the
# text PostgreSQL would show is not at hand there.
ADAPTERS.register_loader("timestamptz", _STRICT_BINARY)


def strict_times(cursor: psycopg.AsyncCursor[Any]) -> None:
    """Back to psycopg's own (C, ~0.3 µs a value faster) timestamptz loaders on this cursor:
    a value Python cannot represent raises instead of loading as UnreadableTime."""
    cursor.adapters.register_loader("timestamptz", _STRICT_TEXT)


def resolve_dsn(explicit: str | None = None) -> str:
    """The DSN to use: --dsn, else PGJOBS_DSN, else start/join the embedded server.

    A DSN that names the embedded server (what ``pgjobs dsn`` prints) starts or joins it
    too: the process that printed it may have stopped it on exit.
    """
    from pgjobs import embedded

    dsn = explicit or os.environ.get("PGJOBS_DSN")
    if not dsn:
        return embedded.start()
    data = embedded.data_dir_of(dsn)
    if data is not None:
        embedded.start(data.parent)
    return dsn


def listen_dsn(dsn: str) -> str:
    """Where to LISTEN: ``PGJOBS_LISTEN_DSN`` when set, else ``dsn``.

    LISTEN needs a session of its own. Through PgBouncer in transaction pooling mode it
    registers on a server connection the client gives back at once, and its
    notifications never arrive: the LISTEN DSN then points at PostgreSQL directly (or at
    a session-mode pool) while everything else goes through the bouncer."""
    return os.environ.get("PGJOBS_LISTEN_DSN", "").strip() or dsn


PREPARE_THRESHOLD = 5
"""psycopg's default: a statement run this many times on a connection is prepared."""


def prepare_at_first_run(conn: psycopg.AsyncConnection[Any]) -> bool | None:
    """``execute``'s ``prepare`` for a statement the worker runs on every claim or finish:
    True (prepared at its first run, not its sixth) where ``conn`` prepares statements,
    None (psycopg's own choice: never) where it does not."""
    return True if conn.prepare_threshold is not None else None


def prepare_threshold(behind_a_pooler: bool) -> int | None:
    """psycopg's ``prepare_threshold`` for a connection (None: never prepare).

    ``PGJOBS_PREPARED_STATEMENTS``: ``auto`` (the default) prepares on a direct connection
    and not through a pooler, where a prepared statement may be missing on the server
    connection the next transaction gets (PgBouncer before 1.22, or without
    ``max_prepared_statements``); ``on`` prepares anyway (PgBouncer >= 1.22 with
    ``max_prepared_statements`` set, which psycopg >= 3.2 supports); ``off`` never does.
    """
    setting = os.environ.get("PGJOBS_PREPARED_STATEMENTS", "").strip().lower() or "auto"
    if setting not in ("auto", "on", "off"):
        raise ConfigurationError(
            f"PGJOBS_PREPARED_STATEMENTS must be auto, on or off, got {setting!r}"
        )
    if setting == "on" or (setting == "auto" and not behind_a_pooler):
        return PREPARE_THRESHOLD
    return None


async def behind_pooler(conn: CallerAsyncConn) -> bool:
    """True when ``conn`` reaches PostgreSQL through a pooler such as PgBouncer.

    A server tells its client its process id at connect (BackendKeyData, used to cancel
    a query); a pooler answers the client itself and sends a key of its own, so that pid
    differs from the ``pg_backend_pid()`` a statement runs on."""
    rows = await fetch_dicts(conn, QUERIES["connection_backend_pid"], {})
    return bool(rows[0]["pid"] != conn.info.backend_pid)


def behind_pooler_sync(conn: CallerSyncConn) -> bool:
    """behind_pooler() for a blocking connection."""
    rows = fetch_dicts_sync(conn, QUERIES["connection_backend_pid"], {})
    return bool(rows[0]["pid"] != conn.info.backend_pid)


def redact(dsn: str) -> str:
    """The DSN with any password removed, for error messages and logs."""
    dsn = re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)


def describe_error(exc: BaseException) -> str:
    """An error as one log line: its class and the server's primary message.

    A statement the server kills (``pg_terminate_backend``, a restart) while it runs inside
    a trigger arrives with the trigger's whole SQL as CONTEXT lines, and a dropped
    connection with libpq's indented explanation: ~40 lines for what is, to whoever reads
    the log, "terminating connection due to administrator command; retrying".
    """
    primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
    text = primary or str(exc).strip()
    first = text.splitlines()[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def unavailable(dsn: str, exc: Exception) -> DatabaseUnavailableError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return DatabaseUnavailableError(
        f"cannot connect to PostgreSQL at {redact(dsn)}: {first_line.rstrip('.')}. "
        "Start that server or fix the DSN (--dsn, PGJOBS_DSN); "
        "with no DSN at all pgjobs starts its embedded server under $PGJOBS_HOME (./.pgjobs)"
    )


CONNECT_TIMEOUT_SECONDS = 10.0
"""How long a connection attempt of pgjobs' may take where the DSN does not say
(``connect_timeout``): psycopg's own default is 130 s."""


def probe_sync(dsn: str, *, connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> int | None:
    """Connect once and close: a bad host, a stopped server or a wrong password fails at
    once with the server's own message, where a pool would retry until its timeout and
    say only "timeout". Returns the ``prepare_threshold`` for this DSN's connections."""
    check_dsn(dsn)
    try:
        with psycopg.Connection.connect(
            dsn, autocommit=True, **connect_timeout_unless_set(dsn, connect_timeout)
        ) as probe:
            return prepare_threshold(behind_pooler_sync(probe))
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None


def check_dsn(dsn: str) -> None:
    """Reject a malformed DSN with a clear message before any connection is tried."""
    try:
        psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise DatabaseUnavailableError(f"invalid DSN {redact(dsn)!r}: {exc}") from None


async def connect(dsn: str, **kwargs: Any) -> AsyncConn:
    """A dedicated autocommit connection (listeners, one-off CLI commands), with prepared
    statements off when it goes through a pooler (``prepare_threshold``), made within
    ``CONNECT_TIMEOUT_SECONDS`` unless the DSN or ``kwargs`` give a connect_timeout."""
    check_dsn(dsn)
    kwargs = {**connect_timeout_unless_set(dsn, CONNECT_TIMEOUT_SECONDS), **kwargs}
    try:
        conn = await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, row_factory=dict_row, context=ADAPTERS, **kwargs
        )
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    try:
        conn.prepare_threshold = prepare_threshold(await behind_pooler(conn))
        await dates_iso(conn)
    except BaseException:
        await conn.close()
        raise
    return conn


def connect_sync(dsn: str, **kwargs: Any) -> SyncConn:
    """connect() for blocking code."""
    check_dsn(dsn)
    kwargs = {**connect_timeout_unless_set(dsn, CONNECT_TIMEOUT_SECONDS), **kwargs}
    try:
        conn = psycopg.Connection.connect(
            dsn, autocommit=True, row_factory=dict_row, context=ADAPTERS, **kwargs
        )
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    try:
        conn.prepare_threshold = prepare_threshold(behind_pooler_sync(conn))
        dates_iso_sync(conn)
    except BaseException:
        conn.close()
        raise
    return conn


async def ensure_migrated(conn: AsyncConn) -> None:
    """Raise NotMigratedError where pgjobs' schema is absent, SchemaBehindError where it
    lacks a migration this pgjobs needs (pgjobs.schema)."""
    row = await (await conn.execute(QUERIES["schema_check"])).fetchone()
    if not row or not row["migrated"]:
        raise NotMigratedError()
    if row["tracked"]:
        applied = await (await conn.execute(QUERIES["schema_migrations_applied"])).fetchall()
        check_applied(r["migration_id"] for r in applied)


def ensure_migrated_sync(conn: SyncConn) -> None:
    """ensure_migrated() for a blocking connection."""
    row = conn.execute(QUERIES["schema_check"]).fetchone()
    if not row or not row["migrated"]:
        raise NotMigratedError()
    if row["tracked"]:
        applied = conn.execute(QUERIES["schema_migrations_applied"]).fetchall()
        check_applied(r["migration_id"] for r in applied)


async def warn_unless_read_committed(conn: AsyncConn, who: str) -> bool:
    """Log a warning where this session's transactions default to an isolation above
    READ COMMITTED; True if so. pgjobs' statements are written for READ
    COMMITTED (PostgreSQL's default): a claim's SKIP LOCKED walk and the guarded updates
    re-check a row changed since their snapshot and go on, where REPEATABLE READ and
    SERIALIZABLE fail with a serialization error instead. The work still gets done (each
    such claim or finish is retried after a backoff), slower and with a warning each
    time, so this says why at the start. Not changed for the session here: through a
    pooler a session setting would stay with whichever client gets the connection next,
    and a handler's own transaction (ctx.transaction) keeps the database's default."""
    row = await (await conn.execute(QUERIES["connection_isolation_default"])).fetchone()
    if not row or row["isolation"] == "read committed":
        return False
    log.warning(
        "%s: transactions here default to %s (default_transaction_isolation); pgjobs' "
        "claims and updates need read committed and will fail with serialization errors "
        "and be retried; give pgjobs' role the default: ALTER ROLE %s SET "
        "default_transaction_isolation = 'read committed'",
        who,
        row["isolation"],
        row["role_name"],
    )
    return True


def check_applied(applied: Iterable[str]) -> None:
    """Raise SchemaBehindError unless every migration this pgjobs needs is in ``applied``;
    with PGJOBS_SCHEMA_CHECK=off, log it as a warning and go on (for a database migrated
    by hand, or tests that run this version on an older schema on purpose)."""
    behind = schema.missing(applied)
    if not behind:
        return
    error = SchemaBehindError(behind)
    if env_bool("PGJOBS_SCHEMA_CHECK", True):
        raise error
    log.warning("%s (going on: PGJOBS_SCHEMA_CHECK=off)", error)


CHECK_TIMEOUT_SECONDS = 10.0
"""How long ``check_if_suspect`` waits for the server to answer an empty query."""


async def check_if_suspect(conn: AsyncConn) -> None:
    """Pool checkout check without a round trip per checkout.

    An idle connection has nothing to read. If its socket is readable, the server has
    closed it or sent an error (a restart, pg_terminate_backend, idle timeout): only then
    pay for a real check, which raises and makes the pool replace the connection. A
    connection that dies silently (a cut network) still fails on first use, and every
    pgjobs caller retries those failures.
    """
    if conn.closed or conn.broken:
        await AsyncConnectionPool.check_connection(conn)  # raises: the pool discards it
        return
    if _has_something_to_read(conn):
        # Bounded: outside any checkout's use limit, and a socket with bytes to read can
        # still be half-open (the start of a reply whose rest never comes).
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
                await AsyncConnectionPool.check_connection(conn)
        except TimeoutError:
            await conn.close()  # the pool discards it; its socket goes now, not at GC
            raise


def check_if_suspect_sync(conn: SyncConn) -> None:
    """``check_if_suspect`` for a blocking pool (the SyncClient's): an idle connection
    with nothing to read is handed out as it is, a round trip fewer per call (a single
    enqueue: one instead of two); one the server wrote to is checked with a round trip
    (the server has answered: its error, or the end of the connection, is there to
    read)."""
    if conn.closed or conn.broken or _has_something_to_read(conn):
        ConnectionPool.check_connection(conn)


def _has_something_to_read(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    """Whether an idle connection's socket is readable (or cannot be asked): the server
    closed it or sent something (an error before closing it, a notice)."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


async def lock_timeout_for_transaction(conn: CallerAsyncConn, seconds: float) -> None:
    """Within ``conn``'s transaction, a statement waits at most ``seconds`` (at least a
    millisecond) for a lock, then raises ``psycopg.errors.LockNotAvailable``."""
    await conn.execute(
        QUERIES["transaction_lock_timeout_set_local"],
        {"lock_timeout": f"{max(1, round(seconds * 1000))}ms"},
    )


def _dates_not_iso(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
    # The server reports DateStyle at connect (and at every change): no round trip.
    return not (conn.info.parameter_status("DateStyle") or "ISO").startswith("ISO")


async def dates_iso(conn: AsyncConn) -> None:
    """Every pgjobs connection's setting where the server's differs: ``DateStyle = ISO``.
    psycopg reads times in ISO text only (NotImplementedError: "can't parse timestamptz
    with DateStyle 'SQL, DMY'"): a database or role set to another style could not read a
    job. Where the server's style is ISO already (the default), nothing is sent. Through
    PgBouncer too: it keeps each client's DateStyle and sets it on whichever server
    connection the client gets."""
    if _dates_not_iso(conn):
        await conn.execute(QUERIES["connection_dates_iso"])


def dates_iso_sync(conn: SyncConn) -> None:
    """dates_iso() for a blocking connection."""
    if _dates_not_iso(conn):
        conn.execute(QUERIES["connection_dates_iso"])


async def plans_generic(conn: AsyncConn) -> None:
    """A new pool connection's setting: ``plan_cache_mode = force_generic_plan``.

    PostgreSQL plans a prepared statement five times (custom plans, for the values of the
    run) before it considers keeping a generic one. The worker's claim takes ~2-4 ms to
    plan, and each worker process has its own connections: ~100 plans in a 100,000-job
    drain at 4 processes (issue 16). Forced generic (and the completion prepared at its
    first run, doorbell.execute), pg_stat_statements counted 21 plans of the claim
    against 101 and 17 of the completion against 176 (one per connection); PostgreSQL
    CPU per job was 47.0 µs (44.8-49.4) against 49.0 (48.0-51.8) at 4 processes, jobs/s
    1.03x, and 42.1 against 43.0 at 1, jobs/s 1.02x (bench.cpusplit, 100,000 jobs, 12-13
    interleaved rounds, medians). The generic claim walks the same indexes as the custom ones
    (EXPLAIN ANALYZE on 100,000 queued and 1,000,000 finished jobs): its plan does not
    depend on the values."""
    await conn.execute(QUERIES["connection_plans_generic"])


async def _dates_iso_and_plans_generic(conn: AsyncConn) -> None:
    await dates_iso(conn)
    await plans_generic(conn)


# How long one round of reconnection attempts lasts (psycopg_pool doubles the delay
# between them from 1 s); after it, another round starts (GuardedPool), so the longest
# wait between attempts during an outage is about half of it. PGJOBS_DB_RECONNECT_SECONDS
# overrides it (the reduced chaos run shortens it to outlast it with a shorter outage).
RECONNECT_TIMEOUT_SECONDS = 30.0


USE_GRACE_SECONDS = 15.0
"""How long a checkout may go on past its use limit (``GuardedPool``) before its socket is
shut down: longer than psycopg's own way out of a cancelled query (up to 5 s for the
cancel request, then 5 s for the query to end), so that it meets only a wait nothing
else bounds."""


def _shut_down(conn: AsyncConn) -> None:
    """Shut ``conn``'s socket down, both ways, leaving its descriptor to psycopg: a read
    waiting on it gets end-of-file and libpq reports the connection lost. A connection
    psycopg has closed is left alone (its descriptor number may be another's by now)."""
    if conn.closed or conn.broken:
        return
    try:
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        return
    log.warning(
        "a database connection was shut down: %.0f s after its use should have ended, it "
        "was still waiting for the server (a half-open connection: its peer stopped "
        "answering)",
        USE_GRACE_SECONDS,
    )


class _Watchdog:
    """A timer that shuts a connection's socket down (``_shut_down``) unless the ``with``
    block ends first; armed inside the block, when the connection and the delay are
    known, so that it also covers whatever the block's exit still says to the server."""

    _timer: asyncio.TimerHandle | None = None

    def arm(self, conn: AsyncConn, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, _shut_down, conn)

    def __enter__(self) -> _Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()


@contextlib.asynccontextmanager
async def transaction_ending_in_time(conn: AsyncConn) -> AsyncIterator[None]:
    """``conn.transaction()`` for a body whose length is not bounded (a handler's own
    writes, on ``GuardedPool.unbounded_connection``), but whose end is: once the body
    raises (an error, a cancel at the job's deadline), the ROLLBACK gets
    ``USE_GRACE_SECONDS`` before the socket is shut down. A body cancelled while idle in
    the transaction, on a half-open socket, would otherwise wait on that ROLLBACK forever,
    and the attempt with it: never finished, its lease renewed by every heartbeat, so
    never rescued."""
    with _Watchdog() as watchdog:
        async with conn.transaction():
            try:
                yield
            except BaseException:
                watchdog.arm(conn, USE_GRACE_SECONDS)
                raise


def connect_timeout_unless_set(dsn: str, seconds: float) -> dict[str, Any]:
    """Connection arguments that end a connection attempt after ``seconds``, unless
    ``dsn`` sets its own connect_timeout. psycopg's default is 130 s, through which a
    server that accepted the connection and never answered (a half-open proxy or
    balancer) held one of an async pool's three maintenance workers (the pool could not
    grow), a blocking pool's caller, or a listener's reconnection."""
    if "connect_timeout" in conninfo_to_dict(dsn):
        return {}
    return {"connect_timeout": max(1, round(seconds))}


class GuardedPool(AsyncConnectionPool[AsyncConn]):
    """A pool whose connections may be used for at most ``use_timeout`` seconds per
    checkout (None: no limit).

    A half-open socket (a cut network, a frozen NAT or proxy: no FIN, no RST) is not an
    error: a query on it waits forever, and the kernel's ACKs keep TCP keepalives happy
    when a middlebox is what froze. Past the limit the body gets ``TimeoutError``,
    psycopg cancels the query and, with no answer, closes the connection (psycopg waits
    at most 5 s for a cancel), and the pool replaces it. Every pgjobs caller already
    retries ``TimeoutError`` like a dropped connection.

    Cancelling the body is not always enough: what runs after it may still talk to the
    server, unbounded. A body cancelled while idle in a transaction (awaiting anything but
    the socket) leaves ``conn.transaction()`` a ROLLBACK to send, and the pool another
    when the connection comes back in a transaction; on a half-open socket each waits
    forever, and its caller with it (a worker's heartbeat, claims, completions: the whole
    worker). So a checkout still going ``USE_GRACE_SECONDS`` past its limit, the pool's
    reset included, gets its socket shut down (``_shut_down``): whatever waits on it
    reads end-of-file at once and fails as on a dropped connection, which the pool
    discards.

    It also never stops reconnecting. psycopg_pool gives a connection up after
    ``reconnect_timeout`` and counts on demand to grow the pool again; but a request that
    timed out waiting stays in the waiting queue until a connection is handed out, so
    after an outage longer than that, with ``max_waiting`` set, every request is refused
    (``TooManyRequests``) before it can ask for growth, and the pool stays empty for
    good (a gateway that never answers again). ``reconnect_failed`` starts a new
    connection attempt instead (``check()`` grows an empty pool); the backoff between
    attempts stays under ``reconnect_timeout``."""

    use_timeout: float | None = None

    @contextlib.asynccontextmanager
    async def connection(
        self,
        timeout: float | None = None,  # noqa: ASYNC109 - psycopg_pool's signature, overridden
    ) -> AsyncIterator[AsyncConn]:
        if self.use_timeout is None:
            async with super().connection(timeout) as conn:
                yield conn
            return
        with _Watchdog() as watchdog:  # outside the checkout: covers the pool's reset too
            async with super().connection(timeout) as conn:
                watchdog.arm(conn, self.use_timeout + USE_GRACE_SECONDS)
                async with asyncio.timeout(self.use_timeout):
                    yield conn

    @staticmethod
    async def check_connection(conn: AsyncConn) -> None:
        """How ``check()`` tests each idle connection: ``check_if_suspect``, bounded, as
        at checkout. ``check()`` takes every idle connection out of the pool first and
        runs in one of the pool's three maintenance workers (``reconnect_failed``
        below); psycopg_pool's own test, a round trip without a time limit, would wait
        forever on a half-open one, keeping that worker and those connections from the
        pool for good."""
        await check_if_suspect(conn)

    def unbounded_connection(
        self, timeout: float | None = None
    ) -> contextlib.AbstractAsyncContextManager[AsyncConn]:
        """A checkout without the use limit: for a use whose length is not pgjobs' to
        bound (a handler's own transaction, ``ctx.transaction()``)."""
        return super().connection(timeout)

    async def reconnect_failed(self) -> None:
        await super().reconnect_failed()
        if not self.closed:
            await self.check()  # also grows an empty pool by one, whatever is waiting


async def open_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    name: str = "pgjobs",
    connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
    checkout_timeout: float = 30.0,
    max_waiting: int = 0,
    use_timeout: float | None = None,
    reconnect_timeout: float | None = None,
    generic_plans: bool = False,
) -> GuardedPool:
    """An opened pool of autocommit connections, checked on checkout so a connection the
    server killed (restart, pg_terminate_backend) is replaced instead of handed out.
    ``checkout_timeout`` bounds the wait for a connection and ``max_waiting`` the queue of
    waiters (0: unbounded); past either, the pool raises instead of queueing forever.
    ``use_timeout`` bounds each use of a connection (``GuardedPool``);
    ``reconnect_timeout`` is a round of reconnection attempts (default
    ``PGJOBS_DB_RECONNECT_SECONDS``, else ``RECONNECT_TIMEOUT_SECONDS``).
    Through a pooler its connections do not prepare statements (``prepare_threshold``).
    With ``generic_plans``, a connection that prepares statements and reaches PostgreSQL
    directly plans each prepared statement once, generically (``plans_generic``)."""
    check_dsn(dsn)
    if reconnect_timeout is None:
        reconnect_timeout = env_float(
            "PGJOBS_DB_RECONNECT_SECONDS", RECONNECT_TIMEOUT_SECONDS, minimum=1.0
        )
    # The probe's attempt and each of the pool's end after connect_timeout (a DSN's wins).
    timeout = connect_timeout_unless_set(dsn, connect_timeout)
    # Probe once first: a bad host or password then fails at once with the server's own
    # message, instead of after the pool's retries with only "timeout".
    try:
        probe = await psycopg.AsyncConnection.connect(dsn, autocommit=True, **timeout)
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    try:
        pooled = await behind_pooler(probe)
    except psycopg.OperationalError as exc:
        raise unavailable(dsn, exc) from None
    finally:
        await probe.close()
    threshold = prepare_threshold(pooled)
    # The plan mode not through a pooler: a session setting would stay on the server
    # connection for whichever client gets it next (transaction pooling). DateStyle
    # either way (dates_iso: PgBouncer keeps it per client).
    generic = generic_plans and threshold is not None and not pooled
    configure = _dates_iso_and_plans_generic if generic else dates_iso
    pool = GuardedPool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        kwargs={
            "autocommit": True,
            "row_factory": dict_row,
            "application_name": name,
            "context": ADAPTERS,
            "prepare_threshold": threshold,
            **timeout,
        },
        connection_class=psycopg.AsyncConnection[DictRow],
        check=check_if_suspect,
        configure=configure,
        reconnect_timeout=reconnect_timeout,
        timeout=checkout_timeout,
        max_waiting=max_waiting,
        name=name,
        open=False,
    )
    pool.use_timeout = use_timeout
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except Exception as exc:
        await pool.close()
        raise unavailable(dsn, exc) from None
    return pool
