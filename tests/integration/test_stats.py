"""`pgjobs stats` against a database holding known jobs, failures and workers."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from helpers import ROOT, claim_one, fetch, finish_params, wait_until
from pgjobs import stats
from pgjobs.client import Client
from pgjobs.queries import QUERIES


async def _fail(dsn: str, client: Client, job_type: str, count: int) -> None:
    """``count`` jobs of ``job_type`` claimed and failed, each in its own transaction."""
    for _ in range(count):
        await client.enqueue("acme", job_type, max_attempts=1)
        claimed = await claim_one(dsn, "w")
        assert await fetch(
            dsn, QUERIES["job_finish_many_if_leased"], finish_params(claimed, "fail")
        )


async def test_failures_are_counted_within_the_window_only(dsn: str) -> None:
    """With failures on both sides of the window's start, only those after it count."""
    client = await Client.connect(dsn, max_size=2)
    try:
        await _fail(dsn, client, "mail", 5)
        for _ in range(40):  # other events in between
            await client.enqueue(
                "acme", "other", run_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
            )
        (row,) = await fetch(dsn, "SELECT clock_timestamp() AS t")
        start = row["t"]  # after every event so far committed
        await _fail(dsn, client, "mail", 3)
        await _fail(dsn, client, "render", 2)
    finally:
        await client.close()

    async def failed(now: dt.datetime | None) -> dict[str, int]:
        rows = await fetch(
            dsn,
            QUERIES["job_events_failed_since_by_type"],
            {"now": now, "window_seconds": 3600.0},
        )
        return {r["job_type"]: r["failed"] for r in rows}

    assert await failed(None) == {"mail": 8, "render": 2}
    assert await failed(start + dt.timedelta(hours=1)) == {"mail": 3, "render": 2}
    assert await failed(start + dt.timedelta(hours=3)) == {}
    assert await failed(start - dt.timedelta(hours=2)) == {}


async def test_failures_in_an_empty_audit_log(dsn: str) -> None:
    rows = await fetch(
        dsn, QUERIES["job_events_failed_since_by_type"], {"now": None, "window_seconds": 3600.0}
    )
    assert rows == []


async def _known_jobs(dsn: str) -> None:
    client = await Client.connect(dsn, max_size=2)
    try:
        await _fail(dsn, client, "mail", 1)
        await client.enqueue("acme", "mail")
        await claim_one(dsn, "w1")  # running
        now = dt.datetime.now(dt.UTC)
        await client.enqueue("acme", "render", run_at=now - dt.timedelta(minutes=10))
        await client.enqueue("globex", "render")
        await client.enqueue("acme", "render", run_at=now + dt.timedelta(hours=1))
    finally:
        await client.close()
    await fetch(
        dsn,
        "INSERT INTO pgjobs.workers (id, hostname, pid, job_types, concurrency,"
        " last_heartbeat_at) VALUES"
        " ('w1', 'host-a', 11, '{mail}', 4, now() - interval '30 minutes'),"
        " ('gone', 'host-b', 12, '{render}', 2, now() - interval '2 hours')",
    )


def _pgjobs(dsn: str, *args: str, **kwargs: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PGJOBS_DSN": dsn, "PGJOBS_LEASE_SECONDS": "3600"}
    return subprocess.Popen(
        [sys.executable, "-m", "pgjobs", *args], cwd=ROOT, env=env, text=True, **kwargs
    )  # type: ignore[call-overload]


async def test_stats_prints_types_and_workers(dsn: str) -> None:
    await _known_jobs(dsn)
    proc = _pgjobs(dsn, "stats", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    # job type, queued, scheduled, running, failed 1h, oldest queued, live workers
    assert rows["render"][1:5] == ["2", "1", "0", "0"]
    # Ages by the clock: bounds wide enough for a slow machine.
    assert re.fullmatch(r"1\dm\d\ds", rows["render"][5]), rows["render"]
    # Live: a heartbeat within PGJOBS_LEASE_SECONDS (an hour here).
    assert rows["render"][6] == "0"  # its only worker stopped heartbeating 2 hours ago
    assert rows["mail"][1:] == ["0", "0", "1", "1", "-", "1"]
    # worker, host, pid, concurrency, job types, last heartbeat
    assert rows["w1"][1:5] == ["host-a", "11", "4", "mail"]
    assert re.fullmatch(r"3\dm\d\ds", rows["w1"][5]), rows["w1"]
    assert re.fullmatch(r"2h0\dm", rows["gone"][5]), rows["gone"]


async def test_stats_watch_refreshes_until_ctrl_c(dsn: str, tmp_path: Path) -> None:
    await _known_jobs(dsn)
    out_path = tmp_path / "stats.out"
    with out_path.open("w") as out:
        proc = _pgjobs(dsn, "stats", "--watch", "0.1", stdout=out, stderr=subprocess.STDOUT)
    try:

        async def refreshed_three_times() -> bool:
            assert proc.poll() is None, out_path.read_text()
            return out_path.read_text().count("\x1b[H\x1b[2J") >= 3

        await wait_until(refreshed_three_times, within=60, message="three refreshes")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    text = out_path.read_text()
    last = text.split("\x1b[H\x1b[2J")[-1]
    assert "render" in last
    assert "w1" in last
    assert proc.returncode == 130  # Ctrl-C, as for any interrupted command


def test_ages_read_like_a_person_would() -> None:
    assert [stats.age(s) for s in (None, 4.24, 185, 7380, 273600)] == [
        "-", "4.2s", "3m05s", "2h03m", "3d04h",
    ]  # fmt: skip
