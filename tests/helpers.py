"""Shared test helpers: waiting on conditions, running workers in-process or as processes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import IO, Any

import psycopg
from psycopg.rows import dict_row

from pgjobs.config import WorkerSettings
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.types import Job, JobStatus
from pgjobs.worker import Worker

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

# Debian's PostgreSQL builds (postgresql-15 is on this machine kind, so they run here and in
# CI): with auto_explain, pg_stat_statements and JIT, which the embedded pgserver lacks.
# tests/integration/conftest.py starts one (debian_server).
DEBIAN_BUILDS = sorted(Path("/usr/lib/postgresql").glob("*/lib/auto_explain.so"))

# Fast settings so tests exercise leases and retries in seconds, not minutes.
FAST = {
    "lease_seconds": 2.0,
    "heartbeat_seconds": 0.5,
    "rescue_interval_seconds": 0.3,
    "poll_interval_seconds": 0.5,
    "retry_base_seconds": 0.1,
    "retry_max_seconds": 1.0,
    "shutdown_grace_seconds": 2.0,
}


def fast_settings(storage_dir: Path, **overrides: Any) -> WorkerSettings:
    return WorkerSettings(**{**FAST, "storage_dir": storage_dir, **overrides})


async def wait_until(
    predicate: Callable[[], Awaitable[bool]],
    *,
    within: float = 20.0,
    interval: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll predicate until it is true; fail after timeout. Never a bare sleep."""
    deadline = time.monotonic() + within
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def running_worker(
    dsn: str, registry: Registry, settings: WorkerSettings, **kwargs: Any
) -> AsyncIterator[Worker]:
    worker = Worker(dsn, registry, settings, **kwargs)
    task = asyncio.create_task(worker.run())
    started = asyncio.create_task(worker.started.wait())
    await asyncio.wait({task, started}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raise what went wrong
    assert worker.listener is not None
    await asyncio.wait_for(worker.listener.connected.wait(), timeout=10)
    try:
        yield worker
    finally:
        worker.stop()
        await asyncio.wait_for(task, timeout=30)


async def fetch(dsn: str, query: Any, params: Any = None) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(query, params)
        return await cur.fetchall() if cur.description else []


async def seqs_in_company_stream_order(dsn: str, job_id: object) -> list[int]:
    """A job's audit rows' seqs in the company stream's order, (xid, id)."""
    query = "SELECT seq FROM pgjobs.job_events WHERE job_id = %s ORDER BY xid, id"
    return [r["seq"] for r in await fetch(dsn, query, [job_id])]


def _load_queries(path: Path) -> dict[str, str]:
    parts = re.split(r"^-- name: (\w+)\s*$", path.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {n: b.strip().rstrip(";") for n, b in zip(parts[1::2], parts[2::2], strict=True)}


# The statements of the version before sql/0021 (the enqueue, claim, finish and cancel),
# which write the table pgjobs.jobs: for moving jobs on a schema before that migration.
QUERIES_BEFORE_LIVE_STATE = _load_queries(Path(__file__).with_name("queries_before_live_state.sql"))


async def claim_one(
    dsn: str,
    worker: str,
    now: dt.datetime | None = None,
    queries: dict[str, str] | None = None,
) -> dict[str, object]:
    """Claim the next due job for ``worker`` with the worker's own query (or ``queries``'
    claim); its whole row after the claim (the claim returns only the columns the worker
    reads)."""
    rows = await fetch(
        dsn,
        (queries or QUERIES)["job_claim_batch"],
        {
            "now": now,
            "limit": 1,
            "worker_id": worker,
            "lease_seconds": 10.0,
            "job_types": None,
            "after_company": None,
        },
    )
    assert len(rows) == 1
    (row,) = await fetch(dsn, "SELECT * FROM pgjobs.jobs WHERE id = %s", [rows[0]["id"]])
    return row


def finish_params(
    job: dict[str, object] | list[dict[str, object]], outcome: str = "done"
) -> dict[str, object]:
    """Parameters of job_finish_many_if_leased ending claimed jobs with ``outcome``."""
    jobs = job if isinstance(job, list) else [job]
    nulls = [None] * len(jobs)
    return {
        "now": None,
        "ids": [j["id"] for j in jobs],
        "lease_tokens": [j["lease_token"] for j in jobs],
        "outcomes": [outcome] * len(jobs),
        "results": [json.dumps({"by": j.get("worker_id")}) for j in jobs],
        "errors": nulls if outcome == "done" else ["boom"] * len(jobs),
        "tracebacks": None,
        "retry_delays": [0.0] * len(jobs),
        "asset_ids": nulls,
        "asset_keys": nulls,
        "asset_content_types": nulls,
        "asset_sizes": nulls,
        "asset_sha256s": nulls,
        "asset_filenames": nulls,
    }


async def job_status(dsn: str, job_id: Any) -> str:
    rows = await fetch(dsn, "SELECT status FROM pgjobs.jobs WHERE id = %s", [job_id])
    return str(rows[0]["status"])


def start_worker_process(
    dsn: str,
    *,
    handlers: str = "fault_handlers:registry",
    worker_id: str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A real `pgjobs worker` process (for SIGKILL/SIGSTOP/SIGTERM tests)."""
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "PGJOBS_DSN": dsn,
        **(env or {}),
    }
    # Output goes to a file, not a pipe: a chatty worker must never block on a full pipe.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop_worker_process
    argv = [sys.executable, "-m", "pgjobs", "worker", "--handlers", handlers]
    proc = subprocess.Popen(
        [*argv, "--worker-id", worker_id, *(extra or [])],
        env=full_env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _logs[proc.pid] = log
    return proc


_logs: dict[int, IO[bytes]] = {}


def stop_worker_process(proc: subprocess.Popen[bytes]) -> str:
    """Stop (SIGCONT, then SIGTERM, then SIGKILL) and return everything it printed."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log = _logs.pop(proc.pid)
    log.seek(0)
    text = log.read().decode(errors="replace")
    log.close()
    return text


async def assert_each_job_done_once(dsn: str, expected_jobs: int) -> None:
    """The audit log shows exactly one done transition for each of the expected jobs."""
    rows = await fetch(
        dsn,
        "SELECT job_id, count(*) FILTER (WHERE type = 'content_job.done') AS done "
        "FROM pgjobs.job_events GROUP BY job_id",
    )
    assert len(rows) == expected_jobs
    assert {r["done"] for r in rows} == {1}, "every job has exactly one done transition"


# Which event may follow a job's current status (the README's state machine).
_ALLOWED = {
    # failed: a row holding a time pgjobs cannot read (sql/0005_time_bounds.sql)
    "queued": {"content_job.running", "content_job.cancelled", "content_job.failed"},
    "running": {
        "content_job.progress",
        "content_job.retrying",
        "content_job.done",
        "content_job.failed",
        "content_job.cancelled",
        "content_job.queued",
    },
    "failed": {"content_job.retrying"},
    "cancelled": {"content_job.retrying"},
    "done": set(),
}


_HAS_QUEUE_COMPANY = """
SELECT 1 FROM information_schema.columns
WHERE table_schema = 'pgjobs' AND table_name = 'job_queue' AND column_name = 'company_id'
"""


async def assert_queue_matches_jobs(dsn: str) -> None:
    """pgjobs.job_queue (sql/0004) holds exactly the queued and running jobs, each with
    its job row's claim fields: the claim and the rescuer see nothing else."""
    wrong = await fetch(
        dsn,
        """
        SELECT coalesce(j.id, q.job_id) AS id, j.status,
               (q.job_type, q.priority, q.run_at, q.lease_expires_at)::text AS queue_row,
               (j.job_type, j.priority, j.run_at, j.lease_expires_at)::text AS job_row
        FROM pgjobs.job_queue q
        FULL JOIN (SELECT * FROM pgjobs.jobs WHERE status IN ('queued', 'running')) j
          ON j.id = q.job_id
        WHERE (q.job_type, q.priority, q.run_at, q.lease_expires_at)
              IS DISTINCT FROM (j.job_type, j.priority, j.run_at, j.lease_expires_at)
           OR (%(company)s AND (to_jsonb(q) ->> 'company_id') IS DISTINCT FROM j.company_id)
        """,
        # company_id since sql/0008 (these checks also run on older schemas)
        {"company": bool(await fetch(dsn, _HAS_QUEUE_COMPANY))},
    )
    assert not wrong, f"pgjobs.job_queue disagrees with pgjobs.jobs: {wrong[:5]}"


async def assert_histories_valid(dsn: str) -> int:
    """Jepsen-lite check of the whole audit log: every job's events are numbered 1..n
    with no gap, start with queued, only take edges of the state machine, count attempts
    up by one per claim, and end in the job row's current state; and the claim's view of
    the jobs (pgjobs.job_queue) matches them. Returns jobs checked."""
    await assert_queue_matches_jobs(dsn)
    events = await fetch(
        dsn, "SELECT job_id, seq, type, status, attempt FROM pgjobs.job_events ORDER BY job_id, seq"
    )
    jobs = {
        r["id"]: r
        for r in await fetch(dsn, "SELECT id, status, event_seq, attempts FROM pgjobs.jobs")
    }
    by_job: dict[Any, list[dict[str, Any]]] = {}
    for event in events:
        by_job.setdefault(event["job_id"], []).append(event)
    problems: list[str] = []
    for job_id, history in by_job.items():
        if [e["seq"] for e in history] != list(range(1, len(history) + 1)):
            problems.append(f"{job_id}: seqs {[e['seq'] for e in history]}")
            continue
        if history[0]["type"] != "content_job.queued":
            problems.append(f"{job_id}: starts with {history[0]['type']}")
        status, attempt = history[0]["status"], history[0]["attempt"]
        for event in history[1:]:
            if event["type"] not in _ALLOWED[status]:
                problems.append(f"{job_id}: {event['type']} after {status} (seq {event['seq']})")
            if event["type"] == "content_job.running" and event["attempt"] != attempt + 1:
                problems.append(
                    f"{job_id}: claim went from attempt {attempt} to {event['attempt']}"
                )
            status, attempt = event["status"], event["attempt"]
        row = jobs.get(job_id)
        if row is not None and (row["status"], row["event_seq"], row["attempts"]) != (
            status,
            len(history),
            attempt,
        ):
            problems.append(f"{job_id}: row {row} disagrees with its last event")
    assert not problems, "invalid histories:\n" + "\n".join(problems[:20])
    return len(by_job)


# Times a caller may send that pgjobs must refuse before writing anything (issue 19): the
# security probe's three, offsets beyond ±14:00, no offset, and the range's edges.
OUT_OF_RANGE_RUN_ATS = (
    "0001-01-01T00:00:00+00:01",
    "9999-12-31T23:59:59-00:01",
    "9999-12-31T23:59:59-23:59",
    "2030-01-01T00:00:00+14:01",
    "2030-01-01T00:00:00-14:01",
    "2030-01-01T00:00:00",
    "1969-12-31T23:59:59Z",
)


def running_job(job_type: str, lease_token: int = 1) -> Job:
    """A running Job as a claim gives it, built in memory (for tests without a database)."""
    now = dt.datetime.now(dt.UTC)
    return Job(
        id=uuid.uuid4(), company_id="acme", job_type=job_type, status=JobStatus.RUNNING,
        input={}, priority=0, run_at=now, attempts=1, max_attempts=3, result=None,
        result_asset_id=None, error_message=None, source_task_id=None, progress=None,
        worker_id="w", lease_token=lease_token, lease_expires_at=now, event_seq=2,
        started_at=now, finished_at=None, created_at=now, updated_at=now,
    )  # fmt: skip


def roll_back_migrations(dsn: str, ids: Iterable[str]) -> None:
    """Roll back the applied migrations among ``ids`` (newest first), as yoyo does."""
    from yoyo import read_migrations

    from pgjobs import migrate

    chosen_ids = set(ids)
    backend = migrate._backend(dsn)
    try:
        migrations = read_migrations(str(migrate.migrations_dir()))
        with backend.lock():
            chosen = migrations.filter(lambda m: m.id in chosen_ids)
            backend.rollback_migrations(backend.to_rollback(chosen))
    finally:
        backend.connection.close()
