"""Where pgjobs spends a batch, for docs/benchmarks.md: ``python -m bench.explain``.

1. EXPLAIN (ANALYZE, BUFFERS) of one claim of 100 and one completion of 100, the exact
   statements of pgjobs/queries.sql, with the publish trigger on and off (per-statement
   execution and trigger time, medians of several batches).
2. A py-spy profile of one pgjobs worker process draining N jobs: the share of its
   samples under each part of the worker (claim, Job.from_row, completer, handler...).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import pg, systems
from bench.context import QUICK, Ctx
from bench.drain import _fill, settle
from bench.procs import WorkerGroup

BATCH = 100


def _claim_params() -> dict[str, Any]:
    return {"now": None, "limit": BATCH, "worker_id": "explain", "lease_seconds": 30.0,
            "job_types": None, "after_company": None}  # fmt: skip


def _finish_params(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    return {
        "now": None, "ids": [r["id"] for r in rows],
        "lease_tokens": [r["lease_token"] for r in rows],
        "outcomes": ["done"] * n, "results": [None] * n, "errors": [None] * n, "tracebacks": None,
        "retry_delays": [0.0] * n, "asset_ids": [None] * n, "asset_keys": [None] * n,
        "asset_content_types": [None] * n, "asset_sizes": [None] * n,
        "asset_sha256s": [None] * n, "asset_filenames": [None] * n,
    }  # fmt: skip


def _timing(plan: str) -> dict[str, float]:
    out = {"execution_ms": float(re.search(r"Execution Time: ([\d.]+) ms", plan).group(1))}  # type: ignore[union-attr]
    # The audit rows' triggers (sql/0021): a claim's on the queue rows, a finish's on the
    # job rows (which also deletes the queue rows).
    trig = re.findall(r"Trigger job_(?:queue|rows)_updated: time=([\d.]+)", plan)
    out["trigger_ms"] = sum(float(t) for t in trig)
    return out


def explain(dsn: str, batches: int) -> dict[str, Any]:
    from pgjobs.queries import QUERIES

    claim, finish = QUERIES["job_claim_batch"], QUERIES["job_finish_many_if_leased"]
    result: dict[str, Any] = {}
    plans: dict[str, str] = {}
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        for trigger in ("on", "off"):
            if trigger == "off":
                conn.execute("ALTER TABLE pgjobs.job_queue DISABLE TRIGGER job_queue_updated")
            c_t, f_t = [], []
            for _ in range(batches):
                rows = conn.execute(claim, _claim_params()).fetchall()
                # EXPLAIN ANALYZE the next claim in a transaction we roll back, then time
                # the completion of the rows claimed for real.
                with conn.transaction(force_rollback=True):
                    cur = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + claim, _claim_params())  # type: ignore[operator]
                    plan = "\n".join(r["QUERY PLAN"] for r in cur.fetchall())
                c_t.append(_timing(plan))
                plans[f"claim_trigger_{trigger}"] = plan
                cur = conn.execute("EXPLAIN (ANALYZE, BUFFERS) " + finish, _finish_params(rows))  # type: ignore[operator]
                plan = "\n".join(r["QUERY PLAN"] for r in cur.fetchall())
                f_t.append(_timing(plan))
                plans[f"finish_trigger_{trigger}"] = plan
            conn.execute("ALTER TABLE pgjobs.job_queue ENABLE TRIGGER job_queue_updated")
            for name, ts in (("claim", c_t), ("finish", f_t)):
                result[f"{name}_trigger_{trigger}"] = {
                    k: statistics.median(t[k] for t in ts) for k in ts[0]
                }
    result["plans"] = plans
    return result


GROUPS = (
    ("claim (job_claim_batch round trip)", "_claim"),
    ("Job.from_row (row → Job)", "from_row"),
    ("completer (job_finish_many_if_leased)", "_write"),
    ("starting tasks, JobContext", "_start"),
    ("handler + attempt bookkeeping", "_attempt"),
    ("psycopg (all)", "psycopg/"),
    ("asyncio event loop (all)", "asyncio/"),
)


def profile(ctx: Ctx, dsn: str, n: int, out: Path) -> dict[str, Any]:
    spy = shutil.which("py-spy") or str(Path(__import__("sys").executable).parent / "py-spy")
    raw = out / "pyspy-pgjobs-worker.txt"
    config = systems.WORKER_DEFAULTS["pgjobs"]
    with WorkerGroup.of_queue("pgjobs", dsn, config, 1, log_dir=ctx.logs) as group:
        pid = group.procs[0].pid
        rec = subprocess.Popen(  # noqa: S603 - the venv's py-spy on our own child
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "250",
             "--nonblocking", "--output", str(raw)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(1.0)
        t0 = group.go()
        done = group.wait(600)
        rec.wait(timeout=30)
    stacks: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        stacks[stack] += int(count)
    total = sum(stacks.values()) or 1
    shares = {label: sum(c for s, c in stacks.items() if key in s) / total for label, key in GROUPS}
    idle = sum(c for s, c in stacks.items() if "select (selectors.py" in s or "epoll" in s)
    return {"jobs_per_s": n / (max(done) - t0), "samples": total, "shares": shares,
            "idle_in_select": idle / total, "raw": raw.name}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.explain")
    p.add_argument("--jobs", type=int, default=20_000)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("bench/results/explain"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with pg.server() as server:
        ctx = Ctx(server, QUICK, "explain", 1, args.out, ("pgjobs",))
        with pg.database(server) as dsn:
            asyncio.run(_fill("pgjobs", dsn, BATCH * args.batches * 4))
            settle(dsn)
            ex = explain(dsn, args.batches)
        with pg.database(server) as dsn:
            asyncio.run(_fill("pgjobs", dsn, args.jobs))
            settle(dsn)
            prof = profile(ctx, dsn, args.jobs, args.out)
    plans = ex.pop("plans")
    for name, plan in plans.items():
        (args.out / f"{name}.plan.txt").write_text(plan + "\n")
    report = {"explain_median_ms": ex, "profile": prof}
    (args.out / "explain.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
