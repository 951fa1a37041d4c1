"""Load generators for the gateway scenario: many SSE clients in one process, and POST
submitters. Raw asyncio streams and a minimal HTTP/1.1 client (keep-alive, chunked
decoding), because httpx costs ~1 ms of CPU per request and event, which on a 2-core
machine would be measured as gateway latency.

``python -m bench.http_clients sse --port P --token T --path-file F --out O`` opens one
stream per path in F (a JSON list; T is sent as ``streamToken`` unless the path has its
own), says ``ready <open> <failed>`` on stdout once every
stream is open (and, on job streams, has its first event), then records every event it
parses as ``[jobId, seq, time.time()]`` until ``stop`` on stdin or ``--deadline`` seconds,
writes them to O, says ``done`` and exits. Only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from typing import Any, cast

HOST = "127.0.0.1"
BROWSER_RETRY_MS = 3_000  # EventSource's reconnection time until a `retry:` says otherwise


def raise_nofile() -> int:
    """RLIMIT_NOFILE soft limit up to the hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before the response")
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return status, headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


# -- SSE ------------------------------------------------------------------------------


class SseStream(asyncio.Protocol):
    """One SSE connection as a protocol, not a coroutine: bytes are handled in the event
    loop's callback with no task wake-up per event, and each ``data:`` line is stamped
    with ``time.time()`` there and kept raw (JSON is decoded after the measurement).
    A reader coroutine per stream cost ~25 us per event, which at 1,000 company streams
    added tens of milliseconds of this process's own queueing to the measured latency."""

    def __init__(self, owner: SseClients, i: int, request: bytes) -> None:
        self.owner = owner
        self.i = i
        self.request = request
        self.head = b""
        self.chunked: bool | None = None  # None until the response head is read
        self.raw = b""  # bytes after the head, still chunk-framed
        self.body = b""  # de-chunked, not yet split into lines
        loop = asyncio.get_running_loop()
        self.head_read: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self.retry_ms: int | None = None  # the stream's last `retry:` field
        self.status: int | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("connection closed"))
        if not self.done.cancelled():  # cancelled: its stream's task was, at stop
            self.done.exception()  # retrieved: run() reports it, or it came after stop

    def data_received(self, data: bytes) -> None:
        t = time.time()
        if self.chunked is None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            lines = head.decode("latin-1").split("\r\n")
            status = self.status = int(lines[0].split()[1])
            if status != 200:
                self.done.set_exception(ConnectionError(f"HTTP {status}"))
                self.transport.close()
                return
            self.chunked = any(
                line.lower().replace(" ", "") == "transfer-encoding:chunked" for line in lines
            )
            self.head_read.set_result(None)
            self.owner.on_open(self.i)
        if self.chunked:
            self.raw += data
            while True:
                eol = self.raw.find(b"\r\n")
                if eol < 0:
                    break
                size = int(self.raw[:eol].split(b";")[0], 16)
                if size == 0:  # the response's last chunk: the stream ended
                    self.transport.close()
                    break
                if len(self.raw) < eol + 2 + size + 2:
                    break
                self.body += self.raw[eol + 2 : eol + 2 + size]
                self.raw = self.raw[eol + 2 + size + 2 :]
        else:
            self.body += data
        while b"\n" in self.body:
            line, _, self.body = self.body.partition(b"\n")
            if line.startswith(b"data:"):
                self.owner.on_data(self.i, line[5:], t)
            elif line.startswith(b"retry:"):
                self.retry_ms = int(line[6:].strip())


