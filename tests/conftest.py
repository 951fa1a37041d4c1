"""Real PostgreSQL for every test, never a mock.

Where the server comes from, in order: ``PGJOBS_TEST_DSN`` (a server on which the tests
may create databases), else a testcontainers PostgreSQL when a Docker engine answers,
else the embedded server from the ``pgserver`` package. A template database is migrated
once per session; each test gets its own database cloned from it, so tests never see
each other's jobs, events or notifications.

Cloning and dropping cost a test ~0.1-0.3 s each on a loaded 2-core machine, over 600
times a run, and are not what any test is about: ``Databases`` clones the next test's
database and drops used ones in the background, while other tests run. Not while a
test marked ``quiet_databases`` runs (every test under tests/gateway, and any other that
asks): a CREATE or DROP DATABASE holds a transaction id, which holds the horizon that the
gateway's streams read below, and so would change what a test of them observes (an idle
company feed polled). Holding every test off made each test wait for the next one's
clone, ~0.15 s each, over a minute a run.

``make test`` runs the tests two at a time (pytest-xdist): each of its two processes has
its own session, so its own embedded server, template and databases; the tests under
``HEAVY_DIRS`` all go to one of them, one after another.

The embedded server, private to the run and never stopped by a test (tests that restart
PostgreSQL start their own), runs without fsync: only an OS crash could lose what fsync
protects.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import tempfile
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
    with _admin(server.get_uri()) as conn:
        # Durability against an OS crash is not under test: every fsync (a commit, the
        # checkpoint each DROP DATABASE forces) is time a test waits for nothing.
        conn.execute("ALTER SYSTEM SET fsync = off")
        conn.execute("ALTER SYSTEM SET full_page_writes = off")
        conn.execute("SELECT pg_reload_conf()")
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


class Databases:
    """Fresh databases cloned from the template a few steps ahead, used ones dropped later.

    One thread keeps up to ``ahead`` clones ready (``take`` waits only if cloning fell
    behind: a run of tests shorter than a clone uses those made during longer ones);
    another drops what ``give_back`` hands it, ``WITH (FORCE)`` so connections a test
    left open do not block it. Each clone is used by one
    test and dropped, exactly as when the fixture cloned and dropped inline. Both threads
    hold ``busy`` for each statement; ``quiet()`` holds it while a quiet test runs."""

    def __init__(self, server_dsn: str, template: str, ahead: int = 4) -> None:
        self.server_dsn = server_dsn
        self.template = template
        self.ready: queue.Queue[str | BaseException] = queue.Queue(maxsize=ahead)
        self.used: queue.Queue[str | None] = queue.Queue()
        self.stopping = threading.Event()
        self.busy = threading.Lock()
        self.quiet_owner: int | None = None  # the thread inside quiet(), if any
        self.threads = [
            threading.Thread(target=self._clone_ahead, name="test-db-clone", daemon=True),
            threading.Thread(target=self._drop_used, name="test-db-drop", daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def take(self, timeout: float = 120.0) -> str:
        """A database no test has used; raises what cloning it raised. A test body that
        asks for one (``request.getfixturevalue("dsn")``) runs inside ``quiet()``, which
        would hold off the clone it waits for: the clone thread may work while it waits."""
        waiting_in_quiet = self.quiet_owner == threading.get_ident()
        if waiting_in_quiet:
            self.busy.release()
        try:
            name = self.ready.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no test database cloned within {timeout:g} s") from None
        finally:
            if waiting_in_quiet:
                self.busy.acquire()
        if isinstance(name, BaseException):
            raise name
        return name

    def give_back(self, name: str) -> None:
        self.used.put(name)

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """No clone or drop runs inside: waits for the one running, holds off the next."""
        with self.busy:
            self.quiet_owner = threading.get_ident()
            try:
                yield
            finally:
                self.quiet_owner = None

    def close(self) -> None:
        """Stop cloning, drop the clones nobody took and every used one, then return."""
        self.stopping.set()
        self.threads[0].join(timeout=120)
        with contextlib.suppress(queue.Empty):
            while True:
                leftover = self.ready.get_nowait()
                if isinstance(leftover, str):
                    self.used.put(leftover)
        self.used.put(None)
        self.threads[1].join(timeout=300)

    def _clone_ahead(self) -> None:
        with _admin(self.server_dsn) as conn:
            while not self.stopping.is_set():
                name = f"pgjobs_test_{uuid.uuid4().hex[:12]}"
                made: str | BaseException
                try:
                    with self.busy:
                        conn.execute(
                            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                                sql.Identifier(name), sql.Identifier(self.template)
                            )
                        )
                    made = name
                except psycopg.Error as exc:
                    made = exc
                while True:  # wait for the test to take it, or for the end of the run
                    try:
                        self.ready.put(made, timeout=0.2)
                        break
                    except queue.Full:
                        if self.stopping.is_set():
                            if isinstance(made, str):
                                self.used.put(made)
                            return

    def _drop_used(self) -> None:
        with _admin(self.server_dsn) as conn:
            while (name := self.used.get()) is not None:
                with self.busy, contextlib.suppress(psycopg.Error):
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )


_DATABASES: list[Databases] = []  # the session's, once a test asked for one


@pytest.fixture(scope="session")
def databases(pg_server_dsn: str, template_db: str) -> Iterator[Databases]:
    factory = Databases(pg_server_dsn, template_db)
    _DATABASES.append(factory)
    yield factory
    _DATABASES.remove(factory)
    factory.close()


# Tests that make test, running two at a time, still runs in one process one after another
# (pytest_xdist_make_scheduler below): those under these directories load the machine
# themselves (drains of thousands of jobs, worker processes killed and restarted,
# PostgreSQL stopped for seconds, benchmarks), so two of them must not share the two cores;
# the tests of each of these files depend on running in order.
HEAVY_DIRS = ("bench", "chaos", "fault")
IN_ORDER_FILES = ("tests/integration/test_test_databases.py",)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "quiet_databases: no test database is cloned or dropped while the test runs "
        "(its transaction would hold the horizon the gateway's streams read below)",
    )
    # Tests send SIGINT to the commands they start, as Ctrl-C would. A run started in the
    # background by a non-interactive shell (`make test &` in a script) has SIGINT ignored,
    # and so would every command it starts, which then never stops on it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist's load scheduling, but every heavy test in one unit and each in-order
    file in one (a unit goes to one process, its tests in collection order). Not
    ``--dist loadgroup``: under pytest 9 its xdist_group marks group nothing (xdist 3.8
    renames ``item._nodeid``, which pytest 9 no longer reads)."""
    if config.getvalue("dist") != "load":  # -n alone; another --dist asked is kept
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            parts = path.split("/")
            if len(parts) > 2 and parts[0] == "tests" and parts[1] in HEAVY_DIRS:
                return "heavy"
            return path if path in IN_ORDER_FILES else nodeid

    return Scheduling(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """A test marked quiet_databases runs with no clone or drop of a database in
    progress; others let the next clone and the last drop run meanwhile."""
    quiet = bool(_DATABASES) and item.get_closest_marker("quiet_databases") is not None
    with _DATABASES[0].quiet() if quiet else contextlib.nullcontext():
        return (yield)


@pytest.fixture
def dsn(pg_server_dsn: str, databases: Databases) -> Iterator[str]:
    """A fresh, migrated database for this test."""
    name = databases.take()
    yield make_conninfo(pg_server_dsn, dbname=name)
    databases.give_back(name)


@pytest.fixture(scope="module")
def shared_dsn(pg_server_dsn: str, databases: Databases) -> Iterator[str]:
    """A fresh, migrated database shared by a module's tests that leave it as they found
    it: EXPLAIN of a query (never run), or a request the gateway must refuse without
    writing anything, which those tests check. A clone each would be most of their time.
    """
    name = databases.take()
    yield make_conninfo(pg_server_dsn, dbname=name)
    databases.give_back(name)


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


@pytest.fixture
def older_schemas_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """This version's clients, workers and gateway run on a schema behind it, which they
    otherwise refuse (pgjobs.schema): for tests that roll migrations back on purpose."""
    monkeypatch.setenv("PGJOBS_SCHEMA_CHECK", "off")
