"""Migrations apply, roll back and apply again, and the publish trigger works at each
step (0003 replaced 0001's trigger functions; its rollback restores them). 0004 fills
pgjobs.job_queue from the jobs already there, and its rollback restores the indexes; 0008
gives the queue rows already there their company."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
from yoyo import read_migrations

from helpers import (
    QUERIES_BEFORE_LIVE_STATE,
    assert_queue_matches_jobs,
    claim_one,
    fetch,
    finish_params,
    roll_back_migrations,
    seqs_in_company_stream_order,
)
from pgjobs import migrate, schema
from pgjobs.client import Client, plan_insert
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES

# Every migration id, in the order they apply (each depends on the one before).
ALL = list(schema.required())

# These tests run this version's client, workers and gateway on schemas rolled back on purpose.
pytestmark = pytest.mark.usefixtures("older_schemas_allowed")


def since(first: str) -> list[str]:
    """``first`` and every migration after it: what rolling back to before it undoes."""
    return ALL[ALL.index(first) :]


# Statements that run on every schema version these tests visit: pgjobs.jobs is a table
# before sql/0021 and a view routing writes to the tables since, where this version's
# queries (pgjobs.queries) need the tables 0021 makes.
_INSERT = (
    "INSERT INTO pgjobs.jobs (id, company_id, job_type) VALUES (gen_random_uuid(), %s, %s)"
    " RETURNING id"
)
_CANCEL = (
    "UPDATE pgjobs.jobs SET status = 'cancelled', finished_at = now(), lease_expires_at = NULL,"
    " event_seq = event_seq + 1, last_event = 'content_job.cancelled' WHERE id = %s"
    " RETURNING status"
)


async def _insert(dsn: str, company_id: str = "acme") -> Any:
    (row,) = await fetch(dsn, _INSERT, [company_id, "echo"])
    return row["id"]


async def _enqueue_notifies(dsn: str) -> dict[str, object]:
    """Enqueue one job; return its NOTIFY item (and check its audit row exists)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("LISTEN pgjobs_events")
        job_id = await _insert(dsn)
        async with await Client.connect(dsn) as client:
            events = await client.events("acme", job_id)
        payloads = [n.payload async for n in conn.notifies(timeout=1.0)]
    assert [e.type.value for e in events] == ["content_job.queued"]
    (item,) = json.loads(payloads[0])["events"]
    assert item["jobId"] == str(job_id)
    return dict(item)


async def test_latest_migration_rolls_back_and_applies_again(empty_dsn: str) -> None:
    assert migrate.apply(empty_dsn) == ALL
    assert "runAt" not in await _enqueue_notifies(empty_dsn)  # 0003: no null keys

    _roll_back(empty_dsn, *since("0003_fast_publish"))
    item = await _enqueue_notifies(empty_dsn)
    assert item["runAt"] is None  # 0001's trigger again: every key, null or not

    assert migrate.apply(empty_dsn) == since("0003_fast_publish")
    assert "runAt" not in await _enqueue_notifies(empty_dsn)
    await assert_queue_matches_jobs(empty_dsn)


def _roll_back(dsn: str, *ids: str) -> None:
    roll_back_migrations(dsn, ids)


_JOBS_AT_0003 = """
INSERT INTO pgjobs.jobs (id, company_id, job_type, status, priority, attempts, worker_id,
                         lease_expires_at, started_at, finished_at, event_seq, last_event)
VALUES (gen_random_uuid(), 'acme', 'echo', 'queued', 3, 0, NULL, NULL, NULL, NULL, 1,
        'content_job.queued'),
       (gen_random_uuid(), 'acme', 'echo', 'running', 0, 1, 'w1', now() + interval '1 min',
        now(), NULL, 2, 'content_job.running'),
       (gen_random_uuid(), 'acme', 'echo', 'done', 0, 1, 'w1', NULL, now(), now(), 3,
        'content_job.done')
RETURNING id
"""


async def test_job_queue_migration_fills_from_existing_jobs_and_rolls_back(
    empty_dsn: str,
) -> None:
    migrate.apply(empty_dsn)
    _roll_back(empty_dsn, *since("0004_job_queue"))
    assert await fetch(empty_dsn, "SELECT to_regclass('pgjobs.job_queue') AS t") == [{"t": None}]
    await fetch(empty_dsn, _JOBS_AT_0003)

    assert migrate.apply(empty_dsn) == since("0004_job_queue")
    await assert_queue_matches_jobs(empty_dsn)
    queued = await fetch(
        empty_dsn, "SELECT lease_expires_at IS NULL AS queued FROM pgjobs.job_queue"
    )
    assert sorted(r["queued"] for r in queued) == [False, True]  # the done job stays out

    _roll_back(empty_dsn, *since("0004_job_queue"))
    indexes = await fetch(
        empty_dsn, "SELECT indexname FROM pg_indexes WHERE tablename = 'jobs' ORDER BY 1"
    )
    assert [r["indexname"] for r in indexes] == [
        "jobs_claim_idx",
        "jobs_company_created_idx",
        "jobs_company_status_idx",
        "jobs_lease_idx",
        "jobs_pkey",
    ]


