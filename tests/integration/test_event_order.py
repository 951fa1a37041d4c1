"""The company stream's order key (sql/0027): a job's audit rows are in seq order under
(xid, id) whichever transaction took its xid first, including one that waited on the
job's lock while a younger one wrote and committed the job's previous transition."""

from __future__ import annotations

import asyncio

import psycopg

from helpers import claim_one, seqs_in_company_stream_order
from pgjobs.client import Client
from pgjobs.queries import QUERIES


async def test_a_younger_transaction_that_ended_is_seen(dsn: str) -> None:
    """Committed or rolled back, a transaction that took its xid after this one's and has
    ended makes the triggers look the previous rows up (the only kind of writer that can
    have left a larger xid on them)."""
    ended = "SELECT pgjobs.younger_transaction_ended() AS ended"
    for finish in ("commit", "rollback"):
        async with (
            await psycopg.AsyncConnection.connect(dsn) as older,
            await psycopg.AsyncConnection.connect(dsn) as younger,
        ):
            await older.execute("SELECT pg_current_xact_id()")
            await younger.execute("SELECT pg_current_xact_id()")
            await getattr(younger, finish)()
            cur = await older.execute(ended)
            assert await cur.fetchone() == (True,), finish


async def test_a_transition_that_waited_on_the_jobs_lock_comes_after_the_one_it_waited_for(
    dsn: str,
) -> None:
    async with await Client.connect(dsn) as client:
        job = await client.enqueue("acme", "echo", {})
        running = await claim_one(dsn, "w1")  # seq 2
        progress = {
            "id": job.id,
            "lease_token": running["lease_token"],
            "fraction": 0.5,
            "message": None,
            "now": None,
        }
        async with (
            await psycopg.AsyncConnection.connect(dsn) as older,
            await psycopg.AsyncConnection.connect(dsn) as younger,
        ):
            await client.enqueue("acme", "echo", {}, conn=older)  # its xid, first
            await younger.execute(QUERIES["job_progress_if_leased"], progress)  # seq 3, locked
            cancel = asyncio.create_task(client.cancel("acme", job.id, conn=older))
            await asyncio.sleep(0.3)
            assert not cancel.done()  # waiting for the younger one's lock
            await younger.commit()
            assert (await cancel).event_seq == 4
            await older.commit()
    assert await seqs_in_company_stream_order(dsn, job.id) == [1, 2, 3, 4]
