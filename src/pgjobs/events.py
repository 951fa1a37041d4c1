"""The one event contract: event types, NOTIFY channels, and what each channel carries.

Every job transition writes one audit row (``pgjobs.job_events``) and, at commit, the
publish trigger (sql/0007_worker_channel.sql) announces it. The database sends on two
channels, each built by one SQL function; this module is their one Python reading:

* ``EVENTS_CHANNEL`` (``pgjobs_events``), for the gateway's streams and anyone watching
  jobs: every transition, as ``{"events": [item, ...]}`` with one item per audit row,
  built by ``pgjobs.notify_item``: ``{eventId, jobId, companyId, seq, type, status,
  attempt}`` plus the event's ``PUBLISHED_KEYS`` (``progress``, ``resultAssetId``,
  ``errorMessage``, ``runAt``) where its type has them, messages cut to 300 characters.
  ``parse_events`` reads it into ``LiveEvent`` objects.
* ``WORK_CHANNEL`` (``pgjobs_work``), for workers: only what a worker acts on, as
  ``{"work": [item, ...]}`` built by ``pgjobs.work_item``. ``{"status": "queued",
  "jobType": t}``: jobs of type ``t`` became claimable (enqueued, retried, released,
  rescued), one item per type per statement, with ``"runAt"`` (the earliest) only when
  none of them was due yet at the statement's time. ``{"status": "cancelled", "jobId":
  id}``: a running job was cancelled. Workers do not receive progress, running or
  terminal events, which are most of the traffic on a busy queue. ``parse_work`` reads it
  into ``Claimable`` and ``Cancelled`` items.

Both channels are doorbells, not logs: anything sent while a listener is down is gone,
and the tables are the record (``pgjobs.notifier``). Each payload stays under
PostgreSQL's 8000-byte NOTIFY limit: a statement sends as many per channel as its items
need (one for most statements), and nothing on ``WORK_CHANNEL`` when it has nothing for
workers (the claim, progress and completions: the hot path).

A transaction may ask for a *ring* instead of items (the transaction-local setting
``pgjobs.doorbell = 'on'``, sql/0019_doorbell.sql): the publish trigger still writes every
audit row but sends nothing on ``EVENTS_CHANNEL``, and after the commit the writer sends
``{"ring": {companyId: [jobId, ...], ...}}`` on that channel, naming the jobs whose
transitions it committed (``encode_ring``). A ring carries no event: whoever listens
reads those jobs' events from ``pgjobs.job_events``, as it does to resume. Since it is
sent after the commit, a ring is never ahead of the database; a ring lost between the
commit and its send (a crash) leaves the rows unannounced, so listeners also catch up
periodically. Why: a commit that carries a NOTIFY takes a database-wide lock and holds
it through its WAL flush, so such commits never share a flush (docs/benchmarks.md, "A
doorbell apart from the commit"); the ring's own transaction writes no WAL and holds the
lock only briefly. ``parse_events_channel`` reads either form.

The public form of an event (the SSE data of the gateway's streams, from a NOTIFY item,
an audit row or a job row alike) is ``event_data``: the same names, without the ids
only the database and the fan-out use.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Final

EVENTS_CHANNEL: Final = "pgjobs_events"
"""Every transition, for the gateway and other watchers."""
WORK_CHANNEL: Final = "pgjobs_work"
"""Claimable jobs and cancellations of running jobs, for workers."""
DOORBELL_SETTING: Final = "pgjobs.doorbell"
"""The transaction-local setting (value ``'on'``) that asks the publish trigger for a ring
instead of items on ``EVENTS_CHANNEL``."""
NOTIFY_PAYLOAD_LIMIT: Final = 7900
"""The most bytes one payload built here holds: PostgreSQL refuses 8000 and more."""


class EventType(StrEnum):
    """The type of a transition: ``pgjobs.job_events.type``, an item's ``type``."""

    QUEUED = "content_job.queued"
    RUNNING = "content_job.running"
    PROGRESS = "content_job.progress"
    RETRYING = "content_job.retrying"
    DONE = "content_job.done"
    FAILED = "content_job.failed"
    CANCELLED = "content_job.cancelled"


PUBLISHED_KEYS: Final = ("progress", "resultAssetId", "errorMessage", "runAt")
"""The keys of an event's payload that leave the database (NOTIFY items, SSE data), in
the order SSE data lists them. An audit row's payload may hold more (``traceback``, for
operators only) that never do."""


