"""S3Storage against a real S3-compatible server (moto's, on loopback): the Storage
contract LocalStorage keeps, multipart streaming, the size cap aborting the upload, and
errors that say what to fix."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from helpers import fast_settings, fetch, running_worker, wait_until
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.errors import AssetTooLargeError, ConfigurationError, StorageError
from pgjobs.s3storage import MIB, S3Storage, parse_s3_url
from pgjobs.types import JobStatus
from s3_helpers import MotoServer, free_port, moto_server

KEY = "generated/ab/abcdef"


async def _chunks(data: bytes, size: int = MIB) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def _read(storage: S3Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


async def test_write_read_exists_delete_small_object(s3_server: MotoServer, s3_bucket: str) -> None:
    storage = s3_server.storage(s3_bucket, "assets/")
    data = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    assert not await storage.exists(KEY)

    written = await storage.write(KEY, _chunks(data), max_bytes=len(data))

    assert (written.byte_size, written.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert await s3_server.keys(s3_bucket) == ["assets/" + KEY], "object key is prefix + key"
    assert await storage.exists(KEY)
    assert await _read(storage, KEY) == data
    await storage.delete(KEY)
    assert not await storage.exists(KEY)
    assert await s3_server.keys(s3_bucket) == []
    await storage.delete(KEY)  # a missing key is not an error


async def test_empty_object(s3_server: MotoServer, s3_bucket: str) -> None:
    storage = s3_server.storage(s3_bucket)
    written = await storage.write(KEY, _chunks(b""), max_bytes=10)
    assert (written.byte_size, written.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert await storage.exists(KEY)
    assert await _read(storage, KEY) == b""


async def test_large_output_goes_up_in_parts_and_reads_back_in_chunks(
    s3_server: MotoServer, s3_bucket: str
) -> None:
    storage = s3_server.storage(s3_bucket, part_size=5 * MIB)
    data = bytes(range(256)) * (48 * 1024)  # 12 MiB: two full parts and a short last one

    written = await storage.write(KEY, _chunks(data, 300_000), max_bytes=len(data))

    assert (written.byte_size, written.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    async with s3_server.client() as s3:
        head = await s3.head_object(Bucket=s3_bucket, Key=KEY)
    # A multipart object's ETag ends in "-<number of parts>"; a single PUT's has none.
    assert head["ETag"].strip('"').endswith("-3")
    chunks = [chunk async for chunk in storage.read(KEY)]
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= MIB, "read streams in chunks"
    assert await s3_server.pending_uploads(s3_bucket) == []


@pytest.mark.parametrize("size", [3 * MIB, 11 * MIB], ids=["before-first-part", "mid-upload"])
async def test_over_the_limit_aborts_and_leaves_nothing(
    s3_server: MotoServer, s3_bucket: str, size: int
) -> None:
    storage = s3_server.storage(s3_bucket, part_size=5 * MIB)
    with pytest.raises(AssetTooLargeError):
        await storage.write(KEY, _chunks(b"x" * size), max_bytes=size - 1)
    assert await s3_server.keys(s3_bucket) == []
    assert await s3_server.pending_uploads(s3_bucket) == [], "the multipart upload is aborted"
    assert not await storage.exists(KEY)


async def test_failing_source_aborts_the_upload(s3_server: MotoServer, s3_bucket: str) -> None:
    storage = s3_server.storage(s3_bucket, part_size=5 * MIB)

    async def broken() -> AsyncIterator[bytes]:
        for _ in range(7):
            yield b"y" * MIB
        raise RuntimeError("renderer crashed")

    with pytest.raises(RuntimeError, match="renderer crashed"):
        await storage.write(KEY, broken(), max_bytes=100 * MIB)
    assert await s3_server.keys(s3_bucket) == []
    assert await s3_server.pending_uploads(s3_bucket) == []


async def test_missing_bucket_is_named_in_the_error(s3_server: MotoServer) -> None:
    storage = s3_server.storage("pgjobs-no-such-bucket")
    with pytest.raises(StorageError, match="bucket 'pgjobs-no-such-bucket' does not exist"):
        await storage.write(KEY, _chunks(b"data"), max_bytes=100)
    with pytest.raises(StorageError, match="does not exist"):
        await _read(storage, KEY)
    with pytest.raises(StorageError, match="does not exist"):
        await storage.exists(KEY)


async def test_wrong_credentials_are_named_in_the_error() -> None:
    with moto_server(require_auth=True) as strict:
        storage = strict.storage("pgjobs-any")
        with pytest.raises(StorageError, match=r"rejected the credentials.*AWS_ACCESS_KEY_ID"):
            await storage.write(KEY, _chunks(b"data"), max_bytes=100)
        with pytest.raises(StorageError, match="access denied"):
            await storage.exists(KEY)


async def test_unreachable_endpoint_is_named_in_the_error() -> None:
    # Nothing listens on the port (bound, then released), as when the server has stopped.
    storage = MotoServer(f"http://127.0.0.1:{free_port()}").storage("pgjobs-any")
    with pytest.raises(StorageError, match="endpoint unreachable"):
        await storage.exists(KEY)


def test_storage_url_gives_bucket_and_prefix() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket/") == ("bucket", "")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_url("s3://bucket/a") == ("bucket", "a/")
    for bad in ("/var/assets", "s3://", "http://bucket/x", "s3://bucket/x?y=1"):
        with pytest.raises(ConfigurationError, match="PGJOBS_STORAGE_URL"):
            parse_s3_url(bad)


async def test_worker_reports_a_missing_bucket_in_the_jobs_error(
    dsn: str, client: Client, storage_dir: Path, s3_server: MotoServer
) -> None:
    job = await client.enqueue("acme", "render", {"step_seconds": 0.01}, max_attempts=1)
    storage = s3_server.storage("pgjobs-no-such-bucket")
    async with running_worker(dsn, demo.registry, fast_settings(storage_dir), storage=storage):

        async def failed() -> bool:
            return (await client.get("acme", job.id)).status is JobStatus.FAILED

        await wait_until(failed, within=60, message="job failed")
    error = (await client.get("acme", job.id)).error_message
    assert error is not None
    assert "StorageError" in error
    assert "the bucket 'pgjobs-no-such-bucket' does not exist" in error
    assert await fetch(dsn, "SELECT id FROM pgjobs.assets") == []


def test_parts_grow_so_the_cap_fits_in_s3s_10000_parts(s3_server: MotoServer) -> None:
    storage = s3_server.storage("pgjobs-any")
    assert storage._part_size_for(500 * MIB) == 8 * MIB
    big_cap = 200 * 1024 * MIB  # 200 GiB: 8 MiB parts would need 25,600
    assert storage._part_size_for(big_cap) * 10_000 >= big_cap
