"""Where a drain's CPU goes: PostgreSQL vs the worker processes, per job.

``python -m bench.cpusplit [--system pgjobs] [--processes 2] [--jobs 100000]``

Runs one drain (as scenario 1 does) while a thread reads ``/proc/<pid>/stat`` of the
bench server's PostgreSQL processes (its postmaster and the postmaster's children: on a
shared machine other servers' processes are named postgres too) and of the drain's
``bench.worker`` processes ten times a second (a worker's last reading before it exits is
what counts); prints the CPU seconds each side used during the drain divided by the jobs
drained. Linux only. Behind docs/benchmarks.md's "Where the drain's time goes".

The count starts at "go" (every process imported and ready, as the drain's clock does):
a worker process's start-up, ~0.2 s of CPU importing its library, is printed apart. Counted
in, it was ~2 µs per job of 100,000 for each process, which made the workers' CPU per job
look like it grew with the processes (issue 16).
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psycopg

from bench import pg, systems
from bench.context import QUICK, Ctx
from bench.drain import drain, queue_db
from bench.procs import cpu_seconds


def postmaster_of(dsn: str) -> int:
    """The pid of the postmaster serving ``dsn`` (the parent of a backend of it)."""
    with psycopg.connect(dsn) as conn:  # read while the backend lives
        return _ppid(Path(f"/proc/{conn.info.backend_pid}"))


def cpu_readings(marker: str, postmaster: int | None = None) -> dict[str, dict[int, float]]:
    """{"postgres": {pid: seconds}, "worker": {pid: seconds}} for the live processes; a
    worker is a process whose command line contains ``marker``. With ``postmaster``, only
    that server's processes count as postgres; without, every process named postgres."""
    out: dict[str, dict[int, float]] = {"postgres": {}, "worker": {}}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if marker in cmdline:
                kind = "worker"
            elif name == "postgres" and (
                postmaster is None or int(entry.name) == postmaster or _ppid(entry) == postmaster
            ):
                kind = "postgres"
            else:
                continue
            out[kind][int(entry.name)] = cpu_seconds(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return out


def _ppid(entry: Path) -> int:
    return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])


class Sampler(threading.Thread):
    """Keeps the last reading of every process seen, so that processes which exit during
    the drain (the workers, at its end) still count."""

    def __init__(self, marker: str = "bench.worker", postmaster: int | None = None) -> None:
        super().__init__(daemon=True)
        self.marker = marker
        self.postmaster = postmaster
        self.first: dict[str, dict[int, float]] = cpu_readings(marker, postmaster)
        self.last: dict[str, dict[int, float]] = {k: dict(v) for k, v in self.first.items()}
        self.stop = threading.Event()
        # CPU seconds used before from_now(), by kind.
        self.before: dict[str, float] = {"postgres": 0.0, "worker": 0.0}

    def run(self) -> None:
        while not self.stop.wait(0.1):
            for kind, pids in cpu_readings(self.marker, self.postmaster).items():
                self.last[kind].update(pids)

    def from_now(self) -> None:
        """Count from here: what the processes seen so far used before is left out (and
        kept in ``before``)."""
        now = cpu_readings(self.marker, self.postmaster)
        self.before = {k: self.used(k, now[k]) for k in now}
        for kind, pids in now.items():
            self.first[kind].update(pids)
            self.last[kind].update(pids)

    def used(self, kind: str, last: dict[int, float] | None = None) -> float:
        last = self.last[kind] if last is None else last
        return sum(t - self.first[kind].get(pid, 0.0) for pid, t in last.items())


def cpu_used(
    before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]
) -> dict[str, float]:
    """CPU seconds each side ("postgres", "worker") used between two ``cpu_readings``; a
    process new since ``before`` counts from 0."""
    return {
        side: sum(t - before[side].get(pid, 0.0) for pid, t in after[side].items())
        for side in ("postgres", "worker")
    }


def drain_with_cpu(ctx: Ctx, system: str, dsn: str, jobs: int, processes: int) -> dict[str, float]:
    """One drain (as scenario 1) while the Sampler reads the server's PostgreSQL processes
    and every worker process from "go": its result, plus CPU per job (µs) on each side,
    the cores busy, and the workers' start-up CPU before "go" (seconds per process, not
    counted in the rest). Workers are told apart by ``dsn`` on their command line: other
    drains on the same machine (other databases) run bench.worker processes too."""
    sampler = Sampler(marker=f"bench.worker {system} {dsn}", postmaster=postmaster_of(dsn))
    sampler.start()
    t = time.monotonic()
    result = drain(ctx, system, dsn, jobs, processes, before_go=sampler.from_now)
    wall = time.monotonic() - t
    sampler.stop.set()
    sampler.join()
    pg_s, worker_s = sampler.used("postgres"), sampler.used("worker")
    return {
        **result,
        "pg_cpu_us": pg_s / jobs * 1e6,
        "worker_cpu_us": worker_s / jobs * 1e6,
        "cores_busy": (pg_s + worker_s) / wall,
        "worker_startup_s": sampler.before["worker"] / processes,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.cpusplit")
    p.add_argument("--system", default="pgjobs", choices=sorted(systems.WORKER_DEFAULTS))
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--out", type=Path, default=Path("bench/results/cpusplit"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with pg.server() as server_dsn:
        ctx = Ctx(server_dsn, QUICK, "cpusplit", 1, args.out, (args.system,))
        ctx.logs.mkdir(exist_ok=True)
        with queue_db(ctx, args.system, args.jobs) as dsn:
            r = drain_with_cpu(ctx, args.system, dsn, args.jobs, args.processes)
    print(
        f"{args.system}, {args.processes} process(es), {args.jobs:,} jobs: "
        f"{r['jobs_per_s']:,.0f} jobs/s; CPU per job: PostgreSQL {r['pg_cpu_us']:.0f} µs, "
        f"workers {r['worker_cpu_us']:.0f} µs; cores busy {r['cores_busy']:.2f} (includes "
        f"the workers' connecting and the queue checks; not their start-up before go, "
        f"{r['worker_startup_s']:.2f} s of CPU per process)"
    )


if __name__ == "__main__":
    main()
