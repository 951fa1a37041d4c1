"""``make run``: the whole system on one machine, watched live.

Migrates, starts worker processes with the demo handlers and the HTTP/SSE gateway,
submits one job through the gateway's REST API and the rest in one bulk enqueue, and
prints every event as the database commits it. Then it leaves the workers and the gateway
running (with the dashboard's URL, an API token to sign in with, and curl commands to
try) until Ctrl-C, or, with ``--exit-when-done``, shuts everything down gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import urllib.error
import urllib.request
import uuid
from typing import Any

from pgjobs import db, migrate
from pgjobs.client import Client
from pgjobs.events import LiveEvent, parse_events
from pgjobs.jobspec import JobSpec
from pgjobs.notifier import Listener

DEMO_JOBS = [
    JobSpec("acme", "render", {"title": "Product launch", "steps": 3}, source_task_id="task-2"),
    JobSpec("globex", "render", {"title": "Quarterly report", "steps": 5}, priority=5),
    JobSpec("globex", "sleep", {"seconds": 1.5}),
    JobSpec("acme", "echo", {"hello": "world"}),
    JobSpec("acme", "fail", {"message": "simulated outage"}, max_attempts=2),
]
VIA_GATEWAY = {
    "jobType": "render",
    "input": {"title": "Spring campaign", "steps": 4},
    "sourceTaskId": "task-1",
}


def _bar(fraction: float | None) -> str:
    if fraction is None:
        return ""
    filled = round(fraction * 20)
    return "[" + "#" * filled + "." * (20 - filled) + f"] {fraction:4.0%}"


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(probe.getsockname()[1])
    raise OSError("no free port on 127.0.0.1")


def _http(method: str, url: str, token: str | None = None, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback
        return json.loads(response.read() or b"null")


async def _wait_ready(base: str, gateway: asyncio.subprocess.Process) -> None:
    for _ in range(200):
        if gateway.returncode is not None:
            raise RuntimeError("the gateway exited; run `pgjobs gateway -v` to see why")
        with contextlib.suppress(OSError, urllib.error.URLError):
            await asyncio.to_thread(_http, "GET", f"{base}/readyz")
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the gateway did not become ready within 20s")


async def run(dsn: str, *, workers: int = 2, port: int = 8000, exit_when_done: bool = False) -> int:
    from pgjobs.gateway import auth

    applied = migrate.apply(dsn)
    state = f"migrated {', '.join(applied)}" if applied else "schema up to date"
    print(f"database: {db.redact(dsn)} ({state})")
    # PGJOBS_DOORBELL off: this demo prints each event from its NOTIFY item, and reads no
    # ring (the workers' rings carry job ids, not events).
    env = {
        **os.environ,
        "PGJOBS_DSN": dsn,
        "PGJOBS_RETRY_BASE_SECONDS": "0.5",
        "PGJOBS_DOORBELL": "off",
    }
    wanted, port = port, _free_port(port)
    if wanted and port != wanted:
        print(f"port {wanted} is busy (another gateway or program?); using {port} instead")
    base = f"http://127.0.0.1:{port}"
    quiet = asyncio.subprocess.DEVNULL
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
            stderr=quiet,
        )
        for n in range(workers)
    ]
    gateway = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgjobs",
        "gateway",
        "--port",
        str(port),
        env=env,
        stdout=quiet,
        stderr=quiet,
    )
    procs.append(gateway)
    print(f"started {workers} worker processes and the gateway at {base}")
    client = await Client.connect(dsn, max_size=2)
    pending: set[uuid.UUID] = set()
    done = asyncio.Event()
    names: dict[uuid.UUID, str] = {}

    def on_notify(payload: str) -> None:
        for event in parse_events(payload):
            if event.job_id not in names:
                continue
            print(_describe(names[event.job_id], event))
            if event.status in ("done", "failed", "cancelled"):
                pending.discard(event.job_id)
                if not pending:
                    done.set()

    connected = asyncio.Event()

    async def on_connect() -> None:
        connected.set()

    listener = Listener(dsn, on_notify, on_connect=on_connect, name="pgjobs-demo")
    listen_task = asyncio.create_task(listener.run())
    try:
        await connected.wait()
        async with client.pool.connection() as conn:
            token = await auth.create_token(conn, "acme", "make run demo")
        await _wait_ready(base, gateway)
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
        posted = await asyncio.to_thread(
            _http, "POST", f"{base}/api/companies/acme/content-jobs", token, VIA_GATEWAY
        )
        # Its first events may have been announced while the POST was answered: watch it
        # from here on, and stop waiting for it if it already finished.
        posted_id = uuid.UUID(posted["jobId"])
        names[posted_id] = "acme/render(http)"
        pending.add(posted_id)
        if (await client.get("acme", posted_id)).status.is_terminal:
            pending.discard(posted_id)
        jobs = await client.enqueue_many(specs)
        print(f"POST /api/companies/acme/content-jobs -> 202 {posted_id}")
        print(f"enqueued {len(jobs)} more in one transaction; events as they commit:\n")
        try:
            await asyncio.wait_for(done.wait(), timeout=120)
        except TimeoutError:
            print("some jobs did not finish within 120s; see `pgjobs jobs show JOB_ID`")
        await _summary(client, [posted_id, *(j.id for j in jobs)], names)
        print(
            "\naudit it yourself:  .venv/bin/pgjobs psql -c 'select job_id, seq, type, "
            "status, attempt, created_at from pgjobs.job_events order by id'"
        )
        if not exit_when_done:
            print(f"\ndashboard  {base}/  (open it and sign in with the API token below)")
            print(f"gateway {base}  (API token for company acme, shown once: {token})")
            auth_header = f"-H 'Authorization: Bearer {token}'"
            print(f"  curl {auth_header} {base}/api/companies/acme/content-jobs")
            print(f"  curl -N {auth_header} {base}/api/companies/acme/events")
            print(
                f"  curl {auth_header} -H 'Content-Type: application/json' -d "
                f'\'{{"jobType": "sleep", "input": {{"seconds": 5}}}}\' '
                f"{base}/api/companies/acme/content-jobs"
            )
            await _until_interrupted()
        return 0
    finally:
        listen_task.cancel()
        await asyncio.gather(listen_task, return_exceptions=True)
        await client.close()
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        await asyncio.gather(*(p.wait() for p in procs))
        print("workers and gateway stopped")


async def _until_interrupted() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Said only once Ctrl-C is handled here, so whoever acts on it stops the demo cleanly.
    print("\nworkers and gateway keep running; press Ctrl-C to stop them", flush=True)
    await stop.wait()


async def _summary(client: Client, ids: list[uuid.UUID], names: dict[uuid.UUID, str]) -> None:
    print("\nresults:")
    for job_id in ids:
        company = names[job_id].split("/")[0]
        final = await client.get(company, job_id)
        line = f"  {names[job_id]:<18} {final.status.value:<7} attempts {final.attempts}"
        if final.result_asset_id:
            asset = await client.get_asset(final.company_id, final.result_asset_id)
            if asset is not None:
                line += f"  asset {asset.original_filename} {asset.byte_size} B"
                line += f" sha256 {asset.sha256[:12]}…"
        if final.error_message:
            line += f"  error: {final.error_message}"
        print(line)


def _describe(name: str, event: LiveEvent) -> str:
    kind = event.type.removeprefix("content_job.")
    text = f"  {name:<18} #{event.seq:<2} {kind:<9} attempt {event.attempt}"
    progress = event.extra.get("progress")
    if progress:
        text += f"  {_bar(progress.get('fraction'))} {progress.get('message') or ''}"
    if event.extra.get("errorMessage"):
        text += f"  error: {event.extra['errorMessage']}"
    if event.extra.get("resultAssetId"):
        text += f"  asset {event.extra['resultAssetId']}"
    return text
