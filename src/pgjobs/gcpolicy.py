"""Garbage-collector settings for a process that pgjobs owns (``pgjobs worker``,
``pgjobs gateway``): never applied by the library on its own, since they are
process-wide.

CPython's cyclic collector runs a full collection every 10 middle ones, and a full one
scans every tracked object in the process. Both long-running pgjobs processes make
many short-lived objects per job or per event and keep a large, permanent set from
start-up (modules, the pool, the app):

* the gateway: a full collection stopped the event loop for 38-47 ms at 1,000 company
  streams, and one landing in a fan-out made that event late for everyone (bench,
  issue 4: company stream p99 41-82 ms instead of ~35);
* the worker: collections were ~14% of a draining worker's CPU (perf; ~8% more
  throughput with these settings).

Two measures, and a third for the worker:

* Everything alive once the process has started lives as long as the process:
  ``gc.freeze()`` takes it out of every later collection.
* Full collections 10x rarer (``FULL_GC_EVERY``). Cycles are nearly always garbage while
  young and are still collected then; only those that survived the younger collections
  wait longer.
* The worker: a young collection after ``WORKER_YOUNG_GC_AFTER`` container objects more
  allocated than freed, not CPython's 700. A claim of 200 jobs allocates ~2,000 objects
  that live until the jobs end (rows, jobs, contexts, tasks), so at 700 each claim set
  off a few young collections that walked the jobs still running, and promoted them to
  the middle generation, walked again there: ~12% of a draining worker's CPU (perf,
  2-process no-op drain, issue 16). CPython counts objects allocated minus freed, so
  with jobs ending as fast as they are claimed the count seldom reaches the larger
  threshold; what is collected is collected as before, later. The price: each young
  collection is a longer pause (~6 ms in a 2-process drain, ~12 per 50,000 jobs,
  against ~0.15 ms ~700 times and ~2 ms for each of ~60 middle ones before).
"""

from __future__ import annotations

import gc

# Middle-generation collections between two full ones (CPython's default: 10).
FULL_GC_EVERY = 100
# Container objects allocated (net of those freed) between two young collections in a
# worker (CPython's default: 700).
WORKER_YOUNG_GC_AFTER = 10_000


def tune_for_long_running_process(*, young: int | None = None) -> None:
    """Apply both measures; call once start-up is complete. ``young``: the young
    generation's threshold instead of the current one (the worker's:
    ``WORKER_YOUNG_GC_AFTER``)."""
    gc.freeze()
    current, middle, _ = gc.get_threshold()
    gc.set_threshold(current if young is None else young, middle, FULL_GC_EVERY)
