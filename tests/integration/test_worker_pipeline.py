"""How a worker overlaps handlers with the commits that record them (issue 4's throughput
work): a handler's slot frees when it returns, not when its completion commits, and a
completion that cannot be written fails loudly instead of hanging its job."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db
from pgjobs.client import Client
from pgjobs.completer import Completer, Outcome
from pgjobs.context import JobContext
from pgjobs.jobspec import JobSpec
from pgjobs.registry import Registry
from pgjobs.storage import LocalStorage
from pgjobs.types import JobStatus
from pgjobs.worker import Worker


async def test_next_job_starts_while_previous_completion_waits_for_its_commit(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    first = await client.enqueue("acme", "step", {"name": "first"}, priority=1)
    second = await client.enqueue("acme", "step", {"name": "second"})
    started: list[str] = []
    release_first = asyncio.Event()
    registry = Registry()

    @registry.handler("step")
    async def step(ctx: JobContext) -> None:
        started.append(ctx.input["name"])
        if ctx.input["name"] == "first":
            await release_first.wait()

    async def has_started(name: str) -> bool:
        return name in started

    settings = fast_settings(storage_dir, concurrency=1)
    async with running_worker(dsn, registry, settings):
        await wait_until(lambda: has_started("first"), message="first handler started")
        # Hold the first job's row so its completion cannot commit, then let its handler
        # return: the single slot must go to the second job right away.
        async with await psycopg.AsyncConnection.connect(dsn) as blocker:
            await blocker.execute("SELECT 1 FROM pgjobs.jobs WHERE id = %s FOR UPDATE", [first.id])
            release_first.set()
            await wait_until(
                lambda: has_started("second"), within=5, message="second handler started"
            )
            assert (await client.get("acme", first.id)).status is JobStatus.RUNNING
            await blocker.rollback()

        async def both_done() -> bool:
            jobs = [await client.get("acme", j.id) for j in (first, second)]
            return all(j.status is JobStatus.DONE for j in jobs)

        await wait_until(both_done, message="both jobs done")
    assert started == ["first", "second"]


async def test_concurrency_bounds_handlers_and_held_jobs(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    in_handler = 0
    most_in_handler = 0
    most_held = 0
    registry = Registry()
    worker_box: list[Worker] = []

    @registry.handler("tick")
    async def tick(ctx: JobContext) -> None:
        nonlocal in_handler, most_in_handler, most_held
        in_handler += 1
        try:
            most_in_handler = max(most_in_handler, in_handler)
            most_held = max(most_held, len(worker_box[0]._running))
            await asyncio.sleep(0.002)
        finally:
            in_handler -= 1

    async def all_done() -> bool:
        rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
        return bool(rows[0]["n"] == 150)

    async with running_worker(dsn, registry, fast_settings(storage_dir, concurrency=3)) as w:
        worker_box.append(w)  # before any job exists: handlers read it
        await client.enqueue_many(JobSpec("acme", "tick") for _ in range(150))
        await wait_until(all_done, message="150 jobs done")
    assert most_in_handler == 3
    retried = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE attempts <> 1")
    assert retried[0]["n"] == 0, "every job ran once, no handler failed"
    assert most_held <= 6  # handlers plus completions waiting for their commit


async def test_a_completion_that_cannot_be_written_fails_its_handler_instead_of_hanging(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    job = await client.enqueue("acme", "echo")
    pool = await db.open_pool(dsn, min_size=1, max_size=2, name="test-completer")
    completer = Completer(pool, LocalStorage(storage_dir), flush_interval=0)

    async def broken_write(batch: list[Outcome]) -> set[object]:
        raise RuntimeError("statement refused")

    completer._write = broken_write  # type: ignore[method-assign,assignment]
    recorded: asyncio.Future[bool | Exception] = asyncio.get_running_loop().create_future()
    runner = asyncio.create_task(completer.run())
    try:
        completer.submit(Outcome(job, "done", on_recorded=recorded.set_result))
        result = await asyncio.wait_for(recorded, timeout=10)
        assert isinstance(result, RuntimeError)
        assert str(result) == "statement refused"
    finally:
        completer.close()
        await asyncio.wait_for(runner, timeout=10)
        await pool.close()
