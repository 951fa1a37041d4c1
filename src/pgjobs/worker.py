"""The worker: claim jobs, run their handlers, record how each attempt ended.

Guarantees (see the README's "Delivery guarantees"):

* At-least-once execution. A job runs again if its worker dies or stalls past its lease,
  so handlers should be idempotent.
* Exactly one terminal transition per job. Every write made for an attempt is guarded
  by (id, status = 'running', lease_token); a worker that lost its lease (paused,
  partitioned, slow) updates zero rows, logs it, and its result is discarded.
* Only jobs it can run. A worker claims the job types its registry has handlers for (or
  the subset ``WorkerSettings.job_types`` names); a job no live worker serves stays
  queued rather than failing on a worker that happens to see it.
* Fair between companies. Within a priority level a claim shares its batch round-robin
  across the companies with queued work, starting after the company this worker served
  last (the rotation cursor the claim returns and the next claim passes back). While
  the last fair claim came back full of one company's jobs, claims take the oldest jobs
  instead (the same jobs then, for less work; ``FAIR_CLAIM_EVERY_SECONDS``).
* Exactly once for a handler's writes to the same database, if it wants: a job completed
  in ``ctx.transaction()`` commits with those writes or rolls back with them
  (``pgjobs.txcomplete``); the completer then records nothing more for the attempt.
* Within limits. Where a concurrency or rate limit can cover its job types
  (``pgjobs.limits``), a claim takes the limits' advisory locks and at most the room
  they leave (``job_claim_batch_limited``); a batch a limit cut short is claimed again
  at once, and with a rate limit a claim that came back short looks again when the
  window ends. A completion that frees a slot wakes this worker, as every completion
  does.
* A failed attempt is recorded with its message and, for an exception, its traceback
  (the audit row's ``payload.traceback``, sql/0006), and logged with it.
* Announced after the commit (``WorkerSettings.doorbell``, on by default): the claim,
  progress and finish transactions ask for the doorbell (``pgjobs.doorbell``), so their
  commits carry no NOTIFY on ``pgjobs_events`` and several workers' commits can share a
  WAL flush; once each has committed, the worker rings for the jobs it changed, on the
  events channel (for a claim, after starting the claimed jobs' handlers), through its
  one ringer: what commits while a ring is in flight goes in the next
  (``doorbell.Ringer``), and what is pending at shutdown is rung before the pool
  closes. A ring is best-effort: one not sent is logged, and listeners catch up from
  the audit log. The
  rare transitions (release at shutdown, unreadable or out-of-range jobs failed, a
  rescue) and a handler's own ``ctx.transaction()`` keep their items in the commit.

Moving parts, one asyncio task each: the fetch loop (claims up to the free concurrency
with SKIP LOCKED, up to two claims in flight, woken by NOTIFY or a poll timer), one task
per claim and per running job, the completer (batches final transitions into one
commit), the heartbeat (renews every held lease in one statement and stops jobs this
worker no longer holds), the ringer (with the doorbell on: sends the rings), the rescuer
(returns other workers' expired jobs to the queue), the scheduler (enqueues periodic
jobs' due slots, each once across all workers: ``pgjobs.scheduler``), the listener
(wake-ups and cancellations, on the workers' own NOTIFY channel:
``pgjobs.events.WORK_CHANNEL``, which carries no progress, running or terminal events),
when a retention policy is configured, the retention loop (``pgjobs.retention``: one
worker among all prunes per interval), and, unless turned off, the queue's vacuum
(``pgjobs.queue_vacuum``: one worker among all vacuums ``pgjobs.job_queue`` per interval).

The listener connects to ``PGJOBS_LISTEN_DSN`` when set (``pgjobs.db.listen_dsn``), so the
rest can go through PgBouncer in transaction mode. Where LISTEN cannot deliver (that
bouncer and no LISTEN DSN), the worker still works: the fetch loop claims every
``poll_interval_seconds`` whatever happens, and a cancelled job's handler is stopped at
the next heartbeat, which finds its lease gone.

Shutdown (SIGTERM/SIGINT): stop claiming, give running jobs ``shutdown_grace_seconds`` to
finish, then interrupt the rest and release them back to ``queued`` in one audited
statement, without using up an attempt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import socket
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, LiteralString

import psycopg
from psycopg.pq import Format

from pgjobs import (
    assets,
    db,
    doorbell,
    gcpolicy,
    metrics,
    queue_vacuum,
    rescuer,
    retention,
    scheduler,
    txcomplete,
)
from pgjobs.assets import GeneratedAsset
from pgjobs.completer import Completer, Outcome
from pgjobs.config import WorkerSettings
from pgjobs.context import JobContext
from pgjobs.errors import (
    AssetTooLargeError,
    ConfigurationError,
    InvalidAssetError,
    InvalidJobError,
    LeaseLostError,
)
from pgjobs.events import WORK_CHANNEL, Cancelled, RungJob, parse_work
from pgjobs.health import HealthServer
from pgjobs.jobspec import check_json
from pgjobs.notifier import Listener
from pgjobs.queries import QUERIES, compact, positional
from pgjobs.registry import Handler, Registry
from pgjobs.storage import Storage, from_settings
from pgjobs.types import Job, claimed_jobs

if TYPE_CHECKING:
    from psycopg._cursor_base import BaseCursor  # the type psycopg.rows uses for this
    from psycopg.rows import RowMaker

log = logging.getLogger(__name__)

# Claims of up to 200 jobs: a claim of 100 costs PostgreSQL ~5 µs more per job (each
# statement's fixed work, its triggers' included). A second claim goes out while one is
# out only as a whole batch (the worker has room for two: concurrency 400 or more), so
# that a worker of short jobs keeps both cores busy, one claim executing while the
# other's jobs run (one process: +20% jobs/s for ~5 µs of PostgreSQL CPU per job more,
# the second claim walking past the rows the first has locked). Limited claims too: the
# second waits for the first's limit locks, but its round trip is already made (limits
# configured and not binding: 0.947x the jobs/s of none with two out, 0.74x with limited
# claims kept to one; docs/benchmarks.md, "Limits that do not bind").
# Measured and not taken (issue 16, 10-12 interleaved pairs of 100,000-job drains at 1 / 2 / 4
# processes, load ~5 on 2 cores): claims of 300 at concurrency 600 cost PostgreSQL 2.0 / 3.5 /
# 2.8 µs less per job (jobs/s 1.14x / 1.01x / 1.18x, noisy) but another company's first job
# behind a backlog started at p99 54-70 ms over 3 fairness runs (200: 51-52; 47 at 600 alone);
# 400: behind after 2 rounds; one claim out at 4 processes: 0.95x, PostgreSQL +2.6 µs per job.
MAX_CLAIM_BATCH = 200
CLAIMS_IN_FLIGHT = 2
# After a fair claim that came back full of one company's jobs, the claims sent within
# this many seconds take the oldest jobs instead (queries.oldest_first: the same jobs
# while no other company has any due, for less PostgreSQL CPU with claims beside it).
# A NOTIFY of due work, a short claim or a failed one ends that at once; this bounds how
# long another company's job that became due without a NOTIFY (a retry's or a scheduled
# job's run_at reached; a listener behind a pooler) waits for the next fair claim.
FAIR_CLAIM_EVERY_SECONDS = 0.25


def retry_delay(attempt: int, settings: WorkerSettings) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, times [0.5, 1)."""
    delay = min(settings.retry_max_seconds, settings.retry_base_seconds * 2 ** max(0, attempt - 1))
    return float(delay * random.uniform(0.5, 1.0))


