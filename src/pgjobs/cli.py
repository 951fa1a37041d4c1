"""The ``pgjobs`` command line.

Every command takes ``--dsn`` (else PGJOBS_DSN, else the embedded server under
./.pgjobs). Failures print one line saying what went wrong and what to do, and exit
non-zero: 1 for a runtime error, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from typing import Any

from pgjobs import cli_schedules, db, limits_cli, logs, registry
from pgjobs.client import Client, parse_job_id
from pgjobs.config import DEFAULT_LEASE_SECONDS, WorkerSettings, env_float
from pgjobs.errors import ConfigurationError, InvalidJobError, JobNotFoundError, PgjobsError
from pgjobs.jobspec import parse_time
from pgjobs.queries import QUERIES
from pgjobs.types import Job, JobStatus, iso

EXIT_ERROR = 1
EXIT_USAGE = 2


def _json_object(text: str) -> dict[str, Any]:
    def reject_constant(name: str) -> None:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=reject_constant)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--input is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('--input must be a JSON object, e.g. \'{"title": "hi"}\'')
    return value


def _timestamp(text: str) -> datetime:
    """--run-at: parsed, range-checked and converted to UTC by pgjobs.jobspec."""
    try:
        return parse_time(text, "--run-at")
    except InvalidJobError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pgjobs",
        description="pgjobs, a durable job queue on PostgreSQL.",
        epilog="Every command takes --dsn; else $PGJOBS_DSN; else the embedded server under "
        "./.pgjobs, started if needed.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    log_help = "log lines as text or as JSON objects (default: $PGJOBS_LOG_FORMAT, else text)"
    parser.add_argument("--log-format", choices=logs.FORMATS, help=log_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dsn", help="PostgreSQL DSN (default: $PGJOBS_DSN, else embedded)")
    # SUPPRESS: given before the command, the top-level value stands.
    common.add_argument(
        "--log-format", choices=logs.FORMATS, default=argparse.SUPPRESS, help=log_help
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("migrate", parents=[common], help="create or upgrade the pgjobs schema")
    sub.add_parser("dsn", parents=[common], help="print the DSN in use")
    ps = sub.add_parser(
        "psql", parents=[common], help="open psql on the pgjobs database (audit with SQL)"
    )
    ps.epilog = "Other arguments go to psql, e.g. pgjobs psql -c 'select count(*) from pgjobs.jobs'"

    w = sub.add_parser("worker", parents=[common], help="run a worker until SIGTERM/SIGINT")
    w.add_argument(
        "--handlers",
        required=True,
        metavar="MODULE:REGISTRY",
        help="the handler registry, e.g. pgjobs.demo:registry",
    )
    w.add_argument("--concurrency", type=_positive_int, help="jobs run at once (default 10)")
    w.add_argument(
        "--job-types",
        help="claim only these of the registry's types, comma-separated "
        "(default: every type the registry has a handler for)",
    )
    w.add_argument("--lease-seconds", type=_positive_float, help="job lease length (default 15)")
    w.add_argument(
        "--heartbeat-seconds", type=_positive_float, help="lease renewal interval (default 5)"
    )
    w.add_argument(
        "--shutdown-grace",
        type=float,
        dest="grace",
        help="seconds running jobs get to finish on shutdown (default 10)",
    )
    w.add_argument("--worker-id", help="identity shown in pgjobs.workers (default host:pid:random)")
    w.add_argument(
        "--metrics-port",
        type=_port,
        help="serve /metrics, /healthz and /readyz on this port "
        "(default $PGJOBS_METRICS_PORT; none: not served; 0: any free port)",
    )
    w.add_argument(
        "--metrics-host",
        help="address the metrics port binds (default $PGJOBS_METRICS_HOST, else 127.0.0.1)",
    )

    e = sub.add_parser("enqueue", parents=[common], help="enqueue one job and print its id")
    e.add_argument("company_id")
    e.add_argument("job_type")
    e.add_argument("--input", type=_json_object, default={}, help="JSON object")
    e.add_argument("--source-task-id")
    e.add_argument("--priority", type=int, default=0, help="higher runs first (default 0)")
    e.add_argument("--run-at", type=_timestamp, help="not before this ISO 8601 time")
    e.add_argument("--max-attempts", type=_positive_int, default=3)
    e.add_argument(
        "--unique-key",
        help="enqueue nothing while a job of this company with this key is queued or running "
        "(prints the id of the job holding it)",
    )
    e.add_argument(
        "--unique-for",
        type=_positive_int,
        metavar="SECONDS",
        help="the key's window (default: none)",
    )
    e.add_argument(
        "--unique-while",
        type=lambda text: tuple(text.split(",")),
        default=("queued", "running"),
        metavar="STATES",
        help="comma-separated statuses the key is held in (default queued,running)",
    )

    jobs = sub.add_parser("jobs", help="list or show jobs").add_subparsers(
        dest="jobs_command", required=True
    )
    jl = jobs.add_parser("list", parents=[common], help="a company's jobs, newest first")
    jl.add_argument("company_id")
    jl.add_argument("--status", choices=["queued", "running", "done", "failed", "cancelled"])
    jl.add_argument("--limit", type=_positive_int, default=20)
    jl.add_argument("--cursor", help="next_cursor from the previous page")
    jl.add_argument("--json", action="store_true", help="print JSON lines")
    js = jobs.add_parser("show", parents=[common], help="one job and its event timeline")
    js.add_argument("job_id")
    js.add_argument("--json", action="store_true")

    for name, text in (
        ("cancel", "cancel a queued or running job"),
        ("retry", "queue a failed or cancelled job again"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job_id")

    d = sub.add_parser(
        "demo", parents=[common], help="what make run runs: workers, jobs, live progress"
    )
    d.add_argument("--workers", type=_positive_int, default=2)
    d.add_argument(
        "--port", type=int, default=8000, help="gateway port (default 8000; 0: any free)"
    )
    d.add_argument(
        "--exit-when-done",
        action="store_true",
        help="stop workers and gateway once the demo jobs finish",
    )

    g = sub.add_parser("gateway", parents=[common], help="serve the HTTP + SSE gateway (uvicorn)")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    g.add_argument("--port", type=_positive_int, default=8000, help="port (default 8000)")

    st = sub.add_parser(
        "stats", parents=[common], help="queue depth, failures and workers at a glance"
    )
    st.add_argument(
        "--watch",
        nargs="?",
        type=_positive_float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )

    pr = sub.add_parser(
        "prune", parents=[common], help="delete finished jobs, old audit rows and assets"
    )
    pr.add_argument(
        "--jobs-older-than",
        required=True,
        metavar="AGE",
        help="finished jobs (done, failed, cancelled) finished longer ago than AGE: 30d, 12h, 90m",
    )
    pr.add_argument(
        "--events-older-than", metavar="AGE", help="audit rows older than AGE (default: keep)"
    )
    pr.add_argument("--assets", action="store_true", help="also the pruned jobs' assets and files")
    pr.add_argument("--dry-run", action="store_true", help="print what would go; remove nothing")

    tokens = sub.add_parser("token", help="create or revoke gateway API tokens").add_subparsers(
        dest="token_command", required=True
    )
    tc = tokens.add_parser(
        "create", parents=[common], help="print a new API token for a company (shown once)"
    )
    tc.add_argument("company_id", nargs="?", help="the company the token acts for")
    tc.add_argument(
        "--operator",
        action="store_true",
        help="a token for operators, acting for every company (give no COMPANY)",
    )
    tc.add_argument("--label", help="a note to recognise the token by")
    tr = tokens.add_parser("revoke", parents=[common], help="revoke a token (by token or id)")
    tr.add_argument("token_or_id")
    cli_schedules.add_parser(sub, common, _json_object, _positive_int)
    limits_cli.add_parser(sub, common)
    return parser


def job_json(job: Job, served_by: dict[str, int] | None = None) -> dict[str, Any]:
    """The API's representation plus what an operator also wants to see. ``served_by``
    (live workers per job type) adds ``servedBy`` to a queued job."""
    out = {
        **job.to_json(),
        "priority": job.priority,
        "runAt": iso(job.run_at),
        "workerId": job.worker_id,
    }
    if served_by is not None and job.status is JobStatus.QUEUED:
        out["servedBy"] = served_by.get(job.job_type, 0)
    return out


async def _served_by(client: Client, jobs: Sequence[Job]) -> dict[str, int]:
    """Live workers per type of the queued jobs among ``jobs``. Live: a heartbeat within
    one lease length, the time after which a silent worker's jobs are rescued."""
    lease = env_float("PGJOBS_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, minimum=0.5)
    queued = [j.job_type for j in jobs if j.status is JobStatus.QUEUED]
    return await client.live_workers(queued, within_seconds=lease)


def _unserved(job: Job, served_by: dict[str, int]) -> str | None:
    if job.status is JobStatus.QUEUED and not served_by.get(job.job_type, 0):
        return f"no live worker serves {job.job_type}"
    return None


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in (header, *rows)
    ]


