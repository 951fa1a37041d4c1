"""Scenario 7 — physical limit: the two statements a pgjobs worker runs per batch
(``job_claim_batch`` and ``job_finish_many_if_leased``, taken verbatim from
pgjobs/queries.sql) executed by pgbench with no Python in the loop, on the same queued
jobs, with the same triggers (event rows + NOTIFY); pgjobs' own drain of the same N as a
fraction of the best pgbench figure.

Each pgbench client is one loop of "claim B, then finish those B", each statement its own
commit as in pgjobs; B is the batch size pgjobs reaches in the drain (100, read from the
audit log's xids). Parameters pgjobs passes as NULL (now, job_types) are NULL here too;
the claim's RETURNING rows are folded into arrays (``\\gset``) instead of being sent to
Python, which is exactly the part the limit leaves out.

Reference rows frame it: the same statements with the publish triggers disabled (no
audit rows, no NOTIFY); the contract's floor from bench.floor (a job row, an audit row
and a NOTIFY per transition in the narrowest schema that serves pgjobs' reads); and the
least Python worker (bench.leanworker) on the floor's statements and on pgjobs', which
bounds what any Python worker could drain on each."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from bench import floor, pg
from bench.context import Ctx
from bench.drain import drain, queue_db
from bench.stats import fmt, summary

BATCH = 100
CLIENTS = (1, 2, 4)
PROCESSES = 2

CONSTANTS = {
    "now": "NULL",
    "job_types": "NULL",
    "after_company": "NULL",
    "worker_id": "'pgbench'",
    "lease_seconds": "30",
    "limit": ":batch",
    # finish: the claimed ids and tokens, every outcome 'done', everything else NULL
    "ids": ":ids",
    "lease_tokens": ":toks",
    "outcomes": "array_fill('done'::text, ARRAY[:n::int])",
    "retry_delays": "array_fill(0::float8, ARRAY[:n::int])",
}
NULL_ARRAYS = {
    "results": "jsonb",
    "errors": "text",
    "tracebacks": "text",
    "asset_ids": "uuid",
    "asset_keys": "text",
    "asset_content_types": "text",
    "asset_sizes": "bigint",
    "asset_sha256s": "text",
    "asset_filenames": "text",
}


def _bind(query: str) -> str:
    values = dict(CONSTANTS)
    for name, typ in NULL_ARRAYS.items():
        values[name] = f"array_fill(NULL::{typ}, ARRAY[:n::int])"

    def sub(m: re.Match[str]) -> str:
        return values[m.group(1)]

    body = "\n".join(line for line in query.splitlines() if not line.strip().startswith("--"))
    body = re.sub(r"%\((\w+)\)[sb]", sub, body)  # text (s) and binary (b) placeholders
    return body.replace("%%", "%")


def script() -> str:
    from pgjobs.queries import QUERIES

    claim = _bind(QUERIES["job_claim_batch"])
    # The claim ends with its claimed CTE (the UPDATE of the queue rows), the SELECT of
    # what it returns (the job rows read by key) and the refusal row: those become one
    # row of arrays for the finish, the job rows still read by key.
    head, _ = claim.split("\nSELECT j.id, j.company_id,", 1)
    claim_gset = (
        f"{head}\n"
        "SELECT coalesce(array_agg(j.id), '{}') AS ids, "
        "coalesce(array_agg(c.lease_token), '{}') AS toks, count(*) AS n "
        "FROM claimed c JOIN pgjobs.job_rows j ON j.id = c.job_id\n\\gset"
    )
    finish = _bind(QUERIES["job_finish_many_if_leased"]) + ";"
    return f"\\set batch {BATCH}\n{claim_gset}\n{finish}\n"


def pgbench(dsn: str, script_path: Path, clients: int, transactions: int) -> dict[str, Any]:
    params = conninfo_to_dict(dsn)
    cmd = [
        pg.bin_path("pgbench"),
        "-n",  # no vacuum of pgbench's own tables
        "-M", "prepared",
        "-f", str(script_path),
        "-c", str(clients),
        "-j", str(min(clients, 2)),
        "-t", str(transactions),
        "-h", str(params.get("host", "")),
        "-U", str(params.get("user", "postgres")),
        str(params["dbname"]),
    ]  # fmt: skip
    if params.get("port"):
        cmd[1:1] = ["-p", str(params["port"])]
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)  # noqa: S603
    wall = time.monotonic() - t
    if proc.returncode != 0:
        raise RuntimeError(f"pgbench failed: {proc.stderr[-2000:]}")
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", proc.stdout)
    lat = re.search(r"latency average = ([\d.]+) ms", proc.stdout)
    return {
        "wall_seconds": wall,
        "tps": float(tps.group(1)) if tps else None,
        "latency_ms": float(lat.group(1)) if lat else None,
    }


def run(ctx: Ctx) -> dict[str, Any]:
    if "pgjobs" not in ctx.systems:
        return {"skipped": "pgjobs not selected"}
    n = ctx.sizes.pglimit_jobs
    script_path = ctx.out / "pgjobs_batch.pgbench.sql"
    script_path.write_text(script())
    out: dict[str, Any] = {"jobs": n, "batch": BATCH, "script": script_path.name, "pgbench": {}}
    for clients in CLIENTS:
        rates = []
        per_client = -(-n // (BATCH * clients))
        for _ in range(ctx.repeat):
            with queue_db(ctx, "pgjobs", n) as dsn:
                r = pgbench(dsn, script_path, clients, per_client)
                from bench import systems

                done, left = systems.counts("pgjobs", dsn)
                if done != n or left:
                    raise RuntimeError(f"pgbench finished {done} of {n} jobs, {left} left")
                rates.append(n / r["wall_seconds"])
        out["pgbench"][str(clients)] = {"jobs_per_s": summary(rates)}
        ctx.log(f"pglimit pgbench -c {clients}: {summary(rates)['median']:,.0f} jobs/s")
    # The floor under the audit log: the same two statements with the claim's audit
    # trigger disabled (no claim event rows, no NOTIFY; the finish's trigger also removes
    # the queue rows, sql/0021, so it stays). Not a configuration pgjobs ships.
    rates = []
    clients = 2
    for _ in range(ctx.repeat):
        with queue_db(ctx, "pgjobs", n) as dsn:
            with psycopg.connect(dsn, autocommit=True) as conn:
                # The claim's audit trigger only (sql/0021): the finish's also removes the
                # queue rows, so its audit rows stay.
                conn.execute("ALTER TABLE pgjobs.job_queue DISABLE TRIGGER job_queue_updated")
            r = pgbench(dsn, script_path, clients, -(-n // (BATCH * clients)))
            rates.append(n / r["wall_seconds"])
    out["triggers_off"] = {"clients": clients, "jobs_per_s": summary(rates)}
    ctx.log(f"pglimit pgbench -c {clients}, triggers off: {summary(rates)['median']:,.0f} jobs/s")
    # The contract's floor (bench.floor): a job row, an audit row and a NOTIFY per
    # transition in the narrowest schema that serves pgjobs' reads. A model for scale,
    # not pgjobs; `python -m bench.floor` adds pgjobs' choices to it one at a time.
    rates = [floor.measure(ctx.server_dsn, frozenset(), n, ctx.out) for _ in range(ctx.repeat)]
    out["floor"] = {"clients": floor.CLIENTS, "jobs_per_s": summary(rates)}
    ctx.log(f"pglimit pgbench -c {floor.CLIENTS}, floor: {summary(rates)['median']:,.0f} jobs/s")
    # The least Python worker (bench.leanworker) on the floor's statements and on
    # pgjobs': how fast any Python worker could go on each, and what it spends per job.
    out["lean"] = {"processes": floor.LEAN_PROCESSES, "connections": floor.LEAN_CONNECTIONS}
    for sql in floor.LEAN_ROWS:
        runs = [floor.python_drain(ctx.server_dsn, sql, n) for _ in range(ctx.repeat)]
        out["lean"][sql] = {
            "jobs_per_s": summary([r["jobs_per_s"] for r in runs]),
            "pg_us": summary([r["pg_us"] for r in runs])["median"],
            "py_us": summary([r["py_us"] for r in runs])["median"],
        }
        ctx.log(
            f"pglimit lean worker, {sql}: {out['lean'][sql]['jobs_per_s']['median']:,.0f} jobs/s"
        )
    rates = []
    for _ in range(ctx.repeat):
        with queue_db(ctx, "pgjobs", n) as dsn:
            rates.append(drain(ctx, "pgjobs", dsn, n, PROCESSES)["jobs_per_s"])
    out["pgjobs"] = {"processes": PROCESSES, "jobs_per_s": summary(rates)}
    best = max(out["pgbench"], key=lambda c: out["pgbench"][c]["jobs_per_s"]["median"])
    out["best_clients"] = best
    out["fraction"] = (
        out["pgjobs"]["jobs_per_s"]["median"] / out["pgbench"][best]["jobs_per_s"]["median"]
    )
    ctx.log(
        f"pglimit pgjobs x{PROCESSES}: {summary(rates)['median']:,.0f} jobs/s, "
        f"{out['fraction']:.0%} of pgbench"
    )
    return out


def markdown(res: dict[str, Any]) -> str:
    lines = [
        f"{res['jobs']:,} queued jobs; pgbench runs `{res['script']}` (claim {res['batch']}, "
        "finish them, one commit each; the exact statements of pgjobs/queries.sql). "
        "Wall-clock time including pgbench's connections.",
        "",
        "| runner | jobs/s |",
        "| --- | ---: |",
    ]
    for clients, r in res["pgbench"].items():
        lines.append(f"| pgbench, {clients} client(s) | {fmt(r['jobs_per_s'])} |")
    if "triggers_off" in res:
        off = res["triggers_off"]
        lines.append(
            f"| pgbench, {off['clients']} client(s), publish triggers disabled (no event "
            f"rows, no NOTIFY: less than the contract requires, not a shipped configuration) "
            f"| {fmt(off['jobs_per_s'])} |"
        )
    if "floor" in res:
        fl = res["floor"]
        lines.append(
            f"| pgbench, {fl['clients']} client(s), the contract's floor: job row + audit row "
            "+ NOTIFY per transition in the narrowest schema (`floor.pgbench.sql`, a model "
            f"for scale, not pgjobs; see `python -m bench.floor`) | {fmt(fl['jobs_per_s'])} |"
        )
    if "lean" in res:
        lean = res["lean"]
        for sql, label in floor.LEAN_ROWS.items():
            r = lean[sql]
            lines.append(
                f"| the least Python worker (`bench.leanworker`: claim, no-op handler, "
                f"finish; {lean['processes']} processes × {lean['connections']} connections) "
                f"on {label}; CPU per job: PostgreSQL {r['pg_us']:.0f} µs, Python "
                f"{r['py_us']:.0f} µs | {fmt(r['jobs_per_s'])} |"
            )
    lines.append(
        f"| pgjobs, {res['pgjobs']['processes']} worker processes "
        f"| {fmt(res['pgjobs']['jobs_per_s'])} |"
    )
    lines.append(
        f"\npgjobs reaches **{res['fraction']:.0%}** of the best pgbench figure "
        f"({res['best_clients']} clients)."
    )
    return "\n".join(lines)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    f = res["fraction"]
    return [
        {
            "target": "drain ≥ 60% of the pgbench limit for the same SQL",
            "measured": f"{f:.0%}",
            "met": f >= 0.6,
            "why": "" if f >= 0.6 else "see docs/benchmarks.md",
        }
    ]
