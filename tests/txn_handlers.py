"""Handlers for the transactional-completion tests that run real `pgjobs worker`
processes (imported via PYTHONPATH)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pgjobs.context import JobContext
from pgjobs.registry import Registry

registry = Registry()

INSERT_CHARGE = "INSERT INTO public.charges (job_id, attempt) VALUES (%s, %s)"


@registry.handler("charge_block_first")
async def charge_block_first(ctx: JobContext) -> None:
    """Inserts its charge and completes in one transaction. Attempt 1 hangs inside the
    block, the insert made and not committed, so the test can SIGKILL its worker there."""
    async with ctx.transaction(result={"attempt": ctx.attempt}) as conn:
        await conn.execute(INSERT_CHARGE, (ctx.job_id, ctx.attempt))
        if ctx.attempt == 1:
            await asyncio.to_thread(Path(ctx.input["marker"]).write_text, "inside")
            await asyncio.sleep(120)
