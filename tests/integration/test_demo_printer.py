"""The `make run` demo's event printer (pgjobs.demo_run.EventPrinter): it shows the
progress of jobs whose transitions were committed with the doorbell on and rung, read
from the audit log, in order, each event once."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import pytest

from helpers import finish_params, wait_until
from pgjobs import doorbell, events
from pgjobs.client import Client
from pgjobs.demo_run import EventPrinter
from pgjobs.queries import QUERIES


async def test_rung_progress_is_printed_in_order_once(
    dsn: str, client: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    job = await client.enqueue("acme", "render")
    printer = EventPrinter(client, catch_up_seconds=3600.0)  # rings only
    printer.names[job.id] = "acme/render"
    printer.pending.add(job.id)
    printer.on_notify(events.encode_events([]))  # nothing: no read, no print
    task = asyncio.create_task(printer.run())
    try:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:

            async def rung(query: str, params: dict[str, object]) -> list[tuple[object, ...]]:
                async with conn.transaction():
                    await doorbell.doorbell_on(conn)
                    rows = await (await conn.execute(QUERIES[query], params)).fetchall()
                # The listener's part: the ring as the LISTEN connection would hand it on.
                for payload in events.encode_ring([("acme", job.id)]):
                    printer.on_notify(payload)
                return rows

            claim = {
                "now": None,
                "limit": 1,
                "worker_id": "w1",
                "lease_seconds": 60.0,
                "job_types": None,
                "after_company": None,
            }
            await rung("job_claim_batch", claim)
            cur = await conn.execute("SELECT lease_token FROM pgjobs.jobs WHERE id = %s", [job.id])
            (lease,) = await cur.fetchone() or (None,)
            for step in (1, 2):
                progress = {
                    "id": job.id,
                    "lease_token": lease,
                    "fraction": step / 2,
                    "message": f"step {step}",
                    "now": None,
                }
                await rung("job_progress_if_leased", progress)
            await rung("job_finish_many_if_leased", finish_params(_claimed(job.id, lease)))

        async def finished() -> bool:
            return printer.done.is_set()

        await wait_until(finished, message="the demo saw the job end")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    # Read after the rings (the first read starts from the job's first event, as the
    # printer had printed none): each event once, in order, progress with its bar.
    assert [(line[1], line[2]) for line in lines] == [
        ("#1", "queued"),
        ("#2", "running"),
        ("#3", "progress"),
        ("#4", "progress"),
        ("#5", "done"),
    ]
    assert " ".join(lines[2]).endswith("[##########..........] 50% step 1")


def _claimed(job_id: object, lease: object) -> dict[str, object]:
    return {"id": job_id, "lease_token": lease}
