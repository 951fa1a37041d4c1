"""Concurrency and rate limits, enforced by the claim (issue 18, sql/0014_limits.sql).

What ran at once is read from the audit log, never from timings: a job's running interval
is its content_job.running event to its terminal event, ordered by event id (a claim that
found a slot free saw the completion that freed it committed, so its running event's id
comes after that completion's event). Rate windows are counted from the running events'
created_at, the claim transaction's now(), which is what the claim's windows use."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from bouncer import Bouncer
from helpers import (
    fast_settings,
    fetch,
    running_worker,
    start_worker_process,
    stop_worker_process,
    wait_until,
)
from pgjobs import db, doorbell, limits, worker
from pgjobs.client import Client
from pgjobs.config import WorkerSettings
from pgjobs.context import JobContext
from pgjobs.errors import InvalidJobError, LockTimeoutError
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES, compact, positional
from pgjobs.registry import Registry

TERMINAL = ("content_job.done", "content_job.failed", "content_job.cancelled")


def _registry() -> Registry:
    registry = Registry()

    @registry.handler("render")
    async def render(ctx: JobContext) -> None:
        # Simulated work, so that jobs overlap: the limit is what keeps them apart.
        await asyncio.sleep(0.02)

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        return None

    return registry


async def _set(dsn: str, **kwargs: Any) -> limits.Limit:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        return await limits.set_limit(conn, **kwargs)


async def _workers_until_done(
    dsn: str,
    settings: WorkerSettings,
    jobs: int,
    *,
    workers: int,
    within: float,
    worker_dsn: str | None = None,
) -> None:
    """Run ``workers`` workers (each its own pool, on ``worker_dsn`` or ``dsn``) until
    ``jobs`` jobs are done."""
    async with AsyncExitStack() as stack:
        for _ in range(workers):
            await stack.enter_async_context(
                running_worker(worker_dsn or dsn, _registry(), settings)
            )
        await wait_until(
            lambda: _all_done(dsn, jobs), within=within, message=f"all {jobs} jobs done"
        )


async def _most_at_once(dsn: str, company: str, job_type: str) -> int:
    """The most jobs of (company, job_type) running at once, from the audit log."""
    rows = await fetch(
        dsn,
        "SELECT e.type FROM pgjobs.job_events e JOIN pgjobs.jobs j ON j.id = e.job_id"
        " WHERE j.company_id = %s AND j.job_type = %s"
        " AND e.type IN ('content_job.running', 'content_job.retrying', %s, %s, %s)"
        " ORDER BY e.id",
        [company, job_type, *TERMINAL],
    )
    running = most = 0
    for row in rows:
        running += 1 if row["type"] == "content_job.running" else -1
        most = max(most, running)
    return most


async def _last_start(dsn: str, company: str) -> int:
    """The audit id of the company's last job start: which company's jobs kept flowing."""
    rows = await fetch(
        dsn,
        "SELECT max(e.id) AS id FROM pgjobs.job_events e"
        " WHERE e.company_id = %s AND e.type = 'content_job.running'",
        [company],
    )
    return int(rows[0]["id"])


async def _all_done(dsn: str, count: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'done'")
    return bool(rows[0]["n"] == count)


async def _registered(dsn: str, count: int) -> bool:
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.workers")
    return bool(rows[0]["n"] == count)


async def test_a_company_limited_to_two_renders_never_runs_more_across_workers(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """Three workers (each its own pool), five slots each; acme may run 2 renders at once.
    50 queued: never more than 2 running, all finish, and another company's renders keep
    flowing meanwhile (they are all done before acme's last render starts)."""
    await _set(dsn, company_id="acme", job_type="render", max_running=2)
    await client.enqueue_many(JobSpec("acme", "render") for _ in range(50))
    await client.enqueue_many(JobSpec("beta", "render") for _ in range(30))
    settings = fast_settings(storage_dir, concurrency=5)
    await _workers_until_done(dsn, settings, 80, workers=3, within=60)
    assert await _most_at_once(dsn, "acme", "render") <= 2
    assert await _last_start(dsn, "beta") < await _last_start(dsn, "acme")


async def test_three_worker_processes_never_run_more_than_a_companys_limit(
    dsn: str, client: Client
) -> None:
    """The same across processes: three `pgjobs worker` processes (five slots each, the
    demo's `sleep` handler), acme may run 2 sleeps at once; 50 of acme's queued and 30 of
    beta's: never more than 2 of acme's running at once (the audit log's running
    intervals), all 80 finish, and beta's flow meanwhile (all started before acme's
    last). Nothing coordinates the processes but the database. The jobs are enqueued once
    all three have registered: a process that started late on a loaded machine could find
    the work done already, and the test would not show three."""
    await _set(dsn, company_id="acme", job_type="sleep", max_running=2)
    nap = {"seconds": 0.05}
    procs = [
        start_worker_process(
            dsn,
            handlers="pgjobs.demo:registry",
            worker_id=f"limited-{i}",
            extra=["--job-types", "sleep", "--concurrency", "5"],
            env={"PGJOBS_POLL_INTERVAL_SECONDS": "0.3"},
        )
        for i in range(3)
    ]
    try:
        await wait_until(lambda: _registered(dsn, 3), within=60, message="three workers up")
        await client.enqueue_many(JobSpec("acme", "sleep", input=nap) for _ in range(50))
        await client.enqueue_many(JobSpec("beta", "sleep", input=nap) for _ in range(30))
        await wait_until(lambda: _all_done(dsn, 80), within=120, message="all 80 jobs done")
    finally:
        logs = [stop_worker_process(proc) for proc in procs]
    workers = await fetch(
        dsn,
        "SELECT DISTINCT e.worker_id FROM pgjobs.job_events e WHERE e.type = 'content_job.running'",
    )
    assert {row["worker_id"] for row in workers} == {f"limited-{i}" for i in range(3)}, logs
    assert await _most_at_once(dsn, "acme", "sleep") <= 2
    assert await _last_start(dsn, "beta") < await _last_start(dsn, "acme")


async def test_a_rate_of_20_per_second_holds_in_every_window(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """100 jobs, 20 starts a second for the type, three workers with ten slots each (30
    could start at once): no one-second window (the claim's fixed windows) has more than
    20 starts, over the five or six windows the jobs need."""
    await _set(dsn, job_type="echo", max_starts=20, period_seconds=1.0)
    await client.enqueue_many(JobSpec(f"c{i % 4}", "echo") for i in range(100))
    settings = fast_settings(storage_dir, concurrency=10)
    await _workers_until_done(dsn, settings, 100, workers=3, within=90)
    rows = await fetch(
        dsn,
        "SELECT floor(extract(epoch FROM created_at))::bigint AS w, count(*) AS n"
        " FROM pgjobs.job_events WHERE type = 'content_job.running' GROUP BY 1",
    )
    per_window = {r["w"]: r["n"] for r in rows}
    assert sum(per_window.values()) == 100
    assert max(per_window.values()) <= 20, per_window


async def test_a_freed_slot_wakes_a_worker_without_the_poll(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """max_running 1 and a poll interval of a minute: five jobs finish one after another
    within the deadline only because each completion wakes a claim."""
    await _set(dsn, job_type="echo", max_running=1)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(5))
    settings = fast_settings(storage_dir, concurrency=4, poll_interval_seconds=60.0)
    await _workers_until_done(dsn, settings, 5, workers=2, within=30)
    assert await _most_at_once(dsn, "acme", "echo") == 1


async def test_a_rate_window_ending_wakes_a_worker_without_the_poll(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """2 starts per second and a poll interval of a minute: six jobs finish within the
    deadline only because the worker looks again when a window ends."""
    await _set(dsn, company_id="acme", max_starts=2, period_seconds=1.0)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(6))
    settings = fast_settings(storage_dir, concurrency=4, poll_interval_seconds=60.0)
    async with running_worker(dsn, _registry(), settings):
        await wait_until(lambda: _all_done(dsn, 6), within=30, message="all 6 jobs done")


async def test_a_batch_cut_short_by_a_limit_is_claimed_again_at_once(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """Four slots; acme may run one job, beta's three have no limit; every handler waits
    until all four slots are taken. The first claim shares its four between acme and beta
    (two each), the limit holds one of acme's back, and the batch comes back one short:
    the worker claims again at once for beta's third job, with no wake-up from elsewhere
    (no handler ends, no NOTIFY, a poll interval of a minute)."""
    release = asyncio.Event()
    registry = Registry()

    @registry.handler("render")
    async def render(ctx: JobContext) -> None:
        await release.wait()

    await _set(dsn, company_id="acme", max_running=1)
    settings = fast_settings(storage_dir, concurrency=4, poll_interval_seconds=60.0)

    async def four_running() -> bool:
        rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status = 'running'")
        return bool(rows[0]["n"] == 4)

    async with running_worker(dsn, registry, settings):
        await client.enqueue_many(
            [JobSpec("acme", "render") for _ in range(3)]
            + [JobSpec("beta", "render") for _ in range(3)]
        )
        try:
            await wait_until(four_running, within=20, message="four jobs running")
        finally:
            release.set()
        await wait_until(lambda: _all_done(dsn, 6), within=30, message="all 6 jobs done")
    assert await _most_at_once(dsn, "acme", "render") == 1


async def test_a_limit_set_while_a_worker_runs_holds_and_cleared_lets_jobs_flow(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """A worker that has only claimed without limits (there were none) keeps to a limit set
    while it runs: acme's two renders run (each waits until released), acme is then
    limited to 2 running, and acme's and beta's echo jobs are queued in one statement:
    beta's run, acme's stay queued (the claim that took beta's passed them by). Cleared
    while the renders still run, the limit lets acme's echo jobs start (found by the
    poll), and the worker claims through the plain claim again."""
    release = asyncio.Event()
    registry = Registry()

    @registry.handler("render")
    async def render(ctx: JobContext) -> None:
        await release.wait()

    @registry.handler("echo")
    async def echo(ctx: JobContext) -> None:
        return None

    async def statuses(company: str, job_type: str) -> Counter[str]:
        rows = await fetch(
            dsn,
            "SELECT status FROM pgjobs.jobs WHERE company_id = %s AND job_type = %s",
            [company, job_type],
        )
        return Counter(r["status"] for r in rows)

    settings = fast_settings(storage_dir, concurrency=10)
    try:
        async with running_worker(dsn, registry, settings) as w:
            await client.enqueue_many(JobSpec("acme", "render") for _ in range(2))

            async def renders_running() -> bool:
                return (await statuses("acme", "render"))["running"] == 2

            await wait_until(renders_running, within=20, message="acme's renders running")
            await _set(dsn, company_id="acme", max_running=2)
            await client.enqueue_many(
                [JobSpec("acme", "echo") for _ in range(3)]
                + [JobSpec("beta", "echo") for _ in range(3)]
            )

            async def beta_done() -> bool:
                return (await statuses("beta", "echo"))["done"] == 3

            await wait_until(beta_done, within=20, message="beta's echo jobs done")
            assert await statuses("acme", "echo") == {"queued": 3}
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                assert await limits.clear_limit(conn, company_id="acme")

            async def acme_done() -> bool:
                return (await statuses("acme", "echo"))["done"] == 3

            await wait_until(acme_done, within=30, message="acme's echo jobs done")
            assert await statuses("acme", "render") == {"running": 2}
            assert w._limited is False
    finally:
        release.set()


async def test_limits_hold_through_pgbouncer_in_transaction_mode(
    dsn: str,
    pgbouncer: Bouncer,
    client: Client,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limited claim's pipeline (the locks, then the claim, one implicit transaction)
    through PgBouncer in transaction mode, two workers (LISTEN direct): acme never runs
    more than 2 renders at once, and all 20 finish."""
    monkeypatch.setenv("PGJOBS_LISTEN_DSN", dsn)
    await _set(dsn, company_id="acme", job_type="render", max_running=2)
    await client.enqueue_many(JobSpec("acme", "render") for _ in range(20))
    bouncer_dsn = pgbouncer.dsn(dsn)
    settings = fast_settings(storage_dir, concurrency=5)
    await _workers_until_done(dsn, settings, 20, workers=2, within=60, worker_dsn=bouncer_dsn)
    assert await _most_at_once(dsn, "acme", "render") <= 2


async def _claim_limited(
    dsn: str, limit: int, now: dt.datetime | None = None, job_types: list[str] | None = None
) -> list[dict[str, Any]]:
    params = {
        "now": now,
        "limit": limit,
        "worker_id": "w",
        "lease_seconds": 30.0,
        "job_types": job_types,
        "after_company": None,
    }
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        conn.transaction(),
    ):
        await conn.execute(QUERIES["limit_lock_for_types"], params)
        cur = await conn.execute(QUERIES["job_claim_batch_limited"], params)
        return await cur.fetchall()


async def test_the_claim_takes_the_room_left_and_holds_back_the_rest(
    dsn: str, client: Client
) -> None:
    """Per company, per type and per (company, type), each keeps its bound; jobs no limit
    covers fill the batch."""
    await _set(dsn, company_id="acme", max_running=3)
    await _set(dsn, job_type="render", max_running=4)
    await _set(dsn, company_id="beta", job_type="render", max_running=1)
    for company in ("acme", "beta", "gamma"):
        await client.enqueue_many(JobSpec(company, "render") for _ in range(5))
        await client.enqueue_many(JobSpec(company, "echo") for _ in range(5))
    first = await _claim_limited(dsn, 100)
    assert first[0]["held_back"] > 0
    # A batch a limit held jobs back from may come back short (a job held back by one
    # limit still counts against the others); the worker claims again at once, as here,
    # until a claim holds nothing back. Nothing finishes meanwhile.
    claims = [first]
    while claims[-1] and claims[-1][0]["held_back"]:
        claims.append(await _claim_limited(dsn, 100))
    taken = Counter((r["company_id"], r["job_type"]) for claim in claims for r in claim)
    assert sum(n for (c, _), n in taken.items() if c == "acme") == 3
    assert sum(n for (_, t), n in taken.items() if t == "render") == 4
    assert taken["beta", "render"] == 1
    assert taken["beta", "echo"] == taken["gamma", "echo"] == 5
    assert await _claim_limited(dsn, 100) == []


async def test_a_worker_claim_waits_for_the_locks_and_counts_what_their_holder_claimed(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """acme may run 1 job; two are queued. Another claim holds the limit's lock and has
    claimed one (not committed yet): the worker's claim, sent as one pipeline, waits for
    the lock, and once the holder commits, counts that job running and claims nothing
    (its snapshot is taken under the lock, not before it)."""
    await _set(dsn, company_id="acme", max_running=1)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(2))
    w = worker.Worker(dsn, _registry(), fast_settings(storage_dir))
    w._pool = await db.open_pool(dsn, min_size=1, max_size=2)
    params = {
        "now": None,
        "limit": 1,  # so that it locks that one job only (a job held back stays locked)
        "worker_id": "holder",
        "lease_seconds": 30.0,
        "job_types": None,
        "after_company": None,
    }

    async def waiting_for_the_lock() -> bool:
        rows = await fetch(
            dsn,
            "SELECT count(*) AS n FROM pg_stat_activity"
            " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'",
        )
        return bool(rows[0]["n"] == 1)

    try:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, row_factory=dict_row
        ) as holder:
            async with holder.transaction():
                await holder.execute(QUERIES["limit_lock_for_types"], params)
                cur = await holder.execute(QUERIES["job_claim_batch_limited"], params)
                assert len(await cur.fetchall()) == 1
                claim = asyncio.create_task(w._claim(10))
                await wait_until(waiting_for_the_lock, within=20, message="the claim waiting")
            jobs, _ = await claim
            assert jobs == []
        assert w._limited
        rows = await fetch(dsn, "SELECT status, worker_id FROM pgjobs.jobs ORDER BY status")
        assert [(r["status"], r["worker_id"]) for r in rows] == [
            ("queued", None),
            ("running", "holder"),
        ]
    finally:
        await w._pool.close()


async def test_rate_windows_follow_the_time_given(dsn: str, client: Client) -> None:
    """3 starts per minute for acme, time as an input: 3 in the first window, none later in
    it, 3 more in the next."""
    await _set(dsn, company_id="acme", max_starts=3, period_seconds=60.0)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(10))
    t0 = dt.datetime(2030, 1, 1, 12, 0, 5, tzinfo=dt.UTC)
    assert len(await _claim_limited(dsn, 10, t0)) == 3
    assert await _claim_limited(dsn, 10, t0 + dt.timedelta(seconds=50)) == []
    assert len(await _claim_limited(dsn, 10, t0 + dt.timedelta(seconds=56))) == 3
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        (listed,) = await limits.list_limits(conn, now=t0 + dt.timedelta(seconds=60))
    assert listed.started_this_window == 3
    assert listed.running == 6


async def test_limits_are_set_changed_listed_and_cleared(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        first = await limits.set_limit(conn, company_id="acme", job_type="render", max_running=2)
        changed = await limits.set_limit(
            conn, company_id="acme", job_type="render", max_starts=60, period_seconds=60
        )
        assert changed.id == first.id
        assert (changed.max_running, changed.max_starts, changed.period_seconds) == (2, 60, 60.0)
        await limits.set_limit(conn, job_type="render", max_running=10)
        listed = await limits.list_limits(conn)
        assert [(x.company_id, x.job_type) for x in listed] == [
            (None, "render"),
            ("acme", "render"),
        ]
        assert await limits.clear_limit(conn, company_id="acme", job_type="render")
        assert not await limits.clear_limit(conn, company_id="acme", job_type="render")
        assert [x.company_id for x in await limits.list_limits(conn)] == [None]
        for bad in (
            {"max_running": 1},
            {"company_id": "acme"},
            {"company_id": "acme", "max_starts": 5},
            {"company_id": "acme", "max_running": -1},
            {"company_id": " ", "max_running": 1},
        ):
            with pytest.raises(InvalidJobError):
                await limits.set_limit(conn, **bad)


def test_rates_parse() -> None:
    assert limits.parse_rate("60/min") == (60, 60.0)
    assert limits.parse_rate("20/s") == (20, 1.0)
    assert limits.parse_rate("5/30s") == (5, 30.0)
    assert limits.parse_rate("1000 / hour") == (1000, 3600.0)
    for bad in ("60", "x/min", "5/0s", "5/fortnight"):
        with pytest.raises(InvalidJobError):
            limits.parse_rate(bad)


async def test_a_workers_first_claim_asks_nothing_first(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's first claim is its claim alone (with its plans' setting, in the same
    pipeline): no statement asks before it whether a limit applies. Where one does, the
    plain claim's refusal sends that same call on through the limited claim (the refused
    claim is an UPDATE of no row, which since sql/0017 leaves the jobs triggers no slow
    plan for the session: test_trigger_plans)."""
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(3))
    sent = _record_queries(monkeypatch)
    async with _claiming_worker(dsn, storage_dir) as w:
        sent.clear()  # the pool's own statements, if any
        assert len((await w._claim(1))[0]) == 1
        assert sent == PLAIN_CLAIM
        assert not w._limited
    await _set(dsn, company_id="acme", max_running=100)
    async with _claiming_worker(dsn, storage_dir) as w:
        sent.clear()
        assert len((await w._claim(10))[0]) == 2
        assert sent == LIMITED_CLAIM
        assert w._limited


async def test_one_scope_predicate_inlined_where_limits_are_filtered(
    dsn: str, client: Client
) -> None:
    """ "A limit can cover these job types" is pgjobs.limit_scope (sql/0018): a limit of a
    type covers that type's workers and workers of every type (NULL), a limit of every
    type covers every worker. Each query that filters pgjobs.limits by it gets it inlined
    (its plan shows the expression, not a function call per limit row), so the plain
    claim's one-time filter costs what the expression written out did."""
    await _set(dsn, job_type="render", max_running=1)

    params = _claim_params(job_types=["echo"])

    async def exists(job_types: list[str] | None) -> bool:
        # The plain claim of an empty queue: its row of NULLs if a limit refused it.
        rows = await fetch(dsn, QUERIES["job_claim_batch"], {**params, "job_types": job_types})
        return bool(rows and rows[0]["limited"])

    assert [await exists(t) for t in (["render"], ["echo", "render"], ["echo"], None)] == [
        True,
        True,
        False,
        True,
    ]
    await _set(dsn, company_id="acme", max_running=1)
    assert await exists(["echo"])
    for name in ("job_claim_batch", "limit_lock_for_types", "job_claim_batch_limited"):
        rows = await fetch(dsn, "EXPLAIN (VERBOSE) " + QUERIES[name], params)
        plan = "\n".join(r["QUERY PLAN"] for r in rows)
        assert "limit_scope" not in plan, (name, plan)
        assert "ANY" in plan, name


def test_the_limited_claim_walks_the_queue_as_the_fair_claim_does() -> None:
    """job_claim_batch_limited is a copy of job_claim_batch with the limits' filters
    (limits.sql says why it is not shared): the CTEs that walk the ring of companies and
    share the batch (ring, share, whole, filled) stay the same text in both, and so
    does what a claim writes to each job it takes (claimed's SET)."""
    fair, limited = QUERIES["job_claim_batch"], QUERIES["job_claim_batch_limited"]

    def cte(query: str, name: str, following: str) -> str:
        start = query.index(f"{name} (")
        return query[start : query.index(f"\n), {following} AS (", start)]

    for name, following in (
        ("ring", "share"),
        ("share AS", "heads1"),
        ("whole AS", "filled"),
        ("filled AS", "heads2"),
    ):
        assert cte(fair, name, following) == cte(limited, name, following), name

    def claim_set(query: str) -> str:
        start = query.index("    UPDATE pgjobs.job_queue q\n    SET ", query.index("claimed AS ("))
        return query[start : query.index("\n    -- ", start)]  # up to the WHERE's comment

    assert claim_set(fair) == claim_set(limited)


def _claim_params(**overrides: Any) -> dict[str, Any]:
    """job_claim_batch's parameters for a worker of every type claiming up to 10 jobs."""
    return {
        "now": None,
        "limit": 10,
        "worker_id": "w",
        "lease_seconds": 30.0,
        "job_types": None,
        "after_company": None,
        **overrides,
    }


PLAIN_CLAIM = ["transaction_plans_by_index", "job_claim_batch"]
"""What a claim sends: one pipeline, its plans' setting and the claim (queries.sql)."""
LIMITED_CLAIM = [
    *PLAIN_CLAIM,
    "transaction_plans_by_index",
    "limit_lock_for_types",
    "job_claim_batch_limited",
]
"""What a claim refused by a limit sends: the plain claim, then the limited pipeline."""


@asynccontextmanager
async def _claiming_worker(dsn: str, storage_dir: Path) -> AsyncIterator[worker.Worker]:
    """A worker with its pool open, not running: for calling its ``_claim`` directly."""
    w = worker.Worker(dsn, _registry(), fast_settings(storage_dir))
    w._pool = await db.open_pool(dsn, min_size=1, max_size=2)
    try:
        yield w
    finally:
        await w._pool.close()


def _record_queries(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """From now on, the name (in pgjobs.queries) of every statement a cursor runs, in
    order; a statement that rings itself (doorbell.ringing) goes by its query's name, and
    so does one sent without comments (queries.compact) or numbered on a raw cursor
    (queries.positional: the claims).
    A doorbell worker's claims (plain and limited) send no events_doorbell_on of their
    own: the tests' lists of statements show it."""
    names: dict[str | bytes, str] = {}
    for name, sql in QUERIES.items():
        texts = [sql]
        with suppress(ValueError):  # a query without the doorbell's mark
            texts.append(doorbell.ringing(sql))
        for text in texts + [compact(text) for text in texts]:
            names[text] = name
            with suppress(ValueError):  # a query with a b placeholder, never sent numbered
                names[positional(text)[0]] = name
    sent: list[str] = []
    execute = psycopg.AsyncCursor.execute

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        sent.append(names.get(query, str(query)[:60]))
        return await execute(self, query, params, **kwargs)

    monkeypatch.setattr(psycopg.AsyncCursor, "execute", recording)
    return sent


async def test_the_plain_claim_says_when_a_limit_refused_it(dsn: str, client: Client) -> None:
    """job_claim_batch claims nothing where a limit can cover the worker's job types, and
    says so: one row of NULLs with limited true (no row for an empty queue without a
    limit); a limit on another job type does not concern it."""
    params = _claim_params(job_types=["echo"])
    assert await fetch(dsn, QUERIES["job_claim_batch"], params) == []
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(3))
    await _set(dsn, job_type="render", max_running=1)
    (claimed, *_) = await fetch(dsn, QUERIES["job_claim_batch"], {**params, "limit": 1})
    assert (claimed["company_id"], claimed["after_company"], claimed["limited"]) == (
        "acme",
        "acme",
        False,
    )
    await _set(dsn, company_id="acme", max_running=1)
    (refused,) = await fetch(dsn, QUERIES["job_claim_batch"], params)
    assert refused["limited"] is True
    assert {k: v for k, v in refused.items() if k != "limited"} == dict.fromkeys(
        set(refused) - {"limited"}
    )
    rows = await fetch(dsn, "SELECT status, count(*) AS n FROM pgjobs.jobs GROUP BY status")
    assert {r["status"]: r["n"] for r in rows} == {"queued": 2, "running": 1}


async def test_an_idle_workers_empty_claim_is_one_round_trip(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker no limit concerns, polling an empty queue, sends its claim's pipeline and
    no other statement (the claim itself says whether a limit refused it); when a limit appears,
    the claim that the limit refused goes on through the limited claim at once."""
    async with _claiming_worker(dsn, storage_dir) as w:
        assert (await w._claim(10))[0] == []  # the first claim
        sent = _record_queries(monkeypatch)
        assert (await w._claim(10))[0] == []
        assert (await w._claim(10))[0] == []
        assert sent == PLAIN_CLAIM * 2
        await client.enqueue_many(JobSpec("acme", "echo") for _ in range(3))
        await _set(dsn, company_id="acme", max_running=2)
        sent.clear()
        assert len((await w._claim(10))[0]) == 2
        assert sent == LIMITED_CLAIM
        assert w._limited


async def test_a_limited_worker_sends_one_claim_at_a_time_for_all_its_slots(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Limited claims take turns on the limits' locks; like every worker's, a limited
    worker's claims ask for all its free slots up to MAX_CLAIM_BATCH, and a second goes
    out beside one only as a whole batch: here, at concurrency 200, its first claim takes
    200 jobs, and no two of its claims are ever out at once. A worker that knows of a
    limit from the start (as after its first claim), draining 500 jobs in burst mode."""
    await _set(dsn, company_id="acme", max_running=100_000)  # covers all, never binds
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(500))
    asked: list[int] = []
    in_flight = most = 0
    claim = worker.Worker._claim

    async def counted(self: worker.Worker, limit: int) -> list[Any]:
        nonlocal in_flight, most
        asked.append(limit)
        in_flight += 1
        most = max(most, in_flight)
        try:
            return await claim(self, limit)
        finally:
            in_flight -= 1

    monkeypatch.setattr(worker.Worker, "_claim", counted)
    w = worker.Worker(dsn, _registry(), fast_settings(storage_dir, concurrency=200), burst=True)
    w._limited = True
    await asyncio.wait_for(w.run(), timeout=120)
    assert await _all_done(dsn, 500)
    assert asked[0] == worker.MAX_CLAIM_BATCH == 200
    assert most == 1
    assert w._limited


async def test_the_limited_claim_updates_the_rows_it_locked_by_ctid(
    dsn: str, client: Client
) -> None:
    """As job_claim_batch (sql/0023's header): the UPDATE reaches the queue rows the CTEs
    locked through a TID scan, not a walk of job_queue_pkey per job, and claims them."""
    await _set(dsn, company_id="acme", max_running=100)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(5000))
    params = _claim_params(limit=20)
    async with (
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as conn,
        conn.transaction(force_rollback=True),
    ):
        await conn.execute("ANALYZE pgjobs.job_queue")  # a queue's statistics, as in use
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.execute(QUERIES["limit_lock_for_types"], params)
        cur = await conn.execute(
            "EXPLAIN (ANALYZE, COSTS OFF) " + QUERIES["job_claim_batch_limited"], params
        )
        plan = "\n".join(r["QUERY PLAN"] for r in await cur.fetchall())
    assert "Tid Scan on job_queue" in plan, plan
    claimed = await fetch(dsn, QUERIES["job_claim_batch_limited"], params)
    assert len(claimed) == 20
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_queue WHERE status = 'running'")
    assert rows[0]["n"] == 20


async def _claim_limited_counting(dsn: str, limit: int) -> tuple[int, bool]:
    """A limited claim of up to ``limit``: how many jobs it took, and whether it counted
    the limits' running jobs (an index scan of job_queue_lease_idx, this transaction's)."""
    params = _claim_params(limit=limit)
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as conn,
        conn.transaction(),
    ):
        # A queue this small is read whole otherwise: the count's only index is then
        # the one a count reads.
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute(QUERIES["limit_lock_for_types"], params)
        cur = await conn.execute(QUERIES["job_claim_batch_limited"], params)
        taken = len(await cur.fetchall())
        cur = await conn.execute(
            "SELECT pg_stat_get_xact_numscans('pgjobs.job_queue_lease_idx'::regclass) AS idx_scan"
        )
        row = await cur.fetchone()
        return taken, bool(row and row["idx_scan"])


async def _bounds(dsn: str) -> list[int]:
    rows = await fetch(dsn, "SELECT bound FROM pgjobs.limit_running ORDER BY limit_id")
    return [r["bound"] for r in rows]


async def test_a_limit_is_counted_only_when_its_bound_says_the_batch_may_not_fit(
    dsn: str, client: Client
) -> None:
    """acme may run 25; claims of 10. The first claim counts (no bound yet) and keeps 10 as
    the bound; the second trusts it (10 + 10 fits in 25: no count) and keeps 20; the third
    cannot (20 + 10 > 25): it counts 20 running and takes the 5 left. Once jobs finish,
    the bound (25) is over what runs: the next claim counts again and takes the room."""
    await _set(dsn, company_id="acme", max_running=25)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(60))
    assert await _claim_limited_counting(dsn, 10) == (10, True)
    assert await _bounds(dsn) == [10]
    assert await _claim_limited_counting(dsn, 10) == (10, False)
    assert await _bounds(dsn) == [20]
    assert await _claim_limited_counting(dsn, 10) == (5, True)
    assert await _bounds(dsn) == [25]
    assert await _claim_limited_counting(dsn, 10) == (0, True)
    rows = await fetch(
        dsn,
        "UPDATE pgjobs.jobs SET status = 'done', finished_at = now(), lease_expires_at = NULL,"
        " event_seq = event_seq + 1, last_event = 'content_job.done'"
        " WHERE id IN (SELECT id FROM pgjobs.jobs WHERE status = 'running' LIMIT 12)"
        " RETURNING id",
    )
    assert len(rows) == 12
    assert await _claim_limited_counting(dsn, 10) == (10, True)
    assert await _bounds(dsn) == [23]
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_queue WHERE status = 'running'")
    assert rows[0]["n"] == 23


async def test_workers_trusting_a_limits_bound_never_run_more_than_it(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """acme may run 24 renders; three workers of concurrency 10 claim under it, most of
    their claims within the bound (not counting), the ones near it counting: never more
    than 24 at once, and every job runs."""
    await _set(dsn, company_id="acme", max_running=24)
    await client.enqueue_many(JobSpec("acme", "render") for _ in range(150))
    settings = fast_settings(storage_dir, concurrency=10)
    await _workers_until_done(dsn, settings, 150, workers=3, within=60)
    assert await _most_at_once(dsn, "acme", "render") <= 24


async def _one_waiting_for_a_table(dsn: str) -> bool:
    """One backend waits for a table's lock (setting a limit, behind a claim)."""
    rows = await fetch(
        dsn,
        "SELECT count(*) AS n FROM pg_stat_activity"
        " WHERE wait_event_type = 'Lock' AND wait_event = 'relation'",
    )
    return bool(rows[0]["n"] == 1)


async def test_setting_a_limit_waits_for_the_claims_running_and_counts_their_jobs(
    dsn: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain claim (begun before acme had a limit) has claimed 2 jobs and not committed:
    creating acme's limit of 20 waits for it, so the limited claims after it see those 2
    running, and their bound (which stops them counting while 5 more fit) starts from
    them: 18 more run, not 20."""
    monkeypatch.setattr(limits, "LIMIT_SET_LOCK_WAIT_SECONDS", 60.0)  # a slow machine's
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(40))

    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as claimer:
        async with claimer.transaction():
            cur = await claimer.execute(QUERIES["job_claim_batch"], _claim_params(limit=2))
            assert len(await cur.fetchall()) == 2
            setting = asyncio.create_task(_set(dsn, company_id="acme", max_running=20))
            await wait_until(lambda: _one_waiting_for_a_table(dsn), message="the limit waiting")
            assert not setting.done()
        await setting
    taken = [await _claim_limited_counting(dsn, 5) for _ in range(5)]
    assert [n for n, _ in taken] == [5, 5, 5, 3, 0]
    assert [counted for _, counted in taken] == [True, False, False, True, True]
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_queue WHERE status = 'running'")
    assert rows[0]["n"] == 20


async def test_setting_a_limit_behind_a_session_left_open_fails_and_holds_no_claim_back(
    dsn: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session idle in a transaction that has read pgjobs.limits: setting a limit waits
    LIMIT_SET_LOCK_WAIT_SECONDS at most, then fails saying what to do, having changed
    nothing; the claims that queued behind its wait then go on."""
    monkeypatch.setattr(limits, "LIMIT_SET_LOCK_WAIT_SECONDS", 0.5)
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(3))
    idle = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    async with idle, idle.transaction():
        await idle.execute("SELECT * FROM pgjobs.limits")
        claim = asyncio.create_task(fetch(dsn, QUERIES["job_claim_batch"], _claim_params()))
        with pytest.raises(LockTimeoutError, match="idle in transaction"):
            await _set(dsn, company_id="acme", max_running=1)
        assert len(await asyncio.wait_for(claim, 20)) == 3
    assert await fetch(dsn, "SELECT * FROM pgjobs.limits") == []


async def test_a_limit_set_between_the_limited_pipelines_two_statements_waits_for_its_commit(
    dsn: str, client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limited claim has taken its locks (acme's limit did not exist yet) and not yet
    claimed: creating acme's limit waits until that claim commits, so the claim never
    sees a limit whose lock it does not hold; it claims as before the limit (all 8 of
    its batch), and the claims after it count those 8."""
    monkeypatch.setattr(limits, "LIMIT_SET_LOCK_WAIT_SECONDS", 60.0)  # a slow machine's
    await _set(dsn, job_type="echo", max_running=1000)  # so that claims are limited
    await client.enqueue_many(JobSpec("acme", "echo") for _ in range(30))
    params = _claim_params(limit=8)

    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as claimer:
        async with claimer.transaction():
            cur = await claimer.execute(QUERIES["limit_lock_for_types"], params)
            assert (await cur.fetchone() or {})["locked"] == 1
            setting = asyncio.create_task(_set(dsn, company_id="acme", max_running=10))
            await wait_until(lambda: _one_waiting_for_a_table(dsn), message="the limit waiting")
            cur = await claimer.execute(QUERIES["job_claim_batch_limited"], params)
            assert len(await cur.fetchall()) == 8
            assert not setting.done()
        await setting
    assert await _claim_limited(dsn, 8) != []
    rows = await fetch(dsn, "SELECT count(*) AS n FROM pgjobs.job_queue WHERE status = 'running'")
    assert rows[0]["n"] == 10
