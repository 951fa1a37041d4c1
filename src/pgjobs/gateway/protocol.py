"""The HTTP/1.1 protocol the gateway is served with: uvicorn's httptools protocol, with
limits on what a client may send before its request's headers are complete.

httptools (llhttp) has no limit of its own on the request line and headers: it buffers a
header value until its end arrives, so ten connections each sending 20 MiB of one
unfinished header grew the gateway by 200 MB, and a client trickling a byte now and then
held its connection (and a file descriptor) for ever. Both happen before any token is
checked, so anyone who can reach the port can do it. Two limits, per request:

* *Size.* Bytes received while a request's headers are incomplete are counted as they
  are handed to the parser, which is fed at most what the budget has left. Past
  ``max_header_bytes`` the connection gets ``431 Request Header Fields Too Large`` and is
  closed; the parser never holds more than the budget. (On a pipelined connection the
  bytes of the next request that arrive in the same piece as the end of the previous
  one are not counted, so the worst case there is twice the budget.)
* *Time.* A request's headers must be complete within ``header_timeout`` of the
  connection opening, or of the first byte of the next request on a kept-alive
  connection; otherwise the connection is closed, without an answer. Between requests
  uvicorn's keep-alive timeout applies as before.

Each connection cut is logged once, at INFO. The limits come from ``GatewaySettings``
(``max_header_bytes``, ``header_timeout_seconds``); ``protocol_class`` binds them to a
subclass that ``pgjobs.gateway.app.server_config`` gives uvicorn.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

log = logging.getLogger(__name__)

# JSON like every other error of the gateway (pgjobs.gateway.responses).
_TOO_LARGE = b'{"error":"request headers too large"}'
_RESPONSE_431 = b"".join(
    [
        STATUS_LINE[431],
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(_TOO_LARGE),
        b"connection: close\r\n",
        b"\r\n",
        _TOO_LARGE,
    ]
)


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size and a time limit on each request's
    request line and headers (see the module docstring)."""

    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0

    # Per connection; set in connection_made (uvicorn's __init__ takes fixed arguments).
    _awaiting_headers: bool
    _header_bytes: int
    _header_timer: asyncio.TimerHandle | None
    _cut: bool

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._awaiting_headers = True
        self._header_bytes = 0
        self._header_timer = None
        self._cut = False
        super().connection_made(transport)  # type: ignore[arg-type]  # uvicorn narrows it
        # A connection that sends nothing at all is bounded too: uvicorn arms no timer
        # until a first response has been sent.
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.transport.is_closing():
                return
            if not self._awaiting_headers:
                super().data_received(view)  # type: ignore[arg-type]  # the parser takes any buffer
                return
            if self._header_timer is None:
                self._arm_header_timer()  # the first byte of the next request
            room = self.max_header_bytes - self._header_bytes
            if room <= 0:
                self._cut_connection(
                    "its request headers passed %d bytes", self.max_header_bytes, answer=True
                )
                return
            # Never more than the budget has left, so the parser never buffers more.
            piece, view = view[:room], view[room:]
            self._header_bytes += len(piece)
            super().data_received(piece)  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            # The next request on a kept-alive connection, also one that came in the
            # same piece as the end of the previous one (no data_received of its own).
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._header_bytes = 0
        self._disarm_header_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # The next request's headers may follow on this connection: count them afresh;
        # its timer starts with its first byte.
        self._awaiting_headers = True

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self._awaiting_headers and not self.transport.is_closing():
            self._cut_connection(
                "its request headers were not complete within %gs",
                self.header_timeout,
                answer=False,
            )

    def _cut_connection(self, why: str, limit: float, *, answer: bool) -> None:
        """Close the connection, logging why once; ``answer``: with a 431 first."""
        if self._cut:
            return
        self._cut = True
        self._disarm_header_timer()
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        log.info("closed the connection of %s: " + why, client, limit)
        # A 431 only where no response is under way on this connection (a pipelined
        # request behind a running one): a second status line would corrupt the first.
        if answer and (self.cycle is None or self.cycle.response_complete):
            self.transport.write(_RESPONSE_431)
        self.transport.close()


def protocol_class(max_header_bytes: int, header_timeout: float) -> type[LimitedHttpToolsProtocol]:
    """The protocol with these limits, for ``uvicorn.Config(http=...)`` (uvicorn builds
    one instance per connection from the class and its own arguments)."""
    return type(
        "GatewayHttpProtocol",
        (LimitedHttpToolsProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout": header_timeout},
    )
