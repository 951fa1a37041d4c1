"""The audit views of sql/0015_audit_views.sql: their rows for known jobs, and their plans.

The views read now() (psql has no other clock), so times are placed relative to it: a
lease taken an hour ago through the claim's ``now``, a heartbeat two minutes ago through
worker_register's, audit rows of the past written directly (the log refuses updates, not
inserts; bench/growth_sql.py loads history the same way).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import psycopg
from bench.growth_sql import GENERATE
from psycopg.rows import dict_row

from helpers import claim_one, fetch, finish_params
from pgjobs.client import Client
from pgjobs.queries import QUERIES


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _register(dsn: str, worker: str, job_types: list[str], at: dt.datetime | None) -> None:
    await fetch(
        dsn,
        QUERIES["worker_register"],
        {
            "id": worker,
            "hostname": f"host-{worker}",
            "pid": 4242,
            "job_types": job_types,
            "concurrency": 2,
            "now": at,
        },
    )


async def _finish(dsn: str, claimed: dict[str, object], outcome: str) -> None:
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(claimed, outcome))


async def test_job_timeline_is_the_jobs_audit_rows_in_order(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "mail", max_attempts=2)
    other = await client.enqueue("acme", "mail", run_at=_now() + dt.timedelta(hours=1))
    await _finish(dsn, await claim_one(dsn, "w1"), "error")  # attempt 1 fails: retrying
    second = await claim_one(dsn, "w2")
    assert second["id"] == job.id  # the retry, due at once, before the later job
    await _finish(dsn, second, "done")

    rows = await fetch(
        dsn,
        "SELECT seq, event, status, attempt, worker_id, error, payload, at"
        " FROM pgjobs.job_timeline WHERE job_id = %s ORDER BY seq",
        [job.id],
    )
    assert [(r["event"], r["status"], r["attempt"]) for r in rows] == [
        ("content_job.queued", "queued", 0),
        ("content_job.running", "running", 1),
        ("content_job.retrying", "queued", 1),
        ("content_job.running", "running", 2),
        ("content_job.done", "done", 2),
    ]
    assert [r["worker_id"] for r in rows if r["event"] == "content_job.running"] == ["w1", "w2"]
    assert [r["error"] for r in rows] == [None, None, "boom", None, None]
    # One row per audit row, with its payload and time as written.
    events = await fetch(
        dsn,
        "SELECT seq, payload, created_at FROM pgjobs.job_events WHERE job_id = %s ORDER BY seq",
        [job.id],
    )
    assert [(r["seq"], r["payload"], r["at"]) for r in rows] == [
        (e["seq"], e["payload"], e["created_at"]) for e in events
    ]
    others = await fetch(dsn, "SELECT * FROM pgjobs.job_timeline WHERE job_id = %s", [other.id])
    assert [r["event"] for r in others] == ["content_job.queued"]


async def test_running_jobs_shows_the_holder_and_the_lease(dsn: str, client: Client) -> None:
    await _register(dsn, "w1", ["mail"], None)
    running = await client.enqueue("acme", "mail")
    await client.enqueue("acme", "mail", run_at=_now() + dt.timedelta(hours=1))  # queued
    claimed = await claim_one(dsn, "w1")
    assert claimed["id"] == running.id
    finished = await client.enqueue("globex", "mail")
    await _finish(dsn, await claim_one(dsn, "w9"), "done")

    rows = await fetch(
        dsn,
        "SELECT r.*, now() AS now, j.started_at AS job_started_at FROM pgjobs.running_jobs r"
        " JOIN pgjobs.jobs j ON j.id = r.job_id",
    )
    assert [(r["job_id"], r["company_id"], r["worker_id"], r["hostname"]) for r in rows] == [
        (running.id, "acme", "w1", "host-w1")
    ]
    (row,) = rows
    assert row["attempt"] == 1
    assert row["lease_expires_at"] == claimed["lease_expires_at"]
    assert row["lease_remaining"] == row["lease_expires_at"] - row["now"]
    assert row["lease_age"] == row["now"] - row["job_started_at"]
    assert row["lease_age"] >= dt.timedelta(0)
    assert finished.id not in {r["job_id"] for r in rows}


async def test_stuck_jobs_finds_expired_leases_and_types_no_live_worker_serves(
    dsn: str, client: Client
) -> None:
    hour_ago = _now() - dt.timedelta(hours=1)
    await _register(dsn, "live", ["mail"], None)
    await _register(dsn, "gone", ["render"], _now() - dt.timedelta(minutes=2))
    expired = await client.enqueue("acme", "mail", run_at=hour_ago - dt.timedelta(minutes=1))
    await claim_one(dsn, "crashed", now=hour_ago)  # its 10 s lease ran out an hour ago
    leased = await client.enqueue("acme", "mail")
    assert (await claim_one(dsn, "live"))["id"] == leased.id  # a lease running now
    served = await client.enqueue("acme", "mail")  # queued, and a live worker serves mail
    not_served = await client.enqueue("acme", "render")  # only a worker gone 2 min ago
    orphan = await client.enqueue("globex", "orphan")  # no worker at all
    await client.enqueue("globex", "orphan", run_at=_now() + dt.timedelta(hours=1))  # not due

    query = "SELECT job_id, reason, worker_id, status, since, stuck_for FROM pgjobs.stuck_jobs"
    rows = {r["job_id"]: r for r in await fetch(dsn, query)}
    assert {k: v["reason"] for k, v in rows.items()} == {
        expired.id: "lease_expired",
        not_served.id: "no_live_worker",
        orphan.id: "no_live_worker",
    }
    assert served.id not in rows
    assert leased.id not in rows
    assert rows[expired.id]["worker_id"] == "crashed"
    assert rows[expired.id]["status"] == "running"
    assert rows[expired.id]["stuck_for"] > dt.timedelta(minutes=59)
    assert rows[orphan.id]["status"] == "queued"

    # "Live" is one definition with a window: a longer one makes the worker gone 2 min ago
    # live again, and the gateway's query agrees with the view at each window.
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        await conn.execute("SET pgjobs.live_worker_seconds = 600")
        rows = {r["job_id"]: r for r in await (await conn.execute(query)).fetchall()}
    assert not_served.id not in rows
    assert orphan.id in rows
    for within, live in ((30.0, 0), (600.0, 1)):
        (row,) = await fetch(
            dsn,
            QUERIES["worker_count_live_by_type"],
            {"job_types": ["render"], "within_seconds": within, "now": None},
        )
        assert row["live_workers"] == live


async def test_throughput_counts_outcomes_per_type_in_the_recent_window(
    dsn: str, client: Client
) -> None:
    for outcome in ("done", "done", "fail"):
        await client.enqueue("acme", "mail", max_attempts=1)
        await _finish(dsn, await claim_one(dsn, "w"), outcome)
    await client.enqueue("acme", "render", max_attempts=2)
    await _finish(dsn, await claim_one(dsn, "w"), "error")  # retrying
    old = await client.enqueue("acme", "render")
    # Completions of the past, written as history: 2 hours ago (in the hourly window
    # only) and 2 days ago (in neither).
    for ago, seq in ((dt.timedelta(hours=2), 2), (dt.timedelta(days=2), 3)):
        await fetch(
            dsn,
            "INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt,"
            " created_at) VALUES (%s, 'acme', %s, 'content_job.done', 'done', 1, now() - %s)",
            [old.id, seq, ago],
        )

    rows = await fetch(
        dsn,
        "SELECT granularity, job_type, sum(completed)::int AS completed,"
        " sum(failed)::int AS failed, sum(retried)::int AS retried,"
        " count(*)::int AS buckets, min(bucket) AS first FROM pgjobs.throughput"
        " GROUP BY 1, 2 ORDER BY 1, 2",
    )
    got = {
        (r["granularity"], r["job_type"]): (r["completed"], r["failed"], r["retried"]) for r in rows
    }
    assert got == {
        ("hour", "mail"): (2, 1, 0),
        ("hour", "render"): (1, 0, 1),
        ("minute", "mail"): (2, 1, 0),
        ("minute", "render"): (0, 0, 1),
    }
    (hour_render,) = [r for r in rows if r["granularity"] == "hour" and r["job_type"] == "render"]
    assert hour_render["buckets"] == 2  # the one of 2 hours ago and the current one
    # Buckets are truncated to their granularity.
    for row in await fetch(dsn, "SELECT granularity, bucket FROM pgjobs.throughput"):
        assert row["bucket"] == row["bucket"].replace(
            second=0, microsecond=0, **({"minute": 0} if row["granularity"] == "hour" else {})
        )


async def test_views_show_a_pruned_jobs_history(dsn: str, client: Client) -> None:
    """Retention deletes finished job rows before their audit rows: the timeline still
    shows the job's events, and throughput counts them with no job type."""
    job = await client.enqueue("acme", "mail", max_attempts=1)
    await _finish(dsn, await claim_one(dsn, "w"), "done")
    await fetch(dsn, "DELETE FROM pgjobs.jobs WHERE id = %s", [job.id])

    timeline = await fetch(
        dsn, "SELECT event FROM pgjobs.job_timeline WHERE job_id = %s ORDER BY seq", [job.id]
    )
    assert [r["event"] for r in timeline] == [
        "content_job.queued",
        "content_job.running",
        "content_job.done",
    ]
    rows = await fetch(
        dsn, "SELECT granularity, job_type, completed FROM pgjobs.throughput ORDER BY 1"
    )
    assert [(r["granularity"], r["job_type"], r["completed"]) for r in rows] == [
        ("hour", None, 1),
        ("minute", None, 1),
    ]


