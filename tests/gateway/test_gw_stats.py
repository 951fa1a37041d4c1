"""GET /api/companies/{c}/stats and the query behind it (job_stats_by_company): counts per
job type, only the company's, with the last-hour window taken from ``now``."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import httpx
import psycopg
from gateway_helpers import RunningGateway

from helpers import claim_one, fast_settings, fetch, running_worker, wait_until
from pgjobs import demo
from pgjobs.gateway.auth import GATEWAY_QUERIES


async def _drain(dsn: str, storage_dir: Path) -> None:
    async def idle() -> bool:
        rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_queue")
        return rows[0]["n"] == 0

    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        await wait_until(idle, within=30, message="every job finished")


async def _db_now(dsn: str) -> dt.datetime:
    rows = await fetch(dsn, "SELECT now() AS now")
    now: dt.datetime = rows[0]["now"]
    return now


async def _stats(
    dsn: str, company: str, now: dt.datetime, window: float
) -> dict[str, dict[str, Any]]:
    params = {"company_id": company, "now": now, "window_seconds": window}
    (start,) = await fetch(dsn, GATEWAY_QUERIES["job_events_window_start_xid"], params)
    rows = await fetch(
        dsn, GATEWAY_QUERIES["job_stats_by_company"], {**params, "since_xid": start["xid"]}
    )
    return {row.pop("job_type"): row for row in rows}


def _counts(row: dict[str, Any]) -> tuple[int, ...]:
    return tuple(row[k] for k in ("queued", "scheduled", "running", "done", "failed"))


async def test_stats_count_each_state_per_job_type_for_the_company_only(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    client = gateway.state.client
    # Finished before the window the query is asked about below ...
    await client.enqueue("acme", "echo", {})
    await client.enqueue("acme", "echo", {})
    await client.enqueue("acme", "fail", {}, max_attempts=1)
    await client.enqueue("globex", "echo", {})
    await _drain(dsn, storage_dir)
    between = await _db_now(dsn)
    await wait_until(lambda: _later_than(dsn, between), message="the clock moved on")
    # ... and inside it.
    await client.enqueue("acme", "echo", {})
    await client.enqueue("acme", "fail", {}, max_attempts=1)
    await _drain(dsn, storage_dir)
    # Now queued (due), scheduled, running.
    await client.enqueue("acme", "render", {}, priority=10)
    await claim_one(dsn, "w-1")  # the render job: the highest priority
    await client.enqueue("acme", "echo", {})
    await client.enqueue("acme", "echo", {})
    now = await _db_now(dsn)
    await client.enqueue("acme", "sleep", {}, run_at=now + dt.timedelta(hours=1))

    window = (now - between).total_seconds()
    stats = await _stats(dsn, "acme", now, window)
    #                              queued scheduled running done failed
    assert _counts(stats["echo"]) == (2, 0, 0, 1, 0)
    assert _counts(stats["fail"]) == (0, 0, 0, 0, 1)
    assert _counts(stats["render"]) == (0, 0, 1, 0, 0)
    assert _counts(stats["sleep"]) == (0, 1, 0, 0, 0)
    assert stats["echo"]["oldest_queued_at"] is not None
    assert stats["sleep"]["oldest_queued_at"] is None

    # Two hours on, nothing finished within the last hour; the scheduled job is due.
    later = await _stats(dsn, "acme", now + dt.timedelta(hours=2), 3600)
    assert _counts(later["sleep"]) == (1, 0, 0, 0, 0)
    assert sum(row["done"] + row["failed"] for row in later.values()) == 0

    # Over HTTP: the last hour, so both batches; globex sees only its own job.
    async with gateway.http() as http:
        r = await http.get("/api/companies/acme/stats")
    assert r.status_code == 200
    body = r.json()
    assert body["windowSeconds"] == 3600
    by_type = {t["jobType"]: t for t in body["jobTypes"]}
    assert (by_type["echo"]["done"], by_type["fail"]["failed"]) == (3, 2)
    assert body["totals"] == {"queued": 2, "scheduled": 1, "running": 1, "done": 3, "failed": 2}
    async with gateway.http("globex") as http:
        theirs = (await http.get("/api/companies/globex/stats")).json()
        assert (await http.get("/api/companies/acme/stats")).status_code == 403
    assert theirs["jobTypes"] == [
        {
            "jobType": "echo",
            "queued": 0,
            "scheduled": 0,
            "running": 0,
            "done": 1,
            "failed": 0,
            "oldestQueuedAt": None,
        }
    ]


async def _later_than(dsn: str, moment: dt.datetime) -> bool:
    return await _db_now(dsn) > moment


async def test_completions_per_minute_over_the_last_hour(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """Done events counted into the minute they happened in, oldest minute first, the
    company's only; backdated events show where `now` puts them."""
    client = gateway.state.client
    for _ in range(3):
        await client.enqueue("acme", "echo", {})
    await client.enqueue("acme", "fail", {}, max_attempts=1)  # failed: not a completion
    await client.enqueue("globex", "echo", {})
    await _drain(dsn, storage_dir)
    # One of acme's completions happened 10.5 minutes ago, one 2 hours ago (outside).
    done = await fetch(
        dsn,
        "SELECT id FROM pgjobs.job_events WHERE company_id = 'acme'"
        " AND type = 'content_job.done' ORDER BY id",
    )
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # The audit log refuses updates by design: backdate as its owner, triggers off.
        await conn.execute("SET session_replication_role = replica")
        for event, ago in ((done[0], "10 minutes 30 seconds"), (done[1], "2 hours")):
            await conn.execute(
                "UPDATE pgjobs.job_events SET created_at = now() - %s::interval WHERE id = %s",
                [ago, event["id"]],
            )
    async with gateway.http() as http:
        per_minute = (await http.get("/api/companies/acme/stats")).json()["completionsPerMinute"]
    assert len(per_minute) == 60
    assert sum(per_minute) == 2  # the third is two hours old
    assert per_minute[-11] == 1  # 10 minutes ago counts into minute 10 before now
    async with gateway.http("globex") as http:
        theirs = (await http.get("/api/companies/globex/stats")).json()["completionsPerMinute"]
    assert sum(theirs) == 1


