"""`pgjobs stats`: what the metrics say, at a glance in a terminal.

Per job type: queued (due), scheduled (not due yet, retries waiting out their delay
included), running, failed in the last hour, how long the oldest due job has waited,
and how many live workers serve the type; then every registered worker with the age of
its last heartbeat. Three reads, none of which walks the finished jobs: the queue depth
from pgjobs.job_queue (as ``pgjobs_jobs`` does), the failures from the audit log's
last hour (``job_events_failed_since_by_type``), the workers table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgjobs import db
from pgjobs.queries import QUERIES

FAILED_WINDOW_SECONDS = 3600.0


@dataclass(frozen=True, slots=True)
class Snapshot:
    taken_at: datetime
    types: list[dict[str, Any]]
    """job_type, queued, scheduled, running, failed, oldest_queued_seconds, workers."""
    workers: list[dict[str, Any]]
    """id, hostname, pid, job_types, concurrency, heartbeat_age_seconds."""


async def collect(
    conn: db.AsyncConn, *, live_within_seconds: float, now: datetime | None = None
) -> Snapshot:
    """One snapshot; a worker is live (counted for its types) if it heartbeated within
    ``live_within_seconds`` (a lease length: after that its jobs would be rescued)."""
    params = {
        "now": now,
        "window_seconds": FAILED_WINDOW_SECONDS,
        "live_seconds": live_within_seconds,
    }
    taken_at = now or datetime.now(UTC)
    depth = await (await conn.execute(QUERIES["job_queue_depth_by_type"], params)).fetchall()
    failed = await (
        await conn.execute(QUERIES["job_events_failed_since_by_type"], params)
    ).fetchall()
    workers = await (await conn.execute(QUERIES["worker_list_by_heartbeat"], params)).fetchall()
    by_type: dict[str, dict[str, Any]] = {}
    empty = {"queued": 0, "scheduled": 0, "running": 0, "failed": 0}
    for row in depth:
        by_type[row["job_type"]] = {**empty, **row}
    for row in failed:
        by_type.setdefault(row["job_type"], {**empty, "job_type": row["job_type"]})
        by_type[row["job_type"]]["failed"] = row["failed"]
    for entry in by_type.values():
        entry.setdefault("oldest_queued_seconds", None)
        entry["workers"] = sum(
            1 for w in workers if entry["job_type"] in w["job_types"] and w["live"]
        )
    return Snapshot(taken_at, [by_type[t] for t in sorted(by_type)], workers)


def age(seconds: float | None) -> str:
    """A duration as a person reads it: 4.2s, 3m05s, 2h03m, 3d04h; ``-`` for none."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


Table = Callable[[Sequence[str], Sequence[Sequence[str]]], list[str]]


def render(snapshot: Snapshot, table: Table) -> list[str]:
    """The snapshot as lines; ``table(header, rows)`` lays out columns (the CLI's)."""
    lines = [f"pgjobs stats at {snapshot.taken_at:%Y-%m-%d %H:%M:%S %Z}", ""]
    if snapshot.types:
        header = [
            "job type", "queued", "scheduled", "running", "failed 1h", "oldest queued",
            "live workers",
        ]  # fmt: skip
        rows = [
            [
                t["job_type"],
                str(t["queued"]),
                str(t["scheduled"]),
                str(t["running"]),
                str(t["failed"]),
                age(t["oldest_queued_seconds"]),
                str(t["workers"]),
            ]
            for t in snapshot.types
        ]
        lines += table(header, rows)
    else:
        lines.append("no queued or running jobs, and no failures in the last hour")
    lines.append("")
    if snapshot.workers:
        header = ["worker", "host", "pid", "concurrency", "job types", "last heartbeat"]
        rows = [
            [
                w["id"],
                w["hostname"],
                str(w["pid"]),
                str(w["concurrency"]),
                ",".join(w["job_types"]) or "-",
                f"{age(w['heartbeat_age_seconds'])} ago",
            ]
            for w in snapshot.workers
        ]
        lines += table(header, rows)
    else:
        lines.append("no workers registered")
    return lines
