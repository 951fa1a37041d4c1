"""Migrations apply, roll back and apply again, and the publish trigger works at each
step (0003 replaced 0001's trigger functions; its rollback restores them)."""

from __future__ import annotations

import json

import psycopg
from yoyo import read_migrations

from pgjobs import migrate
from pgjobs.client import Client


async def _enqueue_notifies(dsn: str) -> dict[str, object]:
    """Enqueue one job; return its NOTIFY item (and check its audit row exists)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("LISTEN pgjobs_events")
        async with await Client.connect(dsn) as client:
            job = await client.enqueue("acme", "echo")
            events = await client.events("acme", job.id)
        payloads = [n.payload async for n in conn.notifies(timeout=1.0)]
    assert [e.type.value for e in events] == ["content_job.queued"]
    (item,) = json.loads(payloads[0])["events"]
    assert item["jobId"] == str(job.id)
    return dict(item)


async def test_latest_migration_rolls_back_and_applies_again(empty_dsn: str) -> None:
    assert migrate.apply(empty_dsn)[-1] == "0003_fast_publish"
    assert "runAt" not in await _enqueue_notifies(empty_dsn)  # 0003: no null keys

    backend = migrate._backend(empty_dsn)
    try:
        migrations = read_migrations(str(migrate.migrations_dir()))
        with backend.lock():
            latest = migrations.filter(lambda m: m.id == "0003_fast_publish")
            backend.rollback_migrations(backend.to_rollback(latest))
    finally:
        backend.connection.close()
    item = await _enqueue_notifies(empty_dsn)
    assert item["runAt"] is None  # 0001's trigger again: every key, null or not

    assert migrate.apply(empty_dsn) == ["0003_fast_publish"]
    assert "runAt" not in await _enqueue_notifies(empty_dsn)
