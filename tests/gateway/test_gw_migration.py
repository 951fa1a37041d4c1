"""The migrations from sql/0021 on (0021 moved a live job's state into its queue row, which
this version's statements need) applied to a filled database: jobs in every state keep
their audit rows, the company stream and a job stream read them afterwards and resume
with Last-Event-ID from events written before (every event once, in order), a lease taken
before still completes its job, and a worker of this version drains what was queued. The
database is filled by the statements of the version before 0021
(tests/queries_before_live_state.sql); this version's gateway and workers start after
`pgjobs migrate`, as the README says."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import Sse, collect, serve_gateway

from helpers import (
    QUERIES_BEFORE_LIVE_STATE,
    assert_histories_valid,
    fast_settings,
    fetch,
    finish_params,
    roll_back_migrations,
    running_worker,
    wait_until,
)
from pgjobs import demo, migrate, schema
from pgjobs.client import Client, plan_insert
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES

ALL = list(schema.required())

# These tests run this version's client, workers and gateway on schemas rolled back on purpose.
pytestmark = pytest.mark.usefixtures("older_schemas_allowed")


# sql/0021 and every migration after it: the upgrade from the statements before 0021.
FROM_LIVE = ALL[ALL.index("0021_live_state") :]
EVENTS = "/api/companies/acme/events"
JOBS = "/api/companies/acme/content-jobs"


def _roll_back_from_live(dsn: str) -> None:
    roll_back_migrations(dsn, FROM_LIVE)


BEFORE = QUERIES_BEFORE_LIVE_STATE


async def _finish(dsn: str, claimed: dict[str, Any], outcome: str, queries: Any = QUERIES) -> None:
    rows = await fetch(dsn, queries["job_finish_many_if_leased"], finish_params(claimed, outcome))
    assert len(rows) == 1


async def _enqueue_before(dsn: str, *specs: JobSpec) -> list[JobSpec]:
    _, params = plan_insert(specs)
    await fetch(dsn, BEFORE["job_insert_many"], params)
    return list(specs)


async def _claim_before(dsn: str, worker: str) -> dict[str, Any]:
    params = {"now": None, "limit": 1, "worker_id": worker, "lease_seconds": 10.0,
              "job_types": None, "after_company": None}  # fmt: skip
    (row,) = await fetch(dsn, BEFORE["job_claim_batch"], params)
    (job,) = await fetch(dsn, "SELECT * FROM pgjobs.jobs WHERE id = %s", [row["id"]])
    return job


async def _audit_rows(dsn: str) -> list[tuple[str, int]]:
    rows = await fetch(
        dsn,
        "SELECT job_id::text AS job_id, seq FROM pgjobs.job_events WHERE company_id = 'acme'",
    )
    return [(r["job_id"], r["seq"]) for r in rows]


def _keys(events: list[Sse]) -> list[tuple[str, int]]:
    return [(e.data["jobId"], e.data["seq"]) for e in events]


async def test_streams_resume_and_a_worker_drains_across_the_migrations_from_live_state(
    empty_dsn: str, storage_dir: Path
) -> None:
    dsn = empty_dsn
    migrate.apply(dsn)
    _roll_back_from_live(dsn)
    async with await Client.connect(dsn) as client:
        # One job in each state, moved there by the queries the version before runs.
        (failed,) = await _enqueue_before(dsn, JobSpec("acme", "echo", max_attempts=1))
        await _finish(dsn, await _claim_before(dsn, "w-old"), "error", BEFORE)
        (done,) = await _enqueue_before(dsn, JobSpec("acme", "echo"))
        await _finish(dsn, await _claim_before(dsn, "w-old"), "done", BEFORE)
        (running,) = await _enqueue_before(dsn, JobSpec("acme", "echo"))
        lease = await _claim_before(dsn, "w-old")
        assert lease["id"] == running.id
        (retried,) = await _enqueue_before(dsn, JobSpec("acme", "echo", max_attempts=3))
        await _finish(dsn, await _claim_before(dsn, "w-old"), "error", BEFORE)  # queued again
        (cancelled,) = await _enqueue_before(dsn, JobSpec("acme", "echo"))
        await fetch(
            dsn, BEFORE["job_cancel"], {"id": cancelled.id, "company_id": "acme", "now": None}
        )
        queued = await _enqueue_before(dsn, *(JobSpec("acme", "echo", {"n": n}) for n in range(20)))
        statuses = {
            j.id: (await client.get("acme", j.id)).status.value
            for j in (failed, done, retried, running, cancelled, queued[0])
        }
        assert sorted(statuses.values()) == [
            "cancelled", "done", "failed", "queued", "queued", "running"
        ]  # fmt: skip

        before = await _audit_rows(dsn)
        assert await asyncio.to_thread(migrate.apply, dsn) == FROM_LIVE
        assert await _audit_rows(dsn) == before  # the audit log is untouched

        async with serve_gateway(dsn, storage_dir) as gateway:
            seen = await collect(gateway, EVENTS, last_event_id="0-0", stop_after=len(before))
            assert sorted(_keys(seen)) == sorted(before)
            job_path = f"{JOBS}/{retried.id}/events"
            job_seen = await collect(gateway, job_path, last_event_id="0", stop_after=3)
            assert [e.data["type"] for e in job_seen] == [
                "content_job.queued", "content_job.running", "content_job.retrying"
            ]  # fmt: skip

            # The lease taken before the migration completes its job after it.
            await _finish(dsn, lease, "done")
            pending = {j.id for j in queued} | {retried.id}

            async def drained() -> bool:
                rows = await fetch(
                    dsn,
                    "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done' AND id = ANY(%s)",
                    [list(pending)],
                )
                return bool(rows[0]["n"] == len(pending))

            async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
                await wait_until(drained, within=60, message="the queued jobs done")

            after = await _audit_rows(dsn)
            new = sorted(set(after) - set(before))
            # running + done for each queued job, done for the leased one.
            assert len(new) == 2 * len(pending) + 1
            resumed = await collect(gateway, EVENTS, last_event_id=seen[-1].id, stop_after=len(new))
            assert sorted(_keys(resumed)) == new  # each once, none of those seen before
            ids = [int((e.id or "").split("-")[1]) for e in resumed]
            assert len(set(ids)) == len(ids)
            for job_id in {k[0] for k in new}:  # each job's events in seq order
                seqs = [seq for jid, seq in _keys(resumed) if jid == job_id]
                assert seqs == sorted(seqs)

            job_rest = await collect(gateway, job_path, last_event_id=job_seen[-1].id)
            assert [(e.id, e.data["type"]) for e in job_rest] == [
                ("4", "content_job.running"), ("5", "content_job.done")
            ]  # fmt: skip
    assert await assert_histories_valid(dsn) == 5 + len(queued)
