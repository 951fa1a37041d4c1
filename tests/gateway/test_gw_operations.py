"""What the dashboard's operator views read: a job's timeline from the audit log (with
tracebacks for operators only), the job types live workers serve, and the live workers."""

from __future__ import annotations

from pathlib import Path

import httpx
from gateway_helpers import TLS, RunningGateway

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db, demo
from pgjobs.gateway import auth
from pgjobs.jobspec import JobSpec

ACME = "/api/companies/acme"


async def operator_client(gateway: RunningGateway) -> httpx.AsyncClient:
    async with await db.connect(gateway.state.dsn) as conn:
        token = await auth.create_token(conn, None, "ops", operator=True)
    return httpx.AsyncClient(
        base_url=gateway.url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=20.0,
        verify=TLS,
    )


async def test_a_jobs_timeline_is_its_audit_log_with_tracebacks_for_operators_only(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    client = gateway.state.client
    job = await client.enqueue("acme", "fail", {"message": "kaput"}, max_attempts=2)
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):

        async def failed() -> bool:
            return (await client.get("acme", job.id)).status.value == "failed"

        await wait_until(failed, within=30, message="the job failed twice")
    audit = await fetch(
        dsn,
        "SELECT seq, type, status, attempt, worker_id, created_at FROM pgjobs.job_events"
        " WHERE job_id = %s ORDER BY seq",
        [job.id],
    )
    async with gateway.http() as acme:
        r = await acme.get(f"{ACME}/content-jobs/{job.id}/timeline")
    assert r.status_code == 200, r.text
    events = r.json()
    assert [(e["seq"], e["type"], e["status"], e["attempt"], e["workerId"]) for e in events] == [
        (a["seq"], a["type"], a["status"], a["attempt"], a["worker_id"]) for a in audit
    ]
    assert [e["createdAt"] for e in events] == [a["created_at"].isoformat() for a in audit]
    assert events[-1]["payload"]["errorMessage"] == "RuntimeError: kaput"
    assert "traceback" not in r.text  # a company's token
    assert "Traceback" not in r.text
    async with await operator_client(gateway) as ops:
        r = await ops.get(f"{ACME}/content-jobs/{job.id}/timeline")
    ended = [e for e in r.json() if e["type"] in ("content_job.retrying", "content_job.failed")]
    assert len(ended) == 2
    assert all("RuntimeError: kaput" in e["traceback"] for e in ended)


async def test_a_timeline_pages_and_is_the_companys_own(gateway: RunningGateway) -> None:
    client = gateway.state.client
    job = await client.enqueue("acme", "echo", {})
    for _ in range(4):  # queued, cancelled, queued, cancelled, queued
        await client.cancel("acme", job.id)
        await client.retry("acme", job.id)
    async with gateway.http() as acme:
        first = await acme.get(f"{ACME}/content-jobs/{job.id}/timeline", params={"limit": 4})
        assert [e["seq"] for e in first.json()] == [1, 2, 3, 4]
        after = first.headers["X-Next-Cursor"]
        rest = await acme.get(
            f"{ACME}/content-jobs/{job.id}/timeline", params={"after": after, "limit": 500}
        )
        assert [e["seq"] for e in rest.json()] == list(range(5, 10))
        assert "X-Next-Cursor" not in rest.headers
        bad = await acme.get(f"{ACME}/content-jobs/{job.id}/timeline", params={"limit": 501})
        assert bad.status_code == 400
    async with gateway.http("globex") as globex:
        foreign = await globex.get(f"/api/companies/globex/content-jobs/{job.id}/timeline")
        assert foreign.status_code == 404
        assert (await globex.get(f"{ACME}/content-jobs/{job.id}/timeline")).status_code == 403


async def test_job_types_and_workers_are_the_live_ones(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    # A worker that stopped heartbeating an hour ago is not live.
    await fetch(
        dsn,
        "INSERT INTO pgjobs.workers (id, hostname, pid, job_types, concurrency,"
        " last_heartbeat_at) VALUES ('gone', 'old-host', 1, '{legacy}', 1,"
        " now() - interval '1 hour')",
    )
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir, concurrency=3)):
        await gateway.state.client.enqueue_many(
            JobSpec("acme", "sleep", {"seconds": 30}) for _ in range(2)
        )
        async with gateway.http() as acme:
            types = (await acme.get(f"{ACME}/job-types")).json()["jobTypes"]
            assert types == sorted(demo.registry.job_types)
            assert "legacy" not in types
            assert (await acme.get("/api/workers")).status_code == 403  # infrastructure
        async with await operator_client(gateway) as ops:

            async def both_running() -> bool:
                workers = (await ops.get("/api/workers")).json()
                return len(workers) == 1 and workers[0]["running"] == 2

            await wait_until(both_running, within=20, message="two sleep jobs running")
            (worker,) = (await ops.get("/api/workers")).json()
        assert worker["concurrency"] == 3
        assert sorted(worker["jobTypes"]) == sorted(demo.registry.job_types)
        assert worker["hostname"] != "old-host"


async def test_an_operator_retries_failed_jobs_in_bulk_after_counting_them(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    client = gateway.state.client
    failing = [
        await client.enqueue("acme", kind, {}, source_task_id=task, max_attempts=1)
        for kind, task in (("fail", "t-1"), ("fail", "t-1"), ("fail", "t-2"))
    ]
    await client.enqueue("globex", "fail", {}, max_attempts=1)
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):

        async def all_failed() -> bool:
            rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'failed'")
            return bool(rows[0]["n"] == 4)

        await wait_until(all_failed, within=30, message="every job failed")
    path = f"{ACME}/retry-failed"
    async with gateway.http() as acme:
        refused = await acme.post(path, json={"dryRun": True})
        assert refused.status_code == 403  # a company's token: one job at a time
    async with await operator_client(gateway) as ops:
        counted = await ops.post(path, json={"dryRun": True, "sourceTaskId": "t-1"})
        assert counted.json() == {"failed": 2, "limit": 1000}
        assert (await ops.post(path, json={"limit": 1001})).status_code == 400
        assert (await ops.post(path, json={"jobTypo": "fail"})).status_code == 400
        retried = await ops.post(path, json={"sourceTaskId": "t-1", "limit": 1})
        assert retried.status_code == 202
        assert retried.json()["retried"] == 1
        rest = await ops.post(path, json={})
        assert rest.json()["retried"] == 2  # the other t-1 job and t-2's; not globex's
        assert (await ops.post(path, json={"dryRun": True})).json()["failed"] == 0
    states = await fetch(
        dsn,
        "SELECT company_id, status, max_attempts, last_event FROM pgjobs.jobs ORDER BY company_id",
    )
    assert [s["status"] for s in states if s["company_id"] == "acme"] == ["queued"] * 3
    assert all(s["max_attempts"] == 2 for s in states if s["company_id"] == "acme")
    assert [s["status"] for s in states if s["company_id"] == "globex"] == ["failed"]
    audit = await fetch(
        dsn,
        "SELECT count(*) AS n FROM pgjobs.job_events WHERE type = 'content_job.retrying'"
        " AND job_id = ANY(%s)",
        [[j.id for j in failing]],
    )
    assert audit[0]["n"] == 3  # each retry has its audit row
