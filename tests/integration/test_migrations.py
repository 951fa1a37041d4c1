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

from helpers import assert_queue_matches_jobs, claim_one, fetch, finish_params
from pgjobs import migrate
from pgjobs.client import Client
from pgjobs.queries import QUERIES

# Every migration id, in the order they apply (each depends on the one before).
ALL = sorted(p.stem for p in migrate.migrations_dir().glob("0*.sql") if ".rollback" not in p.name)


def since(first: str) -> list[str]:
    """``first`` and every migration after it: what rolling back to before it undoes."""
    return ALL[ALL.index(first) :]


# Statements that run on every schema version these tests visit: pgjobs.jobs is a table
# before sql/0020 and a view routing writes to the tables since, where this version's
# queries (pgjobs.queries) need the tables 0020 makes.
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
    backend = migrate._backend(dsn)
    try:
        migrations = read_migrations(str(migrate.migrations_dir()))
        with backend.lock():
            chosen = migrations.filter(lambda m: m.id in ids)
            backend.rollback_migrations(backend.to_rollback(chosen))
    finally:
        backend.connection.close()


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

    with pytest.raises(psycopg.errors.CheckViolation, match="jobs_run_at_in_range"):
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


async def test_narrow_audit_migration_keeps_a_filled_database_and_rolls_back(
    empty_dsn: str,
) -> None:
    """0016 on jobs in every state: the audit log, the jobs and their 22 CHECKs are
    untouched by it and by its rollback, which restores the id key; the (job_id, seq) key
    comes back with it, and the jobs go on moving after each step."""
    dsn = empty_dsn
    migrate.apply(dsn)
    _roll_back(dsn, "0016_narrow_audit")
    old_checks = (await fetch(dsn, _CHECKS))[0]["names"]
    assert len(old_checks) == 22
    async with await Client.connect(dsn) as client:
        failed = await client.enqueue("acme", "echo", max_attempts=1)
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), "e"))
        await client.enqueue("acme", "echo")
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), None))
        running = await client.enqueue("globex", "echo")
        lease = await _claim(dsn)
        retried = await client.enqueue("acme", "echo", max_attempts=3)
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), "e"))
        cancelled = await client.enqueue("acme", "echo")
        await client.cancel("acme", cancelled.id)
        await client.enqueue("globex", "echo", {"n": 1})
        statuses = sorted(r["status"] for r in await fetch(dsn, "SELECT status FROM pgjobs.jobs"))
        assert statuses == ["cancelled", "done", "failed", "queued", "queued", "running"]
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
        failed.id,
        running.id,
        retried.id,
        cancelled.id,
    }

    audit, jobs = await fetch(dsn, _AUDIT_LOG), await fetch(dsn, _JOB_ROWS)
    _roll_back(dsn, "0016_narrow_audit")
    assert await fetch(dsn, _AUDIT_LOG) == audit
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert (await fetch(dsn, _CHECKS))[0]["names"] == old_checks
    assert (await fetch(dsn, _EVENT_KEYS))[0]["defs"] == [
        "UNIQUE (job_id, seq)", "PRIMARY KEY (id)"
    ]  # fmt: skip
    with pytest.raises(psycopg.errors.CheckViolation, match="jobs_running_has_lease"):
        await fetch(dsn, "UPDATE pgjobs.jobs SET status = 'running' WHERE status = 'queued'")
    async with await Client.connect(dsn) as client:
        await client.enqueue("acme", "echo")
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(await _claim(dsn), None))
    await assert_queue_matches_jobs(dsn)
    assert migrate.apply(dsn) == ["0016_narrow_audit"]
    assert (await fetch(dsn, _CHECKS))[0]["names"] == old_checks


async def _claim(dsn: str) -> dict[str, object]:
    return await claim_one(dsn, "w1")


def _finish(job: dict[str, object], error: str | None) -> dict[str, object]:
    return finish_params(job, "done" if error is None else "error")


async def test_live_state_migration_rolls_back_a_filled_database_and_applies_again(
    empty_dsn: str,
) -> None:
    """0020's rollback moves each live job's state from its queue row back into its job
    row: pgjobs.jobs, a table again, holds what the view showed, value for value, the
    audit log is untouched, and applying it again gives the same view; a lease taken
    before both still completes its job."""
    dsn = empty_dsn
    migrate.apply(dsn)
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

    _roll_back(dsn, "0020_live_state")
    assert await fetch(dsn, "SELECT relkind FROM pg_class WHERE oid = 'pgjobs.jobs'::regclass") == [
        {"relkind": "r"}
    ]
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert await fetch(dsn, _AUDIT_LOG) == audit
    await assert_queue_matches_jobs(dsn)

    assert migrate.apply(dsn) == ["0020_live_state"]
    assert await fetch(dsn, _JOB_ROWS) == jobs
    assert len(await fetch(dsn, QUERIES["job_finish_many_if_leased"], _finish(lease, None))) == 1
    await assert_queue_matches_jobs(dsn)
