"""Scenario 3 — wake-up latency: one idle worker process, one job at a time; from the
enqueue's commit (the moment the producer's call returns) to the handler's first line
(a time.monotonic() stamp in the worker process; one clock for both on Linux).

Rounds are interleaved (each round measures every queue once). A peer whose run fails
or hangs (every wait has a deadline) is reported as failed and not measured further;
the run goes on. A failure of pgjobs' own run fails the scenario."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

from bench import pg, stamps, systems
from bench.context import Ctx
from bench.procs import WorkerGroup
from bench.stats import latency, summary

GAP_SECONDS = (0.02, 0.05)  # idle time between jobs, jittered


def produce_timeout(n: int) -> float:
    """A hang guard for producing n jobs, not a timing: ~40 ms per job when all is well."""
    return 60.0 + n * 0.5


async def _produce(system: str, dsn: str, n: int) -> dict[str, float]:
    committed = {}
    async with asyncio.timeout(produce_timeout(n)), systems.producer(system, dsn) as prod:
        await asyncio.sleep(0.5)  # let the worker reach its idle wait
        for i in range(n):
            key = f"w{i}"
            await prod.enqueue_one(key)
            committed[key] = time.monotonic()
            await asyncio.sleep(random.uniform(*GAP_SECONDS))
        await asyncio.sleep(0.5)
    return committed


def measure(ctx: Ctx, system: str, n: int, stamp_dir: Path) -> list[float]:
    with pg.database(ctx.server_dsn, migrate=system == "pgjobs") as dsn:
        asyncio.run(systems.install(system, dsn))
        pg.checkpoint(dsn)
        config = systems.WORKER_DEFAULTS[system]
        with WorkerGroup.of_queue(
            system, dsn, config, 1, mode="serve", log_dir=ctx.logs, stamps_dir=stamp_dir
        ) as group:
            group.go()
            committed = asyncio.run(_produce(system, dsn, n))
            group.stop()
            group.wait(30)
        started = stamps.load(stamp_dir / f"{system}-0.json")
    missing = set(committed) - set(started)
    if missing:
        raise RuntimeError(f"{system}: {len(missing)} of {n} jobs did not start")
    return [(started[k] - committed[k]) * 1000 for k in committed]


def run(ctx: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"systems": {}, "jobs": ctx.sizes.wakeup_jobs}
    stamp_dir = ctx.out / "stamps"
    stamp_dir.mkdir(exist_ok=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in ctx.systems}
    failed: dict[str, str] = {}
    for i in range(ctx.repeat):
        for system in ctx.systems:
            if system in failed:
                continue
            try:
                ms = measure(ctx, system, ctx.sizes.wakeup_jobs, stamp_dir)
            except Exception as exc:
                if system == "pgjobs":
                    raise
                failed[system] = f"round {i + 1}: {type(exc).__name__}: {exc}"
                ctx.log(f"wakeup {system}: FAILED, not measured further: {exc}")
                continue
            runs[system].append({"latency_ms": latency(ms), "samples_ms": ms})
            ctx.log(
                f"wakeup {system}: p50 {runs[system][-1]['latency_ms']['p50']:.1f} ms, "
                f"p99 {runs[system][-1]['latency_ms']['p99']:.1f} ms"
            )
    for system in ctx.systems:
        out["systems"][system] = {
            "p50_ms": summary([r["latency_ms"]["p50"] for r in runs[system]]),
            "p99_ms": summary([r["latency_ms"]["p99"] for r in runs[system]]),
            "runs": runs[system],
            "failed": failed.get(system),
        }
    return out


def markdown(res: dict[str, Any]) -> str:
    from bench.stats import fmt

    lines = [
        f"{res['jobs']} jobs per run, one at a time, 20–50 ms apart, one idle worker process.",
        "",
        "| queue | p50 (ms) | p99 (ms) |",
        "| --- | ---: | ---: |",
    ]
    for system, r in res["systems"].items():
        lines.append(f"| {system} | {fmt(r['p50_ms'], digits=1)} | {fmt(r['p99_ms'], digits=1)} |")
    for system, r in res["systems"].items():
        if r.get("failed"):
            lines.append(f"\n{system}: failed, not measured further: `{r['failed']}`.")
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    r = res["systems"].get("pgjobs")
    if not r:
        return []
    p99 = r["p99_ms"]["median"]
    return [
        {
            "target": "wake-up p99 < 10 ms",
            "measured": f"p99 {p99:.1f} ms (p50 {r['p50_ms']['median']:.1f} ms)",
            "met": p99 < 10,
            "why": "" if p99 < 10 else "see docs/benchmarks.md",
        }
    ]


def plot(res: dict[str, Any], out: Path, plt: Any) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, r in res["systems"].items():
        samples = sorted(s for run in r["runs"] for s in run["samples_ms"])
        if not samples:
            continue
        ys = [(i + 1) / len(samples) for i in range(len(samples))]
        ax.plot(samples, ys, label=system)
    ax.set_xscale("log")
    ax.set_xlabel("enqueue commit → handler start (ms, log scale)")
    ax.set_ylabel("fraction of jobs")
    ax.set_title("Wake-up latency, idle worker (CDF, all runs)")
    ax.axvline(10, color="grey", linestyle=":", linewidth=1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "wakeup_latency.png", dpi=110)
    return ["wakeup_latency.png"]
