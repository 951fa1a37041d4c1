"""Times Python cannot read (issue 19): refused where they enter, refused by the schema,
and a row that holds one anyway fails its own job, not the worker or the reads."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from helpers import fetch
from pgjobs.client import Client
from pgjobs.errors import InvalidJobError
from pgjobs.jobspec import TIME_MAX, TIME_MIN

ONE_US = dt.timedelta(microseconds=1)


@pytest.mark.parametrize(
    "run_at",
    [
        "0001-01-01T00:00:00+00:01",
        "9999-12-31T23:59:59-00:01",
        "9999-12-31T23:59:59-23:59",
        "2030-01-01T00:00:00+14:01",
        "2030-01-01T00:00:00",
    ],
)
async def test_client_refuses_run_at_out_of_range_and_stores_nothing(
    client: Client, run_at: str
) -> None:
    with pytest.raises(InvalidJobError, match="run_at"):
        await client.enqueue("acme", "echo", run_at=dt.datetime.fromisoformat(run_at))
    assert (await client.list("acme")).jobs == []


async def test_the_schema_range_is_jobspecs(dsn: str) -> None:
    insert = (
        "INSERT INTO pgjobs.jobs (id, company_id, job_type, run_at)"
        " VALUES (gen_random_uuid(), 'acme', 'echo', %s)"
    )
    for edge in (TIME_MIN, TIME_MAX):
        await fetch(dsn, insert, (edge,))
    for outside in (TIME_MIN - ONE_US, TIME_MAX + ONE_US):
        with pytest.raises(psycopg.errors.CheckViolation, match="jobs_run_at_in_range"):
            await fetch(dsn, insert, (outside,))
    # The queue's copy is checked too (a row written there by hand).
    with pytest.raises(psycopg.errors.CheckViolation, match="job_queue_run_at_in_range"):
        await fetch(
            dsn,
            "UPDATE pgjobs.job_queue SET run_at = '0001-01-01T00:00:00Z' WHERE run_at = %s",
            (TIME_MIN,),
        )
