"""A doorbell NOTIFY apart from the durable commit: what the NOTIFY lock costs commits.

``python -m bench.notify_lock [--clients 1 2 4 8] [--rounds 3] [--duration 5] [--rows 100]``

Why: a commit that carries a NOTIFY takes a database-wide lock in PreCommit_Notify
(``Lock:object`` while waiting for it) and holds it until its commit record is flushed,
so such commits cannot share a WAL flush (group commit). Every pgjobs transition commit
carries one today (the publish trigger, sql/0010). This measures, outside pgjobs, what
taking the NOTIFY out of the durable commit would give.

On one fresh database of the embedded server (bench.pg: fsync and synchronous_commit on),
N client connections (threads, one connection each) loop for ``--duration`` seconds
over a transaction that inserts ``--rows`` audit-like rows (the columns and indexes of
``pgjobs.job_events``) and commits, in these variants:

- **A** (today): the rows and their NOTIFY in one durable commit, the items built and
  packed in the statement as sql/0010 does (``{"events":[...]}`` chunks under 8000
  bytes: two NOTIFYs for 100 events);
- **B** (doorbell): the rows in a durable commit without NOTIFY, then on the same
  connection a second transaction, ``set_config('synchronous_commit', 'off', true)``
  and one ``pg_notify`` of a short payload (the highest event id committed). It commits
  without waiting for its flush, so it holds the NOTIFY lock only briefly (PostgreSQL
  would not wait anyway: RecordTransactionCommit flushes only for a transaction that
  wrote WAL before its commit record, and a NOTIFY writes none; measured 0.05 ms per
  doorbell with the setting on or off; the setting states the intent); it is sent
  only after the rows it announces are durable (never ahead of the database), and losing
  it in a crash loses nothing a reader cannot find in the rows;
- **C** (floor): the rows only, no NOTIFY;
- **D** (not a design, a control): the rows and B's short NOTIFY in one durable commit,
  which holds the NOTIFY lock through the flush as A does without building A's items,
  so A − D is the items' cost and D − C the lock's.

Each statement is one round trip in autocommit mode (an implicit transaction), so B
costs exactly one round trip more per commit than the others. Variants and client counts
are interleaved within each round (the variants' order rotates from round to round),
the table is truncated and a CHECKPOINT taken before each run. Measured per run: commits
and rows per second; the share of ``Lock:object`` in the wait events of the database's
active client backends (``pg_stat_activity`` sampled every ``--interval`` seconds, as
bench.waits does; a sample is a snapshot, so shares are of time, not of occurrences);
CPU per commit of the server's processes and of this process (clients, listener and
sampler), from /proc. A connection LISTENs on both channels throughout and counts what
arrives: every NOTIFY sent must arrive (checked after each run, reported per run).

Writes ``notify_lock.json`` (every run and the summaries) under ``--out`` and prints a
markdown table of medians (min–max) per client count and variant. Linux only.
"""

# The statements are this module's own constants; nothing in them comes from input.
# ruff: noqa: S608

from __future__ import annotations

import argparse
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg

from bench import pg
from bench.cpusplit import cpu_readings, cpu_used, postmaster_of
from bench.stats import fmt, summary
from bench.waits import WaitSampler

VARIANTS = ("A", "B", "C", "D")
DESCRIPTIONS = {
    "A": "rows + NOTIFY, one durable commit (today)",
    "B": "rows durable, then an async-commit doorbell",
    "C": "rows only (floor)",
    "D": "rows + the doorbell's short NOTIFY, one durable commit",
}
EVENTS_CHANNEL = "bench_events"
DOORBELL_CHANNEL = "bench_doorbell"
MARKER = "bench.notify_lock"  # this process's command line, for its CPU

# pgjobs.job_events' columns and indexes (sql/0001, 0004), without the CHECK on type.
SCHEMA = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id uuid NOT NULL, company_id text NOT NULL, seq integer NOT NULL,
    type text NOT NULL, status text NOT NULL, attempt integer NOT NULL, worker_id text,
    payload jsonb NOT NULL DEFAULT '{}', xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (job_id, seq)
);
CREATE INDEX events_company_xid_idx ON events (company_id, xid, id);
CREATE INDEX events_ended_idx ON events (company_id, type, job_id)
    WHERE type IN ('content_job.done', 'content_job.failed', 'content_job.cancelled');
