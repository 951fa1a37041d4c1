"""The schema's own guarantees, checked with plain SQL as an operator would see them."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgjobs import db
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES, compact


def _param_names(query: str) -> set[str]:
    return set(re.findall(r"%\((\w+)\)[sb]", query))


@pytest.mark.parametrize("name", sorted(QUERIES))
async def test_every_named_query_plans_against_the_schema(shared_dsn: str, name: str) -> None:
    query = QUERIES[name]
    params = dict.fromkeys(_param_names(query))
    async with await psycopg.AsyncConnection.connect(shared_dsn, autocommit=True) as conn:
        if compact(query).startswith("VACUUM"):
            # A utility statement, which EXPLAIN does not take: run it (it has no
            # parameters and changes no row).
            await conn.execute(query)
            return
        if compact(query).startswith("LOCK TABLE"):
            # The same, and a lock is taken in a transaction only (this one, rolled back).
            async with conn.transaction(force_rollback=True):
                await conn.execute(query)
            return
        await conn.execute("EXPLAIN " + query, params)  # type: ignore[operator]


async def test_update_that_skips_the_event_is_refused(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="without a transition"):
            await conn.execute(
                # (not cancelled or failed: a CHECK ties those to their last event)
                "UPDATE pgjobs.jobs SET status = 'done', finished_at = now() WHERE id = %s",
                [job.id],
            )
        with pytest.raises(psycopg.errors.CheckViolation, match="without a transition"):
            await conn.execute(
                "UPDATE pgjobs.jobs SET event_seq = event_seq + 2,"
                " last_event = 'content_job.cancelled', status = 'cancelled', finished_at = now()"
                " WHERE id = %s",
                [job.id],
            )


async def test_status_and_timestamps_must_agree(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="jobs_state_consistent"):
            await conn.execute(
                "UPDATE pgjobs.jobs SET status = 'done', event_seq = event_seq + 1,"
                " last_event = 'content_job.done' WHERE id = %s",
                [job.id],
            )
        # a live job's state is its queue row's (sql/0021)
        with pytest.raises(psycopg.errors.CheckViolation, match="job_queue_state_consistent"):
            await conn.execute(
                "UPDATE pgjobs.jobs SET status = 'running', event_seq = event_seq + 1,"
                " last_event = 'content_job.running', attempts = 1 WHERE id = %s",
                [job.id],
            )
        with pytest.raises(psycopg.errors.CheckViolation):
            await conn.execute(
                "INSERT INTO pgjobs.jobs (id, company_id, job_type, status) "
                "VALUES (gen_random_uuid(), 'acme', 'echo', 'sleeping')"
            )


async def test_job_events_are_append_only(dsn: str, client: Client) -> None:
    await client.enqueue("acme", "echo")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("UPDATE pgjobs.job_events SET type = 'content_job.done'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            await conn.execute("DELETE FROM pgjobs.job_events")


async def test_events_survive_pruning_the_job_row(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    await client.cancel("acme", job.id)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("DELETE FROM pgjobs.jobs WHERE id = %s", [job.id])
        cur = await conn.execute(
            "SELECT type FROM pgjobs.job_events WHERE job_id = %s ORDER BY seq", [job.id]
        )
        assert [r[0] for r in await cur.fetchall()] == [
            "content_job.queued",
            "content_job.cancelled",
        ]


async def test_bulk_transition_notifies_in_few_payloads_each_under_8000_bytes(
    dsn: str, client: Client
) -> None:
    from pgjobs.jobspec import JobSpec

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener:
        await listener.execute("LISTEN pgjobs_events")
        # A long error message must be cut in the payload, not break the NOTIFY. On a
        # connection of the test's own, whose commit carries the items (through the pool,
        # a batch this big rings after its commit instead).
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            specs = (JobSpec(f"company-{n % 7}", "echo") for n in range(500))
            jobs = await client.enqueue_many(specs, conn=conn)
        payloads = [n.payload async for n in listener.notifies(timeout=2.0)]
    events = [e for p in payloads for e in json.loads(p)["events"]]
    assert len(events) == 500
    assert {uuid.UUID(e["jobId"]) for e in events} == {j.id for j in jobs}
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert len(payloads) <= len(events) // 10, "events are packed, not one NOTIFY each"
    first = events[0]
    assert set(first) >= {"eventId", "jobId", "companyId", "seq", "type", "status", "attempt"}


async def test_long_messages_are_cut_in_the_notify_but_kept_in_the_row(
    dsn: str, client: Client
) -> None:
    from pgjobs.queries import QUERIES

    job = await client.enqueue("acme", "echo", max_attempts=1)
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(
            QUERIES["job_claim_batch"],
            {
                "now": None,
                "limit": 1,
                "worker_id": "w",
                "lease_seconds": 30.0,
                "job_types": None,
                "after_company": None,
            },
        )
        (claimed,) = await cur.fetchall()
        await conn.execute("LISTEN pgjobs_events")
        await conn.execute(
            QUERIES["job_progress_if_leased"],
            {
                "id": job.id,
                "lease_token": claimed["lease_token"],
                "fraction": 0.5,
                "message": "é" * 1000,
                "now": None,
            },
        )
        error = "boom " * 2000
        await conn.execute(
            "UPDATE pgjobs.jobs SET status = 'failed', error_message = %s, finished_at = now(),"
            " lease_expires_at = NULL, event_seq = event_seq + 1,"
            " last_event = 'content_job.failed' WHERE id = %s",
            [error, job.id],
        )
        payloads = [n.payload async for n in conn.notifies(timeout=1.0)]
    progress, failed = (json.loads(p)["events"][0] for p in payloads)
    assert progress["progress"] == {"fraction": 0.5, "message": "é" * 300}
    assert failed["errorMessage"] == error[:300]
    row = await client.get("acme", job.id)
    assert row.error_message == error


async def test_a_large_job_input_still_notifies(dsn: str, client: Client) -> None:
    # Payloads carry ids, never data: a 1 MiB input does not touch the 8000-byte limit.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("LISTEN pgjobs_events")
        job = await client.enqueue("acme", "render", {"blob": "x" * (1024 * 1024)})
        payloads = [n.payload async for n in conn.notifies(timeout=1.0)]
    assert [json.loads(p)["events"][0]["jobId"] for p in payloads] == [str(job.id)]


@pytest.mark.parametrize(
    "name", ["job_claim_batch", "job_finish_many_if_leased", "job_extend_leases"]
)
async def test_hot_path_generic_plans_reach_jobs_by_primary_key(
    dsn: str, client: Client, name: str
) -> None:
    """psycopg prepares a statement after a few runs and PostgreSQL may then plan it once
    for any parameters. These plans must find the batch's rows by primary key: a plan
    that scans the table, or drives the batch's join from the queue rows and rescans the
    batch for each (the statistics say few jobs run), costs a sequential pass or
    batch x batch comparisons per call. Statistics as after a bulk enqueue: many queued
    jobs, none running. The claim reads its job rows by key; the finish and the heartbeat
    find their queue rows (sql/0021) by key."""
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(2000))
    names: list[str] = []

    def placeholder(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    prepared = re.sub(r"%\((\w+)\)[sb]", placeholder, QUERIES[name]).replace("%%", "%")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ANALYZE pgjobs.job_rows, pgjobs.job_queue")
        await conn.execute(f"PREPARE hot AS {prepared}".encode())
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        args = ", ".join(["NULL"] * len(names))
        cur = await conn.execute(f"EXPLAIN EXECUTE hot({args})".encode())
        plan = "\n".join(row[0] for row in await cur.fetchall())
    assert "Seq Scan on job" not in plan, plan
    assert "jobs_lease_idx" not in plan, plan
    if name == "job_claim_batch":
        assert "jobs_pkey" in plan, plan
        assert "Merge Join" not in plan, plan  # walks the whole primary key from its start
    else:
        # One lookup per entry of the batch, not the batch rescanned for every queue row.
        assert "job_queue_pkey" in plan, plan
        assert "Index Cond: (job_id = u.id)" in plan, plan


async def test_notify_items_carry_only_the_keys_their_event_has(dsn: str, client: Client) -> None:
    """The publish trigger builds NOTIFY items by hand (sql/0003): each must be valid JSON
    with the same values as the row, and the optional keys only where the event has
    them (a progress event keeps both of its keys, null or not)."""
    job = await client.enqueue("acme", "echo", max_attempts=1)
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute("LISTEN pgjobs_events")
        cur = await conn.execute(
            QUERIES["job_claim_batch"],
            {
                "now": None,
                "limit": 1,
                "worker_id": "w",
                "lease_seconds": 30.0,
                "job_types": None,
                "after_company": None,
            },
        )
        (claimed,) = await cur.fetchall()
        params = {"id": job.id, "lease_token": claimed["lease_token"], "now": None}
        await conn.execute(
            QUERIES["job_progress_if_leased"], {**params, "fraction": None, "message": None}
        )
        await conn.execute(
            QUERIES["job_progress_if_leased"], {**params, "fraction": 0.25, "message": 'a "q" \\'}
        )
        await conn.execute(
            QUERIES["job_finish_many_if_leased"],
            {
                "now": None, "ids": [job.id], "lease_tokens": [claimed["lease_token"]],
                "outcomes": ["error"], "results": [None], "errors": ["boom\n\"x\""],
                "tracebacks": None, "retry_delays": [0.0], "asset_ids": [None],
                "asset_keys": [None],
                "asset_content_types": [None], "asset_sizes": [None], "asset_sha256s": [None],
                "asset_filenames": [None],
            },
        )  # fmt: skip
        payloads = [n.payload async for n in conn.notifies(timeout=1.0)]
    running, empty, progress, failed = (json.loads(p)["events"][0] for p in payloads)
    base = {"eventId", "jobId", "companyId", "seq", "type", "status", "attempt"}
    assert set(running) == base
    assert running["type"] == "content_job.running"
    assert running["jobId"] == str(job.id)
    assert running["companyId"] == "acme"
    assert empty["progress"] == {"fraction": None, "message": None}
    assert progress["progress"] == {"fraction": 0.25, "message": 'a "q" \\'}
    assert set(failed) == base | {"errorMessage"}, "no runAt: failed is not a retry"
    assert failed["errorMessage"] == 'boom\n"x"'
    assert failed["status"] == "failed"
    events = await client.events("acme", job.id)
    assert [e.id for e in events[1:]] == [p["eventId"] for p in (running, empty, progress, failed)]


def _seq_scanned(plan: dict[str, Any]) -> set[str]:
    """The relations the plan reads by a sequential scan."""
    own = {plan["Relation Name"]} if plan["Node Type"] == "Seq Scan" else set()
    return own.union(*(_seq_scanned(child) for child in plan.get("Plans", [])))


def _rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows the plan's scans of ``relation`` read (returned or filtered out), over all
    their loops."""
    scan = plan.get("Relation Name") == relation and plan["Node Type"].endswith("Scan")
    read = plan["Actual Rows"] + plan.get("Rows Removed by Filter", 0)
    own = read * plan["Actual Loops"] if scan else 0
    return int(own) + sum(_rows_read(child, relation) for child in plan.get("Plans", []))


