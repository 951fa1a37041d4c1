"""pgjobs.metrics.LoopHistogram: written exactly as prometheus_client's Histogram writes
the same observations (the worker observes every job's handler time in one)."""

from __future__ import annotations

from unittest import mock

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from pgjobs.metrics import LoopHistogram

BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)
# On a bound, just above one, past the last, zero, and repeated series.
OBSERVED = [
    (("render", "done"), 0.005),
    (("render", "done"), 0.0050001),
    (("render", "error"), 4000.0),
    (("render", "done"), 0.0),
    (("mail", "abandoned"), 1.0),
    (("render", "done"), 2.5),
]


def _exposition(histogram_class: type) -> str:
    registry = CollectorRegistry()
    name, doc, labels = "pgjobs_handler_duration_seconds", "Time in the handler.", ["a", "b"]
    with mock.patch("time.time", return_value=1_700_000_000.25):  # the _created samples
        if histogram_class is Histogram:
            reference = Histogram(name, doc, labels, buckets=BUCKETS, registry=registry)
            for values, seconds in OBSERVED:
                reference.labels(*values).observe(seconds)
        else:
            ours = LoopHistogram(name, doc, labels, BUCKETS)
            registry.register(ours)
            for values, seconds in OBSERVED:
                ours.observe(values, seconds)
    return generate_latest(registry).decode()


def test_a_loop_histogram_is_written_as_prometheus_clients() -> None:
    ours = _exposition(LoopHistogram)
    assert ours == _exposition(Histogram)
    assert 'pgjobs_handler_duration_seconds_bucket{a="render",b="done",le="0.005"} 2.0' in ours
    assert 'pgjobs_handler_duration_seconds_count{a="render",b="error"} 1.0' in ours
