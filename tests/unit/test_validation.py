"""Input validation and configuration: no database needed."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import uuid
from enum import IntEnum
from types import MappingProxyType

import pytest

from pgjobs import registry as registry_module
from pgjobs.client import decode_cursor, encode_cursor, parse_job_id
from pgjobs.config import WorkerSettings
from pgjobs.db import redact
from pgjobs.errors import ConfigurationError, InvalidJobError, JobNotFoundError
from pgjobs.jobspec import JobSpec
from pgjobs.registry import Registry


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"job_type": ""}, "job_type is required"),
        ({"job_type": "   "}, "job_type is required"),
        ({"job_type": "x" * 201}, "longer than 200"),
        ({"company_id": ""}, "company_id is required"),
        ({"input": ["not", "an", "object"]}, "input must be a JSON object"),
        ({"input": {"a": "nul\x00byte"}}, "NUL character"),
        ({"input": {"k\x00": 1}}, "NUL character"),
        ({"input": {"a": "\ud800"}}, "unpaired surrogate"),
        ({"input": {"a": float("nan")}}, "JSON cannot represent"),
        ({"input": {"a": float("inf")}}, "JSON cannot represent"),
        ({"input": {"a": object()}}, "is not JSON"),
        ({"input": {1: "x"}}, "non-string key"),
        ({"priority": 2**40}, "priority is out of range"),
        ({"priority": "high"}, "priority must be an integer"),
        ({"max_attempts": 0}, "between 1 and 1000"),
        ({"run_at": dt.datetime(2030, 1, 1)}, "timezone-aware"),
        # Past the common case's shortcuts (plain str, int and dict, the default
        # unique_while), the same checks.
        ({"company_id": "acme\ud800"}, "company_id contains an unpaired surrogate"),
        ({"job_type": "é\x00"}, "job_type contains a NUL character"),
        ({"input": MappingProxyType({"a": "\ud800"})}, "unpaired surrogate"),
        ({"priority": True}, "priority must be an integer"),
        ({"max_attempts": False}, "max_attempts must be an integer"),
        ({"max_attempts": 2.0}, "max_attempts must be an integer"),
        ({"unique_while": "queued"}, "not a string"),
        ({"unique_while": ()}, "unique_while must name one or more"),
        ({"unique_while": ("queued", "waiting")}, "unique_while must name one or more"),
    ],
)
def test_bad_job_specs_are_rejected_with_a_clear_message(
    kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"company_id": "acme", "job_type": "echo", **kwargs}
    with pytest.raises(InvalidJobError, match=message):
        JobSpec(**args)  # type: ignore[arg-type]


def test_values_past_the_shortcuts_are_kept_as_before() -> None:
    class Level(IntEnum):
        HIGH = 5

    spec = JobSpec(
        "acme", "échø", MappingProxyType({}), priority=Level.HIGH, unique_while=["done", "done"]
    )  # type: ignore[arg-type]
    assert spec.priority == 5
    assert spec.unique_while == ("done",)
    assert spec.input_json() == "{}"
    assert JobSpec("acme", "echo").unique_while == ("queued", "running")
    assert JobSpec("acme", "echo", {"a": 1}).input_json() == '{"a":1}'


def test_a_spec_is_the_frozen_dataclass_its_fields_describe() -> None:
    """JobSpec's own __init__ takes the fields in order with their defaults, and the
    dataclass's copy, equality and freezing still hold; a copy is checked again."""
    run_at = dt.datetime(2030, 1, 1, 9, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    job_id = uuid.UUID(int=7)
    values = ("acme", "echo", {"a": 1}, "task-1", 5, run_at, 4, job_id, "key",
              dt.timedelta(minutes=1), ("queued",))  # fmt: skip
    spec = JobSpec(*values)  # type: ignore[arg-type]
    assert [getattr(spec, f.name) for f in dataclasses.fields(JobSpec)] == [
        *values[:5],
        run_at.astimezone(dt.UTC),
        *values[6:],
    ]
    assert spec.run_at is not None
    assert spec.run_at.utcoffset() == dt.timedelta(0)
    plain = JobSpec("acme", "echo")
    assert (plain.input, plain.source_task_id, plain.priority, plain.run_at) == ({}, None, 0, None)
    assert (plain.max_attempts, plain.unique_key, plain.unique_for) == (3, None, None)
    assert plain.unique_while == ("queued", "running")
    assert plain.id != JobSpec("acme", "echo").id  # a new id each, unless given
    assert dataclasses.replace(spec) == spec
    moved = dataclasses.replace(spec, priority=6)
    assert (moved.id, moved.priority, moved != spec) == (job_id, 6, True)
    with pytest.raises(InvalidJobError, match="company_id is required"):
        dataclasses.replace(spec, company_id=" ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.priority = 7  # type: ignore[misc]


def test_deep_nesting_is_rejected() -> None:
    value: dict[str, object] = {}
    for _ in range(100):
        value = {"a": value}
    with pytest.raises(InvalidJobError, match="nested deeper"):
        JobSpec("acme", "echo", value)


def test_a_good_spec_serialises_compactly() -> None:
    spec = JobSpec("acme", "echo", {"b": [1, 2.5, None, True], "a": "é"})
    assert spec.input_json() == '{"b":[1,2.5,null,true],"a":"\\u00e9"}'


def test_cursor_round_trip_and_garbage() -> None:
    from pgjobs.types import Job, JobStatus

    now = dt.datetime.now(dt.UTC)
    job = Job(
        id=uuid.uuid4(),
        company_id="acme",
        job_type="echo",
        status=JobStatus.QUEUED,
        input={},
        priority=0,
        run_at=now,
        attempts=0,
        max_attempts=3,
        result=None,
        result_asset_id=None,
        error_message=None,
        source_task_id=None,
        progress=None,
        worker_id=None,
        lease_token=0,
        lease_expires_at=None,
        event_seq=1,
        started_at=None,
        finished_at=None,
        created_at=now,
        updated_at=now,
    )
    assert decode_cursor(encode_cursor(job)) == (now, job.id)
    for garbage in ["", "!!!", "bm90IGEgY3Vyc29y", encode_cursor(job)[:-3]]:
        with pytest.raises(InvalidJobError, match="cursor is malformed"):
            decode_cursor(garbage)


def test_malformed_job_id_is_not_found() -> None:
    with pytest.raises(JobNotFoundError):
        parse_job_id("../../etc/passwd")


def test_registry_rejects_duplicates_and_loads_by_path() -> None:
    registry = Registry()
    registry.register("a", lambda ctx: None)
    with pytest.raises(ConfigurationError, match="already has a handler"):
        registry.register("a", lambda ctx: None)
    assert registry_module.load("pgjobs.demo:registry").job_types == (
        "echo",
        "fail",
        "render",
        "sleep",
        "sleep_sync",
    )
    for bad, message in [
        ("pgjobs.demo", "must look like"),
        ("no_such_module_xyz:registry", "cannot import handler module"),
        ("pgjobs.demo:nothing", "is not a pgjobs Registry"),
    ]:
        with pytest.raises(ConfigurationError, match=message):
            registry_module.load(bad)


def test_settings_refuse_a_heartbeat_slower_than_the_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGJOBS_LEASE_SECONDS", "5")
    monkeypatch.setenv("PGJOBS_HEARTBEAT_SECONDS", "6")
    with pytest.raises(ConfigurationError, match="must be shorter than the lease"):
        WorkerSettings.from_env()
    monkeypatch.setenv("PGJOBS_LEASE_SECONDS", "nan")
    with pytest.raises(ConfigurationError, match="PGJOBS_LEASE_SECONDS"):
        WorkerSettings.from_env()


def test_passwords_never_reach_messages() -> None:
    assert redact("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert "s3cret" not in redact("host=h password=s3cret dbname=x")


def test_job_ids_are_time_ordered_uuid7() -> None:
    from pgjobs.jobspec import new_job_id

    ids = [new_job_id() for _ in range(2000)]
    assert {i.version for i in ids} == {7}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    assert len(set(ids)) == 2000
    millis = [i.int >> 80 for i in ids]
    assert millis == sorted(millis), "ordered by creation time (to the millisecond)"
    now = dt.datetime.now(dt.UTC).timestamp() * 1000
    assert abs(millis[-1] - now) < 5000


def _frozen_clock(monkeypatch: pytest.MonkeyPatch, ms: int) -> list[int]:
    """new_job_id's clock, stopped at ``ms`` (Unix milliseconds) until the test changes
    the returned cell, and new_job_id's state as in a fresh process (both restored after
    the test)."""
    from pgjobs import jobspec

    now = [ms]
    monkeypatch.setattr(jobspec, "_clock_ns", lambda: now[0] * 1_000_000)
    monkeypatch.setattr(jobspec, "_last_ms", -1)
    monkeypatch.setattr(jobspec, "_count", 0)
    return now


def test_job_ids_of_one_millisecond_are_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within a millisecond the ids count up (so that PostgreSQL adds each at the end of
    the indexes on job ids), past the 4,096 one millisecond holds, and on through a clock
    set back a little; a clock set back far is followed."""
    from pgjobs.jobspec import MAX_CLOCK_STEP_BACK_MS, new_job_id

    start = 1_800_000_000_000  # 2027-01-15
    now = _frozen_clock(monkeypatch, start)
    ids = [new_job_id() for _ in range(5000)]
    now[0] = start - 5  # a small step back
    ids += [new_job_id() for _ in range(10)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    millis = [i.int >> 80 for i in ids]
    assert millis[0] == start
    assert millis[4095] == start  # 4,096 ids in the clock's millisecond...
    assert millis[4096] == start + 1  # ...then the next one's
    assert millis[-1] == start + 1

    now[0] = start - MAX_CLOCK_STEP_BACK_MS - 1000  # set back far: follow the clock
    assert new_job_id().int >> 80 == now[0]


def _random_bits(job_id: uuid.UUID) -> int:
    return job_id.int & ((1 << 80) - 1)


def test_a_forked_process_draws_job_ids_of_its_own() -> None:
    """new_job_id draws its random bits for many ids at once: a child forked after a draw
    must not hand out the ids left in its parent's (same millisecond, same bits)."""
    from pgjobs.jobspec import new_job_id

    new_job_id()  # a draw, most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids' random bits, then exit at once
        try:
            bits = ",".join(str(_random_bits(new_job_id())) for _ in range(20))
            os.write(write, bits.encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = {int(bits) for bits in pipe.read().split(",")}
    os.waitpid(pid, 0)
    parent = {_random_bits(new_job_id()) for _ in range(20)}
    assert len(child) == 20
    assert not child & parent
