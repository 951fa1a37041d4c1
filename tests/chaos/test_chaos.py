"""The reduced chaos run (issue 17) in the test suite: the same runner, controller and
checker as ``make chaos`` (tests/chaos/chaos_harness.py), with 2,000 jobs and a 15 s
outage, longer than every timeout configured for the run (connect 10 s, pool checkout
2-5 s, connection use 5 s, lease 3 s, LISTEN heartbeat at most 5 s, and a pool's round
of reconnection attempts, 5 s in this run: a pool gives up about three in the outage).
Every phase waits for progress with generous deadlines, never for a time."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from chaos_harness import ChaosConfig, ChaosRun, Outcome


async def _run(config: ChaosConfig, workdir: Path, **hooks: object) -> Outcome:
    run = ChaosRun(config, workdir, print)
    for name, hook in hooks.items():
        setattr(run, name, hook)
    outcome = await run.run()
    print(outcome.summary)
    return outcome


@pytest.mark.timeout(1200)
async def test_reduced_chaos_run_loses_nothing(tmp_path: Path) -> None:
    outcome = await _run(ChaosConfig(jobs=2000, outage_seconds=15.0, in_flight=250), tmp_path)
    assert outcome.ok, outcome.summary + "\n" + "\n".join(outcome.problems[:30])
    assert outcome.kills > 0
    assert (outcome.lost, outcome.duplicates, outcome.stream_gaps) == (0, 0, 0)


@pytest.mark.timeout(600)
async def test_checker_finds_a_deleted_audit_row(tmp_path: Path) -> None:
    """The checker can fail: one job's terminal audit row removed after the run (past the
    append-only trigger, as only a superuser could) is reported as a lost job, and as a
    gap in the company stream that had received it (an event the database lacks)."""
    deleted: list[str] = []

    async def delete_one_terminal_row(dsn: str) -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute("SET session_replication_role = replica")  # skip the trigger
            cur = await conn.execute(
                "DELETE FROM pgjobs.job_events WHERE id = (SELECT min(id)"
                " FROM pgjobs.job_events WHERE type = 'content_job.done') RETURNING job_id::text"
            )
            deleted.extend(str(row[0]) for row in await cur.fetchall())

    outcome = await _run(
        ChaosConfig(jobs=200, outage_seconds=0, faults=False, job_followers=2),
        tmp_path,
        after_run=delete_one_terminal_row,
    )
    assert len(deleted) == 1
    assert not outcome.ok
    assert outcome.lost == 1
    assert outcome.stream_gaps >= 1
    assert any(deleted[0] in problem for problem in outcome.problems)