"""

_INSERT = """
    INSERT INTO events (job_id, company_id, seq, type, status, attempt, worker_id)
    SELECT gen_random_uuid(), 'company-' || mod(g, 7), 2, 'content_job.running', 'running', 1,
           %(worker)s
    FROM generate_series(1, %(rows)s) g
    RETURNING id, job_id, company_id, seq, type, status, attempt"""
# A: the items as pgjobs.notify_item builds them for a running event, packed into chunks
# of under 8000 bytes as sql/0010 does; returns how many NOTIFYs it sent.
ROWS_AND_NOTIFY = f"""
    WITH inserted AS ({_INSERT}
    ), items AS (
        SELECT id, '{{"eventId":' || id || ',"jobId":"' || job_id || '","companyId":'
                   || to_json(company_id) || ',"seq":' || seq || ',"type":"' || type
                   || '","status":"' || status || '","attempt":' || attempt || '}}' AS item
        FROM inserted
    ), chunks AS (
        SELECT id, item,
               sum(octet_length(item) + 1) OVER (ORDER BY id)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM items
    ), notified AS (
        SELECT pg_notify('{EVENTS_CHANNEL}',
                         '{{"events":[' || string_agg(item, ',' ORDER BY id) || ']}}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT count(n) FROM notified"""
# D: the rows and B's short payload in one durable commit: the NOTIFY lock held through
# the flush as in A, without building and packing A's items (tells the two costs apart).
ROWS_AND_DOORBELL = f"""
    WITH inserted AS ({_INSERT})
    SELECT pg_notify('{DOORBELL_CHANNEL}', max(id)::text) FROM inserted"""
# B and C: the same rows; returns the highest id, which B's doorbell announces.
ROWS_ONLY = f"WITH inserted AS ({_INSERT}) SELECT max(id) FROM inserted"
# B's second transaction (implicit, one statement): the setting is local to it and still
# in force when it commits, so its commit does not wait for the WAL flush.
DOORBELL = """
    SELECT set_config('synchronous_commit', 'off', true), pg_notify(%(channel)s, %(payload)s)"""


class Listener(threading.Thread):
    """LISTENs on both channels and counts what arrives, per channel."""

    def __init__(self, dsn: str) -> None:
        super().__init__(daemon=True)
        self.dsn = dsn
        self.received: Counter[str] = Counter()
        self.doorbells: set[str] = set()  # distinct payloads: each announces one commit
        self.ready = threading.Event()
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"LISTEN {EVENTS_CHANNEL}")
            conn.execute(f"LISTEN {DOORBELL_CHANNEL}")
            self.ready.set()
            while not self.stop.is_set():
                for note in conn.notifies(timeout=0.2):
                    with self._lock:
                        self.received[note.channel] += 1
                        if note.channel == DOORBELL_CHANNEL:
                            self.doorbells.add(note.payload)

    def snapshot(self) -> tuple[Counter[str], int]:
        with self._lock:
            return Counter(self.received), len(self.doorbells)

    def reset(self) -> None:
        with self._lock:
            self.received.clear()
            self.doorbells.clear()


def client(
    dsn: str,
    variant: str,
    rows: int,
    index: int,
    gates: tuple[threading.Barrier, threading.Barrier, threading.Barrier],
    duration: float,
    out: list[dict[str, Any]],
) -> None:
    """One connection's loop: commits until ``duration`` has passed since the start.
    ``gates``: start, finished, released; the connection stays open until released, so
    its backend's CPU can be read while it lives."""
    start, finished, released = gates
    commits = notifies = 0
    doorbell_s = 0.0
    params = {"worker": f"client-{index}", "rows": rows}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT 1")  # connected and warm before the clock starts
        start.wait()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            if variant == "A":
                row = conn.execute(ROWS_AND_NOTIFY, params).fetchone()
                notifies += row[0] if row else 0
            elif variant == "D":
                conn.execute(ROWS_AND_DOORBELL, params)
                notifies += 1
            else:
                row = conn.execute(ROWS_ONLY, params).fetchone()
                if variant == "B":
                    rung = time.monotonic()
                    upto = str(row[0]) if row else ""
                    conn.execute(DOORBELL, {"channel": DOORBELL_CHANNEL, "payload": upto})
                    doorbell_s += time.monotonic() - rung
                    notifies += 1
            commits += 1
        finished.wait()
        released.wait()
    out.append({"commits": commits, "notifies": notifies, "doorbell_s": doorbell_s})


def run_once(
    dsn: str,
    postmaster: int,
    listener: Listener,
    variant: str,
    clients: int,
    rows: int,
    duration: float,
    interval: float,
) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE events")
        conn.execute("CHECKPOINT")
    listener.reset()
    gates = (
        threading.Barrier(clients + 1),
        threading.Barrier(clients + 1),
        threading.Barrier(clients + 1),
    )
    results: list[dict[str, Any]] = []
    threads = [
        threading.Thread(
            target=client, args=(dsn, variant, rows, i, gates, duration, results), daemon=True
        )
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    sampler = WaitSampler(dsn, interval)
    sampler.start()
    cpu_before = cpu_readings(MARKER, postmaster)
    gates[0].wait()
    began = time.monotonic()
    gates[1].wait()
    elapsed = time.monotonic() - began
    cpu = cpu_used(cpu_before, cpu_readings(MARKER, postmaster))
    gates[2].wait()
    for t in threads:
        t.join()
    sampler.stop.set()
    sampler.join()
    commits = sum(r["commits"] for r in results)
    sent = sum(r["notifies"] for r in results)
    # Every NOTIFY sent must reach the listener: wait for the last ones (a hang guard).
    channel = EVENTS_CHANNEL if variant == "A" else DOORBELL_CHANNEL
    deadline = time.monotonic() + 60
    while True:
        received, distinct = listener.snapshot()
        if received[channel] >= sent or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    busy = sum(sampler.events.values())
    return {
        "variant": variant,
        "clients": clients,
        "rows_per_commit": rows,
        "seconds": elapsed,
        "commits": commits,
        "commits_per_s": commits / elapsed,
        "rows_per_s": commits * rows / elapsed,
        "notifies_sent": sent,
        "notifies_received": received[channel],
        "doorbells_distinct": distinct if variant in ("B", "D") else None,
        "doorbell_ms_mean": (
            1000 * sum(r["doorbell_s"] for r in results) / commits
            if variant == "B" and commits
            else None
        ),
        "lock_object_share": sampler.events["Lock:object"] / busy if busy else 0.0,
        "wait_samples": sampler.samples,
        "waits": dict(sampler.events.most_common()),
        "pg_cpu_us_per_commit": 1e6 * cpu["postgres"] / commits if commits else None,
        "client_cpu_us_per_commit": 1e6 * cpu["worker"] / commits if commits else None,
    }


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for clients in sorted({r["clients"] for r in runs}):
        for variant in VARIANTS:
            mine = [r for r in runs if r["clients"] == clients and r["variant"] == variant]
            if not mine:
                continue
            rows.append(
                {
                    "clients": clients,
                    "variant": variant,
                    "runs": len(mine),
                    **{
                        key: summary([r[key] for r in mine])
                        for key in (
                            "commits_per_s",
                            "rows_per_s",
                            "pg_cpu_us_per_commit",
                            "client_cpu_us_per_commit",
                        )
                    },
                    "lock_object_pct": summary([100 * r["lock_object_share"] for r in mine]),
                    "all_notifies_arrived": all(
                        r["notifies_received"] == r["notifies_sent"] for r in mine
                    ),
                    "notifies_sent": sum(r["notifies_sent"] for r in mine),
                    "notifies_received": sum(r["notifies_received"] for r in mine),
                }
            )
    return rows


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| clients | variant | commits/s | rows/s | Lock:object share | PG CPU µs/commit "
        "| client CPU µs/commit | NOTIFYs sent = received |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in rows:
        lines.append(
            f"| {s['clients']} | {s['variant']}: {DESCRIPTIONS[s['variant']]} "
            f"| {fmt(s['commits_per_s'])} | {fmt(s['rows_per_s'])} "
            f"| {fmt(s['lock_object_pct'], '%')} "
            f"| {fmt(s['pg_cpu_us_per_commit'])} | {fmt(s['client_cpu_us_per_commit'])} "
            f"| {'yes' if s['all_notifies_arrived'] else 'NO'} "
            f"({s['notifies_sent']:,} / {s['notifies_received']:,}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.notify_lock", description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument("--rows", type=int, default=100, help="rows per commit")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--interval", type=float, default=0.005, help="wait sampling, s")
    parser.add_argument("--out", type=Path, default=Path("bench/results/notify_lock"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with pg.server() as server_dsn, pg.database(server_dsn, migrate=False) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(SCHEMA)
        meta = pg.machine(dsn)
        postmaster = postmaster_of(dsn)
        listener = Listener(dsn)
        listener.start()
        listener.ready.wait(30)
        try:
            for round_no in range(args.rounds):
                for clients in args.clients:
                    # Rotate the variants' order so none always runs first after a
                    # checkpoint or right after another's load.
                    turn = round_no % len(args.variants)
                    order = args.variants[turn:] + args.variants[:turn]
                    for variant in order:
                        run = run_once(
                            dsn, postmaster, listener, variant, clients, args.rows,
                            args.duration, args.interval,
                        )  # fmt: skip
                        run["round"] = round_no
                        runs.append(run)
                        print(
                            f"round {round_no} clients {clients} {variant}: "
                            f"{run['commits_per_s']:,.0f} commits/s, Lock:object "
                            f"{run['lock_object_share']:.0%}, NOTIFYs "
                            f"{run['notifies_sent']}/{run['notifies_received']}",
                            flush=True,
                        )
        finally:
            listener.stop.set()
            listener.join(5)
    rows = summarise(runs)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": meta,
        "variants": DESCRIPTIONS,
        "summary": rows,
        "runs": runs,
    }
    (args.out / "notify_lock.json").write_text(json.dumps(result, indent=2))
    print(report(rows))


if __name__ == "__main__":
    main()
