"""The LISTEN side: one dedicated connection, kept alive, re-LISTENed after any drop.

NOTIFY is a doorbell, not a log: anything sent while this connection is down is gone. So
after every (re)connect the listener first LISTENs and only then calls ``on_connect``,
whose job is to catch up from the tables (a worker polls for work, a stream reads
``pgjobs.job_events``); doing it the other way round would lose whatever is sent between
the read and the LISTEN. A silent half-open socket is caught by a heartbeat query with a
deadline. Reconnects back off exponentially with jitter, capped.

A listener LISTENs on one channel (``pgjobs.events``): the gateway on ``EVENTS_CHANNEL``
(every transition), a worker on ``WORK_CHANNEL`` (claimable jobs and cancellations only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

import psycopg

from pgjobs import db, metrics
from pgjobs.errors import DatabaseUnavailableError
from pgjobs.events import EVENTS_CHANNEL

log = logging.getLogger(__name__)


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
        self._conn: db.AsyncConn | None = None

    async def run(self) -> None:
        """Listen until cancelled, reconnecting after any failure."""
        failures = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
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
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.close(), timeout=1.0)
