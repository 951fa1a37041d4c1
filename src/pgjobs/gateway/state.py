"""What one gateway process holds while it runs: a pool, one LISTEN connection, the
fan-out to its event streams and the one reader of rung jobs' events behind it, the
stream caps, and the check that ends the streams of revoked tokens. Started and stopped
by the app's lifespan (``pgjobs.gateway.app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from psycopg_pool import AsyncConnectionPool

from pgjobs import db, metrics
from pgjobs.client import Client
from pgjobs.errors import NotMigratedError
from pgjobs.events import EVENTS_CHANNEL
from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.gateway.companystream import CompanyFeeds
from pgjobs.gateway.fanout import Fanout
from pgjobs.gateway.jobreader import JobEventReader
from pgjobs.gateway.limits import StreamSlots
from pgjobs.gateway.revocation import Revocations
from pgjobs.gateway.settings import GatewaySettings
from pgjobs.notifier import Listener
from pgjobs.queries import QUERIES
from pgjobs.storage import Storage

log = logging.getLogger(__name__)

LISTENER_NAME = "pgjobs-gateway-listener"
POOL_NAME = "pgjobs-gateway"


LISTEN_ADVICE = (
    "job and company streams need LISTEN to follow jobs live: set PGJOBS_LISTEN_DSN to a "
    "direct connection to PostgreSQL (the pool may stay on PgBouncer's transaction mode)"
)


async def check_schema(conn: db.AsyncConn) -> None:
    """Raise NotMigratedError unless the database has pgjobs' schema, the gateway's tables
    included, and SchemaBehindError where it lacks a migration (db.ensure_migrated)."""
    await db.ensure_migrated(conn)
    row = await (await conn.execute(GATEWAY_QUERIES["gateway_check_ready"])).fetchone()
    if not row or not row["migrated"]:
        raise NotMigratedError()


async def check_database(dsn: str) -> None:
    """Before serving: the database answers and is migrated, or the error that says which
    (DatabaseUnavailableError, NotMigratedError, SchemaBehindError), on one connection
    that is then closed."""
    async with await db.connect(dsn) as conn:
        await check_schema(conn)


class GatewayState:
    def __init__(
        self,
        dsn: str,
        settings: GatewaySettings,
        storage: Storage,
        *,
        listen_dsn: str | None = None,
    ) -> None:
        """listen_dsn: where the LISTEN connection goes (default: PGJOBS_LISTEN_DSN, else
        ``dsn``, the pool's)."""
        self.dsn = dsn
        self.listen_dsn = listen_dsn or db.listen_dsn(dsn)
        self.settings = settings
        self.storage = storage
        self.slots = StreamSlots(settings.max_streams, settings.max_streams_per_company)
        self.fanout = Fanout(settings.subscriber_queue_size)
        self.listener = Listener(
            self.listen_dsn,
            self.fanout.on_notify,
            on_connect=self.fanout.on_connect,
            heartbeat_seconds=settings.listener_heartbeat_seconds,
            name=LISTENER_NAME,
            when_unavailable=LISTEN_ADVICE,
        )
        self.lag = metrics.LagSampler(GATEWAY_QUERIES["job_events_age_by_keys"])
        self.fanout.on_received = self.lag.received
        self.exposition = metrics.Exposition(
            metrics.StateCollector(
                "gateway",
                lambda: self._pool,
                lambda: {EVENTS_CHANNEL: self.listener.connected.is_set()},
                metrics.QueueDepth(QUERIES["job_queue_depth_by_type"]),
                extra=lambda: [
                    metrics.sse_subscribers(
                        self.fanout.job_subscribers, self.fanout.company_subscribers
                    )
                ],
            )
        )
        self.company_feeds = CompanyFeeds(self)
        self.revocations = Revocations(self)
        self.job_reader = JobEventReader(self)
        # Stream set-ups reading the database at once (pgjobs.gateway.sse.setup_read).
        self.stream_setups = asyncio.Semaphore(max(1, settings.pool_size // 2))
        self._pool: AsyncConnectionPool[db.AsyncConn] | None = None
        self._client: Client | None = None
        self._listener_task: asyncio.Task[None] | None = None
        self._revocation_task: asyncio.Task[None] | None = None
        self._reader_task: asyncio.Task[None] | None = None

    @property
    def pool(self) -> AsyncConnectionPool[db.AsyncConn]:
        if self._pool is None:
            raise RuntimeError("the gateway is not started")
        return self._pool

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("the gateway is not started")
        return self._client

    async def start(self) -> None:
        # Bounded waiting: a request that cannot get a connection soon is answered 503 +
        # Retry-After instead of queueing without limit behind a slow database.
        pool = await db.open_pool(
            self.dsn,
            max_size=self.settings.pool_size,
            name=POOL_NAME,
            checkout_timeout=self.settings.pool_timeout_seconds,
            max_waiting=self.settings.pool_max_waiting,
        )
        try:
            async with pool.connection() as conn:
                await check_schema(conn)
                await db.warn_unless_read_committed(conn, "gateway")
        except BaseException:
            await pool.close()
            raise
        self._pool = pool
        self._client = Client(pool)
        self._listener_task = asyncio.create_task(self.listener.run(), name=LISTENER_NAME)
        self._revocation_task = asyncio.create_task(
            self.revocations.run(), name="pgjobs-gateway-revocations"
        )
        self._reader_task = asyncio.create_task(
            self.job_reader.run(), name="pgjobs-gateway-job-reader"
        )

    async def render_metrics(self) -> bytes:
        """``/metrics``: the lag samples since the last scrape observed, then every family."""
        if self._pool is not None:
            await self.lag.observe(self._pool)
        return await self.exposition.render(self._pool)

    def end_streams(self) -> None:
        """Tell every event stream to end (the server is shutting down); streams that
        start afterwards end at once."""
        self.fanout.close()
        self.company_feeds.close()

    async def stop(self) -> None:
        self.end_streams()
        for task in (self._listener_task, self._revocation_task, self._reader_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener_task = self._revocation_task = self._reader_task = None
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()
