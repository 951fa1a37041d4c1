"""`pgjobs prune` as an operator runs it: strict durations, a dry run, then the real one."""

from __future__ import annotations

import psycopg
import pytest
from test_cli import pgjobs

from pgjobs.client import Client
from pgjobs.errors import JobNotFoundError


def test_bad_durations_exit_2_with_one_line(dsn: str) -> None:
    for args in (
        ["--jobs-older-than", "30"],
        ["--jobs-older-than", "30d", "--events-older-than", "1y"],
        ["--jobs-older-than=-5d"],
    ):
        out = pgjobs("prune", *args, dsn=dsn)
        assert out.returncode == 2, out
        assert out.stdout == ""
        assert len(out.stderr.strip().splitlines()) == 1
        assert "must be a whole number and a unit d, h or m" in out.stderr


async def test_prune_dry_run_then_prune(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    await client.cancel("acme", job.id)
    kept = await client.enqueue("acme", "echo")
    await client.cancel("acme", kept.id)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        # Finished 40 days ago (the trigger allows moving times; no state changes).
        await conn.execute(
            "UPDATE pgjobs.jobs SET created_at = now() - interval '41 days',"
            " finished_at = now() - interval '40 days' WHERE id = %s",
            [job.id],
        )

    dry = pgjobs("prune", "--jobs-older-than", "30d", "--dry-run", dsn=dsn)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:3] == [
        "would remove 1 finished jobs (0 done, 0 failed, 1 cancelled)",
        "would remove 0 audit events",
        "would remove 0 assets",
    ]
    assert "batches, the longest transaction" in dry.stdout.splitlines()[3]
    assert (await client.get("acme", job.id)).status.value == "cancelled"

    real = pgjobs("prune", "--jobs-older-than", "30d", "--events-older-than", "180d", dsn=dsn)
    assert real.returncode == 0, real.stderr
    assert real.stdout.splitlines()[0] == "removed 1 finished jobs (0 done, 0 failed, 1 cancelled)"
    assert (await client.get("acme", kept.id)).status.value == "cancelled"
    with pytest.raises(JobNotFoundError):
        await client.get("acme", job.id)
