"""sql/0023_ringing_triggers.sql and the claim's TID scan: less for PostgreSQL to do per
drained job, the same rows and events.

* With the doorbell on, the transition triggers write the audit rows and build no NOTIFY
  items (no RETURNING, sort or window aggregate); without it they send the items as before
  (tests/integration/test_notify_channels.py and the gateway's tests read them).
* An UPDATE of no rows (a finish's UPDATE of the queue rows when no attempt is retried)
  runs none of the trigger's statements.
* A batch of ends rewrites each job row in its own page (HOT): job_rows' fillfactor.
* The claim updates the queue rows it locked by their ctid (a TID scan).

The trigger plans are read with auto_explain, which the embedded pgserver lacks: as
tests/integration/test_trigger_plans.py, on Debian's PostgreSQL, skipped where none is
installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import fetch, finish_params
from pgjobs import doorbell
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES

BUILDS = sorted(Path("/usr/lib/postgresql").glob("*/lib/auto_explain.so"))
# As long as a worker's id (pgjobs.worker: host, pid and a uuid), so that an ended job
# row is as much larger than a queued one as in a drain.
WORKER = f"bench-host:12345:{uuid.uuid4()}"


def _claim_params(limit: int) -> dict[str, Any]:
    return {
        "now": None,
        "limit": limit,
        "worker_id": WORKER,
        "lease_seconds": 30.0,
        "job_types": None,
        "after_company": None,
    }


def _done_params(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every claimed job done, with no result (a no-op handler's)."""
    return {**finish_params(rows), "results": [None] * len(rows)}


@pytest.fixture(scope="module")
def debian_dsn() -> Iterator[str]:
    from bench.pgss import private_server

    from bench import pg

    with private_server(BUILDS[-1].parents[1] / "bin") as server, pg.database(server) as dsn:
        yield dsn


def _enqueue(conn: psycopg.Connection[Any], n: int) -> None:
    conn.execute(
        """INSERT INTO pgjobs.job_rows (id, company_id, job_type, input, priority, run_at,
                                        max_attempts, created_at, updated_at)
           SELECT gen_random_uuid(), 'acme', 'echo', '{}', 0, now(), 3, now(), now()
           FROM generate_series(1, %s)""",
        (n,),
    )


def _plans(conn: psycopg.Connection[Any], query: Any, params: Any) -> tuple[list[str], list[Any]]:
    """The plans auto_explain logs for one statement and the triggers' statements it fires
    (the session has auto_explain on), and the statement's rows."""
    plans: list[str] = []

    def log(diag: psycopg.errors.Diagnostic) -> None:
        plans.append(diag.message_primary or "")

    conn.add_notice_handler(log)
    try:
        rows = conn.execute(query, params).fetchall()
    finally:
        conn.remove_notice_handler(log)
    return plans, rows


def _explaining(conn: psycopg.Connection[Any]) -> None:
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_level = notice")


@pytest.mark.skipif(not BUILDS, reason="no PostgreSQL build with auto_explain here")
@pytest.mark.timeout(120)
def test_with_the_doorbell_on_the_triggers_write_audit_rows_and_build_no_items(
    debian_dsn: str,
) -> None:
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        _enqueue(conn, 20)
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        conn.row_factory = psycopg.rows.dict_row  # type: ignore[assignment]
        _explaining(conn)
        claim = doorbell.ringing(QUERIES["job_claim_batch"])
        claim_plans, claimed = _plans(conn, claim, _claim_params(10))
        finish = doorbell.ringing(QUERIES["job_finish_many_if_leased"])
        finish_plans, finished = _plans(conn, finish, _done_params(claimed))
        # The same transitions without the doorbell (psql, the gateway): the items.
        _, quiet = _plans(conn, QUERIES["job_claim_batch"], _claim_params(10))
        quiet_plans, _ = _plans(conn, QUERIES["job_finish_many_if_leased"], _done_params(quiet))
    assert len(claimed) == len(finished) == len(quiet) == 10
    for plans in (claim_plans, finish_plans):
        inserts = [p for p in plans if "Insert on job_events" in p]
        assert len(inserts) == 1, plans  # one audit-row statement: the transition's trigger
        assert not any("WindowAgg" in p or "Sort" in p for p in inserts), inserts
    # The finish's UPDATE of the queue rows changed none (no retries): its trigger stopped
    # at its first statement, so the one audit-row statement above is job_rows_updated's.
    assert any("WindowAgg" in p for p in quiet_plans), quiet_plans
    with psycopg.connect(debian_dsn) as conn:
        counts = conn.execute(
            "SELECT type, count(*) FROM pgjobs.job_events GROUP BY type ORDER BY type"
        ).fetchall()
    assert counts == [
        ("content_job.done", 20),
        ("content_job.queued", 20),
        ("content_job.running", 20),
    ]


async def test_a_batch_of_ends_rewrites_each_job_row_in_its_page(dsn: str, client: Client) -> None:
    """Enqueued together, the job rows share pages; one finish ends them all in one
    statement (a transaction that can prune none of their old versions), and every ended
    version fits in its page beside the queued one: no job row moves, so no index entry is
    written for an end (a HOT update)."""
    await client.enqueue_many(JobSpec("acme", "noop") for _ in range(120))
    query = "SELECT id, (ctid::text::point)[0] AS page FROM pgjobs.job_rows ORDER BY id"
    before = await fetch(dsn, query)
    assert len({r["page"] for r in before}) >= 3  # several full pages
    claimed = await fetch(dsn, QUERIES["job_claim_batch"], _claim_params(120))
    finished = await fetch(dsn, QUERIES["job_finish_many_if_leased"], _done_params(claimed))
    assert len(finished) == 120
    after = await fetch(dsn, query)
    moved = [a["id"] for a, b in zip(after, before, strict=True) if a["page"] != b["page"]]
    assert moved == []


async def test_the_claim_updates_the_rows_it_locked_by_ctid(dsn: str, client: Client) -> None:
    await client.enqueue_many(JobSpec("acme", "noop") for _ in range(5000))
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("ANALYZE pgjobs.job_queue")  # a queue's statistics, as in use
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cur = await conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + QUERIES["job_claim_batch"], _claim_params(5)
        )
        plan = "\n".join(str(r[0]) for r in await cur.fetchall())
        await conn.rollback()
    assert "Tid Scan on job_queue" in plan, plan
