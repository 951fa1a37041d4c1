"""Scenarios 4 and 5 — commit → SSE client latency at 1/100/1,000/10,000 clients on one
gateway process, gateway memory, POST 202 latency under concurrent submissions.

Not implemented yet: the gateway (src/pgjobs/gateway) was still landing while this
harness was written (its SSE routes arrived mid-way, docs/gateway.md not yet). The
scenario reports itself as not run, so the summary and the targets table say so."""

from __future__ import annotations

from typing import Any

from bench.context import Ctx

REASON = (
    "not implemented yet — the gateway's SSE routes landed while the harness was being "
    "built and docs/gateway.md is not committed; see docs/benchmarks.md, 'Not done'"
)


def run(ctx: Ctx) -> dict[str, Any]:
    return {"skipped": REASON}


def markdown(res: dict[str, Any]) -> str:
    return res["skipped"]


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"target": t, "measured": "—", "met": None, "why": "scenario not implemented yet"}
        for t in (
            "SSE commit → client p99 < 50 ms at 1,000 clients",
            "SSE commit → client p99 < 50 ms at 10,000 clients, one process",
            "POST 202 p99 < 200 ms",
        )
    ]
