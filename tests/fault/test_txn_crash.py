"""Transactional completion across a SIGKILL: the killed attempt's writes never land."""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import (
    assert_histories_valid,
    fetch,
    start_worker_process,
    stop_worker_process,
    wait_until,
)
from pgjobs.client import Client
from pgjobs.types import EventType, JobStatus

FAST_ARGS = ["--lease-seconds", "2", "--heartbeat-seconds", "0.5"]
FAST_ENV = {"PGJOBS_RESCUE_INTERVAL_SECONDS": "0.3", "PGJOBS_POLL_INTERVAL_SECONDS": "0.3"}
HANDLERS = "txn_handlers:registry"
# The doomed attempt's insert, made and not committed: its lock on the table is held.
OPEN_INSERT = """
SELECT count(*) AS n FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
WHERE c.relname = 'charges' AND l.mode = 'RowExclusiveLock' AND l.granted"""


async def _exists(path: Path) -> bool:
    return await asyncio.to_thread(path.exists)


async def test_sigkill_inside_the_transaction_then_rescue_leaves_exactly_one_row(
    dsn: str, client: Client, tmp_path: Path
) -> None:
    await fetch(dsn, "CREATE TABLE public.charges (job_id uuid NOT NULL, attempt int NOT NULL)")
    marker = tmp_path / "inside"
    job = await client.enqueue("acme", "charge_block_first", {"marker": str(marker)})
    doomed = start_worker_process(
        dsn, handlers=HANDLERS, worker_id="doomed", extra=FAST_ARGS, env=FAST_ENV
    )
    survivor = None
    try:
        await wait_until(lambda: _exists(marker), within=30, message="attempt 1 inside its block")
        assert (await fetch(dsn, OPEN_INSERT))[0]["n"] == 1, "attempt 1's insert is pending"
        doomed.kill()  # SIGKILL before the commit
        doomed.wait(timeout=10)
        survivor = start_worker_process(
            dsn, handlers=HANDLERS, worker_id="survivor", extra=FAST_ARGS, env=FAST_ENV
        )

        async def done() -> bool:
            return (await client.get("acme", job.id)).status is JobStatus.DONE

        await wait_until(done, within=60, message="job rescued and done")
    finally:
        stop_worker_process(doomed)
        if survivor is not None:
            stop_worker_process(survivor)
    rows = await fetch(dsn, "SELECT job_id, attempt FROM public.charges")
    assert rows == [{"job_id": job.id, "attempt": 2}], "exactly one charge, attempt 2's"
    assert (await client.get("acme", job.id)).result == {"attempt": 2}
    events = [(e.type, e.attempt, e.worker_id) for e in await client.events("acme", job.id)]
    assert events == [
        (EventType.QUEUED, 0, None),
        (EventType.RUNNING, 1, "doomed"),
        (EventType.RETRYING, 1, "doomed"),  # the rescue, audited
        (EventType.RUNNING, 2, "survivor"),
        (EventType.DONE, 2, "survivor"),  # one done event
    ]
    assert await assert_histories_valid(dsn) == 1
