"""What the PostgreSQL backends of a drain wait for: wait events sampled during it.

``python -m bench.waits [--processes 1 2] [--rounds 3] [--jobs 50000] [--interval 0.005]
[--doorbell on off]``

For each round, and within it for each process count in turn (interleaved: 1, 2, 1, 2,
...), fills a fresh database with N no-op jobs as scenario 1 does and drains it with
pgjobs' worker processes (bench.worker) while a thread on a connection of its own reads
``pg_stat_activity`` every ``--interval`` seconds: for each of the drain database's
client backends that is running a statement, its ``wait_event_type:wait_event`` (or
``CPU`` when it waits for nothing) and the statement's name (bench.pgss.label), plus
``pg_locks``' ungranted requests by lock type and mode. Prints per process count the
drain rate and CPU per job (as bench.cpusplit), median (min–max), and the share of
samples each wait event took, with the statements that waited on it. ``--doorbell on off``
runs each process count with the workers' doorbell (``PGJOBS_DOORBELL``) on and off in
turn, for an interleaved A/B; without it the workers get this process's environment.

Why: a commit that carries a NOTIFY takes a lock on the database object (PostgreSQL's
PreCommit_Notify, ``Lock:object`` while waiting) and holds it until the commit record
is flushed, so such commits flush one at a time instead of sharing a WAL flush. The
samples show how much of a drain's statements' time is that queue. A sample is a
snapshot, not a trace: counts are proportional to time spent, not to occurrences.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench import pg
from bench.context import QUICK, Ctx
from bench.cpusplit import drain_with_cpu
from bench.drain import pgjobs_batches, queue_db
from bench.stats import fmt, summary
from pgjobs.queries import QUERIES

ACTIVITY_SQL = """
    SELECT coalesce(wait_event_type || ':' || wait_event, 'CPU'), query
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
      AND backend_type = 'client backend' AND state = 'active'"""
# The drain's commits that carried NOTIFYs (each audit row is sent at its commit), by
# what they held: claims (running events), finishes (done events) or both.
COMMITS_SQL = """
    SELECT count(*) FILTER (WHERE r > 0 AND d = 0), count(*) FILTER (WHERE r = 0 AND d > 0),
           count(*) FILTER (WHERE r > 0 AND d > 0)
    FROM (SELECT xid, count(*) FILTER (WHERE type = 'content_job.running') AS r,
                 count(*) FILTER (WHERE type = 'content_job.done') AS d
          FROM pgjobs.job_events GROUP BY xid) t"""
LOCKS_SQL = """
    SELECT locktype || ' ' || mode, count(*) FROM pg_locks WHERE NOT granted GROUP BY 1"""


PREFIX = 200  # characters compared: pg_stat_activity cuts a query at 1,023 bytes


def _head(text: str) -> str:
    """A statement's first characters with parameters made uniform (psycopg sends
    %(name)s as $n and %% as %), to recognise it in pg_stat_activity."""
    return re.sub(r"%\(\w+\)[sb]|\$\d+", "?", text.replace("%%", "%"))[:PREFIX]


_HEADS = {_head(sql): name for name, sql in QUERIES.items()}


def label(query: str) -> str:
    """The name in queries.sql of a statement pg_stat_activity shows (its text is cut
    short there, and pgjobs' statements begin with their comments), else its start."""
    return _HEADS.get(_head(query)) or " ".join(query.split())[:60]


class WaitSampler(threading.Thread):
    """Samples the active backends of ``dsn``'s database every ``interval`` seconds."""

    def __init__(self, dsn: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.interval = interval
        self.samples = 0
        self.events: Counter[str] = Counter()  # backend-samples per wait event
        self.by_statement: Counter[tuple[str, str]] = Counter()  # (event, statement)
        self.locks: Counter[str] = Counter()  # ungranted lock requests per sample
        self.stop = threading.Event()
        self._labels: dict[str, str] = {}

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.wait(self.interval):
                self.samples += 1
                for event, query in conn.execute(ACTIVITY_SQL).fetchall():
                    name = self._labels.get(query)
                    if name is None:
                        name = self._labels[query] = label(query)
                    self.events[event] += 1
                    self.by_statement[(event, name)] += 1
                for lock, n in conn.execute(LOCKS_SQL).fetchall():
                    self.locks[lock] += n

    def result(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "events": dict(self.events),
            "by_statement": [[e, s, n] for (e, s), n in self.by_statement.most_common()],
            "locks": dict(self.locks),
        }


def measure(
    ctx: Ctx, jobs: int, processes: int, interval: float, doorbell: str | None = None
) -> dict[str, Any]:
    """One drain while sampling; ``doorbell`` ('on', 'off'): the workers' PGJOBS_DOORBELL
    (they inherit this process's environment), None: the environment as it is."""
    if doorbell is not None:
        os.environ["PGJOBS_DOORBELL"] = doorbell
    with queue_db(ctx, "pgjobs", jobs) as dsn:
        sampler = WaitSampler(dsn, interval)
        sampler.start()
        try:
            result = drain_with_cpu(ctx, "pgjobs", dsn, jobs, processes)
        finally:
            sampler.stop.set()
            sampler.join()
        return {
            **result,
            "processes": processes,
            "doorbell": doorbell,
            "waits": sampler.result(),
            "batches": pgjobs_batches(dsn),
            "commits": commits(dsn),
        }


def commits(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        claim, finish, both = conn.execute(COMMITS_SQL).fetchone() or (0, 0, 0)
    return {"claim": claim, "finish": finish, "both": both}


def report(runs: list[dict[str, Any]], top: int = 8) -> str:
    lines: list[str] = []
    for procs, bell in sorted({(r["processes"], r.get("doorbell") or "") for r in runs}):
        mine = [r for r in runs if (r["processes"], r.get("doorbell") or "") == (procs, bell)]
        rate = summary([r["jobs_per_s"] for r in mine])
        pg_cpu = summary([r["pg_cpu_us"] for r in mine])
        worker_cpu = summary([r["worker_cpu_us"] for r in mine])
        lines.append(
            f"{procs} process(es){f', doorbell {bell}' if bell else ''}, "
            f"{mine[0]['jobs']:,} jobs, {len(mine)} drains: "
            f"{fmt(rate)} jobs/s; CPU per job PostgreSQL {fmt(pg_cpu)} µs, "
            f"workers {fmt(worker_cpu)} µs"
        )
        for kind in ("running", "done"):
            per = [r["batches"].get(kind, {}).get("mean", 0.0) for r in mine]
            commits = [r["batches"].get(kind, {}).get("commits", 0) for r in mine]
            lines.append(
                f"  {kind}: {fmt(summary(commits))} commits, {fmt(summary(per), digits=1)} "
                "jobs per commit"
            )
        kinds = {k: summary([r["commits"][k] for r in mine]) for k in ("claim", "finish", "both")}
        lines.append(
            "  commits of claims only, finishes only, both: "
            + ", ".join(fmt(kinds[k]) for k in ("claim", "finish", "both"))
        )
        events: Counter[str] = Counter()
        statements: Counter[tuple[str, str]] = Counter()
        locks: Counter[str] = Counter()
        samples = sum(r["waits"]["samples"] for r in mine)
        for r in mine:
            events.update(r["waits"]["events"])
            statements.update({(e, s): n for e, s, n in r["waits"]["by_statement"]})
            locks.update(r["waits"]["locks"])
        busy = sum(events.values())
        lines.append(
            f"  {samples:,} samples, {busy / max(1, samples):.2f} active backends per sample:"
        )
        for event, n in events.most_common(top):
            where = ", ".join(
                f"{s} {m / n:.0%}"
                for (e, s), m in statements.most_common()
                if e == event and m / n >= 0.05
            )
            lines.append(f"    {event:28} {n / busy:6.1%}  ({where})")
        if locks:
            lines.append(
                "  ungranted locks per sample: "
                + ", ".join(f"{k} {v / max(1, samples):.2f}" for k, v in locks.most_common())
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.waits", description=__doc__)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--interval", type=float, default=0.005)
    parser.add_argument("--doorbell", nargs="+", choices=("on", "off"), default=[None])
    parser.add_argument("--out", type=Path, default=Path("bench/results/waits"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with pg.server() as server_dsn:
        ctx = Ctx(server_dsn, QUICK, "waits", 1, args.out, ("pgjobs",))
        ctx.logs.mkdir(exist_ok=True)
        for _ in range(args.rounds):
            for procs in args.processes:
                for bell in args.doorbell:
                    runs.append(measure(ctx, args.jobs, procs, args.interval, bell))
                    print(
                        f"  {procs} process(es), doorbell {bell or 'default'}: "
                        f"{runs[-1]['jobs_per_s']:,.0f} jobs/s",
                        flush=True,
                    )
    text = report(runs)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (args.out / f"waits-{stamp}.md").write_text(text + "\n")
    (args.out / f"waits-{stamp}.json").write_text(json.dumps(runs, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
