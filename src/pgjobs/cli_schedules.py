"""``pgjobs schedules add|list|remove``: periodic jobs stored in the database.

Schedules declared in code (``@registry.periodic``) are listed too (source ``code``);
removing one deletes its row, which its workers write again when they next start.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

from pgjobs import db, scheduler
from pgjobs.schedules import Schedule


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
    json_object: Any,
    positive_int: Any,
) -> None:
    schedules = sub.add_parser(
        "schedules", help="add, list or remove periodic jobs (cron schedules)"
    ).add_subparsers(dest="schedules_command", required=True)
    a = schedules.add_parser(
        "add", parents=[common], help="enqueue a job on a cron schedule, from now on"
    )
    a.add_argument("name", help="identifies the schedule (to list or remove it)")
    a.add_argument("cron", help="cron expression, e.g. '*/5 * * * *' (6 fields: seconds first)")
    a.add_argument("--company-id", required=True)
    a.add_argument("--job-type", required=True)
    a.add_argument("--input", type=json_object, default={}, help="JSON object")
    a.add_argument("--timezone", default="UTC", help="IANA zone the cron runs in (default UTC)")
    a.add_argument(
        "--catch-up",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="how late a slot missed while no worker ran may still be enqueued once "
        "(default 0: only slots seen on time)",
    )
    a.add_argument("--priority", type=int, default=0)
    a.add_argument("--max-attempts", type=positive_int, default=3)
    ls = schedules.add_parser(
        "list", parents=[common], help="every schedule with its next run and last job"
    )
    ls.add_argument("--json", action="store_true", help="print JSON lines")
    rm = schedules.add_parser("remove", parents=[common], help="delete a schedule")
    rm.add_argument("name")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


async def run(args: argparse.Namespace) -> int:
    dsn = db.resolve_dsn(args.dsn)
    async with await db.connect(dsn) as conn:
        await db.ensure_migrated(conn)
        if args.schedules_command == "add":
            schedule = Schedule(
                name=args.name,
                cron=args.cron,
                job_type=args.job_type,
                company_id=args.company_id,
                input=args.input,
                timezone=args.timezone,
                catch_up=timedelta(seconds=args.catch_up),
                priority=args.priority,
                max_attempts=args.max_attempts,
            )
            await scheduler.add(conn, schedule)
            next_run = schedule.next_slot(datetime.now(UTC))
            print(f"added {schedule.name}: next run {_iso(next_run) or 'never'}")
            return 0
        if args.schedules_command == "remove":
            source = await scheduler.remove(conn, args.name)
            if source is None:
                print(f"pgjobs: error: no schedule named {args.name!r}", file=sys.stderr)
                return 1
            note = " (declared in code: its workers add it again when they start)"
            print(f"removed {args.name}" + (note if source == "code" else ""))
            return 0
        rows = await scheduler.list_schedules(conn)
    now = datetime.now(UTC)
    lines = []
    for row in rows:
        item = {
            "name": row.name,
            "cron": row.cron,
            "timezone": row.timezone,
            "companyId": row.company_id,
            "jobType": row.job_type,
            "source": row.source,
            "nextRun": _iso(row.next_run(now)),
            "lastJobId": None if row.last_job_id is None else str(row.last_job_id),
            "lastJobSlot": _iso(row.last_job_slot_at),
            "lastJobStatus": row.last_job_status,
            "problem": row.problem,
        }
        if args.json:
            print(json.dumps(item))
            continue
        last = "-"
        if row.last_job_id is not None:
            last = f"{row.last_job_id} {row.last_job_status or 'pruned'} ({item['lastJobSlot']})"
        lines.append(
            [
                row.name,
                row.cron,
                row.timezone,
                row.company_id,
                row.job_type,
                row.source,
                item["nextRun"] or (row.problem or "never"),
                last,
            ]
        )
    if not args.json:
        if not lines:
            print("no schedules (add one with: pgjobs schedules add NAME CRON ...)")
            return 0
        header = [
            "NAME",
            "CRON",
            "TIMEZONE",
            "COMPANY",
            "JOB TYPE",
            "SOURCE",
            "NEXT RUN",
            "LAST JOB",
        ]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *lines, strict=True)]
        for line in (header, *lines):
            print("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    return 0
