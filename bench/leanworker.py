"""The least Python worker: how fast any Python worker could drain, given the SQL.

``python -m bench.leanworker DSN {floor,floor-tasks,pgjobs} CONNECTIONS`` (started by
``bench.floor.python_drain``, one process per worker process, on uvloop as the queues'
own workers run)

Each connection loops: claim 100 jobs (one statement, its own commit), await a no-op
handler for each, finish them (one statement, its own commit), until a claim finds
nothing; then the process prints how many jobs it finished. ``floor`` runs the contract's
floor (bench.floor's narrowest schema, the claim returning id and lease token); ``pgjobs``
runs pgjobs' own two statements from pgjobs/queries.sql with the parameters the worker
sends, the claim returning whole job rows as the worker's does. ``floor-tasks`` is
``floor`` with each handler run as a task of its own under a deadline
(``asyncio.timeout``), all of a claim's at once: the least that a worker which runs
handlers side by side and stops one that overruns, as every job queue's does, adds.

What this leaves out is everything else a product worker needs: a pool, a context per
job, leases renewed, completions batched across handlers, retries, cancellation, errors.
So its throughput is a ceiling for a Python worker on that SQL and machine, and the
distance from it to pgjobs' drain is what pgjobs' worker costs.
"""

# The statements are bench.floor's constants, rearranged; nothing in them comes from input.
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import psycopg

BATCH = 100


def floor_statements() -> tuple[str, str]:
    """The floor's claim and finish (bench.floor.script without any of pgjobs' choices),
    as parameterised statements; the claim returns one row per job."""
    from bench import floor

    text = floor.script(frozenset())
    claim, finish = text.split("\\gset\n", 1)
    claim = claim.split("\n", 1)[1]  # drop "\set batch"
    head, _ = claim.rsplit("\nSELECT ", 1)
    claim = (
        f"{head},\nsent AS (SELECT pg_notify('floor', "
        "(SELECT string_agg(id::text || ':' || event_seq, ',') FROM j)))\n"
        "SELECT id, lease_token FROM j, sent"
    )

    def bind(sql: str) -> str:
        sql = sql.replace(":batch", "%(limit)s").replace(":ids", "%(ids)s")
        return sql.replace(":toks", "%(toks)s")

    return bind(claim), bind(finish.rstrip().rstrip(";"))


async def handler(_job: Any) -> None:
    return None


HANDLER_TIMEOUT = 60.0


async def _with_deadline(job: Any) -> None:
    async with asyncio.timeout(HANDLER_TIMEOUT):
        await handler(job)


Rows = list[tuple[Any, ...]]


async def _loop(
    conn: psycopg.AsyncConnection[Any],
    claim: tuple[str, dict[str, Any]],
    finish: Callable[[Rows], tuple[str, dict[str, Any]]],
    *,
    tasks: bool = False,
) -> int:
    """Claim, await the handler per job (``tasks``: each in a task of its own with a
    deadline, side by side), finish; until a claim finds nothing."""
    done = 0
    while True:
        cur = await conn.execute(*claim)
        rows = await cur.fetchall()
        if not rows:
            return done
        if tasks:
            await asyncio.gather(*(asyncio.create_task(_with_deadline(row)) for row in rows))
        else:
            for row in rows:
                await handler(row)
        await conn.execute(*finish(rows))
        done += len(rows)


async def _loop_floor(conn: psycopg.AsyncConnection[Any], *, tasks: bool = False) -> int:
    claim, finish = floor_statements()
    return await _loop(
        conn,
        (claim, {"limit": BATCH}),
        lambda rows: (finish, {"ids": [r[0] for r in rows], "toks": [r[1] for r in rows]}),
        tasks=tasks,
    )


async def _loop_floor_tasks(conn: psycopg.AsyncConnection[Any]) -> int:
    return await _loop_floor(conn, tasks=True)


async def _loop_pgjobs(conn: psycopg.AsyncConnection[Any]) -> int:
    from pgjobs.queries import QUERIES
    from pgjobs.types import CLAIMED_COLUMNS

    # The claim returns CLAIMED_COLUMNS in order (then after_company).
    id_at, token_at = CLAIMED_COLUMNS.index("id"), CLAIMED_COLUMNS.index("lease_token")
    claim = {
        "now": None, "limit": BATCH, "worker_id": "lean", "lease_seconds": 30,
        "job_types": None, "after_company": None,
    }  # fmt: skip

    def finish(rows: Rows) -> tuple[str, dict[str, Any]]:
        n = len(rows)
        return QUERIES["job_finish_many_if_leased"], {
            "now": None,
            "ids": [r[id_at] for r in rows],
            "lease_tokens": [r[token_at] for r in rows],
            "outcomes": ["done"] * n,
            "results": None, "errors": None, "tracebacks": None, "retry_delays": [0.0] * n,
            "asset_ids": None, "asset_keys": None, "asset_content_types": None,
            "asset_sizes": None, "asset_sha256s": None, "asset_filenames": None,
        }  # fmt: skip

    return await _loop(conn, (QUERIES["job_claim_batch"], claim), finish)


async def run(dsn: str, sql: str, connections: int) -> None:
    """bench.procs.WorkerGroup's protocol: connect, say "ready", drain on "go", say
    "done <jobs>", close on the next line ("stop"): the caller reads CPU times while the
    connections (and their backends) are still open."""
    loop = {"floor": _loop_floor, "floor-tasks": _loop_floor_tasks, "pgjobs": _loop_pgjobs}[sql]
    conns = [
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(connections)
    ]
    try:
        print("ready", flush=True)
        sys.stdin.readline()
        done = sum(await asyncio.gather(*(loop(conn) for conn in conns)))
        print(f"done {done}", flush=True)
        sys.stdin.readline()
    finally:
        for conn in conns:
            await conn.close()


if __name__ == "__main__":
    import uvloop

    uvloop.run(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))