async def test_traceback_migration_rolls_back_to_0004s_trigger(empty_dsn: str) -> None:
    """0006 adds pgjobs.jobs.error_traceback and a publish trigger that reads it; its
    rollback drops the column and restores the trigger that does not."""
    migrate.apply(empty_dsn)
    column = (
        "SELECT count(*) AS n FROM information_schema.columns"
        " WHERE table_name = 'jobs' AND column_name = 'error_traceback'"
    )
    assert await fetch(empty_dsn, column) == [{"n": 1}]
    _roll_back(empty_dsn, *since("0006_attempt_traceback"))
    assert await fetch(empty_dsn, column) == [{"n": 0}]
    await _enqueue_notifies(empty_dsn)
    job_id = await _insert(empty_dsn)  # a transition through the trigger
    assert await fetch(empty_dsn, _CANCEL, [job_id]) == [{"status": "cancelled"}]
    assert migrate.apply(empty_dsn) == since("0006_attempt_traceback")
    await _enqueue_notifies(empty_dsn)


# Rows 0005 finds out of range: a queued job the runAt produced, a running one
# whose lease ends in year 10000, a done one created in year 1, and a good queued one.
_JOBS_AT_0004 = """
INSERT INTO pgjobs.jobs (id, company_id, job_type, status, attempts, worker_id, run_at,
                         lease_expires_at, started_at, finished_at, created_at, event_seq,
                         last_event)
VALUES ('00000000-0000-0000-0000-000000000001', 'acme', 'echo', 'queued', 0, NULL,
        '0001-01-01T00:00:00+00:01', NULL, NULL, NULL, now(), 1, 'content_job.queued'),
       ('00000000-0000-0000-0000-000000000002', 'acme', 'echo', 'running', 1, 'w1', now(),
        '10000-01-01T00:00:00Z', now(), NULL, now(), 2, 'content_job.running'),
       ('00000000-0000-0000-0000-000000000003', 'acme', 'echo', 'done', 1, 'w1', now(),
        NULL, now(), now(), '0001-06-01T00:00:00Z', 3, 'content_job.done'),
       ('00000000-0000-0000-0000-000000000004', 'acme', 'echo', 'queued', 0, NULL,
        '2030-01-01T00:00:00Z', NULL, NULL, NULL, now(), 1, 'content_job.queued')
"""


async def test_time_bounds_migration_fails_and_clamps_rows_out_of_range(empty_dsn: str) -> None:
    migrate.apply(empty_dsn)
    _roll_back(empty_dsn, *since("0005_time_bounds"))
    await fetch(empty_dsn, _JOBS_AT_0004)

    assert migrate.apply(empty_dsn) == since("0005_time_bounds")
    rows = await fetch(
        empty_dsn,
        "SELECT id::text, status, run_at::text, created_at::text, lease_expires_at::text, "
        "error_message, (SELECT array_agg(type ORDER BY seq) FROM pgjobs.job_events e "
        "WHERE e.job_id = j.id) AS events FROM pgjobs.jobs j ORDER BY id",
    )
    queued, running, done, good = rows
    assert queued["status"] == running["status"] == "failed"
    assert queued["run_at"] == "1970-01-01 00:00:00+00"
    assert "run_at 0001-12-31 23:59:00+00 BC" in queued["error_message"]
    assert "lease_expires_at 10000-01-01 00:00:00+00" in running["error_message"]
    assert running["lease_expires_at"] is None
    # The trigger wrote each failure's audit row, as for any transition.
    assert queued["events"] == ["content_job.queued", "content_job.failed"]
    assert running["events"] == ["content_job.running", "content_job.failed"]
    assert done["status"] == "done"
    assert done["error_message"] is None
    assert done["created_at"] == "1970-01-01 00:00:00+00"
    assert good["status"] == "queued"
    assert good["run_at"] == "2030-01-01 00:00:00+00"
    await assert_queue_matches_jobs(empty_dsn)

    with pytest.raises(psycopg.errors.CheckViolation, match="jobs_times_in_range"):
        await fetch(
            empty_dsn,
            "UPDATE pgjobs.jobs SET run_at = '0001-01-01T00:00:00Z' WHERE id = %s",
            (good["id"],),
        )


async def test_operator_tokens_migration_rolls_back(empty_dsn: str) -> None:
    """0009 lets a token have no company (an operator's); its rollback removes those
    tokens and makes a company required again."""
    from pgjobs.gateway import auth

    migrate.apply(empty_dsn)
    async with await psycopg.AsyncConnection.connect(empty_dsn, autocommit=True) as conn:
        await auth.create_token(conn, None, "ops", operator=True)
        await auth.create_token(conn, "acme")
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(
                "INSERT INTO pgjobs.api_tokens (id, company_id, token_hash, operator)"
                " VALUES (gen_random_uuid(), 'acme', repeat('a', 64), true)"
            )
    _roll_back(empty_dsn, *since("0009_operator_tokens"))
    rows = await fetch(empty_dsn, "SELECT company_id FROM pgjobs.api_tokens")
    assert rows == [{"company_id": "acme"}]
    assert migrate.apply(empty_dsn) == since("0009_operator_tokens")


