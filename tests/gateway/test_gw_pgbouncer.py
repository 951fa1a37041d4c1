"""The gateway behind PgBouncer in transaction pooling mode (issue 17): its pool goes
through the bouncer; its LISTEN connection needs PGJOBS_LISTEN_DSN, and without it
/readyz says so instead of the streams silently never moving."""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

import pytest
from gateway_helpers import TEST_SETTINGS, Sse, collect, serve_gateway

from bouncer import Bouncer
from helpers import fast_settings, running_worker, wait_until
from pgjobs import demo
from pgjobs.gateway import state
from pgjobs.notifier import Listener

JOBS = "/api/companies/acme/content-jobs"


async def test_job_stream_from_queued_to_done_with_the_pool_on_pgbouncer(
    dsn: str, pgbouncer: Bouncer, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bouncer_dsn = pgbouncer.dsn(dsn)
    monkeypatch.setenv("PGJOBS_LISTEN_DSN", dsn)
    async with serve_gateway(bouncer_dsn, storage_dir, TEST_SETTINGS) as gateway:
        assert gateway.state.pool.kwargs["prepare_threshold"] is None
        assert gateway.state.listener.dsn == dsn
        async with gateway.http() as http:
            r = await http.post(JOBS, json={"jobType": "sleep", "input": {"seconds": 0.3}})
            assert r.status_code == 202, r.text
            job_id = r.json()["jobId"]
            ready = await http.get("/readyz")
        assert ready.status_code == 200, ready.text
        subscribed = asyncio.Event()

        async def first_event(event: Sse) -> None:
            subscribed.set()

        stream = asyncio.create_task(
            collect(gateway, f"{JOBS}/{job_id}/events", on_event=first_event, within=60)
        )
        # The worker starts only once the stream has said "queued": every later event
        # reaches the stream live, through the LISTEN connection.
        await asyncio.wait_for(subscribed.wait(), timeout=30)
        worker_settings = fast_settings(storage_dir, poll_interval_seconds=600.0)
        async with running_worker(bouncer_dsn, demo.registry, worker_settings):
            events = await stream
    assert events[0].data["status"] == "queued"
    assert events[-1].data["type"] == "content_job.done"
    assert events[-1].data["status"] == "done"
    seqs = [int(e.id or 0) for e in events]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


async def test_readyz_says_listen_needs_a_direct_dsn(
    dsn: str,
    pgbouncer: Bouncer,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.delenv("PGJOBS_LISTEN_DSN", raising=False)
    # No NOTIFY comes through the bouncer: a delivery check of 0.5 s finds that out as
    # surely as the default 5 s one.
    monkeypatch.setattr(state, "Listener", functools.partial(Listener, probe_seconds=0.5))
    caplog.set_level(logging.WARNING, logger="pgjobs.notifier")
    bouncer_dsn = pgbouncer.dsn(dsn)
    async with (
        serve_gateway(bouncer_dsn, storage_dir, TEST_SETTINGS, wait_for_listener=False) as gw,
        gw.http(None) as http,
    ):

        async def unavailable() -> bool:
            return gw.state.listener.unavailable is not None

        await wait_until(unavailable, within=30, message="listener found unavailable")
        r = await http.get("/readyz")
        # Requests that need no LISTEN still work through the bouncer.
        assert (await http.get(JOBS, headers=gw.headers())).status_code == 200
    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["database"] == "ok"
    assert checks["listener"].startswith("unavailable: LISTEN through")
    assert "set PGJOBS_LISTEN_DSN" in checks["listener"]
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "pgjobs.notifier"]
    assert len(warnings) == 1, warnings
    assert "set PGJOBS_LISTEN_DSN" in warnings[0]
