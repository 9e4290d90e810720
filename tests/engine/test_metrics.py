"""The engine's own collectors read as prometheus_client's would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from aqueduct.metrics import LatencyHistogram


def test_latency_histogram_exposes_what_a_prometheus_histogram_does() -> None:
    buckets = (0.001, 0.01, 0.1, 1.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    latency = LatencyHistogram("task_seconds", "Task time.", buckets, ours)
    reference = Histogram("task_seconds", "Task time.", buckets=buckets, registry=theirs)
    # bucket bounds themselves, values between and beyond them, and more than one fold's worth
    values = [0.0, 0.001, 0.0011, 0.01, 0.5, 1.0, 7.0] + [i / 1000 for i in range(2 * LatencyHistogram.FOLD_EVERY)]
    for value in values:
        latency.observe(value)
        reference.observe(value)
    expected = [line for line in generate_latest(theirs).decode().splitlines() if "_created" not in line]
    assert generate_latest(ours).decode().splitlines() == expected
    latency.observe(0.05)  # counted at the next scrape
    assert f"task_seconds_count {len(values) + 1}.0" in generate_latest(ours).decode().splitlines()