async def _work_notifies(dsn: str) -> list[str]:
    """Enqueue one job; return what pgjobs_work carried."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("LISTEN pgjobs_work")
        await _insert(dsn)
        return [n.payload async for n in conn.notifies(timeout=1.0)]


async def test_worker_channel_migration_rolls_back_to_0006s_trigger(empty_dsn: str) -> None:
    """0007 adds the pgjobs_work NOTIFY; its rollback restores 0006's trigger, which
    sends only pgjobs_events."""
    migrate.apply(empty_dsn)
    assert [json.loads(p) for p in await _work_notifies(empty_dsn)] == [
        {"work": [{"status": "queued", "jobType": "echo"}]}
    ]
    _roll_back(empty_dsn, *since("0007_worker_channel"))
    assert await _work_notifies(empty_dsn) == []
    await _enqueue_notifies(empty_dsn)
    assert migrate.apply(empty_dsn) == since("0007_worker_channel")
    assert len(await _work_notifies(empty_dsn)) == 1


_JOBS_AT_0006 = """
INSERT INTO pgjobs.jobs (id, company_id, job_type, status, attempts, worker_id,
                         lease_expires_at, started_at, finished_at, event_seq, last_event)
SELECT gen_random_uuid(), c, 'echo', s, CASE s WHEN 'queued' THEN 0 ELSE 1 END,
       CASE s WHEN 'queued' THEN NULL ELSE 'w1' END,
       CASE s WHEN 'running' THEN now() + interval '1 min' END,
       CASE s WHEN 'queued' THEN NULL ELSE now() END,
       CASE s WHEN 'done' THEN now() END,
       CASE s WHEN 'queued' THEN 1 WHEN 'running' THEN 2 ELSE 3 END,
       CASE s WHEN 'queued' THEN 'content_job.queued' WHEN 'running' THEN 'content_job.running'
              ELSE 'content_job.done' END
