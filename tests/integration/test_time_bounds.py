"""Times Python cannot read (issue 19): refused where they enter, refused by the schema,
and a row that holds one anyway fails its own job, not the worker or the reads."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg
import pytest

from helpers import (
    OUT_OF_RANGE_RUN_ATS,
    assert_histories_valid,
    fast_settings,
    fetch,
    running_worker,
    wait_until,
)
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.errors import InvalidJobError
from pgjobs.jobspec import TIME_MAX, TIME_MIN, JobSpec
from pgjobs.sync import SyncClient
from pgjobs.types import UnreadableTime, iso

ONE_US = dt.timedelta(microseconds=1)


@pytest.mark.parametrize("run_at", OUT_OF_RANGE_RUN_ATS)
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
        with pytest.raises(psycopg.errors.CheckViolation, match="jobs_times_in_range"):
            await fetch(dsn, insert, (outside,))
    # The queue's copy is checked too (a row written there by hand).
    with pytest.raises(psycopg.errors.CheckViolation, match="job_queue_times_in_range"):
        await fetch(
            dsn,
            "UPDATE pgjobs.job_queue SET run_at = '0001-01-01T00:00:00Z' WHERE run_at = %s",
            (TIME_MIN,),
        )


async def test_a_claim_that_fails_on_a_row_fails_that_job_and_the_worker_goes_on(
    dsn: str, storage_dir: Path
) -> None:
    """The range CHECKs added NOT VALID over a row out of range: the claim's UPDATE of that
    row's queue row (where a queued job's state is, sql/0021) violates the queue's, so the
    whole claim statement fails and claims nothing."""
    defs = await fetch(
        dsn,
        "SELECT conrelid::regclass::text AS table, conname::text AS name,"
        " pg_get_constraintdef(oid) AS def FROM pg_constraint"
        " WHERE conname IN ('jobs_times_in_range', 'job_queue_times_in_range')",
    )
    assert {d["table"] for d in defs} == {"pgjobs.job_rows", "pgjobs.job_queue"}
    for d in defs:
        await fetch(dsn, f"ALTER TABLE {d['table']} DROP CONSTRAINT {d['name']}")
    await fetch(
        dsn,
        "INSERT INTO pgjobs.jobs (id, company_id, job_type, run_at)"
        " VALUES ('00000000-0000-0000-0000-00000000000b', 'acme', 'echo',"
        " '0001-12-31 23:59:00+00 BC')",
    )
    for d in defs:
        await fetch(
            dsn, f"ALTER TABLE {d['table']} ADD CONSTRAINT {d['name']} {d['def']} NOT VALID"
        )
    async with await Client.connect(dsn) as client:
        await client.enqueue_many(JobSpec("acme", "echo", {"n": n}) for n in range(10))
        async with running_worker(dsn, demo.registry, fast_settings(storage_dir)) as worker:

            async def settled() -> bool:
                jobs = (await client.list("acme", limit=20)).jobs
                return sorted(j.status.value for j in jobs) == ["done"] * 10 + ["failed"]

            await wait_until(settled, message="10 done, the poisoned one failed")
            assert worker.jobs_started == 10
        bad = await client.get("acme", "00000000-0000-0000-0000-00000000000b")
    assert bad.error_message is not None
    assert "a time is outside 1970-01-01 to 9999-12-31 UTC" in bad.error_message
    assert "run_at 0001-12-31 23:59:00+00 BC" in bad.error_message
    assert bad.run_at == TIME_MIN  # clamped, so that the row meets the CHECK
    await assert_histories_valid(dsn)


async def test_reads_show_a_time_python_cannot_represent_as_postgresql_writes_it(
    dsn: str,
) -> None:
    await fetch(dsn, "ALTER TABLE pgjobs.job_rows DROP CONSTRAINT jobs_times_in_range")
    await fetch(
        dsn,
        "INSERT INTO pgjobs.jobs (id, company_id, job_type, created_at) VALUES"
        " ('00000000-0000-0000-0000-00000000000b', 'acme', 'echo', '0001-12-31 23:59:00+00 BC'),"
        " ('00000000-0000-0000-0000-00000000000c', 'acme', 'echo', 'infinity')",
    )
    async with await Client.connect(dsn) as client:
        jobs = (await client.list("acme")).jobs
    shown = {str(j.id)[-1]: j.to_json()["createdAt"] for j in jobs}
    assert shown == {"b": "0001-12-31 23:59:00+00 BC", "c": "infinity"}
    early, late = sorted(jobs, key=lambda j: j.created_at)
    assert isinstance(early.created_at, UnreadableTime)
    assert early.created_at == dt.datetime.min.replace(tzinfo=dt.UTC)
    assert late.created_at == dt.datetime.max.replace(tzinfo=dt.UTC)

    with SyncClient(dsn) as sync_client:
        job = sync_client.get("acme", "00000000-0000-0000-0000-00000000000b")
    assert iso(job.created_at) == "0001-12-31 23:59:00+00 BC"