def _discard_late_result(ctx: JobContext, future: Future[Any]) -> None:
    """A sync handler that was stopped (timeout, cancel, lost lease, shutdown) returned:
    its attempt is already recorded, so its result or exception goes nowhere but here."""
    exc = future.exception()
    ctx.logger.warning(
        "job %s attempt %d: sync handler returned after it was stopped (%s); its %s is discarded",
        ctx.job_id,
        ctx.attempt,
        ctx.cancel_reason or "stopped",
        "result" if exc is None else f"exception ({type(exc).__name__}: {exc})",
    )


def claimable_types(registry: Registry, wanted: tuple[str, ...] | None) -> tuple[str, ...]:
    """The job types a worker claims: its registry's, or the subset ``wanted`` names.

    A worker never claims a job it has no handler for: another service's jobs, or jobs
    whose handlers are only on other workers, stay queued for a worker that has them.
    Naming a type the registry lacks is a configuration mistake and is refused."""
    if not wanted:
        return registry.job_types
    missing = sorted(set(wanted) - set(registry.job_types))
    if missing:
        raise ConfigurationError(
            f"--job-types names {', '.join(map(repr, missing))}, which the handler registry "
            f"does not have (it has: {', '.join(registry.job_types) or 'no handlers'})"
        )
    return tuple(dict.fromkeys(wanted))


def _unreadable_row(
    cur: psycopg.AsyncCursor[Any], row: int, error: Exception
) -> tuple[uuid.UUID, int, str, str] | None:
    """(id, lease_token, what could not be read, company_id as text: for its ring) of a
    claimed row that did not decode, or None if even its id or lease token cannot be read
    (then its lease runs out and the rescuer takes it back). Each column is loaded on its
    own, to name the ones at fault."""
    result = cur.pgresult
    if result is None or cur.description is None:
        return None
    values: dict[str, Any] = {}
    problems: list[str] = []
    for col, column in enumerate(cur.description):
        raw = result.get_value(row, col)
        if raw is None:
            values[column.name] = None
            continue
        fmt = Format(result.fformat(col))
        loader = cur.adapters.get_loader(column.type_code, fmt)
        try:
            values[column.name] = loader(column.type_code, cur).load(raw) if loader else raw
        except Exception as exc:  # named in the job's error message
            shown = bytes(raw).decode(errors="replace") if fmt == Format.TEXT else bytes(raw).hex()
            problems.append(f"{column.name} holds {shown[:100]!r} ({str(exc).strip()[:200]})")
    job_id, lease_token = values.get("id"), values.get("lease_token")
    if not isinstance(job_id, uuid.UUID) or not isinstance(lease_token, int):
        log.error("a claimed row cannot be read, not even its id (%s)", error)
        return None
    reason = "; ".join(problems) or f"{type(error).__name__}: {str(error).strip()[:300]}"
    return (
        job_id,
        lease_token,
        (
            f"pgjobs cannot read this job's row, so it was not run: {reason}; "
            "fix the row, then retry the job"
        ),
        str(values.get("company_id")),
    )


async def _execute_positional(
    cur: psycopg.AsyncRawCursor[Any], query: LiteralString, params: dict[str, Any], *, ring: bool
) -> None:
    """``query`` (as ``doorbell.ringing(query)`` with ``ring``) with ``params`` on a raw
    cursor: its text without comments (``queries.compact``: half the bytes to send)
    numbered once (``queries.positional``), the values in that order.

    Prepared at its first run on a connection that prepares statements, not its sixth
    (psycopg's threshold): PostgreSQL plans a claim ~2-4 ms, and on each connection it
    planned it ~10 times (5 unprepared runs, then the plan cache's 5 custom plans) before
    keeping one. Each worker process has its own connections, so four processes planned
    the claim 191 times in a 100,000-job drain where one process planned it 45 times,
    +7 µs of PostgreSQL per job (pg_stat_statements' planning counts; issue 16). The
    worker's pool also plans prepared statements generically (``db.plans_generic``),
    so the claim is planned once per connection, not five times more."""
    text, names = positional(compact(doorbell.ringing(query) if ring else query))
    await cur.execute(
        text, [params[name] for name in names], prepare=db.prepare_at_first_run(cur.connection)
    )


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Running:
    """A job this worker holds: in its handler, then waiting for its completion's commit."""

    job: Job
    ctx: JobContext
    # str(job.id), made once for the attempt's two rings (after its claim, after its
    # finish), each of which would otherwise make it (~0.5 µs).
    id_text: str
    task: asyncio.Task[None] = field(init=False)
    # Its task has taken its first step (Worker._execute runs): from then on _execute's
    # own finally forgets the job when it ends (Worker._stop_task).
    started: bool = False
    in_handler: bool = True
    finishing: bool = False
    # The loop time by which the handler must return (its type's timeout), while it runs
    # (Worker._deadlines_due); timed_out: it did not, and its task was cancelled for it.
    deadline: float | None = None
    timed_out: bool = False


# A claim result's Job maker, and the positions of after_company, held_back, limited and id.
_ClaimShape = tuple[Callable[[Sequence[Any]], Job], int, int | None, int | None, int]


@dataclass(slots=True)
class _ClaimNote:
    """What a claim's result said besides its jobs (Worker._fetch_claimed): how many jobs
    a limit held back (job_claim_batch_limited), and whether a limit refused the plain
    claim (job_claim_batch's row of NULLs); and the result's shape (_claimed_rows)."""

    held_back: int = 0
    limited: bool = False
    shape: _ClaimShape | None = None
    # The claimed jobs' ids as text, in the order of the jobs: read from the result as
    # PostgreSQL wrote them (str(UUID) costs ~0.5 µs a job), made with str() only where
    # the rows were decoded one by one (_decode_each).
    id_texts: list[str] = field(default_factory=list)