async def test_queue_depth_per_company_and_type(dsn: str, client: Client) -> None:
    now = _now()
    await client.enqueue("acme", "mail", run_at=now - dt.timedelta(minutes=10))
    await client.enqueue("acme", "mail")
    await client.enqueue("acme", "mail", run_at=now + dt.timedelta(hours=1))
    await client.enqueue("acme", "render")
    await _finish(dsn, await claim_one(dsn, "w"), "done")  # acme's mail of 10 minutes ago
    await claim_one(dsn, "w")  # acme's next mail: running
    await client.enqueue("globex", "mail")
    await client.enqueue("globex", "mail", run_at=now - dt.timedelta(minutes=5))

    rows = await fetch(dsn, "SELECT * FROM pgjobs.queue_depth ORDER BY company_id, job_type")
    depth = {
        (r["company_id"], r["job_type"]): (r["queued"], r["running"], r["scheduled"]) for r in rows
    }
    assert depth == {
        ("acme", "mail"): (0, 1, 1),
        ("acme", "render"): (1, 0, 0),
        ("globex", "mail"): (2, 0, 0),
    }
    ages = await fetch(
        dsn,
        "SELECT d.company_id, d.job_type, d.oldest_queued_age,"
        " now() - (SELECT min(run_at) FROM pgjobs.jobs j WHERE j.company_id = d.company_id"
        "          AND j.job_type = d.job_type AND j.status = 'queued' AND j.run_at <= now())"
        "   AS expected FROM pgjobs.queue_depth d",
    )
    assert {(r["company_id"], r["job_type"]): r["oldest_queued_age"] for r in ages} == {
        (r["company_id"], r["job_type"]): r["expected"] for r in ages
    }
    by_key = {(r["company_id"], r["job_type"]): r["oldest_queued_age"] for r in ages}
    assert by_key[("globex", "mail")] >= dt.timedelta(minutes=5)  # the one due 5 min ago
    assert by_key[("acme", "mail")] is None  # nothing due: one running, one scheduled


