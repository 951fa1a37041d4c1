"""Load generators for the gateway scenario: many SSE clients in one process, and POST
submitters. Raw asyncio streams and a minimal HTTP/1.1 client (keep-alive, chunked
decoding), because httpx costs ~1 ms of CPU per request and event, which on a 2-core
machine would be measured as gateway latency.

``python -m bench.http_clients sse --port P --token T --path-file F --out O`` opens one
stream per path in F (a JSON list), says ``ready <open> <failed>`` on stdout once every
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
from typing import Any

HOST = "127.0.0.1"


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


class SseClients:
    def __init__(self, port: int, token: str, paths: list[str], concurrency: int) -> None:
        self.port = port
        self.token = token
        self.paths = paths
        self.concurrency = concurrency
        self.events: list[list[Any]] = []
        self.first: list[asyncio.Event] = [asyncio.Event() for _ in paths]
        self.opened = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.writers: list[asyncio.StreamWriter] = []

    def _error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1

    async def one(self, i: int, sem: asyncio.Semaphore, wait_first: bool) -> None:
        path = self.paths[i]
        sep = "&" if "?" in path else "?"
        request = (
            f"GET {path}{sep}streamToken={self.token} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            "Accept: text/event-stream\r\nCache-Control: no-cache\r\n\r\n"
        ).encode()
        try:
            async with sem:  # bounds connections being set up, not open streams
                reader, writer = await asyncio.open_connection(HOST, self.port, limit=1 << 20)
                self.writers.append(writer)
                writer.write(request)
                status, headers = await read_head(reader)
            if status != 200:
                raise ConnectionError(f"HTTP {status}")
            self.opened += 1
            if not wait_first:
                self.first[i].set()
            await self._read(i, reader, headers.get("transfer-encoding") == "chunked")
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            self._error(f"{type(exc).__name__}: {exc}"[:120])
            if not self.first[i].is_set():
                self.failed += 1
                self.first[i].set()

    async def _read(self, i: int, reader: asyncio.StreamReader, chunked: bool) -> None:
        buf = b""
        events = self.events
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    return
                data = await reader.readexactly(size + 2)
                buf += data[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                if line.startswith(b"data:"):
                    t = time.time()
                    ev = json.loads(line[5:])
                    events.append([ev["jobId"], ev["seq"], t])
                    self.first[i].set()

    async def run(self, wait_first: bool, deadline: float, connect_within: float) -> None:
        sem = asyncio.Semaphore(self.concurrency)
        tasks = [asyncio.create_task(self.one(i, sem, wait_first)) for i in range(len(self.paths))]
        t0 = time.monotonic()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(e.wait() for e in self.first)), timeout=connect_within
            )
        except TimeoutError:
            self._error("connect phase timed out")
        connect_s = time.monotonic() - t0
        self.events.clear()  # the initial status events are not measurements
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
        for w in self.writers:
            w.close()


def main_sse(args: argparse.Namespace) -> None:
    nofile = raise_nofile()
    paths = json.loads(open(args.path_file).read())  # noqa: SIM115 - tiny file
    clients = SseClients(args.port, args.token, paths, args.concurrency)
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
    args = p.parse_args(argv)
    main_sse(args)


if __name__ == "__main__":
    main()
