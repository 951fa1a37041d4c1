"""Assets in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, R2...), selected by
``PGJOBS_STORAGE_URL=s3://bucket/prefix``.

The same contract as ``LocalStorage``: writes are streamed, hashed and size-checked
chunk by chunk and leave nothing behind when they fail. An output that fits in one part
is sent with a single PUT; a larger one as a multipart upload whose parts are sent as
they fill, so memory holds at most about one part (8 MiB by default) whatever the
asset's size. Going past ``max_bytes``, or any error or cancellation mid-upload, aborts
the multipart upload, so neither an object nor an orphaned upload (whose parts S3 bills
until aborted) is left. Reads stream the object in chunks.

Client library: aiobotocore, botocore's asyncio port. It is maintained in step with
botocore (the library behind the AWS CLI and boto3), so it speaks every S3 dialect
botocore does (SigV4, path or virtual-host addressing, the standard credential chain:
environment, profiles, instance and container roles), and types-aiobotocore gives it
complete types for mypy --strict. Lighter clients either lack the credential chain or
are sync-only.

A client (one aiohttp connection pool) is opened per operation from one shared botocore
session, which caches the service model and resolved credentials, so opening one costs
a few milliseconds. This keeps the backend free of event-loop affinity and of a close()
that every owner would have to remember; assets are large, so the per-operation cost is
small beside the transfer.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
)

from pgjobs.errors import ConfigurationError, StorageError
from pgjobs.storage import CHUNK_SIZE, Measured, WriteResult

if TYPE_CHECKING:
    from aiobotocore.session import ClientCreatorContext
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

log = logging.getLogger(__name__)

MIB = 1024 * 1024
PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's floor for every part but the last
MAX_PARTS = 10_000  # S3's ceiling on parts per upload

_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)
_MISSING_KEY_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc:
        raise ConfigurationError(
            f"PGJOBS_STORAGE_URL must look like s3://bucket/prefix, got {url!r} "
            "(leave it unset to keep assets in PGJOBS_STORAGE_DIR)"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(f"PGJOBS_STORAGE_URL takes no query or fragment, got {url!r}")
    prefix = parts.path.strip("/")
    return parts.netloc, f"{prefix}/" if prefix else ""


class S3Storage:
    """Assets as objects named ``prefix + key`` in one bucket."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        addressing_style: Literal["auto", "virtual", "path"] | None = None,
        part_size: int = PART_SIZE,
    ) -> None:
        """Credentials left as None come from botocore's usual chain (AWS_ACCESS_KEY_ID /
        AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, instance roles). With an
        endpoint_url (MinIO, moto, Ceph...) addressing defaults to path style, which every
        S3-compatible server understands; AWS itself needs no endpoint."""
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self._session = get_session()
        self._region = region
        self._access_key_id = access_key_id
        self._secret_access_key = secret_access_key
        self._config = AioConfig(
            s3={"addressing_style": addressing_style or ("path" if endpoint_url else "auto")},
            # A few quick retries: the worker retries the whole job on a StorageError and
            # the gateway answers 503, so a long in-request back-off helps no one.
            retries={"mode": "standard", "max_attempts": 3},
        )

    @classmethod
    def from_url(
        cls, url: str, *, endpoint_url: str | None = None, region: str | None = None
    ) -> S3Storage:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, endpoint_url=endpoint_url, region=region)

    def object_key(self, key: str) -> str:
        return self.prefix + key

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (
            f" at {self.endpoint_url}" if self.endpoint_url else ""
        )

    def _client(self) -> ClientCreatorContext[S3Client]:
        return self._session.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self._region,
            aws_access_key_id=self._access_key_id,
            aws_secret_access_key=self._secret_access_key,
            config=self._config,
        )

    def _part_size_for(self, max_bytes: int) -> int:
        # Past 10,000 parts S3 refuses the upload: grow the parts for very large caps.
        return max(self.part_size, -(-max_bytes // MAX_PARTS))

    async def write(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int) -> WriteResult:
        object_key = self.object_key(key)
        part_size = self._part_size_for(max_bytes)
        measured = Measured(max_bytes)
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []
        async with self._client() as client:
            try:
                async for chunk in measured.each(chunks):
                    buffer += chunk
                    if len(buffer) >= part_size:
                        if upload_id is None:
                            with self._errors("start an upload to", object_key):
                                started = await client.create_multipart_upload(
                                    Bucket=self.bucket, Key=object_key
                                )
                            upload_id = started["UploadId"]
                        await self._upload_part(client, object_key, upload_id, parts, buffer)
                        buffer = bytearray()
                if upload_id is None:
                    # Everything fitted in one part: one PUT, no multipart bookkeeping.
                    with self._errors("write", object_key):
                        await client.put_object(
                            Bucket=self.bucket, Key=object_key, Body=bytes(buffer)
                        )
                else:
                    if buffer or not parts:
                        await self._upload_part(client, object_key, upload_id, parts, buffer)
                    with self._errors("complete the upload of", object_key):
                        await client.complete_multipart_upload(
                            Bucket=self.bucket,
                            Key=object_key,
                            UploadId=upload_id,
                            MultipartUpload={"Parts": parts},
                        )
            except BaseException:
                if upload_id is not None:
                    await self._abort(client, object_key, upload_id)
                raise
        return measured.result()

    async def _upload_part(
        self,
        client: S3Client,
        object_key: str,
        upload_id: str,
        parts: list[CompletedPartTypeDef],
        data: bytearray,
    ) -> None:
        number = len(parts) + 1
        with self._errors(f"upload part {number} of", object_key):
            sent = await client.upload_part(
                Bucket=self.bucket,
                Key=object_key,
                UploadId=upload_id,
                PartNumber=number,
                Body=bytes(data),
            )
        parts.append({"ETag": sent["ETag"], "PartNumber": number})

    async def _abort(self, client: S3Client, object_key: str, upload_id: str) -> None:
        try:
            await client.abort_multipart_upload(
                Bucket=self.bucket, Key=object_key, UploadId=upload_id
            )
        except (BotoCoreError, ClientError) as exc:
            # The original error is the one to raise; this one only leaves parts behind.
            log.warning(
                "could not abort the multipart upload %s of %s in %s: %s (a bucket "
                "lifecycle rule AbortIncompleteMultipartUpload removes such leftovers)",
                upload_id,
                object_key,
                self.where(),
                exc,
            )

    async def read(self, key: str) -> AsyncIterator[bytes]:
        object_key = self.object_key(key)
        async with self._client() as client:
            with self._errors("read", object_key):
                response = await client.get_object(Bucket=self.bucket, Key=object_key)
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(CHUNK_SIZE):
                    yield chunk

    async def delete(self, key: str) -> None:
        object_key = self.object_key(key)
        async with self._client() as client:
            # S3 answers a DELETE of a missing key with success, as the protocol wants.
            with self._errors("delete", object_key):
                await client.delete_object(Bucket=self.bucket, Key=object_key)

    async def exists(self, key: str) -> bool:
        object_key = self.object_key(key)
        async with self._client() as client:
            try:
                with self._errors("look up", object_key, missing_ok=True):
                    await client.head_object(Bucket=self.bucket, Key=object_key)
            except _Missing:
                # HEAD answers a bare 404 for a missing bucket too: tell the two apart, so
                # a wrong bucket name is an error that says so, not every asset "missing".
                try:
                    with self._errors("look up", object_key, missing_ok=True):
                        await client.head_bucket(Bucket=self.bucket)
                except _Missing:
                    raise StorageError(
                        self._describe("look up", object_key, "NoSuchBucket", "")
                    ) from None
                return False
            return True

    @contextmanager
    def _errors(self, action: str, object_key: str, *, missing_ok: bool = False) -> Iterator[None]:
        """Turn botocore's errors into a StorageError that says what to fix."""
        try:
            yield
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", ""))
            if missing_ok and code in _MISSING_KEY_CODES:
                raise _Missing from exc
            raise StorageError(self._describe(action, object_key, code, str(exc))) from exc
        except NoCredentialsError as exc:
            raise StorageError(
                f"cannot {action} {object_key} in {self.where()}: no S3 credentials found; set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
            ) from exc
        except EndpointConnectionError as exc:
            raise StorageError(
                f"cannot {action} {object_key}: S3 endpoint unreachable ({exc}); check "
                "PGJOBS_S3_ENDPOINT_URL / AWS_ENDPOINT_URL and that the server is up"
            ) from exc
        except BotoCoreError as exc:
            raise StorageError(f"cannot {action} {object_key} in {self.where()}: {exc}") from exc

    def _describe(self, action: str, object_key: str, code: str, detail: str) -> str:
        head = f"cannot {action} {object_key} in {self.where()}"
        if code == "NoSuchBucket":
            return (
                f"{head}: the bucket {self.bucket!r} does not exist; create it or fix "
                "PGJOBS_STORAGE_URL"
            )
        if code in _CREDENTIAL_CODES:
            return (
                f"{head}: S3 rejected the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY"
            )
        if code in {"AccessDenied", "403"}:
            return (
                f"{head}: access denied ({code}); the credentials are wrong or lack "
                "permission on this bucket"
            )
        return f"{head}: {detail}"


class _Missing(Exception):
    """head_object found no such key (internal to S3Storage.exists)."""