class Worker:
    def __init__(
        self,
        dsn: str,
        registry: Registry,
        settings: WorkerSettings | None = None,
        *,
        storage: Storage | None = None,
        worker_id: str | None = None,
        burst: bool = False,
        tune_gc: bool = False,
        listen_dsn: str | None = None,
    ) -> None:
        """burst=True: run until no job is due and none is running, then stop (for
        tests, cron-style draining, and pgjobs.testing). tune_gc=True: apply
        pgjobs.gcpolicy once started; process-wide, so only where the worker owns the
        process (``pgjobs worker``). listen_dsn: where the listener connects (default:
        PGJOBS_LISTEN_DSN, else ``dsn``)."""
        self.dsn = dsn
        self.listen_dsn = listen_dsn or db.listen_dsn(dsn)
        self.registry = registry
        self.settings = settings or WorkerSettings()
        self.storage = storage or from_settings(self.settings)
        self.id = worker_id or default_worker_id()
        self.job_types = claimable_types(registry, self.settings.job_types)
        self._claims_types = frozenset(self.job_types)
        self.tune_gc = tune_gc
        # Claimed and not yet recorded, by the text of their id (_Running.id_text): a str
        # hashes in C once, a UUID in Python at every lookup.
        self._running: dict[str, _Running] = {}
        self._active = 0  # of those, how many are still in their handler
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._reserved = 0  # slots promised to claims in flight
        # Claims in flight, counted by the claim itself: the loop can wake before a
        # finished claim's task has left its set (done callbacks run later).
        self._claims = 0
        self._queue_empty = False  # the last claim came back short
        self._look_again = False  # set by _wake()
        self._wakes = 0  # how many times _wake() was called: a claim compares before/after
        self._claim_failures = 0  # consecutive failed claims, for the backoff
        self._retry_at = 0.0  # loop time before which no claim is sent
        # The fair claim's rotation cursor: the company it served last, so the next claim
        # starts its round-robin after it (job_claim_batch in queries.sql).
        self._after_company: str | None = None
        # How many NOTIFYs of due work (and listener connects) came; until when (loop
        # time) claims take the oldest jobs (FAIR_CLAIM_EVERY_SECONDS), as long as none
        # came since the fair claim that allowed it (_oldest_announcements); how many have.
        self._announcements = 0
        self._oldest_until = 0.0
        self._oldest_announcements = 0
        self.oldest_claims = 0
        # _claimed_rows' makers, by the column names of the claim's result.
        self._claim_shapes: dict[tuple[bytes | None, ...], _ClaimShape] = {}
        # Limits (pgjobs.limits): the timer that looks again when a rate window ends, and
        # whether the last claim found a limit that can cover this worker's jobs: then the
        # next one claims through job_claim_batch_limited directly.
        self._limited = False
        self._window_timer: asyncio.TimerHandle | None = None
        # Handlers' timeouts: one timer, at or before the earliest deadline of a running
        # handler (_arm_deadline), instead of an asyncio.timeout per job.
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self._threads = ThreadPoolExecutor(
            max_workers=self.settings.concurrency, thread_name_prefix="pgjobs-handler"
        )
        self._pool: db.GuardedPool | None = None
        self._completer: Completer | None = None
        self._ringer: doorbell.Ringer | None = None  # set by run() with the doorbell on
        self.started = asyncio.Event()
        self.listener: Listener | None = None
        self.jobs_started = 0
        # The long-running tasks /readyz checks are alive (set by run()).
        self._loops: dict[str, asyncio.Task[None]] = {}
        self.retention: retention.PolicyLoop | None = None  # set by run()
        self.queue_vacuum: queue_vacuum.QueueVacuum | None = None  # set by run(), unless off
        self._depth = metrics.QueueDepth(QUERIES["job_queue_depth_by_type"])
        self.exposition = metrics.Exposition(
            metrics.StateCollector(
                "worker",
                lambda: self._pool,
                lambda: {WORK_CHANNEL: self._listening()},
                self._depth,
            )
        )
        self.health: HealthServer | None = None
        self.scheduler: scheduler.Scheduler | None = None
        self.burst = burst
        self.ran: list[uuid.UUID] = []  # burst mode only: the jobs this run started

    # -- lifecycle ---------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful shutdown (safe to call from a signal handler)."""
        self._stopping.set()
        self._wakeup.set()

    async def run(self) -> None:
        settings = self.settings
        self._loop = asyncio.get_running_loop()
        pool = await db.open_pool(
            self.dsn,
            min_size=2,
            # The ringer holds one (doorbell.Ringer), the queue's vacuum one while it runs.
            max_size=min(settings.concurrency, 8)
            + 3
            + (1 if settings.doorbell else 0)
            + (1 if settings.queue_vacuum_seconds > 0 else 0),
            name=f"pgjobs-worker {self.id}"[:63],
            use_timeout=settings.db_use_timeout_seconds,
            generic_plans=True,
        )
        self._pool = pool
        background: list[asyncio.Task[None]] = []
        ringer_task: asyncio.Task[None] | None = None
        registered = False
        try:
            async with pool.connection() as conn:
                await db.ensure_migrated(conn)
                registered = True  # the schema is there: leaving deregisters (below)
                await db.warn_unless_read_committed(conn, f"worker {self.id}")
                await conn.execute(
                    QUERIES["worker_register"],
                    {
                        "id": self.id,
                        "hostname": socket.gethostname(),
                        "pid": os.getpid(),
                        "job_types": list(self.job_types),
                        "concurrency": settings.concurrency,
                        "now": None,
                    },
                )
                await scheduler.declare(conn, self.registry.schedules.values())
            self.scheduler = scheduler.Scheduler(
                pool, self.registry.schedules, interval=settings.schedule_interval_seconds
            )
            if settings.doorbell:
                self._ringer = doorbell.Ringer(pool)
            self._completer = Completer(
                pool,
                self.storage,
                flush_interval=settings.flush_interval_seconds,
                ringer=self._ringer,
                on_batch=self._recorded,
            )
            self.listener = Listener(
                self.listen_dsn,
                self._on_notify,
                channel=WORK_CHANNEL,
                on_connect=self._on_listener_connect,
                heartbeat_seconds=max(settings.heartbeat_seconds, 1.0),
                name=f"pgjobs-listen {self.id}"[:63],
                when_unavailable=(
                    f"this worker falls back to polling for jobs every "
                    f"{settings.poll_interval_seconds:g}s (PGJOBS_POLL_INTERVAL_SECONDS) and "
                    "stops cancelled jobs at its next heartbeat; set PGJOBS_LISTEN_DSN to a "
                    "direct connection to PostgreSQL for immediate wake-ups"
                ),
            )
            completer_task = asyncio.create_task(self._completer.run(), name="pgjobs-completer")
            background = [
                asyncio.create_task(self.listener.run(), name="pgjobs-listener"),
                asyncio.create_task(self._heartbeat_loop(), name="pgjobs-heartbeat"),
                asyncio.create_task(self._rescue_loop(), name="pgjobs-rescuer"),
                asyncio.create_task(self.scheduler.run(), name="pgjobs-scheduler"),
            ]
            self._loops = {
                "listener_loop": background[0],
                "heartbeat": background[1],
                "rescuer": background[2],
                "scheduler": background[3],
                "completer": completer_task,
            }
            if self._ringer is not None:
                # Among the background tasks for a failed run's cleanup only: a normal
                # stop drains it first (below).
                ringer_task = asyncio.create_task(self._ringer.run(), name="pgjobs-ringer")
                background.append(ringer_task)
            self.retention = retention.PolicyLoop(
                pool,
                retention.Policy(
                    settings.retention_jobs, settings.retention_events, settings.retention_assets
                ),
                storage=self.storage,
                interval_seconds=settings.retention_interval_seconds,
                check_seconds=settings.retention_check_seconds,
            )
            if self.retention.policy.enabled:  # off by default
                background.append(
                    asyncio.create_task(self.retention.run(), name="pgjobs-retention")
                )
                self._loops["retention"] = background[-1]
            if settings.queue_vacuum_seconds > 0:
                # Not among the loops /readyz checks: it ends by itself where the role may
                # not vacuum the queue (logged), and the worker works on without it.
                self.queue_vacuum = queue_vacuum.QueueVacuum(
                    pool, interval_seconds=settings.queue_vacuum_seconds
                )
                background.append(
                    asyncio.create_task(self.queue_vacuum.run(), name="pgjobs-queue-vacuum")
                )
            if settings.metrics_port is not None:
                self.health = HealthServer(
                    settings.metrics_host,
                    settings.metrics_port,
                    render_metrics=lambda: self.exposition.render(self._pool),
                    readiness=self.readiness,
                )
                await self.health.start()
            log.info(
                "worker %s started: concurrency %d, job types %s",
                self.id,
                settings.concurrency,
                ", ".join(self.job_types) or "(none: the registry is empty)",
                extra={"worker_id": self.id},
            )
            if self.tune_gc:
                gcpolicy.tune_for_long_running_process(young=gcpolicy.WORKER_YOUNG_GC_AFTER)
            self.started.set()
            await self._fetch_loop()
            await self._drain()
            self._completer.close()
            await completer_task
            if self._ringer is not None and ringer_task is not None:
                # Last: claims, progress and the completer have handed it all they will.
                self._ringer.close()
                await ringer_task
        finally:
            if self._window_timer is not None:
                self._window_timer.cancel()
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            if self.health is not None:
                await self.health.stop()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            # Not before the schema check passed: on a database not migrated yet there is
            # no table to deregister from, and its error would hide the check's message.
            with contextlib.suppress(*db.TRANSIENT):
                if registered:
                    async with pool.connection(timeout=2.0) as conn:
                        await conn.execute(QUERIES["worker_deregister"], {"id": self.id})
            await pool.close()
            self._threads.shutdown(wait=False, cancel_futures=True)
            if registered:  # (a worker that never started says only why, elsewhere)
                log.info("worker %s stopped", self.id, extra={"worker_id": self.id})

    def _listening(self) -> bool:
        return self.listener is not None and self.listener.connected.is_set()

    async def readiness(self) -> dict[str, str]:
        """/readyz's checks, each "ok" or what is wrong: the database answers, the LISTEN
        connection is up, the worker is claiming (not shutting down), and each background
        loop is alive."""
        checks: dict[str, str] = {}
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("not started")
            async with pool.connection(timeout=2.0) as conn:
                await conn.execute(QUERIES["schema_check"])
            checks["database"] = "ok"
        except Exception as exc:  # any failure means "not ready", and says why
            checks["database"] = f"unavailable: {type(exc).__name__}"
        checks["listener"] = "ok" if self._listening() else "reconnecting"
        checks["claiming"] = "stopping" if self._stopping.is_set() else "ok"
        for name, task in self._loops.items():
            checks[name] = "stopped" if task.done() else "ok"
        return checks

    async def _drain(self) -> None:
        """Graceful part of shutdown: wait for running jobs, then release the rest."""
        if not self._running:
            return
        grace = self.settings.shutdown_grace_seconds
        log.info("waiting up to %.1fs for %d running job(s)", grace, len(self._running))
        tasks = [r.task for r in self._running.values()]
        _, still_running = await asyncio.wait(tasks, timeout=grace)
        interrupted = [r for r in list(self._running.values()) if not r.finishing]
        for entry in interrupted:
            entry.ctx._cancel("worker shutting down")
            self._stop_task(entry)
        await asyncio.gather(*still_running, return_exceptions=True)
        if interrupted:
            await self._release([r.job for r in interrupted])

    async def _release(self, jobs: list[Job]) -> None:
        assert self._pool is not None
        params = {
            "now": None,
            "ids": [j.id for j in jobs],
            "lease_tokens": [j.lease_token for j in jobs],
        }
        for attempt in range(5):
            try:
                async with self._pool.connection() as conn:
                    cur = await conn.execute(QUERIES["job_release_if_leased"], params)
                    released = await cur.fetchall()
                log.info("released %d unfinished job(s) back to the queue", len(released))
                return
            except db.TRANSIENT as exc:
                log.warning(
                    "could not release jobs (%s); retry %d", db.describe_error(exc), attempt + 1
                )
                await asyncio.sleep(0.2 * 2**attempt)
        log.error(
            "gave up releasing %d job(s); they will be rescued when their lease expires", len(jobs)
        )

    # -- claiming ----------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        """Claim while handler slots are free, up to CLAIMS_IN_FLIGHT claims at once, each
        of at most MAX_CLAIM_BATCH jobs and never more than the free slots; a claim sent
        while another is out asks for a whole MAX_CLAIM_BATCH.

        Each claim reserves its slots when sent, so the worker never holds more than its
        bounds; the next claim goes out as soon as the last one is back and slots are
        free, so a busy worker's claim overlaps its handlers and its finish batches. A
        claim that comes back short means the queue looked empty: no claim is sent again
        until something says to look (``_wake``: a NOTIFY, a freed slot, a reconnect) or
        the poll timer fires."""
        in_flight: set[asyncio.Task[None]] = set()
        failed: list[BaseException] = []  # a claim's unexpected error ends the loop, as inline

        def claim_done(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            if not task.cancelled() and (exc := task.exception()) is not None:
                failed.append(exc)
                self._wakeup.set()

        while not self._stopping.is_set():
            self._wakeup.clear()
            if failed:
                await asyncio.gather(*in_flight, return_exceptions=True)
                raise failed[0]
            if self._look_again:
                self._look_again = False
                self._queue_empty = False
            loop_time = asyncio.get_running_loop().time()
            if self._retry_at > loop_time:
                await self._sleep_unless_stopping(self._retry_at - loop_time)
                continue
            free = self._free_slots() - self._reserved
            while free > 0 and self._claims < CLAIMS_IN_FLIGHT and not self._queue_empty:
                if self._claims and free < MAX_CLAIM_BATCH:
                    break  # a second claim only as a whole batch
                limit = min(free, MAX_CLAIM_BATCH)
                free -= limit
                self._reserved += limit
                self._claims += 1
                task = asyncio.create_task(self._claim_and_start(limit, self._wakes))
                in_flight.add(task)
                task.add_done_callback(claim_done)
            if self.burst and self._queue_empty and not self._claims and not self._running:
                break
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally
                # when a cancel arrives as the wait ends, and the cancel is lost.
                async with asyncio.timeout(self.settings.poll_interval_seconds):
                    await self._wakeup.wait()
            except TimeoutError:
                self._queue_empty = False  # the poll: look again
        # Jobs a claim still in flight takes are started, so shutdown drains or releases them.
        await asyncio.gather(*in_flight, return_exceptions=True)
        if failed:
            raise failed[0]

    async def _claim_and_start(self, limit: int, wakes_when_sent: int) -> None:
        id_texts: list[str] = []
        try:
            jobs, id_texts = await self._claim(limit)
            self._claim_failures = 0
        except db.TRANSIENT as exc:
            self._back_off(f"claim failed ({db.describe_error(exc)})")
            jobs = []
        except (psycopg.DataError, psycopg.IntegrityError) as exc:
            # The claim statement itself failed on a row (it rolled back: nothing was
            # claimed). Fail the queued jobs whose times the schema's range refuses (what
            # makes a claim fail where the CHECKs were added NOT VALID), then claim again;
            # anything else backs off and is logged, and never stops the worker.
            jobs = []
            failed = await self._fail_out_of_range()
            if failed:
                log.error(
                    "claim failed (%s); failed %d job(s) holding a time out of range: %s",
                    db.describe_error(exc),
                    len(failed),
                    ", ".join(map(str, failed)),
                )
                self._wake()
            else:
                self._back_off(
                    f"claim failed on a data error ({db.describe_error(exc)})", log.error
                )
        finally:
            self._reserved -= limit
            self._claims -= 1
        start = self._start
        rung = [
            (job.company_id, start(job, text)) for job, text in zip(jobs, id_texts, strict=True)
        ]
        by_type = collections.Counter([job.job_type for job in jobs])  # counted in C
        metrics.count_transitions({(job_type, "running"): n for job_type, n in by_type.items()})
        if len(jobs) < limit and not self._claim_failures:
            if self._wakes == wakes_when_sent:
                self._queue_empty = True
            else:
                # A wake came while this claim was out: its job may have committed after
                # the claim's snapshot, and the loop may have had no slot to send another
                # claim for it. "Empty" would lose that wake-up until the poll timer.
                self._look_again = True
        # The loop decides again with this claim's slots and jobs accounted for.
        self._wakeup.set()  # not _wake(): a claim's own end is no reason to look again
        if jobs and self.settings.doorbell:
            # After the handlers started: they need nothing from the ring, only its
            # order after the claim's commit matters.
            self._ring(rung)

    def _ring(self, jobs: Sequence[RungJob]) -> None:
        """Ring for ``(company_id, job_id)`` pairs whose transitions committed with the
        doorbell on: handed to the ringer, which sends them with whatever else is
        pending (best-effort: a ring not sent is logged, never raised)."""
        assert self._ringer is not None, "the doorbell is on: run() made the ringer"
        self._ringer.add(jobs)

    def _back_off(self, reason: str, say: Any = log.warning) -> None:
        """No claim before an exponentially growing, jittered delay (at most 5 s)."""
        self._claim_failures += 1
        self._oldest_until = 0.0
        delay = min(5.0, 0.1 * 2**self._claim_failures) * random.uniform(0.5, 1.0)
        say("%s; retrying in %.2fs", reason, delay)
        self._retry_at = asyncio.get_running_loop().time() + delay

    def _wake(self) -> None:
        """Something may have changed (a job queued, a slot freed): claim again, even if
        the last claim found the queue empty."""
        self._look_again = True
        self._wakes += 1
        self._wakeup.set()

    def _free_slots(self) -> int:
        """How many jobs to claim now: handler slots free (``concurrency`` handlers at
        most), and no more than ``concurrency`` jobs held beyond them while their
        completions wait for a commit (their leases are held and renewed until then)."""
        concurrency = self.settings.concurrency
        return min(concurrency - self._active, 2 * concurrency - len(self._running))

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):  # not wait_for: see _fetch_loop
                await self._stopping.wait()

    async def _claim(self, limit: int) -> tuple[list[Job], list[str]]:
        """The jobs claimed, and their ids as text (_ClaimNote.id_texts)."""
        assert self._pool is not None
        params = {
            "now": None,
            "limit": limit,
            "worker_id": self.id,
            "lease_seconds": self.settings.lease_seconds,
            "job_types": list(self.job_types),
            "after_company": self._after_company,
        }
        ring = self.settings.doorbell
        async with self._pool.connection() as conn:
            note = _ClaimNote()  # what the claim's rows say besides the jobs
            # A raw cursor, sent each claim's text already numbered (queries.positional):
            # psycopg converts a named query on every execute, ~70 µs for the claim's.
            cur = psycopg.AsyncRawCursor(
                conn, row_factory=functools.partial(self._claimed_rows, note=note)
            )
            db.strict_times(cur)  # a time Python cannot represent raises (handled below)
            # Oldest-first (queries.oldest_first) while the last fair claim allowed it and no
            # due work was announced since (_after_claim).
            announcements = self._announcements
            oldest = (
                announcements == self._oldest_announcements
                and asyncio.get_running_loop().time() < self._oldest_until
            )
            if not self._limited:
                # job_claim_batch claims nothing where a limit can cover these jobs, and
                # then says so (its row of NULLs, limited): no statement asks before it,
                # not even before the first claim. (A refused claim is an UPDATE of no
                # row, which still fires jobs' statement triggers; since sql/0017 that
                # leaves no slow plan behind for the session: test_trigger_plans.)
                # With the doorbell on, the statement sets it itself (doorbell.ringing).
                # Pipelined after transaction_plans_by_index, in one transaction: planned
                # by index whatever job_queue's statistics say (that query's comment).
                claim = QUERIES["job_claim_batch_oldest" if oldest else "job_claim_batch"]
                async with conn.pipeline():
                    await conn.execute(QUERIES["transaction_plans_by_index"])
                    await _execute_positional(cur, claim, params, ring=ring)
                jobs = await self._fetch_claimed(conn, cur, note)
                if not note.limited:
                    self._after_claim(limit, jobs, oldest, announcements)
                    return jobs, note.id_texts
                self._limited = True
                self._oldest_until = 0.0
                oldest = False
            # Some limit may cover these jobs (pgjobs.limits): take the limits' locks,
            # then claim within the rooms they leave (counted in a snapshot taken under
            # them), sent together as one pipeline: one round trip, one transaction (the
            # statements before the pipeline's Sync run in one implicit transaction,
            # committed at the Sync), the locks held for the claim's own execution only.
            # The claim sets the doorbell itself, as the plain claim does.
            async with conn.pipeline():
                await conn.execute(QUERIES["transaction_plans_by_index"])
                locked = await conn.execute(QUERIES["limit_lock_for_types"], params)
                claim = QUERIES[
                    "job_claim_batch_limited_oldest" if oldest else "job_claim_batch_limited"
                ]
                await _execute_positional(cur, claim, params, ring=ring)
            locks = await locked.fetchone() or {}
            jobs = await self._fetch_claimed(conn, cur, note)
        self._after_claim(limit, jobs, oldest, announcements)
        self._limited = bool(locks.get("locked"))  # none: no limit covers these jobs now
        window_ends_in = locks.get("window_ends_in")
        if note.held_back:
            self._wake()  # a limit cut the batch short, not the queue: claim the rest
        elif window_ends_in is not None and len(jobs) < limit:
            self._wake_at_window_end(float(window_ends_in))
        return jobs, note.id_texts

    def _after_claim(self, limit: int, jobs: list[Job], oldest: bool, announcements: int) -> None:
        """Whether the next claims may take the oldest jobs: after a fair claim of more
        than one job that came back full of one company's (a fair share of a batch gives
        each company with due jobs some of it), until FAIR_CLAIM_EVERY_SECONDS from now;
        never after a short claim (the queue ran low: share what is left fairly), and
        only while no due work is announced after ``announcements`` (counted when this
        claim was sent: its snapshot may have missed what came later)."""
        if oldest:
            self.oldest_claims += 1
            if len(jobs) < limit:
                self._oldest_until = 0.0
            return
        company = jobs[0].company_id if jobs else None
        if limit > 1 and len(jobs) == limit and all(j.company_id == company for j in jobs):
            self._oldest_until = asyncio.get_running_loop().time() + FAIR_CLAIM_EVERY_SECONDS
            self._oldest_announcements = announcements
        else:
            self._oldest_until = 0.0

    async def _fetch_claimed(
        self, conn: db.AsyncConn, cur: psycopg.AsyncCursor[Job], note: _ClaimNote
    ) -> list[Job]:
        """The claimed jobs; first, what the result says besides them, read once from its
        last row (the same on every row): the rotation cursor (kept even if a row cannot
        become a Job), how many jobs a limit held back, whether a limit refused the claim
        (job_claim_batch's one row, of NULLs: no job). Read raw, as the claim's text
        result holds them (text, an int, a boolean as t or f), instead of on every row."""
        result = cur.pgresult
        if result is not None and note.shape is not None and result.ntuples:
            _, after_at, held_at, limited_at, _ = note.shape
            last = result.ntuples - 1
            if limited_at is not None and result.get_value(last, limited_at) == b"t":
                note.limited = True
                return []
            after = result.get_value(last, after_at)
            self._after_company = None if after is None else bytes(after).decode()
            if held_at is not None:
                held = result.get_value(last, held_at)
                note.held_back = 0 if held is None else int(bytes(held))
        try:
            jobs = await cur.fetchall()
        except Exception as exc:  # any row that cannot become a Job
            log.warning("a claimed row cannot be read (%s); reading them one by one", exc)
            jobs = await self._decode_each(conn, cur)
            note.id_texts = [str(job.id) for job in jobs]
            return jobs
        if result is not None and note.shape is not None:
            # Row i is jobs[i]: its id's text as PostgreSQL wrote it (uuid_out: lowercase,
            # hyphenated, as str(UUID) writes it), for the rings and the finish's literal.
            get, id_at = result.get_value, note.shape[4]
            note.id_texts = [(get(row, id_at) or b"").decode() for row in range(len(jobs))]
        return jobs

    def _wake_at_window_end(self, delay: float) -> None:
        """A claim came back short while a rate limit applies: its window's end may let
        held-back jobs start, and nothing else would announce it. One timer at a time."""
        loop = asyncio.get_running_loop()
        at = loop.time() + max(delay, 0.0)
        if self._window_timer is not None and self._window_timer.when() <= at:
            return
        if self._window_timer is not None:
            self._window_timer.cancel()
        self._window_timer = loop.call_at(at, self._window_ended)

    def _window_ended(self) -> None:
        self._window_timer = None
        self._wake()

    def _claimed_rows(self, cursor: BaseCursor[Any, Any], note: _ClaimNote) -> RowMaker[Job]:
        """The claim's row factory: Jobs (``types.claimed_jobs``); the result's shape goes
        in ``note``, for _fetch_claimed to read what the rows say besides the jobs."""
        result = cursor.pgresult
        assert result is not None
        # The result's column names, straight from libpq: cursor.description builds a
        # Column per column, and with claimed_jobs' setup that cost ~50 µs per claim.
        # The maker for a shape of result is made once (the two claims have one each).
        names = tuple(result.fname(i) for i in range(result.nfields))
        shape = self._claim_shapes.get(names)
        if shape is None:
            shape = self._claim_shapes[names] = self._claim_shape(names)
        note.shape = shape
        return shape[0]

    def _claim_shape(self, fnames: tuple[bytes | None, ...]) -> _ClaimShape:
        """For a claim's result with these column names: its Job maker, and the positions
        of after_company, held_back (job_claim_batch_limited's: how many jobs a limit held
        back) and limited (job_claim_batch's: true on its row of NULLs only, where a limit
        refused it)."""
        text = ["" if name is None else name.decode() for name in fnames]
        held_at = text.index("held_back") if "held_back" in text else None
        limited_at = text.index("limited") if "limited" in text else None
        make = claimed_jobs(text, self.id, self.settings.lease_seconds)
        return make, text.index("after_company"), held_at, limited_at, text.index("id")

    async def _decode_each(self, conn: db.AsyncConn, cur: psycopg.AsyncCursor[Job]) -> list[Job]:
        """The claimed rows that decode, as Jobs. The claim has committed: every row is
        this worker's now, so one that cannot be read (a value Python cannot represent, a
        status this version does not know...) is failed here with the reason, and the
        rest run."""
        jobs: list[Job] = []
        unreadable: list[tuple[uuid.UUID, int, str]] = []
        companies: list[str] = []  # of the unreadable rows, for their ring
        for row in range(cur.rowcount):
            await cur.scroll(row, "absolute")
            try:
                job = await cur.fetchone()
            except Exception as exc:  # reported in the job's error message
                bad = _unreadable_row(cur, row, exc)
                if bad is not None:
                    job_id, lease_token, error, company_id = bad
                    unreadable.append((job_id, lease_token, error))
                    companies.append(company_id)
                continue
            if job is not None:
                jobs.append(job)
        if unreadable:
            await self._fail_unreadable(conn, unreadable)
            if self.settings.doorbell:
                # Their claim committed with the doorbell on; the failure sent its items.
                jobs_rung = [(c, bad[0]) for c, bad in zip(companies, unreadable, strict=True)]
                self._ring(jobs_rung)
            self._wake()  # the batch came back short for them, not for an empty queue
        return jobs

    async def _fail_unreadable(
        self, conn: db.AsyncConn, unreadable: list[tuple[uuid.UUID, int, str]]
    ) -> None:
        ids, tokens, errors = (list(column) for column in zip(*unreadable, strict=True))
        for job_id, _, error in unreadable:
            log.error(
                "job %s: cannot read its row, failing it: %s",
                job_id,
                error,
                extra={"job_id": str(job_id), "worker_id": self.id},
            )
        try:
            cur = await conn.execute(
                QUERIES["job_fail_unreadable_if_leased"],
                {"ids": ids, "lease_tokens": tokens, "errors": errors, "now": None},
            )
            await cur.fetchall()
        except (*db.TRANSIENT, psycopg.DataError, psycopg.IntegrityError) as exc:
            # Still leased to this worker, which never runs them: the rescuer returns them
            # to the queue when the lease expires, and the next claim tries again.
            log.warning(
                "could not fail %d unreadable job(s) (%s)", len(unreadable), db.describe_error(exc)
            )

    async def _fail_out_of_range(self) -> list[uuid.UUID]:
        assert self._pool is not None
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    QUERIES["job_fail_out_of_range_if_queued"],
                    {"limit": MAX_CLAIM_BATCH, "now": None},
                )
                return [row["id"] for row in await cur.fetchall()]
        except (*db.TRANSIENT, psycopg.DataError, psycopg.IntegrityError) as exc:
            log.warning(
                "could not look for jobs holding a time out of range (%s)", db.describe_error(exc)
            )
            return []

    def _on_notify(self, payload: str) -> None:
        """A NOTIFY on the worker channel (``pgjobs.events.WORK_CHANNEL``): jobs became
        claimable, or a running job was cancelled. Claimable jobs of a type this worker
        does not claim, or not due yet (the database said so, and it still holds by this
        worker's clock), are no reason to claim: the poll finds them when due."""
        try:
            items = parse_work(payload)
        except ValueError as exc:
            # Unreadable: it may have announced work, so look.
            log.warning("unreadable %s NOTIFY payload (%s); claiming anyway", WORK_CHANNEL, exc)
            self._wake()
            return
        for item in items:
            if isinstance(item, Cancelled):
                self._interrupt(item.job_id, "job was cancelled")
            elif item.job_type in self._claims_types and (
                item.run_at is None or item.run_at <= datetime.now(UTC)
            ):
                self._announcements += 1  # maybe another company's: claim fairly
                self._wake()

    async def _on_listener_connect(self) -> None:
        # Anything announced while the listener was down is in the table: look now, fairly.
        self._announcements += 1
        self._wake()

    # -- running -----------------------------------------------------------------------

    def _start(self, job: Job, id_text: str) -> str:
        """Start the job's task, keyed by ``id_text`` (``str(job.id)``, as the claim's
        result gave it); returns that text (for the claim's ring)."""
        assert self._pool is not None
        assert self._loop is not None
        # The loop run() kept, not asyncio's lookup of the running loop (also inside
        # asyncio.create_task): on Python 3.11 each lookup is a getpid() system call.
        loop = self._loop
        # No TransactionalCompletion until the handler asks for ctx.transaction().
        ctx = JobContext(job, self._write_progress, loop, self._new_completion)
        entry = _Running(job, ctx, id_text)
        self._active += 1
        self._running[entry.id_text] = entry
        # No done callback: _execute forgets the job itself (its finally), which spares
        # every job a callback scheduled and run on the loop; _stop_task covers a task
        # stopped before its first step, whose coroutine never runs.
        entry.task = loop.create_task(self._execute(entry))
        self.jobs_started += 1
        if self.burst:
            self.ran.append(job.id)
        return entry.id_text

    def _new_completion(self, job: Job) -> txcomplete.TransactionalCompletion:
        """A handler's first ``ctx.transaction()``: its attempt's completion in it."""
        assert self._pool is not None
        return txcomplete.TransactionalCompletion(job, self._pool, self.dsn)

    def _stop_task(self, entry: _Running) -> None:
        """Cancel a job's task. One cancelled before its first step never runs its
        coroutine, so neither _execute's finally: a done callback forgets that one."""
        entry.task.cancel()
        if not entry.started:
            entry.task.add_done_callback(lambda _: self._done(entry))

    def _interrupt(self, job_id: uuid.UUID, reason: str) -> bool:
        """Stop a job's handler; False if it was not in its handler any more."""
        entry = self._running.get(str(job_id))
        if entry is None or entry.finishing or entry.ctx.cancelled or entry.ctx.completed:
            # A job completed in the handler's transaction is no longer running; the
            # handler may still be finishing what follows its block.
            return False
        log.warning("job %s: stopping handler: %s", job_id, reason, extra=entry.job.log_fields())
        entry.ctx._cancel(reason)
        self._stop_task(entry)
        return True

    async def _execute(self, entry: _Running) -> None:
        entry.started = True
        started = time.perf_counter()
        outcome: Outcome | None = None
        try:
            try:
                outcome = await self._attempt(entry)
                completion = entry.ctx._completion
                if completion is not None:
                    # Completed (or found lost) in ctx.transaction(): nothing left to record.
                    outcome = await txcomplete.settle(completion, outcome, self.storage)
            finally:
                kind = "abandoned" if outcome is None else outcome.kind
                metrics.observe_handler_duration(
                    entry.job.job_type,
                    "done" if entry.ctx.completed else kind,
                    time.perf_counter() - started,
                )
            if outcome is None:
                return
            # The handler's slot is free as soon as it returns: the fetch loop can claim
            # the next job while this one's completion waits for its commit. The job
            # stays held (its lease renewed) until the completer has written it.
            self._leave_handler(entry)
            entry.finishing = True  # until its batch is recorded (_recorded)
            outcome.id_text = entry.id_text
            assert self._completer is not None
            self._completer.submit(outcome)
        finally:
            # Whatever ended the attempt (returned, abandoned, cancelled, raised).
            self._done(entry)

    def _leave_handler(self, entry: _Running) -> None:
        if entry.in_handler:
            entry.in_handler = False
            self._active -= 1
            self._wake()

    def _done(self, entry: _Running) -> None:
        """A job's task ended: its handler's slot is free, and unless its completion is
        being written, the job is no longer held."""
        self._leave_handler(entry)
        if not entry.finishing:
            self._forget(entry)

    def _forget(self, entry: _Running) -> None:
        held = self._running.pop(entry.id_text, None)
        if held is not entry and held is not None:
            self._running[entry.id_text] = held  # another attempt's now: not this one's to drop
        self._wake()

    def _recorded(self, batch: list[Outcome]) -> None:
        """The completer's batch is recorded (or could not be): its jobs are no longer
        held. One call and one wake per batch, not per job."""
        running = self._running
        for outcome in batch:
            key = outcome.id_text or str(outcome.job.id)
            held = running.pop(key, None)
            if held is not None and held.job is not outcome.job:
                running[key] = held  # another attempt's now: not this one's to drop
        self._wake()

    async def _attempt(self, entry: _Running) -> Outcome | None:
        """Run the handler; None when the attempt was abandoned (cancelled, lease lost,
        shutdown), in which case nothing may be written for it."""
        job, ctx = entry.job, entry.ctx
        handler = self.registry.get(job.job_type)
        if handler is None:
            # Not reached through the claim, which takes only this registry's types; kept
            # for a handler removed from the registry after the worker started.
            known = ", ".join(self.registry.job_types) or "none"
            return self._failed(
                job,
                ctx,
                "fail",
                f"unknown job type {job.job_type!r}: no handler is registered for it "
                f"(this worker handles: {known}); start a worker whose --handlers registry "
                "has it, then retry the job",
            )
        # The handler runs in this task (no wait_for, which wraps it in a second task per
        # job); at its deadline the worker's one deadline timer cancels the task
        # (_deadlines_due), and that cancellation is told apart from a TimeoutError the
        # handler raised itself (an HTTP client's, say), which is an ordinary failure.
        # Not asyncio.timeout: ~1.7 µs per job on uvloop even without a timeout, ~3.5 with
        # one (its timer set and cancelled).
        try:
            if handler.timeout is not None:
                self._arm_deadline(entry, handler.timeout)
            try:
                if handler.is_async:
                    result = await handler.fn(ctx)
                else:
                    result = await self._run_in_thread(handler, ctx)
            finally:
                entry.deadline = None
            asset = None
            if isinstance(result, GeneratedAsset):
                asset = await assets.store(
                    self.storage, result, max_bytes=self.settings.max_asset_bytes
                )
                result = result.result
            try:
                if result is not None:  # most handlers return nothing
                    check_json(result, "the handler's result")
            except InvalidJobError as exc:
                if asset is not None:
                    await self.storage.delete(asset.key)
                return self._failed(job, ctx, "fail", str(exc))
            return Outcome(job, "done", result=result, asset=asset)
        except asyncio.CancelledError:
            if ctx.cancelled:
                return None
            if not entry.timed_out:
                raise
            # The deadline's cancellation, handled: this task goes on to record the attempt.
            entry.task.uncancel()
            error = f"timed out after {handler.timeout:g}s (the {job.job_type!r} timeout)"
            # A sync handler's thread runs on: this tells it to stop (and makes its
            # progress calls no-ops); the attempt is recorded now, not when it returns.
            ctx._cancel(error)
            return self._failed(job, ctx, "error", error)
        except LeaseLostError as exc:
            # From ctx.transaction(): rolled back, and the job is another attempt's now.
            ctx.logger.warning("%s", exc)
            return None
        except (AssetTooLargeError, InvalidAssetError) as exc:  # retrying cannot help
            return self._failed(job, ctx, "fail", str(exc))
        except TimeoutError as exc:  # the handler's own, never its deadline's
            error = f"TimeoutError: {exc}" if str(exc) else "TimeoutError raised by the handler"
            return self._failed(job, ctx, "error", error, exc)
        except Exception as exc:
            return self._failed(job, ctx, "error", f"{type(exc).__name__}: {exc}", exc)

    def _arm_deadline(self, entry: _Running, timeout: float) -> None:
        """Give a handler that starts now its deadline, keeping the deadline timer at or
        before the earliest one: reset only when this one is earlier (a shorter timeout),
        which with one timeout for every job happens once, not per job."""
        assert self._loop is not None
        entry.deadline = at = self._loop.time() + timeout
        timer = self._deadline_timer
        if timer is None or at < timer.when():
            if timer is not None:
                timer.cancel()
            self._deadline_timer = self._loop.call_at(at, self._deadlines_due)

    def _deadlines_due(self) -> None:
        """The deadline timer: stop the handlers whose deadline has come (cancel their
        task, marked ``timed_out``), then set the timer for the earliest one left. The
        handlers that ended since it was set cleared theirs. A timer may fire up to a
        millisecond early (uvloop's clock counts milliseconds); a deadline within that is
        due, as asyncio.timeout's would be."""
        assert self._loop is not None
        self._deadline_timer = None
        now = self._loop.time() + 0.001
        earliest: float | None = None
        for entry in self._running.values():
            at = entry.deadline
            if at is None:
                continue
            if at <= now:
                entry.deadline = None
                if not entry.ctx.cancelled:  # already being stopped for another reason
                    entry.timed_out = True
                    entry.task.cancel()
            elif earliest is None or at < earliest:
                earliest = at
        if earliest is not None:
            self._deadline_timer = self._loop.call_at(earliest, self._deadlines_due)

    def _failed(
        self,
        job: Job,
        ctx: JobContext,
        kind: str,
        error: str,
        exc: BaseException | None = None,
    ) -> Outcome:
        """A failed attempt's outcome, logged with its traceback: WARNING when the job
        will be retried, ERROR when this was its last attempt (or ``kind`` is 'fail')."""
        final = kind == "fail" or job.attempts >= job.max_attempts
        ctx.logger.log(
            logging.ERROR if final else logging.WARNING,
            "attempt %d of %d failed%s: %s",
            job.attempts,
            job.max_attempts,
            "" if final else ", will retry",
            error,
            exc_info=exc,
        )
        return Outcome(
            job,
            kind,
            error=error,
            traceback=None if exc is None else "".join(traceback.format_exception(exc)),
            retry_delay=retry_delay(job.attempts, self.settings) if kind == "error" else 0.0,
        )

    async def _run_in_thread(self, handler: Handler, ctx: JobContext) -> Any:
        """A sync handler's call, in one of the worker's threads."""
        future = self._threads.submit(handler.fn, ctx)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # The deadline, a cancel, a lost lease or shutdown stopped the wait; a thread
            # cannot be interrupted, so the handler runs on until it notices
            # ctx.cancelled. Whatever it returns then is not this attempt's result.
            if not future.cancel():
                future.add_done_callback(lambda f: _discard_late_result(ctx, f))
            raise

    async def _write_progress(self, job: Job, fraction: float | None, message: str | None) -> bool:
        assert self._pool is not None
        params = {
            "id": job.id,
            "lease_token": job.lease_token,
            "fraction": fraction,
            "message": message,
            "now": None,
        }
        try:
            async with self._pool.connection() as conn:
                cur = conn.cursor()
                ring = self.settings.doorbell  # the ring after the commit: below
                await doorbell.execute(cur, QUERIES["job_progress_if_leased"], params, ring=ring)
                updated = await cur.fetchone()
        except db.TRANSIENT as exc:
            log.warning(
                "job %s: progress not recorded (%s)",
                job.id,
                db.describe_error(exc),
                extra=job.log_fields(),
            )
            return False
        if updated is not None and self.settings.doorbell:
            self._ring([(job.company_id, job.id)])
        if updated is None:
            metrics.LEASE_LOSSES.labels("progress").inc()
            log.warning(
                "job %s: progress rejected, this worker no longer holds the job",
                job.id,
                extra=job.log_fields(),
            )
            return False
        return True

    # -- maintenance -------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        assert self._pool is not None
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            held = [e.job for e in self._running.values()]
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(QUERIES["worker_heartbeat"], {"id": self.id, "now": None})
                    if not held:
                        continue
                    cur = await conn.execute(
                        QUERIES["job_extend_leases"],
                        {
                            "ids": [j.id for j in held],
                            "lease_tokens": [j.lease_token for j in held],
                            "lease_seconds": self.settings.lease_seconds,
                            "now": None,
                        },
                    )
                    still_held = {row["id"] for row in await cur.fetchall()}
            except db.TRANSIENT as exc:
                log.warning(
                    "heartbeat failed (%s); leases not renewed this round", db.describe_error(exc)
                )
                continue
            for job in held:
                # A job whose completion is being written is counted by the completer,
                # should that write find the lease lost.
                if job.id not in still_held and self._interrupt(
                    job.id, "lease lost (cancelled or rescued by another worker)"
                ):
                    metrics.LEASE_LOSSES.labels("heartbeat").inc()

    async def _rescue_loop(self) -> None:
        assert self._pool is not None
        passes = 0
        while True:
            await asyncio.sleep(self.settings.rescue_interval_seconds * random.uniform(0.5, 1.5))
            try:
                rescued = await rescuer.rescue_expired(self._pool)
                # A rescued job that failed also freed a slot a limit may be waiting on.
                if rescued:
                    self._wake()
                passes += 1
                if passes % 30 == 0:
                    await rescuer.prune_stale_workers(self._pool)
                    await rescuer.delete_released_keys(self._pool)
            except (*db.TRANSIENT, psycopg.DataError) as exc:
                log.warning("rescue pass failed (%s)", db.describe_error(exc))
