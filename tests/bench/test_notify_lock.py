"""bench.notify_lock runs end to end at tiny sizes and reports every variant.

No timing is asserted: only that each variant committed at each client count, that the
JSON carries what the report is built from, and that every NOTIFY sent (A's packed
items, B's and D's doorbells) reached the LISTENing connection, one doorbell per commit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# A hang guard, not a timing: 8 runs of 0.5 s, each after a CHECKPOINT, plus the server's
# start; on a shared machine that can take a minute.
@pytest.mark.timeout(240)
def test_tiny_run_reports_every_variant_and_every_notify_arrives(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable, "-m", "bench.notify_lock", "--clients", "1", "2",
            "--rounds", "1", "--duration", "0.5", "--rows", "20", "--out", str(tmp_path),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=220, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "notify_lock.json").read_text())
    assert set(result["variants"]) == {"A", "B", "C", "D"}
    runs = {(r["clients"], r["variant"]): r for r in result["runs"]}
    assert set(runs) == {(c, v) for c in (1, 2) for v in "ABCD"}
    for run in runs.values():
        assert run["commits"] > 0, run
        assert run["rows_per_s"] == pytest.approx(run["commits_per_s"] * 20), run
        assert 0.0 <= run["lock_object_share"] <= 1.0, run
        assert run["notifies_received"] == run["notifies_sent"], run
    for clients in (1, 2):
        assert runs[(clients, "C")]["notifies_sent"] == 0
        assert runs[(clients, "A")]["notifies_sent"] >= runs[(clients, "A")]["commits"]
        for variant in "BD":  # one doorbell per commit, each announcing its own rows
            run = runs[(clients, variant)]
            assert run["notifies_sent"] == run["commits"] == run["doorbells_distinct"], run
    summary = {(s["clients"], s["variant"]) for s in result["summary"]}
    assert summary == set(runs)
    assert "| 2 | B: rows durable, then an async-commit doorbell |" in proc.stdout