def _cell(value: object) -> str:
    """A value as one table or field cell: ``-`` when missing, JSON for structures."""
    if value is None or value == "":
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


async def _with_client(dsn: str | None, fn: Callable[[Client], Coroutine[Any, Any, int]]) -> int:
    client = await Client.connect(dsn, max_size=2)
    try:
        return await fn(client)
    finally:
        await client.close()


async def _company_of(client: Client, job_id: str) -> str:
    jid = parse_job_id(job_id)
    async with client.pool.connection() as conn:
        row = await (await conn.execute(QUERIES["job_get_any_company"], {"id": jid})).fetchone()
    if row is None:
        raise JobNotFoundError(jid)
    return str(row["company_id"])


async def cmd_enqueue(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        job = await client.enqueue(
            args.company_id,
            args.job_type,
            args.input,
            source_task_id=args.source_task_id,
            priority=args.priority,
            run_at=args.run_at,
            max_attempts=args.max_attempts,
            unique_key=args.unique_key,
            unique_for=None if args.unique_for is None else timedelta(seconds=args.unique_for),
            unique_while=args.unique_while,
        )
        if not job.created:
            print(
                f"pgjobs: job {job.id} ({job.status.value}) holds unique key "
                f"{args.unique_key!r}; nothing enqueued",
                file=sys.stderr,
            )
        print(job.id)
        return 0

    return await _with_client(args.dsn, go)


async def cmd_jobs_list(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        page = await client.list(
            args.company_id, status=args.status, limit=args.limit, cursor=args.cursor
        )
        served_by = await _served_by(client, page.jobs)
        for job in page.jobs:
            if args.json:
                print(json.dumps(job_json(job, served_by)))
            else:
                progress = (
                    f"{job.progress.fraction:.0%}"
                    if job.progress and job.progress.fraction is not None
                    else ""
                )
                note = _unserved(job, served_by)
                print(
                    f"{job.id}  {job.status.value:<9} {job.job_type:<12} attempts {job.attempts}/"
                    f"{job.max_attempts}  {progress:>4}  {job.created_at:%Y-%m-%d %H:%M:%S}"
                    + (f"  ({note})" if note else "")
                )
        if page.next_cursor:
            print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
        return 0

    return await _with_client(args.dsn, go)


async def cmd_jobs_show(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        company = await _company_of(client, args.job_id)
        job = await client.get(company, args.job_id)
        events = await client.events(company, args.job_id)
        served_by = await _served_by(client, [job])
        if args.json:
            out = job_json(job, served_by)
            out["events"] = [
                {
                    "id": e.id,
                    "seq": e.seq,
                    "type": e.type.value,
                    "status": e.status.value,
                    "attempt": e.attempt,
                    "workerId": e.worker_id,
                    "payload": e.payload,
                    "createdAt": e.created_at.isoformat(),
                }
                for e in events
            ]
            print(json.dumps(out, indent=2))
            return 0
        for key, value in job_json(job, served_by).items():
            print(f"{key:>14}: {_cell(value)}")
        if note := _unserved(job, served_by):
            print(f"{'note':>14}: {note}; it stays queued until a worker with its handler runs")
        rows = [
            [
                str(e.seq),
                f"{e.created_at:%Y-%m-%d %H:%M:%S.%f}"[:23],
                e.type.value,
                e.status.value,
                str(e.attempt),
                _cell(e.worker_id),
                # The traceback is printed in full below, not squeezed into a cell.
                _cell({k: v for k, v in e.payload.items() if k != "traceback"} or None),
            ]
            for e in events
        ]
        header = ["seq", "time", "event", "status", "attempt", "worker", "details"]
        print()
        for line in _table(header, rows):
            print(f"  {line}")
        last = next((e for e in reversed(events) if e.payload.get("traceback")), None)
        if last is not None:
            print(f"\nlast traceback (seq {last.seq}, attempt {last.attempt}):")
            print(str(last.payload["traceback"]).rstrip("\n"))
        return 0

    return await _with_client(args.dsn, go)


async def cmd_transition(args: argparse.Namespace) -> int:
    async def go(client: Client) -> int:
        company = await _company_of(client, args.job_id)
        action = client.cancel if args.command == "cancel" else client.retry
        job = await action(company, args.job_id)
        print(f"{job.id} {job.status.value}")
        return 0

    return await _with_client(args.dsn, go)


async def cmd_worker(args: argparse.Namespace) -> int:
    # Imported here: with its health server and metrics, ~0.1 s of every other command's start.
    from pgjobs.worker import Worker, claimable_types

    handlers = registry.load(args.handlers)
    settings = WorkerSettings.from_env(
        concurrency=args.concurrency,
        lease_seconds=args.lease_seconds,
        heartbeat_seconds=args.heartbeat_seconds,
        shutdown_grace_seconds=args.grace,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        job_types=tuple(t.strip() for t in args.job_types.split(",") if t.strip())
        if args.job_types
        else None,
    )
    claimable_types(handlers, settings.job_types)  # refuse a type it has no handler for
    # The process is the worker's own: collector settings for it (pgjobs.gcpolicy).
    worker = Worker(
        db.resolve_dsn(args.dsn), handlers, settings, worker_id=args.worker_id, tune_gc=True
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()
    return 0


async def cmd_stats(args: argparse.Namespace) -> int:
    from pgjobs import stats

    lease = env_float("PGJOBS_LEASE_SECONDS", DEFAULT_LEASE_SECONDS, minimum=0.5)

    async def go(client: Client) -> int:
        while True:
            async with client.pool.connection() as conn:
                snapshot = await stats.collect(conn, live_within_seconds=lease)
            lines = stats.render(snapshot, _table)
            if args.watch is None:
                print("\n".join(lines))
                return 0
            # Home and clear, then the new snapshot: one write, so the screen never
            # shows half of it.
            sys.stdout.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            sys.stdout.flush()
            await asyncio.sleep(args.watch)

    return await _with_client(args.dsn, go)


async def cmd_demo(args: argparse.Namespace) -> int:
    from pgjobs import demo_run

    return await demo_run.run(
        db.resolve_dsn(args.dsn),
        workers=args.workers,
        port=args.port,
        exit_when_done=args.exit_when_done,
    )


async def cmd_prune(args: argparse.Namespace) -> int:
    from pgjobs import retention, storage

    jobs_age = retention.parse_duration(args.jobs_older_than, "--jobs-older-than")
    events_age = (
        None
        if args.events_older_than is None
        else retention.parse_duration(args.events_older_than, "--events-older-than")
    )
    store = storage.from_settings(WorkerSettings.from_env()) if args.assets else None
    report = await retention.prune(
        db.resolve_dsn(args.dsn),
        jobs_older_than=jobs_age,
        events_older_than=events_age,
        storage=store,
        dry_run=args.dry_run,
    )
    print("\n".join(report.lines()))
    return EXIT_ERROR if report.files_failed else 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from pgjobs.gateway.app import serve

    return serve(args.dsn, host=args.host, port=args.port)


async def cmd_token(args: argparse.Namespace) -> int:
    from pgjobs.gateway import auth
    from pgjobs.jobspec import MAX_COMPANY_LENGTH

    dsn = db.resolve_dsn(args.dsn)
    async with await db.connect(dsn) as conn:
        await db.ensure_migrated(conn)
        if args.token_command == "create":  # noqa: S105 - a subcommand name
            company = args.company_id
            if args.operator:
                if company is not None:
                    raise InvalidJobError(
                        "an operator token acts for every company: give --operator or a "
                        "company, not both"
                    )
                print(await auth.create_token(conn, None, args.label, operator=True))
                return 0
            if company is None:
                raise InvalidJobError("give the company the token is for, or --operator")
            if not company.strip() or len(company) > MAX_COMPANY_LENGTH or "\x00" in company:
                raise InvalidJobError(f"company_id must be 1 to {MAX_COMPANY_LENGTH} characters")
            print(await auth.create_token(conn, company, args.label))
            return 0
        revoked = await auth.revoke_token(conn, args.token_or_id)
    if revoked is None:
        print("pgjobs: error: no active token matches", file=sys.stderr)
        return EXIT_ERROR
    print(f"revoked {revoked}")
    return 0


def cmd_psql(args: argparse.Namespace) -> int:
    """psql against the configured database. With the embedded server this process keeps
    it running while psql is open (it stops when the last pgjobs process exits)."""
    dsn = db.resolve_dsn(args.dsn)
    psql = shutil.which("psql")
    if psql is None:
        from pgjobs import embedded

        psql = embedded.psql_path()
    if psql is None:
        raise ConfigurationError("psql not found: install the PostgreSQL client")
    extra = [a for a in args.psql_args if a != "--"]
    return subprocess.call([psql, dsn, *extra])  # noqa: S603 - argv list, no shell


def cmd_migrate(args: argparse.Namespace) -> int:
    from pgjobs import migrate  # yoyo: only this command needs it

    dsn = db.resolve_dsn(args.dsn)
    db.check_dsn(dsn)
    applied = migrate.apply(dsn)
    print(f"applied {', '.join(applied)}" if applied else "schema is up to date")
    return 0


def _run(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed (a faster event loop), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "psql":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.psql_args = extra
    try:
        log_format = logs.resolve_format(args.log_format)
    except ConfigurationError as exc:
        print(f"pgjobs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(log_format, verbose=args.verbose)
    # yoyo logs each statement of each migration at INFO: ~45 lines on a first run.
    for noisy in ("psycopg.pool", "pgserver", "yoyo"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    commands: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, int]]] = {
        "enqueue": cmd_enqueue,
        "worker": cmd_worker,
        "cancel": cmd_transition,
        "retry": cmd_transition,
        "demo": cmd_demo,
        "token": cmd_token,
        "stats": cmd_stats,
        "schedules": cli_schedules.run,
        "prune": cmd_prune,
        "limits": lambda args: limits_cli.command(args, _table),
    }
    try:
        if args.command == "migrate":
            return cmd_migrate(args)
        if args.command == "dsn":
            print(db.resolve_dsn(args.dsn))
            return 0
        if args.command == "psql":
            return cmd_psql(args)
        if args.command == "gateway":
            return cmd_gateway(args)
        if args.command == "jobs":
            fn = cmd_jobs_list if args.jobs_command == "list" else cmd_jobs_show
            return _run(fn(args))
        return _run(commands[args.command](args))
    except (ConfigurationError, InvalidJobError) as exc:
        print(f"pgjobs: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PgjobsError as exc:
        print(f"pgjobs: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
