"""What every scenario gets: the server, the run's sizes, where to write, how to log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Sizes:
    drain_jobs: int
    # procrastinate claims one job per round trip (~1k jobs/s here), so it drains a tenth
    # of N: still tens of seconds per run, far above its start-up cost.
    drain_jobs_procrastinate: int
    enqueue_single: int
    enqueue_bulk: int
    wakeup_jobs: int
    notify_jobs: int
    pglimit_jobs: int
    growth_rows: tuple[int, ...]
    growth_jobs: int
    # gateway (scenarios 4-5): SSE clients per step, transitions measured per step and
    # their rate, company-stream clients per step, POST submitters and POSTs each.
    sse_clients: tuple[int, ...] = (1, 100, 1_000, 10_000)
    sse_events: int = 300
    sse_rate: float = 50.0
    company_clients: tuple[int, ...] = (1, 100, 1_000)
    company_events: int = 20
    # company streams spread over many companies: K per step, all clients, events, rate
    spread_companies: tuple[int, ...] = ()
    spread_clients: int = 1_000
    spread_events: int = 300
    spread_rate: float = 100.0
    # job streams opened all at once, reconnecting when told to (a gateway restart)
    storm_clients: tuple[int, ...] = ()
    post_submitters: tuple[int, ...] = (10, 50)
    posts_each: int = 100
    # fairness (scenario 9): a's backlog, b's jobs behind it, the skewed backlogs' unit
    fairness_backlog: int = 100_000
    fairness_jobs: int = 50
    fairness_skew_unit: int = 100


FULL = Sizes(
    drain_jobs=100_000,
    drain_jobs_procrastinate=10_000,
    enqueue_single=2_000,
    enqueue_bulk=100_000,
    wakeup_jobs=300,
    notify_jobs=50_000,
    pglimit_jobs=50_000,
    growth_rows=(0, 1_000_000, 10_000_000),
    growth_jobs=30_000,
    sse_clients=(1, 100, 1_000, 10_000),
    sse_events=250,
    company_clients=(1, 100, 1_000),
    company_events=12,
    spread_companies=(10, 100, 1_000),
    storm_clients=(1_000, 5_000),
    post_submitters=(10, 50),
    posts_each=100,
)
QUICK = Sizes(
    drain_jobs=20_000,
    drain_jobs_procrastinate=2_000,
    enqueue_single=1_000,
    enqueue_bulk=20_000,
    wakeup_jobs=40,
    notify_jobs=10_000,
    pglimit_jobs=10_000,
    growth_rows=(0, 50_000, 200_000),
    growth_jobs=10_000,
    sse_clients=(1, 100, 1_000),
    sse_events=100,
    company_clients=(1, 100),
    company_events=4,
    post_submitters=(10, 50),
    posts_each=20,
    fairness_backlog=30_000,
    fairness_jobs=30,
    fairness_skew_unit=30,
)
TINY = Sizes(
    drain_jobs=200,
    drain_jobs_procrastinate=100,
    enqueue_single=50,
    enqueue_bulk=200,
    wakeup_jobs=5,
    notify_jobs=200,
    pglimit_jobs=200,
    growth_rows=(0, 500, 2_000),
    growth_jobs=200,
    sse_clients=(1, 10),
    sse_events=10,
    company_clients=(3,),
    company_events=3,
    spread_companies=(2,),
    spread_clients=4,
    spread_events=4,
    spread_rate=20.0,
    storm_clients=(5,),
    post_submitters=(2,),
    posts_each=5,
    fairness_backlog=500,
    fairness_jobs=5,
    fairness_skew_unit=2,
)


@dataclass
class Ctx:
    server_dsn: str
    sizes: Sizes
    mode: str
    repeat: int
    out: Path
    systems: tuple[str, ...]
    started: float = field(default_factory=time.monotonic)
    notes: list[str] = field(default_factory=list)

    def log(self, msg: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[bench {elapsed:6.1f}s] {msg}", file=sys.stderr, flush=True)

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    def meta(self) -> dict[str, Any]:
        return {"mode": self.mode, "repeat": self.repeat, "sizes": self.sizes.__dict__}
