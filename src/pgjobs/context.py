"""What a handler receives: the job, its attempt, progress reporting, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pgjobs.types import Job

if TYPE_CHECKING:
    from pgjobs import db
    from pgjobs.txcomplete import TransactionalCompletion

log = logging.getLogger("pgjobs.handler")

MAX_PROGRESS_MESSAGE = 1000  # the schema's limit; longer messages are cut, not refused

ProgressWriter = Callable[[Job, float | None, str | None], Awaitable[bool]]


class JobContext:
    """Passed to every handler call.

    ``progress()`` commits a ``content_job.progress`` event at once (call it at the
    granularity a person watching would want, not per byte). ``cancelled`` turns true
    when the job is cancelled, this worker lost its lease, the worker is shutting down
    or the handler ran past its timeout (``cancel_reason`` says which); async handlers
    are also interrupted with CancelledError, sync handlers should poll ``cancelled``:
    their attempt is recorded without waiting for them, and what they return after
    that is discarded.
    """

    def __init__(
        self,
        job: Job,
        write_progress: ProgressWriter,
        loop: asyncio.AbstractEventLoop,
        new_completion: Callable[[Job], TransactionalCompletion] | None = None,
    ) -> None:
        """``new_completion``: makes this attempt's ``transaction()`` (its
        ``TransactionalCompletion``) on its first use, so that the jobs whose handlers
        never open one (most) cost the worker no such object; without it,
        ``transaction()`` is refused."""
        self.job = job
        self._new_completion = new_completion
        self._completion: TransactionalCompletion | None = None
        self._write_progress = write_progress
        self._loop = loop
        # A plain bool: set on the event loop, read by handlers (async, or sync in worker
        # threads, where reading an attribute is atomic); no per-job lock or Condition.
        self._cancelled = False
        self.cancel_reason: str | None = None

    @functools.cached_property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that tags every record with the job's ``Job.log_fields`` (id, company,
        type, attempt, worker), which ``pgjobs.logs`` shows."""
        return logging.LoggerAdapter(log, self.job.log_fields())

    @property
    def job_id(self) -> uuid.UUID:
        return self.job.id

    @property
    def company_id(self) -> str:
        return self.job.company_id

    @property
    def job_type(self) -> str:
        return self.job.job_type

    @property
    def input(self) -> Any:
        return self.job.input

    @property
    def attempt(self) -> int:
        return self.job.attempts

    @property
    def source_task_id(self) -> str | None:
        return self.job.source_task_id

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def _cancel(self, reason: str) -> None:
        self.cancel_reason = reason
        self._cancelled = True

    async def progress(self, fraction: float | None, message: str | None = None) -> bool:
        """Record progress (fraction in [0, 1]). Returns False, and changes nothing, when
        this attempt no longer holds the job (cancelled, or the lease was lost)."""
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress fraction must be between 0 and 1, got {fraction}")
        if self.cancelled:
            return False
        if message is not None:
            message = message.replace("\x00", "")[:MAX_PROGRESS_MESSAGE]
        return await self._write_progress(self.job, fraction, message)

    def progress_sync(self, fraction: float | None, message: str | None = None) -> bool:
        """progress() for sync handlers, which run in worker threads."""
        future = asyncio.run_coroutine_threadsafe(self.progress(fraction, message), self._loop)
        return future.result()

    def transaction(
        self, result: Any = None
    ) -> contextlib.AbstractAsyncContextManager[db.AsyncConn]:
        """``async with ctx.transaction(result) as conn:``: a connection in a transaction
        in which the job is completed with ``result`` at the end of the block, so that what
        the handler writes on ``conn`` and the job's ``done`` (audit row, NOTIFY) commit
        together. If this attempt lost the job meanwhile, everything rolls back and
        ``pgjobs.errors.LeaseLostError`` is raised; if the block raises, everything rolls
        back and the attempt fails as usual. Once per attempt; after the block the job is
        done and what the handler returns is discarded (``pgjobs.txcomplete``)."""
        return self._transactional().transaction(result)

    def transaction_sync(
        self, result: Any = None
    ) -> contextlib.AbstractContextManager[db.SyncConn]:
        """transaction() for sync handlers: ``with ctx.transaction_sync(result) as conn:``,
        on a connection of its own."""
        return self._transactional().transaction_sync(result)

    @property
    def completed(self) -> bool:
        """True once the job was completed in ``transaction()``, whose commit ended it."""
        return self._completion is not None and self._completion.committed

    def _transactional(self) -> TransactionalCompletion:
        if self._completion is None:
            if self._new_completion is None:
                raise RuntimeError("ctx.transaction() is only available to handlers a worker runs")
            self._completion = self._new_completion(self.job)
        return self._completion
