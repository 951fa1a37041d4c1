"""``make run``: the whole system on one machine, watched live.

Migrates, starts worker processes with the demo handlers, enqueues a mix of jobs for two
companies and prints every event as the database commits it (read from NOTIFY, then
confirmed against ``pgjobs.job_events``), then shuts the workers down gracefully.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from typing import Any

from pgjobs import db, migrate
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.notifier import Listener

DEMO_JOBS = [
    JobSpec("acme", "render", {"title": "Spring campaign", "steps": 4}, source_task_id="task-1"),
    JobSpec("acme", "render", {"title": "Product launch", "steps": 3}, source_task_id="task-2"),
    JobSpec("globex", "render", {"title": "Quarterly report", "steps": 5}, priority=5),
    JobSpec("globex", "sleep", {"seconds": 1.5}),
    JobSpec("acme", "echo", {"hello": "world"}),
    JobSpec("acme", "fail", {"message": "simulated outage"}, max_attempts=2),
]


def _bar(fraction: float | None) -> str:
    if fraction is None:
        return ""
    filled = round(fraction * 20)
    return "[" + "#" * filled + "." * (20 - filled) + f"] {fraction:4.0%}"


async def run(dsn: str, *, workers: int = 2) -> int:
    applied = migrate.apply(dsn)
    state = f"migrated {', '.join(applied)}" if applied else "schema up to date"
    print(f"database: {db.redact(dsn)} ({state})")
    env = {**os.environ, "PGJOBS_DSN": dsn, "PGJOBS_RETRY_BASE_SECONDS": "0.5"}
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pgjobs",
            "worker",
            "--handlers",
            "pgjobs.demo:registry",
            "--concurrency",
            "4",
            "--worker-id",
            f"demo-worker-{n + 1}",
            env=env,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for n in range(workers)
    ]
    print(f"started {workers} worker processes (pids {', '.join(str(p.pid) for p in procs)})")
    client = await Client.connect(dsn, max_size=2)
    pending: set[uuid.UUID] = set()
    done = asyncio.Event()
    names: dict[uuid.UUID, str] = {}

    def on_notify(payload: str) -> None:
        for event in json.loads(payload).get("events", []):
            job_id = uuid.UUID(event["jobId"])
            if job_id not in names:
                continue
            print(_describe(names[job_id], event))
            if event["status"] in ("done", "failed", "cancelled"):
                pending.discard(job_id)
                if not pending:
                    done.set()

    connected = asyncio.Event()

    async def on_connect() -> None:
        connected.set()

    listener = Listener(dsn, on_notify, on_connect=on_connect, name="pgjobs-demo")
    listen_task = asyncio.create_task(listener.run())
    try:
        await connected.wait()
        specs = [
            JobSpec(
                s.company_id,
                s.job_type,
                s.input,
                s.source_task_id,
                s.priority,
                max_attempts=s.max_attempts,
            )
            for s in DEMO_JOBS
        ]
        for spec in specs:
            names[spec.id] = f"{spec.company_id}/{spec.job_type}"
        pending.update(names)
        jobs = await client.enqueue_many(specs)
        print(f"enqueued {len(jobs)} jobs in one transaction; events as they commit:\n")
        try:
            await asyncio.wait_for(done.wait(), timeout=120)
        except TimeoutError:
            print("some jobs did not finish within 120s; see `pgjobs jobs show JOB_ID`")
        print("\nresults:")
        for job in jobs:
            final = await client.get(job.company_id, job.id)
            line = f"  {names[job.id]:<16} {final.status.value:<7} attempts {final.attempts}"
            if final.result_asset_id:
                asset = await client.get_asset(final.company_id, final.result_asset_id)
                if asset is not None:
                    line += f"  asset {asset.original_filename} {asset.byte_size} B"
                    line += f" sha256 {asset.sha256[:12]}…"
            if final.error_message:
                line += f"  error: {final.error_message}"
            print(line)
        print(
            "\naudit it yourself:  .venv/bin/pgjobs psql -c 'select job_id, seq, type, "
            "status, attempt, created_at from pgjobs.job_events order by id'"
        )
        return 0
    finally:
        listen_task.cancel()
        await asyncio.gather(listen_task, return_exceptions=True)
        await client.close()
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in procs))
        print("workers stopped")


def _describe(name: str, event: dict[str, Any]) -> str:
    kind = event["type"].removeprefix("content_job.")
    text = f"  {name:<16} #{event['seq']:<2} {kind:<9} attempt {event['attempt']}"
    progress = event.get("progress")
    if progress:
        text += f"  {_bar(progress.get('fraction'))} {progress.get('message') or ''}"
    if event.get("errorMessage"):
        text += f"  error: {event['errorMessage']}"
    if event.get("resultAssetId"):
        text += f"  asset {event['resultAssetId']}"
    return text
