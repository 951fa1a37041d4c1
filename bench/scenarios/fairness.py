"""Scenario 9 — fairness between companies (issue 16), pgjobs only (the peers have no
notion of a tenant).

First job behind a backlog: company a bulk-enqueues N no-op jobs, one worker process
(the drain scenario's settings) starts draining them, and company b enqueues one job at
a time, 20–50 ms apart; from each b job's commit (the enqueue call returning) to its
handler's first line, as in the wake-up scenario. a's backlog must still be there when
b's last job commits (reported). Without the fair claim b's jobs wait for a's backlog.

Skewed backlogs: ten companies with backlogs in the ratio 1000 : 1000 : 1000 : 10 : 10 :
10 : 1 : 1 : 1 : 1 (the largest enqueued first, so oldest), one worker process. Each
company's share of the jobs started while every company still had work: in the claims
(one transaction each in the audit log) before the first claim that took a company's
last job. A no-op job completes moments after it starts, so these are the shares of
completions too, without a completion batch's order to blur the window's end. The
figure is the largest deviation from an equal share.

One company: what fairness costs a queue with a single tenant. Drains of N no-op jobs of
one company with 1 and 2 worker processes, the worker's claims (fair, oldest-first while
one company has work) against the claim without fairness in every batch (bench.plain_claim:
job_claim_batch_oldest, the oldest due jobs whatever their company), interleaved (one of
each per round, their order alternating), each in a fresh database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench import pg, stamps, systems
from bench.context import Ctx
from bench.drain import STALL_SECONDS, drain, queue_db, settle
from bench.procs import WorkerGroup
from bench.stats import fmt, latency, summary

GAP_SECONDS = (0.02, 0.05)  # between b's jobs, jittered
SKEW = (1000, 1000, 1000, 10, 10, 10, 1, 1, 1, 1)
ENQUEUE_CHUNK = 10_000
WAIT_SECONDS = 300.0  # for the jobs a measurement needs; a hang guard, not a timing
ONE_COMPANY_PROCESSES = (1, 2)


async def _fill(dsn: str, backlogs: dict[str, int]) -> None:
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with await Client.connect(dsn) as client:
        for company, n in backlogs.items():
            for start in range(0, n, ENQUEUE_CHUNK):
                chunk = min(ENQUEUE_CHUNK, n - start)
                await client.enqueue_many(JobSpec(company, "noop") for _ in range(chunk))


async def _count(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> int:
    cur = await conn.execute(query, params)
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _wait_for(conn: psycopg.AsyncConnection[Any], query: str, *params: Any) -> None:
    """Poll until ``query`` counts zero."""
    deadline = time.monotonic() + WAIT_SECONDS
    while await _count(conn, query, *params):
        if time.monotonic() > deadline:
            raise TimeoutError(f"fairness: still waiting after {WAIT_SECONDS:.0f}s: {query}")
        await asyncio.sleep(0.05)


async def _produce_b(dsn: str, n: int) -> tuple[dict[str, float], int]:
    """Enqueue b's jobs one at a time; their commit times, and a's queued jobs left at
    the last one's commit."""
    from pgjobs.client import Client

    committed: dict[str, float] = {}
    async with (
        await Client.connect(dsn) as client,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        await asyncio.sleep(0.3)  # the worker is draining a's backlog by now
        for i in range(n):
            key = f"b{i}"
            await client.enqueue("b", "noop", {"k": key})
            committed[key] = time.monotonic()
            await asyncio.sleep(random.uniform(*GAP_SECONDS))
        left = await _count(
            conn, "SELECT count(*) FROM pgjobs.jobs WHERE company_id = 'a' AND status = 'queued'"
        )
        await _wait_for(
            conn, "SELECT count(*) FROM pgjobs.jobs WHERE company_id = 'b' AND status <> 'done'"
        )
    return committed, left


def first_jobs(ctx: Ctx, stamp_dir: Path) -> dict[str, Any]:
    stamp_file = stamp_dir / "pgjobs-0.json"
    stamp_file.unlink(missing_ok=True)
    with pg.database(ctx.server_dsn, migrate=True) as dsn:
        asyncio.run(_fill(dsn, {"a": ctx.sizes.fairness_backlog}))
        settle(dsn)
        config = systems.WORKER_DEFAULTS["pgjobs"]
        with WorkerGroup.of_queue(
            "pgjobs", dsn, config, 1, mode="serve", log_dir=ctx.logs, stamps_dir=stamp_dir
        ) as group:
            group.go()
            committed, left = asyncio.run(_produce_b(dsn, ctx.sizes.fairness_jobs))
            group.stop()
            group.wait(60)
    started = stamps.load(stamp_file)
    missing = set(committed) - set(started)
    if missing:
        raise RuntimeError(f"fairness: {len(missing)} of b's {len(committed)} jobs did not start")
    ms = [(started[k] - committed[k]) * 1000 for k in committed]
    return {"latency_ms": latency(ms), "samples_ms": ms, "a_backlog_left": left}


async def _starts_while_all_had_work(dsn: str, backlogs: dict[str, int]) -> dict[str, int]:
    """Jobs started per company in the claims before the first claim that took a
    company's last job (read from the audit log: one transaction per claim)."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT xid::text, company_id, count(*) FROM pgjobs.job_events "
            "WHERE type = 'content_job.running' GROUP BY 1, 2 ORDER BY min(id)"
        )
        rows = await cur.fetchall()
    claims: dict[str, dict[str, int]] = {}
    for xid, company, n in rows:
        claims.setdefault(xid, {})[company] = n
    started: Counter[str] = Counter()
    for claim in claims.values():
        after = started + Counter(claim)
        if any(after[c] >= n for c, n in backlogs.items()):
            break
        started = after
    return {c: started[c] for c in backlogs}


def skewed(ctx: Ctx) -> dict[str, Any]:
    unit = ctx.sizes.fairness_skew_unit
    backlogs = {f"c{i}": unit * size for i, size in enumerate(SKEW)}
    smallest = [c for c, n in backlogs.items() if n == unit]
    with pg.database(ctx.server_dsn, migrate=True) as dsn:
        asyncio.run(_fill(dsn, backlogs))
        settle(dsn)
        config = systems.WORKER_DEFAULTS["pgjobs"]
        with WorkerGroup.of_queue("pgjobs", dsn, config, 1, mode="serve", log_dir=ctx.logs) as g:
            g.go()

            async def smallest_done() -> None:
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    await _wait_for(
                        conn,
                        "SELECT count(*) FROM pgjobs.jobs "
                        "WHERE company_id = ANY(%s) AND status <> 'done'",
                        smallest,
                    )

            asyncio.run(smallest_done())
            g.stop()
            g.wait(60)
        shares = asyncio.run(_starts_while_all_had_work(dsn, backlogs))
    equal = sum(shares.values()) / len(shares)
    # None: the first claim already took a company's last job (tiny sizes)
    deviation = max(abs(n - equal) / equal for n in shares.values()) if equal else None
    return {"backlogs": backlogs, "shares": shares, "max_deviation": deviation}


def one_company(ctx: Ctx) -> dict[str, Any]:
    """Jobs/s of the worker's claims ("fair") and of the claim without fairness ("plain")
    draining one company's jobs, per process count (summaries), and fair / plain of their
    medians."""
    n = ctx.sizes.drain_jobs
    fair = systems.WORKER_DEFAULTS["pgjobs"]
    configs = {"fair": fair, "plain": dataclasses.replace(fair, claim="plain")}
    rates: dict[tuple[str, int], list[float]] = {}
    for round_ in range(ctx.repeat):
        for procs in ONE_COMPANY_PROCESSES:
            for claim in ("fair", "plain") if round_ % 2 == 0 else ("plain", "fair"):
                with queue_db(ctx, "pgjobs", n) as dsn:
                    r = drain(ctx, "pgjobs", dsn, n, procs, configs[claim], stall=STALL_SECONDS)
                rate = r["jobs_per_s"]
                rates.setdefault((claim, procs), []).append(rate)
                ctx.log(f"fairness one company, {claim} claim x{procs}: {rate:,.0f} jobs/s")
    out: dict[str, Any] = {"jobs": n, "processes": {}}
    for procs in ONE_COMPANY_PROCESSES:
        both = {claim: summary(rates[(claim, procs)]) for claim in configs}
        both["ratio"] = both["fair"]["median"] / both["plain"]["median"]
        out["processes"][str(procs)] = both
    return out


def run(ctx: Ctx) -> dict[str, Any]:
    if "pgjobs" not in ctx.systems:
        return {"skipped": "pgjobs is not among --systems"}
    stamp_dir = ctx.out / "stamps"
    stamp_dir.mkdir(exist_ok=True)
    first, skew = [], []
    for _ in range(ctx.repeat):
        first.append(first_jobs(ctx, stamp_dir))
        lat = first[-1]["latency_ms"]
        ctx.log(
            f"fairness b behind a's backlog: p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms "
            f"({first[-1]['a_backlog_left']:,} of a's jobs still queued at b's last commit)"
        )
        skew.append(skewed(ctx))
        ctx.log(f"fairness skewed shares: {skew[-1]['shares']}")
    return {
        "backlog": ctx.sizes.fairness_backlog,
        "b_jobs": ctx.sizes.fairness_jobs,
        "p50_ms": summary([r["latency_ms"]["p50"] for r in first]),
        "p99_ms": summary([r["latency_ms"]["p99"] for r in first]),
        "a_backlog_left": summary([r["a_backlog_left"] for r in first]),
        "max_deviation": summary([d for r in skew if (d := r["max_deviation"]) is not None]),
        "first_runs": first,
        "skew_runs": skew,
        "one_company": one_company(ctx),
    }


def markdown(res: dict[str, Any]) -> str:
    unit = res["skew_runs"][0]["backlogs"]
    sizes = " : ".join(f"{n:,}" for n in unit.values())
    dev = res["max_deviation"]
    return "\n".join(
        [
            f"One worker process. Company a bulk-enqueues {res['backlog']:,} no-op jobs; while "
            f"they drain, company b enqueues {res['b_jobs']} jobs one at a time, 20–50 ms apart "
            f"(a still had {fmt(res['a_backlog_left'])} jobs queued at b's last commit).",
            "",
            "| b's job: commit → handler start | p50 (ms) | p99 (ms) |",
            "| --- | ---: | ---: |",
            f"| pgjobs | {fmt(res['p50_ms'], digits=1)} | {fmt(res['p99_ms'], digits=1)} |",
            "",
            f"Skewed backlogs {sizes} (ten companies, largest oldest): largest deviation from "
            "an equal share of the jobs started by the claims before the first claim that took "
            f"a company's last job: {_deviation(dev)}.",
            "",
            f"One company, {res['one_company']['jobs']:,} no-op jobs: the worker's claims "
            "against the claim without fairness in every batch (job_claim_batch_oldest; "
            "interleaved, a fresh database each).",
            "",
            "| processes | the worker (jobs/s) | without fairness (jobs/s) | worker / without |",
            "| ---: | ---: | ---: | ---: |",
            *(
                f"| {procs} | {fmt(r['fair'])} | {fmt(r['plain'])} | {r['ratio']:.2f}× |"
                for procs, r in res["one_company"]["processes"].items()
            ),
        ]
    )


def _deviation(dev: dict[str, Any]) -> str:
    if dev["median"] is None:
        return "not measured (the first claim took a company's last job)"
    runs = ", ".join(f"{v:.1%}" for v in dev["values"])
    return f"**{dev['median']:.1%}** (runs: {runs})"


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    p99 = res["p99_ms"]["median"]
    dev = res["max_deviation"]["median"]
    shares = {
        "target": "skewed backlogs: completions within ±10% of equal",
        "measured": "not measured" if dev is None else f"largest deviation {dev:.1%}",
        "met": None if dev is None else dev <= 0.10,
        "why": "" if dev is None or dev <= 0.10 else "see docs/benchmarks.md",
    }
    return [
        {
            "target": "another company's job behind a backlog starts < 50 ms p99",
            "measured": f"p99 {p99:.1f} ms (p50 {res['p50_ms']['median']:.1f} ms)",
            "met": p99 < 50,
            "why": "" if p99 < 50 else "see docs/benchmarks.md",
        },
        shares,
        *(
            {
                "target": f"one company, {procs} process(es): drain with the worker's claims "
                "≥ 1.0× without fairness (same run)",
                "measured": f"{r['ratio']:.2f}× ({r['fair']['median']:,.0f} vs "
                f"{r['plain']['median']:,.0f} jobs/s{_overlap(r)})",
                "met": r["ratio"] >= 1.0,
                "why": "" if r["ratio"] >= 1.0 else "see docs/benchmarks.md",
            }
            for procs, r in res["one_company"]["processes"].items()
        ),
    ]


def _overlap(r: dict[str, Any]) -> str:
    fair, plain = r["fair"], r["plain"]
    return "; ranges overlap" if fair["max"] >= plain["min"] and plain["max"] >= fair["min"] else ""
