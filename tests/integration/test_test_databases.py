"""The ``dsn`` fixture (tests/conftest.py): each test gets a migrated database no test
used before, and a used one is dropped after its test, in the background but never
while a test marked ``quiet_databases`` (every gateway test) runs."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest

from helpers import fetch, wait_until
from pgjobs.client import Client

SEEN: list[str] = []  # the databases the tests below were given, in order


@pytest.mark.parametrize("turn", range(3))
async def test_each_test_gets_a_fresh_migrated_database(
    dsn: str, client: Client, turn: int
) -> None:
    (row,) = await fetch(
        dsn, "SELECT current_database() AS name, (SELECT count(*) FROM pgjobs.jobs) AS jobs"
    )
    assert row["name"] not in SEEN
    assert row["jobs"] == 0
    SEEN.append(row["name"])
    # A job a later test would see if it were given this database again.
    await client.enqueue("acme", "echo")


async def test_used_databases_are_dropped(dsn: str) -> None:
    assert len(SEEN) == 3, "runs after the tests above"

    async def dropped() -> bool:
        rows = await fetch(
            dsn, "SELECT count(*) AS n FROM pg_database WHERE datname = ANY(%s)", [SEEN]
        )
        return rows[0]["n"] == 0

    await wait_until(dropped, within=60, message="the used test databases dropped")


@pytest.mark.quiet_databases
@pytest.mark.parametrize("turn", range(3))
async def test_no_database_is_cloned_or_dropped_while_a_quiet_test_runs(
    dsn: str, turn: int
) -> None:
    """This test's dsn fixture asked for the next clone and the last test's drop at its
    set-up; both are done before the test starts or wait until it ends, so no transaction
    of theirs holds the horizon the gateway's streams read below. Checked as fast as the
    server answers, over the time a clone takes."""
    deadline = time.monotonic() + 0.5
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM pg_snapshot_xip(pg_current_snapshot())) AS xids,"
                " (SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                "  AND query ~* '^(CREATE|DROP) DATABASE') AS statements"
            )
            assert await cur.fetchone() == (0, 0)


def test_a_test_not_marked_quiet_lets_clones_and_drops_run(databases: Any) -> None:
    """Only tests marked quiet_databases hold the next clone and the last drop off: for
    the others, waiting for them was most of a short test's time."""
    assert databases.quiet_owner is None


def test_clones_are_made_several_tests_ahead(
    pg_server_dsn: str, template_db: str, databases: Any
) -> None:
    """A run of tests shorter than a clone takes the clones made during longer ones."""
    factory = type(databases)(pg_server_dsn, template_db, ahead=3)
    try:
        deadline = time.monotonic() + 60
        while factory.ready.qsize() < 3:  # polled: the clone thread works meanwhile
            assert time.monotonic() < deadline, "three clones not made ahead within 60 s"
            time.sleep(0.05)
        taken = [factory.take(timeout=30) for _ in range(3)]
        assert len(set(taken)) == 3
        for name in taken:
            factory.give_back(name)
    finally:
        factory.close()


def test_a_test_body_may_take_databases_while_quiet(
    pg_server_dsn: str, template_db: str, databases: Any
) -> None:
    """README blocks ask for their database from the test body (getfixturevalue), inside
    quiet(): taking two there in turn needs a clone made while quiet() is held."""
    # A factory of its own, of the session's class (tests/conftest.py's Databases; a
    # plain import of "conftest" may find another directory's conftest module).
    factory = type(databases)(pg_server_dsn, template_db)
    try:
        with factory.quiet():
            first = factory.take(timeout=30)
            second = factory.take(timeout=30)
        assert first != second
        factory.give_back(first)
        factory.give_back(second)
    finally:
        factory.close()
