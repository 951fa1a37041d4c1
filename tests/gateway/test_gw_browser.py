"""A real browser's EventSource on a job: queued -> running -> progress -> done, live,
through the gateway losing its LISTEN connection mid-job, with no gap, all through the
one `status` listener a page of the content-jobs API has."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import RunningGateway, kill_listener

from helpers import fast_settings, running_worker, wait_until
from pgjobs import demo

CHROMIUM = "/usr/bin/chromium"
# `make test` installs chromium first; in CI a missing browser is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
    reason="needs Debian's chromium (make test installs it)",
)

# The page's code as docs/gateway.md shows it: one listener, for `status`.
OPEN_STREAM = """([url]) => {
  window.seen = [];
  window.es = new EventSource(url);
  window.es.addEventListener("status", (e) => window.seen.push(
    {event: e.type, id: e.lastEventId, data: JSON.parse(e.data)}));
}"""


async def launch(p: Any) -> Any:
    return await p.chromium.launch(
        executable_path=CHROMIUM,
        args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
        ],
    )  # fmt: skip


async def stream_url(gateway: RunningGateway, job_id: str) -> str:
    """A job's event stream as a page opens it: with a stream token in the URL."""
    async with gateway.http() as http:
        r = await http.post("/api/companies/acme/stream-tokens", json={"jobId": job_id})
    return f"/api/companies/acme/content-jobs/{job_id}/events?streamToken={r.json()['token']}"


async def new_page(browser: Any, gateway: RunningGateway) -> Any:
    page = await browser.new_page()
    await page.goto(gateway.url + "/healthz")  # same origin as the stream
    return page


async def test_eventsource_sees_the_job_live_through_a_listen_reconnect(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    from playwright.async_api import async_playwright

    async with gateway.http() as http:
        r = await http.post(
            "/api/companies/acme/content-jobs",
            json={"jobType": "sleep", "input": {"seconds": 2.5}},
        )
        job_id = r.json()["jobId"]
    url = await stream_url(gateway, job_id)

    async with async_playwright() as p:
        browser = await launch(p)
        try:
            page = await new_page(browser, gateway)
            await page.evaluate(OPEN_STREAM, [url])

            async def seen() -> list[dict[str, Any]]:
                events: list[dict[str, Any]] = await page.evaluate("window.seen")
                return events

            async def has(type_: str) -> bool:
                return any(e["data"]["type"] == type_ for e in await seen())

            await wait_until(
                lambda: has("content_job.queued"), message="the first event in the browser"
            )
            first = (await seen())[0]
            assert first["data"]["status"] == "queued"
            reconnects = gateway.state.listener.reconnects
            async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
                await wait_until(
                    lambda: has("content_job.progress"), message="progress in the browser"
                )
                assert await kill_listener(dsn) == 1
                await wait_until(
                    lambda: has("content_job.done"), within=30, message="done in the browser"
                )
            assert gateway.state.listener.reconnects > reconnects

            async def closed() -> bool:
                state: int = await page.evaluate("window.es.readyState")
                return state == 2  # reconnect after the final event got 204: EventSource stops

            await wait_until(closed, within=15, message="EventSource closed")
            events = await seen()
        finally:
            await browser.close()

    assert {e["event"] for e in events} == {"status"}
    types = [e["data"]["type"] for e in events]
    assert types == [
        "content_job.queued",
        "content_job.running",
        *["content_job.progress"] * 10,
        "content_job.done",
    ]
    statuses = [e["data"]["status"] for e in events]
    assert statuses == ["queued", *["running"] * 11, "done"]
    seqs = [int(e["id"]) for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert [e["data"]["seq"] for e in events] == seqs


async def test_eventsource_comes_back_after_the_database_was_busy(
    dsn: str, storage_dir: Path
) -> None:
    """The gateway's only pool connection is taken when the browser opens the stream. A
    503 would close EventSource for good (readyState 2); the gateway's 200 with a
    ``retry:`` makes it reconnect on its own, and the job's first event then arrives."""
    from gateway_helpers import serve_gateway, settings
    from playwright.async_api import async_playwright

    tight = settings(pool_size=1, pool_timeout_seconds=0.3)
    async with serve_gateway(dsn, storage_dir, tight) as gateway:
        job = await gateway.state.client.enqueue("acme", "echo", {})
        url = await stream_url(gateway, str(job.id))
        async with async_playwright() as p:
            browser = await launch(p)
            try:
                page = await new_page(browser, gateway)
                async with gateway.state.pool.connection():
                    await page.evaluate(OPEN_STREAM, [url])
                    await page.evaluate(
                        "window.errors = 0; window.es.onerror = () => { window.errors += 1; }"
                    )

                    async def refused() -> bool:
                        errors: int = await page.evaluate("window.errors")
                        return errors >= 1

                    await wait_until(refused, within=15, message="the busy answer")
                    # After a 503 Chrome closes the EventSource (readyState 2) within a
                    # few hundred ms of the first error; here it must keep reconnecting.
                    states = []
                    for _ in range(15):
                        states.append(await page.evaluate("window.es.readyState"))
                        await asyncio.sleep(0.1)
                    assert 2 not in states, f"EventSource gave up: {states}"

                async def got_status() -> bool:
                    seen: list[dict[str, Any]] = await page.evaluate("window.seen")
                    return any(e["event"] == "status" for e in seen)

                await wait_until(got_status, within=15, message="the event after reconnecting")
            finally:
                await browser.close()
