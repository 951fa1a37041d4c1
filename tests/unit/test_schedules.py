"""Slot math of periodic jobs (pgjobs.schedules.due): time is an input, nothing sleeps.

DST cases use Europe/Berlin in 2026: clocks jump from 02:00 CET to 03:00 CEST on
29 March (01:00 UTC) and from 03:00 CEST back to 02:00 CET on 25 October (01:00 UTC).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from pgjobs.errors import ConfigurationError
from pgjobs.registry import Registry
from pgjobs.schedules import MAX_SCAN, ON_TIME, SLOT_INPUT_KEY, Schedule, due


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


def berlin(cron: str, **kwargs: object) -> Schedule:
    return Schedule(
        name="s",
        cron=cron,
        job_type="report",
        company_id="acme",
        timezone="Europe/Berlin",
        **kwargs,  # type: ignore[arg-type]
    )


def simulate(schedule: Schedule, start: datetime, end: datetime, step: timedelta) -> list[str]:
    """Drive the scheduler's decision from ``start`` to ``end`` as a worker looking every
    ``step`` would: the slots enqueued, as UTC HH:MM (day-of-month prefixed)."""
    after, now, enqueued = start, start, []
    while now <= end:
        decision = due(schedule, after, now)
        if decision is not None:
            assert decision.enqueue, decision
            enqueued.append(decision.slot.strftime("%d %H:%M"))
            after = decision.slot
        now += step
    return enqueued


MINUTE = timedelta(minutes=1)


def test_spring_forward_fixed_time_runs_right_after_the_jump() -> None:
    # 02:30 does not exist on 29 March: the slot is 03:00 CEST (01:00 UTC), then 02:30
    # CEST (00:30 UTC) again the next day.
    schedule = berlin("30 2 * * *")
    got = simulate(schedule, utc(2026, 3, 28, 12), utc(2026, 3, 30, 12), MINUTE)
    assert got == ["29 01:00", "30 00:30"]


def test_spring_forward_wildcard_follows_the_wall_clock() -> None:
    # Every 30 minutes of local time: 01:30 CET, then 03:00 CEST, 30 real minutes apart.
    schedule = berlin("*/30 * * * *")
    got = simulate(schedule, utc(2026, 3, 28, 23, 45), utc(2026, 3, 29, 2, 0), MINUTE)
    assert got == ["29 00:00", "29 00:30", "29 01:00", "29 01:30", "29 02:00"]


def test_fall_back_fixed_time_runs_once() -> None:
    # 02:30 happens twice on 25 October (CEST, then CET): one slot, the first.
    schedule = berlin("30 2 * * *")
    got = simulate(schedule, utc(2026, 10, 24, 12), utc(2026, 10, 26, 12), MINUTE)
    assert got == ["25 00:30", "26 01:30"]


def test_fall_back_hourly_runs_in_both_repeated_hours() -> None:
    schedule = berlin("0 * * * *")
    got = simulate(schedule, utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 2, 30), MINUTE)
    # 02:00 CEST, 02:00 CET, 03:00 CET.
    assert got == ["25 00:00", "25 01:00", "25 02:00"]


def test_fall_back_never_goes_back_before_the_last_slot() -> None:
    # Starting inside the repeated hour (02:10 CET), cronsim's wall-clock view of
    # "30 2" yields 02:30 CEST, which is earlier: nothing is due until the next day.
    schedule = berlin("30 2 * * *")
    assert due(schedule, utc(2026, 10, 25, 1, 10), utc(2026, 10, 25, 1, 40)) is None
    decision = due(schedule, utc(2026, 10, 25, 1, 10), utc(2026, 10, 26, 1, 30))
    assert decision is not None
    assert decision.slot == utc(2026, 10, 26, 1, 30)


def test_local_time_keeps_its_hour_across_dst() -> None:
    # Looked at every 7 minutes: a catch-up window covers that.
    schedule = berlin("0 9 * * *", catch_up=timedelta(minutes=10))
    got = simulate(schedule, utc(2026, 3, 28, 0), utc(2026, 3, 30, 0), timedelta(minutes=7))
    assert got == ["28 08:00", "29 07:00"]


def test_nothing_due_before_the_first_slot() -> None:
    schedule = berlin("30 2 * * *")
    assert due(schedule, utc(2026, 3, 28, 12), utc(2026, 3, 29, 0, 59, 59)) is None


def test_on_time_slot_is_enqueued_without_catch_up() -> None:
    schedule = Schedule("s", "0 2 * * *", "report", "acme")
    decision = due(schedule, utc(2026, 1, 1, 2), utc(2026, 1, 2, 2) + ON_TIME)
    assert decision is not None
    assert (decision.slot, decision.enqueue, decision.passed_over) == (utc(2026, 1, 2, 2), True, 0)


def test_missed_slot_within_catch_up_is_enqueued_once_else_skipped() -> None:
    # No worker ran from Monday 02:00 to Tuesday 05:00.
    after, now = utc(2026, 1, 5, 2), utc(2026, 1, 6, 5)
    late = Schedule("s", "0 2 * * *", "report", "acme", catch_up=timedelta(hours=6))
    decision = due(late, after, now)
    assert decision is not None
    assert (decision.slot, decision.enqueue) == (utc(2026, 1, 6, 2), True)

    for catch_up in (timedelta(0), timedelta(hours=2, minutes=59)):
        strict = Schedule("s", "0 2 * * *", "report", "acme", catch_up=catch_up)
        decision = due(strict, after, now)
        assert decision is not None
        assert (decision.slot, decision.enqueue) == (utc(2026, 1, 6, 2), False)


def test_several_missed_slots_enqueue_the_latest_only() -> None:
    schedule = Schedule("s", "*/5 * * * *", "report", "acme", catch_up=timedelta(hours=1))
    decision = due(schedule, utc(2026, 1, 1, 10), utc(2026, 1, 1, 10, 27))
    assert decision is not None
    assert (decision.slot, decision.enqueue) == (utc(2026, 1, 1, 10, 25), True)
    assert (decision.passed_over, decision.first_passed_over) == (4, utc(2026, 1, 1, 10, 5))


def test_long_gap_jumps_to_the_latest_slot() -> None:
    # Every second, no worker for a day: not 86,400 slots walked.
    schedule = Schedule("s", "* * * * * *", "tick", "acme")
    now = utc(2026, 1, 2, 12, 0, 0) + timedelta(microseconds=250_000)
    decision = due(schedule, utc(2026, 1, 1, 12), now)
    assert decision is not None
    assert (decision.slot, decision.enqueue) == (utc(2026, 1, 2, 12), True)
    assert decision.passed_over > MAX_SCAN


def test_slot_time_goes_into_the_job_input() -> None:
    schedule = berlin("0 9 * * *", input={"kind": "daily"})
    assert json.loads(schedule.job_input(utc(2026, 3, 29, 7))) == {
        "kind": "daily",
        SLOT_INPUT_KEY: "2026-03-29T07:00:00+00:00",
    }


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cron": "61 * * * *"}, "is not a cron expression"),
        ({"cron": "* * *"}, "is not a cron expression"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"input": {SLOT_INPUT_KEY: 1}}, "may not have the key"),
        ({"catch_up": timedelta(seconds=-1)}, "catch_up"),
        ({"job_type": ""}, "job_type is required"),
        ({"name": " "}, "non-empty name"),
    ],
)
def test_schedule_is_checked_when_declared(changes: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "name": "s",
        "cron": "0 * * * *",
        "job_type": "report",
        "company_id": "acme",
        **changes,
    }
    with pytest.raises(ConfigurationError, match=message):
        Schedule(**fields)  # type: ignore[arg-type]


def test_registry_declares_schedules_by_name() -> None:
    registry = Registry()

    @registry.periodic("0 * * * *", job_type="report", company_id="acme")
    def report(ctx: object) -> None:
        return None

    assert report.__name__ == "report"  # returned unchanged
    with pytest.raises(ConfigurationError, match="'acme:report' is already declared"):
        registry.periodic("30 * * * *", job_type="report", company_id="acme")
    registry.periodic("30 * * * *", job_type="report", company_id="acme", name="half-past")
    assert {n: s.cron for n, s in registry.schedules.items()} == {
        "acme:report": "0 * * * *",
        "half-past": "30 * * * *",
    }
