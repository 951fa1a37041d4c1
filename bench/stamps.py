"""Handler start times, recorded in the worker process and handed to the parent at exit.

time.monotonic() is CLOCK_MONOTONIC on Linux, one clock for every process on the machine,
so a stamp taken in a worker can be subtracted from one taken in the parent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

_STAMPS: list[tuple[str, float]] = []
RECORD = bool(os.environ.get("BENCH_STAMPS"))


def stamp(key: object) -> None:
    """Record that the handler for job ``key`` started now (only when asked to)."""
    if RECORD and key is not None:
        _STAMPS.append((str(key), time.monotonic()))


def dump() -> None:
    path = os.environ.get("BENCH_STAMPS")
    if path:
        Path(path).write_text(json.dumps(_STAMPS))


def load(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text()))
