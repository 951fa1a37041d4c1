"""A job's life through a real worker: its states, its audit rows and their order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers import assert_histories_valid, fast_settings, fetch, running_worker, wait_until
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.context import JobContext
from pgjobs.registry import Registry
from pgjobs.types import EventType, JobStatus


async def test_lifecycle_events_in_order(dsn: str, client: Client, storage_dir: Path) -> None:
    job = await client.enqueue(
        "acme", "render", {"title": "t", "steps": 2, "step_seconds": 0.01}, source_task_id="task-9"
    )
    assert job.status is JobStatus.QUEUED
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        await wait_until(lambda: _is(client, job.id, JobStatus.DONE), message="job done")
    events = await client.events("acme", job.id)
    types = [e.type for e in events]
    assert types == [
        EventType.QUEUED,
        EventType.RUNNING,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.DONE,
    ]
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.status for e in events] == [
        JobStatus.QUEUED,
        *[JobStatus.RUNNING] * 4,
        JobStatus.DONE,
    ]
    assert events[-1].payload["resultAssetId"] == str(
        (await client.get("acme", job.id)).result_asset_id
    )
    done = await client.get("acme", job.id)
    assert done.attempts == 1
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.result == {"title": "t"}
    assert done.event_seq == len(events)


async def _is(client: Client, job_id: object, status: JobStatus) -> bool:
    return (await client.get("acme", job_id)).status is status  # type: ignore[arg-type]


async def test_sync_handler_runs_in_thread_and_reports_progress(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    job = await client.enqueue("acme", "sleep_sync", {"seconds": 0.05})
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        await wait_until(lambda: _is(client, job.id, JobStatus.DONE), message="job done")
    types = [e.type for e in await client.events("acme", job.id)]
    assert types == [EventType.QUEUED, EventType.RUNNING, EventType.PROGRESS, EventType.DONE]


async def test_idle_worker_wakes_on_notify_not_poll(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    # A poll interval far longer than the test: only the NOTIFY can start the job in time.
    settings = fast_settings(storage_dir, poll_interval_seconds=60.0)
    async with running_worker(dsn, demo.registry, settings):
        await asyncio.sleep(0.2)  # let the worker's first (empty) claim pass
        job = await client.enqueue("acme", "echo", {"x": 1})
        await wait_until(lambda: _is(client, job.id, JobStatus.DONE), within=10, message="job done")


async def test_priority_and_run_at_are_honoured(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    order: list[str] = []
    registry = Registry()

    @registry.handler("record")
    async def record(ctx: JobContext) -> None:
        order.append(ctx.input["name"])

    import datetime as dt

    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    await client.enqueue("acme", "record", {"name": "low"}, priority=0)
    await client.enqueue("acme", "record", {"name": "high"}, priority=10)
    future = await client.enqueue("acme", "record", {"name": "future"}, priority=99, run_at=later)
    async with running_worker(
        dsn, registry, fast_settings(storage_dir, concurrency=1), burst=True
    ) as worker:
        await wait_until(lambda: _async(len(order) == 2), message="two jobs")
    assert order == ["high", "low"]
    assert worker.jobs_started == 2
    assert (await client.get("acme", future.id)).status is JobStatus.QUEUED


async def _async(value: bool) -> bool:
    return value


async def test_workers_claim_only_their_registrys_types(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """Issue 14: two workers with different registries share one queue; each runs only
    the jobs it has a handler for, and a job of a third type stays queued (not failed
    with "unknown job type") and shows as served by no live worker."""
    ran: dict[str, list[str]] = {"alpha": [], "beta": []}
    registries = {"alpha": Registry(), "beta": Registry()}
    for job_type, registry in registries.items():

        async def handler(ctx: JobContext, job_type: str = job_type) -> None:
            ran[job_type].append(str(ctx.job_id))

        registry.register(job_type, handler)
    jobs = {
        job_type: [await client.enqueue("acme", job_type) for _ in range(5)]
        for job_type in ("alpha", "beta", "gamma")
    }

    async def all_done() -> bool:
        for job in jobs["alpha"] + jobs["beta"]:
            if (await client.get("acme", job.id)).status is not JobStatus.DONE:
                return False
        return True

    settings = fast_settings(storage_dir)
    async with (
        running_worker(dsn, registries["alpha"], settings, worker_id="wa") as wa,
        running_worker(dsn, registries["beta"], settings, worker_id="wb") as wb,
    ):
        assert (wa.job_types, wb.job_types) == (("alpha",), ("beta",))
        await wait_until(all_done, message="alpha and beta jobs done")
        served = await client.live_workers(["alpha", "beta", "gamma"], within_seconds=2.0)
        assert served == {"alpha": 1, "beta": 1, "gamma": 0}
        # Both workers keep polling; the gamma jobs are still untouched.
        for job in jobs["gamma"]:
            left = await client.get("acme", job.id)
            assert (left.status, left.attempts, left.error_message) == (JobStatus.QUEUED, 0, None)
    for job_type, worker_id in (("alpha", "wa"), ("beta", "wb")):
        assert sorted(ran[job_type]) == sorted(str(j.id) for j in jobs[job_type])
        for job in jobs[job_type]:
            done = await client.get("acme", job.id)
            assert (done.worker_id, done.attempts) == (worker_id, 1)
    rows = await fetch(dsn, "select id, job_types from pgjobs.workers")
    assert rows == [], "both workers deregistered"


async def test_cancel_running_job_stops_handler_and_discards_result(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    started = asyncio.Event()
    stopped = asyncio.Event()
    registry = Registry()

    @registry.handler("long")
    async def long(ctx: JobContext) -> str:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            stopped.set()
            raise
        return "finished"

    job = await client.enqueue("acme", "long")
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await asyncio.wait_for(started.wait(), 10)
        cancelled = await client.cancel("acme", job.id)
        assert cancelled.status is JobStatus.CANCELLED
        await asyncio.wait_for(stopped.wait(), 10)
    final = await client.get("acme", job.id)
    assert final.status is JobStatus.CANCELLED
    types = [e.type for e in await client.events("acme", job.id)]
    assert types == [EventType.QUEUED, EventType.RUNNING, EventType.CANCELLED]
    assert await assert_histories_valid(dsn) == 1


@pytest.mark.parametrize("concurrency", [1, 8])
async def test_many_jobs_in_process(
    dsn: str, client: Client, storage_dir: Path, concurrency: int
) -> None:
    from pgjobs.jobspec import JobSpec

    jobs = await client.enqueue_many(JobSpec("acme", "echo", {"n": n}) for n in range(200))
    async with running_worker(
        dsn, demo.registry, fast_settings(storage_dir, concurrency=concurrency), burst=True
    ):
        await wait_until(
            lambda: _count_status(dsn, "done", 200), within=60, message="all jobs done"
        )
    rows = await fetch(
        dsn, "SELECT result FROM pgjobs.jobs WHERE id = ANY(%s)", [[j.id for j in jobs]]
    )
    assert sorted(r["result"]["echo"]["n"] for r in rows) == list(range(200))
    assert await assert_histories_valid(dsn) == 200


async def _count_status(dsn: str, status: str, expected: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = %s", [status])
    return rows[0]["n"] == expected


async def test_worker_owning_its_process_tunes_the_collector(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    # `pgjobs worker` (tune_gc=True) freezes what exists once it has started and makes
    # full collections rarer: they were ~14% of a draining worker's CPU (gcpolicy).
    # A Worker embedded in someone else's process leaves the collector alone.
    import gc

    from pgjobs.gcpolicy import FULL_GC_EVERY
    from pgjobs.worker import Worker

    threshold = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    await client.enqueue("acme", "echo", {"n": 1})
    try:
        await Worker(dsn, demo.registry, fast_settings(storage_dir), burst=True).run()
        assert gc.get_freeze_count() == 0
        assert gc.get_threshold() == threshold
        await client.enqueue("acme", "echo", {"n": 2})
        worker = Worker(dsn, demo.registry, fast_settings(storage_dir), burst=True, tune_gc=True)
        await worker.run()
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold()[2] == FULL_GC_EVERY != threshold[2]
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert await _count_status(dsn, "done", 2)
