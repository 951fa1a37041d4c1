"""The records pgjobs hands to callers: jobs, events and assets."""

from __future__ import annotations

import operator
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

# The event types are defined with the rest of the event contract; imported here for
# JobEvent, and still importable from pgjobs.types.
from pgjobs.events import EventType as EventType

if TYPE_CHECKING:
    from psycopg._cursor_base import BaseCursor  # the type psycopg.rows uses for this
    from psycopg.rows import RowMaker

JsonValue = Any
"""A value that serialises to JSON (dict, list, str, int, float, bool or None)."""


class UnreadableTime(datetime):
    """A timestamptz PostgreSQL holds that Python cannot represent: before year 1, after
    year 9999, or ±infinity (the schema refuses them since sql/0005_time_bounds.sql, but a
    row written by hand before that, or with the CHECKs dropped, may hold one).

    pgjobs' connections load such a value as this instead of failing the whole read
    (``pgjobs.db``): it compares and sorts as the nearest time Python has (datetime.min
    or max, UTC), and ``raw`` is PostgreSQL's own text of it, which is how pgjobs shows
    it (``iso``). The worker's claim does not use it: a row it cannot read fails its job.
    """

    __slots__ = ("raw",)
    raw: str

    @classmethod
    def from_text(cls, raw: str) -> UnreadableTime:
        early = raw.endswith(" BC") or raw.startswith("-")
        edge = datetime.min if early else datetime.max
        value = cls(edge.year, edge.month, edge.day, edge.hour, edge.minute, edge.second,
                    edge.microsecond, tzinfo=UTC)  # fmt: skip
        value.raw = raw
        return value

    def __repr__(self) -> str:
        return f"UnreadableTime({self.raw!r})"


def iso(value: datetime | None) -> str | None:
    """A time as the API and the CLI show it: ISO 8601, or PostgreSQL's own text of a time
    Python cannot represent."""
    if value is None:
        return None
    if isinstance(value, UnreadableTime):
        return value.raw
    return value.isoformat()


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED)


_STATUSES = {status.value: status for status in JobStatus}


def job_status(value: str) -> JobStatus:
    """JobStatus(value), through a dict: the enum's own lookup costs ~0.35 µs a call,
    paid for every job the claim decodes."""
    return _STATUSES.get(value) or JobStatus(value)  # the enum call raises for unknowns


