"""A real S3-compatible server for the tests: moto's standalone server, run as a
subprocess on a free loopback port (an HTTP server speaking the S3 protocol, not a mock
inside the client), and helpers to inspect a bucket behind pgjobs' back."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiobotocore.session import get_session

from pgjobs.s3storage import S3Storage

ACCESS_KEY = "pgjobs-test-key"
SECRET_KEY = "pgjobs-test-secret"  # noqa: S105  # moto's server accepts any pair
REGION = "us-east-1"
# One botocore session for the tests' own clients: a new one loads S3's service model
# again for its first client (~0.2 s on a loaded machine; a reused one, ~0.03 s).
SESSION = get_session()


@dataclass(frozen=True)
class MotoServer:
    endpoint_url: str

    def storage(self, bucket: str, prefix: str = "", **kwargs: Any) -> S3Storage:
        return S3Storage(
            bucket,
            prefix,
            endpoint_url=self.endpoint_url,
            region=REGION,
            access_key_id=ACCESS_KEY,
            secret_access_key=SECRET_KEY,
            **kwargs,
        )

    def client(self) -> Any:
        """A raw aiobotocore S3 client (an async context manager) for checks and setup."""
        return SESSION.create_client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    async def create_bucket(self, bucket: str) -> None:
        async with self.client() as s3:
            await s3.create_bucket(Bucket=bucket)

    async def keys(self, bucket: str) -> list[str]:
        async with self.client() as s3:
            listed = await s3.list_objects_v2(Bucket=bucket)
        return [o["Key"] for o in listed.get("Contents", [])]

    async def pending_uploads(self, bucket: str) -> list[str]:
        """Multipart uploads started and neither completed nor aborted."""
        async with self.client() as s3:
            listed = await s3.list_multipart_uploads(Bucket=bucket)
        return [u["Key"] for u in listed.get("Uploads", [])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def moto_server(*, require_auth: bool = False) -> Iterator[MotoServer]:
    """moto's S3 server on 127.0.0.1. require_auth: it checks credentials (it knows
    none, so every request is refused as a wrong key would be)."""
    env = {**os.environ}
    if require_auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError("moto server did not start within 60s") from None
                time.sleep(0.05)  # polling the port with a deadline, not waiting blind
        yield MotoServer(f"http://127.0.0.1:{port}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
