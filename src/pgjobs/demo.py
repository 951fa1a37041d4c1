"""Built-in demo handlers, used by ``make run`` and the tests.

Start a worker with them: ``pgjobs worker --handlers pgjobs.demo:registry``.

* ``echo``: returns its input.
* ``sleep``: sleeps ``input.seconds`` (default 1), reporting progress ten times.
* ``fail``: always raises (shows retries with backoff, then ``failed``).
* ``render``: draws an SVG card for ``input.title`` in a few progress steps and stores it
  as a generated asset linked to the job.
"""

from __future__ import annotations

import asyncio
import html
import time
from typing import Any

from pgjobs.assets import GeneratedAsset
from pgjobs.context import JobContext
from pgjobs.registry import Registry

registry = Registry()


@registry.handler("echo")
async def echo(ctx: JobContext) -> Any:
    return {"echo": ctx.input}


@registry.handler("sleep", timeout=3600)
async def sleep(ctx: JobContext) -> dict[str, float]:
    seconds = float(ctx.input.get("seconds", 1.0))
    for step in range(10):
        await asyncio.sleep(seconds / 10)
        await ctx.progress(
            (step + 1) / 10, f"slept {seconds * (step + 1) / 10:.1f}s of {seconds:g}s"
        )
    return {"slept": seconds}


@registry.handler("sleep_sync")
def sleep_sync(ctx: JobContext) -> dict[str, float]:
    """A blocking handler: runs in the worker's thread pool."""
    seconds = float(ctx.input.get("seconds", 0.1))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not ctx.cancelled:
        time.sleep(min(0.05, seconds))
    ctx.progress_sync(1.0, "done sleeping")
    return {"slept": seconds}


@registry.handler("fail")
async def fail(ctx: JobContext) -> None:
    raise RuntimeError(str(ctx.input.get("message", "this job always fails")))


_PALETTE = ["#4f46e5", "#0891b2", "#059669", "#d97706", "#dc2626"]


@registry.handler("render", timeout=600)
async def render(ctx: JobContext) -> GeneratedAsset:
    title = str(ctx.input.get("title", "Hello from pgjobs"))
    steps = int(ctx.input.get("steps", 4))
    delay = float(ctx.input.get("step_seconds", 0.25))
    colour = _PALETTE[sum(title.encode()) % len(_PALETTE)]
    for step in range(steps):
        await asyncio.sleep(delay)
        await ctx.progress((step + 1) / (steps + 1), f"rendering layer {step + 1} of {steps}")
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" width="640" height="320" viewBox="0 0 640 320">'
        f'<rect width="640" height="320" rx="24" fill="{colour}"/>'
        '<text x="40" y="150" font-family="sans-serif" font-size="40" fill="#fff">'
        f"{html.escape(title)}</text>"
        '<text x="40" y="210" font-family="sans-serif" font-size="20" fill="#e5e7eb">'
        f"company {html.escape(ctx.company_id)} · job {ctx.job_id}</text></svg>"
    )
    await ctx.progress(1.0, "stored")
    return GeneratedAsset(
        svg.encode(),
        filename="card.svg",
        content_type="image/svg+xml",
        result={"title": title},
    )
