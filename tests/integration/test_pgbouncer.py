"""Producers and workers through PgBouncer in transaction pooling mode (issue 17).

Each transaction may run on another server connection: a statement psycopg prepared on
one is missing on the next, and a LISTEN stays behind on a server connection the client
no longer holds. ``hold_other_server`` makes the switch happen for sure, by keeping the
server connection a client just used busy in another client's transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from bouncer import Bouncer
from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db, demo
from pgjobs import worker as worker_module
from pgjobs.client import Client
from pgjobs.errors import ConfigurationError
from pgjobs.jobspec import JobSpec
from pgjobs.notifier import Listener, ListenUndeliveredError
from pgjobs.sync import SyncClient
from pgjobs.worker import Worker

ROUNDS = 12


@contextlib.contextmanager
def hold_other_server(bouncer_dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A client whose ``execute`` opens a transaction that holds a server connection
    until ``commit``: meanwhile the bouncer gives everyone else another one."""
    with psycopg.connect(bouncer_dsn, prepare_threshold=None) as other:
        yield other


def specs(n: int, job_type: str = "echo") -> list[JobSpec]:
    return [JobSpec(company_id="acme", job_type=job_type, input={"n": i}) for i in range(n)]


def all_done(dsn: str, ids: list[uuid.UUID]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        rows = await fetch(
            dsn,
            "SELECT count(*) AS n FROM pgjobs.jobs WHERE id = ANY(%s) AND status = 'done'",
            [ids],
        )
        return int(rows[0]["n"]) == len(ids)

    return check


def test_prepared_statements_setting() -> None:
    assert db.prepare_threshold(False) == db.PREPARE_THRESHOLD
    assert db.prepare_threshold(True) is None


def test_prepared_statements_setting_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", "on")
    assert db.prepare_threshold(True) == db.PREPARE_THRESHOLD
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", "off")
    assert db.prepare_threshold(False) is None
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", "sometimes")
    with pytest.raises(ConfigurationError, match="PGJOBS_PREPARED_STATEMENTS"):
        db.prepare_threshold(False)


async def test_a_pooler_is_told_apart_from_a_direct_connection(
    dsn: str, pgbouncer: Bouncer
) -> None:
    async with await db.connect(dsn) as direct:
        assert not await db.behind_pooler(direct)
        assert direct.prepare_threshold == db.PREPARE_THRESHOLD
    async with await db.connect(pgbouncer.dsn(dsn)) as pooled:
        assert await db.behind_pooler(pooled)
        assert pooled.prepare_threshold is None


async def test_async_client_through_pgbouncer_across_server_connections(
    dsn: str, pgbouncer: Bouncer
) -> None:
    """The same statements, again and again, each time possibly on another server
    connection: with prepared statements on, psycopg prepares them after five runs and the
    next run on another server connection fails (prepared statement does not exist)."""
    bouncer_dsn = pgbouncer.dsn(dsn)
    async with await Client.connect(bouncer_dsn, max_size=1) as client:
        with hold_other_server(bouncer_dsn) as other:
            for i in range(ROUNDS):
                if i % 2:
                    other.execute("SELECT 1")
                [job] = await client.enqueue_many(specs(1))
                assert (await client.get("acme", job.id)).status.value == "queued"
                other.commit()
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs")
    assert rows[0]["n"] == ROUNDS


def test_sync_client_through_pgbouncer_across_server_connections(
    dsn: str, pgbouncer: Bouncer
) -> None:
    bouncer_dsn = pgbouncer.dsn(dsn)
    # Its pool hands out its (at least four) connections in turn: each one runs the
    # statements a quarter of the time, so four times the rounds to reach preparing them.
    with SyncClient(bouncer_dsn) as client, hold_other_server(bouncer_dsn) as other:
        for i in range(4 * ROUNDS):
            if i % 2:
                other.execute("SELECT 1")
            [job] = client.enqueue_many(specs(1))
            assert client.get("acme", job.id).status.value == "queued"
            other.commit()


async def test_worker_through_pgbouncer_listens_on_the_listen_dsn(
    dsn: str, pgbouncer: Bouncer, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Claims and completions through the bouncer, LISTEN on PGJOBS_LISTEN_DSN (direct):
    with a poll interval far beyond the deadline, only a NOTIFY can make the worker claim
    the jobs enqueued while it idles."""
    bouncer_dsn = pgbouncer.dsn(dsn)
    monkeypatch.setenv("PGJOBS_LISTEN_DSN", dsn)
    settings = fast_settings(storage_dir, poll_interval_seconds=600.0, concurrency=4)
    async with (
        running_worker(bouncer_dsn, demo.registry, settings) as worker,
        await Client.connect(bouncer_dsn) as client,
    ):
        assert worker.listener is not None
        assert worker.listener.dsn == dsn
        # The worker looked once at start and found nothing: it now waits for a NOTIFY.
        await wait_until(lambda: _idle(worker), message="worker idle")
        ids = [job.id for job in await client.enqueue_many(specs(30))]
        await wait_until(all_done(dsn, ids), within=60, message="jobs done")
        assert worker.listener.unavailable is None


async def test_worker_through_pgbouncer_without_listen_dsn_polls(
    dsn: str,
    pgbouncer: Bouncer,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No LISTEN DSN: LISTEN through the bouncer would never deliver. The worker says so
    once, at WARNING, names its poll interval and PGJOBS_LISTEN_DSN, and drains by polling."""
    monkeypatch.delenv("PGJOBS_LISTEN_DSN", raising=False)
    # No NOTIFY comes through the bouncer: a delivery check of 0.5 s finds that out as
    # surely as the default 5 s one.
    monkeypatch.setattr(worker_module, "Listener", functools.partial(Listener, probe_seconds=0.5))
    bouncer_dsn = pgbouncer.dsn(dsn)
    settings = fast_settings(storage_dir, poll_interval_seconds=0.2, concurrency=4)
    caplog.set_level(logging.WARNING, logger="pgjobs.notifier")
    worker = Worker(bouncer_dsn, demo.registry, settings)
    task = asyncio.create_task(worker.run())
    try:
        async with await Client.connect(bouncer_dsn) as client:
            ids = [job.id for job in await client.enqueue_many(specs(20))]
            await wait_until(all_done(dsn, ids), within=60, message="jobs done")
        assert worker.listener is not None
        await wait_until(
            lambda: _true(worker.listener is not None and worker.listener.unavailable is not None),
            within=30,
            message="listener found unavailable",
        )
        assert not worker.listener.connected.is_set()
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=30)
    # Once, whatever else a loaded machine makes the listener log (a slow heartbeat).
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgjobs.notifier" and "receives no notifications" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    assert "receives no notifications" in warnings[0]
    assert "polling for jobs every 0.2s (PGJOBS_POLL_INTERVAL_SECONDS)" in warnings[0]
    assert "PGJOBS_LISTEN_DSN" in warnings[0]


async def test_undeliverable_listen_is_rechecked_and_reported_once(
    dsn: str, pgbouncer: Bouncer, caplog: pytest.LogCaptureFixture
) -> None:
    """The listener checks again (a fixed DSN behind it would then work) without a new
    warning each time, and holds no connection in between."""
    caplog.set_level(logging.WARNING, logger="pgjobs.notifier")
    listener = Listener(
        pgbouncer.dsn(dsn),
        lambda _: None,
        probe_seconds=0.5,
        recheck_seconds=0.05,
        when_unavailable="advice",
    )
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(
            lambda: _true(listener.undelivered_checks >= 3), within=60, message="3 checks"
        )
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    messages = [r.getMessage() for r in caplog.records if r.name == "pgjobs.notifier"]
    assert len(messages) == 1, messages
    assert messages[0].endswith("; advice")
    assert listener.unavailable is not None


async def test_a_stray_notification_during_the_delivery_check_proves_nothing(
    dsn: str, pgbouncer: Bouncer
) -> None:
    """Through the bouncer a notification of the listener's own channel can reach it once
    by chance: sent on the server connection that runs one of its statements (here its
    own LISTEN and NOTIFY in one statement; in the worker, a job enqueued as the listener
    connects). The check hands it on but still finds LISTEN undeliverable: it counted as
    proof once, and a worker behind PgBouncer then went on waiting for notifications that
    never came (the likely cause of a flake of
    test_worker_through_pgbouncer_without_listen_dsn_polls)."""
    handed_on: list[str] = []
    listener = Listener(
        pgbouncer.dsn(dsn), handed_on.append, channel="pgjobs_work", probe_seconds=0.5
    )
    async with await db.connect(pgbouncer.dsn(dsn)) as conn:
        assert await db.behind_pooler(conn)
        # One statement, so one server connection: the notification comes back to conn
        # with the statement's result, and psycopg keeps it for conn.notifies().
        await conn.execute("LISTEN pgjobs_work; NOTIFY pgjobs_work, 'stray'")
        with pytest.raises(ListenUndeliveredError, match="receives no notifications"):
            await listener._check_delivery(conn)
    assert handed_on == ["stray"]


async def test_a_cancel_as_the_listener_lets_go_of_its_connection_ends_it(
    dsn: str, pgbouncer: Bouncer
) -> None:
    """Cancelled just as it closes the connection that received nothing, the listener
    ends. On Python 3.11 ``asyncio.wait_for`` around the close returned normally when the
    close finished in the same loop turn as the cancel: the listener then went on
    rechecking, and the test above waited on it for its whole 120 s timeout."""
    listener = Listener(pgbouncer.dsn(dsn), lambda _: None, probe_seconds=0.5, recheck_seconds=0.05)
    close = listener._close
    cancels = 0

    async def close_when_cancelled() -> None:
        nonlocal cancels
        if cancels == 0:  # the first close: the check that received nothing
            cancels += 1
            task.cancel()
        await close()

    listener._close = close_when_cancelled  # type: ignore[method-assign]
    task = asyncio.create_task(listener.run())
    ended, _ = await asyncio.wait({task}, timeout=30)
    if not ended:
        task.cancel()  # cancelled again, it ends: the first cancel was lost
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert ended, f"ran on after it was cancelled ({listener.undelivered_checks} checks)"
    assert task.cancelled()
    assert listener.undelivered_checks == 1


async def test_direct_listener_skips_the_delivery_check(dsn: str) -> None:
    """A direct connection is never probed: no timing can make it look broken."""
    got: list[str] = []
    listener = Listener(dsn, got.append, probe_seconds=0.0)
    task = asyncio.create_task(listener.run())
    try:
        await asyncio.wait_for(listener.connected.wait(), timeout=20)
        assert listener.undelivered_checks == 0
        async with await db.connect(dsn) as conn:
            await conn.execute("SELECT pg_notify(%s, 'hello')", [listener.channel])
        await wait_until(lambda: _true(got == ["hello"]), message="notify delivered")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _idle(worker: Worker) -> bool:
    return worker._queue_empty and not worker._claims


async def _true(value: bool) -> bool:
    return value


async def test_a_worker_pool_sets_no_plan_mode_through_a_pooler(
    dsn: str, pgbouncer: Bouncer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's pool forces generic plans on a direct connection (db.plans_generic),
    a session setting: through transaction pooling it would stay on the server connection
    for whichever client gets it next, so it is not set there, not even with prepared
    statements on. PgBouncer hands the server connection just released out again
    (server_round_robin off), so a setting made at connect would show here."""
    monkeypatch.setenv("PGJOBS_PREPARED_STATEMENTS", "on")
    async with (
        await db.open_pool(pgbouncer.dsn(dsn), max_size=1, generic_plans=True) as pool,
        pool.connection() as conn,
    ):
        row = await (await conn.execute("SHOW plan_cache_mode")).fetchone()
    assert row is not None
    assert row["plan_cache_mode"] == "auto"
