"""Idempotency-Key on POST .../content-jobs (issue 18): a retry gets the first response
and creates nothing; another body with the key is 422; a request still holding the key
makes a retry wait for it, or 409 past the wait; malformed keys are 400; 50 racing
identical POSTs create one job."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from gateway_helpers import RunningGateway, serve_gateway, settings

from helpers import fetch, wait_until
from pgjobs import rescuer
from pgjobs.gateway import idempotency, openapi
from pgjobs.gateway.settings import GatewaySettings

JOBS = "/api/companies/acme/content-jobs"
BODY = {"jobType": "render", "input": {"title": "hi", "n": [1, 2]}, "priority": 2}


async def _jobs(dsn: str, company: str = "acme") -> list[dict[str, Any]]:
    return await fetch(dsn, "SELECT id FROM pgjobs.jobs WHERE company_id = %s", [company])


async def test_a_retry_gets_the_first_response_and_creates_nothing(
    dsn: str, gateway: RunningGateway
) -> None:
    async with gateway.http() as http:
        first = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": "order-1"})
        assert first.status_code == 202, first.text
        assert "idempotent-replayed" not in first.headers
        # The same object, keys re-ordered and re-spaced, and the key in the draft's
        # quoted form: the same request.
        raw = json.dumps(dict(reversed(list(BODY.items()))), indent=2)
        again = await http.post(
            JOBS,
            content=raw,
            headers={"Idempotency-Key": '"order-1"', "Content-Type": "application/json"},
        )
    assert again.status_code == 202
    assert again.content == first.content
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert [r["id"] for r in await _jobs(dsn)] == [uuid.UUID(first.json()["jobId"])]


async def test_the_same_key_with_another_body_is_422(dsn: str, gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        first = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": "k"})
        other = await http.post(
            JOBS, json={**BODY, "priority": 3}, headers={"Idempotency-Key": "k"}
        )
    assert first.status_code == 202
    assert other.status_code == 422
    assert other.json() == {"error": idempotency.REUSED}
    assert len(await _jobs(dsn)) == 1


async def test_keys_are_per_company_and_requests_without_one_are_never_replayed(
    dsn: str, gateway: RunningGateway
) -> None:
    async with gateway.http() as acme, gateway.http("globex") as globex:
        a = await acme.post(JOBS, json=BODY, headers={"Idempotency-Key": "k"})
        g = await globex.post(
            "/api/companies/globex/content-jobs", json=BODY, headers={"Idempotency-Key": "k"}
        )
        plain = [await acme.post(JOBS, json=BODY) for _ in range(2)]
    assert a.status_code == g.status_code == 202
    assert a.json()["jobId"] != g.json()["jobId"]
    assert len({r.json()["jobId"] for r in plain}) == 2
    assert len(await _jobs(dsn)) == 3


@pytest.mark.parametrize(
    "key",
    ["", "has space", "x" * 256, "caf\u00e9", 'a"b', "a\\b", '""', '"unclosed'],
)
async def test_malformed_keys_are_400(dsn: str, gateway: RunningGateway, key: str) -> None:
    async with gateway.http() as http:
        r = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": key.encode()})
    assert r.status_code == 400
    assert r.json() == {"error": idempotency.BAD_KEY}
    assert await _jobs(dsn) == []


async def test_the_longest_key_is_accepted(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        r = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": "~" * 255})
    assert r.status_code == 202


async def test_fifty_concurrent_identical_posts_create_one_job(dsn: str, storage_dir: Path) -> None:
    roomy = settings(pool_size=10, pool_timeout_seconds=60.0, pool_max_waiting=100)
    async with serve_gateway(dsn, storage_dir, roomy) as gw, gw.http() as http:
        responses = await asyncio.gather(
            *(http.post(JOBS, json=BODY, headers={"Idempotency-Key": "burst"}) for _ in range(50))
        )
    assert [r.status_code for r in responses] == [202] * 50
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" in r.headers for r in responses) == 49
    (job,) = await _jobs(dsn)
    assert str(job["id"]) == responses[0].json()["jobId"]


async def _hold_key(dsn: str, body: dict[str, Any], response: dict[str, Any]) -> Any:
    """An open transaction holding key "k" for acme, as a request still in flight does."""
    conn = await psycopg.AsyncConnection.connect(dsn)
    await conn.execute(
        "INSERT INTO pgjobs.idempotency_keys"
        " (company_id, key, request_hash, job_id, response, expires_at)"
        " VALUES ('acme', 'k', %s, %s, %s, now() + interval '1 hour')",
        [idempotency.fingerprint(body), uuid.UUID(response["jobId"]), json.dumps(response)],
    )
    return conn


async def _waiting_on_a_lock(dsn: str) -> bool:
    rows = await fetch(
        dsn,
        "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        " AND query LIKE %s AND datname = current_database()",
        ["%idempotency_keys%"],
    )
    return bool(rows)


async def test_a_retry_waits_for_the_request_holding_the_key_then_replays_it(
    dsn: str, gateway: RunningGateway
) -> None:
    """Deterministic: the retry is seen waiting on the key before the holder commits."""
    first = {
        "jobId": str(uuid.uuid4()),
        "status": "queued",
        "createdAt": "2030-01-01T00:00:00+00:00",
    }
    holder = await _hold_key(dsn, BODY, first)
    try:
        async with gateway.http() as http:
            retry = asyncio.create_task(
                http.post(JOBS, json=BODY, headers={"Idempotency-Key": "k"})
            )
            await wait_until(lambda: _waiting_on_a_lock(dsn), message="the retry to wait")
            await holder.commit()
            r = await retry
    finally:
        await holder.close()
    assert r.status_code == 202
    assert r.json() == first
    assert r.headers["idempotent-replayed"] == "true"
    assert await _jobs(dsn) == []


async def test_a_key_held_past_the_wait_is_409_and_free_once_released(
    dsn: str, storage_dir: Path
) -> None:
    impatient = settings(idempotency_wait_seconds=0.2)
    first = {
        "jobId": str(uuid.uuid4()),
        "status": "queued",
        "createdAt": "2030-01-01T00:00:00+00:00",
    }
    async with serve_gateway(dsn, storage_dir, impatient) as gw, gw.http() as http:
        holder = await _hold_key(dsn, BODY, first)
        try:
            r = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": "k"})
        finally:
            await holder.rollback()
            await holder.close()
        assert r.status_code == 409
        assert r.json() == {"error": idempotency.IN_FLIGHT}
        # The holder rolled back: the key was never used, so the next request takes it.
        r = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": "k"})
    assert r.status_code == 202
    assert "idempotent-replayed" not in r.headers
    assert len(await _jobs(dsn)) == 1


async def test_an_expired_key_is_taken_by_the_next_request(dsn: str, storage_dir: Path) -> None:
    hour = settings(idempotency_seconds=3600.0)
    async with serve_gateway(dsn, storage_dir, hour) as gw, gw.http() as http:
        first = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": "k"})
        (row,) = await fetch(
            dsn,
            "SELECT extract(epoch FROM expires_at - created_at) AS ttl"
            " FROM pgjobs.idempotency_keys",
        )
        assert float(row["ttl"]) == 3600.0
        # Time is an input: the key's expiry is moved into the past instead of waited out.
        await fetch(dsn, "UPDATE pgjobs.idempotency_keys SET expires_at = now() - interval '1s'")
        other_body = await http.post(
            JOBS, json={**BODY, "priority": 9}, headers={"Idempotency-Key": "k"}
        )
        replay = await http.post(
            JOBS, json={**BODY, "priority": 9}, headers={"Idempotency-Key": "k"}
        )
    assert other_body.status_code == 202
    assert other_body.json()["jobId"] != first.json()["jobId"]
    assert replay.content == other_body.content
    assert len(await _jobs(dsn)) == 2


async def test_the_cleanup_deletes_expired_keys_only(dsn: str, gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        for key in ("old", "live"):
            r = await http.post(JOBS, json=BODY, headers={"Idempotency-Key": key})
            assert r.status_code == 202
    await fetch(
        dsn,
        "UPDATE pgjobs.idempotency_keys SET expires_at = now() - interval '1s' WHERE key = 'old'",
    )
    assert await rescuer.delete_released_keys(gateway.state.pool) == 1
    rows = await fetch(dsn, "SELECT key FROM pgjobs.idempotency_keys")
    assert [r["key"] for r in rows] == ["live"]


def test_settings_read_the_idempotency_window_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGJOBS_GATEWAY_IDEMPOTENCY_SECONDS", "600")
    monkeypatch.setenv("PGJOBS_GATEWAY_IDEMPOTENCY_WAIT_SECONDS", "2.5")
    s = GatewaySettings.from_env()
    assert (s.idempotency_seconds, s.idempotency_wait_seconds) == (600.0, 2.5)
    assert GatewaySettings().idempotency_seconds == 86400.0


def test_openapi_describes_the_header_and_its_answers() -> None:
    post = openapi.SCHEMA["paths"]["/api/companies/{companyId}/content-jobs"]["post"]
    (header,) = [p for p in post["parameters"] if p["in"] == "header"]
    assert header["name"] == "Idempotency-Key"
    assert header["required"] is False
    assert {"202", "400", "409", "422"} <= set(post["responses"])
    assert "Idempotency-Key" in post["responses"]["409"]["description"]
    assert "different request body" in post["responses"]["422"]["description"]
    assert "Idempotent-Replayed" in post["responses"]["202"]["headers"]
