"""``Idempotency-Key`` on ``POST /api/companies/{c}/content-jobs`` (the IETF httpapi
draft's semantics): a retried POST gets the first one's answer instead of a second job.

What it guarantees, per company and key, for ``idempotency_seconds`` (24 h by default)
after the key was first used:

- the same key and the same body: the first response again (202, the same ``jobId``
  and ``createdAt``, byte for byte the same body, ``Idempotent-Replayed: true``), and
  nothing is created;
- the same key and another body: 422;
- the same key while the request that took it has not finished: the retry waits for
  it (up to ``idempotency_wait_seconds``) and then answers as above; past that, 409;
- a malformed key: 400.

How: the key is a row of ``pgjobs.idempotency_keys`` (sql/0011), inserted in the
transaction that enqueues the job, before the job; its primary key (company_id, key)
is what serializes racing requests. A second request with the key waits on that index
entry until the first commits (then reads its row and replays its response) or rolls
back (then takes the key itself). So "in flight" is a request whose transaction holds
the key uncommitted; the first request's transaction is three short statements, so a
retry normally waits milliseconds and never sees 409. 409 is for a holder stuck longer
than the wait (a stalled gateway, a lock held by hand), detected by ``lock_timeout``.

The body is compared by the SHA-256 of its canonical JSON (keys sorted, no spaces),
so a retry that only re-orders or re-spaces the same object is the same request.
Expired keys are re-taken by the next request that uses them and deleted by the
workers' rescue loop (``pgjobs.rescuer.delete_released_keys``, about once a minute).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import psycopg

from pgjobs import db
from pgjobs.client import Client
from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.gateway.limits import ApiError
from pgjobs.jobspec import JobSpec
from pgjobs.types import Job

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
# Printable ASCII without space, the bare form; the draft's Structured Field string
# form ("...") is accepted too, its quotes removed (no escapes: a key never needs them).
_KEY = re.compile(r"[!#-\[\]-~]{1,255}")  # 0x21-0x7E except " and \
BAD_KEY = (
    "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces, "
    'quotes or backslashes, bare or in double quotes (e.g. "8e03978e-40d5")'
)
REUSED = "Idempotency-Key was already used with a different request body"
IN_FLIGHT = "a request with this Idempotency-Key is still being processed; retry later"


def parse_key(raw: str | None) -> str | None:
    """The key of an ``Idempotency-Key`` header value (None without the header), or 400."""
    if raw is None:
        return None
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if not _KEY.fullmatch(value):
        raise ApiError(400, BAD_KEY)
    return value


def fingerprint(body: dict[str, Any]) -> str:
    """SHA-256 (hex) of the body as canonical JSON."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def accepted_body(job: Job) -> dict[str, Any]:
    """The 202 body of a POST that created ``job``."""
    return {
        "jobId": str(job.id),
        "status": job.status.value,
        "createdAt": job.created_at.isoformat(),
    }


@dataclass(frozen=True, slots=True)
class Outcome:
    body: dict[str, Any]
    replayed: bool


async def enqueue_once(
    conn: db.AsyncConn,
    client: Client,
    spec: JobSpec,
    *,
    key: str,
    request_hash: str,
    ttl_seconds: float,
    wait_seconds: float,
) -> Outcome:
    """Enqueue ``spec`` unless ``key`` was used for this company: see the module notes.
    Raises ApiError 422 (another body) or 409 (still in flight)."""
    params: dict[str, Any] = {
        "company_id": spec.company_id,
        "key": key,
        "request_hash": request_hash,
        "job_id": spec.id,
        "ttl_seconds": ttl_seconds,
        "now": None,
    }
    try:
        async with conn.transaction():
            # How long to wait for another request holding the same key (still in
            # flight) before giving up with 409.
            await db.lock_timeout_for_transaction(conn, wait_seconds)
            # A key row deleted between the insert and the lock (by the cleanup, only
            # once expired) makes the next round insert it.
            while True:
                if await db.fetch_dicts(conn, GATEWAY_QUERIES["idempotency_key_insert"], params):
                    break
                rows = await db.fetch_dicts(conn, GATEWAY_QUERIES["idempotency_key_lock"], params)
                if not rows:
                    continue
                held = rows[0]
                if held["expired"]:
                    await db.fetch_dicts(
                        conn, GATEWAY_QUERIES["idempotency_key_take_if_expired"], params
                    )
                    break
                if held["request_hash"] != request_hash:
                    raise ApiError(422, REUSED)
                return Outcome(json.loads(held["response"]), replayed=True)
            (job,) = await client.enqueue_many([spec], conn=conn)
            body = accepted_body(job)
            await db.fetch_dicts(
                conn,
                GATEWAY_QUERIES["idempotency_key_set_response"],
                {**params, "response": json.dumps(body)},
            )
            return Outcome(body, replayed=False)
    except psycopg.errors.LockNotAvailable:
        raise ApiError(409, IN_FLIGHT) from None