FROM unnest(ARRAY['acme', 'globex']) AS c, unnest(ARRAY['queued', 'running', 'done']) AS s
"""


async def test_fair_claim_migration_gives_queue_rows_their_company_and_rolls_back(
    empty_dsn: str,
) -> None:
    migrate.apply(empty_dsn)
    _roll_back(empty_dsn, *since("0008_fair_claim"))
    await fetch(empty_dsn, _JOBS_AT_0006)

    assert migrate.apply(empty_dsn) == since("0008_fair_claim")
    rows = await fetch(
        empty_dsn,
        "SELECT q.company_id, q.lease_expires_at IS NULL AS queued FROM pgjobs.job_queue q"
        " ORDER BY 1, 2",
    )
    assert [(r["company_id"], r["queued"]) for r in rows] == [
        ("acme", False),
        ("acme", True),
        ("globex", False),
        ("globex", True),
    ]
    await assert_queue_matches_jobs(empty_dsn)
    # The trigger fills it for new jobs; the fair claim takes one of each company.
    async with await Client.connect(empty_dsn) as client:
        await client.enqueue("initech", "echo")
    await assert_queue_matches_jobs(empty_dsn)
    claimed = await fetch(
        empty_dsn,
        QUERIES["job_claim_batch"],
        {"now": None, "limit": 3, "worker_id": "w2", "lease_seconds": 30.0, "job_types": None,
         "after_company": None},
    )  # fmt: skip
    assert sorted(r["company_id"] for r in claimed) == ["acme", "globex", "initech"]

    _roll_back(empty_dsn, *since("0008_fair_claim"))
    columns = await fetch(
        empty_dsn,
        "SELECT column_name FROM information_schema.columns"
        " WHERE table_schema = 'pgjobs' AND table_name = 'job_queue' ORDER BY 1",
    )
    assert [r["column_name"] for r in columns] == [
        "job_id",
        "job_type",
        "lease_expires_at",
        "priority",
        "run_at",
    ]
    assert await fetch(empty_dsn, "SELECT to_regclass('pgjobs.job_queue_fair_idx') AS i") == [
        {"i": None}
    ]
    job_id = await _insert(empty_dsn)  # 0004's trigger again
    await fetch(empty_dsn, _CANCEL, [job_id])
    await assert_queue_matches_jobs(empty_dsn)
    assert migrate.apply(empty_dsn) == since("0008_fair_claim")
    await assert_queue_matches_jobs(empty_dsn)


async def test_unique_jobs_migration_rolls_back_and_applies_again(empty_dsn: str) -> None:
    """0011 adds the two key tables; its rollback drops them (and the keys in them)."""
    migrate.apply(empty_dsn)
    async with await Client.connect(empty_dsn) as client:
        await client.enqueue("acme", "echo", unique_key="k")
    tables = (
        "SELECT array_agg(tablename::text ORDER BY tablename) AS t FROM pg_tables"
        " WHERE schemaname = 'pgjobs' AND tablename LIKE '%keys'"
    )
    assert (await fetch(empty_dsn, tables))[0]["t"] == ["idempotency_keys", "job_unique_keys"]
    _roll_back(empty_dsn, *since("0011_unique_jobs"))
    assert (await fetch(empty_dsn, tables))[0]["t"] is None
    assert migrate.apply(empty_dsn) == since("0011_unique_jobs")
    async with await Client.connect(empty_dsn) as client:
        job = await client.enqueue("acme", "echo", unique_key="k")
    assert job.created  # the key went with the rollback


_CHECKS = (
    "SELECT array_agg(conname::text ORDER BY conname) AS names FROM pg_constraint"
    " WHERE contype = 'c' AND conrelid = 'pgjobs.job_rows'::regclass"
)
_EVENT_KEYS = (
    "SELECT array_agg(pg_get_constraintdef(oid) ORDER BY conname) AS defs FROM pg_constraint"
    " WHERE contype IN ('p', 'u') AND conrelid = 'pgjobs.job_events'::regclass"
)
_AUDIT_LOG = (
    "SELECT id, job_id, company_id, seq, type, status, attempt, worker_id, payload,"
    " xid::text AS xid, created_at FROM pgjobs.job_events ORDER BY id"
)
_JOB_ROWS = "SELECT * FROM pgjobs.jobs ORDER BY id"


async def _enqueue(dsn: str, queries: dict[str, str], spec: JobSpec) -> Any:
    _, params = plan_insert([spec])
    await fetch(dsn, queries["job_insert_many"], params)
    return spec.id


async def _cancel(dsn: str, queries: dict[str, str], job_id: Any) -> list[dict[str, Any]]:
    return await fetch(
        dsn, queries["job_cancel"], {"id": job_id, "company_id": "acme", "now": None}
    )


async def _jobs_in_every_state(dsn: str, queries: dict[str, str] = QUERIES) -> tuple[Any, ...]:
    """Jobs failed, done, running, retried (queued again), cancelled and queued, moved by
    the worker's own statements (or ``queries``'); returns the failed, running, retried and
    cancelled jobs' ids and the running job's claimed row."""
    finish = queries["job_finish_many_if_leased"]
    failed = await _enqueue(dsn, queries, JobSpec("acme", "echo", max_attempts=1))
    await fetch(dsn, finish, _finish(await _claim(dsn, queries), "e"))
    await _enqueue(dsn, queries, JobSpec("acme", "echo"))
    await fetch(dsn, finish, _finish(await _claim(dsn, queries), None))
    running = await _enqueue(dsn, queries, JobSpec("globex", "echo"))
    lease = await _claim(dsn, queries)
    retried = await _enqueue(dsn, queries, JobSpec("acme", "echo", max_attempts=3))
    await fetch(dsn, finish, _finish(await _claim(dsn, queries), "e"))
    cancelled = await _enqueue(dsn, queries, JobSpec("acme", "echo"))
    await _cancel(dsn, queries, cancelled)
    await _enqueue(dsn, queries, JobSpec("globex", "echo", {"n": 1}))
    statuses = sorted(r["status"] for r in await fetch(dsn, "SELECT status FROM pgjobs.jobs"))
    assert statuses == ["cancelled", "done", "failed", "queued", "queued", "running"]
    return failed, running, retried, cancelled, lease


async def test_narrow_audit_migration_keeps_a_filled_database_and_rolls_back(
    empty_dsn: str,
) -> None:
    """0016 on jobs in every state: the audit log, the jobs and their CHECKs are
    untouched by it and by its rollback, which restores the id key; the (job_id, seq) key
    comes back with it, and the jobs go on moving after each step."""
    dsn = empty_dsn
    migrate.apply(dsn)
    _roll_back(dsn, "0016_narrow_audit")
    old_checks = (await fetch(dsn, _CHECKS))[0]["names"]
    failed, running, retried, cancelled, lease = await _jobs_in_every_state(dsn)
    audit, jobs = await fetch(dsn, _AUDIT_LOG), await fetch(dsn, _JOB_ROWS)

    assert migrate.apply(dsn) == ["0016_narrow_audit"]
    assert await fetch(dsn, _AUDIT_LOG) == audit
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert (await fetch(dsn, _CHECKS))[0]["names"] == old_checks
    assert (await fetch(dsn, _EVENT_KEYS))[0]["defs"] == ["PRIMARY KEY (job_id, seq)"]
    await assert_queue_matches_jobs(dsn)
    # A lease taken before the migration completes its job after it.
    assert len(await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(lease, None))) == 1
    assert {r["job_id"] for r in await fetch(dsn, "SELECT job_id FROM pgjobs.job_events")} >= {
        failed,
        running,
        retried,
        cancelled,
    }

    audit, jobs = await fetch(dsn, _AUDIT_LOG), await fetch(dsn, _JOB_ROWS)
    _roll_back(dsn, "0016_narrow_audit")
    assert await fetch(dsn, _AUDIT_LOG) == audit
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert (await fetch(dsn, _CHECKS))[0]["names"] == old_checks
    assert (await fetch(dsn, _EVENT_KEYS))[0]["defs"] == [
        "UNIQUE (job_id, seq)", "PRIMARY KEY (id)"
    ]  # fmt: skip
    with pytest.raises(psycopg.errors.CheckViolation, match="job_queue_state_consistent"):
        await fetch(dsn, "UPDATE pgjobs.jobs SET status = 'running' WHERE status = 'queued'")
    async with await Client.connect(dsn) as client:
        await client.enqueue("acme", "echo")
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), None))
    await assert_queue_matches_jobs(dsn)
    assert migrate.apply(dsn) == ["0016_narrow_audit"]
    assert (await fetch(dsn, _CHECKS))[0]["names"] == old_checks


async def _claim(dsn: str, queries: dict[str, str] = QUERIES) -> dict[str, object]:
    return await claim_one(dsn, "w1", queries=queries)


def _finish(job: dict[str, object], error: str | None) -> dict[str, object]:
    return finish_params(job, "done" if error is None else "error")


_CHECK_DEFS = (
    "SELECT conrelid::regclass::text AS table, conname::text AS name,"
    " pg_get_constraintdef(oid) AS def, convalidated AS validated,"
    " obj_description(oid, 'pg_constraint') AS comment FROM pg_constraint"
    " WHERE contype = 'c' AND conrelid = ANY ('{pgjobs.jobs,pgjobs.job_queue}'::regclass[])"
    " ORDER BY 1, 2"
)
_MERGED = "0020_merged_checks"
_LIVE = "0021_live_state"
# 0021 and the migrations after it (which the tests below roll back with it).
_FROM_LIVE = ALL[ALL.index(_LIVE) :]
# The statements of the version before sql/0021, for the schemas before it.
_BEFORE = QUERIES_BEFORE_LIVE_STATE

# Rows for the CHECKs to judge, in tables shaped as pgjobs.jobs and pgjobs.job_queue (NOT
# NULL included, CHECKs left out). Every combination of the state columns' telling values
# (a status and last event of each kind and a wrong one, attempts below, at and past
# max_attempts, each time and text NULL or not, a time out of range), then each size and
# time at and past its bounds on a valid job of each status.
_JOB_GRID = """
CREATE TABLE check_grid (LIKE pgjobs.jobs);
INSERT INTO check_grid (id, company_id, job_type, status, input, priority, run_at, attempts,
                        max_attempts, lease_token, event_seq, last_event, created_at,
                        updated_at, finished_at, lease_expires_at, started_at, worker_id,
                        error_message)
