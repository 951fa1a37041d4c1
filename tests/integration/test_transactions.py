"""Transactional enqueue, fencing, rescue and the core promise, at the SQL boundary."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row, namedtuple_row

from helpers import claim_one, fast_settings, fetch, finish_params, running_worker
from pgjobs import demo, rescuer
from pgjobs.client import Client
from pgjobs.errors import JobNotFoundError
from pgjobs.events import EVENTS_CHANNEL as CHANNEL
from pgjobs.jobspec import JobSpec
from pgjobs.queries import QUERIES
from pgjobs.sync import SyncClient
from pgjobs.types import EventType, Job, JobStatus


async def _notifications(conn: psycopg.AsyncConnection[object], seconds: float) -> list[str]:
    return [n.payload async for n in conn.notifies(timeout=seconds)]


async def test_enqueue_rolls_back_with_the_callers_transaction(dsn: str, client: Client) -> None:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as app,
    ):
        await listener.execute("LISTEN pgjobs_events")
        async with app.transaction(force_rollback=True):
            job = await client.enqueue("acme", "echo", {"n": 1}, conn=app)
            # Visible inside the caller's transaction...
            assert (await client.get("acme", job.id, conn=app)).status is JobStatus.QUEUED
        # ...and gone with it, with no notification ever sent.
        assert await fetch(dsn, "SELECT id FROM pgjobs.jobs") == []
        assert await fetch(dsn, "SELECT id FROM pgjobs.job_events") == []
        assert await _notifications(listener, 0.5) == []


async def test_enqueue_commits_with_the_callers_transaction(dsn: str, client: Client) -> None:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, row_factory=dict_row) as app,
    ):
        await listener.execute("LISTEN pgjobs_events")
        async with app.transaction():
            job = await client.enqueue("acme", "echo", {"n": 1}, conn=app)
            await app.execute("SELECT pg_sleep(0.2)")
            # Not visible (and not announced) before the caller commits.
            assert await fetch(dsn, "SELECT id FROM pgjobs.jobs") == []
        payloads = await _notifications(listener, 1.0)
    assert len(payloads) == 1
    (event,) = json.loads(payloads[0])["events"]
    assert event["jobId"] == str(job.id)
    assert event["type"] == "content_job.queued"
    assert (await client.get("acme", job.id)).status is JobStatus.QUEUED


def test_sync_client_enqueues_in_callers_transaction(dsn: str) -> None:
    with SyncClient(dsn) as sync_client, psycopg.connect(dsn, row_factory=dict_row) as app:
        with app.transaction(force_rollback=True):
            sync_client.enqueue("acme", "echo", {"n": 1}, conn=app)
        with app.transaction():
            kept = sync_client.enqueue("acme", "echo", {"n": 2}, conn=app)
        page = sync_client.list("acme")
        assert [j.id for j in page.jobs] == [kept.id]
        assert sync_client.get("acme", kept.id).input == {"n": 2}
        cancelled = sync_client.cancel("acme", kept.id)
        assert cancelled.status is JobStatus.CANCELLED
        assert [e.type for e in sync_client.events("acme", kept.id)] == [
            EventType.QUEUED,
            EventType.CANCELLED,
        ]


async def test_stale_lease_cannot_finish_or_report_progress(dsn: str, client: Client) -> None:
    job = await client.enqueue("acme", "echo")
    first = await claim_one(dsn, "worker-a")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    rescued = await rescuer.rescue_expired_with(dsn, now=later)
    assert [j.id for j in rescued] == [job.id]
    second = await claim_one(dsn, "worker-b", later)
    assert second["lease_token"] == first["lease_token"] + 1  # type: ignore[operator]

    # The stale attempt: progress and completion both touch zero rows.
    progress = await fetch(
        dsn,
        QUERIES["job_progress_if_leased"],
        {
            "id": job.id,
            "lease_token": first["lease_token"],
            "fraction": 0.5,
            "message": "x",
            "now": None,
        },
    )
    assert progress == []
    assert await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(first)) == []
    # The current attempt wins.
    done = await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(second))
    assert [r["id"] for r in done] == [job.id]
    assert (await client.get("acme", job.id)).result == {"by": "worker-b"}
    types = [(e.type, e.attempt) for e in await client.events("acme", job.id)]
    assert types == [
        (EventType.QUEUED, 0),
        (EventType.RUNNING, 1),
        (EventType.RETRYING, 1),
        (EventType.RUNNING, 2),
        (EventType.DONE, 2),
    ]


async def test_rescue_respects_the_lease_horizon_and_attempts(dsn: str, client: Client) -> None:
    fresh = await client.enqueue("acme", "echo", max_attempts=1)
    await claim_one(dsn, "worker-a")
    now = dt.datetime.now(dt.UTC)
    # Just inside the lease: not rescued.
    assert await rescuer.rescue_expired_with(dsn, now=now + dt.timedelta(seconds=9)) == []
    # Past it, with no attempt left: failed, with a message saying why.
    (rescued,) = await rescuer.rescue_expired_with(dsn, now=now + dt.timedelta(seconds=11))
    assert rescued.id == fresh.id
    assert rescued.status is JobStatus.FAILED
    assert rescued.error_message is not None
    assert "lease expired: worker worker-a" in rescued.error_message
    assert (await client.events("acme", fresh.id))[-1].type is EventType.FAILED


async def test_rescue_after_completion_changes_nothing(dsn: str, client: Client) -> None:
    # River #1302: a rescuer that read "running" must not overwrite a completion that
    # committed in between.
    job = await client.enqueue("acme", "echo")
    claimed = await claim_one(dsn, "worker-a")
    await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(claimed))
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    assert await rescuer.rescue_expired_with(dsn, now=later) == []
    assert (await client.get("acme", job.id)).status is JobStatus.DONE


async def test_concurrent_claimers_never_share_a_job(dsn: str, client: Client) -> None:
    await client.enqueue_many(JobSpec("acme", "echo", {"n": n}) for n in range(400))

    async def claimer(name: str) -> list[object]:
        got: list[object] = []
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            while True:
                cur = await conn.execute(
                    QUERIES["job_claim_batch"],
                    {
                        "now": None,
                        "limit": 7,
                        "worker_id": name,
                        "lease_seconds": 30.0,
                        "job_types": None,
                        "after_company": None,
                    },
                )
                rows = await cur.fetchall()
                if not rows:
                    return got
                got.extend(r[0] for r in rows)

    results = await asyncio.gather(*(claimer(f"c{n}") for n in range(8)))
    claimed = [job_id for r in results for job_id in r]
    assert len(claimed) == 400
    assert len(set(claimed)) == 400
    rows = await fetch(dsn, "SELECT max(attempts) AS a FROM pgjobs.jobs")
    assert rows[0]["a"] == 1


async def test_listener_never_sees_an_event_before_its_row(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """The core promise: on every notification, the job row read from another connection
    is at least as new as the event. Here for items in the commit (the worker's doorbell
    off); tests/integration/test_worker_doorbell.py checks rings."""
    checked = 0
    stale: list[tuple[object, int, int]] = []
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        await psycopg.AsyncConnection.connect(dsn, autocommit=True, row_factory=dict_row) as reader,
    ):
        await listener.execute("LISTEN pgjobs_events")
        jobs = await client.enqueue_many(
            JobSpec(f"company-{n % 3}", "sleep", {"seconds": 0.05}) for n in range(60)
        )
        ids = {j.id for j in jobs}
        settings = fast_settings(storage_dir, concurrency=8, doorbell=False)
        async with (
            running_worker(dsn, demo.registry, settings),
            running_worker(dsn, demo.registry, settings),
        ):
            terminal: set[object] = set()
            async for note in listener.notifies(timeout=60):
                for event in json.loads(note.payload)["events"]:
                    cur = await reader.execute(
                        "SELECT event_seq, status FROM pgjobs.jobs WHERE id = %s",
                        [event["jobId"]],
                    )
                    row = await cur.fetchone()
                    assert row is not None, "event for a job that is not visible"
                    checked += 1
                    if row["event_seq"] < event["seq"]:
                        stale.append((event["jobId"], row["event_seq"], event["seq"]))
                    if event["status"] == "done":
                        terminal.add(event["jobId"])
                if len(terminal) == len(ids):
                    break
    assert stale == []
    assert checked == 60 * 13  # queued, running, 10 progress, done: each checked
    assert len(terminal) == 60


@pytest.mark.parametrize("status", ["running", "done"])
async def test_cancel_and_retry_follow_the_state_machine(
    dsn: str, client: Client, status: str
) -> None:
    from pgjobs.errors import InvalidTransitionError, JobNotFoundError

    job = await client.enqueue("acme", "echo", max_attempts=1)
    claimed = await claim_one(dsn, "w")
    if status == "done":
        await fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(claimed))
        with pytest.raises(InvalidTransitionError, match=r"cannot cancel job .* it is done"):
            await client.cancel("acme", job.id)
        with pytest.raises(InvalidTransitionError):
            await client.retry("acme", job.id)
    else:
        with pytest.raises(InvalidTransitionError):
            await client.retry("acme", job.id)
        assert (await client.cancel("acme", job.id)).status is JobStatus.CANCELLED
        again = await client.retry("acme", job.id)
        assert again.status is JobStatus.QUEUED
        assert again.max_attempts == 2, "a retry grants an attempt when none is left"
    with pytest.raises(JobNotFoundError):
        await client.cancel("other-company", job.id)
    with pytest.raises(JobNotFoundError):
        await client.get("acme", "not-a-uuid")


async def test_finish_waiting_on_a_heartbeat_still_finishes(dsn: str, client: Client) -> None:
    # A heartbeat that renews the lease while the completion waits for the row lock makes
    # a new row version; the completion must follow it, not lose the job.
    job = await client.enqueue("acme", "echo")
    claimed = await claim_one(dsn, "w")
    async with await psycopg.AsyncConnection.connect(dsn) as heartbeat:
        await heartbeat.execute(
            QUERIES["job_extend_leases"],
            {
                "ids": [job.id],
                "lease_tokens": [claimed["lease_token"]],
                "lease_seconds": 30.0,
                "now": None,
            },
        )  # row locked and updated, not committed yet
        finish = asyncio.create_task(
            fetch(dsn, QUERIES["job_finish_many_if_leased"], finish_params(claimed))
        )
        await asyncio.sleep(0.3)
        assert not finish.done(), "the completion waits for the heartbeat's lock"
        await heartbeat.commit()
        finished = await asyncio.wait_for(finish, 10)
    assert [r["id"] for r in finished] == [job.id]
    assert (await client.get("acme", job.id)).status is JobStatus.DONE


# --- The producer API on the caller's own connection, whatever its configuration ---------
#
# Issue 14: `Client.enqueue(..., conn=conn)` with a plain `psycopg.AsyncConnection` (tuple
# rows) raised TypeError. Every method that takes `conn=` must work on a connection with any
# row factory, inside `conn.transaction()` or a plain BEGIN, async or sync, and leave the
# connection's autocommit flag, transaction status and row factory as they were.


def _pairs_row(cursor: Any) -> Any:
    """A custom row factory: each row as a list of (column, value) pairs."""
    names = [c.name for c in cursor.description] if cursor.description else []

    def make(values: Sequence[Any]) -> list[tuple[str, Any]]:
        return list(zip(names, values, strict=True))

    return make


ROW_FACTORIES: dict[str, Any] = {
    "tuple_row": None,  # psycopg's default
    "dict_row": dict_row,
    "namedtuple_row": namedtuple_row,
    "custom": _pairs_row,
}


async def _maybe(value: Any) -> Any:
    """The value itself for the sync client and connection, awaited for the async ones."""
    return await value if inspect.isawaitable(value) else value


@contextlib.asynccontextmanager
async def _caller_connection(
    dsn: str, flavour: str, row_factory: Any, *, autocommit: bool
) -> AsyncIterator[Any]:
    kwargs: dict[str, Any] = {"autocommit": autocommit}
    if row_factory is not None:
        kwargs["row_factory"] = row_factory
    if flavour == "async":
        async with await psycopg.AsyncConnection.connect(dsn, **kwargs) as conn:
            yield conn
    else:
        with psycopg.Connection.connect(dsn, **kwargs) as conn:
            yield conn


@contextlib.asynccontextmanager
async def _producer(dsn: str, flavour: str) -> AsyncIterator[Any]:
    if flavour == "async":
        async with await Client.connect(dsn) as client:
            yield client
    else:
        with SyncClient(dsn) as sync_client:
            yield sync_client


@contextlib.asynccontextmanager
async def _transaction(conn: Any) -> AsyncIterator[None]:
    if isinstance(conn, psycopg.AsyncConnection):
        async with conn.transaction():
            yield
    else:
        with conn.transaction():
            yield


def _state(conn: Any) -> tuple[object, ...]:
    return (conn.autocommit, conn.info.transaction_status, conn.row_factory, conn.cursor_factory)


class _Rollback(Exception):
    """Raised inside conn.transaction() to roll it back, as an application error would."""


async def _job_ids_notified(listener: psycopg.AsyncConnection[Any], expected: set[str]) -> set[str]:
    """Job ids in the pgjobs NOTIFYs that arrive until all of ``expected`` have (10 s at most)."""
    seen: set[str] = set()
    async for note in listener.notifies(timeout=10):
        seen.update(e["jobId"] for e in json.loads(note.payload)["events"])
        if expected <= seen:
            break
    return seen


async def _notifications_before_marker(
    dsn: str, listener: psycopg.AsyncConnection[Any]
) -> list[str]:
    """Commit a marker NOTIFY on the pgjobs channel and return every notification the
    listener gets before it: a transaction that committed (or not) earlier would have been
    delivered first, so this is a bounded wait, not a sleep."""
    marker = f"marker-{uuid.uuid4()}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as other:
        await other.execute("SELECT pg_notify(%s, %s)", [CHANNEL, marker])
    before: list[str] = []
    async for note in listener.notifies(timeout=10):
        if note.payload == marker:
            return before
        before.append(note.payload)
    raise AssertionError("the marker NOTIFY never arrived")


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
@pytest.mark.parametrize("style", ["conn.transaction()", "plain BEGIN"])
@pytest.mark.parametrize("flavour", ["async", "sync"])
@pytest.mark.parametrize("factory", list(ROW_FACTORIES))
async def test_every_conn_method_works_on_the_callers_connection(
    dsn: str, factory: str, flavour: str, style: str, outcome: str
) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as setup:
        await setup.execute("CREATE TABLE orders (id int PRIMARY KEY)")
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        _producer(dsn, flavour) as producer,
        _caller_connection(
            dsn, flavour, ROW_FACTORIES[factory], autocommit=style == "conn.transaction()"
        ) as app,
    ):
        await listener.execute(f"LISTEN {CHANNEL}")
        initial = _state(app)

        async def call(method: str, *args: Any, **kwargs: Any) -> Any:
            before = _state(app)
            result = await _maybe(getattr(producer, method)(*args, conn=app, **kwargs))
            assert _state(app) == before, f"{method} changed the caller's connection"
            return result

        async def work() -> list[Job]:
            await _maybe(app.execute("INSERT INTO orders VALUES (1)"))
            job = await call("enqueue", "acme", "render", {"title": "Launch"}, priority=5)
            more = await call("enqueue_many", [JobSpec("acme", "echo", {"n": n}) for n in range(3)])
            assert [j.input for j in more] == [{"n": 0}, {"n": 1}, {"n": 2}]
            assert (await call("get", "acme", job.id)).status is JobStatus.QUEUED
            page = await call("list", "acme", status="queued", limit=10)
            assert {j.id for j in page.jobs} == {job.id, *(j.id for j in more)}
            cancelled = await call("cancel", "acme", more[0].id)
            assert cancelled.status is JobStatus.CANCELLED
            assert (await call("retry", "acme", more[0].id)).status is JobStatus.QUEUED
            events = await call("events", "acme", more[0].id)
            assert [e.type for e in events] == [
                EventType.QUEUED,
                EventType.CANCELLED,
                EventType.RETRYING,
            ]
            assert await call("get_asset", "acme", uuid.uuid4()) is None
            with pytest.raises(JobNotFoundError):
                await call("get", "globex", job.id)
            return [job, *more]

        if style == "conn.transaction()":
            with contextlib.suppress(_Rollback):
                async with _transaction(app):
                    jobs = await work()
                    if outcome == "rollback":
                        raise _Rollback
        else:
            jobs = await work()
            assert app.info.transaction_status is TransactionStatus.INTRANS
            await _maybe(app.commit() if outcome == "commit" else app.rollback())
        assert _state(app) == initial

        ids = {str(j.id) for j in jobs}
        if outcome == "commit":
            assert await _job_ids_notified(listener, ids) >= ids
            assert {str(r["id"]) for r in await fetch(dsn, "SELECT id FROM pgjobs.jobs")} == ids
            assert await fetch(dsn, "SELECT id FROM orders") == [{"id": 1}]
        else:
            assert await _notifications_before_marker(dsn, listener) == []
            assert await fetch(dsn, "SELECT id FROM pgjobs.jobs") == []
            assert await fetch(dsn, "SELECT id FROM pgjobs.job_events") == []
            assert await fetch(dsn, "SELECT id FROM orders") == []


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_a_caller_connection_in_autocommit_mode_commits_at_once(
    dsn: str, flavour: str
) -> None:
    async with (
        await psycopg.AsyncConnection.connect(dsn, autocommit=True) as listener,
        _producer(dsn, flavour) as producer,
        _caller_connection(dsn, flavour, None, autocommit=True) as app,
    ):
        await listener.execute(f"LISTEN {CHANNEL}")
        job = await _maybe(producer.enqueue("acme", "echo", conn=app))
        # No transaction was opened on the caller's connection, and none is left open:
        # the job is committed and announced already.
        assert app.info.transaction_status is TransactionStatus.IDLE
        assert await _job_ids_notified(listener, {str(job.id)}) == {str(job.id)}
        assert [r["id"] for r in await fetch(dsn, "SELECT id FROM pgjobs.jobs")] == [job.id]


def test_a_sync_client_with_a_pool_of_one(dsn: str) -> None:
    """max_size below psycopg_pool's default min_size (4) is a pool, not a ValueError."""
    with SyncClient(dsn, max_size=1) as sync_client:
        job = sync_client.enqueue("acme", "echo", {})
        assert sync_client.get("acme", job.id).id == job.id
