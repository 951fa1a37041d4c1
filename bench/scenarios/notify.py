"""Scenario 8 — NOTIFY cost: pgjobs' drain (2 worker processes) and concurrent single
enqueues with its notifications as shipped (packed, a few per commit), one per
transition, and none.

A transaction that has called pg_notify takes a database-wide lock at commit
(AccessExclusiveLock on object 0 of class pg_database, held across the commit's WAL
flush), so committers that notify are serialised. The variants rewrite one expression
of ``pgjobs.publish_events`` in the benchmark's own database (the chunk each event is
packed into, or the pg_notify call); event rows and the worker are untouched."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import psycopg

from bench.context import Ctx
from bench.drain import drain, queue_db, settle
from bench.scenarios.enqueue import _measure
from bench.stats import fmt, summary

# Each variant rewrites expressions of the shipped publish trigger (sql/0010): the chunk
# every event is packed into, or the pg_notify calls themselves (pgjobs_events', and the
# workers' pgjobs_work, sent only by statements that make jobs claimable or cancel
# running ones). The chunk expression spans lines, so it is matched as a pattern.
_CHUNK = re.compile(
    r"sum\(octet_length\(item\) \+ 1\) OVER \(ORDER BY id\)\s*"
    r"/ \(7980 - max\(octet_length\(item\)\) OVER \(\)\)"
)
_NOTIFY = "pg_notify('pgjobs_events', '{\"events\":[' || string_agg(item, ',' ORDER BY id) || ']}')"
_NOTIFY_WORK = "pg_notify('pgjobs_work', '{\"work\":[' || string_agg(item, ',') || ']}')"
VARIANTS: dict[str, list[tuple[str | re.Pattern[str], str]]] = {
    "per commit (shipped)": [],
    "per transition": [(_CHUNK, "id")],
    "no worker channel": [(_NOTIFY_WORK, "NULL::void")],
    "off": [(_NOTIFY, "NULL::void"), (_NOTIFY_WORK, "NULL::void")],
}
PROCESSES = 2


def _apply(dsn: str, changes: list[tuple[str | re.Pattern[str], str]]) -> None:
    if not changes:
        return
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_get_functiondef('pgjobs.publish_events'::regproc)").fetchone()
        assert row is not None
        source: str = row[0]
        for old, new in changes:
            pattern = old if isinstance(old, re.Pattern) else re.compile(re.escape(old))
            source, found = pattern.subn(new, source)
            if found != 2:  # the INSERT and the UPDATE branch
                raise RuntimeError(f"publish_events no longer contains {old!r}: update bench")
        conn.execute(source)  # type: ignore[arg-type]  # our own DDL


def run(ctx: Ctx) -> dict[str, Any]:
    if "pgjobs" not in ctx.systems:
        return {"skipped": "pgjobs not selected"}
    n = ctx.sizes.notify_jobs
    out: dict[str, Any] = {"jobs": n, "processes": PROCESSES, "variants": {}}
    for name, change in VARIANTS.items():
        drains, enq = [], []
        for _ in range(ctx.repeat):
            with queue_db(ctx, "pgjobs", 0) as dsn:
                _apply(dsn, change)
                single = ctx.sizes.enqueue_single
                enq.append(asyncio.run(_measure("pgjobs", dsn, "single_x10", single)))
            with queue_db(ctx, "pgjobs", 0) as dsn:
                _apply(dsn, change)
                asyncio.run(_fill(dsn, n))
                settle(dsn)
                drains.append(drain(ctx, "pgjobs", dsn, n, PROCESSES)["jobs_per_s"])
        out["variants"][name] = {
            "drain_jobs_per_s": summary(drains),
            "enqueue_x10_jobs_per_s": summary(enq),
        }
        ctx.log(
            f"notify {name}: drain {summary(drains)['median']:,.0f} jobs/s, "
            f"enqueue x10 {summary(enq)['median']:,.0f} jobs/s"
        )
    return out


async def _fill(dsn: str, n: int) -> None:
    from bench.drain import _fill as fill

    await fill("pgjobs", dsn, n)


def markdown(res: dict[str, Any]) -> str:
    base = res["variants"]["per commit (shipped)"]["drain_jobs_per_s"]["median"]
    lines = [
        f"pgjobs only; drain of {res['jobs']:,} jobs with {res['processes']} worker processes, "
        "and single-job enqueues from 10 concurrent producers.",
        "",
        "| notifications | drain (jobs/s) | vs shipped | enqueue, 10 producers (jobs/s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in res["variants"].items():
        rel = r["drain_jobs_per_s"]["median"] / base
        lines.append(
            f"| {name} | {fmt(r['drain_jobs_per_s'])} | {rel:.2f}× "
            f"| {fmt(r['enqueue_x10_jobs_per_s'])} |"
        )
    return "\n".join(lines)
