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

Two measures:

* Everything alive once the process has started lives as long as the process:
  ``gc.freeze()`` takes it out of every later collection.
* Full collections 10x rarer (``FULL_GC_EVERY``). Cycles are nearly always garbage while
  young and are still collected then; only those that survived the younger collections
  wait longer.
"""

from __future__ import annotations

import gc

# Middle-generation collections between two full ones (CPython's default: 10).
FULL_GC_EVERY = 100


def tune_for_long_running_process() -> None:
    """Apply both measures; call once start-up is complete."""
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_GC_EVERY)
