"""Issue 14: a failed attempt keeps its error and traceback in the audit log (never in a
NOTIFY), the worker logs it, and a handler past its timeout is recorded as timed out at
once, a sync one told to stop and its late result discarded."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import claim_one, fast_settings, fetch, finish_params, running_worker, wait_until
from pgjobs import rescuer
from pgjobs.client import Client
from pgjobs.completer import MAX_TRACEBACK_BYTES, bound_traceback
from pgjobs.context import JobContext
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.types import JobStatus

# What an operator runs in `pgjobs psql`: every attempt's error and traceback.
ATTEMPT_ERRORS = """
select attempt, type, payload ->> 'errorMessage' as error, payload ->> 'traceback' as traceback
from pgjobs.job_events where job_id = %s and type in ('content_job.retrying', 'content_job.failed')
order by seq
"""


def _deep(attempt: int) -> None:
    raise ValueError(f"boom on attempt {attempt}")


async def _status(client: Client, job_id: object) -> JobStatus:
    return (await client.get("acme", job_id)).status  # type: ignore[arg-type]


async def test_each_failed_attempt_keeps_its_traceback_and_no_notify_carries_it(
    dsn: str, client: Client, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()

    @registry.handler("boom")
    async def boom(ctx: JobContext) -> None:
        _deep(ctx.attempt)

    caplog.set_level(logging.WARNING, logger="pgjobs")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listen:
        await listen.execute("LISTEN pgjobs_events")
        job = await client.enqueue("acme", "boom", max_attempts=2)
        # Items in the commits (a doorbell worker's rings carry no event at all).
        settings = fast_settings(storage_dir, doorbell=False)
        async with running_worker(dsn, registry, settings):
            await wait_until(lambda: _is(client, job.id, JobStatus.FAILED), message="failed")
        payloads = [n.payload async for n in listen.notifies(timeout=0.5)]

    rows = await fetch(dsn, ATTEMPT_ERRORS, [job.id])
    assert [(r["attempt"], r["type"]) for r in rows] == [
        (1, "content_job.retrying"),
        (2, "content_job.failed"),
    ]
    for attempt, row in enumerate(rows, start=1):
        assert row["error"] == f"ValueError: boom on attempt {attempt}"
        assert row["traceback"].startswith("Traceback (most recent call last):")
        assert "in _deep" in row["traceback"]  # the frame where it was raised
        assert row["traceback"].endswith(f"ValueError: boom on attempt {attempt}\n")

    # The NOTIFYs carry the error message, never the traceback.
    items = [i for p in payloads for i in json.loads(p)["events"] if i["jobId"] == str(job.id)]
    ended = [i for i in items if i["type"] in ("content_job.retrying", "content_job.failed")]
    assert [i["errorMessage"] for i in ended] == [r["error"] for r in rows]
    assert all("Traceback" not in p and "traceback" not in p for p in payloads)

    # Logged with the traceback: WARNING for the retry, ERROR for the last attempt.
    failures = [r for r in caplog.records if "boom on attempt" in r.getMessage()]
    assert [(r.levelno, r.attempt) for r in failures] == [  # type: ignore[attr-defined]
        (logging.WARNING, 1),
        (logging.ERROR, 2),
    ]
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in failures)


async def test_a_long_traceback_is_cut_to_its_last_16_kib(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    registry = Registry()

    @registry.handler("huge")
    async def huge(ctx: JobContext) -> None:
        raise RuntimeError("é" * 50_000 + " the end")

    job = await client.enqueue("acme", "huge", max_attempts=1)
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _is(client, job.id, JobStatus.FAILED), message="failed")
    (row,) = await fetch(dsn, ATTEMPT_ERRORS, [job.id])
    assert len(row["traceback"].encode()) <= MAX_TRACEBACK_BYTES
    assert len(row["traceback"].encode()) > MAX_TRACEBACK_BYTES - 4
    assert row["traceback"].startswith("(traceback cut to its last 16 KiB)\n")
    assert row["traceback"].endswith(" the end\n")


def test_bound_traceback_keeps_short_ones_and_whole_characters() -> None:
    assert bound_traceback("Traceback ...\nValueError: x\n") == "Traceback ...\nValueError: x\n"
    assert bound_traceback("a\x00b") == "ab"
    cut = bound_traceback("€" * 10_000)  # 3 bytes each: the cut never splits one
    assert len(cut.encode()) <= MAX_TRACEBACK_BYTES
    assert cut.endswith("€" * 100)


async def test_async_handler_past_its_timeout_is_recorded_as_timed_out(
    dsn: str, client: Client, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = Registry()
    seen: list[JobContext] = []

    @registry.handler("slow", timeout=0.2)
    async def slow(ctx: JobContext) -> None:
        seen.append(ctx)
        await asyncio.sleep(60)

    caplog.set_level(logging.WARNING, logger="pgjobs")
    job = await client.enqueue("acme", "slow", max_attempts=1)
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _is(client, job.id, JobStatus.FAILED), message="failed")
    (row,) = await fetch(dsn, ATTEMPT_ERRORS, [job.id])
    assert row["error"] == "timed out after 0.2s (the 'slow' timeout)"
    assert row["traceback"] is None
    assert seen[0].cancelled
    (record,) = [r for r in caplog.records if "timed out after" in r.getMessage()]
    assert record.levelno == logging.ERROR


async def test_sync_handler_past_its_timeout_is_told_to_stop_and_its_result_discarded(
    dsn: str, client: Client, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A thread cannot be interrupted: the attempt is recorded as timed out at the
    deadline while the handler still runs, the handler sees ctx.cancelled, and what it
    returns afterwards is logged and dropped."""
    registry = Registry()
    saw_cancelled = threading.Event()
    release = threading.Event()
    returned = threading.Event()

    @registry.handler("stuck", timeout=0.3)
    def stuck(ctx: JobContext) -> dict[str, Any]:
        while not ctx.cancelled and not release.is_set():
            release.wait(0.01)
        if ctx.cancelled:
            saw_cancelled.set()
        release.wait(30)
        returned.set()
        return {"late": True}

    caplog.set_level(logging.WARNING, logger="pgjobs")
    job = await client.enqueue("acme", "stuck", max_attempts=1)
    try:
        async with running_worker(dsn, registry, fast_settings(storage_dir)):
            # Recorded while the handler is still blocked, not when it returns.
            await wait_until(lambda: _is(client, job.id, JobStatus.FAILED), message="failed")
            assert not returned.is_set()
            await wait_until(
                lambda: _async(saw_cancelled.is_set()), message="handler sees ctx.cancelled"
            )
            release.set()
            await wait_until(lambda: _async(_discarded(caplog)), message="late result logged")
    finally:
        release.set()
    failed = await client.get("acme", job.id)
    assert failed.error_message == "timed out after 0.3s (the 'stuck' timeout)"
    assert failed.result is None


