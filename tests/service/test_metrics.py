"""The metrics registry on its own."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics


def _samples(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    family = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["kind"]: s.value for s in family["sentiment_cuda_memory_bytes"].samples}


def test_cuda_memory_is_read_at_every_scrape():
    # A service on CUDA hands its runtime's reader over once; each scrape must call it again,
    # or the gauges would show the memory of the first scrape forever.
    metrics = Metrics()
    assert _samples(metrics) == {}  # nothing watched: no samples (a CPU service)
    readings = iter(
        [
            {"allocated": 10, "reserved": 20, "peak": 15},
            {"allocated": 30, "reserved": 40, "peak": 35},
        ]
    )
    current: dict[str, int] = {}

    def read() -> dict[str, int]:
        return current

    metrics.watch_cuda_memory(read)
    current.update(next(readings))
    assert _samples(metrics) == {"allocated": 10, "reserved": 20, "peak": 15}
    current.update(next(readings))
    assert _samples(metrics) == {"allocated": 30, "reserved": 40, "peak": 35}
