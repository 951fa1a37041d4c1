"""Batched completion: many jobs' final transitions share one statement and one commit.

A commit that carries NOTIFY takes a database-wide lock, so finishing jobs one commit at
a time caps throughput. Handlers hand their outcome to the Completer and wait; it
gathers whatever finished within a few milliseconds and writes it all with
``job_finish_many_if_leased``, which only touches jobs whose lease the worker still
holds. A job missing from the result was cancelled or rescued meanwhile: its outcome is
discarded (logged) and any asset it produced is deleted, so a fenced-off attempt leaves
neither a row nor a file.

If the statement fails (connection killed, Postgres restarting) it is retried with the
same arguments. That is safe: a retry of a batch that did commit matches zero rows, and
an asset is only deleted once the database shows it is not linked to its job.

With a ``ringer`` (the worker's, when ``WorkerSettings.doorbell`` is on) a batch's
transaction asks for the doorbell (``pgjobs.doorbell``): its commit carries no NOTIFY
items, and once the batch's outcomes are resolved the completer hands the ringer the jobs
the statement finished (and any a dropped connection hid, found committed by the retry),
which rings for them on the events channel. Why: a commit carrying a NOTIFY holds
PostgreSQL's NOTIFY lock through its WAL flush, so finish batches (and claims) of several
workers could not share flushes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.types.string import TextLoader
from psycopg_pool import AsyncConnectionPool

from pgjobs import db, doorbell, metrics
from pgjobs.assets import StoredAsset
from pgjobs.events import RungJob
from pgjobs.queries import QUERIES
from pgjobs.storage import Storage
from pgjobs.types import Job

log = logging.getLogger(__name__)

# Measured and not taken (issue 16; interleaved pairs of 100,000-job drains at 1 / 2 / 4
# processes, load ~5 on 2 cores; median jobs/s ratio, PostgreSQL µs per job difference):
# max_in_flight 1: 0.99x / 0.98x / 0.97x, +1.5 / -0.1 / -0.1; 3: 1.03x / 0.99x / 1.04x, +1.9 /
# +0.9 / -1.0; a flush interval (WorkerSettings) of 0 / 2 / 10 ms for 5: 1.05x / 0.96x / 0.98x,
# 1.02x / 0.99x / 1.04x, 0.95x / 0.97x / 1.05x: none ahead at every count without more CPU.
MAX_BATCH = 1000
MAX_ERROR_LENGTH = 4000
MAX_TRACEBACK_BYTES = 16 * 1024  # the schema's CHECK (sql/0006) holds the same bound
_CUT = "(traceback cut to its last 16 KiB)\n"


def bound_traceback(text: str) -> str:
    """A traceback that fits MAX_TRACEBACK_BYTES in UTF-8, keeping its end: the innermost
    frames and the exception are what an operator reads first. NUL characters, which a
    PostgreSQL text value cannot hold, are dropped."""
    text = text.replace("\x00", "")
    encoded = text.encode()
    if len(encoded) <= MAX_TRACEBACK_BYTES:
        return text
    keep = MAX_TRACEBACK_BYTES - len(_CUT.encode())
    return _CUT + encoded[-keep:].decode("utf-8", "ignore")


@dataclass(slots=True)
class Outcome:
    """How one attempt ended. kind: 'done', 'error' (retry if attempts are left) or
    'fail' (failed now, no retry)."""

    job: Job
    kind: str
    result: Any = None
    error: str | None = None
    traceback: str | None = None
    """The handler's exception as formatted by the traceback module, for the audit log."""
    retry_delay: float = 0.0
    asset: StoredAsset | None = None
    on_recorded: Callable[[bool | Exception], None] | None = None
    """Called once the batch is written: True if the outcome took effect, False if the
    attempt had lost the job, or the exception that kept the batch from being written."""
    id_text: str | None = None
    """``str(job.id)``, when the caller has it already (the worker makes it once per
    attempt): what the ring after the batch sends."""
    recorded: bool = False

    def _resolve(self, result: bool | Exception) -> None:
        if not self.recorded:
            self.recorded = True
            if self.on_recorded is not None:
                self.on_recorded(result)


