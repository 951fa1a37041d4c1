"""A chunked bulk enqueue has PostgreSQL plan the publish trigger's statements once per
transaction, not once per chunk (job_insert_many_begin's plan_cache_mode).

The trigger's audit-row statement reads a PL/pgSQL variable (whether to ring), so by
default each execution gets a custom plan with it folded in: a planning per chunk, ~0.25
ms of PostgreSQL CPU each. Planning is counted by pg_stat_statements (track = all,
track_planning), which the embedded pgserver lacks: the test starts Debian's PostgreSQL as
bench.pgss does, and is skipped where none is installed (as tests/integration/
test_trigger_plans.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgjobs.client import Client, spec_chunks
from pgjobs.jobspec import JobSpec

BUILDS = sorted(Path("/usr/lib/postgresql").glob("*/lib/pg_stat_statements.so"))


@pytest.fixture(scope="module")
def debian_dsn() -> Iterator[str]:
    from bench.pgss import private_server

    from bench import pg

    with private_server(BUILDS[-1].parents[1] / "bin") as server, pg.database(server) as dsn:
        yield dsn


@pytest.mark.skipif(not BUILDS, reason="no PostgreSQL build with pg_stat_statements here")
@pytest.mark.timeout(120)
def test_a_chunked_enqueue_plans_the_publish_trigger_once(debian_dsn: str) -> None:
    specs = [JobSpec("acme", "echo") for _ in range(1000)]
    chunks = len(list(spec_chunks(specs)))
    assert chunks >= 3
    name = sql.Identifier(str(conninfo_to_dict(debian_dsn)["dbname"]))
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        # For the client's new sessions (settings of the database, read at connect).
        conn.execute(sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track = 'all'").format(name))
        conn.execute(
            sql.SQL("ALTER DATABASE {} SET pg_stat_statements.track_planning = on").format(name)
        )
        conn.execute("SELECT pg_stat_statements_reset()")

    async def enqueue() -> None:
        async with await Client.connect(debian_dsn, max_size=1) as client:
            await client.enqueue_many(specs)

    asyncio.run(enqueue())
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT sum(calls)::int, sum(plans)::int FROM pg_stat_statements"
            " WHERE query LIKE 'WITH inserted AS (%%INSERT INTO pgjobs.job_events%%'"
        ).fetchone()
    assert row == (chunks, 1)