SELECT gen_random_uuid(), 'acme', 'echo', s, '{}', 0, now(), a.attempts, a.max_attempts, 0, 1,
       e, now(), now(), f, l, st, w, em
FROM unnest('{queued,running,done,failed,cancelled,sleeping}'::text[]) s,
     unnest('{content_job.queued,content_job.running,content_job.progress,
              content_job.retrying,content_job.done,content_job.failed,
              content_job.cancelled,content_job.nope}'::text[]) e,
     (VALUES (-1, 3), (0, 3), (2, 3), (3, 3), (4, 3), (0, 1), (1, 1)) a(attempts, max_attempts),
     unnest(ARRAY[NULL, now(), '1900-01-01Z']::timestamptz[]) f,
     unnest(ARRAY[NULL, now(), '1900-01-01Z']::timestamptz[]) l,
     unnest(ARRAY[NULL, now()]::timestamptz[]) st,
     unnest(ARRAY[NULL, 'w']::text[]) w,
     unnest(ARRAY[NULL, 'e']::text[]) em;

CREATE TABLE check_grid_base (LIKE pgjobs.jobs);
INSERT INTO check_grid_base (id, company_id, job_type, status, input, priority, run_at,
                             attempts, max_attempts, lease_token, event_seq, last_event,
                             created_at, updated_at, finished_at, lease_expires_at,
                             started_at, worker_id, error_message)
VALUES (gen_random_uuid(), 'acme', 'echo', 'queued', '{}', 0, now(), 0, 3, 0, 1,
        'content_job.queued', now(), now(), NULL, NULL, NULL, NULL, NULL),
       (gen_random_uuid(), 'acme', 'echo', 'running', '{}', 0, now(), 1, 3, 1, 2,
        'content_job.running', now(), now(), NULL, now(), now(), 'w', NULL),
       (gen_random_uuid(), 'acme', 'echo', 'done', '{}', 0, now(), 1, 3, 1, 3,
        'content_job.done', now(), now(), now(), NULL, now(), 'w', NULL),
       (gen_random_uuid(), 'acme', 'echo', 'failed', '{}', 0, now(), 3, 3, 3, 7,
        'content_job.failed', now(), now(), now(), NULL, now(), 'w', 'e'),
       (gen_random_uuid(), 'acme', 'echo', 'cancelled', '{}', 0, now(), 0, 3, 0, 2,
        'content_job.cancelled', now(), now(), now(), NULL, NULL, NULL, NULL);
INSERT INTO check_grid SELECT * FROM check_grid_base;
INSERT INTO check_grid
SELECT (jsonb_populate_record(b, jsonb_build_object('id', gen_random_uuid(), p.col, p.val))).*
FROM check_grid_base b,
     (SELECT 'company_id', to_jsonb(v) FROM unnest(ARRAY['', 'a', repeat('x', 200),
          repeat('x', 201), repeat('é', 200), repeat('é', 201)]) v
      UNION ALL SELECT 'job_type', to_jsonb(v) FROM unnest(ARRAY['', 'a', repeat('x', 200),
          repeat('x', 201), repeat('é', 200), repeat('é', 201)]) v
      UNION ALL SELECT 'progress_message', to_jsonb(v) FROM unnest(ARRAY[NULL,
          repeat('x', 1000), repeat('x', 1001), repeat('é', 1000), repeat('é', 1001)]) v
      UNION ALL SELECT 'error_traceback', to_jsonb(v) FROM unnest(ARRAY[NULL,
          repeat('x', 16384), repeat('x', 16385), repeat('é', 8192), repeat('é', 8193)]) v
      UNION ALL SELECT 'progress_fraction', to_jsonb(v) FROM unnest(ARRAY[NULL, -0.01, 0, 0.5,
          1, 1.01, 'NaN']::real[]) v
      UNION ALL SELECT 'max_attempts', to_jsonb(v) FROM unnest(ARRAY[0, 1, 1000, 1001]) v
      UNION ALL SELECT c, to_jsonb(v)
      FROM unnest('{run_at,created_at,updated_at,started_at,finished_at,
                    lease_expires_at}'::text[]) c,
           unnest('{"1969-12-31 23:59:59.999999Z","1970-01-01Z","9999-12-31Z",
                    "9999-12-31 00:00:00.000001Z",-infinity,infinity}'::text[]) v
     ) p(col, val);
