"""A worker's operations port: ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP.

``pgjobs worker --metrics-port N`` (or ``PGJOBS_METRICS_PORT``) serves them with uvicorn
and a three-route Starlette app, both already pgjobs dependencies, on the worker's own
event loop rather than in a thread: readiness is the worker's state (its pool, its
listener, its loops), which lives on that loop, and a probe that runs there also proves
the loop is not blocked. uvicorn's signal handling is left out (``_Server``): the worker
owns SIGTERM and SIGINT and stops this server as part of its shutdown.

* ``/healthz``: 200 while the process answers (liveness).
* ``/readyz``: 200 when every check passes, else 503; the JSON body names each check
  and its state.
* ``/metrics``: the Prometheus text format (``pgjobs.metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pgjobs import metrics
from pgjobs.errors import ConfigurationError

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (they would replace the worker's), telling
    when it listens."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        render_metrics: Callable[[], Awaitable[bytes]],
        readiness: Callable[[], Awaitable[dict[str, str]]],
    ) -> None:
        self.host = host
        self.requested_port = port
        self.render_metrics = render_metrics
        self.readiness = readiness
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def app(self) -> Starlette:
        async def healthz(request: Request) -> Response:
            return JSONResponse({"status": "ok"})

        async def readyz(request: Request) -> Response:
            checks = await self.readiness()
            ready = all(state == "ok" for state in checks.values())
            return JSONResponse(
                {"status": "ready" if ready else "unavailable", "checks": checks},
                status_code=200 if ready else 503,
            )

        async def metrics_route(request: Request) -> Response:
            return Response(await self.render_metrics(), media_type=metrics.CONTENT_TYPE)

        return Starlette(
            routes=[
                Route("/healthz", healthz, methods=["GET"]),
                Route("/readyz", readyz, methods=["GET"]),
                Route("/metrics", metrics_route, methods=["GET"]),
            ]
        )

    async def start(self) -> None:
        """Bind and serve until ``stop``; ConfigurationError if the address cannot be
        bound (the port is taken, the host is not this machine's)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise ConfigurationError(
                f"cannot serve metrics on {self.host}:{self.requested_port} "
                f"({exc.strerror or exc}); choose another --metrics-port or --metrics-host"
            ) from None
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            lifespan="off",
            ws="none",
            access_log=False,
            log_config=None,
            log_level=None,
            server_header=False,
            timeout_graceful_shutdown=1,
        )
        self._server = server = _Server(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="pgjobs-health")
        listening = asyncio.create_task(server.listening.wait())
        await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        listening.cancel()
        if self._task.done() or not server.started:
            await self.stop()
            raise OSError(f"the metrics server on {self.host}:{self.port} did not start")
        log.info(
            "metrics and health on http://%s:%d (/metrics /healthz /readyz)", self.host, self.port
        )

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await self._task
        self._server = self._task = None
