"""No-op handlers for the four queues: each does nothing but (optionally) note when it
started, so a benchmark measures the queue, not the work."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.stamps import stamp
from pgjobs.context import JobContext
from pgjobs.registry import Registry

registry = Registry()


@registry.handler("noop")
async def noop(ctx: JobContext) -> None:
    stamp(ctx.input.get("k"))


def procrastinate_app(dsn: str, *, pool_size: int) -> Any:
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(conninfo=dsn, min_size=1, max_size=pool_size)
    )

    @app.task(name="noop")
    async def noop_task(k: object = None) -> None:
        stamp(k)

    return app


def pgqueuer_register(qm: Any) -> None:
    @qm.entrypoint("noop")
    async def noop_entry(job: Any) -> None:
        if job.payload:
            stamp(job.payload.decode())


@dataclass
class AwaNoop:
    """awa's job arguments: a dataclass, serialized to JSON by awa (k: the wake-up key)."""

    k: str | None = None


def awa_register(client: Any) -> None:
    @client.task(AwaNoop, kind="noop", queue="bench")
    async def noop_job(job: Any) -> None:
        stamp(job.args.k)
