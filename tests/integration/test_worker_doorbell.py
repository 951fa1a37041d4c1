"""The worker's doorbell (WorkerSettings.doorbell, issue 16): its claim, progress and finish
commits carry no NOTIFY items on pgjobs_events; after each commit it rings for the jobs it
changed (pgjobs.events.encode_ring), and listeners read the events from the audit log.

Every test drains real jobs through a real worker while a LISTENer on pgjobs_events reads,
on each ring as it arrives, what another connection can already see of the jobs it names.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import db, doorbell, events, limits
from pgjobs.client import Client
from pgjobs.config import WorkerSettings
from pgjobs.context import JobContext
from pgjobs.errors import ConfigurationError
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES, compact
from pgjobs.registry import Registry
from pgjobs.types import Job
from pgjobs.worker import Worker

COMPANIES = ("acme", "beta", "gamma")


def _registry() -> Registry:
    registry = Registry()

    @registry.handler("step")
    async def step(ctx: JobContext) -> None:
        assert await ctx.progress(0.5, "half")

    @registry.handler("flaky")
    async def flaky(ctx: JobContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("first attempt fails")

    @registry.handler("bad")
    async def bad(ctx: JobContext) -> None:
        raise RuntimeError("always fails")

    return registry


def _specs() -> Iterator[JobSpec]:
    """Progress then done; a retry then done; a failure: every transition a worker makes."""
    for n in range(8):
        company = COMPANIES[n % len(COMPANIES)]
        yield JobSpec(company, "step")
        yield JobSpec(company, "flaky", max_attempts=2)
        yield JobSpec(company, "bad", max_attempts=1)


@dataclass
class Heard:
    """What the LISTENer got on pgjobs_events, in order: rings, each with the newest
    audit seq of each job it names as another connection read it when the ring arrived,
    and event items."""

    rings: list[tuple[events.Ring, dict[uuid.UUID, int]]] = field(default_factory=list)
    items: list[events.LiveEvent] = field(default_factory=list)


async def _collect(listener: psycopg.AsyncConnection[Any], reader: Any, marker: str) -> Heard:
    heard = Heard()
    async for note in listener.notifies(timeout=120):
        if note.payload == marker:
            return heard
        parsed = events.parse_events_channel(note.payload)
        if isinstance(parsed, events.Ring):
            ids = [job_id for ids in parsed.jobs.values() for job_id in ids]
            cur = await reader.execute(
                "SELECT job_id, max(seq) AS seq FROM pgjobs.job_events"
                " WHERE job_id = ANY(%s) GROUP BY job_id",
                [ids],
            )
            heard.rings.append((parsed, {r["job_id"]: r["seq"] for r in await cur.fetchall()}))
        else:
            heard.items.extend(parsed)
    raise AssertionError("the marker NOTIFY never arrived")


async def _drain(
    dsn: str,
    client: Client,
    storage_dir: Path,
    settings: WorkerSettings,
    before_worker: Callable[[], None] = lambda: None,
) -> tuple[Heard, list[dict[str, Any]], Worker]:
    """Enqueue the jobs (before listening: their queued items are the client's), drain
    them with one worker while listening, then a marker NOTIFY after the worker stopped
    ends the listening. Returns what was heard and the worker's audit rows (seq > 1).
    ``before_worker`` runs once the jobs are enqueued, before the worker starts."""
    await client.enqueue_many(_specs())
    before_worker()
    marker = f"marker-{uuid.uuid4()}"
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as reader,
    ):
        await listener.execute(f"LISTEN {events.EVENTS_CHANNEL}")
        collecting = asyncio.create_task(_collect(listener, reader, marker))
        async with running_worker(dsn, _registry(), settings) as worker:
            await _every_job_finished(dsn)
        # Stopped: every commit and ring of the worker was sent before this one.
        await fetch(dsn, "SELECT pg_notify(%s, %s)", [events.EVENTS_CHANNEL, marker])
        heard = await asyncio.wait_for(collecting, 120)
    rows = await fetch(
        dsn,
        "SELECT e.job_id, e.seq, e.type, j.company_id FROM pgjobs.job_events e"
        " JOIN pgjobs.jobs j ON j.id = e.job_id WHERE e.seq > 1 ORDER BY e.job_id, e.seq",
    )
    kinds = {row["type"] for row in rows}
    assert kinds == {
        events.EventType.RUNNING,
        events.EventType.PROGRESS,
        events.EventType.RETRYING,
        events.EventType.DONE,
        events.EventType.FAILED,
    }, "the drain made every kind of worker transition"
    return heard, rows, worker


async def _every_job_finished(dsn: str) -> None:
    """Wait (up to 60 s) until no job is queued or running."""

    async def finished() -> bool:
        rows = await fetch(
            dsn, "SELECT count(*) AS n FROM pgjobs.jobs WHERE status IN ('queued', 'running')"
        )
        return bool(rows[0]["n"] == 0)

    await wait_until(finished, within=60, message="every job finished")


async def _set_limit(dsn: str) -> None:
    # Covers every job, never binds: the worker claims through job_claim_batch_limited.
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for company in COMPANIES:
            await limits.set_limit(conn, company_id=company, max_running=100_000)


@pytest.mark.parametrize("claim", ["plain", "limited"])
async def test_a_worker_rings_after_each_commit_for_every_transition_and_sends_no_items(
    dsn: str, client: Client, storage_dir: Path, claim: str
) -> None:
    """Claims (plain and limited), progress, a retry, a done and a failure: nothing on
    pgjobs_events but rings; each job is named under its own company by at most one ring
    per transition the worker made (the audit log's rows after its enqueue: the ringer
    puts transitions committed while a ring is in flight in one ring), and when each ring
    arrives, the transitions it announces are readable from another connection: the k-th
    ring naming a job finds at least k of its transitions after the enqueue (seq >= k + 1),
    the last one all of them."""
    if claim == "limited":
        await _set_limit(dsn)
    heard, rows, worker = await _drain(dsn, client, storage_dir, fast_settings(storage_dir))
    assert worker._limited is (claim == "limited")

    assert heard.items == [], "no event items from a doorbell worker"
    companies = {row["job_id"]: row["company_id"] for row in rows}
    transitions = collections.Counter(row["job_id"] for row in rows)
    last_seq = {row["job_id"]: row["seq"] for row in rows}  # rows are in seq order
    rung: collections.Counter[uuid.UUID] = collections.Counter()
    last_rung: dict[uuid.UUID, int] = {}
    ahead: list[tuple[uuid.UUID, int, int]] = []
    for ring, readable in heard.rings:
        for company_id, ids in ring.jobs.items():
            for job_id in ids:
                assert companies[job_id] == company_id
                rung[job_id] += 1
                last_rung[job_id] = readable.get(job_id, 0)
                if readable.get(job_id, 0) < rung[job_id] + 1:
                    ahead.append((job_id, rung[job_id], readable.get(job_id, 0)))
    assert set(rung) == set(transitions)
    assert all(rung[job_id] <= n for job_id, n in transitions.items())
    assert ahead == [], "a ring arrived before the transition it announces was readable"
    assert last_rung == last_seq, "a job's last transition was never rung for"


async def test_claims_progress_and_finishes_ask_for_the_doorbell_in_their_own_statement(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each claim, progress report and finish batch of a doorbell worker sets the doorbell
    in its own statement (doorbell.ringing), not in an events_doorbell_on pipelined before
    it (~35 µs more of the worker's CPU per commit): events_doorbell_on is never sent, the
    only pipelines are the claims' own (transaction_plans_by_index and the claim), and the
    commits still carry no items."""
    pipelines: list[int] = []
    claims: list[int] = []
    doorbells: list[str] = []
    real_pipeline = psycopg.AsyncConnection.pipeline
    real_claim = Worker._claim
    real_execute = psycopg.AsyncCursor.execute
    doorbell_on = QUERIES["events_doorbell_on"]

    def counted_pipeline(self: psycopg.AsyncConnection[Any]) -> Any:
        pipelines.append(self.info.backend_pid)
        return real_pipeline(self)

    async def counted_claim(self: Worker, limit: int) -> Any:
        claims.append(limit)
        return await real_claim(self, limit)

    async def recording(self: Any, query: Any, params: Any = None, **kwargs: Any) -> Any:
        if query in (doorbell_on, compact(doorbell_on)):
            doorbells.append(query)
        return await real_execute(self, query, params, **kwargs)

    def patch() -> None:
        monkeypatch.setattr(psycopg.AsyncConnection, "pipeline", counted_pipeline)
        monkeypatch.setattr(Worker, "_claim", counted_claim)
        monkeypatch.setattr(psycopg.AsyncCursor, "execute", recording)

    heard, _, _ = await _drain(
        dsn, client, storage_dir, fast_settings(storage_dir), before_worker=patch
    )
    assert claims
    assert len(pipelines) == len(claims)
    assert doorbells == []
    assert heard.items == []
    assert heard.rings


def test_ringing_puts_events_doorbell_on_in_place_of_the_mark() -> None:
    for name in (
        "job_claim_batch",
        "job_claim_batch_limited",
        "job_finish_many_if_leased",
        "job_progress_if_leased",
    ):
        ringing = doorbell.ringing(QUERIES[name])
        assert "(SELECT true /* doorbell */)" not in ringing
        assert ringing.count("set_config('pgjobs.doorbell', 'on', true)") == 1
        assert doorbell.ringing(QUERIES[name]) is ringing, "made once per query"
    with pytest.raises(ValueError, match="one \\(SELECT true"):
        doorbell.ringing(QUERIES["job_release_if_leased"])


async def test_with_the_doorbell_off_a_worker_sends_items_in_its_commits(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """doorbell=False: every transition's item on pgjobs_events, as before sql/0019; no
    ring."""
    settings = fast_settings(storage_dir, doorbell=False)
    heard, rows, _ = await _drain(dsn, client, storage_dir, settings)
    assert heard.rings == []
    assert sorted((e.job_id, e.seq, e.type) for e in heard.items) == sorted(
        (row["job_id"], row["seq"], row["type"]) for row in rows
    )


@pytest.mark.parametrize("failure", ["refused", "timed out"])
async def test_a_ring_that_cannot_be_sent_does_not_stop_the_worker_or_lose_a_job(
    dsn: str,
    client: Client,
    storage_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """Every ring fails, by the database refusing its statement (a payload over
    PostgreSQL's limit) or by its connection timing out: the worker logs it, every job
    still ends exactly as without the doorbell, each transition audited once."""
    attempts: list[int] = []
    if failure == "refused":
        monkeypatch.setitem(
            QUERIES,
            "events_ring",
            "SELECT pg_notify('pgjobs_events', repeat(%(payload)s::text, 1000))",
        )
        real_ring = doorbell.ring

        async def counted_ring(conn: Any, jobs: Any) -> bool:
            attempts.append(1)
            return await real_ring(conn, jobs)

        monkeypatch.setattr(doorbell, "ring", counted_ring)
    else:

        async def timed_out_ring(conn: Any, jobs: Any) -> bool:
            attempts.append(1)
            # What pgjobs.db.GuardedPool raises for a connection used past its limit.
            raise TimeoutError

        monkeypatch.setattr(doorbell, "ring", timed_out_ring)
    caplog.set_level(logging.WARNING, logger="pgjobs")
    heard, rows, _ = await _drain(dsn, client, storage_dir, fast_settings(storage_dir))
    assert attempts, "the worker tried to ring"
    assert heard.rings == []
    assert heard.items == []
    assert any("not sent" in r.getMessage() for r in caplog.records)
    final = await fetch(dsn, "SELECT job_type, status, attempts FROM pgjobs.jobs")
    assert collections.Counter((r["job_type"], r["status"], r["attempts"]) for r in final) == {
        ("step", "done", 1): 8,
        ("flaky", "done", 2): 8,
        ("bad", "failed", 1): 8,
    }
    # step: running, progress, done; flaky: running, retrying, running, done; bad: 2.
    assert len(rows) == 8 * (3 + 4 + 2)


_DROP_CHECKS = """
ALTER TABLE pgjobs.job_rows DROP CONSTRAINT jobs_times_in_range;
ALTER TABLE pgjobs.job_queue DROP CONSTRAINT job_queue_times_in_range;
"""


async def test_a_claimed_row_the_worker_cannot_read_is_rung_for_and_its_failure_sent(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """A due job whose run_at Python cannot represent (written with the range CHECKs
    dropped) is claimed with the others, then failed: its claim is rung for (the claim
    committed with the doorbell on), its failure's item sent in that commit."""
    await fetch(dsn, _DROP_CHECKS)
    poison = uuid.uuid4()
    await fetch(
        dsn,
        "INSERT INTO pgjobs.jobs (id, company_id, job_type, run_at)"
        " VALUES (%s, 'beta', 'step', '0001-12-31 23:59:00+00 BC')",
        [poison],
    )
    heard, rows, _ = await _drain(dsn, client, storage_dir, fast_settings(storage_dir))
    mine = [(row["seq"], row["type"]) for row in rows if row["job_id"] == poison]
    assert mine == [(2, events.EventType.RUNNING), (3, events.EventType.FAILED)]
    rung = [
        readable.get(poison, 0)
        for ring, readable in heard.rings
        if poison in ring.jobs.get("beta", ())
    ]
    (readable,) = rung
    assert readable >= 2
    assert [(e.seq, e.type) for e in heard.items if e.job_id == poison] == [
        (3, events.EventType.FAILED)
    ]


def test_the_doorbell_setting_reads_pgjobs_doorbell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGJOBS_DOORBELL", raising=False)
    assert WorkerSettings.from_env().doorbell is True
    for raw, value in (("off", False), ("0", False), ("ON", True), ("true", True)):
        monkeypatch.setenv("PGJOBS_DOORBELL", raw)
        assert WorkerSettings.from_env().doorbell is value
    monkeypatch.setenv("PGJOBS_DOORBELL", "sometimes")
    with pytest.raises(ConfigurationError, match="PGJOBS_DOORBELL must be on or off"):
        WorkerSettings.from_env()


async def test_progress_is_recorded_without_waiting_for_its_ring(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A progress report hands its ring to the ringer and returns once it committed: a
    ring that cannot be sent yet (stalled here until the report returned) holds neither
    the report nor its connection."""
    stalled = asyncio.Event()
    release = asyncio.Event()
    rung: list[list[tuple[str, uuid.UUID]]] = []

    async def stalled_ring(conn: Any, jobs: Any) -> bool:
        stalled.set()
        await release.wait()
        rung.append(list(jobs))
        return True

    monkeypatch.setattr(doorbell, "ring", stalled_ring)
    job = await client.enqueue("acme", "step")
    (row,) = await fetch(
        dsn,
        QUERIES["job_claim_batch"],
        {"now": None, "limit": 1, "worker_id": "w1", "lease_seconds": 60.0,
         "job_types": None, "after_company": None},
    )  # fmt: skip
    (full,) = await fetch(dsn, "SELECT * FROM pgjobs.jobs WHERE id = %s", [row["id"]])
    worker = Worker(dsn, _registry(), fast_settings(storage_dir))
    worker._pool = pool = await db.open_pool(dsn)
    worker._ringer = ringer = doorbell.Ringer(pool)
    ringing = asyncio.create_task(ringer.run())
    try:
        recorded = asyncio.create_task(worker._write_progress(Job.from_row(full), 0.5, "half"))
        done, _ = await asyncio.wait({recorded}, timeout=30)
        assert done, "the progress report waited for its ring"
        assert recorded.result() is True
        await asyncio.wait_for(stalled.wait(), 30)
        assert rung == []
        release.set()
        ringer.close()
        await asyncio.wait_for(ringing, 30)
    finally:
        release.set()
        ringing.cancel()
        await pool.close()
    assert rung == [[("acme", job.id)]]
    (after,) = await fetch(dsn, "SELECT progress_fraction FROM pgjobs.jobs WHERE id = %s", [job.id])
    assert after["progress_fraction"] == 0.5


class _HeldRings:
    """A ``doorbell.ring`` for tests: records each ring's pairs, holds the first until
    ``release`` is set (a ring in flight), and sends every ring for real."""

    def __init__(self, fail_first: bool = False) -> None:
        self.calls: list[list[events.RungJob]] = []
        self.sent: list[list[events.RungJob]] = []
        self.in_flight = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_first = fail_first
        self.real_ring = doorbell.ring

    async def __call__(self, conn: Any, jobs: Any) -> bool:
        jobs = list(jobs)
        self.calls.append(jobs)
        if len(self.calls) == 1:
            self.in_flight.set()
            await self.release.wait()
            if self.fail_first:
                raise RuntimeError("a bug in the ring")
        if await self.real_ring(conn, jobs):
            self.sent.append(jobs)
        return True


async def test_the_ringer_sends_what_commits_while_a_ring_is_in_flight_in_one_ring(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first pairs go out at once, alone; the pairs of three commits handed over while
    that ring is in flight go out together in the next one, once it is done; close()
    returns after sending what is pending."""
    rings = _HeldRings()
    monkeypatch.setattr(doorbell, "ring", rings)
    first, *later = [("acme", uuid.uuid4()) for _ in range(4)]
    async with await db.open_pool(dsn) as pool:
        ringer = doorbell.Ringer(pool)
        ringing = asyncio.create_task(ringer.run())
        try:
            ringer.add([first])
            await asyncio.wait_for(rings.in_flight.wait(), 30)
            for pair in later:
                ringer.add([pair])
            rings.release.set()
            ringer.close()
            await asyncio.wait_for(ringing, 30)
        finally:
            rings.release.set()
            ringing.cancel()
    assert rings.calls == [[first], later]
    assert rings.sent == rings.calls
    assert ringer.rings == 2


async def test_a_ring_that_raises_does_not_stop_the_ringer(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever a ring raises (here not even a database error) is logged; the ringer
    sends the next ring."""
    rings = _HeldRings(fail_first=True)
    monkeypatch.setattr(doorbell, "ring", rings)
    caplog.set_level(logging.WARNING, logger="pgjobs")
    first, second = ("acme", uuid.uuid4()), ("beta", uuid.uuid4())
    async with await db.open_pool(dsn) as pool:
        ringer = doorbell.Ringer(pool)
        ringing = asyncio.create_task(ringer.run())
        try:
            ringer.add([first])
            await asyncio.wait_for(rings.in_flight.wait(), 30)
            ringer.add([second])
            rings.release.set()
            ringer.close()
            await asyncio.wait_for(ringing, 30)
        finally:
            rings.release.set()
            ringing.cancel()
    assert rings.calls == [[first], [second]]
    assert rings.sent == [[second]]
    assert any("ring for 1 job(s) not sent" in r.getMessage() for r in caplog.records)


async def test_a_stopping_worker_sends_its_pending_rings_before_closing_its_pool(
    dsn: str, client: Client, storage_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's first ring is held in flight until the worker was told to stop and
    had finished every job: all the transitions committed meanwhile are pending then,
    and are rung (sent for real) before run() returns."""
    rings = _HeldRings()
    monkeypatch.setattr(doorbell, "ring", rings)
    await client.enqueue_many(_specs())
    # The held ring runs within the pool's use limit: one no test machine reaches.
    settings = fast_settings(storage_dir, db_use_timeout_seconds=600.0)
    async with running_worker(dsn, _registry(), settings) as worker:
        await asyncio.wait_for(rings.in_flight.wait(), 30)
        await _every_job_finished(dsn)
        worker.stop()
        rings.release.set()
    rows = await fetch(dsn, "SELECT job_id FROM pgjobs.job_events WHERE seq > 1")
    # The worker hands its rings each job's id as text (events.RungJob).
    sent = {str(job_id) for _, job_id in itertools.chain(*rings.sent)}
    assert sent == {str(row["job_id"]) for row in rows}
    assert rings.sent == rings.calls, "every ring was sent, none after the pool closed"


async def test_the_ringer_replaces_its_connection_after_a_ring_fails_on_it(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The ringer holds one pool connection across rings; when the server drops it, the
    ring sent on it is logged as not sent and the next ring goes out on a fresh one."""
    caplog.set_level(logging.WARNING, logger="pgjobs")
    pairs = [("acme", uuid.uuid4()) for _ in range(3)]
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await db.open_pool(dsn, min_size=1, max_size=2) as pool,
    ):
        await listener.execute(f"LISTEN {events.EVENTS_CHANNEL}")
        heard: list[events.Ring] = []

        async def hear(n: int) -> None:
            async for note in listener.notifies(timeout=30, stop_after=n):
                parsed = events.parse_events_channel(note.payload)
                assert isinstance(parsed, events.Ring)
                heard.append(parsed)

        ringer = doorbell.Ringer(pool)
        ringing = asyncio.create_task(ringer.run())
        try:
            ringer.add([pairs[0]])
            await hear(1)
            assert ringer._conn is not None, "held after its ring"
            held = ringer._conn.info.backend_pid
            # Waits (up to 10 s) until that backend has exited.
            await fetch(dsn, "SELECT pg_terminate_backend(%s, 10000)", [held])
            ringer.add([pairs[1]])

            async def given_back() -> bool:
                return ringer.rings == 2 and ringer._conn is None

            await wait_until(given_back, within=30, message="the failed ring's connection back")
            ringer.add([pairs[2]])
            await hear(1)
            ringer.close()
            await asyncio.wait_for(ringing, 30)
        finally:
            ringing.cancel()
    assert [ring.jobs for ring in heard] == [
        {"acme": (pairs[0][1],)},
        {"acme": (pairs[2][1],)},
    ]
    assert any("not sent" in r.getMessage() for r in caplog.records)


async def test_a_ring_of_more_jobs_than_one_payload_holds_is_sent_in_several(dsn: str) -> None:
    """doorbell.ring sends each of encode_ring's payloads (about 200 jobs fit in one):
    every job of a 500-job ring is heard, in three payloads."""
    pairs = [(("acme", "beta")[n % 2], uuid.uuid4()) for n in range(500)]
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn,
    ):
        await listener.execute(f"LISTEN {events.EVENTS_CHANNEL}")
        assert await doorbell.ring(conn, pairs)
        heard = [
            events.parse_events_channel(note.payload)
            async for note in listener.notifies(timeout=30, stop_after=3)
        ]
    rings = [ring for ring in heard if isinstance(ring, events.Ring)]
    assert len(rings) == len(heard) == 3
    rung = {(company, job_id) for ring in rings for company, ids in ring.jobs.items()
            for job_id in ids}  # fmt: skip
    assert rung == set(pairs)


async def test_a_ring_past_the_pools_use_limit_is_dropped_with_its_connection(
    dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A ring whose statement does not answer within the pool's use limit (here one that
    sleeps) is logged as not sent; its connection, left mid-statement, is given back
    (the pool closes it) and the next ring goes out on another."""
    caplog.set_level(logging.WARNING, logger="pgjobs")
    slow, fine = ("acme", uuid.uuid4()), ("acme", uuid.uuid4())
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await db.open_pool(dsn, min_size=1, max_size=2, use_timeout=0.5) as pool,
    ):
        await listener.execute(f"LISTEN {events.EVENTS_CHANNEL}")
        real_ring = QUERIES["events_ring"]
        monkeypatch.setitem(
            QUERIES,
            "events_ring",
            "SELECT pg_sleep(600), pg_notify('pgjobs_events', %(payload)s::text)",
        )
        ringer = doorbell.Ringer(pool)
        ringing = asyncio.create_task(ringer.run())
        try:
            ringer.add([slow])

            async def given_back() -> bool:
                return ringer.rings == 1 and ringer._conn is None

            await wait_until(given_back, within=30, message="the slow ring's connection back")
            # The server may not have noticed the closed connection yet: end its sleep.
            await fetch(
                dsn,
                "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
                " WHERE query LIKE 'SELECT pg_sleep(600)%%' AND pid <> pg_backend_pid()",
            )
            monkeypatch.setitem(QUERIES, "events_ring", real_ring)
            ringer.add([fine])
            heard = [
                events.parse_events_channel(note.payload)
                async for note in listener.notifies(timeout=30, stop_after=1)
            ]
            ringer.close()
            await asyncio.wait_for(ringing, 30)
        finally:
            ringing.cancel()
    assert heard == [events.Ring({"acme": (fine[1],)})]
    assert ringer.rings == 2
    assert any("ring for 1 job(s) not sent" in r.getMessage() for r in caplog.records)
