"""The pgjobs benchmark harness (issue 4): ``python -m bench`` or ``make bench``.

One embedded PostgreSQL for the whole run, one fresh database per measurement, every
queue measured the same way on the same server, results under ``bench/results/<stamp>/``
(a JSON file per scenario, ``summary.md``, PNG plots). See docs/benchmarks.md.
"""