async def test_all_companies_stats_are_each_companys_stats_for_operators_only(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """GET /api/stats: every company that has a job, each with the figures its own
    /api/companies/{c}/stats gives, and the same figures summed per job type; 401 without
    a valid token, 403 for a company's token, 401 once the operator token is revoked."""
    from pgjobs import db
    from pgjobs.gateway import auth

    client = gateway.state.client
    await client.enqueue("acme", "echo", {})
    await client.enqueue("acme", "fail", {}, max_attempts=1)
    await client.enqueue("globex", "echo", {})
    await client.enqueue("globex", "echo", {})
    await _drain(dsn, storage_dir)
    await client.enqueue("acme", "render", {}, priority=10)
    await claim_one(dsn, "w-1")  # acme's render job: running
    await client.enqueue("globex", "render", {})
    now = await _db_now(dsn)
    await client.enqueue("initech", "sleep", {}, run_at=now + dt.timedelta(hours=1))

    async with await db.connect(gateway.state.dsn) as conn:
        operator = await auth.create_token(conn, None, "ops", operator=True)
    ops = {"Authorization": f"Bearer {operator}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=ops, timeout=20.0) as http:
        r = await http.get("/api/stats")
        assert r.status_code == 200, r.text
        body = r.json()
        own = {
            c: (await http.get(f"/api/companies/{c}/stats")).json()
            for c in ("acme", "globex", "initech")
        }
    assert [c["companyId"] for c in body["companies"]] == ["acme", "globex", "initech"]
    for company in body["companies"]:
        theirs = own[company["companyId"]]
        assert company["jobTypes"] == theirs["jobTypes"]
        assert company["totals"] == theirs["totals"]
    assert body["totals"] == {"queued": 1, "scheduled": 1, "running": 1, "done": 3, "failed": 1}
    by_type = {t["jobType"]: t for t in body["jobTypes"]}
    assert _counts(by_type["echo"]) == (0, 0, 0, 3, 0)
    assert _counts(by_type["render"]) == (1, 0, 1, 0, 0)
    assert by_type["render"]["oldestQueuedAt"] == own["globex"]["jobTypes"][1]["oldestQueuedAt"]
    assert _counts(by_type["sleep"]) == (0, 1, 0, 0, 0)
    assert sum(body["completionsPerMinute"]) == 3
    assert body["completionsPerMinute"] == [
        a + g
        for a, g in zip(
            own["acme"]["completionsPerMinute"], own["globex"]["completionsPerMinute"], strict=True
        )
    ]

    # Two hours on, nothing is done or failed within the window; the companies remain.
    params = {"now": now + dt.timedelta(hours=2), "window_seconds": 3600}
    later = await fetch(dsn, GATEWAY_QUERIES["job_stats_all_companies"], params)
    assert sum(row["done"] + row["failed"] for row in later) == 0
    assert {(row["company_id"], row["job_type"]) for row in later} == {
        ("acme", "render"),
        ("globex", "render"),
        ("initech", "sleep"),
    }
    listed = await fetch(dsn, GATEWAY_QUERIES["job_list_companies"])
    assert [row["company_id"] for row in listed] == ["acme", "globex", "initech"]

    # Who may ask.
    async with gateway.http(None) as anonymous:
        assert (await anonymous.get("/api/stats")).status_code == 401
    for company in ("acme", "globex"):
        async with gateway.http(company) as http:
            refused = await http.get("/api/stats")
            assert refused.status_code == 403
            assert "companies" not in refused.json()
    async with await db.connect(gateway.state.dsn) as conn:
        assert await auth.revoke_token(conn, operator) is not None
    async with httpx.AsyncClient(base_url=gateway.url, headers=ops, timeout=20.0) as http:
        assert (await http.get("/api/stats")).status_code == 401


def _scans(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """Every (node type, relation) of a JSON plan that reads a relation."""
    found = []
    if "Relation Name" in plan:
        found.append((plan["Node Type"], plan["Relation Name"]))
    for child in plan.get("Plans", []):
        found += _scans(child)
    return found


async def test_all_companies_stats_read_each_companys_window_not_the_history(dsn: str) -> None:
    """job_stats_all_companies and job_completions_per_minute_all_companies with 60,000
    finished jobs a day old (one event each here) and a few in the last hour: the
    companies come from a skip scan of the jobs' company index and each company's events
    from its window's start in job_events_company_xid_idx; neither jobs nor job_events is
    read whole. (Written as a plain join, the planner read every ended event and checked
    each against its company's window start.)"""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("ALTER TABLE pgjobs.job_rows DISABLE TRIGGER job_rows_inserted")
        for ago, n in (("1 day", 60_000), ("65 minutes", 30), ("10 minutes", 300)):
            await conn.execute(
                """
                WITH ins AS (
                    INSERT INTO pgjobs.job_rows (id, company_id, job_type, status, attempts,
                                             worker_id, lease_token, event_seq, last_event,
                                             started_at, finished_at, created_at)
                    SELECT gen_random_uuid(), 'company-' || (g %% 3), 'echo', 'done', 1, 'w',
                           1, 1, 'content_job.done', now() - %(ago)s::interval,
                           now() - %(ago)s::interval, now() - %(ago)s::interval
                    FROM generate_series(1, %(n)s::int) AS g
                    RETURNING id, company_id, created_at
                )
                INSERT INTO pgjobs.job_events (job_id, company_id, seq, type, status, attempt,
                                               created_at)
                SELECT id, company_id, 1, 'content_job.done', 'done', 1, created_at FROM ins
                """,
                {"ago": ago, "n": n},
            )
        await conn.execute("ANALYZE pgjobs.job_rows, pgjobs.job_events")
        params = {"now": None, "window_seconds": 3600}
        for name in ("job_stats_all_companies", "job_completions_per_minute_all_companies"):
            cur = await conn.execute(
                "EXPLAIN (FORMAT JSON) " + GATEWAY_QUERIES[name],  # type: ignore[operator]
                params,
            )
            row = await cur.fetchone()
            assert row is not None
            scans = _scans(row[0][0]["Plan"])
            assert ("Seq Scan", "job_events") not in scans, (name, scans)
            assert ("Seq Scan", "job_rows") not in scans, (name, scans)
        stats = await fetch(dsn, GATEWAY_QUERIES["job_stats_all_companies"], params)
    assert {r["company_id"]: r["done"] for r in stats} == {f"company-{c}": 100 for c in range(3)}
