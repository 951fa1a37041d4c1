"""pgjobs.testing, used the way a user's own test suite would."""

from __future__ import annotations

import pytest

from pgjobs import demo
from pgjobs.client import Client
from pgjobs.context import JobContext
from pgjobs.registry import Registry
from pgjobs.testing import assert_enqueued, run_queued
from pgjobs.types import JobStatus


async def test_assert_enqueued_matches_input_subset(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "send_email", {"to": "ada@example.com", "lang": "en"})
    await client.enqueue("acme", "send_email", {"to": "bob@example.com"})
    found = await assert_enqueued(dsn, "acme", "send_email", input={"to": "ada@example.com"})
    assert found.id == job.id
    with pytest.raises(AssertionError, match=r"expected one 'send_email' job .* found 2"):
        await assert_enqueued(dsn, "acme", "send_email")
    with pytest.raises(AssertionError, match="found 0"):
        await assert_enqueued(dsn, "globex", "send_email")


async def test_run_queued_runs_jobs_and_the_jobs_they_enqueue(dsn: str, client: Client) -> None:
    registry = Registry()

    @registry.handler("parent")
    async def parent(ctx: JobContext) -> None:
        await client.enqueue(ctx.company_id, "echo", {"from": "parent"})

    registry.register("echo", demo.echo)
    await client.enqueue("acme", "parent")
    ran = await run_queued(dsn, registry)
    assert sorted(j.job_type for j in ran) == ["echo", "parent"]
    assert {j.status for j in ran} == {JobStatus.DONE}
    assert await run_queued(dsn, registry) == [], "nothing left to run"
