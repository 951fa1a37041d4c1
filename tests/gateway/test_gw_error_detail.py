"""Issue 14: a failed attempt's traceback is for operators. The tenant-facing API (job
JSON, live SSE events, SSE events replayed from the audit log) carries only errorMessage."""

from __future__ import annotations

from pathlib import Path

from gateway_helpers import RunningGateway, collect

from helpers import fast_settings, fetch, running_worker
from pgjobs import demo

JOBS = "/api/companies/acme/content-jobs"


async def test_a_failing_jobs_api_data_has_its_error_message_but_no_traceback(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    async with gateway.http() as http:
        r = await http.post(
            JOBS, json={"jobType": "fail", "input": {"message": "kaput"}, "maxAttempts": 2}
        )
        job_id = r.json()["jobId"]
    path = f"{JOBS}/{job_id}/events"
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        live = await collect(gateway, path)  # ends at content_job.failed
    replayed = await collect(gateway, path, last_event_id="1")  # read from the audit rows
    async with gateway.http() as http:
        job = (await http.get(f"{JOBS}/{job_id}")).json()
        listed = (await http.get(JOBS)).json()

    # The audit log does hold both attempts' tracebacks ...
    rows = await fetch(
        dsn,
        "select payload ->> 'traceback' as tb from pgjobs.job_events"
        " where job_id = %s and payload ? 'traceback' order by seq",
        [job_id],
    )
    assert len(rows) == 2
    assert all("RuntimeError: kaput" in r["tb"] for r in rows)
    # ... and none of it reaches the API.
    for events in (live, replayed):
        ended = [
            e for e in events if e.data["type"] in ("content_job.retrying", "content_job.failed")
        ]
        assert [e.data["type"] for e in ended] == ["content_job.retrying", "content_job.failed"]
        assert all(e.data["errorMessage"] == "RuntimeError: kaput" for e in ended)
        assert all("traceback" not in e.data and "Traceback" not in str(e.data) for e in events)
    assert job["errorMessage"] == "RuntimeError: kaput"
    assert "Traceback" not in str(job)
    assert "traceback" not in job
    assert "Traceback" not in str(listed)
