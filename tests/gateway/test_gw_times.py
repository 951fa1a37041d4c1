"""runAt over HTTP (issue 19): out of range or an offset beyond ±14:00 is a 400 naming
runAt, and nothing is written; ±14:00 and Z are accepted and stored in UTC."""

from __future__ import annotations

import json

import pytest
from gateway_helpers import RunningGateway
from test_gw_input import JOBS, assert_nothing_written, post_raw

from helpers import fetch


@pytest.mark.parametrize(
    "run_at",
    [
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-00:01",
        "9999-12-31T23:59:59-23:59",
        "2030-01-01T00:00:00+14:01",
        "2030-01-01T00:00:00-14:01",
        "2030-01-01T00:00:00",
        "1969-12-31T23:59:59Z",
    ],
)
async def test_run_at_out_of_range_is_400_and_nothing_is_stored(
    gateway: RunningGateway, run_at: str
) -> None:
    r = await post_raw(gateway, json.dumps({"jobType": "echo", "runAt": run_at}).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"].startswith("runAt "), r.text
    await assert_nothing_written(gateway)


@pytest.mark.parametrize(
    ("run_at", "stored"),
    [
        ("2030-01-01T00:00:00+14:00", "2029-12-31 10:00:00"),
        ("2030-01-01T00:00:00-14:00", "2030-01-01 14:00:00"),
        ("2030-01-01T00:00:00Z", "2030-01-01 00:00:00"),
    ],
)
async def test_run_at_within_range_is_stored_in_utc(
    gateway: RunningGateway, dsn: str, run_at: str, stored: str
) -> None:
    async with gateway.http() as http:
        r = await http.post(JOBS, json={"jobType": "echo", "runAt": run_at})
    assert r.status_code == 202, r.text
    rows = await fetch(
        dsn,
        "SELECT (run_at AT TIME ZONE 'UTC')::text AS run_at FROM pgjobs.jobs WHERE id = %s",
        (r.json()["jobId"],),
    )
    assert rows == [{"run_at": stored}]
