"""Property-based fuzzing of every route: whatever a client sends, the answer is never a
500, and every error is {"error": ...}. Hypothesis drives a sync client from a thread
while the real server runs on the test's event loop."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
from gateway_helpers import TLS, RunningGateway
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import wait_until
from pgjobs.gateway import openapi

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)
enqueue_bodies = st.fixed_dictionaries(
    {},
    optional={
        "jobType": st.one_of(st.text(max_size=250), json_values),
        "input": json_values,
        "sourceTaskId": st.one_of(st.text(), json_values),
        "priority": st.one_of(st.integers(), json_values),
        "runAt": st.one_of(st.datetimes().map(str), st.text(), json_values),
        "maxAttempts": st.one_of(st.integers(), json_values),
        "jobId": st.one_of(st.uuids().map(str), st.text()),
        "ttlSeconds": st.one_of(st.integers(), json_values),
    },
)
segments = st.one_of(
    st.uuids().map(str), st.text(min_size=1, max_size=40), st.sampled_from(["acme", "globex"])
)
bodies = st.one_of(
    enqueue_bodies.map(lambda b: ("json", b)),
    json_values.map(lambda b: ("json", b)),
    st.binary(max_size=200).map(lambda b: ("raw", b)),
)
queries = st.dictionaries(
    st.sampled_from(["limit", "status", "cursor", "streamToken", "x"]),
    st.text(max_size=30),
    max_size=3,
)
ROUTES = [
    (path, method)
    for path, item in openapi.SCHEMA["paths"].items()
    for method in item
    if method != "parameters"
]


def fill(path: str, company: str, ident: str) -> str:
    for name in ("{jobId}", "{assetId}"):
        path = path.replace(name, httpx.URL("/" + ident).raw_path.decode()[1:] or "x")
    return path.replace("{companyId}", company)


async def test_no_route_answers_500(gateway: RunningGateway) -> None:
    job = await gateway.state.client.enqueue("acme", "echo", {})
    token = gateway.tokens["acme"]
    failures: list[str] = []

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        route=st.sampled_from(ROUTES),
        company=st.sampled_from(["acme", "globex", "nobody"]),
        ident=st.one_of(st.just(str(job.id)), segments),
        body=bodies,
        params=queries,
        last_event_id=st.one_of(st.none(), st.text(max_size=30).filter(str.isprintable)),
        authorised=st.booleans(),
        # Mostly declared JSON, so that the bodies reach the parser rather than a 415.
        content_type=st.sampled_from(
            ["application/json", "application/json; charset=utf-8", None, "text/plain"]
        ),
    )
    def fuzz(
        route: tuple[str, str],
        company: str,
        ident: str,
        body: tuple[str, Any],
        params: dict[str, str],
        last_event_id: str | None,
        authorised: bool,
        content_type: str | None,
    ) -> None:
        path, method = route
        headers = {"Authorization": f"Bearer {token}"} if authorised else {}
        if last_event_id is not None and last_event_id.isascii():
            headers["Last-Event-ID"] = last_event_id
        kind, payload = body
        kwargs: dict[str, Any] = {"params": params, "headers": headers}
        if method == "post":
            # json.dumps allows NaN/Infinity by default: exactly what a sloppy client sends.
            kwargs["content"] = json.dumps(payload).encode() if kind == "json" else payload
            if content_type is not None:
                headers["Content-Type"] = content_type
        with httpx.Client(base_url=gateway.url, timeout=10, verify=TLS) as http:
            try:
                with http.stream(method.upper(), fill(path, company, ident), **kwargs) as r:
                    status = r.status_code
                    ctype = r.headers.get("content-type", "")
                    if "event-stream" in ctype:
                        return  # a stream opened; reading it would block
                    text = r.read().decode(errors="replace")
            except (httpx.InvalidURL, httpx.LocalProtocolError):
                return  # httpx refused to send it (e.g. a header value of " "): nothing sent
        if status >= 500 and status != 503:
            failures.append(f"{method} {path} {status} {text[:200]}")
        if status >= 400 and "json" in ctype:
            assert "error" in httpx.Response(200, content=text).json() or path == "/readyz"

    await asyncio.to_thread(fuzz)
    assert failures == []

    # Streams the fuzzer opened and dropped are all given back.
    async def released() -> bool:
        return gateway.state.slots.total == 0 and gateway.state.fanout.subscribers == 0

    await wait_until(released, within=15, message="fuzzed streams released")
