"""A real gateway for the tests: uvicorn on 127.0.0.1, a free port, the test's own
database, and API tokens for two companies ("acme" and "globex")."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from helpers import wait_until
from pgjobs import db
from pgjobs.gateway import auth
from pgjobs.gateway.app import create_app
from pgjobs.gateway.settings import GatewaySettings
from pgjobs.gateway.state import GatewayState
from pgjobs.storage import LocalStorage

# Small, fast limits: tests reach every cap in milliseconds.
TEST_SETTINGS = GatewaySettings(
    ping_seconds=15.0,
    send_timeout_seconds=2.0,
    company_poll_seconds=0.5,
    listener_heartbeat_seconds=1.0,
    pool_size=4,
    pool_timeout_seconds=2.0,
)


@dataclass
class RunningGateway:
    url: str
    app: Starlette
    server: uvicorn.Server
    tokens: dict[str, str]

    @property
    def state(self) -> GatewayState:
        state: GatewayState = self.app.state.gateway
        return state

    def headers(self, company: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[company]}"}

    def http(self, company: str | None = "acme", **kwargs: Any) -> httpx.AsyncClient:
        headers = self.headers(company) if company else {}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=20.0, **kwargs)


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve_gateway(
    dsn: str, storage_dir: Path, settings: GatewaySettings = TEST_SETTINGS
) -> AsyncIterator[RunningGateway]:
    app = create_app(dsn, settings, LocalStorage(storage_dir))
    sock = free_socket()
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="on", log_level="warning", timeout_graceful_shutdown=5, ws="none"
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        if task.done():
            task.result()  # raise what went wrong
        return server.started

    tokens: dict[str, str] = {}
    try:
        await wait_until(started, within=20, message="gateway started")
        async with await db.connect(dsn) as conn:
            for company in ("acme", "globex"):
                tokens[company] = await auth.create_token(conn, company, "test")
        gateway = RunningGateway(f"http://127.0.0.1:{port}", app, server, tokens)
        await asyncio.wait_for(gateway.state.listener.connected.wait(), timeout=10)
        yield gateway
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=20)
        sock.close()


def settings(**overrides: Any) -> GatewaySettings:
    return replace(TEST_SETTINGS, **overrides)