# --- plans -------------------------------------------------------------------------------
#
# What this proves: with history (finished jobs and their audit rows, older than every
# window) far outnumbering the recent rows, and fresh statistics, the planner reads a job's
# timeline through the (job_id, seq) key, the windowed view through the BRIN index on
# created_at, and the others through pgjobs.job_queue, never reading pgjobs.jobs or
# pgjobs.job_events whole: the plan shapes whose cost does not grow with finished jobs.
# A few thousand rows are enough for the planner to cost a whole-table read above an
# index one; bench.views times the same plans at 10M jobs. What it does not prove: the
# timings, or the plan the planner picks with stale statistics.

HISTORY_JOBS = 3000


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found += _nodes(child)
    return found


def _explain(conn: psycopg.Connection[Any], query: str, params: Any = None) -> list[dict[str, Any]]:
    (row,) = conn.execute("EXPLAIN (FORMAT JSON) " + query, params).fetchall()
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
    return _nodes(plan[0]["Plan"])


def _scans(nodes: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {
        (n["Node Type"], n.get("Index Name") or n.get("Relation Name", ""))
        for n in nodes
        if "Scan" in n["Node Type"] and n["Node Type"] != "Subquery Scan"
    }


async def test_views_plans_read_no_whole_history(dsn: str, client: Client) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgjobs.job_rows DISABLE TRIGGER job_rows_inserted")
        conn.execute(GENERATE, {"start": 1, "stop": HISTORY_JOBS})  # a day old and older
        conn.execute("ALTER TABLE pgjobs.job_rows ENABLE TRIGGER job_rows_inserted")
    for outcome in ("done", "fail"):
        await client.enqueue("acme", "mail", max_attempts=1)
        await _finish(dsn, await claim_one(dsn, "w"), outcome)
    hour_ago = _now() - dt.timedelta(hours=1)
    job = await client.enqueue("acme", "mail", run_at=hour_ago - dt.timedelta(minutes=1))
    await claim_one(dsn, "w", now=hour_ago)  # running, its lease expired
    await client.enqueue("acme", "orphan")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE pgjobs.jobs, pgjobs.job_events, pgjobs.job_queue")
        timeline = _scans(
            _explain(conn, "SELECT * FROM pgjobs.job_timeline WHERE job_id = %s", [job.id])
        )
        # An index scan, or a bitmap scan of the same index: either reads the job's rows.
        assert "job_events_pkey" in {name for _, name in timeline}, timeline
        assert ("Seq Scan", "job_events") not in timeline, timeline

        throughput = _scans(_explain(conn, "SELECT * FROM pgjobs.throughput"))
        assert ("Bitmap Index Scan", "job_events_created_brin_idx") in throughput, throughput
        assert ("Seq Scan", "job_events") not in throughput, throughput
        assert ("Seq Scan", "jobs") not in throughput, throughput

        for view in ("running_jobs", "stuck_jobs", "queue_depth"):
            nodes = _explain(conn, f"SELECT * FROM pgjobs.{view}")
            # pgjobs.jobs only by key, one lookup per queue row: an index scan without a
            # condition (a merge join walking jobs_pkey in order) reads all of it.
            on_jobs = [n for n in nodes if n.get("Relation Name") == "jobs"]
            assert all(n.get("Index Cond") for n in on_jobs), (view, on_jobs)
            scans = _scans(nodes)
            tables = {name for _, name in scans}
            assert not tables & {"jobs", "job_events"}, (view, scans)
            assert tables & {
                "job_queue",
                "job_queue_lease_idx",
                "job_queue_claim_idx",
                "job_queue_fair_idx",
                "job_queue_pkey",
            }, (view, scans)