@dataclass(frozen=True, slots=True)
class Progress:
    fraction: float | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Job:
    id: uuid.UUID
    company_id: str
    job_type: str
    status: JobStatus
    input: JsonValue
    priority: int
    run_at: datetime
    attempts: int
    max_attempts: int
    result: JsonValue
    result_asset_id: uuid.UUID | None
    error_message: str | None
    source_task_id: str | None
    progress: Progress | None
    worker_id: str | None
    lease_token: int
    lease_expires_at: datetime | None
    event_seq: int
    started_at: datetime | None
    finished_at: datetime | None
    created_at: datetime
    updated_at: datetime
    # What enqueue says about this job: False when it was asked for with a unique key
    # another job held, and this is that other job (nothing was created). Not part of
    # the job's state (not compared, not in to_json).
    created: bool = field(default=True, compare=False)

    def log_fields(self) -> dict[str, Any]:
        """The ``extra=`` of a log record about this job's current attempt: the fields
        ``pgjobs.logs`` shows in both formats (``job_id``, ``company_id``, ``job_type``,
        ``attempt``, and ``worker_id`` when a worker holds or held it)."""
        return {
            "job_id": str(self.id),
            "company_id": self.company_id,
            "job_type": self.job_type,
            "attempt": self.attempts,
            "worker_id": self.worker_id,
        }

    def to_json(self) -> dict[str, Any]:
        """The job as the HTTP API and `pgjobs jobs ... --json` show it (camelCase)."""
        return {
            "id": str(self.id),
            "companyId": self.company_id,
            "jobType": self.job_type,
            "status": self.status.value,
            "input": self.input,
            "result": self.result,
            "resultAssetId": str(self.result_asset_id) if self.result_asset_id else None,
            "errorMessage": self.error_message,
            "sourceTaskId": self.source_task_id,
            "attempts": self.attempts,
            "maxAttempts": self.max_attempts,
            # The seq of the last event this state reflects: an event stream's `seq`, so a
            # page holding this record applies only events with a larger one.
            "seq": self.event_seq,
            "progress": None
            if self.progress is None
            else {"fraction": self.progress.fraction, "message": self.progress.message},
            "startedAt": iso(self.started_at),
            "finishedAt": iso(self.finished_at),
            "createdAt": iso(self.created_at),
            "updatedAt": iso(self.updated_at),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Job:
        fraction = row["progress_fraction"]
        message = row["progress_message"]
        return cls(
            id=row["id"],
            company_id=row["company_id"],
            job_type=row["job_type"],
            status=job_status(row["status"]),
            input=row["input"],
            priority=row["priority"],
            run_at=row["run_at"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            result=row["result"],
            result_asset_id=row["result_asset_id"],
            error_message=row["error_message"],
            source_task_id=row["source_task_id"],
            progress=None if fraction is None and message is None else Progress(fraction, message),
            worker_id=row["worker_id"],
            lease_token=row["lease_token"],
            lease_expires_at=row["lease_expires_at"],
            event_seq=row["event_seq"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


_JOB_SETTERS: tuple[Callable[[Job, Any], None], ...] = tuple(
    getattr(Job, f.name).__set__ for f in fields(Job)
)


def _built_job(values: Sequence[Any]) -> Job:
    """``Job(*values)`` (every field in order, ``created`` included), for the rows the
    claim and enqueue_many decode by the hundred. Job is frozen, so its ``__init__`` sets
    each of its 23 fields through ``object.__setattr__`` (finding the field's slot, then
    setting it): the slots set directly cost about a third less, ~1 µs per job. Job has
    no ``__post_init__``, so nothing else is skipped."""
    job = object.__new__(Job)
    for set_field, value in zip(_JOB_SETTERS, values, strict=True):
        set_field(job, value)
    return job


# The pgjobs.jobs columns a Job is built from, in the order of Job's fields (progress
# takes two columns).
_JOB_COLUMNS = (
    "id", "company_id", "job_type", "status", "input", "priority", "run_at", "attempts",
    "max_attempts", "result", "result_asset_id", "error_message", "source_task_id",
    "progress_fraction", "progress_message", "worker_id", "lease_token", "lease_expires_at",
    "event_seq", "started_at", "finished_at", "created_at", "updated_at",
)  # fmt: skip


def job_rows(cursor: BaseCursor[Any, Any]) -> RowMaker[Job]:
    """A psycopg row factory building Jobs from the result's tuples, for the claim: it
    decodes a hundred rows per round trip on the worker's critical path, and a dict per
    row plus Job.from_row's lookups cost a third more than this (~9.7 vs ~7.3 µs per row,
    measured on claimed rows). The columns are found by name once per result."""
    if cursor.description is None:
        raise TypeError("job_rows needs a statement that returns rows")
    positions = {column.name: i for i, column in enumerate(cursor.description)}
    missing = [name for name in _JOB_COLUMNS if name not in positions]
    if missing:
        raise TypeError(f"job_rows: the result has no column(s) {', '.join(missing)}")
    pick = operator.itemgetter(*(positions[name] for name in _JOB_COLUMNS))

    def make(values: Sequence[Any]) -> Job:
        (id_, company_id, job_type, status, input_, priority, run_at, attempts, max_attempts,
         result, result_asset_id, error_message, source_task_id, fraction, message, worker_id,
         lease_token, lease_expires_at, event_seq, started_at, finished_at, created_at,
         updated_at) = pick(values)  # fmt: skip
        return _built_job((
            id_, company_id, job_type, job_status(status), input_, priority, run_at, attempts,
            max_attempts, result, result_asset_id, error_message, source_task_id,
            None if fraction is None and message is None else Progress(fraction, message),
            worker_id, lease_token, lease_expires_at, event_seq, started_at, finished_at,
            created_at, updated_at, True,
        ))  # fmt: skip

    return make


EnqueuedValues = tuple[uuid.UUID, str, str, JsonValue, int, "datetime | None", int, "str | None"]
"""What a producer chose for one job: id, company_id, job_type, input, priority, run_at
(None: at once), max_attempts, source_task_id."""


def enqueued_jobs(values: Iterable[EnqueuedValues], now: datetime) -> list[Job]:
    """The Jobs ``job_insert_many`` stores for these values at ``now`` (the time it
    returns): the caller's values, ``run_at`` defaulting to ``now`` (and shown in
    ``now``'s time zone, the session's, as a read would), and for every other column the
    default of pgjobs.jobs (queued, no attempt yet, lease token 0, event seq 1, created
    and updated at ``now``). A bulk enqueue builds its Jobs this way instead of reading a
    thousand rows back (docs/benchmarks.md, "Bulk enqueue"); tests compare them with what
    a read of each job says.

    Each Job's slots are set one by one, unrolled, as ``_built_job`` sets them in a
    loop: ~0.7 µs per job less, for a bulk enqueue's thousands."""
    (set_id, set_company_id, set_job_type, set_status, set_input, set_priority, set_run_at,
     set_attempts, set_max_attempts, set_result, set_result_asset_id, set_error_message,
     set_source_task_id, set_progress, set_worker_id, set_lease_token, set_lease_expires_at,
     set_event_seq, set_started_at, set_finished_at, set_created_at, set_updated_at,
     set_created) = _JOB_SETTERS  # fmt: skip
    new = object.__new__
    queued = JobStatus.QUEUED
    tz = now.tzinfo
    jobs = []
    for id_, company_id, job_type, input_, priority, run_at, max_attempts, source_task in values:
        job = new(Job)
        set_id(job, id_)
        set_company_id(job, company_id)
        set_job_type(job, job_type)
        set_status(job, queued)
        set_input(job, input_)
        set_priority(job, priority)
        set_run_at(job, now if run_at is None else run_at.astimezone(tz))
        set_attempts(job, 0)
        set_max_attempts(job, max_attempts)
        set_result(job, None)
        set_result_asset_id(job, None)
        set_error_message(job, None)
        set_source_task_id(job, source_task)
        set_progress(job, None)
        set_worker_id(job, None)
        set_lease_token(job, 0)
        set_lease_expires_at(job, None)
        set_event_seq(job, 1)
        set_started_at(job, None)
        set_finished_at(job, None)
        set_created_at(job, now)
        set_updated_at(job, now)
        set_created(job, True)
        jobs.append(job)
    return jobs


# The columns job_claim_batch and job_claim_batch_limited return for each job they claim,
# in the order of Job's fields: all but those the claim itself sets (status 'running',
# worker_id, progress cleared, updated_at = started_at, both the claim's now, and
# lease_expires_at = started_at + the lease), which the worker knows without reading
# them back.
CLAIMED_COLUMNS = (
    "id", "company_id", "job_type", "input", "priority", "run_at", "attempts", "max_attempts",
    "result", "result_asset_id", "error_message", "source_task_id", "lease_token",
    "event_seq", "started_at", "finished_at", "created_at",
)  # fmt: skip


def claimed_jobs(
    names: Sequence[str], worker_id: str, lease_seconds: float
) -> Callable[[Sequence[Any]], Job]:
    """Builds the Jobs a claim by ``worker_id`` with a lease of ``lease_seconds`` returns
    from its rows' values, given the result's column ``names`` (CLAIMED_COLUMNS among
    them): the job as its row stands after the claim, as ``Job.from_row`` would build it
    from the whole row.

    Each field is set by its own line, from its column's position found once per result:
    the claim decodes up to 200 rows per round trip on the worker's critical path, and
    this costs ~1.2 µs a row where picking the values into a tuple and setting them in a
    loop (``_built_job``) cost ~2.2. lease_expires_at is not read but computed as the
    claim computes it (its now, started_at, plus make_interval(secs => lease_seconds),
    which rounds to the microsecond as ``round`` does), once per claim: every row of a
    claim has the same started_at, and a timestamp read costs ~0.37 µs."""
    positions = {name: i for i, name in enumerate(names)}
    missing = [name for name in CLAIMED_COLUMNS if name not in positions]
    if missing:
        raise TypeError(f"claimed_jobs: the result has no column(s) {', '.join(missing)}")
    (id_at, company_id_at, job_type_at, input_at, priority_at, run_at_at, attempts_at,
     max_attempts_at, result_at, result_asset_id_at, error_message_at, source_task_id_at,
     lease_token_at, event_seq_at, started_at_at, finished_at_at,
     created_at_at) = (positions[name] for name in CLAIMED_COLUMNS)  # fmt: skip
    new = object.__new__
    (set_id, set_company_id, set_job_type, set_status, set_input, set_priority, set_run_at,
     set_attempts, set_max_attempts, set_result, set_result_asset_id, set_error_message,
     set_source_task_id, set_progress, set_worker_id, set_lease_token, set_lease_expires_at,
     set_event_seq, set_started_at, set_finished_at, set_created_at, set_updated_at,
     set_created) = _JOB_SETTERS  # in the order of Job's fields  # fmt: skip
    running = JobStatus.RUNNING
    lease = timedelta(microseconds=round(lease_seconds * 1e6))
    # The last started_at seen (a claim's rows share it) and its lease's end.
    last_started: datetime | None = None
    last_end: datetime | None = None

    def make(values: Sequence[Any]) -> Job:
        nonlocal last_started, last_end
        job: Job = new(Job)
        set_id(job, values[id_at])
        set_company_id(job, values[company_id_at])
        set_job_type(job, values[job_type_at])
        set_status(job, running)  # what the claim set
        set_input(job, values[input_at])
        set_priority(job, values[priority_at])
        set_run_at(job, values[run_at_at])
        set_attempts(job, values[attempts_at])
        set_max_attempts(job, values[max_attempts_at])
        set_result(job, values[result_at])
        set_result_asset_id(job, values[result_asset_id_at])
        set_error_message(job, values[error_message_at])
        set_source_task_id(job, values[source_task_id_at])
        set_progress(job, None)  # the claim cleared it
        set_worker_id(job, worker_id)  # the claim set it
        set_lease_token(job, values[lease_token_at])
        started_at = values[started_at_at]
        if started_at != last_started:
            last_started = started_at
            # Added to the instant (the interval is microseconds alone, no days), then in
            # started_at's time zone, as it is read.
            last_end = (started_at.astimezone(UTC) + lease).astimezone(started_at.tzinfo)
        set_lease_expires_at(job, last_end)
        set_event_seq(job, values[event_seq_at])
        set_started_at(job, started_at)
        set_finished_at(job, values[finished_at_at])
        set_created_at(job, values[created_at_at])
        set_updated_at(job, started_at)  # the claim set both to its now
        set_created(job, True)
        return job

    return make


@dataclass(frozen=True, slots=True)
class JobEvent:
    id: int
    job_id: uuid.UUID
    company_id: str
    seq: int
    type: EventType
    status: JobStatus
    attempt: int
    worker_id: str | None
    payload: dict[str, JsonValue]
    created_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> JobEvent:
        return cls(
            id=row["id"],
            job_id=row["job_id"],
            company_id=row["company_id"],
            seq=row["seq"],
            type=EventType(row["type"]),
            status=job_status(row["status"]),
            attempt=row["attempt"],
            worker_id=row["worker_id"],
            payload=row["payload"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True, slots=True)
class Asset:
    id: uuid.UUID
    company_id: str
    namespace: str
    object_key: str
    content_type: str
    byte_size: int
    sha256: str
    original_filename: str | None
    source_task_id: str | None
    source_job_id: uuid.UUID | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Asset:
        return cls(**{name: row[name] for name in cls.__slots__})
