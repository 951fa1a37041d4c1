"""summary.md and the PNG plots of one run, from the scenarios' JSON results
(``python -m bench.report bench/results/<run>`` renders a finished run again).

Each scenario module may define ``markdown(result)``, ``targets(result)`` (rows of the
targets table: target, measured, met, why) and ``plot(result, out, plt)`` (returns the
PNG file names it wrote)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

TITLES = {
    "drain": "1. Drain throughput",
    "enqueue": "2. Enqueue throughput",
    "wakeup": "3. Wake-up latency (enqueue commit → handler start)",
    "gateway": "4–5. Gateway: commit → SSE client latency, POST 202 latency",
    "growth": "6. Growth: claim + complete with finished rows in the tables",
    "pglimit": "7. Physical limit: pgjobs' SQL under pgbench",
    "notify": "8. NOTIFY cost",
    "fairness": "9. Fairness between companies",
    "limits": "10. Concurrency and rate limits that do not bind",
}


def machine_md(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    pgs = m["postgres"]
    pk = ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
    return (
        f"- Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['os']}; "
        "shared with other engineers' test runs, so numbers are noisy — every figure is the "
        f"median of {meta['repeat']} run(s) with (min–max).\n"
        f"- PostgreSQL {pgs['server_version']} ({meta.get('server', 'embedded pgserver')}, "
        f"{m['connection']}), jit {pgs.get('jit', 'n/a')}, "
        f"fsync {pgs['fsync']}, synchronous_commit {pgs['synchronous_commit']}, "
        f"shared_buffers {pgs['shared_buffers']}, max_wal_size {pgs['max_wal_size']}.\n"
        f"- Python {m['python']}; {pk}.\n"
        f"- Mode: {meta['mode']}; load average at start "
        f"{', '.join(f'{x:.1f}' for x in m['load_avg_at_start'])}, at end "
        f"{', '.join(f'{x:.1f}' for x in meta.get('load_avg_at_end', []))}; "
        f"run took {meta.get('elapsed_seconds', 0) / 60:.1f} min."
    )


def write(out: Path, meta: dict[str, Any], results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections, target_rows, images = [], [], []
    for name, result in results.items():
        module = importlib.import_module(f"bench.scenarios.{name}")
        title = TITLES.get(name, name)
        if "error" in result:
            sections.append(f"## {title}\n\nFailed: `{result['error']}`")
            continue
        if result.get("skipped"):
            sections.append(f"## {title}\n\nNot run: {result['skipped']}")
            target_rows += getattr(module, "targets", lambda r: [])(result)
            continue
        sections.append(f"## {title}\n\n{module.markdown(result)}")
        target_rows += getattr(module, "targets", lambda r: [])(result)
        plot = getattr(module, "plot", None)
        if plot is not None:
            try:
                for png in plot(result, out, plt):
                    images.append(png)
                    sections[-1] += f"\n\n![{png}]({png})"
            finally:
                plt.close("all")
    head = ["# pgjobs benchmark results", "", machine_md(meta), ""]
    if target_rows:
        head += [
            "## Targets (issues 4, 16 and 18)",
            "",
            "| target | measured | met? | gap / why |",
            "| --- | --- | --- | --- |",
        ]
        for t in target_rows:
            met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
            head.append(f"| {t['target']} | {t['measured']} | {met} | {t.get('why', '')} |")
        head.append("")
    (out / "summary.md").write_text("\n".join(head) + "\n" + "\n\n".join(sections) + "\n")


def rerender(out: Path) -> None:
    """Write summary.md and the plots of a finished run again from its JSON files (after
    a change to how results are reported, never to what was measured)."""
    meta = json.loads((out / "meta.json").read_text())
    results = {name: json.loads((out / f"{name}.json").read_text()) for name in meta["scenarios"]}
    write(out, meta, results)


if __name__ == "__main__":
    import sys

    rerender(Path(sys.argv[1]))
