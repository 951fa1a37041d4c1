"""``pgjobs limits set|list|clear``: the command line of ``pgjobs.limits``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from pgjobs import db, limits
from pgjobs.errors import InvalidJobError

Table = Callable[[Sequence[str], Sequence[Sequence[str]]], list[str]]


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """The ``limits`` command and its subcommands, under ``sub``."""
    commands = sub.add_parser(
        "limits", help="concurrency and rate limits per company and job type"
    ).add_subparsers(dest="limits_command", required=True)
    key = argparse.ArgumentParser(add_help=False)
    key.add_argument("--company", help="the company the limit is for (default: all together)")
    key.add_argument("--job-type", help="the job type the limit is for (default: all together)")
    s = commands.add_parser(
        "set",
        parents=[common, key],
        help="create or change a limit (bounds not given keep their value)",
    )
    s.add_argument(
        "--max-running", type=_non_negative_int, help="at most this many running at once"
    )
    s.add_argument("--rate", help="at most COUNT/PERIOD starts, e.g. 60/min, 20/s, 5/30s")
    commands.add_parser("list", parents=[common], help="every limit, with what it counts now")
    commands.add_parser("clear", parents=[common, key], help="remove a limit")


def _bounds(limit: limits.Limit) -> tuple[str, str]:
    running = "-" if limit.max_running is None else str(limit.max_running)
    rate = "-" if limit.max_starts is None else f"{limit.max_starts}/{limit.period_seconds:g}s"
    return running, rate


async def command(args: argparse.Namespace, table: Table) -> int:
    async with await db.connect(db.resolve_dsn(args.dsn)) as conn:
        await db.ensure_migrated(conn)
        if args.limits_command == "set":
            starts, period = limits.parse_rate(args.rate) if args.rate else (None, None)
            limit = await limits.set_limit(
                conn,
                company_id=args.company,
                job_type=args.job_type,
                max_running=args.max_running,
                max_starts=starts,
                period_seconds=period,
            )
            running, rate = _bounds(limit)
            print(
                f"limit {limit.company_id or 'all companies'} / {limit.job_type or 'all types'}:"
                f" max running {running}, rate {rate}"
            )
            return 0
        if args.limits_command == "clear":
            if not await limits.clear_limit(conn, company_id=args.company, job_type=args.job_type):
                raise InvalidJobError("no limit has exactly that company and job type")
            print("cleared")
            return 0
        rows = [
            [
                limit.company_id or "(all)",
                limit.job_type or "(all)",
                *_bounds(limit),
                str(limit.running),
                "-" if limit.max_starts is None else str(limit.started_this_window),
            ]
            for limit in await limits.list_limits(conn)
        ]
        header = ["COMPANY", "JOB TYPE", "MAX RUNNING", "RATE", "RUNNING", "STARTED THIS WINDOW"]
        print("\n".join(table(header, rows)) if rows else "no limits")
        return 0
