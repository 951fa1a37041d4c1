"""The one PostgreSQL server of a run, fresh databases on it, and what the machine is.

The server is the embedded one pgjobs uses by default (pgserver: PostgreSQL 16, Unix
socket only, fsync and synchronous_commit on, so every queue pays for durable commits).
Only reloadable settings are changed (a larger max_wal_size, so that bulk loads are not
dominated by forced checkpoints); they apply to every queue alike and are recorded in the
results.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

SERVER_SETTINGS = {"max_wal_size": "4GB", "checkpoint_timeout": "15min"}
REPORTED_SETTINGS = (
    "server_version",
    "shared_buffers",
    "fsync",
    "synchronous_commit",
    "wal_level",
    "max_wal_size",
    "max_connections",
    "work_mem",
)


@contextmanager
def server(existing: str | None = None) -> Iterator[str]:
    """Start a private PostgreSQL in a temporary directory; stop and delete it after. With
    ``existing`` (a DSN), that server instead, its settings as they are, and the migrated
    template ``database`` made there dropped after (the private server goes whole)."""
    if existing:
        try:
            yield existing
        finally:
            drop_template(existing)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs: XDG_RUNTIME_DIR unset
        import pgserver

        root = Path(tempfile.mkdtemp(prefix="pgjobs-bench-"))
        root.chmod(0o755)  # the server runs as user pgserver when we are root
        srv = pgserver.get_server(root / "pgdata", cleanup_mode="delete")
    try:
        dsn: str = srv.get_uri()
        with psycopg.connect(dsn, autocommit=True) as conn:
            for name, value in SERVER_SETTINGS.items():
                conn.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
            conn.execute("SELECT pg_reload_conf()")
        yield dsn
    finally:
        srv.cleanup()
        shutil.rmtree(root, ignore_errors=True)


# A database per server, migrated once: ``database`` clones it (CREATE DATABASE ...
# TEMPLATE copies the files, a fraction of the migration's time, which a run that makes
# tens of databases paid each time). A clone starts as a migrated database does.
_MIGRATED: dict[str, str] = {}


def _migrated_template(server_dsn: str) -> str:
    name = _MIGRATED.get(server_dsn)
    if name is None:
        name = f"bench_template_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        from pgjobs import migrate as pgjobs_migrate

        pgjobs_migrate.apply(make_conninfo(server_dsn, dbname=name))
        _MIGRATED[server_dsn] = name
    return name


def drop_template(server_dsn: str) -> None:
    """Drop the migrated template made on this server, if any."""
    name = _MIGRATED.pop(server_dsn, None)
    if name is not None:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


@contextmanager
def database(server_dsn: str, *, migrate: bool = True) -> Iterator[str]:
    """A fresh database (pgjobs schema applied unless migrate=False), dropped after."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    create = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if migrate:
        template = sql.Identifier(_migrated_template(server_dsn))
        create = sql.SQL("{} TEMPLATE {}").format(create, template)
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(create)
    dsn = make_conninfo(server_dsn, dbname=name)
    try:
        yield dsn
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def checkpoint(dsn: str) -> None:
    """Start each measurement from a clean slate: no dirty buffers left from the load."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def bin_path(name: str) -> str:
    from pgserver._commands import POSTGRES_BIN_PATH

    return str(Path(POSTGRES_BIN_PATH) / name)


def machine(dsn: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]  # type: ignore[index]
            for name in REPORTED_SETTINGS
        }
        # "jit on" where the build has no JIT provider (pgserver's) compiles nothing
        (available,) = conn.execute("SELECT pg_jit_available()").fetchone()  # type: ignore[misc]
        jit = conn.execute("SHOW jit").fetchone()[0]  # type: ignore[index]
        settings["jit"] = jit if available else "not built in"
    import importlib.metadata as md

    versions = {}
    for pkg in ("pgjobs", "procrastinate", "pgqueuer", "awa-pg", "psycopg", "asyncpg"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "postgres": settings,
        "connection": "Unix socket, same machine",
        "packages": versions,
        "load_avg_at_start": os.getloadavg(),
    }
