"""Scenario 1 — drain throughput: bulk-enqueue N no-op jobs, drain them with 1 and 2
worker processes; jobs/s per queue and pgjobs / best peer.

Full mode first sweeps a few settings per queue (1 process, one run each) and measures
each queue with its fastest; quick mode uses the defaults in bench.systems, which are
that sweep's usual winners on this machine."""

from __future__ import annotations

from typing import Any

from bench import systems
from bench.context import Ctx
from bench.drain import drain, pgjobs_batches, queue_db
from bench.stats import fmt, summary

PROCESSES = (1, 2)
SWEEP: dict[str, tuple[systems.WorkerConfig, ...]] = {
    "pgjobs": tuple(systems.WorkerConfig(c) for c in (100, 200, 500)),
    "procrastinate": tuple(systems.WorkerConfig(c) for c in (10, 20, 50)),
    "pgqueuer": tuple(
        systems.WorkerConfig(0, b, d)
        for b, d in ((50, "asyncpg"), (100, "asyncpg"), (200, "asyncpg"), (100, "asyncpg-pool"))
    ),
    # max_workers, claim_batch_size (0: awa's default), claimers (0: awa's default)
    "awa": tuple(
        systems.WorkerConfig(c, b, claimers=k)
        for c, b, k in ((200, 0, 0), (500, 0, 0), (1000, 0, 0), (500, 0, 2), (500, 500, 0))
    ),
}


def jobs_for(ctx: Ctx, system: str) -> int:
    if system == "procrastinate":
        return ctx.sizes.drain_jobs_procrastinate
    return ctx.sizes.drain_jobs


def sweep(ctx: Ctx) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for system in ctx.systems:
        n = min(jobs_for(ctx, system), 3_000 if system == "procrastinate" else 20_000)
        rows = []
        for config in SWEEP[system]:
            with queue_db(ctx, system, n) as dsn:
                r = drain(ctx, system, dsn, n, 1, config)
            ctx.log(f"sweep {system} {config.label()}: {r['jobs_per_s']:,.0f} jobs/s")
            rows.append({"config": config.__dict__, "label": config.label(), **r})
        best = max(rows, key=lambda r: r["jobs_per_s"])
        results[system] = {"runs": rows, "best": best["config"]}
    return results


def run(ctx: Ctx) -> dict[str, Any]:
    chosen = {s: systems.WORKER_DEFAULTS[s] for s in ctx.systems}
    swept = None
    if ctx.mode == "full":
        swept = sweep(ctx)
        chosen = {s: systems.WorkerConfig(**swept[s]["best"]) for s in ctx.systems}
    out: dict[str, Any] = {"sweep": swept, "systems": {}, "ratio": {}}
    for system in ctx.systems:
        n = jobs_for(ctx, system)
        per_procs: dict[str, Any] = {}
        for procs in PROCESSES:
            rates, batches = [], None
            for i in range(ctx.repeat):
                with queue_db(ctx, system, n) as dsn:
                    r = drain(ctx, system, dsn, n, procs, chosen[system])
                    if system == "pgjobs" and i == 0:
                        batches = pgjobs_batches(dsn)
                rates.append(r["jobs_per_s"])
                ctx.log(f"drain {system} x{procs}: {r['jobs_per_s']:,.0f} jobs/s ({n:,} jobs)")
            per_procs[str(procs)] = {"jobs_per_s": summary(rates), "batches": batches}
        out["systems"][system] = {
            "jobs": n,
            "config": chosen[system].__dict__,
            "label": chosen[system].label(),
            "processes": per_procs,
        }
    peers = [s for s in ctx.systems if s != "pgjobs"]
    if "pgjobs" in ctx.systems and peers:
        for procs in map(str, PROCESSES):
            ours = out["systems"]["pgjobs"]["processes"][procs]["jobs_per_s"]["median"]
            vs = {p: out["systems"][p]["processes"][procs]["jobs_per_s"]["median"] for p in peers}
            best = max(vs, key=lambda p: vs[p])
            out["ratio"][procs] = {
                "best_peer": best,
                "vs_best_peer": ours / vs[best],
                **{f"vs_{p}": ours / v for p, v in vs.items()},
            }
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "| queue | settings | jobs | 1 process (jobs/s) | 2 processes (jobs/s) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for system, r in res["systems"].items():
        p = r["processes"]
        lines.append(
            f"| {system} | {r['label']} | {r['jobs']:,} | {fmt(p['1']['jobs_per_s'])} "
            f"| {fmt(p['2']['jobs_per_s'])} |"
        )
    for procs, ratio in res.get("ratio", {}).items():
        others = ", ".join(
            f"{k.removeprefix('vs_')} {v:.2f}×"
            for k, v in ratio.items()
            if k.startswith("vs_") and k != "vs_best_peer"
        )
        lines.append(
            f"\npgjobs / best peer ({ratio['best_peer']}) with {procs} process(es): "
            f"**{ratio['vs_best_peer']:.2f}×** ({others})."
        )
    b = res["systems"].get("pgjobs", {}).get("processes", {}).get("1", {}).get("batches")
    if b:
        lines.append(
            "\npgjobs jobs per commit (from the audit log's xids, 1 process): claim "
            f"{b['running']['mean']:.0f}, completion {b['done']['mean']:.0f}."
        )
    if res.get("sweep"):
        lines.append("\nSettings sweep (1 process, one run each, jobs/s):\n")
        for system, s in res["sweep"].items():
            runs = "; ".join(f"{r['label']}: {r['jobs_per_s']:,.0f}" for r in s["runs"])
            lines.append(f"- {system}: {runs}")
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for peer, goal in (("pgqueuer", 1.2), ("procrastinate", 20.0)):
        ratios = {
            procs: r[f"vs_{peer}"] for procs, r in res.get("ratio", {}).items() if f"vs_{peer}" in r
        }
        if not ratios:
            continue
        procs = max(ratios, key=lambda k: ratios[k])
        v = ratios[procs]
        rows.append(
            {
                "target": f"drain ≥ {goal:g}× {peer}",
                "measured": f"{v:.2f}× (best of 1 and 2 processes: {procs})",
                "met": v >= goal,
                "why": "" if v >= goal else f"short by {goal / v:.1f}×; see docs/benchmarks.md",
            }
        )
    return rows


def plot(res: dict[str, Any], out: Any, plt: Any) -> list[str]:
    fig, ax = plt.subplots(figsize=(6, 4))
    for system, r in res["systems"].items():
        xs = [int(p) for p in r["processes"]]
        med = [r["processes"][p]["jobs_per_s"]["median"] for p in r["processes"]]
        lo = [
            m - r["processes"][p]["jobs_per_s"]["min"]
            for p, m in zip(r["processes"], med, strict=True)
        ]
        hi = [
            r["processes"][p]["jobs_per_s"]["max"] - m
            for p, m in zip(r["processes"], med, strict=True)
        ]
        ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=4, label=f"{system} ({r['label']})")
    ax.set_xlabel("worker processes")
    ax.set_ylabel("jobs/s (median, min–max)")
    ax.set_xticks(list(PROCESSES))
    ax.set_title("Drain throughput, no-op jobs")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "drain_throughput.png", dpi=110)
    return ["drain_throughput.png"]
