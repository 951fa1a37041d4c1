"""The benchmark harness runs end to end in its tiny mode and writes what it promises.

No timing is asserted: this only checks that ``python -m bench`` works and that its JSON
and markdown are well formed. Skipped unless the ``bench`` extra is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = [
    "drain", "enqueue", "wakeup", "notify", "pglimit", "growth", "gateway", "fairness", "limits",
]  # fmt: skip


def python_m(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the repository root, output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Hang guards, not timings: the run takes ~25 s alone, but CI machines are shared, and
# with two other processes busy on its two cores it took over a minute.
@pytest.mark.timeout(300)
def test_tiny_run_writes_json_summary_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = python_m(
        "bench", "--tiny", "--systems", "pgjobs", "--only", *SCENARIOS, "--out", str(out),
        timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in SCENARIOS:
        result = json.loads((out / f"{name}.json").read_text())
        assert "error" not in result, result
    meta = json.loads((out / "meta.json").read_text())
    assert meta["mode"] == "tiny"
    summary = (out / "summary.md").read_text()
    assert summary.startswith("# pgjobs benchmark results")
    assert "## 1. Drain throughput" in summary
    assert (out / "drain_throughput.png").stat().st_size > 1000
    gateway = json.loads((out / "gateway.json").read_text())
    assert "skipped" not in gateway, gateway
    for step in gateway["runs"][0]["job"]:
        assert step["opened"] == step["clients"], step
        assert step["deliveries_measured"] == step["deliveries_expected"], step
    for step in gateway["runs"][0]["spread"]:  # company streams over several companies
        assert step["opened"] == step["clients"], step
        assert step["deliveries_measured"] == step["deliveries_expected"] > 0, step
    # Reconnect storms: job streams, and resuming job and company streams (each with a
    # catch-up).
    run = gateway["runs"][0]
    storms = run["storm"] + run["job_resume_storm"] + run["company_storm"]
    assert len(storms) == 3, storms
    for step in storms:
        assert (step["opened"], step["failed"]) == (step["clients"], 0), step
    table = (out / "summary.md").read_text()
    assert "resuming job streams" in table
    assert "resuming company streams" in table
    assert all(s["statuses"] == {"202": s["posts"]} for s in gateway["runs"][0]["post"])
    assert ". Gateway: commit" in summary
    limits = json.loads((out / "limits.json").read_text())
    # One drain without limits and one with: the tiny run checks the scenario, not figures.
    assert (limits["pairs"], limits["without"]["jobs_per_s"]["n"]) == (1, 1), limits
    assert limits["with"]["jobs_per_s"]["n"] == 1, limits
    assert "| limits configured, not binding: drain ≥ 0.95\N{MULTIPLICATION SIGN} none |" in summary
    lean = json.loads((out / "pglimit.json").read_text())["lean"]
    assert lean["floor"]["jobs_per_s"]["median"] > 0, lean
    assert lean["floor-tasks"]["jobs_per_s"]["median"] > 0, lean
    # CPU is read in clock ticks (10 ms): a tiny run's 200 jobs may cost none.
    assert lean["pgjobs"]["pg_us"] >= 0, lean
    assert lean["pgjobs"]["py_us"] >= 0, lean
    assert "the least Python worker" in summary
    assert (out / "gateway_sse.png").stat().st_size > 1000
    # A finished run renders again from its JSON alone, to the same text.
    (out / "summary.md").unlink()
    rendered = python_m("bench.report", str(out), timeout=60)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    assert (out / "summary.md").read_text() == summary


@pytest.mark.timeout(120)
def test_floor_build_up_drains_every_job_in_every_model() -> None:
    """bench.floor raises unless each model drains all jobs with an audit row per
    transition and an empty queue (and the lean workers finish every job), so a clean
    exit with every row printed is the check."""
    proc = python_m("bench.floor", "--jobs", "1000", "--repeat", "1", "--python", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    # header, rule, the floor, six of pgjobs' choices added one by one, pgjobs as shipped;
    # then the least Python worker's table: header, rule, the floor's SQL (handlers
    # awaited in turn, then each in a task of its own), pgjobs'
    assert len(table) == 15, proc.stdout
    assert table[2].startswith("| the floor: "), table[2]
    assert table[2].endswith("| 100% |"), table[2]
    assert table[9].startswith("| pgjobs as shipped"), table[9]
    assert table[12].startswith("| the floor's statements |"), table[12]
    assert table[13].startswith("| the floor's statements, each handler a task"), table[13]
    assert table[14].startswith("| pgjobs' statements "), table[14]


@pytest.mark.timeout(300)
def test_stats_sql_times_both_stats_endpoints_without_a_full_scan(tmp_path: Path) -> None:
    proc = python_m(
        "bench.stats_sql", "--rows", "20000", "--recent", "1000", "--queued", "200",
        "--repeat", "1", "--out", str(tmp_path), timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "stats_sql.json").read_text())
    for endpoint in ("company", "all"):
        assert report[endpoint]["full_scans"] == [], report[endpoint]
        assert report[endpoint]["median_ms"] > 0
    assert (tmp_path / "job_stats_all_companies.plan.txt").exists()


@pytest.mark.timeout(300)
def test_dashboard_bench_watches_a_drain_in_chromium(tmp_path: Path) -> None:
    """The page stays one page of rows and reads in batches (not per job) while 1,000
    jobs are enqueued and drained."""
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("needs Debian's chromium")
    proc = python_m(
        "bench.dashboard", "--jobs", "1000", "--repeat", "1", "--out", str(tmp_path),
        timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "dashboard.json").read_text())["runs"]
    assert run["page_errors"] == []
    assert run["rows_at_end"] == 50
    assert run["requests"] < 200, run  # one per job before reads were batched


def test_bulk_enqueue_target_compares_medians_with_pgqueuer() -> None:
    from bench.scenarios import enqueue

    def rate(median: float) -> dict[str, dict[str, dict[str, float]]]:
        return {"bulk": {"jobs_per_s": {"median": median}}}

    res = {"bulk_chunk": 1000, "systems": {"pgjobs": rate(60_000), "pgqueuer": rate(50_000)}}
    (row,) = enqueue.targets(res)
    assert (row["measured"], row["met"]) == ("1.20\N{MULTIPLICATION SIGN}", True)
    res["systems"]["pgjobs"] = rate(55_000)
    (row,) = enqueue.targets(res)
    assert (row["measured"], row["met"]) == ("1.10\N{MULTIPLICATION SIGN}", False)
    del res["systems"]["pgqueuer"]
    assert enqueue.targets(res) == []
