"""The ``text/event-stream`` response every event stream is sent with.

It writes already-encoded SSE frames (``pgjobs.gateway.sse`` encodes them, a company's
events once for all of its streams) and owns what a long-lived response needs:

* *Client gone.* One task per stream waits on ASGI ``receive`` for ``http.disconnect``
  and stops the writer, so a stream whose browser left releases its slot and
  subscription at once, even if no event is coming.
* *Client stuck.* A browser that stops reading (frozen tab, dead network) fills the
  socket; the server's ``send`` then waits for it to drain, forever. The stream's timer
  stops it once a send has waited ``send_timeout`` (noticed within max(ping, send
  timeout)). Checking on a timer, not wrapping each send in a timeout, keeps the cost
  per event to two clock reads: a per-send cancel scope (what sse-starlette does) was
  about a third of the gateway's CPU per delivery at 1,000 company streams. The drop
  is logged once at INFO, and the response returns unfinished: every later send would
  wait for the same client, and ASGI has no message that aborts a response. uvicorn
  then closes the connection, which is the point, but also logs ``ASGI callable
  returned without completing response`` at ERROR; ``DroppedStreamLogFilter`` keeps
  that line out of the log, for these responses only.
* *Keep-alive.* A comment (``: ping``) when nothing was written for ``ping_seconds``,
  so proxies do not close an idle stream. The same timer, one per stream, armed for the
  next thing due (not on a fixed tick: at 10,000 streams a 5 s tick was 4% of a core).
* *Server shutdown.* Nothing here: the gateway ends its streams' sources
  (``GatewayState.end_streams``) before uvicorn waits for open responses.
* *Ended from outside.* ``end()`` (the token the stream was opened with was revoked,
  ``pgjobs.gateway.revocation``) stops the source where it waits, as a disconnect does,
  and then sends the end of the response, so the client sees a complete response and
  not a cut connection.

``release`` runs exactly once when the response ends, however it ends.

*Pushed frames.* A source that produces for many streams at once (a company's feed,
``pgjobs.gateway.companystream``) can hand a frame straight to a stream whose writer is
idle, waiting on that source: ``push`` runs the ASGI ``send`` in the caller's task. A
send to a client that keeps up never waits (uvicorn writes to the socket at once and
waits only while the transport is paused), so the frame is written there and then, with
no task wake-up, no queue and no generator step per stream (at 1,000 company streams
those cost ~17 µs of the ~41 µs of gateway CPU per delivery). A send that does wait
(the client is slow) is finished by a task of its own, and the writer waits for it
before it sends anything else, so frames stay in order, and the stream's timer sees it
in progress like any other send: a stuck client is still dropped after ``send_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Generator
from contextvars import ContextVar
from typing import Any, Final

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

log = logging.getLogger(__name__)

# Never cached, never buffered by a proxy (nginx honours X-Accel-Buffering).
HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",
    "Connection": "keep-alive",
}
PING: Final = b": ping\r\n\r\n"
_END: Final[Message] = {"type": "http.response.body", "body": b"", "more_body": False}

# Set in the task that runs the request (uvicorn runs each request in a task of its own,
# and Starlette awaits the response in it) when its stream was dropped as stuck.
_DROPPED: ContextVar[bool] = ContextVar("pgjobs_event_stream_dropped", default=False)
UVICORN_INCOMPLETE: Final = "ASGI callable returned without completing response."


class DroppedStreamLogFilter(logging.Filter):
    """Drops uvicorn's ERROR for a response left incomplete, when the response is an
    event stream this module dropped because its client stopped reading (see the module
    docstring): the drop is an expected outcome, already logged at INFO. uvicorn logs it
    in the request's own task after the app returns, so the record is matched by that
    task's context, and by the message uvicorn uses for exactly this case; any other
    incomplete response still logs its ERROR."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_DROPPED.get() and record.msg == UVICORN_INCOMPLETE)


