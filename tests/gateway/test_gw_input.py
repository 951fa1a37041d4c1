"""Hostile request bodies (reliability.md G4-G6, G8): every one is a 4xx with
{"error": ...}, never a 500, and nothing is written."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from gateway_helpers import RunningGateway, uvicorn_log

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
@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_or_mistyped_body_is_400(
    shared_gateway: RunningGateway, body: bytes
) -> None:
    r = await post_raw(shared_gateway, body)
    assert r.status_code == 400, r.text
    assert set(r.json()) == {"error"}
    await assert_nothing_written(shared_gateway)


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
@pytest.mark.asyncio(loop_scope="module")
async def test_input_postgres_cannot_store_is_422(
    shared_gateway: RunningGateway, body: bytes
) -> None:
    r = await post_raw(shared_gateway, body)
    assert r.status_code == 422, r.text
    message = r.json()["error"]
    assert message
    assert "_" not in message.split()[0]  # fields are named in camelCase
    await assert_nothing_written(shared_gateway)


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
            r = await http.post(
                JOBS, content=chunked(), headers={"Content-Type": "application/json"}
            )
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


ENQUEUE = b'{"jobType": "echo"}'
NOT_JSON = {"error": "Content-Type must be application/json"}


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "application/json; charset=iso-8859-1",
        "",
    ],
)
async def test_a_body_not_sent_as_json_is_415(
    gateway: RunningGateway, content_type: str | None
) -> None:
    """Issue 19: a body the client did not declare as JSON is refused, not parsed as JSON
    all the same (nor, on the optional body of stream-tokens, ignored)."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    async with gateway.http() as http:
        r = await http.post(JOBS, content=ENQUEUE, headers=headers)
        assert r.status_code == 415, r.text
        assert r.json() == NOT_JSON
        r = await http.post(
            "/api/companies/acme/stream-tokens", content=b'{"ttlSeconds": 1}', headers=headers
        )
        assert r.status_code == 415, r.text
        assert r.json() == NOT_JSON
    await assert_nothing_written(gateway)


async def test_a_submit_without_body_or_content_type_is_415(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        r = await http.post(JOBS)
    assert r.status_code == 415
    assert r.json() == NOT_JSON


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "Application/JSON;charset=UTF-8",
        'application/json; charset="utf-8"',
    ],
)
async def test_json_with_or_without_a_utf8_charset_is_accepted(
    gateway: RunningGateway, content_type: str
) -> None:
    async with gateway.http() as http:
        r = await http.post(JOBS, content=ENQUEUE, headers={"Content-Type": content_type})
        assert r.status_code == 202, r.text
        r = await http.post(
            "/api/companies/acme/stream-tokens",
            content=b'{"ttlSeconds": 1}',
            headers={"Content-Type": content_type},
        )
        assert r.status_code == 201, r.text


async def test_posts_that_take_no_body_need_no_content_type(gateway: RunningGateway) -> None:
    job = await gateway.state.client.enqueue("acme", "echo", {})
    async with gateway.http() as http:
        r = await http.post("/api/companies/acme/stream-tokens")  # the body is optional
        assert r.status_code == 201, r.text
        r = await http.post(f"{JOBS}/{job.id}/cancel")
        assert r.status_code == 202, r.text
        r = await http.post(f"{JOBS}/{job.id}/retry")
        assert r.status_code == 202, r.text


async def test_a_client_that_leaves_mid_upload_is_one_info_line(
    gateway: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 19: Starlette's ClientDisconnect was logged as an unhandled 500, with a
    traceback, by the gateway and again by uvicorn."""
    caplog.set_level(logging.INFO, logger="pgjobs")
    host, port = gateway.url.removeprefix("http://").split(":")
    async with uvicorn_log() as uvicorn_records:
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            f"POST {JOBS} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {gateway.tokens['acme']}\r\n"
            "Content-Length: 100000\r\n\r\n".encode()
            + b'{"jobType": "echo", "input": {"x": "'
        )
        await writer.drain()
        writer.close()  # with 99,963 bytes of the body still to come
        await writer.wait_closed()

        async def logged() -> bool:
            return any(JOBS in r.getMessage() for r in caplog.records)

        await wait_until(logged, message="the disconnect logged")
    gateway_lines = [r for r in caplog.records if r.name.startswith("pgjobs.gateway")]
    assert [(r.levelno, r.exc_info) for r in gateway_lines] == [(logging.INFO, None)]
    assert "left during POST /api/companies/acme/content-jobs" in gateway_lines[0].getMessage()
    assert [r.getMessage() for r in uvicorn_records if r.levelno >= logging.WARNING] == []
    await assert_nothing_written(gateway)
