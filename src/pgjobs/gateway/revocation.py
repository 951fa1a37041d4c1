"""Revoking an API token ends what was opened with it.

What "revoked" means (docs/gateway.md, Revocation): once ``pgjobs.api_tokens.revoked_at``
is set (``pgjobs token revoke``, ``pgjobs.gateway.auth.revoke_token``, or any UPDATE that
sets it), then

* a request with the token is 401 at once (it is looked up on every request);
* a stream token minted from it is 401 at once: a stream token carries its parent
  token's id, signed, and each use looks the parent up (one primary-key read, taken as
  a stream set-up read so it waits its turn for the pool like the stream's own reads);
* every event stream opened with the token or with one of its stream tokens ends within
  ``revocation_check_seconds`` (default 2 s) and one query.

How open streams learn of it: this process keeps its open streams by the API token id
they were opened with, and every ``revocation_check_seconds`` runs ONE query asking
which of those ids are revoked, then ends those streams (``EventStream.end``: a
complete response; EventSource reconnects, and gets 401). The cost is one small query
per interval per process while streams are open, whatever their number: 10,000 streams
over 1,000 tokens is one lookup of 1,000 primary keys every 2 s, and nothing is done
per stream until one must end.

Chosen over a NOTIFY of the revocation: a NOTIFY sent while this process's LISTEN
connection is down is lost, so the periodic check would be needed as a backstop anyway,
and with it alone revocation needs no new NOTIFY payload in the event channel's
contract, works whoever sets ``revoked_at`` (a hand-written UPDATE sends no NOTIFY), and
its delay is a setting. A NOTIFY would only shorten the delay from ~2 s to ~0.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import defaultdict
from typing import TYPE_CHECKING

import psycopg

from pgjobs import db
from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.gateway.eventstream import EventStream

if TYPE_CHECKING:
    from pgjobs.gateway.state import GatewayState

log = logging.getLogger(__name__)


class Revocations:
    """The open event streams of this process by the API token id they were opened with
    (a stream token's parent), and the periodic check that ends those whose token was
    revoked."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self._streams: defaultdict[uuid.UUID, set[EventStream]] = defaultdict(set)
        self.checks = 0
        self.failures = 0
        self.ended = 0

    def track(self, token_id: uuid.UUID, stream: EventStream) -> None:
        self._streams[token_id].add(stream)

    def untrack(self, token_id: uuid.UUID, stream: EventStream) -> None:
        streams = self._streams.get(token_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._streams[token_id]

    @property
    def tokens(self) -> int:
        """API tokens with at least one open stream."""
        return len(self._streams)

    async def run(self) -> None:
        """Check every ``revocation_check_seconds`` until cancelled (at shutdown)."""
        interval = self.state.settings.revocation_check_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except psycopg.Error as exc:  # PoolTimeout, a database down or restarting
                # The next check asks again about every open stream's token: a check
                # that failed delays revocation by an interval, it never loses one.
                self.failures += 1
                log.warning("could not check for revoked tokens: %s", db.describe_error(exc))

    async def check(self) -> int:
        """End the open streams whose token is revoked; returns how many were ended."""
        if not self._streams:
            return 0
        ids = list(self._streams)
        async with self.state.pool.connection() as conn:
            cur = await conn.execute(GATEWAY_QUERIES["token_list_revoked_by_ids"], {"ids": ids})
            revoked = [row["id"] for row in await cur.fetchall()]
        self.checks += 1
        ended = 0
        for token_id in revoked:
            for stream in list(self._streams.get(token_id, ())):
                stream.end()
                ended += 1
        if ended:
            log.info("ended %d event streams of %d revoked tokens", ended, len(revoked))
        self.ended += ended
        return ended
