"""What a producer asks for: one job to enqueue, validated before any SQL runs.

Bad input is rejected here with a message naming the field, never half-written: jsonb
refuses NUL characters and unpaired surrogates with an opaque error, and a job type or
company id of any length would make every index on them pay for it.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from pgjobs.errors import InvalidJobError

MAX_TYPE_LENGTH = 200
MAX_COMPANY_LENGTH = 200
MAX_INPUT_DEPTH = 64
MAX_ATTEMPTS_LIMIT = 1000
DEFAULT_MAX_ATTEMPTS = 3
INT32 = 2**31 - 1
MAX_UNIQUE_KEY_LENGTH = 255
JOB_STATUSES = ("queued", "running", "done", "failed", "cancelled")
DEFAULT_UNIQUE_WHILE = ("queued", "running")

# The times a caller may supply (run_at), after conversion to UTC, and the offsets they may
# carry. sql/0005_time_bounds.sql holds the schema's copy of the range (a test checks that
# the two agree). The upper end stays a day short of year 10000 so that the value still
# has a year below 10000 in any session time zone PostgreSQL hands it back in: Python's
# datetime (and so psycopg) cannot represent year 0 or 10000, and a row it cannot read
# used to stop every worker. Offsets: ISO 8601 and RFC 3339 allow any, real zones use
# -12:00 to +14:00, PostgreSQL refuses some Python accepts (-23:59); ±14:00 is the rule.
TIME_MIN = datetime(1970, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(9999, 12, 31, tzinfo=UTC)
MAX_UTC_OFFSET = timedelta(hours=14)


def check_json(value: Any, where: str, depth: int = 0) -> None:
    """Raise InvalidJobError unless value is JSON that PostgreSQL's jsonb will store."""
    if depth > MAX_INPUT_DEPTH:
        raise InvalidJobError(f"{where} is nested deeper than {MAX_INPUT_DEPTH} levels")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, bool) or value is None or isinstance(value, int):
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidJobError(f"{where} contains {value}, which JSON cannot represent")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidJobError(f"{where} has a non-string key {key!r}")
            _check_text(key, f"a key in {where}")
            check_json(item, where, depth + 1)
    elif isinstance(value, list | tuple):
        for item in value:
            check_json(item, where, depth + 1)
    else:
        raise InvalidJobError(f"{where} contains a {type(value).__name__}, which is not JSON")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise InvalidJobError(f"{where} contains a NUL character, which PostgreSQL cannot store")
    if text.isascii():  # a flag of the string: no surrogate, and no encoding to try
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidJobError(f"{where} contains an unpaired surrogate (invalid Unicode)") from None


def check_time(value: object, where: str) -> datetime:
    """value as a UTC datetime, or InvalidJobError (naming ``where``) unless it is an aware
    datetime whose offset is within ±14:00 and whose UTC time is within TIME_MIN..TIME_MAX.

    The result is always in UTC, so the offset the caller wrote never reaches PostgreSQL.
    """
    if not isinstance(value, datetime):
        raise InvalidJobError(f"{where} must be a datetime")
    offset = value.utcoffset()
    if offset is None:
        raise InvalidJobError(f"{where} must be timezone-aware (e.g. 2030-01-01T00:00:00Z)")
    if abs(offset) > MAX_UTC_OFFSET:
        raise InvalidJobError(f"{where} has a UTC offset beyond ±14:00")
    try:
        utc = value.astimezone(UTC)
    except OverflowError:  # year 0 or 10000 once converted
        utc = None
    if utc is None or not TIME_MIN <= utc <= TIME_MAX:
        raise InvalidJobError(
            f"{where} must lie between {TIME_MIN:%Y-%m-%dT%H:%M:%SZ} and "
            f"{TIME_MAX:%Y-%m-%dT%H:%M:%SZ} (UTC)"
        )
    return utc