class Completer:
    def __init__(
        self,
        pool: AsyncConnectionPool[db.AsyncConn],
        storage: Storage,
        *,
        flush_interval: float,
        max_in_flight: int = 2,
        ringer: doorbell.Ringer | None = None,
        on_batch: Callable[[list[Outcome]], None] | None = None,
    ) -> None:
        """``on_batch``: called with each batch once all its outcomes are resolved (their
        ``on_recorded`` called), whether or not it could be written: the worker forgets a
        batch's jobs in one call, instead of a callback per job."""
        self.pool = pool
        self.ringer = ringer
        self.on_batch = on_batch
        self.storage = storage
        self.flush_interval = flush_interval
        self.max_in_flight = max_in_flight
        self._pending: list[Outcome] = []
        self._wakeup = asyncio.Event()
        self._closing = False
        self.batches = 0

    def submit(self, outcome: Outcome) -> None:
        """Queue an outcome; its on_recorded runs once the batch holding it is written.
        No future or task per job: at thousands of jobs a second those add up."""
        if outcome.id_text is None:
            outcome.id_text = str(outcome.job.id)
        if outcome.error is not None:
            outcome.error = outcome.error[:MAX_ERROR_LENGTH]
        if outcome.traceback is not None:
            outcome.traceback = bound_traceback(outcome.traceback)
        self._pending.append(outcome)
        self._wakeup.set()

    async def run(self) -> None:
        """Flush loop; returns once close() was called and everything pending is written.

        Up to ``max_in_flight`` batches are written at once, on separate connections:
        while one statement waits for PostgreSQL (and its commit for the disk), the next
        batch gathers and starts, so the database is never idle between batches. Their
        rows are disjoint and every writer locks in id order, so they cannot deadlock."""
        in_flight: set[asyncio.Task[None]] = set()
        while True:
            await self._wakeup.wait()
            if not self._closing and self.flush_interval > 0:
                # Let other handlers that finish right now share this commit.
                await asyncio.sleep(self.flush_interval)
            self._wakeup.clear()
            while self._pending:
                if len(in_flight) >= self.max_in_flight:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                task = asyncio.create_task(self._write_with_retry(batch))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if self._closing:
                await asyncio.gather(*in_flight)
                if not self._pending:
                    return

    def close(self) -> None:
        self._closing = True
        self._wakeup.set()

    async def _write_with_retry(self, batch: list[Outcome]) -> None:
        try:
            await self._write_batch(batch)
        except Exception as exc:
            # Not a dropped connection (those are retried): a bug or a refused statement.
            # Fail the waiting handlers instead of leaving them hanging; their jobs keep
            # their leases until these run out, and are then rescued and run again.
            log.exception("could not record %d finished job(s)", len(batch))
            for outcome in batch:
                outcome._resolve(exc)
            if self.on_batch is not None:
                self.on_batch(batch)

    async def _write_batch(self, batch: list[Outcome]) -> None:
        attempt = 0
        while True:
            try:
                finished = await self._write(batch)
                break
            except (
                psycopg.OperationalError,
                psycopg.errors.AdminShutdown,
                OSError,
                TimeoutError,  # a half-open connection (pgjobs.db.GuardedPool)
            ) as exc:
                attempt += 1
                delay = min(5.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0)
                log.warning(
                    "could not record %d finished job(s) (%s); retrying in %.2fs",
                    len(batch),
                    db.describe_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)
        self.batches += 1
        # One lookup per job, by its id's text (submit made it, if the worker had not).
        statuses = [finished.get(outcome.id_text or str(outcome.job.id)) for outcome in batch]
        _count(
            collections.Counter(
                (outcome.job.job_type, status)
                for outcome, status in zip(batch, statuses, strict=True)
                if status is not None
            )
        )
        rung: list[RungJob] = []
        for outcome, status in zip(batch, statuses, strict=True):
            took_effect = status is not None
            if not took_effect:
                took_effect = await self._discard(outcome, retried=attempt > 0)
            outcome._resolve(took_effect)
            if took_effect:
                rung.append((outcome.job.company_id, outcome.id_text or outcome.job.id))
        if self.ringer is not None:
            self.ringer.add(rung)  # after the batch's commit, as a ring must be
        if self.on_batch is not None:
            self.on_batch(batch)

    async def _write(self, batch: list[Outcome]) -> dict[str, str]:
        """Write the batch; returns the jobs it finished, each with its new status, by the
        text of their id."""
        params = finish_params(batch)
        # Tuples, not the pool's dicts: one row per job; its id read as text (psycopg's C
        # loader), not a UUID: the lookups above hash it in C, and the text is what
        # submit made for each job.
        async with self.pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            cur.adapters.register_loader("uuid", TextLoader)
            # With a ringer, _write_batch hands it the batch's jobs after the commit.
            ring = self.ringer is not None
            await doorbell.execute(cur, QUERIES["job_finish_many_if_leased"], params, ring=ring)
            return {job_id: status for job_id, status, _ in await cur.fetchall()}

    async def _discard(self, outcome: Outcome, *, retried: bool) -> bool:
        """Handle an outcome the batch did not apply. Returns True when it had in fact
        been applied by an earlier try whose connection died before the reply."""
        job = outcome.job
        if retried:
            async with self.pool.connection() as conn:
                cur = await conn.execute(QUERIES["job_get_any_company"], {"id": job.id})
                row = await cur.fetchone()
            if (
                row is not None
                and row["lease_token"] == job.lease_token
                and row["last_event"] in _FINISH_EVENTS
                and (outcome.asset is None or row["result_asset_id"] == outcome.asset.id)
            ):
                log.info(
                    "job %s: finish had committed before the connection dropped",
                    job.id,
                    extra=job.log_fields(),
                )
                _count({(job.job_type, row["status"]): 1})
                return True
        metrics.LEASE_LOSSES.labels("finish").inc()
        log.warning(
            "job %s attempt %d: result discarded, this worker no longer holds the job "
            "(cancelled, or its lease expired and it was rescued)",
            job.id,
            job.attempts,
            extra=job.log_fields(),
        )
        if outcome.asset is not None:
            await self.storage.delete(outcome.asset.key)
        return False