@pytest.mark.parametrize(
    ("job_types", "companies"), [(None, 1), (["echo", "render"], 1), (None, 500)]
)
async def test_claim_reads_about_its_batch_among_many_finished_jobs(
    dsn: str, client: Client, job_types: list[str] | None, companies: int
) -> None:
    """The claim reads pgjobs.job_queue in claim order and stops after its batch, whatever
    else the tables hold. With a condition on the job row as well ("j.status = 'queued'",
    true for every queue row but estimated from the whole table, where finished jobs are
    nearly all of it), the planner expected to probe every queued job to find a batch,
    joined them all and sorted them: ~300 ms per claim with 10M finished jobs (bench
    scenario 6). Workers pass their registry's types, which the index walk filters on the
    way. With many companies, the fair claim visits at most `limit` of them (one index
    probe each) and takes a few jobs from each."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # Older jobs than any enqueued below: their uuid7 ids sort first, as these do.
        # Into the job rows' table in one statement, with its rules and triggers (through
        # the pgjobs.jobs view, its INSTEAD OF trigger routes each row alone: ~10 s).
        await conn.execute(
            """
            INSERT INTO pgjobs.job_rows (id, company_id, job_type, status, attempts, worker_id,
                                     lease_token, event_seq, last_event, started_at,
                                     finished_at)
            SELECT overlay(md5(g::text) PLACING '00' FROM 1)::uuid, 'acme', 'echo', 'done', 1,
                   'w', 1, 3, 'content_job.done', now(), now()
            FROM generate_series(1, 50000) AS g
            """
        )
    await client.enqueue_many(JobSpec(f"company-{n % companies}", "echo") for n in range(2000))
    params = {"now": None, "limit": 100, "worker_id": "w", "lease_seconds": 30.0}
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("ANALYZE pgjobs.job_rows, pgjobs.job_queue")
        await conn.execute("ANALYZE pgjobs.job_queue")
        # A company that enqueues after the statistics were taken (which then say every
        # queued job is company-0's): its one job must not cost a walk past the others'.
        # Two levels: the probe for its next level must not walk the others' jobs either.
        await conn.execute(
            "INSERT INTO pgjobs.jobs (id, company_id, job_type, priority)"
            " VALUES (gen_random_uuid(), 'zz', 'echo', 5), (gen_random_uuid(), 'zz', 'echo', 0)"
        )
        cur = await conn.execute(
            b"EXPLAIN (ANALYZE, FORMAT JSON) " + QUERIES["job_claim_batch"].encode(),
            {**params, "job_types": job_types, "after_company": None},
        )
        row = await cur.fetchone()
        await conn.rollback()
    assert row is not None
    plan = row[0][0]["Plan"]
    text = json.dumps(plan)
    # The one sequential scan: the limits table's few rows, read once (no limit covers these
    # jobs, or the claim would take none).
    assert _seq_scanned(plan) <= {"limits"}, text
    assert "Merge Join" not in text, text
    assert "job_queue_fair_idx" in text, text
    # The batch's queue rows; with many companies one probe per company visited, and, as
    # zz's level-5 job is not among them, the batch taken in the global order after the
    # probe for the highest due level; again by primary key for the UPDATE; their job
    # rows by primary key for what the claim returns (sql/0021).
    assert _rows_read(plan, "job_queue") <= 4 * 100 + 2, text
    assert _rows_read(plan, "job_rows") <= 100, text


async def test_a_database_error_is_described_in_one_line(dsn: str) -> None:
    """An error raised inside PL/pgSQL carries CONTEXT lines; a log line keeps its class and
    primary message only."""
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        with pytest.raises(psycopg.Error) as raised:
            await conn.execute("DO $$ BEGIN RAISE EXCEPTION 'boom: %', 42; END $$")
    assert "\n" in str(raised.value)  # what a log line would otherwise carry
    assert db.describe_error(raised.value) == "RaiseException: boom: 42"
    assert db.describe_error(OSError("no route\nto host")) == "OSError: no route"
    assert db.describe_error(TimeoutError()) == "TimeoutError"


# Every rule the CHECKs enforce (one CHECK each until sql/0020_merged_checks, whose names
# the ids keep), the merged CHECK that enforces it now, the table it is on, and an update of
# a freshly queued job that breaks that rule and no other: through the view pgjobs.jobs,
# which routes a queued job's live state to its queue row and the rest to its job row
# (sql/0021), or on a table itself where the view would not reach that table's copy.
_TIMES, _SIZES, _STATE = "jobs_times_in_range", "jobs_sizes_in_range", "jobs_state_consistent"
_Q_TIMES, _Q_SIZES, _Q_STATE = (
    "job_queue_times_in_range",
    "job_queue_sizes_in_range",
    "job_queue_state_consistent",
)
_ROWS, _QUEUE = "job_rows", "job_queue"
_RULES = [
    ("attempts_in_range", _Q_STATE, _QUEUE, "UPDATE pgjobs.jobs SET attempts = -1"),
    ("attempts_in_range", _STATE, _ROWS, "UPDATE pgjobs.job_rows SET attempts = -1"),
    ("company_id_check", _SIZES, _ROWS, "UPDATE pgjobs.jobs SET company_id = ''"),
    ("created_at_in_range", _TIMES, _ROWS, "UPDATE pgjobs.jobs SET created_at = '1900-01-01Z'"),
    (
        "done_has_no_error",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.jobs SET status = 'done', finished_at = now(), error_message = 'x'",
    ),
    # a live job's last event is one a live job can have
    (
        "ended_has_its_event",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET last_event = 'content_job.failed'",
    ),
    (
        "ended_has_its_event",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.job_rows SET last_event = 'content_job.failed'",
    ),
    (
        "cancelled_has_its_event",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.jobs SET status = 'cancelled', finished_at = now()",
    ),
    (
        "failed_has_error",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.jobs SET status = 'failed', last_event = 'content_job.failed',"
        " finished_at = now()",
    ),
    (
        "finished_at_in_range",
        _TIMES,
        _ROWS,
        "UPDATE pgjobs.jobs SET status = 'done', finished_at = '1900-01-01Z'",
    ),
    ("finished_iff_terminal", _STATE, _ROWS, "UPDATE pgjobs.jobs SET finished_at = now()"),
    (
        "terminal_has_finished_at",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.jobs SET status = 'done', last_event = 'content_job.done'",
    ),
    ("job_type_check", _SIZES, _ROWS, "UPDATE pgjobs.jobs SET job_type = ''"),
    (
        "last_event_known",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET last_event = 'content_job.nope'",
    ),
    (
        "last_event_known",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.job_rows SET last_event = 'content_job.nope'",
    ),
    (
        "lease_expires_at_in_range",
        _Q_TIMES,
        _QUEUE,
        "UPDATE pgjobs.jobs SET status = 'running', attempts = 1, worker_id = 'w',"
        " started_at = now(), lease_expires_at = '1900-01-01Z'",
    ),
    (
        "lease_expires_at_in_range",
        _TIMES,
        _ROWS,
        "UPDATE pgjobs.job_rows SET status = 'running', attempts = 1, worker_id = 'w',"
        " started_at = now(), lease_expires_at = '1900-01-01Z'",
    ),
    (
        "lease_only_while_running",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET lease_expires_at = now()",
    ),
    (
        "lease_only_while_running",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.job_rows SET lease_expires_at = now()",
    ),
    ("max_attempts_check", _SIZES, _ROWS, "UPDATE pgjobs.jobs SET max_attempts = 1001"),
    ("max_attempts_check", _Q_SIZES, _QUEUE, "UPDATE pgjobs.job_queue SET max_attempts = 1001"),
    ("progress_fraction_check", _Q_SIZES, _QUEUE, "UPDATE pgjobs.jobs SET progress_fraction = 2"),
    (
        "progress_fraction_check",
        _SIZES,
        _ROWS,
        "UPDATE pgjobs.job_rows SET progress_fraction = 2",
    ),
    (
        "progress_message_check",
        _Q_SIZES,
        _QUEUE,
        "UPDATE pgjobs.jobs SET progress_message = repeat('x', 1001)",
    ),
    (
        "progress_message_check",
        _SIZES,
        _ROWS,
        "UPDATE pgjobs.job_rows SET progress_message = repeat('x', 1001)",
    ),
    (
        "queued_has_attempt_left",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET attempts = max_attempts",
    ),
    (
        "queued_has_attempt_left",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.job_rows SET attempts = max_attempts",
    ),
    ("run_at_in_range", _TIMES, _ROWS, "UPDATE pgjobs.jobs SET run_at = '1900-01-01Z'"),
    ("run_at_in_range", _Q_TIMES, _QUEUE, "UPDATE pgjobs.job_queue SET run_at = '1900-01-01Z'"),
    (
        "running_has_lease",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET status = 'running', attempts = 1",
    ),
    (
        "running_has_lease",
        _STATE,
        _ROWS,
        "UPDATE pgjobs.job_rows SET status = 'running', attempts = 1",
    ),
    (
        "running_has_worker",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET status = 'running', attempts = 1, started_at = now(),"
        " lease_expires_at = now()",
    ),
    (
        "running_has_started_at",
        _Q_STATE,
        _QUEUE,
        "UPDATE pgjobs.jobs SET status = 'running', attempts = 1, worker_id = 'w',"
        " lease_expires_at = now()",
    ),
    (
        "started_at_in_range",
        _Q_TIMES,
        _QUEUE,
        "UPDATE pgjobs.jobs SET started_at = '1900-01-01Z'",
    ),
    (
        "started_at_in_range",
        _TIMES,
        _ROWS,
        "UPDATE pgjobs.job_rows SET started_at = '1900-01-01Z'",
    ),
    ("status_check", _STATE, _ROWS, "UPDATE pgjobs.jobs SET status = 'sleeping'"),
    ("status_check", _Q_STATE, _QUEUE, "UPDATE pgjobs.job_queue SET status = 'done'"),
    (
        "traceback_bounded",
        _Q_SIZES,
        _QUEUE,
        "UPDATE pgjobs.jobs SET error_traceback = repeat('x', 16385)",
    ),
    (
        "traceback_bounded",
        _SIZES,
        _ROWS,
        "UPDATE pgjobs.job_rows SET error_traceback = repeat('x', 16385)",
    ),
    (
        "updated_at_in_range",
        _Q_TIMES,
        _QUEUE,
        "UPDATE pgjobs.jobs SET updated_at = '1900-01-01Z'",
    ),
    (
        "updated_at_in_range",
        _TIMES,
        _ROWS,
        "UPDATE pgjobs.job_rows SET updated_at = '1900-01-01Z'",
    ),
]


@pytest.mark.parametrize(
    ("check", "table", "update"),
    [r[1:] for r in _RULES],
    ids=[f"{table}.{rule}" for rule, _, table, _ in _RULES],
)
async def test_a_broken_rule_is_named_in_the_error(
    dsn: str, client: Client, check: str, table: str, update: str
) -> None:
    """What a psql user sees: the CHECK named for the concern, on the table written."""
    await client.enqueue("acme", "echo")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match=f'constraint "{check}"') as err:
            await conn.execute(update)  # type: ignore[arg-type]
    assert err.value.diag.constraint_name == check
    assert (err.value.diag.schema_name, err.value.diag.table_name) == ("pgjobs", table)


async def test_every_check_has_a_rule_test_and_a_description(dsn: str) -> None:
    """The list above names every CHECK of the two tables, so a new one gets its test, and
    each says in words what it requires (COMMENT ON CONSTRAINT: psql's ``\\dd``)."""
    rows = await _rows(
        dsn,
        "SELECT conname, conrelid::regclass::text AS tab,"
        " obj_description(oid, 'pg_constraint') AS what FROM pg_constraint WHERE contype = 'c'"
        " AND conrelid = ANY ('{pgjobs.job_rows,pgjobs.job_queue}'::regclass[])",
    )
    assert sorted((r["conname"], r["tab"].removeprefix("pgjobs.")) for r in rows) == sorted(
        {(check, table) for _, check, table, _ in _RULES}
    )
    assert all(r["what"] for r in rows), rows


async def test_the_checks_call_no_sql_function_per_row(dsn: str) -> None:
    """The range CHECKs read as pgjobs.time_in_range(...) calls; PostgreSQL inlines that
    plain SQL expression into them, so a write evaluates comparisons, not a function call
    per time (which would cost microseconds per row). The function-call counter sees the
    calls as soon as the function cannot be inlined (here: a SET clause)."""

    async def calls_of_time_in_range(conn: psycopg.AsyncConnection[Any]) -> int:
        await conn.execute(
            "INSERT INTO pgjobs.jobs (id, company_id, job_type)"
            " SELECT gen_random_uuid(), 'acme', 'echo' FROM generate_series(1, 10)"
        )
        await conn.execute("UPDATE pgjobs.jobs SET priority = priority + 1")
        cur = await conn.execute(
            "SELECT coalesce(pg_stat_get_xact_function_calls("
            "'pgjobs.time_in_range(timestamptz)'::regprocedure), 0)"
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("SET LOCAL track_functions = 'all'")
        assert await calls_of_time_in_range(conn) == 0
        await conn.execute("ALTER FUNCTION pgjobs.time_in_range(timestamptz) SET work_mem = '4MB'")
        assert await calls_of_time_in_range(conn) > 0  # the counter would see them
        await conn.rollback()


async def test_audit_rows_are_keyed_by_job_and_seq_with_no_index_on_id(
    dsn: str, client: Client
) -> None:
    job = await client.enqueue("acme", "echo")
    rows = await _rows(
        dsn,
        "SELECT i.indexrelid::regclass::text AS name, i.indisprimary AS pk,"
        " pg_get_indexdef(i.indexrelid) AS def FROM pg_index i"
        " WHERE i.indrelid = 'pgjobs.job_events'::regclass ORDER BY 1",
    )
    primary = [r for r in rows if r["pk"]]
    assert [(r["name"], r["def"].split(" USING ")[1]) for r in primary] == [
        ("pgjobs.job_events_pkey", "btree (job_id, seq)")
    ]
    # The cursor index still orders a transaction's rows by id; nothing leads with id.
    assert sorted(r["name"] for r in rows) == [
        "pgjobs.job_events_company_xid_idx",
        "pgjobs.job_events_created_brin_idx",
        "pgjobs.job_events_ended_idx",
        "pgjobs.job_events_pkey",
    ]
    assert not any("(id" in r["def"] for r in rows)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UniqueViolation, match="job_events_pkey"):
            await conn.execute(
                "INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt)"
                " VALUES (%s, 'acme', 1, 'content_job.queued', 'queued', 0)",
                [job.id],
            )


async def _rows(dsn: str, query: str) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(query)  # type: ignore[arg-type]
        return await cur.fetchall()
