"""Medians with their range, and latency percentiles. The machine is shared and has two
cores, so single numbers would mislead: every figure is a median with min-max."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any


def summary(values: Sequence[float]) -> dict[str, Any]:
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0, "values": []}
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
        "values": vals,
    }


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def latency(values_ms: Sequence[float]) -> dict[str, Any]:
    return {
        "n": len(values_ms),
        "p50": percentile(values_ms, 50),
        "p90": percentile(values_ms, 90),
        "p99": percentile(values_ms, 99),
        "max": max(values_ms) if values_ms else None,
    }


def fmt(s: dict[str, Any] | None, unit: str = "", digits: int = 0) -> str:
    """'12,345 (11,900–12,800)' for a summary()."""
    if not s or s.get("median") is None:
        return "—"
    f = f"{{:,.{digits}f}}"
    mid = f.format(s["median"])
    if s["n"] > 1:
        return f"{mid} ({f.format(s['min'])}–{f.format(s['max'])}){unit}"
    return f"{mid}{unit}"
