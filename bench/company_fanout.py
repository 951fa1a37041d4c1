"""The company-stream step alone: 1,000 dashboards of one company, every one sees every event.

``python -m bench.company_fanout [--clients 1000 (0: none)] [--rounds 3] [--events 20] [--rate 2]
[--src DIR ...] [--job-clients N ...] [--profile]``

Step 4b of bench.scenarios.gateway (``_one_step`` with one company: one gateway process
as shipped, N clients on ``/api/companies/{c}/events`` in another process, one job
enqueued at a time at a fixed rate; latency from the producer's COMMIT returning to the
event's bytes reaching each client), run on its own so that a change to the gateway's
fan-out can be measured in a few minutes.

``--src`` names the ``src`` directories whose ``pgjobs`` the gateway process runs (its
PYTHONPATH; default: the one this module imports). With two or more, each round runs
them all, in an order that alternates from round to round, each on a fresh database and
gateway: an interleaved before/after on this shared machine. ``--job-clients`` adds the
job-stream step (4a) at those client counts to each round, to check that job streams
did not get worse. ``--profile`` runs ``py-spy record --native`` on the gateway through
each company step (connections and events; collapsed stacks under ``--out``).

Reports per variant the medians (min–max) over rounds of p50, p99, and the gateway's CPU
per delivery: its CPU time while the producer ran, divided by the deliveries the clients
received (``idle`` subtracts the CPU the open streams cost with no event, at the rate
measured just before). Writes ``company_fanout.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pgjobs
from bench import pg
from bench.context import QUICK, Ctx
from bench.http_clients import raise_nofile
from bench.scenarios.gateway import COMPANY_RATE, _one_step, gateway_process

PY_SPY = Path(sys.executable).with_name("py-spy")


def _spread(values: list[float], digits: int = 1) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


@contextmanager
def _gateway_src(src: Path) -> Iterator[None]:
    """The gateway processes started inside run ``pgjobs`` from ``src``."""
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


@contextmanager
def _profiled(pid: int, out: Path | None) -> Iterator[None]:
    """``py-spy record --native`` on ``pid`` while the block runs, if ``out`` is given:
    collapsed stacks (one line per stack and its sample count) to ``out``."""
    if out is None:
        yield
        return
    cmd = [str(PY_SPY), "record", "--native", "-r", "1000", "-p", str(pid), "-f", "raw"]
    spy = subprocess.Popen([*cmd, "-o", str(out)], stdout=subprocess.DEVNULL)  # noqa: S603
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        spy.wait(timeout=60)


def _per_delivery_us(step: dict[str, Any], idle: bool) -> float:
    """Gateway CPU per delivery while the producer ran, in microseconds."""
    cpu = step["gateway_cpu_busy"] - (step["gateway_cpu_idle"] if idle else 0.0)
    return cpu * step["busy_seconds"] / max(step["deliveries_measured"], 1) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--rate", type=float, default=COMPANY_RATE)
    default_src = Path(pgjobs.__file__).resolve().parents[1]
    parser.add_argument("--src", type=Path, nargs="+", default=[default_src])
    parser.add_argument("--job-clients", type=int, nargs="*", default=[])
    parser.add_argument("--job-events", type=int, default=300)
    parser.add_argument("--job-rate", type=float, default=50.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/company_fanout"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    srcs = [src.resolve() for src in args.src]
    steps: list[dict[str, Any]] = []
    max_streams = max([args.clients, *args.job_clients]) + 100
    with pg.server() as server:
        ctx = Ctx(server, QUICK, "company_fanout", args.rounds, args.out, ("pgjobs",))
        for r in range(args.rounds):
            for v, src in sorted(enumerate(srcs), reverse=r % 2 == 1):
                tag = f"fanout-{r}-{v}"
                with (
                    _gateway_src(src),
                    pg.database(server) as dsn,
                    gateway_process(ctx, dsn, max_streams, tag) as (pid, port),
                ):
                    if args.clients:  # 0: the job-stream steps only
                        profile = args.out / f"profile-{tag}.txt" if args.profile else None
                        with _profiled(pid, profile):
                            step = _one_step(
                                ctx, dsn, pid, port, args.clients, 1, args.events, args.rate
                            )
                        step.update(round=r, variant=v, src=str(src), kind="company")
                        steps.append(step)
                        ctx.log(
                            f"round {r} src {v} company {args.clients:,}: p50 "
                            f"{step['latency_ms']['p50']:.1f} ms, p99 "
                            f"{step['latency_ms']['p99']:.1f} ms, "
                            f"{_per_delivery_us(step, False):.1f} µs/delivery, "
                            f"{step['deliveries_measured']}/{step['deliveries_expected']}"
                        )
                    for n in args.job_clients:
                        step = _one_step(ctx, dsn, pid, port, n, 0, args.job_events, args.job_rate)
                        step.update(round=r, variant=v, src=str(src), kind="job")
                        steps.append(step)
                        ctx.log(
                            f"round {r} src {v} job {n:,}: p50 "
                            f"{step['latency_ms']['p50']:.1f} ms, p99 "
                            f"{step['latency_ms']['p99']:.1f} ms, CPU busy "
                            f"{step['gateway_cpu_busy']:.0%}, "
                            f"{step['deliveries_measured']}/{step['deliveries_expected']}"
                        )
    for step in steps:
        step.pop("samples_ms", None)
    (args.out / "company_fanout.json").write_text(json.dumps(steps, indent=1))
    print(f"{args.rounds} rounds, medians (min–max) over rounds:")
    print(
        "| step | clients | src | deliveries | p50 (ms) | p99 (ms) "
        "| gateway CPU per delivery (µs) | same, less idle (µs) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for kind, counts in (
        ("company", [args.clients] if args.clients else []),
        ("job", args.job_clients),
    ):
        for n in counts:
            for v, src in enumerate(srcs):
                mine = [s for s in steps if (s["kind"], s["clients"], s["variant"]) == (kind, n, v)]
                got = [float(s["deliveries_measured"]) for s in mine]
                expected = mine[0]["deliveries_expected"]
                print(
                    f"| {kind} | {n:,} | {src} | {statistics.median(got):.0f}/{expected} | "
                    f"{_spread([s['latency_ms']['p50'] or 0.0 for s in mine])} | "
                    f"{_spread([s['latency_ms']['p99'] or 0.0 for s in mine])} | "
                    f"{_spread([_per_delivery_us(s, False) for s in mine])} | "
                    f"{_spread([_per_delivery_us(s, True) for s in mine])} |"
                )


if __name__ == "__main__":
    main()
