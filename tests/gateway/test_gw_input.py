"""Hostile request bodies (reliability.md G4-G6, G8): every one is a 4xx with
{"error": ...}, never a 500, and nothing is written."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from gateway_helpers import RunningGateway

from helpers import wait_until

JOBS = "/api/companies/acme/content-jobs"


async def post_raw(gateway: RunningGateway, body: bytes, **headers: str) -> httpx.Response:
    async with gateway.http() as http:
        return await http.post(
            JOBS, content=body, headers={"Content-Type": "application/json", **headers}
        )


async def assert_nothing_written(gateway: RunningGateway) -> None:
    assert (await gateway.state.client.list("acme")).jobs == []


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b'{"jobType": "echo"',
        b"[]",
        b'"echo"',
        b"null",
        b"42",
        b'{"jobType": "echo", "input": NaN}',
        b'{"jobType": "echo", "input": {"x": Infinity}}',
        b'{"jobType": "echo", "input": {"x": -Infinity}}',
        b'{"jobType": "echo", "jobType": "sleep"}',
        b'{"jobType": "echo", "input": {"a": 1, "a": 2}}',
        b'{"jobType": "echo", "input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"jobType": "echo", "input": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        b'{"jobType": "\xff\xfe"}',
        b'\xef\xbb\xbf{"jobType": "echo"}',
        b'{"jobType": 5}',
        b'{"jobType": ["echo"]}',
        b'{"jobType": "echo", "input": []}',
        b'{"jobType": "echo", "input": "x"}',
        b'{"jobType": "echo", "priority": "1"}',
        b'{"jobType": "echo", "priority": 1.5}',
        b'{"jobType": "echo", "priority": true}',
        b'{"jobType": "echo", "maxAttempts": "3"}',
        b'{"jobType": "echo", "sourceTaskId": 7}',
        b'{"jobType": "echo", "runAt": 1700000000}',
        b'{"jobType": "echo", "runAt": "tomorrow"}',
        b'{"jobType": "echo", "runAt": "2030-01-01T09:00:00"}',
        b'{"jobType": "echo", "job_type": "echo"}',
        b'{"jobType": "echo", "companyId": "globex"}',
    ],
)
async def test_malformed_or_mistyped_body_is_400(gateway: RunningGateway, body: bytes) -> None:
    r = await post_raw(gateway, body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    await assert_nothing_written(gateway)


@pytest.mark.parametrize(
    "body",
    [
        b'{"jobType": "echo", "input": {"x": "a\\u0000b"}}',
        b'{"jobType": "echo", "input": {"a\\u0000": 1}}',
        b'{"jobType": "ec\\u0000ho"}',
        b'{"jobType": "echo", "sourceTaskId": "t\\u0000"}',
        b'{"jobType": "echo", "input": {"x": "\\ud800"}}',
        b'{"jobType": "echo", "input": {"\\udfff": 1}}',
        b'{"jobType": "\\ud83d"}',
        b'{"jobType": "echo", "input": ' + b'{"a":' * 70 + b"1" + b"}" * 70 + b"}",
        b'{"jobType": "' + b"x" * 201 + b'"}',
        b'{"jobType": "echo", "maxAttempts": 0}',
        b'{"jobType": "echo", "maxAttempts": 1001}',
        b'{"jobType": "echo", "priority": 99999999999999999999999999}',
        b'{"jobType": "echo", "input": {"n": 1e400}}',
    ],
)
async def test_input_postgres_cannot_store_is_422(gateway: RunningGateway, body: bytes) -> None:
    r = await post_raw(gateway, body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert message
    assert "_" not in message.split()[0]  # fields are named in camelCase
    await assert_nothing_written(gateway)


async def test_error_names_the_field_in_camel_case(gateway: RunningGateway) -> None:
    r = await post_raw(gateway, b'{"jobType": "echo", "maxAttempts": 0}')
    assert r.json() == {"error": "maxAttempts must be between 1 and 1000"}


async def test_oversized_body_is_413_with_content_length(gateway: RunningGateway) -> None:
    limit = gateway.state.settings.max_body_bytes
    body = b'{"jobType": "echo", "input": {"x": "' + b"a" * limit + b'"}}'
    r = await post_raw(gateway, body)
    assert r.status_code == 413
    assert "error" in r.json()
    await assert_nothing_written(gateway)


async def test_oversized_body_is_413_without_content_length(gateway: RunningGateway) -> None:
    sent = 0

    async def chunked() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"jobType": "echo", "input": {"x": "'
        # Far more than the limit, but the server must stop reading long before the end.
        for _ in range(64):
            sent += 64 * 1024
            yield b"a" * 64 * 1024
        yield b'"}}'

    async with gateway.http() as http:
        try:
            r = await http.post(JOBS, content=chunked())
        except httpx.HTTPError:
            pass  # the server may close the connection while we are still sending
        else:
            assert r.status_code == 413
            assert "content-length" not in r.request.headers
    await assert_nothing_written(gateway)


async def test_input_over_the_input_limit_is_413(gateway: RunningGateway) -> None:
    limit = gateway.state.settings.max_input_bytes
    body = b'{"jobType": "echo", "input": {"x": "' + b"a" * (limit + 10) + b'"}}'
    assert len(body) < gateway.state.settings.max_body_bytes
    r = await post_raw(gateway, body)
    assert r.status_code == 413
    assert "input" in r.json()["error"]


async def test_large_valid_input_is_accepted_and_notifies(gateway: RunningGateway) -> None:
    # Close to 1 MiB of input: stored, and its NOTIFY (ids only) still fits in 8000 bytes.
    payload = {"jobType": "echo", "input": {"blob": "a" * (1000 * 1000)}}
    notifies = gateway.state.fanout.notifies
    async with gateway.http() as http:
        r = await http.post(JOBS, json=payload)
    assert r.status_code == 202
    job = await gateway.state.client.get("acme", r.json()["jobId"])
    assert len(job.input["blob"]) == 1000 * 1000

    async def notified() -> bool:
        return gateway.state.fanout.notifies > notifies

    await wait_until(notified, within=10, message="the enqueue's NOTIFY")


async def test_unknown_route_and_method_are_json(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        r = await http.get("/api/nope")
        assert r.status_code == 404
        assert "error" in r.json()
        r = await http.delete(JOBS)
        assert r.status_code == 405
        assert "error" in r.json()
