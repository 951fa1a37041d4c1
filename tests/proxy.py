"""A TCP proxy in front of PostgreSQL that can freeze or refuse connections on demand,
to make the network faults that pg_terminate_backend cannot: a half-open connection
(packets silently dropped) and a server that is unreachable for a while."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class Proxy:
    def __init__(self, target_dsn: str) -> None:
        params = conninfo_to_dict(target_dsn)
        host = str(params.get("host") or "localhost")
        port = int(params.get("port") or 5432)
        self._unix = f"{host}/.s.PGSQL.{port}" if host.startswith("/") else None
        self._tcp = (host, port)
        self._target_dsn = target_dsn
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.to_clients: list[asyncio.StreamWriter] = []  # each connection's client side
        self.frozen = False  # existing connections stop passing bytes, silently
        self.refusing = False  # new connections are closed at once
        self.silent = False  # new connections are accepted and never answered
        self.port = 0

    @property
    def dsn(self) -> str:
        return make_conninfo(self._target_dsn, host="127.0.0.1", port=str(self.port))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    def freeze_existing(self) -> None:
        """Half-open: every open connection goes silent; new ones work normally."""
        for task in list(self._pipes):
            task.cancel()  # stop pumping, but keep both sockets open
        self._pipes.clear()

    def cut(self) -> None:
        """Down: close every connection and refuse new ones until restore()."""
        self.refusing = True
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def restore(self) -> None:
        self.refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.close()
            return
        if self.silent:
            self._writers.add(writer)
            return
        if self._unix:
            up_reader, up_writer = await asyncio.open_unix_connection(self._unix)
        else:
            up_reader, up_writer = await asyncio.open_connection(*self._tcp)
        self._writers.update({writer, up_writer})
        self.to_clients.append(writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst))
            self._pipes.add(task)
            task.add_done_callback(self._pipes.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()


@contextlib.asynccontextmanager
async def proxied(dsn: str) -> AsyncIterator[Proxy]:
    proxy = Proxy(dsn)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