"""
_QUEUE_GRID = """
CREATE TABLE check_queue_grid (LIKE pgjobs.job_queue);
INSERT INTO check_queue_grid (job_id, job_type, priority, run_at, lease_expires_at, company_id)
SELECT gen_random_uuid(), 'echo', 0, r, l, 'acme'
FROM unnest('{"1969-12-31 23:59:59.999999Z","1970-01-01Z",now,"9999-12-31Z",
              "9999-12-31 00:00:00.000001Z",-infinity,infinity}'::timestamptz[]) r,
     unnest('{NULL,"1969-12-31 23:59:59.999999Z","1970-01-01Z",now,"9999-12-31Z",
              "9999-12-31 00:00:00.000001Z",-infinity,infinity}'::timestamptz[]) l;
"""
_GRID = _JOB_GRID + _QUEUE_GRID


_GRIDS = {"pgjobs.jobs": ("check_grid", "id"), "pgjobs.job_queue": ("check_queue_grid", "job_id")}


async def _refused(dsn: str) -> dict[str, set[object]]:
    """The keys of the rows of each grid that the CHECKs installed now refuse (a CHECK
    refuses a row exactly when its expression is false), from each CHECK's definition."""
    checks = await fetch(dsn, _CHECK_DEFS)
    refused = {}
    for table, (grid, key) in _GRIDS.items():
        exprs = [c["def"].removeprefix("CHECK ") for c in checks if c["table"] == table]
        breaks = " OR ".join(f"({e}) IS FALSE" for e in exprs)
        rows = await fetch(dsn, f"SELECT {key} AS k FROM {grid} WHERE {breaks}")
        refused[table] = {r["k"] for r in rows}
    return refused


async def _assert_same_verdicts(dsn: str, before: dict[str, set[object]]) -> None:
    now = await _refused(dsn)
    for table, (grid, key) in _GRIDS.items():
        differ = list(now[table] ^ before[table])
        if differ:
            rows = await fetch(dsn, f"SELECT * FROM {grid} WHERE {key} = ANY(%s) LIMIT 3", [differ])
            raise AssertionError(f"{len(differ)} rows of {table} judged otherwise, e.g. {rows}")


async def test_merged_checks_migration_refuses_the_same_rows_keeps_a_filled_database_and_rolls_back(
    empty_dsn: str,
) -> None:
    """0020 replaces the 22 CHECKs of pgjobs.jobs and the 2 of pgjobs.job_queue with 3 and
    1 that refuse exactly the same rows; jobs in every state pass it and go on moving; its
    rollback restores the 24 exactly (names, definitions, validated). Jobs are moved by
    the statements of the version before sql/0021, which this schema is."""
    dsn = empty_dsn
    _apply_up_to(dsn, _MERGED)
    old = await fetch(dsn, _CHECK_DEFS)
    assert len(old) == 22 + 2
    lease = (await _jobs_in_every_state(dsn, _BEFORE))[-1]
    audit, jobs = await fetch(dsn, _AUDIT_LOG), await fetch(dsn, _JOB_ROWS)
    await fetch(dsn, _GRID)
    refused_before = await _refused(dsn)
    grid_size = await fetch(dsn, "SELECT count(*) AS n FROM check_grid")
    assert 0 < len(refused_before["pgjobs.jobs"]) < grid_size[0]["n"]
    assert 0 < len(refused_before["pgjobs.job_queue"]) < 7 * 8

    assert _apply_up_to(dsn, _LIVE) == [_MERGED]
    merged = await fetch(dsn, _CHECK_DEFS)
    assert [(c["table"], c["name"], c["validated"]) for c in merged] == [
        ("pgjobs.job_queue", "job_queue_times_in_range", True),
        ("pgjobs.jobs", "jobs_sizes_in_range", True),
        ("pgjobs.jobs", "jobs_state_consistent", True),
        ("pgjobs.jobs", "jobs_times_in_range", True),
    ]
    await _assert_same_verdicts(dsn, refused_before)
    assert await fetch(dsn, _AUDIT_LOG) == audit
    assert await fetch(dsn, _JOB_ROWS) == jobs
    await assert_queue_matches_jobs(dsn)
    # A lease taken before the migration completes its job after it; new jobs move.
    assert len(await fetch(dsn, _BEFORE["job_finish_many_if_leased"], _finish(lease, None))) == 1
    await _jobs_moving(dsn, _BEFORE)

    _roll_back(dsn, _MERGED)
    assert await fetch(dsn, _CHECK_DEFS) == old
    await _jobs_moving(dsn, _BEFORE)
    assert _apply_up_to(dsn, _LIVE) == [_MERGED]
    assert await fetch(dsn, _CHECK_DEFS) == merged
    await _jobs_moving(dsn, _BEFORE)


def _apply_up_to(dsn: str, first_skipped: str) -> list[str]:
    """Apply the migrations before ``first_skipped`` only: the schema as it was then."""
    backend = migrate._backend(dsn)
    try:
        migrations = read_migrations(str(migrate.migrations_dir()))
        earlier = set(ALL[: ALL.index(first_skipped)])
        with backend.lock():
            pending = backend.to_apply(migrations.filter(lambda m: m.id in earlier))
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


