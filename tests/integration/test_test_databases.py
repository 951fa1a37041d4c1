"""The ``dsn`` fixture (tests/conftest.py): each test gets a migrated database no test
used before, and a used one is dropped after its test, in the background."""

from __future__ import annotations

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