@dataclass(frozen=True, slots=True)
class LiveEvent:
    """One event as the events channel carried it (messages cut to 300 characters)."""

    event_id: int
    job_id: uuid.UUID
    company_id: str
    seq: int
    type: str
    status: str
    attempt: int
    extra: dict[str, Any]
    """The event's PUBLISHED_KEYS, where its type has them."""


def parse_events(payload: str) -> list[LiveEvent]:
    """The events of one ``EVENTS_CHANNEL`` payload of items; ValueError for a ring or
    anything else (``parse_events_channel`` reads both)."""
    parsed = parse_events_channel(payload)
    if isinstance(parsed, Ring):
        raise ValueError(f"a ring, not {EVENTS_CHANNEL} items")
    return parsed


def _event(raw: dict[str, Any]) -> LiveEvent:
    return LiveEvent(
        event_id=int(raw["eventId"]),
        job_id=uuid.UUID(raw["jobId"]),
        company_id=str(raw["companyId"]),
        seq=int(raw["seq"]),
        type=str(raw["type"]),
        status=str(raw["status"]),
        attempt=int(raw["attempt"]),
        extra={k: raw[k] for k in PUBLISHED_KEYS if k in raw},
    )


def event_from_row(row: Mapping[str, Any]) -> LiveEvent:
    """An audit row (``pgjobs.job_events``: id, job_id, company_id, seq, type, status,
    attempt, payload) as the LiveEvent its NOTIFY item would have carried: what a reader
    of rung jobs' events hands on. ``extra`` holds the payload's PUBLISHED_KEYS, messages
    in full (``event_data`` cuts them as the item does)."""
    payload = row["payload"]
    return LiveEvent(
        event_id=int(row["id"]),
        job_id=row["job_id"],
        company_id=str(row["company_id"]),
        seq=int(row["seq"]),
        type=str(row["type"]),
        status=str(row["status"]),
        attempt=int(row["attempt"]),
        extra={k: payload[k] for k in PUBLISHED_KEYS if k in payload},
    )


