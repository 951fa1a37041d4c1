"""The LISTEN side: one dedicated connection, kept alive, re-LISTENed after any drop.

NOTIFY is a doorbell, not a log: anything sent while this connection is down is gone. So
after every (re)connect the listener first LISTENs and only then calls ``on_connect``,
whose job is to catch up from the tables (a worker polls for work, a stream reads
``pgjobs.job_events``); doing it the other way round would lose whatever is sent between
the read and the LISTEN. A silent half-open socket is caught by a heartbeat query with a
deadline. Reconnects back off exponentially with jitter, capped.

A listener LISTENs on one channel (``pgjobs.events``): the gateway on ``EVENTS_CHANNEL``
(every transition), a worker on ``WORK_CHANNEL`` (claimable jobs and cancellations only).

Through a pooler LISTEN may succeed and deliver nothing: PgBouncer in transaction mode
runs it on a server connection it hands to other clients, and drops what arrives there
in between. A connection that names a process other than the one its statements run on
(``pgjobs.db.behind_pooler``) is therefore checked once per connect: it also LISTENs on a
private probe channel and waits ``probe_seconds`` for a NOTIFY sent there from another
connection. (A direct connection needs no check, so no timing can make a healthy
listener look broken.) Nothing arriving, the listener is *unavailable*: it says so once
at WARNING, with what its owner does instead (``when_unavailable``), holds no connection,
and checks again every ``recheck_seconds`` in case the DSN is fixed behind it (a
session-mode pool delivers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable

import psycopg
from psycopg import sql

from pgjobs import db, metrics
from pgjobs.errors import DatabaseUnavailableError
from pgjobs.events import EVENTS_CHANNEL
from pgjobs.queries import QUERIES

log = logging.getLogger(__name__)


class ListenUndeliveredError(Exception):
    """LISTEN succeeded but a NOTIFY sent from another connection never arrived."""


class Listener:
    def __init__(
        self,
        dsn: str,
        on_notify: Callable[[str], None],
        *,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        channel: str = EVENTS_CHANNEL,
        heartbeat_seconds: float = 5.0,
        max_backoff_seconds: float = 5.0,
        name: str = "pgjobs-listener",
        probe_seconds: float = 5.0,
        recheck_seconds: float = 60.0,
        when_unavailable: str = "",
    ) -> None:
        self.dsn = dsn
        self.on_notify = on_notify
        self.on_connect = on_connect
        self.channel = channel
        self.heartbeat_seconds = heartbeat_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self.name = name
        self.connected = asyncio.Event()
        self.reconnects = 0
        self.probe_seconds = probe_seconds
        self.recheck_seconds = recheck_seconds
        self.when_unavailable = when_unavailable
        # Why LISTEN cannot deliver on this DSN (None: it can, or it was not found out).
        self.unavailable: str | None = None
        self.undelivered_checks = 0  # delivery checks that received nothing, in all
        self._conn: db.AsyncConn | None = None

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after any failure."""
        failures = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except ListenUndeliveredError as exc:
                self.undelivered_checks += 1
                if self.unavailable is None:
                    log.warning("%s; %s", exc, self.when_unavailable or "no live notifications")
                self.unavailable = str(exc)
                await self._close()  # hold no connection while waiting to check again
                await asyncio.sleep(self.recheck_seconds)
                continue
            except (psycopg.Error, OSError, TimeoutError, DatabaseUnavailableError) as exc:
                # DatabaseUnavailableError: the reconnect itself failed (server down).
                self.connected.clear()
                failures += 1
                delay = min(self.max_backoff_seconds, 0.05 * 2**failures)
                delay = delay / 2 + random.uniform(0, delay / 2)
                log.warning(
                    "listener connection lost (%s); reconnecting in %.2fs",
                    db.describe_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            finally:
                self.connected.clear()
                await self._close()
            failures = 0

    async def _session(self) -> None:
        self._conn = conn = await db.connect(self.dsn, application_name=self.name)
        await conn.execute(f"LISTEN {self.channel}")
        if await db.behind_pooler(conn):
            await self._check_delivery(conn)
        if self.unavailable is not None:
            log.info("LISTEN on %s delivers notifications again", db.redact(self.dsn))
            self.unavailable = None
        if self.reconnects:
            log.info("listener reconnected (reconnect #%d)", self.reconnects)
            metrics.LISTEN_RECONNECTS.labels(self.channel).inc()
        self.reconnects += 1
        self.connected.set()
        if self.on_connect is not None:
            await self.on_connect()
        while True:
            async for notify in conn.notifies(timeout=self.heartbeat_seconds):
                self.on_notify(notify.payload)
            # Quiet for a heartbeat: prove the socket is alive, or fail and reconnect.
            await self._ping(conn)

    async def _check_delivery(self, conn: db.AsyncConn) -> None:
        """Raise ListenUndeliveredError unless a NOTIFY sent from another connection
        reaches ``conn`` within ``probe_seconds``. Notifications of the listener's own
        channel that arrive meanwhile are handed on but prove nothing: through a pooler in
        transaction mode one can reach ``conn`` by chance (queued on the server connection
        that ran one of its statements, such as the LISTEN), and the next is lost."""
        probe = f"pgjobs_probe_{uuid.uuid4().hex}"
        await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(probe)))
        async with await db.connect(self.dsn, application_name=f"{self.name} probe"[:63]) as other:
            await other.execute(QUERIES["listener_notify_probe"], {"channel": probe})
        async for notify in conn.notifies(timeout=self.probe_seconds):
            if notify.channel == probe:
                break
            self.on_notify(notify.payload)
        else:  # probe_seconds passed without the probe
            raise ListenUndeliveredError(
                f"LISTEN through {db.redact(self.dsn)} receives no notifications (a pooler in "
                "transaction mode, such as PgBouncer's pool_mode = transaction, in between)"
            )
        await conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(probe)))

    async def _ping(self, conn: db.AsyncConn) -> None:
        query = asyncio.ensure_future(conn.execute("SELECT 1"))
        done, _ = await asyncio.wait({query}, timeout=self.heartbeat_seconds)
        if query in done:
            query.result()
            return
        # No answer: a half-open socket (a dead peer, a silent firewall). Cancelled once,
        # psycopg asks the server to cancel and waits up to 5 s for it; cancelled again, it
        # drops the connection at once, which is what we want here.
        query.cancel()
        await asyncio.sleep(0)
        query.cancel()
        with contextlib.suppress(BaseException):
            await query
        raise TimeoutError(f"no answer to the listener heartbeat in {self.heartbeat_seconds}s")

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally if
            # its task is cancelled in the loop turn the close ends, and run() went on.
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await conn.close()
