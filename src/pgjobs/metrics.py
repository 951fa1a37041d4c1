"""Prometheus metrics: every family pgjobs exposes, defined once, here.

Two kinds of family:

* Counters and histograms of what this process did (transitions it made, handler
  durations, rescues, retries, lease losses, LISTEN reconnects, notification lag). They
  live in prometheus_client's default registry, so they are process-wide, and a handler
  module's own metrics (also in the default registry, prometheus_client's default) are
  served alongside them.
* Gauges of state, read when scraped from the object that holds it (``StateCollector``):
  the queue depth from SQL (``QueueDepth``, cached for ``cache_seconds`` so a scrape
  storm cannot turn into a query storm), the pool, the listener, the gateway's SSE
  subscribers. A gateway or worker serves its own state, and several of them in one
  process (tests, ``pgjobs demo``) each serve theirs.

No family carries a company id: the gateway's ``/metrics`` is unauthenticated (like
``/healthz``), and company ids are tenants' names. Labels are job types, statuses,
event names, pool and channel names.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, LiteralString

import prometheus_client.metrics
import psycopg
from prometheus_client import REGISTRY, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString
from psycopg_pool import AsyncConnectionPool

from pgjobs import db

log = logging.getLogger(__name__)

# The text format generate_latest writes (names escaped to underscores), under the content
# type every Prometheus version reads; prometheus_client's CONTENT_TYPE_LATEST names 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# -- process-wide counters and histograms ------------------------------------------------

TRANSITIONS = Counter(
    "pgjobs_transitions_total",
    "Job transitions this process made, by job type and event (running: claimed; done, "
    "retrying, failed: an attempt recorded or a lease rescued).",
    ["job_type", "event"],
)

# A bound as the text format writes it (prometheus_client's own function, untyped).
_go_float: Callable[[float], str] = floatToGoString


@dataclass(slots=True)
class _Series:
    counts: list[int]  # per bucket, not cumulative; the last is +Inf's
    sum: float
    created: float


class LoopHistogram:
    """A labelled histogram that one event loop observes and a scrape reads, written as
    prometheus_client's ``Histogram`` writes it (buckets, count, sum, created): observed
    for ~0.25 µs instead of ~0.8. The worker observes every job it runs; prometheus_client
    takes a lock for each of a bucket's and the sum's increments, where one thread (the
    loop's) writing plain ints needs none. A scrape from another thread may come between
    a bucket's increment and the sum's: one observation off, for that scrape."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [_go_float(b) for b in self._bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], _Series] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = _Series([0] * len(self._les), 0.0, time.time())
            self._series[labels] = series
        # A bucket counts the values at most its bound (le): the first bound >= value.
        series.counts[bisect.bisect_left(self._bounds, value)] += 1
        series.sum += value

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with_created = prometheus_client.metrics._use_created
        for labels, series in list(self._series.items()):  # list(): one C call, no resize
            cumulative = list(itertools.accumulate(series.counts))
            family.add_metric(labels, list(zip(self._les, cumulative, strict=True)), series.sum)
            if with_created:
                family.samples.append(
                    Sample(f"{self.name}_created", dict(zip(self.labelnames, labels, strict=True)),
                           series.created)
                )  # fmt: skip
        yield family


HANDLER_DURATION = LoopHistogram(
    "pgjobs_handler_duration_seconds",
    "Time in the handler per attempt, by job type and outcome (done; error: will retry "
    "or failed after its last attempt; fail: failed without retry; abandoned: cancelled, "
    "lease lost or shut down).",
    ["job_type", "outcome"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600),
)
REGISTRY.register(HANDLER_DURATION)
RESCUES = Counter(
    "pgjobs_rescues_total",
    "Jobs whose lease expired and which this process's rescuer moved (back to queued, or "
    "failed when no attempt was left), by job type.",
    ["job_type"],
)
RETRIES = Counter(
    "pgjobs_retries_total",
    "Failed attempts this process recorded that queued their job again, by job type.",
    ["job_type"],
)
LEASE_LOSSES = Counter(
    "pgjobs_lease_losses_total",
    "Writes for an attempt that matched no row because the worker no longer held the job "
    "(cancelled or rescued): a fenced write. By write: finish, progress, heartbeat.",
    ["write"],
)
QUEUE_VACUUM_DURATION = Histogram(
    "pgjobs_queue_vacuum_duration_seconds",
    "VACUUMs of pgjobs.job_queue this worker ran (pgjobs.queue_vacuum: one worker among all "
    "per PGJOBS_QUEUE_VACUUM_SECONDS), by how long each took; its _count is how many.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
NOTIFICATION_LAG = Histogram(
    "pgjobs_notification_lag_seconds",
    "From an event's audit row (its transaction's start time, pgjobs.job_events.created_at) "
    "to this gateway having the event: its NOTIFY item received, or, for a transition "
    "announced by a ring, its row read back (rung jobs are read only while a stream here "
    "watches them); sampled, one event per NOTIFY of items and per read.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
LISTEN_RECONNECTS = Counter(
    "pgjobs_listen_reconnects_total",
    "Times a LISTEN connection was established again after a drop, by channel.",
    ["channel"],
)


# The worker counts every job it runs in these; prometheus_client's ``labels()`` costs
# ~1.5 µs a call (a tuple of str()s, a lock, a dict), as much as a fifth of what the
# worker spends on a no-op job all told. So transitions are counted per batch and job
# type, and the handlers' durations go to a LoopHistogram.


def count_transitions(counts: Mapping[tuple[str, str], int]) -> None:
    """Add ``n`` to TRANSITIONS for each ``(job_type, event): n``: one ``inc`` per job
    type and event of a batch instead of one per job."""
    for labels, n in counts.items():
        TRANSITIONS.labels(*labels).inc(n)


def observe_handler_duration(job_type: str, outcome: str, seconds: float) -> None:
    """Count one handler's time in ``pgjobs_handler_duration_seconds``; on the worker's
    event loop only (``LoopHistogram``)."""
    HANDLER_DURATION.observe((job_type, outcome), seconds)


# -- state gauges, read at scrape time ------------------------------------------------------

JOBS = "pgjobs_jobs"
JOBS_HELP = (
    "Jobs in the queue by job type and status: queued (due), scheduled (queued, not due "
    "yet: run_at in the future, including retries waiting out their delay), running."
)
OLDEST_QUEUED_AGE = "pgjobs_oldest_queued_age_seconds"
OLDEST_QUEUED_AGE_HELP = (
    "Seconds since the longest-waiting due queued job of each type became due (its run_at)."
)
POOL_IN_USE = "pgjobs_db_pool_in_use"
POOL_IN_USE_HELP = "Connections of this process's pool handed out, by pool."
POOL_WAITING = "pgjobs_db_pool_waiting"
POOL_WAITING_HELP = "Requests waiting for a connection of this process's pool, by pool."
LISTEN_CONNECTED = "pgjobs_listen_connected"
LISTEN_CONNECTED_HELP = "1 while this process's LISTEN connection is up, by channel."
SSE_SUBSCRIBERS = "pgjobs_sse_subscribers"
SSE_SUBSCRIBERS_HELP = "Open SSE event streams on this gateway, by kind (job, company)."

QUEUE_STATUSES = ("queued", "scheduled", "running")


@dataclass(slots=True)
class QueueDepth:
    """``pgjobs_jobs`` and ``pgjobs_oldest_queued_age_seconds``, from one read of
    ``pgjobs.job_queue`` (the queued and running jobs only) at most every
    ``cache_seconds``. A read that fails leaves the families out of the scrape rather
    than serving old numbers as current."""

    query: LiteralString
    cache_seconds: float = 5.0
    clock: Callable[[], float] = time.monotonic
    rows: list[dict[str, Any]] | None = None
    read_at: float | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def refresh(self, pool: AsyncConnectionPool[db.AsyncConn]) -> None:
        async with self._lock:  # concurrent scrapes share one read
            if self.read_at is not None and self.clock() - self.read_at < self.cache_seconds:
                return
            try:
                async with pool.connection(timeout=2.0) as conn:
                    cur = await conn.execute(self.query, {"now": None})
                    self.rows = await cur.fetchall()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                log.warning("metrics: could not read the queue depth (%s)", exc)
                self.rows = None
            self.read_at = self.clock()

    def collect(self) -> Iterator[Metric]:
        if self.rows is None:
            return
        jobs = GaugeMetricFamily(JOBS, JOBS_HELP, labels=["job_type", "status"])
        oldest = GaugeMetricFamily(OLDEST_QUEUED_AGE, OLDEST_QUEUED_AGE_HELP, labels=["job_type"])
        for row in self.rows:
            for status in QUEUE_STATUSES:
                jobs.add_metric([row["job_type"], status], float(row[status]))
            if row["oldest_queued_seconds"] is not None:
                oldest.add_metric([row["job_type"]], float(row["oldest_queued_seconds"]))
        yield jobs
        yield oldest


class StateCollector:
    """The state gauges of one worker or gateway: its pool, its listener, its queue-depth
    reads, and whatever ``extra`` yields (the gateway's subscribers)."""

    def __init__(
        self,
        pool_name: str,
        pool: Callable[[], AsyncConnectionPool[db.AsyncConn] | None],
        listeners: Callable[[], Mapping[str, bool]],
        depth: QueueDepth,
        extra: Callable[[], Iterable[Metric]] | None = None,
    ) -> None:
        self.pool_name = pool_name
        self.pool = pool
        self.listeners = listeners
        self.depth = depth
        self.extra = extra

    def collect(self) -> Iterator[Metric]:
        pool = self.pool()
        if pool is not None:
            stats = pool.get_stats()
            in_use = stats.get("pool_size", 0) - stats.get("pool_available", 0)
            yield _gauge(POOL_IN_USE, POOL_IN_USE_HELP, "pool", {self.pool_name: in_use})
            waiting = stats.get("requests_waiting", 0)
            yield _gauge(POOL_WAITING, POOL_WAITING_HELP, "pool", {self.pool_name: waiting})
        yield _gauge(
            LISTEN_CONNECTED,
            LISTEN_CONNECTED_HELP,
            "channel",
            {channel: int(up) for channel, up in self.listeners().items()},
        )
        yield from self.depth.collect()
        if self.extra is not None:
            yield from self.extra()


def _gauge(name: str, help_text: str, label: str, values: Mapping[str, float]) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=[label])
    for key, value in values.items():
        family.add_metric([key], float(value))
    return family


def sse_subscribers(job: int, company: int) -> Metric:
    return _gauge(SSE_SUBSCRIBERS, SSE_SUBSCRIBERS_HELP, "kind", {"job": job, "company": company})


class Exposition:
    """What one ``/metrics`` serves: the default registry's families (pgjobs' counters and
    histograms, prometheus_client's process metrics, any a handler module defines) and
    ``state``'s gauges."""

    def __init__(self, state: StateCollector) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()
        yield from self.state.collect()

    async def render(self, pool: AsyncConnectionPool[db.AsyncConn] | None) -> bytes:
        if pool is not None:
            await self.state.depth.refresh(pool)
        return generate_latest(self)


class LagSampler:
    """Samples of ``pgjobs_notification_lag_seconds``: the NOTIFY items carry no time, so
    the first event of each NOTIFY (and of each read of rung jobs' events, with the time
    the read returned) is kept by its audit row's key (job id, seq) with its receipt time
    (the newest ``max_samples``), and at the next scrape one query reads how
    long ago, by the database's clock, each of those audit rows was written. The lag is
    that age minus the time since receipt, so the two hosts' clocks need not agree."""

    def __init__(
        self,
        query: LiteralString,
        max_samples: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.query = query
        self.clock = clock
        self.samples: collections.deque[tuple[tuple[uuid.UUID, int], float]] = collections.deque(
            maxlen=max_samples
        )

    def received(self, job_id: uuid.UUID, seq: int) -> None:
        self.samples.append(((job_id, seq), self.clock()))

    async def observe(self, pool: AsyncConnectionPool[db.AsyncConn]) -> int:
        """Turn the samples into observations; returns how many were observed."""
        if not self.samples:
            return 0
        taken = dict(self.samples)
        self.samples.clear()
        sent = self.clock()
        params = {"job_ids": [key[0] for key in taken], "seqs": [key[1] for key in taken]}
        try:
            async with pool.connection(timeout=2.0) as conn:
                cur = await conn.execute(self.query, params)
                ages = await cur.fetchall()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("metrics: could not read event times for the notification lag (%s)", exc)
            return 0
        for row in ages:  # a row pruned meanwhile is simply missing
            lag = float(row["age_seconds"]) - (sent - taken[(row["job_id"], row["seq"])])
            NOTIFICATION_LAG.observe(max(0.0, lag))
        return len(ages)