def finish_params(batch: list[Outcome]) -> dict[str, Any]:
    """The parameters of ``job_finish_many_if_leased`` that end these attempts (also used,
    for one job, by ``pgjobs.txcomplete`` inside a handler's transaction)."""
    params: dict[str, Any] = {
        "now": None,
        # Array literals: see the statement. An outcome's kind is a plain name (done,
        # error, fail) and a float's repr one PostgreSQL reads back exactly: no quoting.
        "ids": _literal([o.id_text or str(o.job.id) for o in batch]),
        "lease_tokens": _literal([str(o.job.lease_token) for o in batch]),
        "outcomes": _literal([o.kind for o in batch]),
        "results": _or_null([None if o.result is None else json.dumps(o.result) for o in batch]),
        "errors": _or_null([o.error for o in batch]),
        "tracebacks": _or_null([o.traceback for o in batch]),
        "retry_delays": _literal([repr(o.retry_delay) for o in batch]),
    }
    assets = [o.asset for o in batch]
    any_asset = any(a is not None for a in assets)
    for name, attribute in _ASSET_COLUMNS.items():
        # Most batches hold no asset: six NULLs then, not six lists of NULLs.
        params[name] = [getattr(a, attribute, None) for a in assets] if any_asset else None
    return params


def _count(finished: Mapping[tuple[str, str], int]) -> None:
    """The metrics of finished attempts, ``(job_type, new status): how many``: their
    transitions, and the retries among them."""
    metrics.count_transitions(
        {(job_type, "retrying" if status == "queued" else status): n
         for (job_type, status), n in finished.items()}
    )  # fmt: skip
    for (job_type, status), n in finished.items():
        if status == "queued":
            metrics.RETRIES.labels(job_type).inc(n)


def _literal(items: list[str]) -> str:
    """A PostgreSQL array literal of items that need no quoting."""
    return "{" + ",".join(items) + "}"


def _or_null(values: list[Any]) -> list[Any] | None:
    """The list, or None (SQL NULL) when every entry is None: the statement reads these
    arrays by position, and NULL[i] is NULL, so the two mean the same; NULL costs nothing
    to send, a hundred NULLs cost psycopg a pass over the list."""
    return None if values.count(None) == len(values) else values  # count: one C pass


# job_finish_many_if_leased's asset parameters, and the StoredAsset attribute of each.
_ASSET_COLUMNS = {
    "asset_ids": "id",
    "asset_keys": "key",
    "asset_content_types": "content_type",
    "asset_sizes": "byte_size",
    "asset_sha256s": "sha256",
    "asset_filenames": "filename",
}

_FINISH_EVENTS = frozenset({"content_job.done", "content_job.failed", "content_job.retrying"})
