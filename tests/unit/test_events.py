"""pgjobs.events: the NOTIFY formats' parsing, and how a worker acts on its channel."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from pathlib import Path

import pytest

from pgjobs import events
from pgjobs.config import WorkerSettings
from pgjobs.events import Cancelled, Claimable
from pgjobs.registry import Registry
from pgjobs.worker import Worker


@pytest.mark.parametrize(
    "payload",
    [
        "not json",
        "[]",
        '{"work": 1}',
        '{"work": [{"status": "running", "jobType": "echo"}]}',
        '{"work": [{"status": "queued"}]}',
        '{"work": [{"status": "cancelled", "jobId": "nope"}]}',
        '{"work": [{"status": "queued", "jobType": "echo", "runAt": "2030-01-01T00:00:00"}]}',
        '{"events": []}',
    ],
)
def test_unreadable_work_payloads_raise_value_error(payload: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the one error the readers catch
        events.parse_work(payload)


@pytest.mark.parametrize(
    "payload", ["not json", '{"work": []}', '{"events": [{"jobId": "x"}]}', '{"events": 1}']
)
def test_unreadable_event_payloads_raise_value_error(payload: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the one error the readers catch
        events.parse_events(payload)


@pytest.mark.parametrize(
    "payload",
    ["not json", "null", "[]", '{"ring": 1}', '{"ring": {"acme": 1}}', '{"ring": {"acme": ["x"]}}'],
)
def test_unreadable_events_channel_payloads_raise_value_error(payload: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 -- the one error the readers catch
        events.parse_events_channel(payload)


def test_a_ring_names_each_job_once_under_its_company() -> None:
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    [payload] = events.encode_ring([("acme", a), ("beta", b), ("acme", c), ("acme", a)])
    ring = events.parse_events_channel(payload)
    assert ring == events.Ring({"acme": (a, c), "beta": (b,)})
    assert events.encode_ring([]) == []


@pytest.mark.parametrize("company_len", [1, 200])
def test_a_long_ring_is_split_under_the_notify_limit(company_len: int) -> None:
    jobs = [(f"{i % 7}".ljust(company_len, "é"), uuid.uuid4()) for i in range(2_000)]
    payloads = events.encode_ring(jobs)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= events.NOTIFY_PAYLOAD_LIMIT for p in payloads)
    rung = []
    for payload in payloads:
        ring = events.parse_events_channel(payload)
        assert isinstance(ring, events.Ring)
        rung += [(company, job) for company, ids in ring.jobs.items() for job in ids]
    assert sorted(rung) == sorted(jobs)


def test_a_ring_is_written_as_compact_json_with_company_ids_escaped() -> None:
    """encode_ring joins strings itself: its payloads are what json.dumps writes, a company
    id with quotes, a backslash, a control character or non-ASCII included, and a split
    ring fills each payload but the last until the next id would not fit."""
    companies = ['q"uote', "back\\slash", "tab\there", "ünïcode"]
    jobs = [(companies[i % 4], uuid.uuid4()) for i in range(700)]
    payloads = events.encode_ring(jobs)
    for payload in payloads:
        compact = json.dumps(json.loads(payload), separators=(",", ":"), ensure_ascii=False)
        assert payload == compact
    assert all(len(p.encode()) > events.NOTIFY_PAYLOAD_LIMIT - 60 for p in payloads[:-1])


def test_the_events_channel_reader_reads_items_too() -> None:
    event = events.LiveEvent(7, uuid.uuid4(), "acme", 2, "content_job.running", "running", 1, {})
    assert events.parse_events_channel(events.encode_events([event])) == [event]


def _worker(tmp_path: Path, *types: str) -> tuple[Worker, list[str]]:
    registry = Registry()
    for job_type in types:

        async def handler(ctx: object) -> None:
            pass

        registry.register(job_type, handler)
    worker = Worker("dbname=unused", registry, WorkerSettings(storage_dir=tmp_path))
    calls: list[str] = []
    worker._wake = lambda: calls.append("wake")  # type: ignore[method-assign]
    worker._interrupt = lambda job_id, reason: calls.append(f"stop {job_id}")  # type: ignore[method-assign]
    return worker, calls


def test_worker_acts_on_what_it_claims_and_on_cancellations(tmp_path: Path) -> None:
    worker, calls = _worker(tmp_path, "echo")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    job_id = uuid.uuid4()
    worker._on_notify(
        events.encode_work(
            [
                Claimable("render"),  # not in its registry
                Claimable("echo", later),  # not due yet
                Cancelled(job_id),
            ]
        )
    )
    assert calls == [f"stop {job_id}"]
    worker._on_notify(events.encode_work([Claimable("echo", earlier)]))  # due by now
    worker._on_notify(events.encode_work([Claimable("echo")]))
    assert calls == [f"stop {job_id}", "wake", "wake"]


def test_worker_claims_after_a_payload_it_cannot_read(tmp_path: Path) -> None:
    """It may have announced work: look rather than wait for the poll."""
    worker, calls = _worker(tmp_path, "echo")
    worker._on_notify('{"events": []}')
    assert calls == ["wake"]
