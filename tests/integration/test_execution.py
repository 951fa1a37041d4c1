"""Retries with backoff, timeouts, and generated assets: streamed, hashed, size-capped."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

from helpers import assert_histories_valid, fast_settings, fetch, running_worker, wait_until
from pgjobs import demo
from pgjobs.assets import GeneratedAsset
from pgjobs.client import Client
from pgjobs.config import WorkerSettings
from pgjobs.context import JobContext
from pgjobs.registry import Registry
from pgjobs.storage import LocalStorage
from pgjobs.types import EventType, JobStatus
from pgjobs.worker import retry_delay


async def _status(client: Client, job_id: object, status: JobStatus) -> bool:
    return (await client.get("acme", job_id)).status is status  # type: ignore[arg-type]


async def test_failures_retry_with_growing_backoff_then_fail(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    job = await client.enqueue("acme", "fail", {"message": "upstream 503"}, max_attempts=3)
    settings = fast_settings(
        storage_dir, retry_base_seconds=0.4, retry_max_seconds=10.0, poll_interval_seconds=0.1
    )
    async with running_worker(dsn, demo.registry, settings):
        await wait_until(
            lambda: _status(client, job.id, JobStatus.FAILED),
            within=30,
            message="job failed for good",
        )
    events = await client.events("acme", job.id)
    assert [(e.type, e.attempt) for e in events] == [
        (EventType.QUEUED, 0),
        (EventType.RUNNING, 1),
        (EventType.RETRYING, 1),
        (EventType.RUNNING, 2),
        (EventType.RETRYING, 2),
        (EventType.RUNNING, 3),
        (EventType.FAILED, 3),
    ]
    failed = await client.get("acme", job.id)
    assert failed.error_message == "RuntimeError: upstream 503"
    assert events[-1].payload["errorMessage"] == "RuntimeError: upstream 503"
    assert str(events[-1].payload["traceback"]).endswith("RuntimeError: upstream 503\n")
    # Backoff: each retry is scheduled base * 2^(attempt-1) * [0.5, 1) after it failed.
    delays = [
        dt.datetime.fromisoformat(e.payload["runAt"]) - e.created_at
        for e in events
        if e.type is EventType.RETRYING
    ]
    assert 0.2 <= delays[0].total_seconds() <= 0.41
    assert 0.4 <= delays[1].total_seconds() <= 0.81
    # ...and no attempt started before its time.
    runs = [e.created_at for e in events if e.type is EventType.RUNNING]
    retries = [
        dt.datetime.fromisoformat(e.payload["runAt"])
        for e in events
        if e.type is EventType.RETRYING
    ]
    assert all(run >= due for run, due in zip(runs[1:], retries, strict=True))
    assert await assert_histories_valid(dsn) == 1


def test_retry_delay_is_exponential_capped_and_jittered() -> None:
    settings = WorkerSettings(retry_base_seconds=1.0, retry_max_seconds=30.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (9, 30.0), (50, 30.0)]:
        samples = [retry_delay(attempt, settings) for _ in range(200)]
        assert all(ceiling / 2 <= s < ceiling for s in samples)
        assert len(set(samples)) > 100, "jittered, so retries of a burst spread out"


async def test_handler_timeout_fails_attempt_with_clear_message(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    registry = Registry()

    @registry.handler("slow", timeout=0.2)
    async def slow(ctx: JobContext) -> None:
        await asyncio.sleep(30)

    job = await client.enqueue("acme", "slow", max_attempts=1)
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, job.id, JobStatus.FAILED), message="timed out")
    assert (
        await client.get("acme", job.id)
    ).error_message == "timed out after 0.2s (the 'slow' timeout)"


async def test_a_shorter_timeout_ends_its_job_while_a_longer_one_runs(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    # The worker keeps one deadline timer, at the earliest running handler's deadline: a
    # job with a shorter timeout than the one the timer waits for must move it earlier.
    registry = Registry()
    release = asyncio.Event()

    @registry.handler("long", timeout=300)
    async def long(ctx: JobContext) -> None:
        await release.wait()

    @registry.handler("short", timeout=0.2)
    async def short(ctx: JobContext) -> None:
        await asyncio.sleep(300)

    first = await client.enqueue("acme", "long", max_attempts=1)
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, first.id, JobStatus.RUNNING), message="long runs")
        second = await client.enqueue("acme", "short", max_attempts=1)
        await wait_until(
            lambda: _status(client, second.id, JobStatus.FAILED), message="short timed out"
        )
        assert (await client.get("acme", first.id)).status is JobStatus.RUNNING
        release.set()
        await wait_until(lambda: _status(client, first.id, JobStatus.DONE), message="long done")
    assert (
        await client.get("acme", second.id)
    ).error_message == "timed out after 0.2s (the 'short' timeout)"


async def test_a_timeout_comes_after_an_earlier_deadline_whose_job_ended(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    # The deadline timer set for the first job fires after that job ended (or timed out):
    # it must be set again for the second job's later deadline.
    registry = Registry()
    release = asyncio.Event()

    @registry.handler("first", timeout=1.0)
    async def first_handler(ctx: JobContext) -> None:
        await release.wait()

    @registry.handler("second", timeout=1.5)
    async def second_handler(ctx: JobContext) -> None:
        await asyncio.sleep(300)

    first = await client.enqueue("acme", "first", max_attempts=1)
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, first.id, JobStatus.RUNNING), message="1st runs")
        second = await client.enqueue("acme", "second", max_attempts=1)
        await wait_until(lambda: _status(client, second.id, JobStatus.RUNNING), message="2nd runs")
        release.set()  # the first ends (unless its deadline came first, which also does)
        await wait_until(
            lambda: _status(client, second.id, JobStatus.FAILED), message="2nd timed out"
        )
    assert (
        await client.get("acme", second.id)
    ).error_message == "timed out after 1.5s (the 'second' timeout)"


async def test_a_timeout_raised_by_the_handler_is_not_reported_as_the_job_deadline(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    # An HTTP client's timeout inside a handler is an ordinary failure, reported as such:
    # telling the operator the job ran past its 300 s budget would send them the wrong way.
    registry = Registry()

    @registry.handler("upstream", timeout=300)
    async def upstream(ctx: JobContext) -> None:
        raise TimeoutError("upstream did not answer within 10s")

    @registry.handler("bare", timeout=300)
    async def bare(ctx: JobContext) -> None:
        raise TimeoutError

    first = await client.enqueue("acme", "upstream", max_attempts=1)
    second = await client.enqueue("acme", "bare", max_attempts=1)
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        for job in (first, second):
            await wait_until(lambda j=job: _status(client, j.id, JobStatus.FAILED))
    assert (await client.get("acme", first.id)).error_message == (
        "TimeoutError: upstream did not answer within 10s"
    )
    assert (await client.get("acme", second.id)).error_message == (
        "TimeoutError raised by the handler"
    )


async def test_render_stores_asset_linked_to_job_and_task(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    job = await client.enqueue(
        "acme", "render", {"title": "Hi", "step_seconds": 0.01}, source_task_id="task-42"
    )
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, job.id, JobStatus.DONE), message="rendered")
    done = await client.get("acme", job.id)
    assert done.result_asset_id is not None
    asset = await client.get_asset("acme", done.result_asset_id)
    assert asset is not None
    assert await client.get_asset("other-company", done.result_asset_id) is None
    assert asset.source_job_id == job.id
    assert asset.source_task_id == "task-42"
    assert asset.namespace == "generated"
    assert asset.content_type == "image/svg+xml"
    assert asset.original_filename == "card.svg"
    data = (storage_dir / asset.object_key).read_bytes()
    assert data.startswith(b"<svg")
    assert asset.byte_size == len(data)
    assert asset.sha256 == hashlib.sha256(data).hexdigest()


async def test_large_streamed_asset_is_hashed_without_holding_it(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    registry = Registry()
    chunk = bytes(range(256)) * 4096  # 1 MiB

    @registry.handler("big")
    async def big(ctx: JobContext) -> GeneratedAsset:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(12):
                yield chunk

        return GeneratedAsset(chunks(), filename="big.bin")

    job = await client.enqueue("acme", "big")
    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(lambda: _status(client, job.id, JobStatus.DONE), message="stored")
    done = await client.get("acme", job.id)
    asset = await client.get_asset("acme", done.result_asset_id)  # type: ignore[arg-type]
    assert asset is not None
    assert asset.byte_size == 12 * len(chunk)
    assert asset.sha256 == hashlib.sha256(chunk * 12).hexdigest()
    read = b"".join([c async for c in LocalStorage(storage_dir).read(asset.object_key)])
    assert hashlib.sha256(read).hexdigest() == asset.sha256


async def test_asset_over_the_limit_fails_job_and_leaves_nothing(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    registry = Registry()

    @registry.handler("huge")
    async def huge(ctx: JobContext) -> GeneratedAsset:
        async def chunks() -> AsyncIterator[bytes]:
            while True:  # endless: the limit must stop it
                yield b"x" * 65536

        return GeneratedAsset(chunks(), filename="huge.bin")

    @registry.handler("file")
    async def from_file(ctx: JobContext) -> GeneratedAsset:
        path = Path(ctx.input["path"])
        return GeneratedAsset(path, filename=path.name, content_type="text/plain")

    src = storage_dir.parent / "out.txt"
    src.write_bytes(b"y" * 300_000)
    too_big = await client.enqueue("acme", "huge", max_attempts=3)
    from_path = await client.enqueue("acme", "file", {"path": str(src)})
    settings = fast_settings(storage_dir, max_asset_bytes=256 * 1024)
    async with running_worker(dsn, registry, settings):
        await wait_until(lambda: _status(client, too_big.id, JobStatus.FAILED), message="failed")
        await wait_until(lambda: _status(client, from_path.id, JobStatus.FAILED), message="failed")
    failed = await client.get("acme", too_big.id)
    assert failed.attempts == 1, "an oversized output is not retried"
    assert failed.error_message is not None
    assert "exceeds the limit of 262144 bytes" in failed.error_message
    assert "PGJOBS_GENERATED_ASSET_MAX_BYTES" in failed.error_message
    assert _files(storage_dir) == [], "no partial file left"
    assert await fetch(dsn, "SELECT id FROM pgjobs.assets") == []


async def test_asset_with_a_line_break_in_its_content_type_fails_the_job(
    dsn: str, client: Client, storage_dir: Path
) -> None:
    """Issue 19: a content type with CR/LF would have been stored and then broken every
    download of the asset (the server refuses the header after the response began). The
    handler's asset is refused instead: the job fails at once, saying why, and nothing
    is stored."""
    registry = Registry()
    types = [
        "text/html; charset=utf-8",  # the one that is fine
        "text/html\r\nSet-Cookie: session=stolen",
        "text/plain\nX-Evil: 1",
        "text/plain\x00",
        "text/plain\x7f",
        "text/plain; name=\u00e9t\u00e9",
        "",
    ]

    @registry.handler("smuggle")
    async def smuggle(ctx: JobContext) -> GeneratedAsset:
        return GeneratedAsset(b"<p>hi</p>", "a.html", content_type=types[ctx.input["n"]])

    fine, *jobs = [
        await client.enqueue("acme", "smuggle", {"n": n}, max_attempts=3) for n in range(len(types))
    ]

    async def all_finished() -> bool:
        return all(
            [await _status(client, j.id, JobStatus.FAILED) for j in jobs]
            + [await _status(client, fine.id, JobStatus.DONE)]
        )

    async with running_worker(dsn, registry, fast_settings(storage_dir)):
        await wait_until(all_finished, message="six failed, one done")
    for job in jobs:
        failed = await client.get("acme", job.id)
        assert failed.attempts == 1, "a content type that cannot be served is not retried"
        assert failed.error_message is not None
        assert "GeneratedAsset content_type must be" in failed.error_message
    (asset,) = await fetch(dsn, "SELECT content_type FROM pgjobs.assets")
    assert asset["content_type"] == "text/html; charset=utf-8"
    assert len(_files(storage_dir)) == 1


def test_asset_limit_comes_from_the_environment(monkeypatch: object) -> None:
    import pytest

    mp: pytest.MonkeyPatch = monkeypatch  # type: ignore[assignment]
    assert WorkerSettings.from_env().max_asset_bytes == 500 * 1024 * 1024
    mp.setenv("PGJOBS_GENERATED_ASSET_MAX_BYTES", "1048576")
    assert WorkerSettings.from_env().max_asset_bytes == 1048576
    mp.setenv("PGJOBS_GENERATED_ASSET_MAX_BYTES", "lots")
    from pgjobs.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="must be a whole number"):
        WorkerSettings.from_env()


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]
