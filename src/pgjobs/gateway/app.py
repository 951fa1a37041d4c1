"""The Starlette app: routes, error mapping, CORS, and a lifespan that owns the pool, the
LISTEN connection and the fan-out for as long as the server runs.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from pgjobs import db, gcpolicy
from pgjobs.config import WorkerSettings
from pgjobs.gateway import dashboard
from pgjobs.gateway.eventstream import quiet_dropped_streams
from pgjobs.gateway.protocol import protocol_class
from pgjobs.gateway.responses import EXCEPTION_HANDLERS
from pgjobs.gateway.routes import Api, routes
from pgjobs.gateway.settings import GatewaySettings
from pgjobs.gateway.state import GatewayState, check_database
from pgjobs.storage import Storage, from_settings


def create_app(
    dsn: str | None = None,
    settings: GatewaySettings | None = None,
    storage: Storage | None = None,
    *,
    listen_dsn: str | None = None,
) -> Starlette:
    """The gateway as an ASGI app. Nothing connects until the lifespan starts. Its LISTEN
    connection goes to ``listen_dsn``, else PGJOBS_LISTEN_DSN, else the pool's DSN."""
    settings = settings or GatewaySettings.from_env()
    if storage is None:
        storage = from_settings(WorkerSettings.from_env())
    state = GatewayState(db.resolve_dsn(dsn), settings, storage, listen_dsn=listen_dsn)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["X-Next-Cursor", "Location", "ETag", "Retry-After"],
                max_age=600,
            )
        )
    app = Starlette(
        routes=[*routes(Api(state)), *dashboard.routes()],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # Starlette answers a path with a trailing slash (or without one) that matches no
    # route with a redirect to the other form, its Location built from the request's Host
    # header, which the client chose: one exact path per route instead, anything else 404.
    app.router.redirect_slashes = False
    app.state.gateway = state
    # uvicorn would log each slow reader the streams drop as an ERROR (eventstream).
    quiet_dropped_streams()
    return app


class GatewayServer(uvicorn.Server):
    """uvicorn's server, telling the event streams to end as it begins to shut down.

    uvicorn waits for every open response before it runs the lifespan's shutdown, and an
    event stream never ends by itself: without this, every shutdown would wait out
    ``timeout_graceful_shutdown`` and then cancel the streams mid-write."""

    def __init__(
        self, config: uvicorn.Config, state: GatewayState, *, tune_gc: bool = False
    ) -> None:
        super().__init__(config)
        self.gateway = state
        self.tune_gc = tune_gc  # process-wide: only where the gateway owns the process

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.tune_gc:
            # A full collection stops the loop in the middle of a fan-out (gcpolicy).
            gcpolicy.tune_for_long_running_process()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.gateway.end_streams()
        await super().shutdown(sockets)


def server_config(app: Starlette, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for the gateway (``serve`` and the tests' server use the same):
    the HTTP protocol that limits what a client may send before it is authenticated
    (``pgjobs.gateway.protocol``), and ``options`` (host, port, log level)."""
    settings: GatewaySettings = app.state.gateway.settings
    return uvicorn.Config(
        app,
        http=protocol_class(settings.max_header_bytes, settings.header_timeout_seconds),
        ws="none",
        lifespan="on",
        proxy_headers=False,
        server_header=False,
        # Streams are told to end when shutdown begins (GatewayServer); this bounds how
        # long one stuck in a send can delay the exit.
        timeout_graceful_shutdown=5,
        **options,
    )


def serve(
    dsn: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: GatewaySettings | None = None,
) -> int:
    """Run the gateway with uvicorn until SIGINT/SIGTERM. Returns the exit status: 3 when
    it could not start (the reason is in the log), as ``uvicorn`` does. A database that
    cannot be reached or is not migrated raises its error (``check_database``) before
    uvicorn starts, so the command says it in one line instead of uvicorn logging the
    lifespan's traceback."""
    dsn = db.resolve_dsn(dsn)
    asyncio.run(check_database(dsn))
    app = create_app(dsn, settings)
    # log_config=None: uvicorn's lines go through the command's handler (pgjobs.logs),
    # in its format, instead of uvicorn's own text handlers.
    config = server_config(app, host=host, port=port, log_level="info", log_config=None)
    server = GatewayServer(config, app.state.gateway, tune_gc=True)
    server.run()
    return 0 if server.started else 3