def parse_time(text: str, where: str) -> datetime:
    """An ISO 8601 time with an offset (``Z`` included), checked by check_time."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidJobError(
            f"{where} must be an ISO 8601 time, e.g. 2030-01-01T09:00:00Z"
        ) from None
    if value.tzinfo is None:
        raise InvalidJobError(f"{where} needs a timezone, e.g. 2030-01-01T09:00:00Z")
    return check_time(value, where)


def _check_name(value: object, field_name: str, limit: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidJobError(f"{field_name} is required")
    if len(value) > limit:
        raise InvalidJobError(f"{field_name} is longer than {limit} characters")
    _check_text(value, field_name)
    return value


# One encoder for every input: json.dumps with any non-default argument builds a new
# JSONEncoder per call (~0.5 µs per job of a bulk enqueue); encoding with one is stateless.
_INPUT_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


# new_job_id's random bits, drawn from os.urandom for 512 ids at a time: one system call
# per id was ~0.4 µs of a bulk enqueue's ~1.3 µs per id. Each entry is an id's low 80 bits
# with the version and variant set and 62 random bits (RFC 9562's rand_b; the counter and
# the 48-bit time go above). A list iterator hands
# each entry out once, also to threads (next() on it is atomic under the GIL); a process
# forked from this one starts with none, so parent and child never share entries.
_IDS_PER_DRAW = 512
_VERSION_AND_VARIANT = 0x7 << 76 | 0b10 << 62
_LOW_62 = (1 << 62) - 1
_RANDOM_BYTES = 8  # 64 bits drawn for rand_b's 62
_random_tails: Iterator[int] = iter(())


def _draw_tails() -> Iterator[int]:
    data = os.urandom(_RANDOM_BYTES * _IDS_PER_DRAW)
    step = _RANDOM_BYTES
    randoms = [int.from_bytes(data[i : i + step], "big") for i in range(0, len(data), step)]
    return iter([r & _LOW_62 | _VERSION_AND_VARIANT for r in randoms])


def _forget_tails() -> None:
    global _random_tails
    _random_tails = iter(())


os.register_at_fork(after_in_child=_forget_tails)

# uuid.UUID's two slots (int, is_safe), set directly: UUID(int=) checks the range, which
# holds here by construction, and sets each through object.__setattr__ (~0.5 µs per id).
_UUID_SLOTS = vars(uuid.UUID)
_set_uuid_int = _UUID_SLOTS["int"].__set__
_set_uuid_is_safe = _UUID_SLOTS["is_safe"].__set__
_UNKNOWN_SAFETY = uuid.SafeUUID.unknown

# new_job_id's clock (a module attribute, so that tests can set the time) and its state:
# the last id's millisecond and count within it.
_clock_ns = time.time_ns
MAX_CLOCK_STEP_BACK_MS = 10_000
_MAX_MS = 0xFFFF_FFFF_FFFF
_MAX_COUNT = 0xFFF
_last_ms = -1
_count = 0


def new_job_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, a 12-bit counter (rand_a), then
    62 random bits; each id greater than the one before it in this process.

    Time-ordered ids keep inserts into the jobs primary key and the audit log's
    (job_id, seq) index on the right-hand pages; random UUIDv4s scatter them over the
    whole index, which stops fitting in memory after a few million jobs. The counter
    (RFC 9562's method 1) orders the ids of one millisecond too: with random bits there,
    a bulk enqueue's ids (hundreds per millisecond) landed at random places within the
    rightmost pages of the indexes keyed on or ending in the job id (the job rows' and
    queue rows' primary keys, the claim indexes, the audit log's (job_id, seq)). In
    order, each goes at the right-hand end, where PostgreSQL's B-tree inserts skip the
    descent from the root and split pages full instead of in halves: PostgreSQL's CPU per
    job of 1,000-job enqueue_many calls 15 -> 14 µs (bench.enqueue_cpu, 5 interleaved
    rounds, lower or equal in each).
    The 4,097th id of a millisecond takes the next millisecond; a clock set back less
    than MAX_CLOCK_STEP_BACK_MS keeps counting from the last id's, one set back further
    starts again from the clock (the ids stay unique through the random bits, and so
    they do when threads race for the counter).
    """
    global _random_tails, _last_ms, _count
    tail = next(_random_tails, None)
    if tail is None:
        _random_tails = _draw_tails()
        tail = next(_random_tails)
    ms = _clock_ns() // 1_000_000 & _MAX_MS
    if ms > _last_ms or ms < _last_ms - MAX_CLOCK_STEP_BACK_MS:
        _last_ms, _count = ms, 0
    elif _count < _MAX_COUNT:
        _count += 1
    else:  # 4,096 ids this millisecond: the next one's first
        _last_ms, _count = _last_ms + 1, 0
    job_id = object.__new__(uuid.UUID)
    _set_uuid_int(job_id, _last_ms << 80 | _count << 64 | tail)
    _set_uuid_is_safe(job_id, _UNKNOWN_SAFETY)
    return job_id


