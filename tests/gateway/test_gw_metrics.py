"""Prometheus metrics and a worker's health port, scraped during real runs (issue 17).

The counters are process-wide (every worker and gateway of this pytest process adds to
them), so each test compares a scrape after its jobs with one before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import uuid
from pathlib import Path

import httpx
import psycopg
from gateway_helpers import TLS, RunningGateway, kill_listener
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from helpers import claim_one, fast_settings, fetch, job_status, running_worker, wait_until
from pgjobs import db, metrics, rescuer
from pgjobs.client import Client
from pgjobs.context import JobContext
from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.queries import QUERIES
from pgjobs.registry import Registry
from pgjobs.worker import Worker

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

WORKER_FAMILIES = {
    "pgjobs_jobs",
    "pgjobs_oldest_queued_age_seconds",
    "pgjobs_transitions",
    "pgjobs_handler_duration_seconds",
    "pgjobs_rescues",
    "pgjobs_retries",
    "pgjobs_lease_losses",
    "pgjobs_listen_reconnects",
    "pgjobs_listen_connected",
    "pgjobs_db_pool_in_use",
    "pgjobs_db_pool_waiting",
}
GATEWAY_FAMILIES = {
    "pgjobs_jobs",
    "pgjobs_notification_lag_seconds",
    "pgjobs_sse_subscribers",
    "pgjobs_listen_reconnects",
    "pgjobs_listen_connected",
    "pgjobs_db_pool_in_use",
    "pgjobs_db_pool_waiting",
}


class Scrape:
    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples: Samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in self.families.values()
            for s in f.samples
        }

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=20.0, verify=TLS) as http:
        r = await http.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return Scrape(r.text)


def _worker_url(worker: Worker, path: str) -> str:
    assert worker.health is not None
    assert worker.health.port is not None
    return f"http://127.0.0.1:{worker.health.port}{path}"


def _registry(release: asyncio.Event) -> Registry:
    registry = Registry()

    async def ok(ctx: JobContext) -> dict[str, int]:
        return {"attempt": ctx.attempt}

    async def flaky(ctx: JobContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")

    async def held(ctx: JobContext) -> None:
        # Waits for the test, then writes progress and finishes: by then the job may
        # have been rescued, and both writes are fenced off.
        await release.wait()
        await ctx.progress(0.5)

    registry.register("ok", ok)
    registry.register("flaky", flaky)
    registry.register("held", held)
    return registry


async def test_worker_and_gateway_metrics_move_as_jobs_complete_retry_and_are_rescued(
    gateway: RunningGateway, dsn: str, storage_dir: Path
) -> None:
    release = asyncio.Event()
    settings = fast_settings(storage_dir, metrics_port=0, concurrency=4)
    client = Client(gateway.state.pool)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    # Claimed an hour ago by a worker that vanished: its lease has run out, so the
    # worker's rescuer returns it to the queue, and then runs it.
    orphan = await client.enqueue("acme", "ok", run_at=past)
    await claim_one(dsn, "ghost", now=past)
    async with running_worker(dsn, _registry(release), settings) as worker:
        metrics_url = _worker_url(worker, "/metrics")
        before = await scrape(metrics_url)
        gw_before = await scrape(f"{gateway.url}/metrics")
        assert set(before.families) >= WORKER_FAMILIES
        assert set(gw_before.families) >= GATEWAY_FAMILIES
        assert before.get("pgjobs_listen_connected", channel="pgjobs_work") == 1
        assert gw_before.get("pgjobs_listen_connected", channel="pgjobs_events") == 1

        jobs = [await client.enqueue("acme", "ok") for _ in range(3)]
        flaky = await client.enqueue("acme", "flaky")

        async def all_done() -> bool:
            ids = [orphan.id, flaky.id, *(j.id for j in jobs)]
            return all([await job_status(dsn, i) == "done" for i in ids])

        await wait_until(all_done, message="every job done")
        # The completer counts a batch once its commit's reply is back, which may be a
        # moment after the test's own connection sees the jobs done.
        after = before

        async def counted() -> bool:
            nonlocal after
            after = await scrape(metrics_url)
            return all(
                after.get("pgjobs_transitions_total", job_type=t, event="done")
                - before.get("pgjobs_transitions_total", job_type=t, event="done")
                >= n
                for t, n in (("ok", 4), ("flaky", 1))
            )

        await wait_until(counted, message="the completions counted")

        def delta(name: str, **labels: str) -> float:
            return after.get(name, **labels) - before.get(name, **labels)

        assert delta("pgjobs_transitions_total", job_type="ok", event="running") == 4
        assert delta("pgjobs_transitions_total", job_type="ok", event="done") == 4
        assert delta("pgjobs_transitions_total", job_type="ok", event="retrying") == 1
        assert delta("pgjobs_transitions_total", job_type="flaky", event="running") == 2
        assert delta("pgjobs_transitions_total", job_type="flaky", event="retrying") == 1
        assert delta("pgjobs_transitions_total", job_type="flaky", event="done") == 1
        assert delta("pgjobs_retries_total", job_type="flaky") == 1
        assert delta("pgjobs_retries_total", job_type="ok") == 0
        assert delta("pgjobs_rescues_total", job_type="ok") == 1
        assert delta("pgjobs_handler_duration_seconds_count", job_type="ok", outcome="done") == 4
        assert (
            delta("pgjobs_handler_duration_seconds_count", job_type="flaky", outcome="error") == 1
        )

        # The gateway heard those transitions: its lag histogram has samples now.
        async def lag_observed() -> bool:
            gw_after = await scrape(f"{gateway.url}/metrics")
            return gw_after.get("pgjobs_notification_lag_seconds_count") > gw_before.get(
                "pgjobs_notification_lag_seconds_count"
            )

        await wait_until(lag_observed, message="notification lag observed")

        # A lease loss: a job rescued (as another worker's rescuer would) while its
        # handler waits; the next heartbeat finds the lease gone and stops the handler.
        held = await client.enqueue("acme", "held", max_attempts=1)

        async def running() -> bool:
            return await job_status(dsn, held.id) == "running"

        await wait_until(running, message="held job running")
        losses = await scrape(metrics_url)
        future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        assert [j.id for j in await rescuer.rescue_expired_with(dsn, now=future)] == [held.id]

        async def loss_counted() -> bool:
            now = await scrape(metrics_url)
            return (
                not worker._running
                and now.get("pgjobs_lease_losses_total", write="heartbeat")
                - losses.get("pgjobs_lease_losses_total", write="heartbeat")
                == 1
            )

        await wait_until(loss_counted, message="the lost lease counted")
        assert await job_status(dsn, held.id) == "failed"  # by the rescue, no attempt left
        after_loss = await scrape(metrics_url)
        abandoned = {"job_type": "held", "outcome": "abandoned"}
        assert (
            after_loss.get("pgjobs_handler_duration_seconds_count", **abandoned)
            - losses.get("pgjobs_handler_duration_seconds_count", **abandoned)
            == 1
        )


async def test_worker_finish_and_progress_lease_losses_are_counted(
    dsn: str, storage_dir: Path
) -> None:
    """With a heartbeat too slow to notice first, a rescued job's handler writes its
    progress and then its finish, and both find the lease gone."""
    release = asyncio.Event()
    settings = fast_settings(
        storage_dir, metrics_port=0, lease_seconds=60.0, heartbeat_seconds=30.0
    )
    async with running_worker(dsn, _registry(release), settings) as worker:
        client = await Client.connect(dsn, max_size=1)
        try:
            held = await client.enqueue("acme", "held", max_attempts=1)
        finally:
            await client.close()

        async def running() -> bool:
            return await job_status(dsn, held.id) == "running"

        await wait_until(running, message="held job running")
        before = await scrape(_worker_url(worker, "/metrics"))
        future = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        await rescuer.rescue_expired_with(dsn, now=future)
        release.set()

        async def released() -> bool:
            return not worker._running

        await wait_until(released, message="the handler's result discarded")
        after = await scrape(_worker_url(worker, "/metrics"))
    for write in ("progress", "finish"):
        assert (
            after.get("pgjobs_lease_losses_total", write=write)
            - before.get("pgjobs_lease_losses_total", write=write)
            == 1
        ), write


async def test_queue_depth_from_sql_is_cached(dsn: str) -> None:
    """pgjobs_jobs and the oldest queued age, read from pgjobs.job_queue, at most once
    per cache period however often it is scraped."""
    now = [1000.0]
    depth = metrics.QueueDepth(
        QUERIES["job_queue_depth_by_type"], cache_seconds=5.0, clock=lambda: now[0]
    )
    client = await Client.connect(dsn, max_size=2)
    try:
        long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=10)
        await client.enqueue("acme", "render", run_at=long_ago)
        await client.enqueue("globex", "render")
        await client.enqueue(
            "acme", "render", run_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
        )
        await client.enqueue("acme", "mail")
        await claim_one(dsn, "w")  # the oldest due: the long-ago render
        await depth.refresh(client.pool)
        gauges = Scrape(_render(depth))
        assert gauges.get("pgjobs_jobs", job_type="render", status="queued") == 1
        assert gauges.get("pgjobs_jobs", job_type="render", status="scheduled") == 1
        assert gauges.get("pgjobs_jobs", job_type="render", status="running") == 1
        assert gauges.get("pgjobs_jobs", job_type="mail", status="queued") == 1
        assert 0 <= gauges.get("pgjobs_oldest_queued_age_seconds", job_type="mail") < 300

        await client.enqueue("acme", "mail", run_at=long_ago)
        now[0] += 4.9
        await depth.refresh(client.pool)  # within the cache period: not read again
        assert Scrape(_render(depth)).get("pgjobs_jobs", job_type="mail", status="queued") == 1
        now[0] += 0.2
        await depth.refresh(client.pool)
        gauges = Scrape(_render(depth))
        assert gauges.get("pgjobs_jobs", job_type="mail", status="queued") == 2
        assert gauges.get("pgjobs_oldest_queued_age_seconds", job_type="mail") >= 600
    finally:
        await client.close()


def _render(depth: metrics.QueueDepth) -> str:
    return generate_latest(depth).decode()


async def test_gateway_counts_subscribers_and_listen_reconnects(gateway: RunningGateway) -> None:
    client = Client(gateway.state.pool)
    job = await client.enqueue("acme", "render")
    before = await scrape(f"{gateway.url}/metrics")
    assert before.get("pgjobs_sse_subscribers", kind="job") == 0
    async with (
        gateway.http() as http,
        http.stream("GET", f"/api/companies/acme/content-jobs/{job.id}/events") as stream,
    ):
        assert stream.status_code == 200

        async def subscribed() -> bool:
            now = await scrape(f"{gateway.url}/metrics")
            return now.get("pgjobs_sse_subscribers", kind="job") == 1

        await wait_until(subscribed, message="the stream counted")
    assert await kill_listener(gateway.state.dsn) == 1

    async def reconnected() -> bool:
        now = await scrape(f"{gateway.url}/metrics")
        return now.get("pgjobs_listen_reconnects_total", channel="pgjobs_events") > before.get(
            "pgjobs_listen_reconnects_total", channel="pgjobs_events"
        )

    await wait_until(reconnected, message="the reconnect counted")


async def test_worker_health_port(dsn: str, storage_dir: Path) -> None:
    registry = _registry(asyncio.Event())
    settings = fast_settings(storage_dir, metrics_port=0)
    async with (
        running_worker(dsn, registry, settings) as worker,
        httpx.AsyncClient(timeout=20.0, verify=TLS) as http,
    ):
        assert (await http.get(_worker_url(worker, "/healthz"))).json() == {"status": "ok"}
        r = await http.get(_worker_url(worker, "/readyz"))
        assert r.status_code == 200, r.text
        assert set(r.json()["checks"].values()) == {"ok"}
        assert set(r.json()["checks"]) == {
            "database", "listener", "claiming", "listener_loop", "heartbeat", "rescuer",
            "completer", "scheduler",
        }  # fmt: skip

        # The worker's LISTEN connection drops: counted, and it comes back.
        before = await scrape(_worker_url(worker, "/metrics"))
        await fetch(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'pgjobs-listen %%' AND datname = current_database()",
        )

        async def reconnected() -> bool:
            now = await scrape(_worker_url(worker, "/metrics"))
            return now.get("pgjobs_listen_reconnects_total", channel="pgjobs_work") > before.get(
                "pgjobs_listen_reconnects_total", channel="pgjobs_work"
            )

        await wait_until(reconnected, message="the reconnect counted")

        # The LISTEN connection down (as the listener marks it while it reconnects).
        assert worker.listener is not None
        worker.listener.connected.clear()
        r = await http.get(_worker_url(worker, "/readyz"))
        assert r.status_code == 503
        assert r.json()["checks"]["listener"] == "reconnecting"
        worker.listener.connected.set()

        # A loop that died makes the worker unready, and /readyz says which.
        worker._loops["rescuer"].cancel()
        r = await http.get(_worker_url(worker, "/readyz"))
        assert r.status_code == 503
        assert r.json()["status"] == "unavailable"
        assert r.json()["checks"]["rescuer"] == "stopped"
        assert r.json()["checks"]["database"] == "ok"


async def test_lag_samples_read_their_audit_rows_by_key(dsn: str, client: Client) -> None:
    """The lag metric's sampled rows are read by their primary key (job_id, seq): the audit
    log has no index on id alone (sql/0016), and a scan of it on every scrape would grow
    with the log. A sample whose row is gone (pruned) is skipped."""
    jobs = [await client.enqueue("acme", "echo") for _ in range(3)]
    query = GATEWAY_QUERIES["job_events_age_by_keys"]
    sampler = metrics.LagSampler(query)
    for job in jobs:
        sampler.received(job.id, 1)
    sampler.received(uuid.uuid4(), 1)
    pool = await db.open_pool(dsn, min_size=1, max_size=1)
    try:
        assert await sampler.observe(pool) == 3
    finally:
        await pool.close()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET enable_seqscan = off")  # an index that serves it is used
        cur = await conn.execute(
            "EXPLAIN (FORMAT JSON) " + query,  # type: ignore[operator]
            {"job_ids": [j.id for j in jobs], "seqs": [1] * len(jobs)},
        )
        plan = json.dumps((await cur.fetchone())[0])  # type: ignore[index]
    # Only the key: a full scan of another index that holds id (the company cursor's) is
    # no better than a scan of the table.
    assert set(re.findall(r'"Index Name": "(\w+)"', plan)) == {"job_events_pkey"}, plan
    assert '"Seq Scan"' not in plan, plan
