"""A pgjobs process refuses a database whose schema lacks a migration it needs (pgjobs.schema),
saying which and what to do, instead of failing mid-claim on a column or function the
migration would have added. A database ahead of it (migrated for a newer version) is fine."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, roll_back_migrations
from pgjobs import migrate, schema
from pgjobs.client import Client
from pgjobs.errors import SchemaBehindError
from pgjobs.sync import SyncClient

LATEST = schema.required()[-1]
MESSAGE = (
    f"the database's pgjobs schema is older than this pgjobs (missing migration {LATEST}):"
    " run `pgjobs migrate`"
)


@pytest.fixture
def behind_dsn(empty_dsn: str) -> str:
    """A database migrated, then its newest migration rolled back."""
    migrate.apply(empty_dsn)
    roll_back_migrations(empty_dsn, [LATEST])
    return empty_dsn


async def test_the_client_says_which_migration_is_missing(behind_dsn: str) -> None:
    with pytest.raises(SchemaBehindError) as raised:
        await Client.connect(behind_dsn)
    assert raised.value.missing == [LATEST]
    assert str(raised.value) == MESSAGE
    with pytest.raises(SchemaBehindError):
        SyncClient(behind_dsn)


@pytest.mark.parametrize(
    "command",
    [
        ["enqueue", "acme", "echo"],
        ["worker", "--handlers", "pgjobs.demo:registry"],
        ["gateway", "--port", "1"],
        ["prune", "--jobs-older-than", "30d"],
    ],
)
def test_commands_say_it_in_one_line(behind_dsn: str, command: list[str]) -> None:
    env = {**os.environ, "PGJOBS_DSN": behind_dsn, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run(
        [sys.executable, "-m", "pgjobs", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert [line for line in out.stderr.splitlines() if "error" in line] == [
        f"pgjobs: error: {MESSAGE}"
    ]


async def test_migrate_then_it_connects_and_off_lets_it_run_behind(
    behind_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PGJOBS_SCHEMA_CHECK", "off")
    async with await Client.connect(behind_dsn):
        pass
    assert MESSAGE in caplog.text
    monkeypatch.delenv("PGJOBS_SCHEMA_CHECK")
    assert migrate.apply(behind_dsn) == [LATEST]
    async with await Client.connect(behind_dsn):
        pass


async def test_a_database_ahead_is_fine(empty_dsn: str) -> None:
    """Migrated for a newer pgjobs: a migration this one does not know is recorded."""
    migrate.apply(empty_dsn)
    async with await Client.connect(empty_dsn) as client, client.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO _yoyo_migration (migration_hash, migration_id, applied_at_utc)"
            " VALUES ('f' || md5('next'), '9999_next', now())"
        )
    async with await Client.connect(empty_dsn):
        pass
