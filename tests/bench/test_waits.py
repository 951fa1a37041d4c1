"""bench.waits samples what a drain's backends wait for: the sampler sees a backend that
waits for a lock, and names pgjobs' statements as pg_stat_activity shows them."""

from __future__ import annotations

import re
import threading
import time

import psycopg
from bench.waits import WaitSampler, label

from pgjobs.queries import QUERIES


def test_statements_are_named_as_pg_stat_activity_shows_them() -> None:
    """There a statement has $n for its parameters and is cut at 1,023 bytes, which for
    pgjobs' statements is inside their leading comments."""
    counter = iter(range(1, 1000))
    sent = re.sub(r"%\(\w+\)[sb]", lambda _: f"${next(counter)}", QUERIES["job_claim_batch"])
    shown = sent.replace("%%", "%").encode()[:1023].decode(errors="ignore")
    assert label(shown) == "job_claim_batch"
    assert label("SELECT 1") == "SELECT 1"


def test_the_sampler_counts_a_backend_waiting_for_a_lock(dsn: str) -> None:
    sampler = WaitSampler(dsn, interval=0.005)
    with psycopg.connect(dsn, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(16)")
        waiter = threading.Thread(target=_wait_for_lock, args=(dsn,), daemon=True)
        waiter.start()
        sampler.start()
        try:
            deadline = time.monotonic() + 30
            while not (sampler.events["Lock:advisory"] and sampler.locks):
                assert time.monotonic() < deadline, (sampler.events, sampler.locks)
                time.sleep(0.01)
        finally:
            sampler.stop.set()
            sampler.join()
            holder.execute("SELECT pg_advisory_unlock(16)")
            waiter.join(timeout=30)
    result = sampler.result()
    assert result["locks"]["advisory ExclusiveLock"] >= 1
    assert result["by_statement"][0][:2] == ["Lock:advisory", "SELECT pg_advisory_lock(16)"]


def _wait_for_lock(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(16)")
        conn.execute("SELECT pg_advisory_unlock(16)")
