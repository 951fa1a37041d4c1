"""bench.plain_claim, the claim the fairness scenario prices the fair one against: it must
be the fair claim's statement choosing oldest-first across companies (as pgjobs claimed
before sql/0008), writing and returning what the fair claim does."""

from __future__ import annotations

from typing import Any, LiteralString

import psycopg
import pytest
from bench.plain_claim import plain_claim

from helpers import fetch
from pgjobs.client import Client
from pgjobs.doorbell import ringing
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES, positional


def _claim(dsn: str, query: LiteralString, limit: int) -> tuple[list[str], list[Any]]:
    """The columns and rows of one claim of ``limit`` (committed), as the worker sends it."""
    params = {
        "now": None,
        "limit": limit,
        "worker_id": "w",
        "lease_seconds": 60.0,
        "job_types": ["echo"],
        "after_company": None,
    }
    text, order = positional(ringing(query))
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = psycopg.RawCursor(conn).execute(text, [params[k] for k in order])
        assert cur.description is not None
        return [c.name for c in cur.description], cur.fetchall()


async def test_the_plain_claim_takes_the_oldest_jobs_whatever_their_company(
    dsn: str, client: Client
) -> None:
    older = await client.enqueue_many(JobSpec("a", "echo") for _ in range(30))
    await client.enqueue_many(JobSpec("b", "echo") for _ in range(5))
    fair_columns, fair = _claim(dsn, QUERIES["job_claim_batch"], 10)
    assert {row[1] for row in fair} == {"a", "b"}  # the fair claim shares the batch

    columns, plain = _claim(dsn, plain_claim(QUERIES["job_claim_batch"]), 10)
    assert columns == fair_columns
    # a's oldest jobs, after those the fair claim took
    left = [job.id for job in older if job.id not in {row[0] for row in fair}]
    assert sorted(row[0] for row in plain) == sorted(left[:10])
    events = await fetch(
        dsn,
        "SELECT count(*) AS n FROM pgjobs.job_events WHERE type = 'content_job.running' "
        "AND job_id = ANY(%s)",
        [[row[0] for row in plain]],
    )
    assert events == [{"n": 10}]  # the same UPDATE: an audit row each


def test_a_claim_whose_update_cannot_be_found_is_refused() -> None:
    with pytest.raises(ValueError, match="not one"):
        plain_claim("WITH x AS (SELECT 1) SELECT 1")
