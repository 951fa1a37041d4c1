"""runAt over HTTP (issue 19): out of range or an offset beyond ±14:00 is a 400 naming
runAt, and nothing is written; ±14:00 and Z are accepted and stored in UTC."""

from __future__ import annotations

import json

import pytest
from gateway_helpers import RunningGateway
from test_gw_input import JOBS, assert_nothing_written, post_raw

from helpers import (
    OUT_OF_RANGE_RUN_ATS,
    assert_histories_valid,
    fetch,
    job_status,
    start_worker_process,
    stop_worker_process,
    wait_until,
)


@pytest.mark.parametrize("run_at", OUT_OF_RANGE_RUN_ATS)
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


# Part 2: rows holding a time Python cannot read, written with the range CHECKs dropped
# (as a row written before sql/0005_time_bounds.sql, or by hand, would be).
_DROP_CHECKS = """
ALTER TABLE pgjobs.job_rows DROP CONSTRAINT jobs_times_in_range;
ALTER TABLE pgjobs.job_queue DROP CONSTRAINT job_queue_times_in_range;
"""
_INSERT = """
INSERT INTO pgjobs.jobs (id, company_id, job_type, run_at, created_at)
VALUES (%(id)s, 'acme', 'echo', %(run_at)s::timestamptz, %(created_at)s::timestamptz)
"""
BC = "0001-12-31 23:59:00+00 BC"  # what the issue's runAt "0001-01-01T00:00:00+00:01" stored
Y10K = "10000-01-01 00:00:00+00"
POISON = "00000000-0000-0000-0000-00000000000b"  # due: claimed with the good jobs
UNBORN = "00000000-0000-0000-0000-00000000000c"  # created in year 1 BC, due
NEVER = "00000000-0000-0000-0000-00000000000d"  # run_at in year 10000: never due


ANSWERED = {"list": 200, "get": 200, "stream-token": 201, "events": 200}


async def _answers(gateway: RunningGateway, job_id: str) -> dict[str, int]:
    """The status of every route that reads the job, and of the company's list."""
    job = f"{JOBS}/{job_id}"
    codes: dict[str, int] = {}
    async with gateway.http() as http:
        codes["list"] = (await http.get(JOBS, params={"limit": 100})).status_code
        codes["get"] = (await http.get(job)).status_code
        token = await http.post("/api/companies/acme/stream-tokens", json={"jobId": job_id})
        codes["stream-token"] = token.status_code
        async with http.stream("GET", job + "/events") as stream:
            codes["events"] = stream.status_code
            if stream.status_code == 200:
                async for line in stream.aiter_lines():
                    if line.startswith("data:"):
                        break
    return codes


async def test_a_row_a_worker_cannot_read_fails_that_job_not_the_worker(
    gateway: RunningGateway, dsn: str
) -> None:
    await fetch(dsn, _DROP_CHECKS)
    for job_id, run_at, created_at in [
        (POISON, BC, "now"),
        (UNBORN, "now", BC),
        (NEVER, Y10K, "now"),
    ]:
        await fetch(dsn, _INSERT, {"id": job_id, "run_at": run_at, "created_at": created_at})
    await fetch(
        dsn,
        "INSERT INTO pgjobs.jobs (id, company_id, job_type, input)"
        " SELECT gen_random_uuid(), 'acme', 'echo', jsonb_build_object('n', n)"
        " FROM generate_series(1, 50) AS n",
    )

    # Before any worker: every read answers, showing what the database holds.
    for job_id in (POISON, UNBORN, NEVER):
        assert await _answers(gateway, job_id) == ANSWERED, job_id
    async with gateway.http() as http:
        shown = (await http.get(f"{JOBS}/{UNBORN}")).json()
    assert shown["createdAt"] == BC

    worker = start_worker_process(dsn, worker_id="times-w1")
    try:

        async def settled() -> bool:
            rows = await fetch(
                dsn,
                "SELECT count(*) FILTER (WHERE status = 'done') AS done,"
                " count(*) FILTER (WHERE status = 'failed') AS failed FROM pgjobs.jobs",
            )
            return rows == [{"done": 50, "failed": 2}]

        await wait_until(settled, within=60, message="50 done, 2 failed")
        assert worker.poll() is None, "the worker died"
        # Still claiming: a job enqueued now runs.
        async with gateway.http() as http:
            r = await http.post(JOBS, json={"jobType": "echo"})
        later = r.json()["jobId"]

        async def later_done() -> bool:
            return await job_status(dsn, later) == "done"

        await wait_until(later_done, within=30, message="a job enqueued afterwards ran")
        assert worker.poll() is None, "the worker died"
    finally:
        output = stop_worker_process(worker)
    assert "Traceback" not in output, output

    rows = await fetch(
        dsn,
        "SELECT j.id::text, j.status, j.attempts, e.payload ->> 'errorMessage' AS audited"
        " FROM pgjobs.jobs j JOIN pgjobs.job_events e ON e.job_id = j.id AND e.seq = j.event_seq"
        " WHERE j.id IN (%s, %s, %s) ORDER BY j.id",
        (POISON, UNBORN, NEVER),
    )
    poison, unborn, never = rows
    assert poison["status"] == unborn["status"] == "failed"
    assert "pgjobs cannot read this job's row, so it was not run" in poison["audited"]
    assert f"run_at holds '{BC}'" in poison["audited"]
    assert "timestamp too small" in poison["audited"]
    assert f"created_at holds '{BC}'" in unborn["audited"]
    assert never["status"] == "queued"
    await assert_histories_valid(dsn)

    # After: every read route still answers for each of them, and cancel too.
    for job_id in (POISON, UNBORN, NEVER):
        assert await _answers(gateway, job_id) == ANSWERED, job_id
    async with gateway.http() as http:
        cancel = await http.post(f"{JOBS}/{NEVER}/cancel")
        assert cancel.status_code == 202, cancel.text
        assert (await http.post(f"{JOBS}/{POISON}/cancel")).status_code == 409


async def test_the_issues_request_is_400_and_workers_keep_running(
    gateway: RunningGateway, dsn: str
) -> None:
    worker = start_worker_process(dsn, worker_id="times-w2")
    try:
        async with gateway.http() as http:
            bad = await http.post(
                JOBS, json={"jobType": "echo", "runAt": "0001-01-01T00:00:00+00:01"}
            )
            assert bad.status_code == 400, bad.text
            good = await http.post(JOBS, json={"jobType": "echo"})
        job_id = good.json()["jobId"]

        async def done() -> bool:
            return await job_status(dsn, job_id) == "done"

        await wait_until(done, within=30, message="the good job ran")
        assert worker.poll() is None
    finally:
        stop_worker_process(worker)
    assert [j.status.value for j in (await gateway.state.client.list("acme")).jobs] == ["done"]
