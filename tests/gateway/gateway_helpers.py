"""A real gateway for the tests: uvicorn on 127.0.0.1, a free port, the test's own
database, and API tokens for two companies ("acme" and "globex")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette

from helpers import fetch, wait_until
from pgjobs import db
from pgjobs.gateway import auth
from pgjobs.gateway.app import GatewayServer, create_app, server_config
from pgjobs.gateway.settings import GatewaySettings
from pgjobs.gateway.state import GatewayState
from pgjobs.storage import LocalStorage, Storage

# httpx makes an SSL context (the CA bundle parsed) for every client, even one that only
# speaks http:// to the test gateway: 20-130 ms a client, and the tests make one for most
# requests and every stream. This one, made once, serves them all.
TLS = ssl.create_default_context()

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
        return httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=20.0, verify=TLS, **kwargs
        )


def free_socket(sndbuf: int | None = None, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        # Accepted connections inherit it: lets a test fill a slow client's pipe quickly.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    if rcvbuf is not None:
        # Inherited too: bounds what the kernel holds for the server beyond what it read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def serve_gateway(
    dsn: str,
    storage_dir: Path,
    settings: GatewaySettings = TEST_SETTINGS,
    *,
    sndbuf: int | None = None,
    rcvbuf: int | None = None,
    tune_gc: bool = False,
    wait_for_listener: bool = True,
    storage: Storage | None = None,
) -> AsyncIterator[RunningGateway]:
    """storage: the assets' backend; a LocalStorage on storage_dir unless given."""
    app = create_app(dsn, settings, storage or LocalStorage(storage_dir))
    sock = free_socket(sndbuf, rcvbuf)
    port = sock.getsockname()[1]
    # The server `pgjobs gateway` runs, with its HTTP protocol and limits.
    config = server_config(app, log_level="warning")
    server = GatewayServer(config, app.state.gateway, tune_gc=tune_gc)
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
        if wait_for_listener:
            await asyncio.wait_for(gateway.state.listener.connected.wait(), timeout=10)
        yield gateway
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=20)
        sock.close()


def settings(**overrides: Any) -> GatewaySettings:
    return replace(TEST_SETTINGS, **overrides)


async def kill_listener(dsn: str) -> int:
    """Terminate the gateway's LISTEN backend; returns how many were terminated."""
    rows = await fetch(
        dsn,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE application_name = 'pgjobs-gateway-listener'"
        " AND datname = current_database()",
    )
    return len(rows)


@contextlib.contextmanager
def notifies_lost(gateway: RunningGateway) -> Iterator[list[str]]:
    """While open, the gateway's LISTEN connection drops every NOTIFY payload it receives
    (into the list yielded), as if they had been sent while it was down: the events they
    carried can then only reach a stream from the table, by a backfill."""
    listener = gateway.state.listener
    deliver = listener.on_notify
    lost: list[str] = []
    listener.on_notify = lost.append
    try:
        yield lost
    finally:
        listener.on_notify = deliver


@dataclass
class Sse:
    event: str
    id: str | None
    data: Any


async def read_sse(response: httpx.Response) -> AsyncIterator[Sse]:
    """Parse a text/event-stream response into events (comments are skipped)."""
    event, event_id, data = "message", None, []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield Sse(event, event_id, json.loads("\n".join(data)))
            event, event_id, data = "message", None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


async def collect(
    gateway: RunningGateway,
    path: str,
    *,
    company: str = "acme",
    last_event_id: str | None = None,
    stop_after: int | None = None,
    within: float = 30.0,
    on_event: Any = None,
) -> list[Sse]:
    """Read a stream until it ends (or stop_after events), failing after `within` s."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[Sse] = []
    async with (
        asyncio.timeout(within),
        gateway.http(company) as http,
        http.stream("GET", path, headers=headers) as response,
    ):
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for ev in read_sse(response):
            events.append(ev)
            if on_event is not None:
                await on_event(ev)
            if stop_after is not None and len(events) >= stop_after:
                break
    return events


@contextlib.asynccontextmanager
async def uvicorn_log() -> AsyncIterator[list[logging.LogRecord]]:
    """What uvicorn logs about requests (its logger does not propagate to caplog's).
    Entered after the server started: uvicorn's logging set-up drops earlier handlers."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
