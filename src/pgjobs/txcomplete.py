"""Transactional completion: a handler's own writes and its job's ``done`` in one commit.

``ctx.transaction(result=...)`` (``ctx.transaction_sync`` in a sync handler) opens a
transaction and hands its connection to the handler. When the block ends without an
exception, the job's completion is written on that same connection, with the statement
the completer uses (``job_finish_many_if_leased``, for this one job): guarded by id,
status 'running' and this attempt's lease token, its audit row written and its NOTIFY
queued by the same triggers. Then the transaction commits, and the handler's writes and
the job's ``done`` become visible together; or, if this attempt no longer holds the job
(cancelled, or its lease expired and another attempt took it), the statement matches no
row and ``LeaseLostError`` rolls the whole transaction back: nothing the handler wrote is
kept, and the job is not finished a second time. A worker killed before the commit leaves
an open transaction that PostgreSQL rolls back when the connection drops; the lease then
runs out, the job is rescued, and the next attempt starts from a database without the
first attempt's writes.

The result is passed to ``transaction()`` up front, so that it is in the same commit; the
worker records nothing more for the attempt (the completer is not asked to write the job
again), and whatever the handler returns or raises after the block is logged and
discarded. The job's row is locked only by that last statement, at the end of the block:
heartbeats keep renewing the lease while the handler works inside it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from pgjobs import db, metrics
from pgjobs.completer import Outcome, finish_params
from pgjobs.errors import LeaseLostError
from pgjobs.jobspec import check_json
from pgjobs.queries import QUERIES
from pgjobs.storage import Storage
from pgjobs.types import Job

log = logging.getLogger(__name__)


class TransactionalCompletion:
    """One attempt's ``ctx.transaction()``: opens the transaction, finishes the job in it,
    and remembers how that went (``committed``, ``lost``) for the worker."""

    def __init__(self, job: Job, pool: db.GuardedPool, dsn: str) -> None:
        self.job = job
        self._pool = pool
        self._dsn = dsn
        self._used = False
        self.committed = False
        """The job's completion committed with the handler's writes."""
        self.lost = False
        """The attempt had lost the job when it tried to complete; everything rolled back."""

    def _begin(self, result: Any) -> dict[str, Any]:
        if self._used:
            raise RuntimeError(
                f"job {self.job.id}: ctx.transaction() was already used by this attempt; "
                "a job is completed once, so put all of its writes in one block"
            )
        self._used = True
        check_json(result, "the result passed to ctx.transaction()")
        return finish_params([Outcome(self.job, "done", result=result)])

    def _finished(self, rows: list[Any]) -> None:
        if not rows:
            self.lost = True
            metrics.LEASE_LOSSES.labels("finish").inc()
            raise LeaseLostError(self.job.id, self.job.attempts)

    def _commit(self) -> None:
        self.committed = True
        metrics.TRANSITIONS.labels(self.job.job_type, "done").inc()
        log.debug("job %s: completed in the handler's transaction", self.job.id)

    @contextlib.asynccontextmanager
    async def transaction(self, result: Any = None) -> AsyncIterator[db.AsyncConn]:
        params = self._begin(result)
        # The block runs the handler's own code: however long it takes is the handler's
        # business, not a sign of a half-open socket (GuardedPool's use limit).
        async with (
            self._pool.unbounded_connection() as conn,
            db.transaction_ending_in_time(conn),
        ):
            # The worker's connections plan prepared statements generically (for the
            # claim: db.plans_generic); the handler's own are planned as anywhere else.
            # A connection that prepares nothing was never set so: no statement for it.
            if conn.prepare_threshold is not None:
                await conn.execute(QUERIES["transaction_plans_default"])
            yield conn
            # Only reached when the block raised nothing; an exception skips this and
            # rolls back. LeaseLostError raised here rolls back the handler's writes too.
            self._finished(await db.fetch_dicts(conn, QUERIES["job_finish_many_if_leased"], params))
        self._commit()

    @contextlib.contextmanager
    def transaction_sync(self, result: Any = None) -> Iterator[db.SyncConn]:
        # A sync handler runs in a worker thread and cannot use the worker's asyncio
        # pool: it gets a connection of its own for the block.
        params = self._begin(result)
        with db.connect_sync(self._dsn) as conn, conn.transaction():
            yield conn
            self._finished(db.fetch_dicts_sync(conn, QUERIES["job_finish_many_if_leased"], params))
        self._commit()


async def settle(
    completion: TransactionalCompletion, outcome: Outcome | None, storage: Storage
) -> Outcome | None:
    """What the worker still has to record for an attempt: ``outcome`` as it is, unless
    ``ctx.transaction()`` settled the attempt already (its commit finished the job, or it
    found the job lost and rolled back). Then nothing: the completer would find the job
    no longer running and report a lost lease. Whatever the handler returned or raised
    after that is logged here, and an asset it produced is deleted."""
    if outcome is None or not (completion.committed or completion.lost):
        return outcome
    job = completion.job
    if completion.committed and outcome.kind == "done" and outcome.result is None:
        pass  # the usual case: the handler returned nothing after its block
    else:
        log.warning(
            "job %s attempt %d: the handler %s after ctx.transaction() %s; that is discarded",
            job.id,
            job.attempts,
            "returned a result" if outcome.kind == "done" else f"failed ({outcome.error})",
            "had completed the job" if completion.committed else "found the job lost",
            extra=job.log_fields(),
        )
    if outcome.asset is not None:
        await storage.delete(outcome.asset.key)
    return None