async def _jobs_moving(dsn: str, queries: dict[str, str] = QUERIES) -> None:
    """Jobs are still enqueued, claimed, finished (a success, a failure) and cancelled by
    ``queries``' statements."""
    for outcome in (None, "e"):
        await _enqueue(dsn, queries, JobSpec("acme", "echo"))
        finished = await fetch(
            dsn, queries["job_finish_many_if_leased"], _finish(await _claim(dsn, queries), outcome)
        )
        assert len(finished) == 1
    cancelled = await _enqueue(dsn, queries, JobSpec("acme", "echo"))
    assert [r["status"] for r in await _cancel(dsn, queries, cancelled)] == ["cancelled"]
    await assert_queue_matches_jobs(dsn)


async def test_live_state_migration_rolls_back_a_filled_database_and_applies_again(
    empty_dsn: str,
) -> None:
    """0021's rollback moves each live job's state from its queue row back into its job
    row: pgjobs.jobs, a table again, holds what the view showed, value for value, the
    audit log is untouched, the CHECKs are 0020's again (definitions and descriptions),
    and applying it again gives the same view; a lease taken before both still completes
    its job."""
    dsn = empty_dsn
    _apply_up_to(dsn, _LIVE)
    checks = await fetch(dsn, _CHECK_DEFS)
    assert migrate.apply(dsn) == _FROM_LIVE
    async with await Client.connect(dsn) as client:
        await client.enqueue("acme", "echo", max_attempts=1)
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), "e"))
        await client.enqueue("acme", "echo")
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), None))
        await client.enqueue("globex", "echo")
        lease = await _claim(dsn)
        progress = {"now": None, "id": lease["id"], "lease_token": lease["lease_token"]}
        await fetch(
            dsn, QUERIES["job_progress_if_leased"], {**progress, "fraction": 0.5, "message": "m"}
        )
        await client.enqueue("acme", "echo", max_attempts=3)
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), "e"))
        cancelled = await client.enqueue("acme", "echo")
        await client.cancel("acme", cancelled.id)
        await client.enqueue("globex", "echo", {"n": 1})
    statuses = sorted(r["status"] for r in await fetch(dsn, "SELECT status FROM pgjobs.jobs"))
    assert statuses == ["cancelled", "done", "failed", "queued", "queued", "running"]
    audit, jobs = await fetch(dsn, _AUDIT_LOG), await fetch(dsn, _JOB_ROWS)

    _roll_back(dsn, *_FROM_LIVE)
    assert await fetch(dsn, "SELECT relkind FROM pg_class WHERE oid = 'pgjobs.jobs'::regclass") == [
        {"relkind": "r"}
    ]
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert await fetch(dsn, _AUDIT_LOG) == audit
    await assert_queue_matches_jobs(dsn)
    assert await fetch(dsn, _CHECK_DEFS) == checks

    assert migrate.apply(dsn) == _FROM_LIVE
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert len(await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(lease, None))) == 1


async def test_live_state_checks_refuse_the_live_states_the_job_row_refuses(
    empty_dsn: str,
) -> None:
    """0021's CHECKs on the queue row, which holds a queued or running job's state, refuse
    exactly the queued and running states that the job row's CHECKs refuse (where the
    columns only the job row has are valid), over the grid of states above; any other
    status is refused there (an ended job has no queue row)."""
    dsn = empty_dsn
    migrate.apply(dsn)
    await fetch(dsn, _JOB_GRID)
    checks = await fetch(
        dsn,
        "SELECT conrelid::regclass::text AS table, pg_get_constraintdef(oid) AS def"
        " FROM pg_constraint WHERE contype = 'c'"
        " AND conrelid = ANY ('{pgjobs.job_rows,pgjobs.job_queue}'::regclass[])",
    )

    async def refused(table: str, where: str) -> set[object]:
        exprs = [c["def"].removeprefix("CHECK ") for c in checks if c["table"] == table]
        breaks = " OR ".join(f"({e}) IS FALSE" for e in exprs)
        rows = await fetch(dsn, f"SELECT id FROM check_grid WHERE ({where}) AND ({breaks})")
        return {r["id"] for r in rows}

    live = (
        "status IN ('queued', 'running') AND finished_at IS NULL"
        " AND length(company_id) BETWEEN 1 AND 200 AND length(job_type) BETWEEN 1 AND 200"
        " AND pgjobs.time_in_range(created_at) IS NOT FALSE"
    )
    by_job_row = await refused("pgjobs.job_rows", live)
    by_queue_row = await refused("pgjobs.job_queue", live)
    (n,) = await fetch(dsn, f"SELECT count(*) AS n FROM check_grid WHERE {live}")
    assert 0 < len(by_job_row) < n["n"]
    assert by_queue_row == by_job_row
    ended = "status NOT IN ('queued', 'running')"
    (m,) = await fetch(dsn, f"SELECT count(*) AS n FROM check_grid WHERE {ended}")
    assert len(await refused("pgjobs.job_queue", ended)) == m["n"]
    await assert_queue_matches_jobs(dsn)


