"""bench.pgss profiles a drain statement by statement with pg_stat_statements.

It needs a PostgreSQL build with contrib modules, which the embedded pgserver lacks:
skipped where none is installed (Debian's postgresql-15 happens to be on this machine
kind, so it runs here and in CI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bench_smoke import python_m

pytest.importorskip("matplotlib")

BUILDS = sorted(Path("/usr/lib/postgresql").glob("*/lib/pg_stat_statements.so"))


@pytest.mark.skipif(not BUILDS, reason="no PostgreSQL build with pg_stat_statements here")
@pytest.mark.timeout(120)
def test_a_drain_profile_names_pgjobs_statements_and_their_triggers(tmp_path: Path) -> None:
    bin_dir = BUILDS[-1].parents[1] / "bin"
    proc = python_m(
        "bench.pgss", "--pg-bin", str(bin_dir), "--jobs", "600", "--repeat", "1",
        "--out", str(tmp_path), timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("pgss-*.json")
    (res,) = json.loads(result.read_text())
    calls = {s["name"]: s["calls"] for s in res["statements"] if s["toplevel"]}
    # 600 jobs: claimed in batches of up to 200 (pgjobs.worker.MAX_CLAIM_BATCH), finished
    # in batches.
    assert calls["job_claim_batch"] >= 3, calls
    assert calls["job_finish_many_if_leased"] >= 1, calls
    nested = {s["name"].split("(")[0] for s in res["statements"] if not s["toplevel"]}
    assert {"job_queue_updated", "job_rows_updated"} <= nested, nested  # sql/0021
    assert "| top | `job_claim_batch` |" in proc.stdout
