"""Scenario 2 — enqueue throughput: one job per transaction (one producer connection, and
10 concurrent producers), and bulk (each queue's batch API, 1,000 jobs per statement)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench import pg, systems
from bench.context import Ctx
from bench.stats import fmt, summary

BULK_CHUNK = 1_000
CONCURRENT = 10
MODES = ("single", "single_x10", "bulk")


async def _measure(system: str, dsn: str, mode: str, n: int) -> float:
    async with systems.producer(system, dsn) as prod:
        await prod.enqueue_one()  # warm the pool
        t = time.monotonic()
        if mode == "single":
            for _ in range(n):
                await prod.enqueue_one()
        elif mode == "single_x10":

            async def one_producer(count: int) -> None:
                for _ in range(count):
                    await prod.enqueue_one()

            await asyncio.gather(*(one_producer(n // CONCURRENT) for _ in range(CONCURRENT)))
        else:
            for _ in range(n // BULK_CHUNK):
                await prod.enqueue_bulk(BULK_CHUNK)
        return n / (time.monotonic() - t)


def run(ctx: Ctx) -> dict[str, Any]:
    # Rounds interleaved as the drain's are: each round measures every mode of every queue
    # once, so a drift in the shared machine's load falls on all queues alike instead of
    # on whichever ran its three measurements during it.
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(ctx.repeat):
        for system in ctx.systems:
            for mode in MODES:
                n = _jobs(ctx, mode)
                with pg.database(ctx.server_dsn, migrate=system == "pgjobs") as dsn:
                    asyncio.run(systems.install(system, dsn))
                    pg.checkpoint(dsn)
                    rate = asyncio.run(_measure(system, dsn, mode, n))
                rates.setdefault((system, mode), []).append(rate)
                ctx.log(f"enqueue {system} {mode}: {rate:,.0f} jobs/s")
    out: dict[str, Any] = {"systems": {}, "bulk_chunk": BULK_CHUNK, "concurrent": CONCURRENT}
    for system in ctx.systems:
        out["systems"][system] = {
            mode: {"jobs": _jobs(ctx, mode), "jobs_per_s": summary(rates[system, mode])}
            for mode in MODES
        }
    return out


def _jobs(ctx: Ctx, mode: str) -> int:
    if mode == "bulk":
        return max(ctx.sizes.enqueue_bulk, BULK_CHUNK)
    return ctx.sizes.enqueue_single


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| queue | single, 1 producer (jobs/s) | single, 10 producers (jobs/s) "
        f"| bulk, {res['bulk_chunk']:,} per statement (jobs/s) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for system, r in res["systems"].items():
        cells = " | ".join(fmt(r[m]["jobs_per_s"]) for m in MODES)
        lines.append(f"| {system} | {cells} |")
    lines.append(
        "\nSingle: one job per transaction, each a durable commit (fsync), so it measures "
        "commit latency; 10 producers share commits through group commit. Bulk: "
        "pgjobs `enqueue_many`, procrastinate `batch_defer_async`, pgqueuer `enqueue` "
        "with lists, awa `enqueue_many_copy` (COPY)."
    )
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    # Issue 16: enqueue_many of 1,000-job batches ≥ 1.2× pgqueuer's list enqueue.
    systems_ = res["systems"]
    if "pgjobs" not in systems_ or "pgqueuer" not in systems_:
        return []
    ratio = (
        systems_["pgjobs"]["bulk"]["jobs_per_s"]["median"]
        / systems_["pgqueuer"]["bulk"]["jobs_per_s"]["median"]
    )
    return [
        {
            "target": f"bulk enqueue ({res['bulk_chunk']:,} per call) ≥ 1.2× pgqueuer",
            "measured": f"{ratio:.2f}×",
            "met": ratio >= 1.2,
            "why": "" if ratio >= 1.2 else f"{1.2 / ratio - 1:.0%} short; see docs/benchmarks.md",
        }
    ]