async def test_limit_running_bound_migration_rolls_back_and_applies_again(
    empty_dsn: str,
) -> None:
    """0025 adds pgjobs.limit_running, the limited claim's bound on each limit's running
    jobs; its rollback drops it and leaves the limits, and applied again the claim keeps
    the bound anew (from an exact count: no row yet)."""
    dsn = empty_dsn
    migrate.apply(dsn)
    params = {"now": None, "limit": 5, "worker_id": "w", "lease_seconds": 30.0,
              "job_types": None, "after_company": None}  # fmt: skip

    async def claim_limited() -> int:
        async with (
            await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
            conn.transaction(),
        ):
            await conn.execute(QUERIES["limit_lock_for_types"], params)
            cur = await conn.execute(QUERIES["job_claim_batch_limited"], params)
            return len(await cur.fetchall())

    await fetch(dsn, "INSERT INTO pgjobs.limits (company_id, max_running) VALUES ('acme', 100)")
    for _ in range(10):
        await _insert(dsn)
    assert await claim_limited() == 5
    assert await fetch(dsn, "SELECT bound FROM pgjobs.limit_running") == [{"bound": 5}]

    _roll_back(dsn, "0025_limit_running_bound")
    (table,) = await fetch(dsn, "SELECT to_regclass('pgjobs.limit_running') AS t")
    assert table["t"] is None
    assert len(await fetch(dsn, "SELECT * FROM pgjobs.limits")) == 1

    assert migrate.apply(dsn) == ["0025_limit_running_bound"]
    assert await claim_limited() == 5
    assert await fetch(dsn, "SELECT bound FROM pgjobs.limit_running") == [{"bound": 10}]


async def test_notify_items_plan_migration_notifies_as_before_and_rolls_back(
    empty_dsn: str,
) -> None:
    """0026 makes notify_audit_rows PL/pgSQL with its plan settings; a cancel written
    through pgjobs.jobs sends the same item before, after its rollback and applied again."""
    dsn = empty_dsn
    migrate.apply(dsn)
    function = """
        SELECT l.lanname, p.proconfig FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        WHERE p.oid = 'pgjobs.notify_audit_rows'::regproc"""

    async def cancel_notifies() -> dict[str, object]:
        job_id = await _insert(dsn)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("LISTEN pgjobs_events")
            assert await fetch(dsn, _CANCEL, [job_id]) == [{"status": "cancelled"}]
            payloads = [n.payload async for n in conn.notifies(timeout=1.0)]
        (item,) = json.loads(payloads[0])["events"]
        assert (item["jobId"], item["seq"]) == (str(job_id), 2)
        return {k: v for k, v in item.items() if k not in ("jobId", "eventId")}

    assert await fetch(dsn, function) == [
        {
            "lanname": "plpgsql",
            "proconfig": ["plan_cache_mode=force_generic_plan", "enable_seqscan=off",
                          "enable_hashjoin=off", "enable_mergejoin=off"],
        }
    ]  # fmt: skip
    after = await cancel_notifies()
    assert after["type"] == "content_job.cancelled"

    _roll_back(dsn, "0026_notify_items_plan")
    assert await fetch(dsn, function) == [{"lanname": "sql", "proconfig": None}]
    assert await cancel_notifies() == after

    assert migrate.apply(dsn) == ["0026_notify_items_plan"]
    assert await cancel_notifies() == after


async def _late_writer_order(dsn: str) -> list[int]:
    """A job's seqs in the company stream's order, where a transaction that took its xid
    first wrote the job's seq 3 after a younger one wrote (and committed) its seq 2."""
    async with await Client.connect(dsn) as client:
        job = await client.enqueue("acme", "echo", {})
        async with (
            await psycopg.AsyncConnection.connect(dsn) as older,
            await psycopg.AsyncConnection.connect(dsn) as younger,
        ):
            await client.enqueue("acme", "echo", {}, conn=older)  # its xid, first
            await client.cancel("acme", job.id, conn=younger)  # seq 2
            await younger.commit()
            await client.retry("acme", job.id, conn=older)  # seq 3
            await older.commit()
    return await seqs_in_company_stream_order(dsn, job.id)


async def test_event_order_migration_keeps_a_jobs_rows_in_seq_order_and_rolls_back(
    empty_dsn: str,
) -> None:
    """0027: an audit row's xid is at least the job's previous row's, so a transaction that
    took its xid first and wrote a job's later transition after a younger one wrote the
    earlier still stores them in seq order under (xid, id); rolled back, the rows take the
    writer's own xid again (the order the company stream used to send)."""
    dsn = empty_dsn
    migrate.apply(dsn)
    assert await _late_writer_order(dsn) == [1, 2, 3]
    _roll_back(dsn, "0028_order_check_plan", "0027_event_order")
    assert await _late_writer_order(dsn) == [1, 3, 2]
    assert migrate.apply(dsn) == ["0027_event_order", "0028_order_check_plan"]
    assert await _late_writer_order(dsn) == [1, 2, 3]


async def test_order_check_plan_migration_keeps_the_order_and_rolls_back(
    empty_dsn: str,
) -> None:
    """0028 makes younger_transaction_ended PL/pgSQL (a plan kept per session); the late
    writer's transitions keep their seq order under it, rolled back (SQL again) and
    applied again."""
    dsn = empty_dsn
    migrate.apply(dsn)
    language = """
        SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
        WHERE p.oid = 'pgjobs.younger_transaction_ended'::regproc"""
    assert await fetch(dsn, language) == [{"lanname": "plpgsql"}]
    assert await _late_writer_order(dsn) == [1, 2, 3]
    _roll_back(dsn, "0028_order_check_plan")
    assert await fetch(dsn, language) == [{"lanname": "sql"}]
    assert await _late_writer_order(dsn) == [1, 2, 3]
    assert migrate.apply(dsn) == ["0028_order_check_plan"]
    assert await fetch(dsn, language) == [{"lanname": "plpgsql"}]
