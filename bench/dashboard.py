"""The dashboard open during a drain, for docs/benchmarks.md: ``python -m bench.dashboard``.

A gateway process (as shipped), the page in Chromium (Playwright, /usr/bin/chromium)
signed in with the company's API token, then, with the page open: ``--jobs`` no-op jobs
enqueued (in bulk, 10,000 a statement) and drained by one pgjobs worker process. Until
the page's overview has counted every job done, the page records its main-thread long
tasks (PerformanceObserver 'longtask': tasks over 50 ms) and its job table's renders (one
MutationObserver callback per render), the benchmark samples the JS heap every second
(CDP Performance.getMetrics, JSHeapUsedSize) and counts the page's requests. Reported:
long tasks (count, total and longest), renders per second (the page coalesces renders to
at most one every 100 ms), heap (start, peak, end), requests, rows in the table at the
end, and the drain's rate. ``--repeat`` runs, each in a new database; medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from bench import pg, systems
from bench.context import QUICK, Ctx
from bench.drain import _fill
from bench.procs import WorkerGroup
from bench.scenarios.gateway import _api_token, gateway_process

CHROMIUM = "/usr/bin/chromium"

# Installed before the page's own script runs: what the page does, seen from outside it.
OBSERVE = """
window.bench = {longTasks: [], renders: []};
new PerformanceObserver((list) => {
  for (const e of list.getEntries()) window.bench.longTasks.push([e.startTime, e.duration]);
}).observe({type: 'longtask', buffered: true});
document.addEventListener('DOMContentLoaded', () => {
  new MutationObserver(() => window.bench.renders.push(performance.now()))
    .observe(document.getElementById('job-rows'), {childList: true});
});
"""

DONE_CELL = "#overview-rows tr[data-job-type=noop] td.done"


async def one_run(ctx: Ctx, server: str, n: int, out: Path) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    with pg.database(server) as dsn, gateway_process(ctx, dsn, 100, "dashboard") as (_, port):
        await systems.install("pgjobs", dsn)
        token = await _api_token(dsn)
        url = f"http://127.0.0.1:{port}"
        async with async_playwright() as p:
            browser = await p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                      "--enable-precise-memory-info"],
            )  # fmt: skip
            try:
                page = await browser.new_page(viewport={"width": 1400, "height": 900})
                await page.add_init_script(OBSERVE)
                requests: list[str] = []
                page.on("request", lambda r: requests.append(r.url))
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                await page.goto(url + "/")
                await page.get_by_label("API token").fill(token)
                await page.get_by_role("button", name="Sign in").click()
                await page.locator("#live[data-state=live]").wait_for(timeout=30_000)
                cdp = await page.context.new_cdp_session(page)
                await cdp.send("Performance.enable")

                async def heap() -> float:
                    metrics = (await cdp.send("Performance.getMetrics"))["metrics"]
                    return next(m["value"] for m in metrics if m["name"] == "JSHeapUsedSize")

                heaps = [await heap()]
                requests.clear()
                t0 = time.monotonic()
                page_t0 = await page.evaluate("performance.now()")
                await _fill("pgjobs", dsn, n)
                enqueued = time.monotonic() - t0
                config = systems.WORKER_DEFAULTS["pgjobs"]
                with WorkerGroup.of_queue("pgjobs", dsn, config, 1, log_dir=ctx.logs) as group:
                    go = group.go()
                    drained = asyncio.create_task(asyncio.to_thread(group.wait, 1800))
                    while True:
                        heaps.append(await heap())
                        shown = (
                            await page.locator(DONE_CELL).text_content()
                            if (await page.locator(DONE_CELL).count())
                            else None
                        )
                        if drained.done() and shown == str(n):
                            break
                        if time.monotonic() - t0 > 1800:
                            raise TimeoutError(f"the page shows {shown} of {n} done")
                        await asyncio.sleep(1.0)
                    finished = await drained
                seconds = time.monotonic() - t0
                page_t1 = await page.evaluate("performance.now()")
                observed = await page.evaluate("window.bench")
                rows = await page.locator("#job-rows tr").count()
                await page.screenshot(path=str(out / "dashboard-drain.png"))
            finally:
                await browser.close()
    tasks = [d for start, d in observed["longTasks"] if page_t0 <= start <= page_t1]
    renders = [t for t in observed["renders"] if page_t0 <= t <= page_t1]
    per_second: dict[int, int] = {}
    for t in renders:
        per_second[int(t // 1000)] = per_second.get(int(t // 1000), 0) + 1
    return {
        "jobs": n,
        "enqueue_s": enqueued,
        "drain_jobs_per_s": n / (max(finished) - go),
        "seconds": seconds,
        "long_tasks": len(tasks),
        "long_task_total_ms": sum(tasks),
        "long_task_max_ms": max(tasks, default=0.0),
        "renders": len(renders),
        "renders_per_s_max": max(per_second.values(), default=0),
        "renders_per_s_mean": len(renders) / ((page_t1 - page_t0) / 1000),
        "heap_mib": {
            "start": heaps[0] / 2**20,
            "peak": max(heaps) / 2**20,
            "end": heaps[-1] / 2**20,
        },
        "requests": len(requests),
        "rows_at_end": rows,
        "page_errors": errors,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard")
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/dashboard"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    with pg.server() as server:
        ctx = Ctx(server, QUICK, "dashboard", args.repeat, args.out, ("pgjobs",))
        for i in range(args.repeat):
            run = asyncio.run(one_run(ctx, server, args.jobs, args.out))
            ctx.log(f"dashboard run {i + 1}: {json.dumps(run)}")
            runs.append(run)
    keys = ("seconds", "drain_jobs_per_s", "long_tasks", "long_task_total_ms",
            "long_task_max_ms", "renders_per_s_max", "renders_per_s_mean", "requests",
            "rows_at_end")  # fmt: skip
    report: dict[str, Any] = {
        "median": {k: statistics.median(r[k] for r in runs) for k in keys},
        "heap_mib_peak_median": statistics.median(r["heap_mib"]["peak"] for r in runs),
        "runs": runs,
    }
    (args.out / "dashboard.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
