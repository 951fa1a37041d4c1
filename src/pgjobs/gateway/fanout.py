"""One LISTEN connection per process, fanned out to every event stream it serves.

The gateway's single ``pgjobs.notifier.Listener`` hands each NOTIFY payload of
``pgjobs_events`` to ``Fanout.on_notify``, which reads it (``pgjobs.events.parse_events``)
and routes its events by job id (to per-job streams) and by company id (a wake-up for
that company's one reader, ``pgjobs.gateway.companystream.CompanyFeed``).
No stream holds a database connection while it waits.

Contracts:

* Bounded and non-blocking. Each job subscriber has a bounded queue; delivery is
  ``put_nowait``. A subscriber whose queue is full is marked *overflowed* and its stream
  ends (the browser reconnects with Last-Event-ID and resumes from the table); it never
  delays anyone else.
* A NOTIFY is a hint, never the record. Anything that might have been missed (the LISTEN
  connection dropped and came back, a payload could not be parsed) becomes a *backfill*
  marker for every job subscriber and a wake-up for every company feed, and both re-read
  ``pgjobs.job_events`` after the last event they have.
* Tenant-bound. A subscriber only receives events whose company matches its own, checked
  here on every event, even though a job id already implies its company.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Final, TypeVar

from pgjobs.events import LiveEvent, parse_events

log = logging.getLogger(__name__)


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


BACKFILL: Final = _Marker("BACKFILL")
"""Something may have been missed: re-read the table after the last event sent."""
CLOSED: Final = _Marker("CLOSED")
"""The gateway is shutting down: end the stream."""

Item = LiveEvent | _Marker
K = TypeVar("K")


class Subscription:
    """One stream's place in the fan-out. A job subscription reads ``queue``; a company
    subscription only counts and closes the stream (its events come from the company's
    feed)."""

    def __init__(self, company_id: str, job_id: uuid.UUID | None, queue_size: int) -> None:
        self.company_id = company_id
        self.job_id = job_id
        self.queue: asyncio.Queue[Item] = asyncio.Queue(queue_size)
        self.overflowed = False
        self.closed = False

    def offer(self, item: Item) -> None:
        if self.overflowed or self.closed:
            return
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.overflowed = True

    async def get(self) -> Item:
        return await self.queue.get()

    @property
    def ended(self) -> bool:
        return self.overflowed or self.closed


class Fanout:
    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self._by_job: defaultdict[uuid.UUID, set[Subscription]] = defaultdict(set)
        self._by_company: defaultdict[str, set[Subscription]] = defaultdict(set)
        self.closed = False
        # Set by the company feeds (pgjobs.gateway.companystream): told which companies' events
        # arrived, so one reader per company re-reads the table, not one per stream.
        self.on_company_wake: Callable[[str], None] | None = None
        # Told the audit row key (job id, seq) of the first event of each NOTIFY (the
        # notification lag metric's sample, pgjobs.metrics.LagSampler).
        self.on_received: Callable[[uuid.UUID, int], None] | None = None
        self.notifies = 0
        self.backfills = 0
        self.overflows = 0

    # -- subscribers ------------------------------------------------------------------

    def subscribe_job(self, company_id: str, job_id: uuid.UUID) -> Subscription:
        sub = Subscription(company_id, job_id, self.queue_size)
        if self.closed:
            sub.closed = True
        self._by_job[job_id].add(sub)
        return sub

    def subscribe_company(self, company_id: str) -> Subscription:
        sub = Subscription(company_id, None, 1)
        if self.closed:
            sub.closed = True
        self._by_company[company_id].add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.job_id is not None:
            _discard(self._by_job, sub.job_id, sub)
        else:
            _discard(self._by_company, sub.company_id, sub)

    @property
    def job_subscribers(self) -> int:
        return sum(len(s) for s in self._by_job.values())

    @property
    def company_subscribers(self) -> int:
        return sum(len(s) for s in self._by_company.values())

    @property
    def subscribers(self) -> int:
        return self.job_subscribers + self.company_subscribers

    # -- listener callbacks -----------------------------------------------------------

    def on_notify(self, payload: str) -> None:
        self.notifies += 1
        try:
            events = parse_events(payload)
        except ValueError as exc:
            # We cannot tell whom this was for, so everyone re-reads the table.
            log.warning("unreadable NOTIFY payload (%s); backfilling every stream", exc)
            self._backfill_all()
            return
        if events and self.on_received is not None:
            self.on_received(events[0].job_id, events[0].seq)
        woken: set[str] = set()
        for event in events:
            for sub in self._by_job.get(event.job_id, ()):
                if sub.company_id == event.company_id and not sub.ended:
                    sub.offer(event)
                    self.overflows += sub.overflowed
            woken.add(event.company_id)
        for company_id in woken:
            self._wake_company(company_id)

    async def on_connect(self) -> None:
        """Called by the Listener after every (re)LISTEN: whatever was sent while it was
        down is gone, so every stream catches up from the table."""
        self._backfill_all()

    def _backfill_all(self) -> None:
        self.backfills += 1
        for subs in self._by_job.values():
            for sub in subs:
                sub.offer(BACKFILL)
        for company_id in list(self._by_company):
            self._wake_company(company_id)

    def _wake_company(self, company_id: str) -> None:
        if self.on_company_wake is not None:
            self.on_company_wake(company_id)

    def close(self) -> None:
        """End every stream (gateway shutdown)."""
        self.closed = True
        for index in (self._by_job, self._by_company):
            for subs in index.values():
                for sub in subs:
                    sub.offer(CLOSED)
                    sub.closed = True


def _discard(index: dict[K, set[Subscription]], key: K, sub: Subscription) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[key]