@dataclass(frozen=True, slots=True, init=False)
class JobSpec:
    """One job to enqueue, checked when built (InvalidJobError names the field). Frozen:
    ``dataclasses.replace`` makes a changed copy, checked again. ``id`` defaults to a new
    ``new_job_id()``."""

    company_id: str
    job_type: str
    input: Mapping[str, Any] | None = None  # None means {}
    source_task_id: str | None = None
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    id: uuid.UUID = field(default_factory=new_job_id)
    # Unique jobs (pgjobs.unique): while a job of this company with this key is in one
    # of unique_while's states (and, with unique_for, was enqueued within it), enqueue
    # returns that job instead of creating this one.
    unique_key: str | None = None
    unique_for: timedelta | None = None
    unique_while: tuple[str, ...] = DEFAULT_UNIQUE_WHILE

    # Written by hand: a frozen dataclass's own __init__ sets each of the eleven fields
    # through object.__setattr__ and calls new_job_id through a wrapper, ~2 µs of the
    # ~3.8 a spec cost; the slots' own setters take ~0.5 (a bulk enqueue's producer
    # builds thousands). The parameters are the fields', in order, with their defaults.
    def __init__(
        self,
        company_id: str,
        job_type: str,
        input: Mapping[str, Any] | None = None,
        source_task_id: str | None = None,
        priority: int = 0,
        run_at: datetime | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        id: uuid.UUID | None = None,
        unique_key: str | None = None,
        unique_for: timedelta | None = None,
        unique_while: tuple[str, ...] = DEFAULT_UNIQUE_WHILE,
    ) -> None:
        _set_company_id(self, company_id)
        _set_job_type(self, job_type)
        _set_input(self, input)
        _set_source_task_id(self, source_task_id)
        _set_priority(self, priority)
        _set_run_at(self, run_at)
        _set_max_attempts(self, max_attempts)
        _set_id(self, new_job_id() if id is None else id)
        _set_unique_key(self, unique_key)
        _set_unique_for(self, unique_for)
        _set_unique_while(self, unique_while)
        self.__post_init__()

    def __post_init__(self) -> None:
        # The common case first, cheaply (a bulk enqueue builds thousands of these): plain
        # str and int values, no input or an empty dict, the default unique_while. Every
        # other value takes the full checks, with the same messages.
        _check_name(self.company_id, "company_id", MAX_COMPANY_LENGTH)
        _check_name(self.job_type, "job_type", MAX_TYPE_LENGTH)
        input_ = self.input
        if input_ is None:
            object.__setattr__(self, "input", {})  # frozen dataclass: normalise once, here
        elif type(input_) is not dict or input_:
            if not isinstance(input_, Mapping):
                raise InvalidJobError("input must be a JSON object")
            check_json(input_, "input")
        if self.source_task_id is not None:
            _check_name(self.source_task_id, "source_task_id", MAX_TYPE_LENGTH)
        priority = self.priority
        if type(priority) is not int and (
            isinstance(priority, bool) or not isinstance(priority, int)
        ):
            raise InvalidJobError("priority must be an integer")
        if not -INT32 <= priority <= INT32:
            raise InvalidJobError("priority is out of range")
        max_attempts = self.max_attempts
        if type(max_attempts) is not int and (
            isinstance(max_attempts, bool) or not isinstance(max_attempts, int)
        ):
            raise InvalidJobError("max_attempts must be an integer")
        if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise InvalidJobError(f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}")
        if self.run_at is not None:
            object.__setattr__(self, "run_at", check_time(self.run_at, "run_at"))
        if self.unique_key is not None:
            _check_name(self.unique_key, "unique_key", MAX_UNIQUE_KEY_LENGTH)
        if self.unique_for is not None and (
            not isinstance(self.unique_for, timedelta) or self.unique_for <= timedelta(0)
        ):
            raise InvalidJobError("unique_for must be a positive timedelta")
        if self.unique_while is not DEFAULT_UNIQUE_WHILE:  # the default is valid as it is
            self._normalise_unique_while()

    def _normalise_unique_while(self) -> None:
        if isinstance(self.unique_while, str):
            raise InvalidJobError("unique_while must be a tuple of statuses, not a string")
        states = tuple(dict.fromkeys(self.unique_while))
        if not states or any(s not in JOB_STATUSES for s in states):
            raise InvalidJobError(
                f"unique_while must name one or more of {', '.join(JOB_STATUSES)}"
            )
        object.__setattr__(self, "unique_while", states)

    def input_json(self) -> str:
        if not self.input:  # most jobs of a bulk enqueue: skip the encoder's ~0.3 µs
            return "{}"
        return _INPUT_ENCODER.encode(self.input)


# JobSpec.__init__'s setters: the slots' descriptors, which the frozen class's
# __setattr__ does not stand in front of.
(_set_company_id, _set_job_type, _set_input, _set_source_task_id, _set_priority, _set_run_at,
 _set_max_attempts, _set_id, _set_unique_key, _set_unique_for, _set_unique_while) = (
    vars(JobSpec)[f.name].__set__ for f in fields(JobSpec)
)  # fmt: skip
