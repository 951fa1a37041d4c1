"""The LISTEN connection under network faults: half-open sockets and outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import psycopg
import pytest
from psycopg_pool import PoolTimeout, TooManyRequests

from helpers import (
    assert_each_job_done_once,
    assert_histories_valid,
    claim_one,
    fast_settings,
    fetch,
    running_worker,
    wait_until,
)
from pgjobs import db, demo
from pgjobs.client import Client
from pgjobs.errors import ConfigurationError, DatabaseUnavailableError
from pgjobs.jobspec import JobSpec
from pgjobs.notifier import Listener
from pgjobs.txcomplete import TransactionalCompletion
from pgjobs.types import Job
from proxy import proxied


async def _notify(dsn: str, payload: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT pg_notify('pgjobs_events', %s)", [payload])


async def test_half_open_listener_is_detected_by_heartbeat_and_replaced(dsn: str) -> None:
    received: list[str] = []
    connects = 0

    async def on_connect() -> None:
        nonlocal connects
        connects += 1

    async with proxied(dsn) as proxy:
        listener = Listener(
            proxy.dsn,
            received.append,
            on_connect=on_connect,
            heartbeat_seconds=0.5,
            max_backoff_seconds=0.5,
        )
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            await _notify(dsn, "before")
            await wait_until(lambda: _has(received, "before"), within=20, message="first notify")

            proxy.freeze_existing()  # packets to and from the listener vanish; no RST, no FIN
            frozen_at = time.monotonic()
            await _notify(dsn, "lost-in-the-void")
            await wait_until(lambda: _ge(connects, 2), within=10, message="listener reconnected")
            detected_after = time.monotonic() - frozen_at
            # The reconnect hook is where callers re-read the tables; after it, NOTIFY works.
            await _notify(dsn, "after")
            await wait_until(lambda: _has(received, "after"), within=20, message="notify after")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert detected_after < 3.0, f"half-open socket noticed after {detected_after:.1f}s"
    assert "lost-in-the-void" not in received, "a NOTIFY sent while half-open is gone..."
    assert connects == 2, "...which is why on_connect ran again, to catch up from the tables"


async def test_listener_rides_out_an_outage(dsn: str) -> None:
    received: list[str] = []
    async with proxied(dsn) as proxy:
        listener = Listener(
            proxy.dsn, received.append, heartbeat_seconds=0.5, max_backoff_seconds=0.3
        )
        task = asyncio.create_task(listener.run())
        try:
            await asyncio.wait_for(listener.connected.wait(), 10)
            proxy.cut()
            await wait_until(
                lambda: _async(not listener.connected.is_set()),
                within=20,
                message="listener notices the outage",
            )
            await asyncio.sleep(1.0)  # several failed reconnect attempts
            assert not listener.connected.is_set()
            proxy.restore()
            await asyncio.wait_for(listener.connected.wait(), 10)
            await _notify(dsn, "back")
            await wait_until(lambda: _has(received, "back"), within=20, message="notify after")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _has(items: list[str], value: str) -> bool:
    return value in items


async def _ge(value: int, minimum: int) -> bool:
    return value >= minimum


async def _async(value: bool) -> bool:
    return value


async def test_worker_survives_a_network_outage(dsn: str, storage_dir: Path) -> None:
    """Every connection cut and refused for a few seconds mid-run (longer than the lease):
    the worker keeps retrying, comes back, and every job ends exactly once."""
    client = await Client.connect(dsn)
    try:
        jobs = await client.enqueue_many(
            JobSpec("acme", "sleep", {"seconds": 0.2}) for _ in range(60)
        )
        async with proxied(dsn) as proxy:
            settings = fast_settings(storage_dir, concurrency=10)
            async with running_worker(proxy.dsn, demo.registry, settings):
                await wait_until(lambda: _done_at_least(dsn, 10), within=30, message="some done")
                proxy.cut()
                await asyncio.sleep(3.0)  # > the 2 s lease: leases expire meanwhile
                proxy.restore()
                await wait_until(
                    lambda: _done_at_least(dsn, 60), within=60, message="all done after the outage"
                )
    finally:
        await client.close()
    await assert_each_job_done_once(dsn, len(jobs))
    assert await assert_histories_valid(dsn) == len(jobs)


async def _done_at_least(dsn: str, expected: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
    return int(rows[0]["n"]) >= expected


async def test_worker_survives_half_open_pool_connections(dsn: str, storage_dir: Path) -> None:
    """Every connection the worker holds goes silent mid-run (half-open: no FIN, no RST,
    the proxy's kernel still ACKs). Its queries would wait forever; the pool's use limit
    (pgjobs.db.GuardedPool) gives up on them, new connections work, and the same worker
    process finishes every job, each exactly once."""
    client = await Client.connect(dsn)
    try:
        jobs = await client.enqueue_many(
            JobSpec("acme", "sleep", {"seconds": 0.2}) for _ in range(60)
        )
        async with proxied(dsn) as proxy:
            # No rescuer elsewhere: only this worker can finish the jobs.
            settings = fast_settings(storage_dir, concurrency=10, db_use_timeout_seconds=1.0)
            async with running_worker(proxy.dsn, demo.registry, settings):
                await wait_until(lambda: _done_at_least(dsn, 10), within=30, message="some done")
                proxy.freeze_existing()
                await wait_until(
                    lambda: _done_at_least(dsn, 60),
                    within=90,
                    message="all done after the connections went half-open",
                )
    finally:
        await client.close()
    await assert_each_job_done_once(dsn, len(jobs))
    assert await assert_histories_valid(dsn) == len(jobs)


@pytest.mark.parametrize("left_in", ["conn.transaction()", "the pool's reset"])
async def test_checkout_stuck_past_its_use_limit_on_a_half_open_socket_is_shut_down(
    dsn: str, monkeypatch: pytest.MonkeyPatch, left_in: str
) -> None:
    """A body cancelled at its use limit while idle in a transaction leaves a ROLLBACK to
    send: by ``conn.transaction()`` on the way out, or by the pool when the connection
    comes back in a transaction. On a half-open socket that ROLLBACK waits forever (a
    worker's heartbeat, claims and completions stuck behind it, for good). Past the
    limit and ``USE_GRACE_SECONDS``, the pool shuts the socket down: the checkout fails
    as on a dropped connection, and the pool serves again on a new one."""
    monkeypatch.setattr(db, "USE_GRACE_SECONDS", 2.0)
    async with proxied(dsn) as proxy:
        pool = await db.open_pool(proxy.dsn, max_size=1, use_timeout=1.0)
        try:
            idle_in_transaction = asyncio.Event()

            async def use() -> None:
                async with pool.connection() as conn:
                    if left_in == "conn.transaction()":
                        async with conn.transaction():
                            await conn.execute("SELECT 1")
                            idle_in_transaction.set()
                            await asyncio.sleep(60)  # anything but the socket
                    else:
                        await conn.execute("BEGIN")
                        idle_in_transaction.set()
                        await asyncio.sleep(60)

            task = asyncio.create_task(use())
            await idle_in_transaction.wait()
            proxy.freeze_existing()
            started = time.monotonic()
            done, _ = await asyncio.wait([task], timeout=30)
            assert done, "the checkout still waits on its half-open socket"
            assert isinstance(task.exception(), (TimeoutError, psycopg.OperationalError))
            assert time.monotonic() - started < 20
            async with pool.connection() as conn:
                assert await (await conn.execute("SELECT 1 AS one")).fetchone() == {"one": 1}
        finally:
            await pool.close()


async def test_a_handler_transaction_cancelled_on_a_half_open_socket_ends(
    dsn: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler's ``ctx.transaction()`` has no use limit (its length is the handler's),
    but once it is cancelled (the job's deadline) while idle in the transaction, its
    ROLLBACK on a half-open socket gets USE_GRACE_SECONDS, then the socket is shut down:
    the attempt ends (before, it waited forever, its lease renewed by every heartbeat)."""
    monkeypatch.setattr(db, "USE_GRACE_SECONDS", 2.0)
    await client.enqueue("acme", "echo")
    job = Job.from_row(await claim_one(dsn, "w0"))
    async with proxied(dsn) as proxy:
        pool = await db.open_pool(proxy.dsn, max_size=1, use_timeout=1.0)
        try:
            inside = asyncio.Event()

            async def handler() -> None:
                completion = TransactionalCompletion(job, pool, proxy.dsn)
                async with completion.transaction() as conn:
                    await conn.execute("SELECT 1")
                    inside.set()
                    await asyncio.sleep(60)  # the handler's own work, in its transaction

            task = asyncio.create_task(handler())
            await inside.wait()
            proxy.freeze_existing()
            task.cancel()  # the job's deadline
            done, _ = await asyncio.wait([task], timeout=30)
            assert done, "the cancelled attempt still waits on its half-open socket"
        finally:
            await pool.close()


async def test_checkout_check_of_a_half_open_socket_with_bytes_to_read_gives_up(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An idle pooled connection with something to read is checked with a round trip on
    checkout (db.check_if_suspect), outside any use limit. Half-open after the first byte
    of a message (the rest never comes), that check waited forever; it gives up after
    CHECK_TIMEOUT_SECONDS, and the pool hands out a new connection instead."""
    monkeypatch.setattr(db, "CHECK_TIMEOUT_SECONDS", 1.0)
    async with proxied(dsn) as proxy:
        pool = await db.open_pool(proxy.dsn, min_size=1, max_size=1, checkout_timeout=30)
        try:
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            proxy.freeze_existing()
            # The pool's connection (the first was open_pool's probe): a NoticeResponse's
            # first byte, and no more.
            proxy.to_clients[-1].write(b"N")
            await proxy.to_clients[-1].drain()
            async with asyncio.timeout(20), pool.connection() as conn:
                assert await (await conn.execute("SELECT 1 AS one")).fetchone() == {"one": 1}
        finally:
            await pool.close()


async def _serves(pool: db.GuardedPool) -> bool:
    """Whether a checkout from ``pool`` runs a query now (a checkout that times out, a
    connection lost or past its use limit: not yet)."""
    with contextlib.suppress(TimeoutError, psycopg.OperationalError, TooManyRequests):
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")
            return True
    return False


async def test_pool_check_passes_half_open_idle_connections(dsn: str) -> None:
    """psycopg_pool's ``check()`` takes every idle connection out of the pool and checks
    each with a round trip, without a time limit; GuardedPool.reconnect_failed runs it,
    in one of the pool's maintenance workers, after a round of failed reconnection
    attempts. With a half-open idle connection (a cut network, a NAT that forgot the
    connection) it waited forever: the other idle connections stayed out of the pool,
    and each later outage stuck another worker, until the pool had none left to add a
    connection and every checkout timed out for good (a worker of the chaos run, after
    its half-open cut and the outage: PoolTimeout for 300 s). The pool's check is now
    db.check_if_suspect, bounded, and the pool serves again."""
    async with proxied(dsn) as proxy:
        pool = await db.open_pool(
            proxy.dsn, min_size=3, max_size=3, checkout_timeout=5, use_timeout=1.0
        )
        try:
            await pool.wait()
            proxy.freeze_existing()
            async with asyncio.timeout(15):
                await pool.check()
            assert pool.get_stats()["pool_available"] == 3  # none held back

            # Each frozen connection fails its first use (the use limit) and is replaced.
            await wait_until(
                lambda: _serves(pool), within=60, message="a checkout served after the check"
            )
        finally:
            await pool.close()


async def test_pool_connection_attempts_give_up_on_a_silent_server(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that accepts the TCP connection and never answers (a half-open proxy or
    load balancer): the pool's own connection attempts end after open_pool's
    connect_timeout, not psycopg's default 130 s, during which the attempt held one of
    the pool's three maintenance workers and the pool could not grow."""
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    async with proxied(dsn) as proxy:
        pool = await db.open_pool(proxy.dsn, max_size=1, connect_timeout=2.0)
        try:
            proxy.silent = True
            proxy.freeze_existing()
            started = time.monotonic()
            await pool.check()  # no round trip: the frozen socket has nothing to read
            with contextlib.suppress(TimeoutError, psycopg.OperationalError):
                async with pool.connection(timeout=1) as conn:
                    conn.pgconn.finish()  # gone: the pool connects again, to silence
                    raise psycopg.OperationalError("dropped")

            async def gave_up() -> bool:
                return any("error connecting" in r.getMessage() for r in caplog.records)

            await wait_until(gave_up, within=30, message="the attempt on silence ended")
            assert time.monotonic() - started < 20
        finally:
            await pool.close()


async def test_a_listeners_connection_gives_up_on_a_silent_server(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """db.connect (the listeners', the commands') on a server that accepts and never
    answers fails after CONNECT_TIMEOUT_SECONDS, where psycopg's default would wait 130 s
    before the listener tried again."""
    monkeypatch.setattr(db, "CONNECT_TIMEOUT_SECONDS", 2.0)
    async with proxied(dsn) as proxy:
        proxy.silent = True
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailableError):
            await db.connect(proxy.dsn)
        assert time.monotonic() - started < 15


async def test_pool_serves_again_after_an_outage_longer_than_its_reconnect_timeout(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The gateway's pool shape (bounded waiting) through an outage that outlasts the
    pool's reconnect_timeout, with requests timing out meanwhile: psycopg_pool gives its
    connections up, and those timed-out requests stay queued until a connection is handed
    out, so every later request was refused before it could grow the pool, forever.
    pgjobs.db.GuardedPool starts reconnecting again instead: once the server is back,
    requests are served, with no restart."""
    caplog.set_level(logging.WARNING, logger="psycopg.pool")
    async with proxied(dsn) as proxy:
        pool = await db.open_pool(
            proxy.dsn, max_size=2, checkout_timeout=0.2, max_waiting=2, reconnect_timeout=1.0
        )
        try:
            proxy.cut()

            async def gave_up() -> bool:
                # Requests keep arriving and timing out, as browsers and feeds do.
                with contextlib.suppress(PoolTimeout, TooManyRequests):
                    async with pool.connection():
                        pass
                return any("failed after" in r.getMessage() for r in caplog.records)

            await wait_until(gave_up, within=60, message="the pool gave its connections up")
            proxy.restore()

            await wait_until(
                lambda: _serves(pool), within=60, message="a request served after the outage"
            )
        finally:
            await pool.close()


async def test_pool_reconnect_round_comes_from_the_environment(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PGJOBS_DB_RECONNECT_SECONDS sets every pool's round of reconnection attempts
    (the reduced chaos run outlasts a short one); unset, it is RECONNECT_TIMEOUT_SECONDS;
    an explicit argument wins."""
    for env, argument, expected in (
        (None, None, db.RECONNECT_TIMEOUT_SECONDS),
        ("4.5", None, 4.5),
        ("4.5", 2.0, 2.0),
    ):
        if env is None:
            monkeypatch.delenv("PGJOBS_DB_RECONNECT_SECONDS", raising=False)
        else:
            monkeypatch.setenv("PGJOBS_DB_RECONNECT_SECONDS", env)
        pool = await db.open_pool(dsn, max_size=1, reconnect_timeout=argument)
        try:
            assert pool.reconnect_timeout == expected
        finally:
            await pool.close()
    monkeypatch.setenv("PGJOBS_DB_RECONNECT_SECONDS", "0.5")
    with pytest.raises(ConfigurationError, match="PGJOBS_DB_RECONNECT_SECONDS"):
        await db.open_pool(dsn, max_size=1)
