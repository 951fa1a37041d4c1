"""Generated assets: what a handler returns to produce a file, and how it gets stored."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pgjobs.errors import InvalidAssetError
from pgjobs.storage import CHUNK_SIZE, Storage

NAMESPACE = "generated"


@dataclass(frozen=True, slots=True)
class GeneratedAsset:
    """Return this from a handler to store a file and link it to the job.

    ``data`` is bytes, a path to a file the handler wrote, or an async iterator of byte
    chunks (for outputs too large to hold in memory). ``result`` is an optional small JSON
    result stored alongside.
    """

    data: bytes | bytearray | memoryview | os.PathLike[str] | str | AsyncIterable[bytes]
    filename: str
    content_type: str = "application/octet-stream"
    result: Any = None

    def __post_init__(self) -> None:
        check_content_type(self.content_type)


def check_content_type(content_type: object) -> None:
    """Raise InvalidAssetError unless ``content_type`` is printable ASCII. It becomes the
    download's Content-Type header: a CR or LF (or any other control character) there
    would let a handler's output write headers of its choosing, and the server refuses
    such a header only once the response has begun, so the download would end with no
    bytes sent; a non-ASCII character cannot be sent as a header at all."""
    if not isinstance(content_type, str) or not content_type.strip():
        raise InvalidAssetError(
            f"GeneratedAsset content_type must be a non-empty string, got {content_type!r}"
        )
    if not all(" " <= ch <= "~" for ch in content_type):
        raise InvalidAssetError(
            "GeneratedAsset content_type must be printable ASCII, without CR, LF or other "
            f"control characters: {content_type[:200]!r}"
        )


@dataclass(frozen=True, slots=True)
class StoredAsset:
    id: uuid.UUID
    key: str
    content_type: str
    filename: str
    byte_size: int
    sha256: str


def new_key(asset_id: uuid.UUID) -> str:
    # Keys never contain caller-supplied text (company ids, filenames), so no tenant
    # string can steer where a file lands.
    return f"{NAMESPACE}/{asset_id.hex[:2]}/{asset_id}"


async def _chunks(data: GeneratedAsset) -> AsyncIterator[bytes]:
    source = data.data
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for start in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[start : start + CHUNK_SIZE])
    elif isinstance(source, str | os.PathLike):
        handle = await asyncio.to_thread(Path(source).open, "rb")
        try:
            while chunk := await asyncio.to_thread(handle.read, CHUNK_SIZE):
                yield chunk
        finally:
            handle.close()
    else:
        async for chunk in source:
            if not isinstance(chunk, bytes | bytearray | memoryview):
                raise TypeError(f"asset iterator yielded {type(chunk).__name__}, expected bytes")
            yield bytes(chunk)


async def store(storage: Storage, asset: GeneratedAsset, *, max_bytes: int) -> StoredAsset:
    """Stream the asset into storage; raises AssetTooLargeError past max_bytes, leaving
    nothing stored."""
    asset_id = uuid.uuid4()
    key = new_key(asset_id)
    written = await storage.write(key, _chunks(asset), max_bytes=max_bytes)
    return StoredAsset(
        id=asset_id,
        key=key,
        content_type=asset.content_type,
        filename=asset.filename,
        byte_size=written.byte_size,
        sha256=written.sha256,
    )
