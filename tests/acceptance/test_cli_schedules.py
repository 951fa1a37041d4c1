"""`pgjobs schedules add|list|remove` as a user types them."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from test_cli import pgjobs

from helpers import fetch
from pgjobs import db, scheduler
from pgjobs.scheduler import Scheduler
from pgjobs.schedules import SLOT_INPUT_KEY, Schedule


def test_add_list_remove(dsn: str) -> None:
    out = pgjobs(
        "schedules",
        "add",
        "nightly-report",
        "30 2 * * *",
        "--company-id",
        "acme",
        "--job-type",
        "report",
        "--input",
        '{"kind": "daily"}',
        "--timezone",
        "Europe/Berlin",
        "--catch-up",
        "3600",
        dsn=dsn,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("added nightly-report: next run 20")

    taken = pgjobs("schedules", "add", "nightly-report", "* * * * *", "--company-id", "a",
                   "--job-type", "b", dsn=dsn)  # fmt: skip
    assert taken.returncode == 2
    assert "already exists" in taken.stderr

    # Nothing enqueued yet: the next run is the next 02:30 in Berlin.
    (item,) = [
        json.loads(line)
        for line in pgjobs("schedules", "list", "--json", dsn=dsn).stdout.splitlines()
    ]
    assert (item["name"], item["source"], item["lastJobId"]) == ("nightly-report", "database", None)
    next_run = datetime.fromisoformat(item["nextRun"])
    assert next_run > datetime.now(UTC)
    assert next_run.astimezone(UTC).minute == 30

    # A worker's scheduler records a slot: list shows the job it enqueued.
    async def one_pass() -> None:
        pool = await db.open_pool(dsn, min_size=1, max_size=1)
        try:
            await Scheduler(pool, {}).tick(now=next_run)
        finally:
            await pool.close()

    asyncio.run(one_pass())
    (job,) = asyncio.run(fetch(dsn, "SELECT id, input FROM pgjobs.jobs"))
    assert job["input"] == {"kind": "daily", SLOT_INPUT_KEY: next_run.astimezone(UTC).isoformat()}
    listed = pgjobs("schedules", "list", dsn=dsn)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()
    assert header.split() == ["NAME", "CRON", "TIMEZONE", "COMPANY", "JOB", "TYPE", "SOURCE",
                              "NEXT", "RUN", "LAST", "JOB"]  # fmt: skip
    assert row.startswith("nightly-report  30 2 * * *  Europe/Berlin  acme")
    assert f"{job['id']} queued ({next_run.astimezone(UTC).isoformat()})" in row

    removed = pgjobs("schedules", "remove", "nightly-report", dsn=dsn)
    assert (removed.returncode, removed.stdout.strip()) == (0, "removed nightly-report")
    assert pgjobs("schedules", "list", "--json", dsn=dsn).stdout == ""
    again = pgjobs("schedules", "remove", "nightly-report", dsn=dsn)
    assert again.returncode == 1
    assert "no schedule named 'nightly-report'" in again.stderr


def test_bad_schedules_are_one_clear_line(dsn: str) -> None:
    base = ["schedules", "add", "s", "--company-id", "acme", "--job-type", "report"]
    for extra, message in [
        (["61 * * * *"], "is not a cron expression"),
        (["0 * * * *", "--timezone", "Mars/Olympus"], "unknown time zone 'Mars/Olympus'"),
        (["0 * * * *", "--catch-up", "-5"], "expected a number of seconds >= 0"),
    ]:
        out = pgjobs(*base, *extra, dsn=dsn)
        assert out.returncode == 2, out
        assert message in out.stderr.strip().splitlines()[-1], out.stderr  # no traceback
    assert pgjobs("schedules", "list", dsn=dsn).stdout.startswith("no schedules")


def test_removing_a_declared_schedule_says_its_workers_add_it_again(dsn: str) -> None:
    async def declare() -> None:
        async with await db.connect(dsn) as conn:
            await scheduler.declare(conn, [Schedule("acme:report", "0 * * * *", "report", "acme")])

    asyncio.run(declare())
    (item,) = [
        json.loads(x) for x in pgjobs("schedules", "list", "--json", dsn=dsn).stdout.splitlines()
    ]
    assert (item["name"], item["source"]) == ("acme:report", "code")
    out = pgjobs("schedules", "remove", "acme:report", dsn=dsn)
    assert out.stdout.strip() == (
        "removed acme:report (declared in code: its workers add it again when they start)"
    )