class SseClients:
    def __init__(
        self,
        port: int,
        token: str,
        paths: list[str],
        concurrency: int,
        last_event_id: str | None = None,
    ) -> None:
        self.port = port
        self.token = token
        self.paths = paths
        self.concurrency = concurrency
        # Sent by every stream, as a browser resuming after a gateway restart does.
        self.last_event_id = last_event_id
        self.raw_events: list[tuple[bytes, float]] = []
        self.first: list[asyncio.Event] = [asyncio.Event() for _ in paths]
        self.opened = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.transports: list[asyncio.Transport] = []
        self.wait_first = True
        # As EventSource does: a stream that ends without an event after a `retry:` field
        # (the gateway's "database busy, reconnect later") is opened again after it.
        self.reconnect = False
        self.reconnects = 0
        self.counted: set[int] = set()

    @property
    def events(self) -> list[list[Any]]:
        """[jobId, seq, arrival time] per ``data:`` line received."""
        out = []
        for raw, t in self.raw_events:
            ev = json.loads(raw)
            out.append([ev["jobId"], ev["seq"], t])
        return out

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    def on_open(self, i: int) -> None:
        if i not in self.counted:
            self.counted.add(i)
            self.opened += 1
        if not self.wait_first:
            self.first[i].set()

    def on_data(self, i: int, raw: bytes, t: float) -> None:
        self.raw_events.append((raw, t))
        self.first[i].set()

    async def one(self, i: int, sem: asyncio.Semaphore) -> None:
        path = self.paths[i]
        if "streamToken=" not in path:  # a path may carry its own (another company's) token
            path += f"{'&' if '?' in path else '?'}streamToken={self.token}"
        resume = f"Last-Event-ID: {self.last_event_id}\r\n" if self.last_event_id else ""
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Accept: text/event-stream\r\nCache-Control: no-cache\r\n{resume}\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        try:
            retry_ms = BROWSER_RETRY_MS
            while True:
                stream: SseStream | None = None
                try:
                    async with sem:  # bounds connections being set up, not open streams
                        transport, stream = await loop.create_connection(
                            lambda: SseStream(self, i, request), HOST, self.port
                        )
                        self.transports.append(transport)
                        await asyncio.wait(
                            {stream.head_read, stream.done}, return_when="FIRST_COMPLETED"
                        )
                    await stream.done
                    return
                except (OSError, ConnectionError):
                    # As EventSource: a network error, or a stream that ended before its
                    # first event, is retried after the last `retry:` the server sent.
                    if not self.reconnect or self.first[i].is_set():
                        raise
                    if stream is not None and stream.status not in (None, 200):
                        raise  # EventSource gives up on any other status
                    if stream is not None and stream.retry_ms:
                        retry_ms = stream.retry_ms
                    self.reconnects += 1
                    await asyncio.sleep(retry_ms / 1000)
        except (OSError, ConnectionError, ValueError) as exc:
            self._error(f"{type(exc).__name__}: {exc}"[:120])
            if not self.first[i].is_set():
                self.failed += 1
                self.first[i].set()

    async def run(self, wait_first: bool, deadline: float, connect_within: float) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        self.wait_first = wait_first
        tasks = [asyncio.create_task(self.one(i, sem)) for i in range(len(self.paths))]
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(e.wait() for e in self.first)), timeout=connect_within
            )
        except TimeoutError:
            self._error("connect phase timed out")
        connect_s = time.monotonic() - t0
        self.raw_events.clear()  # the initial status events are not measurements
        print(f"ready {self.opened} {self.failed} {connect_s:.3f}", flush=True)
        loop = asyncio.get_running_loop()
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        try:
            async with asyncio.timeout(deadline):
                while (line := await stdin.readline()) and line.strip() != b"stop":
                    pass
        except TimeoutError:
            self._error("deadline reached before stop")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for transport in self.transports:
            transport.close()


def main_sse(args: argparse.Namespace) -> None:
    nofile = raise_nofile()
    paths = json.loads(open(args.path_file).read())  # noqa: SIM115 - tiny file
    clients = SseClients(args.port, args.token, paths, args.concurrency, args.last_event_id)
    clients.reconnect = args.reconnect
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    runner(clients.run(not args.company, args.deadline, args.connect_within))
    with open(args.out, "w") as f:
        json.dump(
            {
                "events": clients.events,
                "opened": clients.opened,
                "failed": clients.failed,
                "errors": clients.errors,
                "reconnects": clients.reconnects,
                "nofile": nofile,
            },
            f,
        )
    print("done", flush=True)


# -- POST -----------------------------------------------------------------------------


async def post_load(
    port: int, api_token: str, company: str, submitters: int, per_submitter: int
) -> dict[str, Any]:
    """``submitters`` keep-alive connections, each POSTing ``per_submitter`` jobs one after
    another. Returns latencies (ms, request written → 202 body read) and the wall time."""
    body = json.dumps({"jobType": "bench.noop", "input": {"n": 1}}).encode()
    head = (
        f"POST /api/companies/{company}/content-jobs HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Authorization: Bearer {api_token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    latencies: list[float] = []
    statuses: dict[int, int] = {}

    async def submitter() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for _ in range(per_submitter):
                t = time.perf_counter()
                writer.write(head + body)
                status, headers = await read_head(reader)
                await reader.readexactly(int(headers.get("content-length", "0")))
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[status] = statuses.get(status, 0) + 1
                if headers.get("connection", "").lower() == "close":
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(submitter() for _ in range(submitters)))
    return {"latencies_ms": latencies, "seconds": time.perf_counter() - t0, "statuses": statuses}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_clients")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sse")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--token", required=True)
    s.add_argument("--path-file", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--company", action="store_true", help="company streams: no first event")
    s.add_argument("--concurrency", type=int, default=200, help="connections opened at once")
    s.add_argument("--connect-within", type=float, default=120.0)
    s.add_argument("--deadline", type=float, default=600.0)
    s.add_argument(
        "--reconnect", action="store_true", help="reopen a stream ended with retry: and no event"
    )
    s.add_argument("--last-event-id", help="sent by every stream (resuming company streams)")
    args = p.parse_args(argv)
    main_sse(args)


if __name__ == "__main__":
    main()