def _discarded(caplog: pytest.LogCaptureFixture) -> bool:
    return any(
        "sync handler returned after it was stopped" in r.getMessage()
        and "result is discarded" in r.getMessage()
        for r in caplog.records
    )


async def _is(client: Client, job_id: object, status: JobStatus) -> bool:
    return await _status(client, job_id) is status


async def _async(value: bool) -> bool:
    return value


async def test_an_attempt_without_a_traceback_does_not_inherit_the_last_one(
    dsn: str, client: Client
) -> None:
    """A lost lease (rescue), a timeout and a manual retry record their message only;
    the audit row never shows the previous attempt's traceback as theirs."""
    job = await client.enqueue("acme", "echo", max_attempts=3)
    finish = QUERIES["job_finish_many_if_leased"]
    first = await claim_one(dsn, "w1")
    await fetch(dsn, finish, {**finish_params(first, "error"), "tracebacks": ["Traceback: 1"]})
    await claim_one(dsn, "w2")
    later = datetime.now(UTC) + timedelta(minutes=5)
    (rescued,) = await rescuer.rescue_expired_with(dsn, now=later)
    assert rescued.status is JobStatus.QUEUED
    third = await claim_one(dsn, "w3", now=later)
    await fetch(dsn, finish, {**finish_params(third, "fail"), "errors": ["timed out after 1s"]})
    await client.retry("acme", job.id)
    events = await client.events("acme", job.id)
    errors = [
        (e.type.value, e.payload.get("errorMessage"), e.payload.get("traceback"))
        for e in events
        if e.type.value in ("content_job.retrying", "content_job.failed")
    ]
    assert errors == [
        ("content_job.retrying", "boom", "Traceback: 1"),
        (
            "content_job.retrying",
            "lease expired: worker w2 stopped renewing it (attempt 2 of 3)",
            None,
        ),
        ("content_job.failed", "timed out after 1s", None),
        ("content_job.retrying", None, None),
    ]
