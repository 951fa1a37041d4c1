"""A worker's waits end on a cancel even when what they wait for arrives in the same
loop turn: asyncio.wait_for on Python 3.11 returns normally then, and the cancel (a
shutdown) is lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from pgjobs.config import WorkerSettings
from pgjobs.registry import Registry
from pgjobs.worker import Worker


async def test_a_cancel_as_the_stop_arrives_ends_the_sleep(tmp_path: Path) -> None:
    worker = Worker("dbname=unused", Registry(), WorkerSettings(storage_dir=tmp_path))
    task = asyncio.create_task(worker._sleep_unless_stopping(60))
    await asyncio.sleep(0)  # the task waits for the stop
    worker._stopping.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
