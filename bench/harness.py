"""``python -m bench [--quick] [--only SCENARIO ...] [--repeat N] [--out DIR] [--server-dsn DSN]``

Starts one PostgreSQL for the whole run (or uses the server ``--server-dsn`` names, as it
is configured: a packaged build with JIT, another version; a role that may create
databases), runs the scenarios in order (each in fresh databases on that server), and
writes ``bench/results/<timestamp>/``: ``<scenario>.json``,
``summary.md`` and ``*.png``. A scenario that fails is recorded as failed in the summary
and the run goes on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import pg, report
from bench.context import FULL, QUICK, TINY, Ctx
from bench.systems import SYSTEMS

# Run order; names are the --only choices and the JSON file names.
SCENARIOS = (
    "drain", "enqueue", "wakeup", "notify", "pglimit", "growth", "gateway", "fairness", "limits",
)  # fmt: skip
RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    p.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=SCENARIOS,
        metavar="SCENARIO",
        help=f"run only these scenarios ({', '.join(SCENARIOS)})",
    )
    p.add_argument("--repeat", type=int, help="runs per measurement (default 3, quick 3)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--out", type=Path, help="results directory (default results/<time>)")
    p.add_argument(
        "--server-dsn", help="an existing server instead of the embedded one (left as it is)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = {"tiny": TINY, "quick": QUICK, "full": FULL}[mode]
    repeat = args.repeat or (1 if mode == "tiny" else 3)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / f"{stamp}-{mode}"
    out.mkdir(parents=True, exist_ok=True)
    names = [s for s in SCENARIOS if not args.only or s in args.only]
    failed = []
    with pg.server(args.server_dsn) as server_dsn:
        ctx = Ctx(server_dsn, sizes, mode, repeat, out, tuple(args.systems))
        meta = {
            "started_at": stamp,
            **ctx.meta(),
            "machine": pg.machine(server_dsn),
            "server": "given by --server-dsn" if args.server_dsn else "embedded pgserver",
            "scenarios": names,
        }
        ctx.log(f"{mode} run, {repeat} repeat(s), results in {out}")
        results: dict[str, Any] = {}
        for name in names:
            module = importlib.import_module(f"bench.scenarios.{name}")
            t = time.monotonic()
            ctx.log(f"scenario {name} ...")
            try:
                result = module.run(ctx)
            except Exception as exc:
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"}
                failed.append(name)
            result["elapsed_seconds"] = time.monotonic() - t
            results[name] = result
            (out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
            ctx.log(f"scenario {name} took {result['elapsed_seconds']:.0f}s")
        meta["elapsed_seconds"] = time.monotonic() - ctx.started
        meta["load_avg_at_end"] = list(__import__("os").getloadavg())
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        report.write(out, meta, results)
    ctx.log(f"done in {meta['elapsed_seconds']:.0f}s: {out / 'summary.md'}")
    return 1 if failed else 0
