"""A worker's per-job bookkeeping without a database: each job's task forgets the job
when it ends (no done callback per job), including a task stopped before its first step,
whose coroutine never runs; a job's ctx.transaction() is made on first use only."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import running_job
from pgjobs.completer import Outcome
from pgjobs.config import WorkerSettings
from pgjobs.context import JobContext
from pgjobs.registry import Registry
from pgjobs.worker import Worker


class _RecordingCompleter:
    """Records every outcome at once, as a completer whose one-outcome batch committed
    (its on_batch told)."""

    def __init__(self, on_batch: Callable[[list[Outcome]], None]) -> None:
        self.outcomes: list[Outcome] = []
        self.on_batch = on_batch

    def submit(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        outcome._resolve(True)
        self.on_batch([outcome])


def _worker(registry: Registry, tmp_path: Path) -> tuple[Worker, _RecordingCompleter]:
    worker = Worker("dbname=unused", registry, WorkerSettings(storage_dir=tmp_path))
    completer = _RecordingCompleter(worker._recorded)
    # What run() sets up, short of a database: the loop, a pool (never used here: the
    # handlers neither report progress nor open a transaction) and the completer.
    worker._loop = asyncio.get_running_loop()
    worker._pool = object()  # type: ignore[assignment]
    worker._completer = completer  # type: ignore[assignment]
    return worker, completer


async def _until(predicate: Any, message: str) -> None:
    """Let the loop run until ``predicate()`` holds (a bounded number of turns)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(message)


async def test_a_job_stopped_before_its_task_starts_is_forgotten(tmp_path: Path) -> None:
    registry = Registry()
    ran: list[uuid.UUID] = []

    @registry.handler("noop")
    async def noop(ctx: JobContext) -> None:
        ran.append(ctx.job_id)

    worker, completer = _worker(registry, tmp_path)
    job = running_job("noop")
    worker._start(job, str(job.id))
    # Cancelled (say, by a NOTIFY read in the same loop turn) before its task's first step.
    assert worker._interrupt(job.id, "job was cancelled")
    task = worker._running[str(job.id)].task
    await _until(task.done, "the task ended")
    await _until(lambda: not worker._running, "the job was forgotten")
    assert worker._active == 0
    assert ran == [], "its coroutine never ran"
    assert completer.outcomes == [], "nothing is recorded for an abandoned attempt"


async def test_jobs_are_forgotten_when_their_attempt_is_recorded(tmp_path: Path) -> None:
    registry = Registry()
    contexts: list[JobContext] = []

    @registry.handler("noop")
    async def noop(ctx: JobContext) -> None:
        contexts.append(ctx)

    @registry.handler("boom")
    async def boom(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    worker, completer = _worker(registry, tmp_path)
    jobs = [running_job("noop"), running_job("boom"), running_job("noop")]
    for job in jobs:
        worker._start(job, str(job.id))
    await _until(lambda: not worker._running, "every job was forgotten")
    assert worker._active == 0
    assert sorted((o.job.id, o.kind) for o in completer.outcomes) == sorted(
        [(jobs[0].id, "done"), (jobs[1].id, "error"), (jobs[2].id, "done")]
    )
    # Each outcome carries its job's id as text, made once at the start for both rings.
    assert all(o.id_text == str(o.job.id) for o in completer.outcomes)
    # No handler here opened ctx.transaction(), so none was made; it is made on first use,
    # for this attempt's job.
    assert [ctx._completion for ctx in contexts] == [None, None]
    assert contexts[0]._transactional().job is jobs[0]
    assert contexts[0]._transactional() is contexts[0]._completion
