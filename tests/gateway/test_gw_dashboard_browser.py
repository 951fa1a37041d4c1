"""The dashboard in a real Chromium, on a real gateway, database and worker: sign in, see
the jobs, watch rows change live, cancel a job, open a job's detail, text from a job
never runs as markup, and every row ends in its database state after the gateway lost
its LISTEN connection. Screenshots go to tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from gateway_helpers import RunningGateway, serve_gateway
from test_gw_browser import CHROMIUM, launch

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db, demo
from pgjobs.gateway.settings import GatewaySettings
from pgjobs.jobspec import JobSpec
from pgjobs.types import iso

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
        reason="needs Debian's chromium (make test installs it)",
    ),
    # One Chromium for the module, each page in a fresh context (its own cookies and
    # storage): starting Playwright's driver and a browser was ~0.7 s of every test. Its
    # objects belong to the event loop that made them, so the tests share the module's.
    pytest.mark.asyncio(loop_scope="module"),
]
_browser: list[Any] = []  # the module's Chromium, while the fixture below holds it


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def chromium() -> AsyncIterator[None]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await launch(p)
        _browser.append(browser)
        try:
            yield
        finally:
            _browser.clear()
            await browser.close()


@pytest_asyncio.fixture(loop_scope="module")
async def gateway(
    dsn: str, storage_dir: Path, gateway_settings: GatewaySettings
) -> AsyncIterator[RunningGateway]:
    """The conftest's gateway, served in the module's event loop."""
    async with serve_gateway(dsn, storage_dir, gateway_settings) as gw:
        yield gw


ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "dashboard"
XSS = "<img src=x onerror=alert(1)>"

# Every row as the page shows it, for the test to compare with the database.
ROWS = """() => [...document.querySelectorAll('#job-rows tr')].map((tr) => ({
  id: tr.dataset.jobId,
  status: tr.dataset.status,
  seq: Number(tr.dataset.seq),
  type: tr.querySelector('.type').textContent,
  source: tr.querySelector('.source').textContent,
  error: tr.querySelector('.error-cell').textContent,
  progress: tr.querySelector('.progress-cell').textContent,
}))"""

# Records each status a row is rendered with, in order (rows are re-rendered in place).
WATCH_ROWS = """() => {
  window.seenStatuses = {};
  const note = (tr) => {
    const list = window.seenStatuses[tr.dataset.jobId] ||= [];
    if (list[list.length - 1] !== tr.dataset.status) list.push(tr.dataset.status);
  };
  document.querySelectorAll('#job-rows tr').forEach(note);
  new MutationObserver((records) => {
    for (const r of records) for (const n of r.addedNodes) if (n.tagName === 'TR') note(n);
  }).observe(document.getElementById('job-rows'), {childList: true});
}"""


def shot(name: str) -> str:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return str(ARTIFACTS / f"{name}.png")


@asynccontextmanager
async def signed_in(
    gateway: RunningGateway,
    token: str | None = None,
    company: str | None = None,
    *,
    live: bool = True,
    **context: Any,
) -> AsyncIterator[Any]:
    """A page at / signed in (as acme unless another token is given; ``company`` for an
    operator's token), its JavaScript dialogs and errors recorded; once its company stream
    is live, unless ``live`` is false (an operator's every-company view has none)."""
    ctx = await _browser[0].new_context(**context)
    try:
        page = await ctx.new_page()
        page.dialogs = []  # type: ignore[attr-defined]
        page.errors = []  # type: ignore[attr-defined]

        async def on_dialog(dialog: Any) -> None:
            page.dialogs.append(dialog.message)  # type: ignore[attr-defined]
            await dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("pageerror", lambda e: page.errors.append(str(e)))  # type: ignore[attr-defined]
        await page.goto(gateway.url + "/")
        await page.get_by_label("API token").fill(token or gateway.tokens["acme"])
        if company is not None:
            await page.get_by_label("Company").fill(company)
        await page.get_by_role("button", name="Sign in").click()
        if live:
            await page.locator("#live[data-state=live]").wait_for(timeout=15_000)
        else:
            await page.locator("#jobs-view").wait_for(timeout=15_000)
        yield page
        assert page.errors == []  # type: ignore[attr-defined]
    finally:
        await ctx.close()


async def rows(page: Any) -> list[dict[str, Any]]:
    shown: list[dict[str, Any]] = await page.evaluate(ROWS)
    return shown


async def row(page: Any, job_id: str) -> dict[str, Any] | None:
    return next((r for r in await rows(page) if r["id"] == job_id), None)


async def db_jobs(dsn: str) -> dict[str, dict[str, Any]]:
    found = await fetch(
        dsn,
        "SELECT id::text, status, event_seq FROM pgjobs.jobs WHERE company_id = 'acme'",
    )
    return {r["id"]: r for r in found}


async def test_jobs_move_live_cancel_works_and_job_text_stays_text(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    client = gateway.state.client
    xss = await client.enqueue(
        "acme", "fail", {"message": XSS, "note": XSS}, source_task_id=XSS, max_attempts=1
    )
    long = await client.enqueue("acme", "sleep", {"seconds": 120})
    other = await client.enqueue("globex", "echo", {})
    async with signed_in(gateway) as page:
        await wait_until(lambda: _shown(page, xss.id, long.id), message="the jobs listed")
        assert await row(page, str(other.id)) is None, "another company's job is not listed"
        await page.evaluate("window.notReloaded = true")
        await page.evaluate(WATCH_ROWS)

        # A job enqueued now appears at the top, queued, without a reload.
        async with gateway.http() as http:
            r = await http.post(
                "/api/companies/acme/content-jobs",
                json={"jobType": "render", "input": {"title": "Live", "steps": 4}},
            )
        render_id = r.json()["jobId"]
        await wait_until(lambda: _status(page, render_id, "queued"), message="new row")
        assert (await rows(page))[0]["id"] == render_id

        async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
            await wait_until(
                lambda: _status(page, render_id, "done"), within=30, message="render done"
            )
            seen = await page.evaluate(f"window.seenStatuses[{json.dumps(render_id)}]")
            assert seen[0] == "queued", seen
            assert seen[-1] == "done", seen
            assert "running" in seen, seen
            await wait_until(lambda: _status(page, str(xss.id), "failed"), message="failed")

            # The overview follows: done and failed in the last hour, per job type.
            async def overview(job_type: str, column: str, value: str) -> bool:
                cell = page.locator(f"#overview-rows tr[data-job-type={job_type}] td.{column}")
                return await cell.count() == 1 and await cell.text_content() == value

            await wait_until(lambda: overview("render", "done", "1"), message="overview")
            await wait_until(lambda: overview("fail", "failed", "1"), message="overview")

            # Cancel the long sleep from its row, through the confirmation.
            await wait_until(lambda: _status(page, str(long.id), "running"), message="running")
            long_row = page.locator(f"tr[data-job-id='{long.id}']")
            assert await long_row.locator("button.retry").is_disabled()
            await long_row.get_by_role("button", name=f"Cancel job {str(long.id)[-8:]}").click()
            await page.locator("#confirm").get_by_role("button", name="Cancel job").click()
            await wait_until(lambda: _status(page, str(long.id), "cancelled"), message="cancel")
            assert (await db_jobs(dsn))[str(long.id)]["status"] == "cancelled"
            long_row = page.locator(f"tr[data-job-id='{long.id}']")
            assert await long_row.locator("button.cancel").is_disabled()
            assert not await long_row.locator("button.retry").is_disabled()

        # Retry it (no worker runs now): queued again, with one more attempt allowed.
        await long_row.get_by_role("button", name=f"Retry job {str(long.id)[-8:]}").click()
        await page.locator("#confirm").get_by_role("button", name="Retry job").click()
        await wait_until(lambda: _status(page, str(long.id), "queued"), message="retried")
        assert (await db_jobs(dsn))[str(long.id)]["status"] == "queued"
        assert await long_row.locator(".attempt").text_content() == "1 / 3"

        # The job's text is shown as text: the markup is visible, nothing ran.
        shown = await row(page, str(xss.id))
        assert shown is not None
        assert shown["source"] == XSS
        assert shown["error"] == f"RuntimeError: {XSS}"
        assert await page.locator("#job-rows img").count() == 0
        assert page.dialogs == []  # type: ignore[attr-defined]
        assert await page.evaluate("window.notReloaded") is True
        ids = [r["id"] for r in await rows(page)]
        assert sorted(ids) == sorted({render_id, str(xss.id), str(long.id)})
        # Short ids tell apart jobs created in the same millisecond (UUIDv7 prefixes don't).
        short = await page.locator("#job-rows .id-cell a").all_text_contents()
        assert len(set(short)) == len(ids), short
        await page.screenshot(path=shot("jobs"), full_page=True)

        # The status filter lists only that status.
        await page.get_by_label("Status").select_option("failed")

        async def only_failed() -> bool:
            return [r["id"] for r in await rows(page)] == [str(xss.id)]

        await wait_until(only_failed, message="the failed job only")
        await page.get_by_label("Status").select_option("")
        await wait_until(lambda: _shown(page, render_id, long.id, xss.id), message="all again")

        # The render job's detail view: its asset, downloaded, is the stored file.
        await page.locator(f"tr[data-job-id='{render_id}'] .id-cell a").click()
        download_button = page.locator("#d-asset button")
        await download_button.wait_for()
        (asset,) = await fetch(
            dsn,
            "SELECT a.sha256 FROM pgjobs.assets a JOIN pgjobs.jobs j"
            " ON j.result_asset_id = a.id WHERE j.id = %s",
            [render_id],
        )
        assert asset["sha256"] in (await page.locator("#d-asset").text_content() or "")
        # The SVG is previewed in an <img> (where it runs no script), under the page's CSP.
        preview = page.locator("#d-asset img.preview")

        async def previewed() -> bool:
            loaded: bool = await preview.evaluate("i => i.complete && i.naturalWidth > 0")
            return loaded

        await preview.wait_for(timeout=15_000)
        await wait_until(previewed, message="the asset previewed")
        assert await preview.get_attribute("alt") == "Preview of card.svg"
        async with page.expect_download() as download_info:
            await download_button.click()
        download = await download_info.value
        content = await asyncio.to_thread(Path(await download.path()).read_bytes)
        assert hashlib.sha256(content).hexdigest() == asset["sha256"]
        assert await page.locator("#d-status").text_content() == "done"

        # The failed job's detail view: input as JSON text, the timeline the audit log holds.
        await page.goto(f"{gateway.url}/#/jobs/acme/{xss.id}")
        timeline = page.locator("#d-timeline li")
        events = await fetch(
            dsn, "SELECT seq, type FROM pgjobs.job_events WHERE job_id = %s ORDER BY seq", [xss.id]
        )

        async def full_timeline() -> bool:
            return await timeline.count() == len(events)

        await wait_until(full_timeline, message="the timeline")
        seqs = await timeline.evaluate_all("items => items.map((li) => Number(li.dataset.seq))")
        assert seqs == [e["seq"] for e in events]
        assert json.loads(await page.locator("#d-input").text_content() or "") == {
            "message": XSS,
            "note": XSS,
        }
        assert await page.locator("#d-source").text_content() == XSS
        assert await page.locator("#d-error").text_content() == f"RuntimeError: {XSS}"
        assert await page.locator("#detail-view img").count() == 0
        assert page.dialogs == []  # type: ignore[attr-defined]
        await page.screenshot(path=shot("detail"), full_page=True)

        # Sign out forgets the token.
        await page.get_by_role("button", name="Sign out").click()
        await page.get_by_label("API token").wait_for()
        assert await page.evaluate("sessionStorage.length") == 0


async def test_rows_end_in_their_database_state_after_the_listen_connection_dies(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    client = gateway.state.client
    async with signed_in(gateway) as page:
        jobs = [await client.enqueue("acme", "sleep", {"seconds": 1.0}) for _ in range(12)]
        reconnects = gateway.state.listener.reconnects
        settings = fast_settings(storage_dir, concurrency=4)
        async with running_worker(dsn, demo.registry, settings):

            async def some_running() -> bool:
                return any(r["status"] == "running" for r in await rows(page))

            await wait_until(some_running, within=30, message="jobs running in the page")
            killed = await fetch(
                dsn,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'pgjobs-gateway-listener'"
                " AND datname = current_database()",
            )
            assert len(killed) == 1
            # More jobs while the gateway is reconnecting: their rows must appear too.
            jobs += [await client.enqueue("acme", "echo", {"n": n}) for n in range(5)]

            async def all_done() -> bool:
                return all(j["status"] == "done" for j in (await db_jobs(dsn)).values())

            await wait_until(all_done, within=60, message="every job done in the database")
        assert gateway.state.listener.reconnects > reconnects

        async def page_matches_database() -> bool:
            want = await db_jobs(dsn)
            shown = await rows(page)
            return {r["id"]: (r["status"], r["seq"]) for r in shown} == {
                i: (j["status"], j["event_seq"]) for i, j in want.items()
            }

        await wait_until(page_matches_database, within=20, message="rows as in the database")
        ids = [r["id"] for r in await rows(page)]
        assert len(ids) == len(set(ids)) == len(jobs), "one row per job, no duplicate"
        await page.screenshot(path=shot("after-listen-reconnect"), full_page=True)


async def test_an_event_older_than_the_listed_record_never_moves_a_row_back(
    gateway: RunningGateway, dsn: str
) -> None:
    """The company stream delivers a job's older events after the page listed the job in
    a newer state: the row must keep the newer one.

    Open write transactions hold the stream's horizon (it reads only events of
    transactions below the oldest one still open). The job is cancelled (seq 2) while
    ``first`` is open and retried (seq 3, queued) while ``second`` is open too; the page
    lists it at seq 3. Ending ``first`` releases seq 1 and 2, and then a marker job
    written in ``middle`` (a transaction that began between the two): once the marker's
    row appears, the page has handled seq 1 and 2, and the row must still be at seq 3."""
    client = gateway.state.client
    first, middle, second = [await db.connect(dsn) for _ in range(3)]
    try:
        await first.execute("BEGIN")
        await first.execute("SELECT pg_current_xact_id()")  # holds the horizon from here
        job = await client.enqueue("acme", "sleep", {"seconds": 60})
        await client.cancel("acme", job.id)
        await middle.execute("BEGIN")
        await middle.execute("SELECT pg_current_xact_id()")
        await second.execute("BEGIN")
        await second.execute("SELECT pg_current_xact_id()")
        await client.retry("acme", job.id)
        async with signed_in(gateway) as page:

            async def listed_at_3() -> bool:
                shown = await row(page, str(job.id))
                return shown is not None and (shown["status"], shown["seq"]) == ("queued", 3)

            await wait_until(listed_at_3, message="the job listed at seq 3")
            await page.evaluate(WATCH_ROWS)
            marker = await client.enqueue("acme", "echo", {}, conn=middle)
            await middle.execute("COMMIT")
            await first.execute("COMMIT")
            await wait_until(lambda: _shown(page, marker.id), message="the marker row")
            seen = await page.evaluate(f"window.seenStatuses[{json.dumps(str(job.id))}]")
            assert seen == ["queued"]
            shown = await row(page, str(job.id))
            assert shown is not None
            assert (shown["status"], shown["seq"]) == ("queued", 3)
    finally:
        for conn in (first, middle, second):
            await conn.close()


async def test_renders_are_coalesced(gateway: RunningGateway) -> None:
    """A burst of events renders at most once every 100 ms (dashboard.js RENDER_MS)."""
    client = gateway.state.client
    jobs = [await client.enqueue("acme", "sleep", {"seconds": 60}) for _ in range(40)]
    async with signed_in(gateway) as page:
        await wait_until(lambda: _shown(page, *(j.id for j in jobs)), message="listed")
        await page.evaluate(
            """() => { window.renders = [];
              new MutationObserver(() => window.renders.push(performance.now()))
                .observe(document.getElementById('job-rows'), {childList: true}); }"""
        )
        for job in jobs:
            await client.cancel("acme", job.id)

        async def all_cancelled() -> bool:
            return all(r["status"] == "cancelled" for r in await rows(page))

        await wait_until(all_cancelled, message="every row cancelled")
        times: list[float] = await page.evaluate("window.renders")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times
    # Observed when each render's mutations are delivered, i.e. after the render: a
    # render that took longer than the next one shortens the gap seen between them, so
    # the bound here is looser than 100 ms. Rendering per event puts them ~0 ms apart.
    assert all(gap >= 50 for gap in gaps), gaps


async def test_narrow_dark_screen(gateway: RunningGateway) -> None:
    await gateway.state.client.enqueue("acme", "echo", {"hello": "phone"}, source_task_id="t-1")
    async with signed_in(
        gateway, viewport={"width": 390, "height": 800}, color_scheme="dark"
    ) as page:
        await page.locator("#job-rows tr").first.wait_for()
        # No worker runs: the queued job says that none serves its type.
        status = page.locator("#job-rows tr .status")
        assert await status.text_content() == "queuedno live worker for this type"
        # No sideways scrolling on a phone: the table becomes one card per job.
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 390
        # Every control is reachable from the keyboard and named.
        names = await page.evaluate(
            """() => [...document.querySelectorAll(
                     'button, a[href], select, input, textarea, summary')]
                 .filter((e) => e.offsetParent !== null)
                 .map((e) => e.getAttribute('aria-label') || e.labels?.[0]?.textContent
                             || e.textContent.trim())"""
        )
        assert all(names), names
        await page.keyboard.press("Tab")
        focused = await page.evaluate("document.activeElement.tagName")
        assert focused in ("A", "BUTTON", "SELECT", "INPUT", "TEXTAREA", "SUMMARY")
        await page.screenshot(path=shot("narrow-dark"), full_page=True)


async def _shown(page: Any, *job_ids: object) -> bool:
    ids = {r["id"] for r in await rows(page)}
    return all(str(j) in ids for j in job_ids)


async def _status(page: Any, job_id: str, status: str) -> bool:
    shown = await row(page, job_id)
    return shown is not None and shown["status"] == status


async def test_an_operator_signs_in_to_any_company_and_sees_tracebacks(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """An operator's token opens whichever company it names at sign-in; a company's token
    shows that company's jobs only. A job's timeline shows each transition's time and
    worker, and a failed attempt's traceback to the operator only."""
    from pgjobs import db
    from pgjobs.gateway import auth

    async with await db.connect(gateway.state.dsn) as conn:
        operator = await auth.create_token(conn, None, "ops", operator=True)
    client = gateway.state.client
    acme_job = await client.enqueue("acme", "fail", {"message": "kaput"}, max_attempts=1)
    globex_job = await client.enqueue("globex", "echo", {})
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):

        async def ended() -> bool:
            jobs = [
                await client.get("acme", acme_job.id),
                await client.get("globex", globex_job.id),
            ]
            return all(j.status.value in ("done", "failed") for j in jobs)

        await wait_until(ended, within=30, message="both jobs ended")
    for company, job, other in (("acme", acme_job, globex_job), ("globex", globex_job, acme_job)):
        async with signed_in(gateway, operator, company) as page:
            await wait_until(lambda j=job: _shown(page, j.id), within=15, message="listed")
            assert await page.locator("#company").text_content() == company
            assert not await _shown(page, other.id)
            if company == "acme":
                await page.goto(f"{gateway.url}/#/jobs/acme/{acme_job.id}")
                traceback = page.locator("#d-timeline details.traceback pre")
                await traceback.wait_for(state="attached", timeout=15_000)  # folded away
                assert "RuntimeError: kaput" in (await traceback.text_content() or "")
                first = page.locator("#d-timeline li").first
                assert await first.locator("time").count() == 1
                # Retry all failed: the count first, then one statement.
                await page.goto(f"{gateway.url}/#/jobs")
                await page.get_by_role("button", name="Retry all failed…").click()
                confirm = page.locator("#confirm[open]")  # once the count is in
                await confirm.wait_for(timeout=15_000)
                assert "Queue 1 failed job again?" in (await confirm.text_content() or "")
                await confirm.get_by_role("button", name="Retry 1").click()
                await wait_until(
                    lambda: _status(page, str(acme_job.id), "queued"), message="queued again"
                )
    async with signed_in(gateway) as page:  # acme's own token
        await wait_until(lambda: _shown(page, acme_job.id), within=15, message="listed")
        assert not await _shown(page, globex_job.id)
        await page.goto(f"{gateway.url}/#/jobs/acme/{acme_job.id}")
        items = page.locator("#d-timeline li")

        async def full() -> bool:
            return await items.count() == 4  # queued, running, failed, retrying (bulk)

        await wait_until(full, within=15, message="the timeline")
        assert "worker " in (await items.nth(1).text_content() or "")
        assert await page.locator("#d-timeline details.traceback").count() == 0
        assert await page.locator("#retry-failed").is_hidden()  # operators only


async def test_a_job_submitted_from_the_page_appears_and_runs(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """The submit form offers the types live workers serve, refuses input that is not a
    JSON object with a message (nothing sent), and the job it submits appears and runs."""
    async with (
        running_worker(dsn, demo.registry, fast_settings(storage_dir)),
        signed_in(gateway) as page,
    ):
        await page.get_by_text("Submit a job").click()
        options = page.locator("#submit-type option")
        await options.first.wait_for(state="attached", timeout=15_000)
        offered = await options.evaluate_all("opts => opts.map((o) => o.value)")
        assert offered == sorted(demo.registry.job_types)
        await page.get_by_label("Job type").select_option("render")
        await page.get_by_label("Input (a JSON object)").fill("[1, 2]")
        await page.get_by_role("button", name="Submit", exact=True).click()
        message = page.locator("#submit-message")
        assert "JSON object" in (await message.text_content() or "")
        await page.get_by_label("Input (a JSON object)").fill('{"title": "From the page"}')
        await page.get_by_label("Source task id (optional)").fill("task-42")
        await page.get_by_role("button", name="Submit", exact=True).click()

        async def submitted() -> bool:
            return (await message.text_content() or "").startswith("Submitted ")

        await wait_until(submitted, within=15, message="the 202")
        job_id = (await message.text_content() or "").removeprefix("Submitted ").rstrip(".")
        await wait_until(lambda: _status(page, job_id, "done"), within=30, message="done, live")
        (job,) = await fetch(
            dsn, "SELECT job_type, input, source_task_id FROM pgjobs.jobs WHERE id = %s", [job_id]
        )
        assert job == {
            "job_type": "render",
            "input": {"title": "From the page"},
            "source_task_id": "task-42",
        }
        (count,) = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs")
        assert count["n"] == 1  # the refused input sent nothing


async def test_the_overview_charts_completions_and_shows_operators_the_workers(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """The overview draws the last hour's completions per minute, marks a queued type no
    live worker serves, and lists the live workers for an operator (not for a company)."""
    from pgjobs import db
    from pgjobs.gateway import auth

    async with await db.connect(gateway.state.dsn) as conn:
        operator = await auth.create_token(conn, None, "ops", operator=True)
    client = gateway.state.client
    jobs = [await client.enqueue("acme", "echo", {}) for _ in range(3)]
    await client.enqueue("acme", "transcode", {})  # no worker has this type
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir, concurrency=4)):

        async def echoes_done() -> bool:
            statuses = [(await client.get("acme", j.id)).status.value for j in jobs]
            return statuses == ["done"] * len(jobs)

        await wait_until(echoes_done, within=30, message="the echo jobs done")
        async with signed_in(gateway, operator, "acme") as page:
            chart = page.locator("#completions")

            async def charted() -> bool:
                return await chart.get_attribute("data-total") == "3"

            await wait_until(charted, within=20, message="three completions charted")
            assert await chart.locator("rect").count() == 60
            unserved = page.locator("#overview-rows tr[data-job-type=transcode] .unserved-note")
            await unserved.wait_for(timeout=15_000)
            worker = page.locator("#worker-rows tr")
            await worker.first.wait_for(timeout=15_000)
            assert await worker.count() == 1
            assert "0 / 4" in (await worker.first.text_content() or "")
        async with signed_in(gateway) as page:  # acme's own token: no infrastructure
            await wait_until(charted_total(page, "3"), within=20, message="charted")
            assert await page.locator("#workers-panel").is_hidden()


def charted_total(page: Any, total: str) -> Any:
    async def charted() -> bool:
        return await page.locator("#completions").get_attribute("data-total") == total

    return charted


async def test_jobs_filter_by_type_and_source_task_and_a_job_id_opens_it(
    gateway: RunningGateway,
) -> None:
    client = gateway.state.client
    render = await client.enqueue("acme", "render", {}, source_task_id="task-7")
    echo = await client.enqueue("acme", "echo", {}, source_task_id="task-7")
    other = await client.enqueue("acme", "render", {}, source_task_id="task-8")
    async with signed_in(gateway) as page:
        await wait_until(lambda: _shown(page, render.id, echo.id, other.id), message="listed")
        type_options = page.locator("#type-filter option")

        async def types_offered() -> bool:
            values = await type_options.evaluate_all("opts => opts.map((o) => o.value)")
            return values == ["", "echo", "render"]

        await wait_until(types_offered, within=20, message="the types from the overview")
        await page.get_by_label("Type", exact=True).select_option("render")

        async def only(*wanted: object) -> bool:
            return sorted(r["id"] for r in await rows(page)) == sorted(map(str, wanted))

        await wait_until(lambda: only(render.id, other.id), message="render jobs only")
        # A job of another type arriving live stays out of the filtered table.
        late = await client.enqueue("acme", "echo", {}, source_task_id="task-7")
        late_render = await client.enqueue("acme", "render", {}, source_task_id="task-7")
        await wait_until(lambda: only(render.id, other.id, late_render.id), message="live")
        await page.get_by_label("Type", exact=True).select_option("")
        search = page.get_by_label("Job id or source task")
        await search.fill("task-7")
        await page.get_by_role("button", name="Find").click()
        await wait_until(
            lambda: only(render.id, echo.id, late.id, late_render.id), message="task-7's jobs"
        )
        await search.fill(str(other.id).upper())
        await page.get_by_role("button", name="Find").click()
        await page.locator("#detail-view").wait_for()
        assert await page.locator("#d-id").text_content() == str(other.id)


# A row's times as the page shows them: the exact ISO time (the hover title) of started and
# finished, and the duration's text.
TIMES = """(id) => {
  const tr = document.querySelector(`#job-rows tr[data-job-id="${id}"]`);
  if (!tr) return null;
  const iso = (cls) => tr.querySelector(`td.${cls} time`)?.getAttribute('title') ?? null;
  return {status: tr.dataset.status, created: iso('created'), started: iso('started'),
          finished: iso('finished'), duration: tr.querySelector('td.duration').textContent};
}"""


async def test_rows_show_started_finished_and_duration_kept_live(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    """A listed row that events move to running, and then to an end, shows the times the
    database holds for the job (exact ISO on hover) and its duration, without a reload: a
    running job's duration grows, an ended one's is started to finished."""
    client = gateway.state.client
    # A blocking sleep reports no progress while it runs: no event re-renders its row.
    long = await client.enqueue("acme", "sleep_sync", {"seconds": 120})
    quick = await client.enqueue("acme", "echo", {})

    async def database(job_id: object) -> dict[str, str | None]:
        job = await client.get("acme", job_id)
        return {
            "status": job.status.value,
            "created": iso(job.created_at),
            "started": iso(job.started_at),
            "finished": iso(job.finished_at),
        }

    async def shown(page: Any, job_id: object) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await page.evaluate(TIMES, str(job_id))
        return found

    async with signed_in(gateway) as page:
        await wait_until(lambda: _shown(page, long.id, quick.id), message="listed, queued")
        before = await shown(page, long.id)
        assert before is not None
        assert (before["started"], before["finished"], before["duration"]) == (None, None, "—")
        await page.evaluate("window.notReloaded = true")

        async def as_in_database(job_id: object, status: str) -> bool:
            row = await shown(page, job_id)
            want = await database(job_id)
            return (
                row is not None
                and want["status"] == status
                and {k: row[k] for k in want} == want
                and row["duration"] != "—"
            )

        async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
            await wait_until(lambda: as_in_database(quick.id, "done"), within=30, message="done")
            await wait_until(
                lambda: as_in_database(long.id, "running"), within=30, message="running"
            )
            # The same row element (not a re-render) shows a growing duration.
            first = await page.evaluate(
                """(id) => { window.longRow = document.querySelector(
                               `#job-rows tr[data-job-id="${id}"]`);
                             return window.longRow.querySelector('td.duration').textContent; }""",
                str(long.id),
            )

            async def grew() -> bool:
                now: str | None = await page.evaluate(
                    """() => window.longRow.isConnected
                             ? window.longRow.querySelector('td.duration').textContent : null"""
                )
                assert now is not None, "the running row was re-rendered"
                return now != first

            await wait_until(grew, within=20, message="the running duration growing")
            await client.cancel("acme", long.id)
            await wait_until(lambda: as_in_database(long.id, "cancelled"), message="cancelled")
        done = await database(quick.id)
        assert done["started"] is not None
        assert done["finished"] is not None
        assert await page.evaluate("window.notReloaded") is True
        await page.screenshot(path=shot("times"), full_page=True)


async def test_an_operator_sees_every_company_and_picks_one_a_company_sees_its_own(
    gateway: RunningGateway,
) -> None:
    """An operator signed in without naming a company sees every company's figures (GET
    /api/stats) and a picker of the companies; picking one lists and follows its jobs.
    A company's token gets neither the picker nor the other companies."""
    from pgjobs.gateway import auth

    async with await db.connect(gateway.state.dsn) as conn:
        operator = await auth.create_token(conn, None, "ops", operator=True)
    client = gateway.state.client
    acme_jobs = [await client.enqueue("acme", "echo", {}) for _ in range(2)]
    globex_job = await client.enqueue("globex", "render", {})
    picker_label = "Which companies to show"
    async with signed_in(gateway, operator, live=False) as page:
        companies = page.locator("#company-rows tr")

        async def both_companies() -> bool:
            return await companies.count() == 2

        await wait_until(both_companies, within=20, message="both companies in the overview")
        assert await companies.evaluate_all("rs => rs.map((r) => r.dataset.companyId)") == [
            "acme",
            "globex",
        ]
        assert (
            await page.locator("#company-rows tr[data-company-id=acme] td.queued").text_content()
            == "2"
        )
        assert (
            await page.locator("#company-rows tr[data-company-id=globex] td.queued").text_content()
            == "1"
        )
        by_type = page.locator("#overview-rows tr")
        assert await by_type.evaluate_all("rs => rs.map((r) => r.dataset.jobType)") == [
            "echo",
            "render",
        ]
        picker = page.get_by_label(picker_label)
        options = await picker.locator("option").evaluate_all("os => os.map((o) => o.value)")
        assert options == ["", "acme", "globex"]
        assert await picker.input_value() == ""
        # No jobs table in this view (jobs are followed one company at a time), and it says so.
        assert await page.locator("#company-jobs").is_hidden()
        assert await page.locator("#all-companies-note").is_visible()
        await page.screenshot(path=shot("all-companies"), full_page=True)
        # A job's detail and back: the picker still lists every company.
        await page.goto(f"{gateway.url}/#/jobs/globex/{globex_job.id}")
        await page.locator("#d-status .badge").wait_for()
        await page.goto(f"{gateway.url}/#/jobs")
        await page.locator("#all-companies-note").wait_for()
        options = await picker.locator("option").evaluate_all("os => os.map((o) => o.value)")
        assert options == ["", "acme", "globex"]

        # Pick acme: its jobs, live, and none of globex's.
        await picker.select_option("acme")
        await page.locator("#live[data-state=live]").wait_for(timeout=15_000)
        await wait_until(lambda: _shown(page, *(j.id for j in acme_jobs)), message="acme's jobs")
        assert not await _shown(page, globex_job.id)
        late = await client.enqueue("acme", "echo", {"late": True})
        await wait_until(lambda: _shown(page, late.id), message="a new acme job, live")
        # A company's name in the every-company table opens it too.
        await picker.select_option("")
        await page.locator("#company-rows tr[data-company-id=globex] button").click()
        await wait_until(lambda: _shown(page, globex_job.id), message="globex's job")
        assert not await _shown(page, *(j.id for j in acme_jobs))
        assert await picker.input_value() == "globex"

    async with signed_in(gateway) as page:  # acme's own token
        await wait_until(lambda: _shown(page, *(j.id for j in acme_jobs)), message="listed")
        assert not await _shown(page, globex_job.id)
        assert await page.get_by_label(picker_label).is_hidden()
        assert await page.locator("#companies-panel").is_hidden()
        status = await page.evaluate(
            """async () => (await fetch('/api/stats', {headers: {Authorization:
                 `Bearer ${sessionStorage.getItem('pgjobs.token')}`}})).status"""
        )
        assert status == 403
        await page.goto(f"{gateway.url}/#/jobs/globex/{globex_job.id}")
        error = page.locator("#d-error")

        async def refused() -> bool:
            return (await error.text_content() or "") != ""

        await wait_until(refused, message="globex's job refused")
        assert await page.locator("#d-type").text_content() == ""


async def test_a_burst_of_new_jobs_reads_pages_not_each_job(gateway: RunningGateway) -> None:
    """300 jobs enqueued at once while the page is open: the page reads the newest page
    again (a request or two) instead of each new job (300 requests), and the table keeps
    one page of rows, the newest, as in the database."""
    import re

    client = gateway.state.client
    first = await client.enqueue("acme", "echo", {})
    async with signed_in(gateway) as page:
        await wait_until(lambda: _shown(page, first.id), message="listed")
        single = re.compile(r"/content-jobs/[0-9a-f-]{36}$")
        singles: list[str] = []
        page.on("request", lambda r: singles.append(r.url) if single.search(r.url) else None)
        jobs = await client.enqueue_many(JobSpec("acme", "echo") for _ in range(300))
        newest = await fetch(
            gateway.state.dsn,
            "SELECT id::text FROM pgjobs.jobs WHERE company_id = 'acme'"
            " ORDER BY created_at DESC, id DESC LIMIT 50",
        )

        async def newest_page() -> bool:
            return [r["id"] for r in await rows(page)] == [r["id"] for r in newest]

        await wait_until(newest_page, within=30, message="the newest 50 jobs, in order")
        assert len(jobs) == 300
        # The first event of the burst may come alone (read one by one), the rest not.
        assert len(singles) <= 10, len(singles)
        assert await page.locator("#load-older").is_visible()
