"""No statement pgjobs runs while draining is JIT-compiled, on a server that has JIT.

Debian's PostgreSQL (and most packaged builds) compile a plan with LLVM once its estimated
cost passes jit_above_cost (100,000). The claim is planned with sorts priced out
(transaction_plans_by_index), which adds 10^10 to its cost whatever the queue holds, so it
was compiled every time: ~1.25 s per claim of 200, a 2-process drain at ~450 jobs/s instead
of ~23,000. The embedded pgserver is built without JIT, so only a server like Debian's
shows it: pg_stat_statements counts the functions each statement compiled.
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from helpers import DEBIAN_BUILDS, fast_settings, running_worker, wait_until
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.limits import set_limit

pytestmark = pytest.mark.skipif(not DEBIAN_BUILDS, reason="no Debian PostgreSQL build here")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("limited", [False, True], ids=["plain", "limited"])
async def test_a_drain_compiles_nothing(debian_dsn: str, tmp_path: Path, limited: bool) -> None:
    """The plain claims (fair and oldest-first), or with a limit that does not bind the
    limited claim, and the finishes with their triggers."""
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        available = conn.execute("SELECT pg_jit_available()").fetchone()
        if not (available and available[0]):
            pytest.skip("this PostgreSQL build has no JIT")
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
    client = await Client.connect(debian_dsn)
    try:
        if limited:
            async with client.pool.connection() as conn:
                await set_limit(conn, company_id="acme", max_running=100_000)
        done_before = await _done(debian_dsn)
        await client.enqueue_many(JobSpec("acme", "echo", {"n": n}) for n in range(600))
        await client.enqueue_many(JobSpec("beta", "echo", {"n": n}) for n in range(600))
        settings = fast_settings(tmp_path, concurrency=400)
        async with running_worker(debian_dsn, demo.registry, settings, burst=True):

            async def all_done() -> bool:
                return await _done(debian_dsn) == done_before + 1200

            await wait_until(all_done, within=120, message="1,200 jobs done")
    finally:
        await client.close()
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        compiled = conn.execute(
            "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 120), jit_functions"
            " FROM pg_stat_statements WHERE jit_functions > 0"
        ).fetchall()
        claims = conn.execute(
            "SELECT sum(calls) FROM pg_stat_statements WHERE query LIKE %s",
            [
                "%WITH RECURSIVE room AS MATERIALIZED%"
                if limited
                else "%FOR UPDATE OF q SKIP LOCKED%"
            ],
        ).fetchone()
        if limited:
            conn.execute("DELETE FROM pgjobs.limits")
    assert claims is not None
    assert claims[0], "no claim of that kind was counted"
    assert compiled == []


async def _done(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM pgjobs.jobs WHERE status = 'done'").fetchone()
    return row[0] if row else 0
