"""Helpers for your own test suite.

    from pgjobs.testing import assert_enqueued, run_queued

    async def test_signup_sends_welcome(dsn):
        await signup(dsn, "ada@example.com")
        job = await assert_enqueued(dsn, "acme", "send_email", input={"to": "ada@example.com"})
        [ran] = await run_queued(dsn, my_handlers)
        assert ran.status == "done"

``run_queued`` runs jobs through the real worker (claim, handler, batched completion,
events) in burst mode, so what passes here is what production does. Use a real
PostgreSQL database: these helpers do not fake it.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, overload

from pgjobs import db
from pgjobs.config import WorkerSettings
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.types import Job, JobStatus
from pgjobs.worker import Worker


@overload
async def run_queued(
    registry: Registry, /, *, settings: WorkerSettings | None = None, max_seconds: float = 60.0
) -> list[Job]: ...


@overload
async def run_queued(
    dsn: str | None,
    registry: Registry,
    /,
    *,
    settings: WorkerSettings | None = None,
    max_seconds: float = 60.0,
) -> list[Job]: ...


async def run_queued(
    dsn_or_registry: str | Registry | None,
    registry: Registry | None = None,
    /,
    *,
    settings: WorkerSettings | None = None,
    max_seconds: float = 60.0,
) -> list[Job]:
    """Run every due job (and the jobs those enqueue) until none is left; returns the
    jobs that ran, in their final state. Jobs rescheduled for a later retry stay queued.

    ``run_queued(dsn, registry)``, or ``run_queued(registry)`` for the database the
    ``pgjobs`` command uses: PGJOBS_DSN, else the embedded server (started if needed)."""
    dsn, registry = _dsn_and_registry(dsn_or_registry, registry)
    if settings is None:
        settings = WorkerSettings(
            concurrency=4,
            poll_interval_seconds=0.05,
            storage_dir=Path(tempfile.mkdtemp(prefix="pgjobs-testing-")),
        )
    worker = Worker(dsn, registry, settings, burst=True, worker_id="pgjobs-testing")
    async with asyncio.timeout(max_seconds):  # not wait_for: it can lose a cancel on 3.11
        await worker.run()
    if not worker.ran:
        return []
    async with await db.connect(dsn) as conn:
        cur = await conn.execute(QUERIES["job_get_many"], {"ids": list(dict.fromkeys(worker.ran))})
        return [Job.from_row(row) for row in await cur.fetchall()]


def _dsn_and_registry(
    dsn_or_registry: str | Registry | None, registry: Registry | None
) -> tuple[str, Registry]:
    if isinstance(dsn_or_registry, Registry):
        if registry is not None:
            raise TypeError("run_queued takes (registry) or (dsn, registry)")
        return db.resolve_dsn(None), dsn_or_registry
    if registry is None:
        raise TypeError("run_queued needs a Registry of handlers")
    return db.resolve_dsn(dsn_or_registry), registry


@overload
def run_queued_sync(
    registry: Registry, /, *, settings: WorkerSettings | None = None, max_seconds: float = 60.0
) -> list[Job]: ...


@overload
def run_queued_sync(
    dsn: str | None,
    registry: Registry,
    /,
    *,
    settings: WorkerSettings | None = None,
    max_seconds: float = 60.0,
) -> list[Job]: ...


def run_queued_sync(
    dsn_or_registry: str | Registry | None,
    registry: Registry | None = None,
    /,
    *,
    settings: WorkerSettings | None = None,
    max_seconds: float = 60.0,
) -> list[Job]:
    """run_queued() for synchronous test suites."""
    dsn, registry = _dsn_and_registry(dsn_or_registry, registry)
    return asyncio.run(run_queued(dsn, registry, settings=settings, max_seconds=max_seconds))


async def find_jobs(
    dsn: str | None,
    company_id: str,
    job_type: str,
    *,
    input: Mapping[str, Any] | None = None,
    status: JobStatus | str | None = JobStatus.QUEUED,
) -> list[Job]:
    """Jobs of that company and type whose input contains ``input`` (JSON containment).
    ``dsn`` None: the database the ``pgjobs`` command uses."""
    params = {
        "company_id": company_id,
        "job_type": job_type,
        "status": None if status is None else str(status),
        "input": None if input is None else json.dumps(input),
    }
    async with await db.connect(db.resolve_dsn(dsn)) as conn:
        cur = await conn.execute(QUERIES["job_find_matching"], params)
        return [Job.from_row(row) for row in await cur.fetchall()]


async def assert_enqueued(
    dsn: str | None,
    company_id: str,
    job_type: str,
    *,
    input: Mapping[str, Any] | None = None,
    status: JobStatus | str | None = JobStatus.QUEUED,
) -> Job:
    """Assert exactly one matching job exists and return it."""
    jobs = await find_jobs(dsn, company_id, job_type, input=input, status=status)
    if len(jobs) != 1:
        raise AssertionError(
            f"expected one {job_type!r} job for {company_id!r}"
            f"{f' with input containing {dict(input)!r}' if input else ''}"
            f"{f' in status {status}' if status else ''}, found {len(jobs)}"
        )
    return jobs[0]
