"""Who is calling: API tokens (Bearer) and short-lived stream tokens (for EventSource).

API tokens are ``pgj_`` + 32 random bytes, url-safe. Only their SHA-256 is stored
(``pgjobs.api_tokens``); a request's token is hashed and looked up by hash, and the stored
hash is compared again in constant time. A token belongs to one company, and that is the
only source of the caller's company: a body, header or Host never decides it. An
*operator* token belongs to none and may act for any: the company is then the one the
request's path names, and nothing else changes (stream tokens it mints are that company's).

Browsers cannot put headers on an ``EventSource``, so a caller holding an API token can
mint a *stream token*: ``<payload>.<signature>``, where the payload names the company, the
scope (one job, or the whole company), the id of the API token it was minted with (its
*parent*) and an expiry at most a few minutes away, signed with HMAC-SHA256. It is
accepted as ``?streamToken=`` on the two event-stream routes only, so a token leaked in a
URL (logs, history) can read one stream for minutes and do nothing else; and only while
its parent is active (``pgjobs.gateway.routes.Api.authorize`` looks the parent up on each
use, ``pgjobs.gateway.revocation`` ends open streams), so revoking an API token revokes
its stream tokens too. Tokens of the first format, without a parent, were signed under
another domain string and fail the signature check. The key is PGJOBS_GATEWAY_SECRET,
else random per process: several gateway processes behind one load balancer must share
a configured secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pgjobs import db, queries

TOKEN_PREFIX = "pgj_"  # noqa: S105 - a public prefix, not a secret
# Longer than any token this module mints; anything longer is rejected before hashing.
MAX_TOKEN_LENGTH = 200
MAX_STREAM_TOKEN_LENGTH = 1000

GATEWAY_QUERIES = queries.load("pgjobs.gateway")


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller: the company it acts for and, for a stream token, its scope."""

    company_id: str
    token_id: uuid.UUID
    """The API token the caller acts with: its own, or a stream token's parent. Revoking
    it ends the caller's access, streams included."""
    job_scope: uuid.UUID | None = None
    """For a job-scoped stream token: the only job whose events it may read."""
    operator: bool = False
    """An operator's API token: it may act for any company. Until a route binds it to the
    company its path names, its ``company_id`` is empty."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


async def create_token(
    conn: db.AsyncConn, company_id: str | None, label: str | None = None, *, operator: bool = False
) -> str:
    """Store a new token's hash and return the token (shown once): a company's token, or
    with ``operator`` (and no company) an operator's, which acts for every company."""
    if operator != (company_id is None):
        raise ValueError("a token is either one company's or an operator's")
    token = new_token()
    await conn.execute(
        GATEWAY_QUERIES["token_insert"],
        {
            "id": uuid.uuid4(),
            "company_id": company_id,
            "token_hash": hash_token(token),
            "label": label,
            "operator": operator,
            "now": None,
        },
    )
    return token


async def revoke_token(conn: db.AsyncConn, token_or_id: str) -> uuid.UUID | None:
    """Revoke by the token itself or by its id; returns the id revoked, None if none was."""
    token_hash: str | None = None
    token_id: uuid.UUID | None = None
    if token_or_id.startswith(TOKEN_PREFIX):
        token_hash = hash_token(token_or_id)
    else:
        try:
            token_id = uuid.UUID(token_or_id)
        except ValueError:
            return None
    cur = await conn.execute(
        GATEWAY_QUERIES["token_revoke_by_hash_or_id"],
        {"token_hash": token_hash, "id": token_id, "now": None},
    )
    row = await cur.fetchone()
    return row["id"] if row else None


async def verify_api_token(conn: db.AsyncConn, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        return None
    presented = hash_token(token)
    cur = await conn.execute(GATEWAY_QUERIES["token_get_active_by_hash"], {"token_hash": presented})
    row = await cur.fetchone()
    # The lookup already matched on the hash; comparing again in constant time keeps the
    # decision itself free of timing differences whatever the index does.
    if row is None or not hmac.compare_digest(str(row["token_hash"]), presented):
        return None
    return Principal(
        company_id=str(row["company_id"] or ""), token_id=row["id"], operator=row["operator"]
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, payload: str) -> str:
    # v2: the payload carries the parent token ("t"). v1 tokens had none; signing under a
    # new domain string refuses them without a format check that could be got wrong.
    return _b64(hmac.new(secret, b"pgjobs-stream-v2." + payload.encode(), hashlib.sha256).digest())


def mint_stream_token(
    secret: bytes,
    company_id: str,
    job_id: uuid.UUID | None,
    ttl_seconds: int,
    *,
    parent: uuid.UUID,
    now: float | None = None,
) -> tuple[str, datetime]:
    """A signed stream token and its expiry. ``parent``: the id of the API token it is
    minted with; the stream token works only while that one is active."""
    expires = int((time.time() if now is None else now) + ttl_seconds)
    body = {"c": company_id, "j": str(job_id) if job_id else None, "t": str(parent), "e": expires}
    payload = _b64(json.dumps(body, separators=(",", ":")).encode())
    return f"{payload}.{_sign(secret, payload)}", datetime.fromtimestamp(expires, UTC)


def verify_stream_token(secret: bytes, token: str, *, now: float | None = None) -> Principal | None:
    """The stream token's principal if its signature and expiry are good. Whether its
    parent is still active is the caller's question (a database read)."""
    # Tokens are base64url: anything else is not one (and hmac.compare_digest raises
    # TypeError on non-ASCII str, which would answer 500 instead of 401).
    if len(token) > MAX_STREAM_TOKEN_LENGTH or token.count(".") != 1 or not token.isascii():
        return None
    payload, signature = token.split(".")
    if not hmac.compare_digest(_sign(secret, payload), signature):
        return None
    try:
        body: Any = json.loads(_unb64(payload))
        company = body["c"]
        job = uuid.UUID(body["j"]) if body["j"] is not None else None
        parent = uuid.UUID(body["t"])
        expires = body["e"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if not isinstance(company, str) or not isinstance(expires, int):
        return None
    if expires <= (time.time() if now is None else now):
        return None
    return Principal(company_id=company, token_id=parent, job_scope=job)