def encode_events(events: Iterable[LiveEvent]) -> str:
    """An ``EVENTS_CHANNEL`` payload, as ``pgjobs.notify_item`` builds it (up to
    whitespace): for tests and tools that stand in for the database."""
    items = [
        {
            "eventId": e.event_id,
            "jobId": str(e.job_id),
            "companyId": e.company_id,
            "seq": e.seq,
            "type": e.type,
            "status": e.status,
            "attempt": e.attempt,
            **{k: e.extra[k] for k in PUBLISHED_KEYS if k in e.extra},
        }
        for e in events
    ]
    return json.dumps({"events": items}, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class Ring:
    """A doorbell: these jobs' transitions committed without NOTIFY items; their events are
    in ``pgjobs.job_events``. ``jobs`` maps each company id to its jobs' ids."""

    jobs: Mapping[str, tuple[uuid.UUID, ...]]


def encode_ring(jobs: Iterable[tuple[str, uuid.UUID]]) -> list[str]:
    """The ``EVENTS_CHANNEL`` payloads that ring for ``(company_id, job_id)`` pairs (in
    that order, duplicates dropped): ``{"ring": {companyId: [jobId, ...]}}``, as many as
    needed to keep each within ``NOTIFY_PAYLOAD_LIMIT`` bytes; none for no jobs.

    Written as ``json.dumps(..., separators=(",", ":"), ensure_ascii=False)`` writes it,
    but by joining strings: a worker rings after every commit, and at small batches the
    dict and lists json.dumps would walk cost ~4 µs of a 10-job ring's ~14."""
    by_company: dict[str, dict[uuid.UUID, None]] = {}
    for company_id, job_id in jobs:
        by_company.setdefault(company_id, {})[job_id] = None
    payloads: list[str] = []
    parts: list[str] = []  # '"companyId":["jobId",...]' of the payload being filled
    # Bytes of the payload: '{"ring":{' + '}}', then per company its key with its ':[]'
    # and a comma, and per id 38 bytes quoted plus a comma.
    size = 11
    for company_id, ids in by_company.items():
        key = json.dumps(company_id, ensure_ascii=False)
        key_size = len(key.encode()) + 4
        texts = [str(job_id) for job_id in ids]
        start = 0
        while start < len(texts):
            fit = (NOTIFY_PAYLOAD_LIMIT - size - key_size) // 39
            if fit < 1 and parts:  # not one more id: this payload is full
                payloads.append(_ring_payload(parts))
                parts, size = [], 11
                continue
            taken = texts[start : start + max(fit, 1)]
            parts.append(key + ':["' + '","'.join(taken) + '"]')
            size += key_size + 39 * len(taken)
            start += len(taken)
    if parts:
        payloads.append(_ring_payload(parts))
    return payloads


def _ring_payload(parts: list[str]) -> str:
    return '{"ring":{' + ",".join(parts) + "}}"


def parse_events_channel(payload: str) -> list[LiveEvent] | Ring:
    """One ``EVENTS_CHANNEL`` payload: its events, or a Ring; ValueError if it is
    neither."""
    try:
        raw = json.loads(payload)
        if "ring" in raw:
            return Ring(
                {
                    str(company_id): tuple(uuid.UUID(job_id) for job_id in ids)
                    for company_id, ids in raw["ring"].items()
                }
            )
        return [_event(item) for item in raw["events"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a {EVENTS_CHANNEL} payload: {exc!r}") from exc


MESSAGE_LIMIT: Final = 300
"""The characters of an error or progress message an event carries: what
``pgjobs.notify_item`` keeps of them (NOTIFY size), and so what ``event_data`` keeps
whatever the event was read from."""


def event_data(
    job_id: object, status: str, type_: str, attempt: int, seq: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """An event's public form (the gateway's SSE data): ``{jobId, status, type, attempt,
    seq}`` and the ``PUBLISHED_KEYS`` of ``extra`` (an audit row's payload, a job row's
    fields or a LiveEvent's extra) that are not null, messages cut to ``MESSAGE_LIMIT``
    characters. Cut here too, not only in the NOTIFY item: an event has the same data
    whether it came in an item, was read after a ring, or was replayed from the table."""
    data: dict[str, Any] = {
        "jobId": str(job_id),
        "status": status,
        "type": type_,
        "attempt": attempt,
        "seq": seq,
    }
    data.update({k: extra[k] for k in PUBLISHED_KEYS if extra.get(k) is not None})
    error = data.get("errorMessage")
    if isinstance(error, str) and len(error) > MESSAGE_LIMIT:
        data["errorMessage"] = error[:MESSAGE_LIMIT]
    progress = data.get("progress")
    if isinstance(progress, dict):
        message = progress.get("message")
        if isinstance(message, str) and len(message) > MESSAGE_LIMIT:
            data["progress"] = {**progress, "message": message[:MESSAGE_LIMIT]}
    return data


# -- the worker channel -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimable:
    """Jobs of ``job_type`` became claimable. ``run_at`` is None if one was due at the
    announcing statement's time (the database's clock), else the earliest run_at."""

    job_type: str
    run_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Cancelled:
    """A running job was cancelled: whoever runs it stops."""

    job_id: uuid.UUID


WorkItem = Claimable | Cancelled


def parse_work(payload: str) -> list[WorkItem]:
    """The items of one ``WORK_CHANNEL`` payload; ValueError if it is not one."""
    try:
        return [_work_item(raw) for raw in json.loads(payload)["work"]]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a {WORK_CHANNEL} payload: {exc!r}") from exc


def _work_item(raw: dict[str, Any]) -> WorkItem:
    status = raw["status"]
    if status == "queued":
        run_at = raw.get("runAt")
        if run_at is None:
            return Claimable(str(raw["jobType"]))
        when = datetime.fromisoformat(run_at)
        if when.tzinfo is None:
            raise ValueError(f"runAt without a time zone: {run_at!r}")
        return Claimable(str(raw["jobType"]), when)
    if status == "cancelled":
        return Cancelled(uuid.UUID(raw["jobId"]))
    raise ValueError(f"unknown {WORK_CHANNEL} item status {status!r}")


def encode_work(items: Iterable[WorkItem]) -> str:
    """A ``WORK_CHANNEL`` payload, as ``pgjobs.work_item`` builds it (up to the format
    of runAt's offset): for tests and tools that stand in for the database."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, Claimable):
            entry: dict[str, Any] = {"status": "queued", "jobType": item.job_type}
            if item.run_at is not None:
                entry["runAt"] = item.run_at.isoformat()
            out.append(entry)
        else:
            out.append({"status": "cancelled", "jobId": str(item.job_id)})
    return json.dumps({"work": out}, separators=(",", ":"), ensure_ascii=False)
