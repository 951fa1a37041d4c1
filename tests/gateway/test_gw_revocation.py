"""Revocation revokes (issue 19): revoking an API token makes the stream tokens minted
from it invalid at once and ends the event streams opened with either within seconds."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import uuid
from pathlib import Path

from gateway_helpers import RunningGateway, collect, serve_gateway, settings

from helpers import ROOT, wait_until
from pgjobs import db
from pgjobs.gateway import auth

BASE = "/api/companies/acme"


async def revoke_with_the_cli(dsn: str, token: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgjobs", "token", "revoke", token,
        env={**os.environ, "PGJOBS_DSN": dsn}, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().startswith("revoked ")


async def test_revoking_a_token_refuses_its_stream_tokens_and_ends_its_open_streams(
    gateway: RunningGateway,
) -> None:
    job = await gateway.state.client.enqueue("acme", "echo", {})
    job_path = f"{BASE}/content-jobs/{job.id}/events"
    company_path = f"{BASE}/events"
    async with gateway.http() as http:
        r = await http.post(f"{BASE}/stream-tokens", json={"jobId": str(job.id)})
        job_token = r.json()["token"]
        company_token = (await http.post(f"{BASE}/stream-tokens")).json()["token"]

    # acme: a job stream and a company stream on stream tokens, a company stream on the
    # Bearer token itself; globex: a stream on its own token, which must be left alone.
    acme_streams = [
        asyncio.create_task(collect(gateway, f"{job_path}?streamToken={job_token}", company=None)),  # type: ignore[arg-type]
        asyncio.create_task(
            collect(gateway, f"{company_path}?streamToken={company_token}", company=None)  # type: ignore[arg-type]
        ),
        asyncio.create_task(collect(gateway, company_path)),
    ]
    globex_stream = asyncio.create_task(
        collect(gateway, "/api/companies/globex/events", company="globex", stop_after=1)
    )

    async def all_open() -> bool:
        return gateway.state.slots.total == 4 and gateway.state.revocations.tokens == 2

    await wait_until(all_open, within=10, message="four streams open")
    assert not any(task.done() for task in acme_streams)

    await revoke_with_the_cli(gateway.state.dsn, gateway.tokens["acme"])
    revoked_at = time.monotonic()

    # At once: the stream tokens and the API token are refused.
    async with gateway.http(None) as anon:
        for path, token in ((job_path, job_token), (company_path, company_token)):
            r = await anon.get(path, params={"streamToken": token})
            assert r.status_code == 401, (path, r.text)
            assert r.json() == {"error": "missing or invalid token"}
    async with gateway.http() as http:
        assert (await http.get(job_path)).status_code == 401
        assert (await http.post(f"{BASE}/stream-tokens")).status_code == 401

    # Within 5 s: every acme stream ends, as a complete response (collect returns).
    await asyncio.wait_for(asyncio.gather(*acme_streams), timeout=5)
    assert time.monotonic() - revoked_at < 5

    async def released() -> bool:
        return gateway.state.slots.total == 1 and gateway.state.revocations.tokens == 1

    await wait_until(released, within=20, message="the ended streams let go")
    # globex's stream is still open and still delivers.
    assert not globex_stream.done()
    other = await gateway.state.client.enqueue("globex", "echo", {})
    (event,) = await asyncio.wait_for(globex_stream, timeout=10)
    assert event.data["jobId"] == str(other.id)


def _v1_stream_token(secret: bytes, company: str, expires: int) -> str:
    """A stream token of the first format: no parent token id, signed as v1 was."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    payload = b64(json.dumps({"c": company, "j": None, "e": expires}).encode())
    mac = hmac.new(secret, b"pgjobs-stream-v1." + payload.encode(), hashlib.sha256).digest()
    return f"{payload}.{b64(mac)}"


async def test_a_stream_token_without_a_parent_is_refused(gateway: RunningGateway) -> None:
    secret = gateway.state.settings.secret
    old = _v1_stream_token(secret, "acme", int(time.time()) + 300)
    async with gateway.http(None) as anon:
        r = await anon.get(f"{BASE}/events", params={"streamToken": old})
        assert r.status_code == 401
        # A well-signed token whose parent is not an API token of the company.
        for parent in (uuid.uuid4(), await _token_id(gateway, "globex")):
            token, _ = auth.mint_stream_token(secret, "acme", None, 300, parent=parent)
            r = await anon.get(f"{BASE}/events", params={"streamToken": token})
            assert r.status_code == 401, parent
        # The same, with acme's own token as parent, works.
        token, _ = auth.mint_stream_token(
            secret, "acme", None, 300, parent=await _token_id(gateway, "acme")
        )
        async with anon.stream("GET", f"{BASE}/events", params={"streamToken": token}) as r:
            assert r.status_code == 200


async def _token_id(gateway: RunningGateway, company: str) -> uuid.UUID:
    async with gateway.state.pool.connection() as conn:
        principal = await auth.verify_api_token(conn, gateway.tokens[company])
    assert principal is not None
    return principal.token_id


def test_a_stream_token_payload_without_a_parent_is_refused() -> None:
    """Even signed with the current key and domain, a payload must name its parent."""
    secret = b"k" * 32
    token, _ = auth.mint_stream_token(secret, "acme", None, 60, parent=uuid.uuid4(), now=1000.0)
    assert auth.verify_stream_token(secret, token, now=1000.0) is not None
    payload = base64.urlsafe_b64encode(b'{"c":"acme","j":null,"e":2000}').decode().rstrip("=")
    forged = f"{payload}.{auth._sign(secret, payload)}"
    assert auth.verify_stream_token(secret, forged, now=1000.0) is None


async def test_streams_still_end_after_a_revocation_check_failed(
    dsn: str, storage_dir: Path
) -> None:
    """A check that cannot reach the database (here: the pool's only connection is
    held) is retried at the next interval; the revocation is late, never lost."""
    tight = settings(pool_size=1, pool_timeout_seconds=0.2, revocation_check_seconds=0.2)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        stream = asyncio.create_task(collect(gateway, f"{BASE}/events"))
        revocations = gateway.state.revocations

        async def tracked() -> bool:
            return revocations.tokens == 1

        await wait_until(tracked, within=10, message="stream open")
        async with gateway.state.pool.connection():

            async def failed() -> bool:
                return revocations.failures >= 1

            await wait_until(failed, within=10, message="a failed check")
        async with await db.connect(dsn) as conn:
            assert await auth.revoke_token(conn, gateway.tokens["acme"]) is not None
        await asyncio.wait_for(stream, timeout=5)
