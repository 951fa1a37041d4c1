"""Handlers for tests that run real `pgjobs worker` processes (imported via PYTHONPATH)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from pgjobs import demo
from pgjobs.context import JobContext
from pgjobs.registry import Registry

registry = Registry()


@registry.handler("block_first")
async def block_first(ctx: JobContext) -> dict[str, Any]:
    """Attempt 1 hangs (so the test can kill its worker); later attempts finish at once."""
    if ctx.attempt == 1:
        await asyncio.to_thread(Path(ctx.input["marker"]).write_text, "started")
        await asyncio.sleep(120)
    return {"attempt": ctx.attempt}


@registry.handler("slow_first")
async def slow_first(ctx: JobContext) -> dict[str, Any]:
    """Attempt 1 takes input.seconds (the test freezes the worker meanwhile); later
    attempts finish at once."""
    if ctx.attempt == 1:
        await asyncio.to_thread(Path(ctx.input["marker"]).write_text, "started")
        await asyncio.sleep(float(ctx.input["seconds"]))
    return {"attempt": ctx.attempt}


registry.register("echo", demo.echo)
registry.register("sleep", demo.sleep, timeout=600)
