"""The gateway's one reader of job events: rung jobs' events, and the periodic catch-up.

A ring (``pgjobs.events.Ring``) names jobs whose transitions committed without NOTIFY
items; their events are only in ``pgjobs.job_events``. The fan-out notes the rung jobs
that a stream of this process watches (``Fanout.on_notify``), and this reader brings them
to their streams: each round takes every rung job noted so far, asks the fan-out after
which seq to read for each (the lowest its subscribers have reached), reads all of them
in one query (``job_events_after_seq_for_jobs``; one per ``KEYS_PER_QUERY`` jobs) and
hands each event to ``Fanout.deliver``, exactly as an item's event is handed on: the same
dedupe by seq, the same tenant check, and the stream builds the same SSE data from it as
from an item or a replay (``pgjobs.events.event_data``). Rings that arrive while a
round's query is in flight are read by the next round: one reader, one query per round,
however many streams or rings, instead of one query per stream.

*The catch-up.* A ring is sent after its commit, so a writer that dies (or loses its
connection) in between leaves committed events unannounced. Every ``catch_up_seconds``
the reader runs a round for every job stream of the process (the same query, one key per
watched job, ``KEYS_PER_QUERY`` keys a query: a job that is up to date costs one index
probe that finds nothing) and asks, in one more query, which company feeds have an event
after their cursor (``job_events_exist_after_company_cursors``), and wakes those. So an
event whose ring was lost reaches its streams within about ``catch_up_seconds``; one
whose ring arrives is read at once.

Never ahead: every event delivered here was read from the table, so it has committed.
A round that fails (database busy or down, or anything else, which is logged) is retried:
its jobs go back to the rung set for the next round, which comes after a short pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Final

import psycopg

from pgjobs import db
from pgjobs.events import event_from_row
from pgjobs.gateway.sse import read_rows

if TYPE_CHECKING:
    from pgjobs.gateway.state import GatewayState

log = logging.getLogger(__name__)

PAGE: Final = 500
"""Events read per job per round; a job with more is read again in the next round."""
KEYS_PER_QUERY: Final = 1_000
"""Jobs per query of a round. A catch-up with 10,000 job streams is ten queries, awaited
one after the other, not one: building and sending 10,000 keys at once held the event loop
(and so every stream's next event) for ~9 ms, 1,000 at a time for ~3 ms at most
(bench.catchup's longest stall, medians of 20 rounds on a loaded machine)."""
RETRY_SECONDS: Final = 0.5
"""The pause after a failed read before the next round."""


class JobEventReader:
    """Reads rung jobs' events for the fan-out, and catches every stream up periodically
    (see the module docstring). ``run`` is the gateway's task; ``rounds`` and ``reads``
    count rounds and queries (for tests and metrics)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.fanout = state.fanout
        self.wake = asyncio.Event()
        self.fanout.on_rung = self.wake.set
        self.rounds = 0
        self.reads = 0
        self.catch_ups = 0
        self.last_catch_up_seconds = 0.0
        """Wall time of the last catch-up round (both queries and the delivery)."""

    async def run(self) -> None:
        interval = self.state.settings.catch_up_seconds
        loop = asyncio.get_running_loop()
        due = loop.time() + interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, due - loop.time())):
                    await self.wake.wait()
            # Cleared before taking the rung jobs: a ring noted during the read wakes the
            # next round.
            self.wake.clear()
            rung = self.fanout.take_rung()
            catch_up = loop.time() >= due
            try:
                if catch_up:
                    due = loop.time() + interval
                    await self.catch_up(rung)
                elif rung:
                    await self.read(rung)
            except (psycopg.OperationalError, TimeoutError) as exc:  # PoolTimeout included
                log.warning("job reader: read failed, retrying: %s", db.describe_error(exc))
                self.fanout.give_back(rung)
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:
                # Anything else is a bug, but the reader is the only way rung events
                # reach their streams: log it and go on, rather than end the task.
                log.exception("job reader: round failed, retrying")
                self.fanout.give_back(rung)
                await asyncio.sleep(RETRY_SECONDS)

    async def read(self, rung: set[tuple[uuid.UUID, str]]) -> int:
        """One round for these rung jobs; returns the events delivered."""
        self.rounds += 1
        return await self._read(self.fanout.read_plan(rung))

    async def catch_up(self, rung: set[tuple[uuid.UUID, str]] | None = None) -> int:
        """A catch-up round: every job stream's new events, and a wake-up for each company
        feed with events after its cursor; returns the job events delivered."""
        started = time.perf_counter()
        self.rounds += 1
        self.catch_ups += 1
        if rung:
            self.fanout.read_plan(rung)  # the BACKFILLs for streams still starting
        delivered = 0
        for plan in self.fanout.catch_up_plans(KEYS_PER_QUERY):
            delivered += await self._read_keys(plan)
        feeds = self.state.company_feeds.cursors()
        if feeds:
            rows = await read_rows(
                self.state,
                "job_events_exist_after_company_cursors",
                {
                    "company_ids": [company for company, _ in feeds],
                    "xids": [cursor[0] for _, cursor in feeds],
                    "ids": [cursor[1] for _, cursor in feeds],
                },
            )
            self.reads += 1
            for row in rows:
                self.state.company_feeds.wake(row["company_id"])
        self.last_catch_up_seconds = time.perf_counter() - started
        return delivered

    async def _read(self, plan: list[tuple[uuid.UUID, str, int]]) -> int:
        delivered = 0
        for start in range(0, len(plan), KEYS_PER_QUERY):
            delivered += await self._read_keys(plan[start : start + KEYS_PER_QUERY])
        return delivered

    async def _read_keys(self, keys: list[tuple[uuid.UUID, str, int]]) -> int:
        rows = await read_rows(
            self.state,
            "job_events_after_seq_for_jobs",
            {
                "job_ids": [job_id for job_id, _, _ in keys],
                "company_ids": [company_id for _, company_id, _ in keys],
                "after_seqs": [after for _, _, after in keys],
                "limit": PAGE,
            },
        )
        self.reads += 1
        if rows and self.fanout.on_received is not None:
            self.fanout.on_received(rows[0]["job_id"], rows[0]["seq"])
        per_job: dict[uuid.UUID, int] = {}
        for row in rows:
            self.fanout.deliver(event_from_row(row))
            per_job[row["job_id"]] = per_job.get(row["job_id"], 0) + 1
        more = {(key[0], key[1]) for key in keys if per_job.get(key[0], 0) >= PAGE}
        if more:
            self.fanout.give_back(more)
        return len(rows)
