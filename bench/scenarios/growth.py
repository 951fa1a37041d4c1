"""Scenario 6 — growth: pgjobs' claim + complete throughput (a drain of a fixed number of
new jobs by 2 worker processes) with 0, 1M and 10M finished jobs and their events already
in the tables; table and index sizes after real churn; psql audit query times.

One database for the whole scenario, grown in stages. The first non-empty stage is
reached by real churn: jobs enqueued and run by pgjobs workers, so its sizes
include whatever bloat the lifecycle leaves. Later stages add finished jobs (3 events
each) with set-based SQL (bench/growth_sql.py), indexes dropped and rebuilt around the
load. Quick mode uses far smaller stages (see bench/context.py).

Each stage with finished rows is compared with drains of a fresh, empty database run side
by side with its own (one of each per round, their order alternating), not with the first
stage's: the stages are tens of minutes apart, and a host whose load changed meanwhile
moved the ratio more than the rows did (a 10M stage measured 0.67x the empty one early in
a full run and 1.15x rerun alone right after)."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import pg
from bench.context import Ctx
from bench.drain import _fill, drain, settle
from bench.growth_sql import AUDIT_HOURLY, AUDIT_TIMELINE, GENERATE, SAVED_INDEXES, SIZES
from bench.stats import fmt, summary

PROCESSES = 2
GENERATE_CHUNK = 1_000_000


def finished_rows(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pgjobs.jobs WHERE status = 'done'").fetchone()
    return int(row[0]) if row else 0


def generate(dsn: str, start: int, count: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgjobs.job_rows DISABLE TRIGGER job_rows_inserted")
        saved = conn.execute(SAVED_INDEXES).fetchall()
        for drop_sql, _ in saved:
            conn.execute(drop_sql)
        done = 0
        while done < count:
            chunk = min(GENERATE_CHUNK, count - done)
            conn.execute(GENERATE, {"start": start + done + 1, "stop": start + done + chunk})
            done += chunk
        conn.execute("SET maintenance_work_mem = '1GB'")
        for _, create_sql in saved:
            conn.execute(create_sql)
        conn.execute("ALTER TABLE pgjobs.job_rows ENABLE TRIGGER job_rows_inserted")


def sizes(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return {name: int(b) for name, _, b in conn.execute(SIZES).fetchall()}


def audit_times(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM pgjobs.job_rows TABLESAMPLE SYSTEM (1) LIMIT 20"
            ).fetchall()
        ] or [r[0] for r in conn.execute("SELECT id FROM pgjobs.jobs LIMIT 20").fetchall()]
        timeline = []
        for job_id in random.sample(ids, min(len(ids), 10)):
            t = time.monotonic()
            conn.execute(AUDIT_TIMELINE, {"job_id": job_id}).fetchall()
            timeline.append((time.monotonic() - t) * 1000)
        t = time.monotonic()
        groups = len(conn.execute(AUDIT_HOURLY).fetchall())
        hourly = (time.monotonic() - t) * 1000
    return {
        "timeline_ms": statistics.median(timeline) if timeline else None,
        "hourly_ms": hourly,
        "hourly_groups": groups,
    }


def run(ctx: Ctx) -> dict[str, Any]:
    if "pgjobs" not in ctx.systems:
        return {"skipped": "pgjobs not selected"}
    n = ctx.sizes.growth_jobs
    out: dict[str, Any] = {"jobs": n, "processes": PROCESSES, "stages": []}
    with pg.database(ctx.server_dsn) as dsn:
        have, churned = 0, False
        for target in ctx.sizes.growth_rows:
            t = time.monotonic()
            stage: dict[str, Any] = {"finished_rows": target}
            if target > have and not churned:
                real = target - have
                asyncio.run(_fill("pgjobs", dsn, real))
                r = drain(ctx, "pgjobs", dsn, real, PROCESSES, timeout=1800)
                stage["churn"] = {"jobs": real, "jobs_per_s": r["jobs_per_s"], "sizes": sizes(dsn)}
                ctx.log(f"growth: {real:,} jobs of churn at {r['jobs_per_s']:,.0f} jobs/s")
                churned = True
            elif target > have:
                generate(dsn, have, target - have)
            have = finished_rows(dsn)
            settle(dsn)
            stage["prepare_seconds"] = time.monotonic() - t
            stage["actual_finished_rows"] = have
            stage["sizes"] = sizes(dsn)
            stage["audit"] = audit_times(dsn)
            rates, empty = [], []
            for round_ in range(ctx.repeat):
                # The stage's drain and an empty database's, in turn (the stage with no
                # finished rows is its own empty one).
                for grown in (True, False) if round_ % 2 == 0 else (False, True):
                    if grown:
                        rates.append(_drain_new_jobs(ctx, dsn, n))
                    elif have:
                        empty.append(_drain_in_empty_database(ctx, n))
            have = finished_rows(dsn)
            stage["jobs_per_s"] = summary(rates)
            stage["empty_jobs_per_s"] = summary(empty or rates)
            stage["vs_empty"] = stage["jobs_per_s"]["median"] / stage["empty_jobs_per_s"]["median"]
            ctx.log(
                f"growth {target:,} finished: {stage['jobs_per_s']['median']:,.0f} jobs/s, "
                f"{stage['vs_empty']:.2f}x an empty database's, "
                f"timeline {stage['audit']['timeline_ms'] or 0:.1f} ms, "
                f"hourly {stage['audit']['hourly_ms']:.0f} ms"
            )
            out["stages"].append(stage)
    return out


def _drain_new_jobs(ctx: Ctx, dsn: str, n: int) -> float:
    """Jobs/s of PROCESSES workers draining n jobs enqueued into ``dsn`` just before."""
    asyncio.run(_fill("pgjobs", dsn, n))
    settle(dsn)
    return float(drain(ctx, "pgjobs", dsn, n, PROCESSES)["jobs_per_s"])


def _drain_in_empty_database(ctx: Ctx, n: int) -> float:
    """_drain_new_jobs in a fresh database: the empty reference for a stage."""
    with pg.database(ctx.server_dsn) as dsn:
        return _drain_new_jobs(ctx, dsn, n)


def _mib(b: int) -> str:
    return f"{b / 2**20:,.1f}"


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"Drain of {res['jobs']:,} new jobs by {res['processes']} worker processes on top of "
        "the finished rows (each with 3 events).",
        "",
        "An empty database's drains ran side by side with each stage's (one of each per "
        "round); vs empty compares their medians.",
        "",
        "| finished jobs | claim + complete (jobs/s) | empty database, side by side (jobs/s) "
        "| vs empty | one job's timeline (ms) "
        "| counts per type per hour (ms) | jobs, heap + indexes (MiB) "
        "| events, heap + indexes (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in res["stages"]:
        sz = s["sizes"]
        jobs = sum(v for k, v in sz.items() if k.startswith("jobs"))
        events = sum(v for k, v in sz.items() if k.startswith("job_events"))
        a = s["audit"]
        lines.append(
            f"| {s['actual_finished_rows']:,} | {fmt(s['jobs_per_s'])} "
            f"| {fmt(s['empty_jobs_per_s'])} | {s['vs_empty']:.2f}× "
            f"| {a['timeline_ms'] or 0:.1f} | {a['hourly_ms']:,.0f} ({a['hourly_groups']} groups) "
            f"| {_mib(jobs)} | {_mib(events)} |"
        )
    churned = [s for s in res["stages"] if "churn" in s]
    if churned:
        c = churned[0]["churn"]
        lines += [
            "",
            f"Sizes right after {c['jobs']:,} jobs of real churn "
            f"(enqueued, claimed, completed by workers at {c['jobs_per_s']:,.0f} jobs/s; "
            "before VACUUM):",
            "",
            "| relation | MiB |",
            "| --- | ---: |",
        ]
        lines += [f"| {k} | {_mib(v)} |" for k, v in c["sizes"].items()]
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    last = res["stages"][-1]
    v = last["vs_empty"]
    return [
        {
            "target": "claim+complete at 10M finished rows ≥ 0.8× empty",
            "measured": f"{v:.2f}× at {last['actual_finished_rows']:,} finished rows",
            "met": v >= 0.8,
            "why": "" if v >= 0.8 else "see docs/benchmarks.md",
        }
    ]


def plot(res: dict[str, Any], out: Path, plt: Any) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [max(s["actual_finished_rows"], 1) for s in res["stages"]]
    med = [s["jobs_per_s"]["median"] for s in res["stages"]]
    lo = [m - s["jobs_per_s"]["min"] for s, m in zip(res["stages"], med, strict=True)]
    hi = [s["jobs_per_s"]["max"] - m for s, m in zip(res["stages"], med, strict=True)]
    ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, label="pgjobs, 2 processes")
    ax.set_xscale("symlog", linthresh=1000)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("finished jobs already in the tables")
    ax.set_ylabel("claim + complete, jobs/s")
    ax.set_title("Claim cost vs table size")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "growth_claim_cost.png", dpi=110)
    return ["growth_claim_cost.png"]
