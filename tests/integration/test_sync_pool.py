"""The SyncClient's pool hands out an idle connection without a round trip to check it
(db.check_if_suspect_sync), so a call is one round trip, and still replaces a connection
the server ended."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg import pq

from pgjobs.sync import SyncClient


def _messages_sent(trace: Path) -> list[str]:
    """The protocol messages the client sent, from a libpq trace without timestamps
    (``F <length> <message> ...`` lines)."""
    lines = [line.split("\t") for line in trace.read_text().splitlines()]
    return [fields[2] for fields in lines if fields[0] == "F"]


def test_a_checkout_sends_nothing(dsn: str, tmp_path: Path) -> None:
    trace = tmp_path / "trace"
    with SyncClient(dsn, max_size=1) as client, trace.open("w") as out:
        client.enqueue("acme", "echo", {})
        with client.pool.connection() as conn:
            conn.pgconn.trace(out.fileno())
            conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        with client.pool.connection() as conn:  # the same one, checked out again
            sent_by_checkout = _messages_sent(trace)
            conn.execute("SELECT 1")
            conn.pgconn.untrace()
    assert sent_by_checkout == []
    assert "Query" in _messages_sent(trace) or "Parse" in _messages_sent(trace)  # traced


def test_a_connection_the_server_ended_is_replaced(dsn: str) -> None:
    with SyncClient(dsn, max_size=1) as client:
        client.enqueue("acme", "echo", {})
        with client.pool.connection() as conn:
            pid = conn.info.backend_pid
        with psycopg.connect(dsn, autocommit=True) as admin:
            # Waits until the backend has gone (its FATAL sent): 5 s at most.
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        job = client.enqueue("acme", "echo", {})
        with client.pool.connection() as conn:
            assert conn.info.backend_pid != pid
        assert client.get("acme", job.id).status == "queued"
