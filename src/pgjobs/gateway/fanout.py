"""One LISTEN connection per process, fanned out to every event stream it serves.

The gateway's single ``pgjobs.notifier.Listener`` hands each NOTIFY payload of
``pgjobs_events`` to ``Fanout.on_notify``, which reads it
(``pgjobs.events.parse_events_channel``) in either of its two forms:

* *Items* (``{"events": [...]}``: psql, the gateway's own writes, workers that do not
  ring): each event is routed by job id to the per-job streams (``deliver``) and by
  company id to a wake-up for that company's one reader
  (``pgjobs.gateway.companystream.CompanyFeed``).
* *A ring* (``{"ring": {companyId: [jobId, ...]}}``: transitions committed with the
  doorbell on, whose events are only in ``pgjobs.job_events``): the named companies' feeds
  are woken, and the named jobs that have a subscriber of that company are noted for the
  process's one reader of job events (``pgjobs.gateway.jobreader.JobEventReader``), which
  reads their new events from the table and hands them to ``deliver`` as if they had come
  in items. A ring for jobs nobody here watches costs no query.

No stream holds a database connection while it waits.

Contracts:

* Bounded and non-blocking. Each job subscriber has a bounded queue; delivery is
  ``put_nowait``. A subscriber whose queue is full is marked *overflowed* and its stream
  ends (the browser reconnects with Last-Event-ID and resumes from the table); it never
  delays anyone else.
* A NOTIFY is a hint, never the record. Anything that might have been missed (the LISTEN
  connection dropped and came back, a payload could not be parsed) becomes a *backfill*
  marker for every job subscriber and a wake-up for every company feed, and both re-read
  ``pgjobs.job_events`` after the last event they have. A ring lost between its commit
  and its send is caught up by the job reader's periodic round.
* Once per subscriber. Each job subscription knows the seq its stream will have sent once
  it has taken everything queued (``Subscription.seq``, told by the stream where it
  starts and after each read of the table); an event at or below it is not queued again,
  whether it came in an item or from a read after a ring. The stream still checks every
  event against its own cursor (a gap makes it re-read the table), so this only saves
  queue slots.
* Tenant-bound. A subscriber only receives events whose company matches its own, checked
  here on every event, even though a job id already implies its company.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Final, TypeVar

from pgjobs.events import LiveEvent, Ring, parse_events_channel

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
        # The seq the stream will have sent once it has taken everything queued; None
        # until the stream has read where it starts (see the module docstring).
        self.seq: int | None = None

    def reached(self, seq: int) -> None:
        """The stream has sent (or read from the table, to send) every event up to ``seq``."""
        if self.seq is None or seq > self.seq:
            self.seq = seq

    def offer_event(self, event: LiveEvent) -> None:
        """Queue a live event, unless it is one the stream already has."""
        if self.seq is not None:
            if event.seq <= self.seq:
                return
            self.seq = event.seq
        self.offer(event)

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
        # Told the audit row key (job id, seq) of the first event of each NOTIFY of items,
        # and of each read after rings (the notification lag metric's sample,
        # pgjobs.metrics.LagSampler).
        self.on_received: Callable[[uuid.UUID, int], None] | None = None
        # Set by the job reader (pgjobs.gateway.jobreader): told that rung jobs are waiting.
        self.on_rung: Callable[[], None] | None = None
        # (job id, company id) of rung jobs with a subscriber, not yet read.
        self._rung: set[tuple[uuid.UUID, str]] = set()
        self.notifies = 0
        self.rings = 0
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
            parsed = parse_events_channel(payload)
        except ValueError as exc:
            # We cannot tell whom this was for, so everyone re-reads the table.
            log.warning("unreadable NOTIFY payload (%s); backfilling every stream", exc)
            self._backfill_all()
            return
        if isinstance(parsed, Ring):
            self._on_ring(parsed)
            return
        if parsed and self.on_received is not None:
            self.on_received(parsed[0].job_id, parsed[0].seq)
        woken: set[str] = set()
        for event in parsed:
            self.deliver(event)
            woken.add(event.company_id)
        for company_id in woken:
            self._wake_company(company_id)

    def _on_ring(self, ring: Ring) -> None:
        self.rings += 1
        before = len(self._rung)
        for company_id, job_ids in ring.jobs.items():
            for job_id in job_ids:
                subs = self._by_job.get(job_id)
                # Only jobs watched here by a stream of the company the ring names: the
                # rest cost nothing (and another company's stream never gets a read).
                if subs and any(s.company_id == company_id and not s.ended for s in subs):
                    self._rung.add((job_id, company_id))
            self._wake_company(company_id)
        if len(self._rung) > before and self.on_rung is not None:
            self.on_rung()

    def deliver(self, event: LiveEvent) -> None:
        """Queue ``event`` for the subscribers of its job and company (an item's event, or
        one the job reader read after a ring)."""
        for sub in self._by_job.get(event.job_id, ()):
            if sub.company_id == event.company_id and not sub.ended:
                sub.offer_event(event)
                self.overflows += sub.overflowed

    def take_rung(self) -> set[tuple[uuid.UUID, str]]:
        """The rung (job id, company id) pairs not yet read, now the caller's to read."""
        rung, self._rung = self._rung, set()
        return rung

    def give_back(self, keys: set[tuple[uuid.UUID, str]]) -> None:
        """Rung pairs taken but not (or not fully) read: read them in the next round."""
        if keys:
            self._rung |= keys
            if self.on_rung is not None:
                self.on_rung()

    def read_plan(self, keys: set[tuple[uuid.UUID, str]]) -> list[tuple[uuid.UUID, str, int]]:
        """What the job reader reads for rung ``keys``: per (job id, company id) that still
        has a live subscriber, the lowest seq its subscribers have reached, after which
        its events are read. A subscriber that has not read where it starts yet gets a
        BACKFILL instead (it reads the table itself once it knows where to start: it may
        already have missed the event)."""
        plan: list[tuple[uuid.UUID, str, int]] = []
        for job_id, company_id in keys:
            after: int | None = None
            for sub in self._by_job.get(job_id, ()):
                if sub.company_id != company_id or sub.ended:
                    continue
                if sub.seq is None:
                    sub.offer(BACKFILL)
                elif after is None or sub.seq < after:
                    after = sub.seq
            if after is not None:
                plan.append((job_id, company_id, after))
        return plan

    def catch_up_plans(self, size: int) -> Iterator[list[tuple[uuid.UUID, str, int]]]:
        """read_plan for every job subscription, in lists of at most ``size`` keys, each
        built when it is asked for: the reader reads one before it asks for the next, so
        the event loop is never held for more than one list (at 10,000 subscriptions
        building them all at once was ~3 ms on a quiet machine). Streams still starting
        are left out (they read the table once they know where they start); streams that
        end meanwhile are skipped."""
        jobs = list(self._by_job.items())
        for start in range(0, len(jobs), size):
            plan: list[tuple[uuid.UUID, str, int]] = []
            for job_id, subs in jobs[start : start + size]:
                if len(subs) == 1:  # most jobs: one stream
                    for sub in subs:
                        if sub.seq is not None and not sub.ended:
                            plan.append((job_id, sub.company_id, sub.seq))
                    continue
                lowest: dict[str, int] = {}
                for sub in subs:
                    if sub.seq is not None and not sub.ended:
                        seen = lowest.get(sub.company_id)
                        if seen is None or sub.seq < seen:
                            lowest[sub.company_id] = sub.seq
                plan.extend((job_id, company_id, seq) for company_id, seq in lowest.items())
            if plan:
                yield plan

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
