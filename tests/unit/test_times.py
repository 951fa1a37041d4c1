"""Caller-supplied times (issue 19): one range, one UTC normalisation, for every layer."""

from __future__ import annotations

import datetime as dt

import pytest

from pgjobs.errors import InvalidJobError
from pgjobs.jobspec import TIME_MAX, TIME_MIN, JobSpec, parse_time

# The three inputs, an offset PostgreSQL refuses, the first offsets past ±14:00,
# no offset, the range's edges and a microsecond past them.
REFUSED = [
    ("0001-01-01T00:00:00+00:01", "must lie between"),
    ("9999-12-31T23:59:59-00:01", "must lie between"),
    ("9999-12-31T23:59:59-23:59", "offset beyond ±14:00"),
    ("2030-01-01T00:00:00+14:01", "offset beyond ±14:00"),
    ("2030-01-01T00:00:00-14:01", "offset beyond ±14:00"),
    ("2030-01-01T00:00:00", "needs a timezone"),
    ("1969-12-31T23:59:59.999999Z", "must lie between"),
    ("9999-12-31T00:00:00.000001Z", "must lie between"),
    ("tomorrow", "must be an ISO 8601 time"),
]
ACCEPTED = [
    ("2030-01-01T00:00:00+14:00", dt.datetime(2029, 12, 31, 10, tzinfo=dt.UTC)),
    ("2030-01-01T00:00:00-14:00", dt.datetime(2030, 1, 1, 14, tzinfo=dt.UTC)),
    ("2030-01-01T00:00:00Z", dt.datetime(2030, 1, 1, tzinfo=dt.UTC)),
    ("1970-01-01T00:00:00Z", TIME_MIN),
    ("9999-12-31T00:00:00Z", TIME_MAX),
]


@pytest.mark.parametrize(("text", "message"), REFUSED)
def test_times_out_of_range_or_with_odd_offsets_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidJobError, match=message):
        parse_time(text, "runAt")
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        return
    with pytest.raises(InvalidJobError, match="run_at"):
        JobSpec("acme", "echo", run_at=value)


@pytest.mark.parametrize(("text", "utc"), ACCEPTED)
def test_accepted_times_are_converted_to_utc(text: str, utc: dt.datetime) -> None:
    assert parse_time(text, "runAt") == utc
    run_at = JobSpec("acme", "echo", run_at=dt.datetime.fromisoformat(text)).run_at
    assert run_at == utc
    assert run_at is not None
    assert run_at.utcoffset() == dt.timedelta(0)


def test_the_range_is_checked_after_conversion() -> None:
    with pytest.raises(InvalidJobError, match="must lie between"):
        parse_time("1970-01-01T13:59:00+14:00", "runAt")
