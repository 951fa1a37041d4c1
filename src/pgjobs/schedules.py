"""Periodic jobs: what a schedule is, and which of its slots are due at a given time.

Pure code, no database: the slot math takes time as an input, so it is tested at
daylight-saving boundaries without sleeping. ``pgjobs.scheduler`` stores schedules and
enqueues their slots.

Cron expressions are parsed and evaluated by cronsim (Healthchecks' cron library), in
the schedule's IANA time zone, with Debian cron's rules for DST transitions: a job at a
fixed local time that falls into the hour skipped in spring runs right after the jump
(``30 2 * * *`` in Europe/Berlin runs at 03:00 CEST that day); one that falls into the
hour repeated in autumn runs once; expressions with a wildcard minute or hour
(``*/5 * * * *``, ``0 * * * *``) run by the wall clock in both repeated hours. A sixth,
leading field gives seconds (``*/10 * * * * *``).

Catch-up: a slot is enqueued on time when the scheduler sees it within ``ON_TIME`` (30 s)
of its time; a later one (no worker ran at that time) is enqueued only within the
schedule's ``catch_up`` window. When several slots were missed, only the latest is
considered (catch-up enqueues once, not once per missed slot), and the earlier ones are
passed over and logged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from pgjobs.errors import ConfigurationError, InvalidJobError
from pgjobs.jobspec import DEFAULT_MAX_ATTEMPTS, MAX_TYPE_LENGTH, JobSpec

ON_TIME = timedelta(seconds=30)
"""How late a slot may be seen and still count as on time, whatever ``catch_up`` says:
the scheduler looks every second or so, and a slot it sees a moment late is not missed."""

SLOT_INPUT_KEY = "pgjobs_slot"
"""The key under which a scheduled job's input carries its slot time (ISO 8601, UTC).
The queued event's audit payload is built by the database's publish trigger and is the
same for every enqueue, so the slot is recorded here and in pgjobs.schedule_slots."""

MAX_SCAN = 1000
"""Slots walked forward from the last one before jumping to the latest due slot."""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A cron schedule that enqueues one job of ``job_type`` for ``company_id`` per slot."""

    name: str
    cron: str
    job_type: str
    company_id: str
    input: Mapping[str, Any] = field(default_factory=dict)
    timezone: str = "UTC"
    catch_up: timedelta = timedelta(0)
    priority: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigurationError("a schedule needs a non-empty name")
        if len(self.name) > MAX_TYPE_LENGTH:
            raise ConfigurationError(f"schedule name is longer than {MAX_TYPE_LENGTH} characters")
        where = f"schedule {self.name!r}"
        try:
            # The job it enqueues, checked now rather than at its first slot.
            spec = JobSpec(
                self.company_id,
                self.job_type,
                self.input,
                priority=self.priority,
                max_attempts=self.max_attempts,
            )
        except InvalidJobError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None
        object.__setattr__(self, "input", dict(spec.input or {}))
        if SLOT_INPUT_KEY in self.input:
            raise ConfigurationError(
                f"{where}: input may not have the key {SLOT_INPUT_KEY!r}, "
                "which pgjobs sets to the slot's time"
            )
        self.zone  # noqa: B018  # raises for an unknown time zone
        try:
            CronSim(self.cron, datetime.now(UTC))
        except (CronSimError, AttributeError, ValueError) as exc:
            raise ConfigurationError(
                f"{where}: {self.cron!r} is not a cron expression ({exc or type(exc).__name__})"
            ) from None
        if not isinstance(self.catch_up, timedelta) or self.catch_up < timedelta(0):
            raise ConfigurationError(f"{where}: catch_up must be a timedelta >= 0")

    @property
    def zone(self) -> ZoneInfo:
        try:
            return ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(
                f"schedule {self.name!r}: unknown time zone {self.timezone!r} "
                "(an IANA name, e.g. Europe/Berlin or UTC)"
            ) from None

    def job_input(self, slot: datetime) -> str:
        """The enqueued job's input as JSON: the schedule's, plus the slot time."""
        value = {**self.input, SLOT_INPUT_KEY: slot.astimezone(UTC).isoformat()}
        return json.dumps(value, allow_nan=False, separators=(",", ":"))

    def slots_after(self, after: datetime) -> CronSim:
        """The schedule's slots strictly after ``after``, as aware local datetimes.

        Callers compare in UTC and drop any slot not after ``after``: cronsim evaluates a
        fixed-time expression on the local wall clock, so starting inside the repeated
        autumn hour it can yield that hour's first occurrence, which is earlier."""
        return CronSim(self.cron, after.astimezone(self.zone))

    def next_slot(self, after: datetime) -> datetime | None:
        """The first slot after ``after`` (UTC), None if there is none in 50 years."""
        for slot in self.slots_after(after):
            if slot.astimezone(UTC) > after:
                return slot.astimezone(UTC)
        return None


@dataclass(frozen=True, slots=True)
class Due:
    """What to do with a schedule at one moment: its latest due slot, enqueued or skipped,
    and the earlier due slots passed over for it."""

    slot: datetime  # UTC
    enqueue: bool  # False: later than the catch-up window, recorded as skipped
    passed_over: int  # earlier due slots not enqueued (at least this many)
    first_passed_over: datetime | None


def due(schedule: Schedule, after: datetime, now: datetime) -> Due | None:
    """The slot to record for ``schedule`` at ``now``, given that every slot up to and
    including ``after`` is dealt with; None when no slot in (after, now] exists.

    The latest slot in (after, now] is enqueued if ``now`` is within ON_TIME or the
    schedule's ``catch_up`` of it, otherwise skipped; the earlier ones are passed over."""
    after, now = after.astimezone(UTC), now.astimezone(UTC)
    found: list[datetime] = []
    scanned_all = False
    for local in schedule.slots_after(after):
        slot = local.astimezone(UTC)
        if slot <= after:
            continue
        if slot > now:
            scanned_all = True
            break
        found.append(slot)
        if len(found) > MAX_SCAN:
            break
    else:
        scanned_all = True  # cronsim found no further slot within 50 years
    if not found:
        return None
    first, latest, count = found[0], found[-1], len(found)
    if not scanned_all:
        # A long gap (a schedule every second, no worker for a day): jump to the latest
        # slot by walking back from now instead of forward through every slot.
        start = now.replace(microsecond=0).astimezone(schedule.zone) + timedelta(seconds=1)
        latest = next(CronSim(schedule.cron, start, reverse=True)).astimezone(UTC)
    window = max(ON_TIME, schedule.catch_up)
    return Due(
        slot=latest,
        enqueue=now - latest <= window,
        passed_over=count - 1 if scanned_all else count,
        first_passed_over=first if first != latest else None,
    )
