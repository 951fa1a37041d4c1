"""The repository holds source, not outputs (benchmark results are regenerated, not committed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_no_benchmark_results_are_tracked() -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(
        [git, "ls-files", "bench/results"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert tracked == [], f"generated files are tracked: {tracked[:5]} (git rm -r --cached)"


def test_ci_checks_lint_and_types_too() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "make lint typecheck" in ci
    assert "make test" in ci
