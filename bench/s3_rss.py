"""Peak memory of streaming one large generated asset into S3 storage.

Starts moto's S3 server (a subprocess on a free loopback port), then writes a stream of
--mib MiB (default 500, the default asset cap) through ``S3Storage.write`` in 1 MiB
chunks, as a handler's async iterator would hand it over, and prints this process's
peak RSS before and after. The server's memory is its own process's and not counted.

    .venv/bin/python -m bench.s3_rss [--mib 500]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

from aiobotocore.session import get_session

from pgjobs.s3storage import MIB, S3Storage


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    proc = subprocess.Popen(  # noqa: S603 - this interpreter running moto, fixed arguments
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.05)


async def _run(endpoint: str, mib: int) -> None:
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
    async with get_session().create_client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", **creds
    ) as s3:
        await s3.create_bucket(Bucket="pgjobs-bench")
    storage = S3Storage(
        "pgjobs-bench",
        endpoint_url=endpoint,
        region="us-east-1",
        access_key_id="bench",
        secret_access_key="bench",  # noqa: S106  # moto accepts any pair
    )
    chunk = bytes(range(256)) * 4096  # 1 MiB, reused: the source holds no more than that

    async def stream(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield chunk

    await storage.write("warm-up", stream(1), max_bytes=MIB)  # imports, client, pools
    before = _peak_rss_mib()
    started = time.perf_counter()
    written = await storage.write("big", stream(mib), max_bytes=mib * MIB)
    elapsed = time.perf_counter() - started
    after = _peak_rss_mib()
    assert written.byte_size == mib * MIB
    print(
        f"wrote {mib} MiB in {elapsed:.1f} s ({written.byte_size / MIB / elapsed:.0f} MiB/s, "
        f"part size {storage.part_size // MIB} MiB); peak RSS {before:.0f} MiB before, "
        f"{after:.0f} MiB after (+{after - before:.0f} MiB)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=500)
    args = parser.parse_args()
    proc, endpoint = _start_moto()
    try:
        asyncio.run(_run(endpoint, args.mib))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