def quiet_dropped_streams(logger: logging.Logger | None = None) -> None:
    """Install ``DroppedStreamLogFilter`` on uvicorn's error logger, once."""
    logger = logger or logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DroppedStreamLogFilter) for f in logger.filters):
        logger.addFilter(DroppedStreamLogFilter())


class EventStream(Response):
    """An ASGI response that sends each frame ``frames`` yields, then ends."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        release: Callable[[], None] | None = None,
        *,
        ping_seconds: float,
        send_timeout: float,
    ) -> None:
        # Not Response.__init__: there is no body, only the status and headers.
        self.status_code = 200
        self.background = None
        self.init_headers(HEADERS)
        self.frames = frames
        self._release = release
        self.ping_seconds = ping_seconds
        self.send_timeout = send_timeout
        # Loop time at which the writer's / the pinger's send began, None when idle.
        self._writer_since: float | None = None
        self._ping_since: float | None = None
        self._last_write = 0.0
        self._stopped: str | None = None  # why the writer was stopped from outside
        self._finished = False
        self._writer: asyncio.Task[object] | None = None
        self._ping_task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # Set while the writer waits on its source (push may send); see push.
        self._idle_send: Send | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # A pushed send that had to wait (slow client), finishing in a task of its own.
        self._pushed: asyncio.Task[None] | None = None
        self._push_error: BaseException | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope.get("method") == "HEAD":
                # Headers only: a HEAD must not open a stream that never ends.
                await send(self._start())
                await send(_END)
            else:
                await self._stream(receive, send)
        finally:
            try:
                # Runs the source's own clean-up (a generator stopped at a yield while
                # its frame was being sent); a no-op for one that already finished.
                await self.frames.aclose()
            finally:
                if self._release is not None:
                    self._release()

    async def _stream(self, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        self._writer = asyncio.current_task()
        watcher = asyncio.create_task(self._watch(receive))
        self._last_write = loop.time()
        self._timer = loop.call_later(self.ping_seconds, self._tick, loop, send)
        try:
            await self._send(loop, send, self._start())
            if self._stopped is None:  # else end() came before the response started
                self._loop = loop
                frames = aiter(self.frames)
                while True:
                    # Between two frames the writer waits on its source: push may send.
                    self._idle_send = send
                    try:
                        frame = await anext(frames)
                    except StopAsyncIteration:
                        break
                    finally:
                        self._idle_send = None
                    await self._send(
                        loop, send, {"type": "http.response.body", "body": frame, "more_body": True}
                    )
            await self._send(loop, send, _END)
        except asyncio.CancelledError:
            writer = self._writer
            if self._stopped is None or writer is None or writer.uncancel() > 0:
                raise  # not ours (server shutdown after its grace period): let it through
            if self._stopped == "failed" and self._push_error is not None:
                raise self._push_error from None
            if self._stopped == "stuck":
                _DROPPED.set(True)
                log.info("dropped an event stream whose client stopped reading")
            elif self._stopped == "ended":
                # A client that does not take even this gets its connection cut by
                # uvicorn when the response returns incomplete.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.send_timeout):
                        await send(_END)
        finally:
            self._finished = True
            self._idle_send = None
            if self._timer is not None:
                self._timer.cancel()
            if self._pushed is not None:
                self._pushed.cancel()
            watcher.cancel()
            if self._ping_task is not None:
                self._ping_task.cancel()

    def _start(self) -> Message:
        return {"type": "http.response.start", "status": 200, "headers": self.raw_headers}

    async def _send(self, loop: asyncio.AbstractEventLoop, send: Send, message: Message) -> None:
        if self._pushed is not None:
            await self._pushed  # a pushed frame still being sent goes out first
        self._writer_since = loop.time()
        await send(message)
        self._writer_since = None
        self._last_write = loop.time()

    def push(self, frame: bytes) -> bool:
        """Send ``frame`` (one write) from the caller's task, now, if the writer is idle:
        waiting on its source, with no send of its own in progress and no pushed one
        still going (see the module docstring). Returns False, having sent nothing,
        otherwise: the caller then hands the frame to the source, as it would without
        push. Only for a source that has handed the writer nothing it has yet to take
        (the writer would send that after this frame)."""
        send, loop = self._idle_send, self._loop
        if send is None or loop is None or self._writer_since is not None or self._pushed:
            return False
        self._writer_since = loop.time()
        sending = send({"type": "http.response.body", "body": frame, "more_body": True})
        if not isinstance(sending, types.CoroutineType):  # not a coroutine: cannot be run here
            self._pushed = loop.create_task(self._finish_push(sending))
            return True
        try:
            waits_on = sending.send(None)
        except StopIteration:
            self._writer_since = None
            self._last_write = loop.time()
            return True
        except Exception as exc:
            # Not the caller's problem (it serves other streams): this stream's writer
            # ends with the error, as if its own send had raised it.
            self._writer_since = None
            self._push_error = exc
            self._stop("failed")
            return True
        # The transport is paused (a slow client): the rest of the send in a task of its
        # own, which the writer waits for before its next send (_send).
        self._pushed = loop.create_task(self._finish_push(_resume(sending, waits_on)))
        return True

    async def _finish_push(self, rest: Awaitable[None]) -> None:
        try:
            await rest
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._push_error = exc
            self._stop("failed")
        else:
            assert self._loop is not None  # set before the first push
            self._last_write = self._loop.time()
        finally:
            self._writer_since = None
            self._pushed = None

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._stop("disconnect")
                return

    def end(self) -> None:
        """End the stream now, as a complete response (its frames stop where they are)."""
        if self._finished or self._stopped is not None:
            return
        if self._writer is None:
            self._stopped = "ended"  # not started: it sends its headers and ends
            return
        self._stop("ended")

    def _stop(self, reason: str) -> None:
        if self._finished or self._stopped is not None or self._writer is None:
            return
        self._stopped = reason
        self._writer.cancel()

    def _tick(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        """The stream's one timer: fires when a keep-alive is due, or when a send seen in
        progress would pass the send timeout. It is not re-armed per send, so a send that
        gets stuck just after a tick is noticed at the next one: after at most
        max(ping_seconds, send_timeout)."""
        if self._finished:
            return
        now = loop.time()
        sending = [t for t in (self._writer_since, self._ping_since) if t is not None]
        if sending:
            # A keep-alive can wait for the send in progress; the only question is
            # whether that send is stuck.
            if now - min(sending) >= self.send_timeout:
                self._stop("stuck")
                return
            due = min(sending) + self.send_timeout
        else:
            due = self._last_write + self.ping_seconds
            if now >= due and self._ping_task is None:
                self._ping_task = loop.create_task(self._ping(loop, send))
                # The next keep-alive, or sooner to see that this one got through.
                due = now + min(self.ping_seconds, self.send_timeout)
        self._timer = loop.call_at(max(due, now + 0.05), self._tick, loop, send)

    async def _ping(self, loop: asyncio.AbstractEventLoop, send: Send) -> None:
        # Each send writes one whole chunk, so a ping can never split an event's frame.
        self._ping_since = loop.time()
        try:
            await send({"type": "http.response.body", "body": PING, "more_body": True})
            self._last_write = loop.time()
        except Exception:  # the writer or the watcher sees why, and ends the stream
            log.debug("keep-alive comment not sent", exc_info=True)
        finally:
            self._ping_since = None
            self._ping_task = None


@types.coroutine
def _resume(coro: Coroutine[Any, Any, None], waits_on: Any) -> Generator[Any, Any, None]:
    """The rest of ``coro``, which was started by hand (``coro.send(None)``) and yielded
    ``waits_on`` (the future it waits for): awaiting this finishes it exactly as the task
    that started it would have, passing on results, exceptions and cancellation."""
    while True:
        try:
            value = yield waits_on
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:  # cancelled while waiting: into the send
            try:
                waits_on = coro.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waits_on = coro.send(value)
            except StopIteration:
                return
