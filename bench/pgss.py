"""Where PostgreSQL's time goes in a drain, statement by statement (pg_stat_statements).

``python -m bench.pgss --pg-bin DIR [--jobs 100000] [--processes 1]``
``python -m bench.pgss --server-dsn DSN [...]``

pg_stat_statements is a contrib module that must be loaded when the server starts
(``shared_preload_libraries``). The embedded server of ``make bench`` (pgserver) is built
without contrib modules, so this profile is not part of ``make bench``. It needs a
PostgreSQL build that has the module:

* ``--pg-bin DIR`` starts a private server from that build's binaries (Debian's
  postgresql-15, say: ``/usr/lib/postgresql/15/bin``) in a temporary directory, with the
  module preloaded and the bench's settings (fsync and synchronous_commit on, Unix socket
  only, max_wal_size 4GB), and deletes it afterwards. As root it runs the server as the
  ``pgserver`` user, as pgserver itself does.
* ``--server-dsn DSN`` uses a server already running with the module preloaded.

It fills a fresh database with N no-op jobs as scenario 1 does, resets the statistics,
drains it with pgjobs' worker processes (bench.worker, as scenario 1), then prints every
statement's calls, rows and execution time per job drained, beside the CPU that the
PostgreSQL processes and the workers used (read from /proc, as bench.cpusplit).

``pg_stat_statements.track = all``, so the statements that pgjobs' triggers run are
listed on their own ("nested" rows). Their time is *also* part of the time of the
top-level statement that fired them: add up the top-level rows only. Execution time is
time spent executing, not CPU: a statement waiting for a row lock or for I/O counts it
too; a COMMIT's time is mostly its WAL flush.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from bench import pg
from bench.context import QUICK, Ctx
from bench.cpusplit import drain_with_cpu
from bench.drain import queue_db
from bench.stats import fmt, summary
from pgjobs import doorbell
from pgjobs.queries import QUERIES

SERVER_USER = "pgserver"  # who runs the server when we are root (initdb refuses root)


@contextlib.contextmanager
def private_server(bin_dir: Path) -> Iterator[str]:
    """A PostgreSQL from ``bin_dir`` with pg_stat_statements preloaded; its DSN."""
    root = Path(tempfile.mkdtemp(prefix="pgjobs-pgss-"))
    data = root / "data"
    as_user: list[str] = []
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam(SERVER_USER)
        except KeyError:
            raise SystemExit(
                f"bench.pgss: running as root needs a user {SERVER_USER!r} to run the "
                "server (initdb refuses root); create it, or run as another user"
            ) from None
        os.chown(root, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", SERVER_USER, "--"]
    options = " ".join(
        [
            "-c shared_preload_libraries=pg_stat_statements",
            "-c listen_addresses=''",
            f"-c unix_socket_directories={root}",
            "-c fsync=on",
            "-c synchronous_commit=on",
            *(f"-c {name}={value}" for name, value in pg.SERVER_SETTINGS.items()),
        ]
    )
    try:
        _run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"])
        _run(
            [
                *as_user,
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-o",
                options,
                "-w",
                "start",
            ]
        )
        try:
            yield f"host={root} dbname=postgres user=postgres"
        finally:
            subprocess.run(  # noqa: S603
                [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                check=False,
                capture_output=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603 - the build's own tools
    if done.returncode != 0:
        raise SystemExit(f"bench.pgss: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def profile(server_dsn: str, jobs: int, processes: int, out: Path) -> dict[str, Any]:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        row = conn.execute("SHOW shared_preload_libraries").fetchone()
    if row is None or "pg_stat_statements" not in row[0]:
        raise SystemExit(
            "bench.pgss: this server does not preload pg_stat_statements "
            "(shared_preload_libraries); use --pg-bin with a build that has it"
        )
    ctx = Ctx(server_dsn, QUICK, "pgss", 1, out, ("pgjobs",))
    ctx.logs.mkdir(parents=True, exist_ok=True)
    with queue_db(ctx, "pgjobs", jobs) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            # For the worker sessions, which connect after this.
            name = conn.execute("SELECT current_database()").fetchone()[0]  # type: ignore[index]
            conn.execute(f"ALTER DATABASE \"{name}\" SET pg_stat_statements.track = 'all'")
            conn.execute("SELECT pg_stat_statements_reset()")
        result = drain_with_cpu(ctx, "pgjobs", dsn, jobs, processes)
        with psycopg.connect(dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT toplevel, calls, rows, total_exec_time, total_plan_time, wal_bytes,"
                " query FROM pg_stat_statements"
                " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                " ORDER BY toplevel DESC, total_exec_time DESC"
            ).fetchall()
            server_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
    statements = [
        {
            "toplevel": top,
            "calls": calls,
            "rows": nrows,
            "exec_ms": exec_ms,
            "plan_ms": plan_ms,
            "wal_bytes": int(wal),
            "name": label(query),
            "query": query,
        }
        for top, calls, nrows, exec_ms, plan_ms, wal, query in rows
    ]
    return {
        "jobs": jobs,
        "processes": processes,
        "jobs_per_s": result["jobs_per_s"],
        "server_version": server_version,
        "pg_cpu_us": result["pg_cpu_us"],
        "worker_cpu_us": result["worker_cpu_us"],
        "statements": statements,
    }


def _squash(text: str) -> str:
    """The statement with comments, whitespace runs, parameters and constants made
    uniform (pg_stat_statements shows constants as $n, as it does parameters)."""
    text = re.sub(r"--[^\n]*", " ", text)
    text = re.sub(
        r"%\(\w+\)[sb]|\$\d+|'(?:[^']|'')*'|\b\d+(?:\.\d+)?\b|\b(?:NULL|TRUE|FALSE)\b",
        "?",
        text,
        flags=re.IGNORECASE,
    )
    return re.sub(r"\s+", " ", text).strip()


_NAMED = {_squash(sql): name for name, sql in QUERIES.items()}
# A doorbell worker runs its claim, finish and progress as doorbell.ringing(query).
for _name, _sql in QUERIES.items():
    with contextlib.suppress(ValueError):  # not a statement that rings
        _NAMED[_squash(doorbell.ringing(_sql))] = _name
_FUNCTION = re.compile(
    r"CREATE (?:OR REPLACE )?FUNCTION pgjobs\.(\w+)\(.*?\$(\w*)\$(.*?)\$\2\$", re.S
)


def _function_bodies() -> dict[str, str]:
    """pgjobs' SQL functions (the triggers among them), by name, as the last migration
    that (re)defines each leaves them."""
    bodies: dict[str, str] = {}
    for path in sorted((Path(__file__).parent.parent / "sql").glob("[0-9]*.sql")):
        if not path.name.endswith(".rollback.sql"):
            for m in _FUNCTION.finditer(path.read_text()):
                bodies[m.group(1)] = _squash(m.group(3))
    return bodies


_BODIES = _function_bodies()


def label(query: str) -> str:
    """pgjobs' name for a statement: the query's name in queries.sql, or the SQL function
    it runs in; else its first words."""
    squashed = _squash(query)
    name = _NAMED.get(squashed)
    if name is not None:
        return name
    # (Not for a few words, which could be anywhere.)
    inside = [fn for fn, body in _BODIES.items() if len(squashed) > 40 and squashed in body]
    if inside:
        return f"{' / '.join(inside)}(): {squashed[:40]}…"
    return squashed[:90] + ("…" if len(squashed) > 90 else "")


def report(runs: list[dict[str, Any]], top: int = 12) -> str:
    """Markdown: the runs' headline figures and each statement's, median (min–max)."""
    first = runs[0]
    jobs = first["jobs"]

    def per_job(run: dict[str, Any], key: tuple[bool, str], field: str) -> float:
        return sum(s[field] for s in run["statements"] if (s["toplevel"], s["name"]) == key) / jobs

    keys: dict[tuple[bool, str], float] = {}
    for run in runs:
        for st in run["statements"]:
            key = (st["toplevel"], st["name"])
            keys[key] = keys.get(key, 0.0) + st["exec_ms"]
    ordered = sorted(keys, key=lambda k: (not k[0], -keys[k]))
    shown = [k for k in ordered if k[0]][:top] + [k for k in ordered if not k[0]][:top]
    total = summary(
        [sum(s["exec_ms"] for s in r["statements"] if s["toplevel"]) * 1000 / jobs for r in runs]
    )
    lines = [
        f"pgjobs drain, {jobs:,} jobs, {first['processes']} worker process(es), PostgreSQL "
        f"{first['server_version']}, median (min–max) of {len(runs)}: "
        f"{fmt(summary([r['jobs_per_s'] for r in runs]))} jobs/s; CPU per job: PostgreSQL "
        f"{fmt(summary([r['pg_cpu_us'] for r in runs]))} µs, workers "
        f"{fmt(summary([r['worker_cpu_us'] for r in runs]))} µs; top-level execution time "
        f"per job {fmt(total, digits=1)} µs.",
        "",
        "| level | statement | calls | rows per call | execution µs per job | WAL bytes per job |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key in shown:
        calls = summary([per_job(r, key, "calls") * jobs for r in runs])
        rows = summary([per_job(r, key, "rows") * jobs for r in runs])
        per_call = rows["median"] / max(1.0, calls["median"])
        exec_us = summary([per_job(r, key, "exec_ms") * 1000 for r in runs])
        wal = summary([per_job(r, key, "wal_bytes") for r in runs])
        name = key[1].replace("|", "\\|")
        lines.append(
            f"| {'top' if key[0] else 'nested'} | `{name}` | {calls['median']:,.0f} | "
            f"{per_call:.1f} | {fmt(exec_us, digits=1)} | {wal['median']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pgss", description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--pg-bin", type=Path, help="binaries of a build with pg_stat_statements")
    where.add_argument("--server-dsn", help="a running server that preloads pg_stat_statements")
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="drains, each on a fresh database")
    parser.add_argument("--out", type=Path, default=Path("bench/results/pgss"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    server = private_server(args.pg_bin) if args.pg_bin is not None else pg.server(args.server_dsn)
    with server as server_dsn:
        runs = [
            profile(server_dsn, args.jobs, args.processes, args.out) for _ in range(args.repeat)
        ]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    name = f"pgss-{stamp}-{args.processes}p"
    text = report(runs)
    (args.out / f"{name}.md").write_text(text + "\n")
    (args.out / f"{name}.json").write_text(json.dumps(runs, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
