"""Real PostgreSQL for every test, never a mock.

Where the server comes from, in order: ``PGJOBS_TEST_DSN`` (a server on which the tests
may create databases), else a testcontainers PostgreSQL when a Docker engine answers,
else the embedded server from the ``pgserver`` package. A template database is migrated
once per session; each test gets its own database cloned from it, so tests never see
each other's jobs, events or notifications.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from bouncer import Bouncer, run_pgbouncer
from pgjobs import migrate
from pgjobs.client import Client
from s3_helpers import MotoServer, moto_server

TESTS = Path(__file__).resolve().parent


def _docker_engine_answers() -> bool:
    """True when a Docker engine responds (the client alone is not enough)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not os.path.exists(host.removeprefix("unix://")):
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            import docker

            engine = docker.from_env(timeout=3)
            try:
                engine.ping()
            finally:
                engine.close()
        except Exception:
            return False
    return True


@pytest.fixture(scope="session")
def pg_server_dsn() -> Iterator[str]:
    explicit = os.environ.get("PGJOBS_TEST_DSN")
    if explicit:
        yield explicit
        return
    if _docker_engine_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16-alpine", driver=None) as container:
            yield container.get_connection_url()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(
            Path(tempfile.mkdtemp(prefix="pgjobs-test-")), cleanup_mode="delete"
        )
    yield server.get_uri()


def _admin(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(dsn, autocommit=True)


@pytest.fixture(scope="session")
def template_db(pg_server_dsn: str) -> Iterator[str]:
    name = f"pgjobs_template_{os.getpid()}"
    with _admin(pg_server_dsn) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate.apply(make_conninfo(pg_server_dsn, dbname=name))
    yield name
    with _admin(pg_server_dsn) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def dsn(pg_server_dsn: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = f"pgjobs_test_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_db)
            )
        )
    yield make_conninfo(pg_server_dsn, dbname=name)
    with _admin(pg_server_dsn) as conn, contextlib.suppress(psycopg.Error):
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
def empty_dsn(pg_server_dsn: str) -> Iterator[str]:
    """A database with no pgjobs schema."""
    name = f"pgjobs_empty_{uuid.uuid4().hex[:12]}"
    with _admin(pg_server_dsn) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(pg_server_dsn, dbname=name)
    with _admin(pg_server_dsn) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[Client]:
    c = await Client.connect(dsn)
    yield c
    await c.close()


@pytest.fixture
def storage_dir(tmp_path: Path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def pgbouncer(pg_server_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bouncer]:
    """PgBouncer in transaction pooling mode in front of the test server (tests/bouncer.py);
    ``pgbouncer.dsn(dsn)`` is a test database through it. Skips without the binary, except
    under CI=true, where it fails."""
    with run_pgbouncer(pg_server_dsn, tmp_path_factory.mktemp("pgbouncer")) as bouncer:
        yield bouncer


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """One S3-compatible server (moto, a subprocess on loopback) per test run."""
    with moto_server() as server:
        yield server


@pytest.fixture
async def s3_bucket(s3_server: MotoServer) -> str:
    """A fresh, empty bucket for this test."""
    bucket = f"pgjobs-{uuid.uuid4().hex[:16]}"
    await s3_server.create_bucket(bucket)
    return bucket
