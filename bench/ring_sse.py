"""Job-stream SSE latency with the producer's transitions in NOTIFY items against rings.

``python -m bench.ring_sse [--clients 1000 10000] [--rounds 3] [--events 300] [--rate 50]``

Scenario 4a of bench.scenarios.gateway (one gateway process as shipped, N clients each on
its own running job's stream, a producer committing progress transitions one per
transaction at a fixed rate on jobs in random order; latency from the producer's COMMIT
returning to the event's bytes reaching its client), in two variants:

- **items**: the producer's statements send their NOTIFY items in the commit (psql, the
  gateway's own writes, workers that do not ring);
- **ring**: each transition committed with the doorbell on (no item) and rung after the
  commit on the same connection (``pgjobs.doorbell``), as a ringing worker writes; the
  gateway reads the rung job's event from ``pgjobs.job_events`` (its job reader) before
  it can send it, so the latency includes the ring's round trip and that read.

Each round starts a fresh database and gateway and runs every client count in both
variants, interleaved (the variants' order alternates from round to round). Reports per
client count and variant the medians (min–max) over rounds of p50 and p99, and the
gateway's CPU while the producer runs (share of a core, and per event). Writes
``ring_sse.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from bench import pg
from bench.context import QUICK, Ctx
from bench.http_clients import raise_nofile
from bench.scenarios.gateway import _one_step, gateway_process


def _spread(values: list[float], digits: int = 1) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"{mid:.{digits}f} ({low:.{digits}f}–{high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument(
        "--variants", nargs="+", choices=("items", "ring"), default=["items", "ring"]
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/ring_sse"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    raise_nofile()
    steps: list[dict[str, Any]] = []
    with pg.server() as server:
        ctx = Ctx(server, QUICK, "ring_sse", args.rounds, args.out, ("pgjobs",))
        for r in range(args.rounds):
            variants = args.variants if r % 2 == 0 else args.variants[::-1]
            with (
                pg.database(server) as dsn,
                gateway_process(ctx, dsn, max(args.clients) + 100, f"ring-{r}") as (pid, port),
            ):
                for n in args.clients:
                    for variant in variants:
                        step = _one_step(
                            ctx, dsn, pid, port, n, 0, args.events, args.rate,
                            ring=variant == "ring",
                        )  # fmt: skip
                        step.update(round=r, variant=variant)
                        step.pop("samples_ms", None)
                        steps.append(step)
                        ctx.log(
                            f"round {r} {variant:5} {n:,} clients: p50 "
                            f"{step['latency_ms']['p50']:.1f} ms, p99 "
                            f"{step['latency_ms']['p99']:.1f} ms, gateway CPU busy "
                            f"{step['gateway_cpu_busy']:.0%}, "
                            f"{step['deliveries_measured']}/{step['deliveries_expected']}"
                        )
    (args.out / "ring_sse.json").write_text(json.dumps(steps, indent=1))
    print(
        f"job streams, {args.events} progress transitions at {args.rate:g}/s, "
        f"{args.rounds} rounds, medians (min–max):"
    )
    print(
        "| clients | producer | events received | p50 (ms) | p99 (ms) "
        "| gateway CPU busy (core) | gateway CPU per event (ms) |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.clients:
        for variant in args.variants:
            mine = [s for s in steps if s["clients"] == n and s["variant"] == variant]
            got = [float(s["deliveries_measured"]) for s in mine]
            p50 = [s["latency_ms"]["p50"] or 0.0 for s in mine]
            p99 = [s["latency_ms"]["p99"] or 0.0 for s in mine]
            busy = [s["gateway_cpu_busy"] for s in mine]
            per_event = [b / args.rate * 1000 for b in busy]
            print(
                f"| {n:,} | {variant} | {statistics.median(got):.0f}/{args.events} | "
                f"{_spread(p50)} | {_spread(p99)} | {_spread(busy, 2)} | "
                f"{_spread(per_event, 2)} |"
            )


if __name__ == "__main__":
    main()
