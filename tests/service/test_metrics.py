"""The metrics registry on its own."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import Metrics
from tests.service.conftest import serve
from tests.service.test_app import metric_at


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


def test_a_scrape_has_the_process_metrics_and_no_created_series():
    """If this fails, memory and open files cannot be watched from Prometheus (the soak
    watches RSS), or every counter and histogram carries a *_created twin again."""
    text = generate_latest(Metrics().registry).decode()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {"process_resident_memory_bytes", "process_open_fds"} <= names
    assert not [line for line in text.splitlines() if "_created" in line]


def test_refusals_before_any_route_are_counted_by_reason(trained_bundle: Path):
    """If this fails, the "failures by reason" panel misses requests refused before routing:
    a missing API key (401), a head over 64 KiB (431), a request not sent whole in time (408)."""
    with serve(trained_bundle, api_keys="k-one", read_timeout_s=0.5) as running:
        assert httpx.post(f"{running.url}/predict", json={"inputs": "x"}).status_code == 401
        port = running.settings.port
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
            time.sleep(0.1)  # the head's bytes are counted from the read after it began
            sock.sendall(b"a" * 70_000)
            assert sock.recv(100).startswith(b"HTTP/1.1 431")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            head = b"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-one\r\n"
            sock.sendall(head + b"Content-Length: 100\r\n\r\n{")
            assert sock.recv(100).startswith(b"HTTP/1.1 408")
        failures = "sentiment_failures_total"
        assert metric_at(running.url, failures, route="/predict", reason="unauthorized") == 1
        assert metric_at(running.url, failures, route="connection", reason="headers_too_large") == 1
        assert metric_at(running.url, failures, route="connection", reason="read_timeout") == 1
