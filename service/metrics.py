"""Prometheus metrics, all named ``sentiment_*``, in a registry per app (so several apps, e.g.
in tests, never share counters).

One process per container by default: the dynamic batcher gathers concurrent requests inside
one process, and several processes split the traffic they could batch together. On a GPU one
process's event loop cannot feed the device, so ``SENTIMENT_PROCESSES`` runs several; then
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, set by ``python -m service``
before it starts them) keeps every value in a file per process, and a scrape of any process
sums them: counters and histograms add up, queue depths and CUDA memory are summed over the
live processes, the model's info is one series. Each process's own ``process_*`` metrics
(resident memory, open files, CPU time) are reported too: one series per process, with its
``pid`` as a label when several serve. No ``*_created`` series: they double the series count
for a value nobody graphs.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

PREFIX = "sentiment"
CUDA_MEMORY_KINDS = ("allocated", "reserved", "peak")
_POWERS_OF_TWO = tuple(float(2**i) for i in range(13))  # 1 .. 4096
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 21))  # 16 .. 1M
_SECONDS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


def multiprocess_dir() -> str | None:
    """Where the processes' metric files are, when several processes serve (else None)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        disable_created_metrics()  # process-wide in prometheus_client
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._read_cuda: Callable[[], dict[str, int] | None] | None = None
        self._stages()
        self._batches()
        self._counts()

    def _seconds(self, name: str, description: str, labels: tuple[str, ...] = ()) -> Histogram:
        return Histogram(
            f"{PREFIX}_{name}", description, labels, buckets=_SECONDS, registry=self.registry
        )

    def _stages(self) -> None:
        """A histogram per stage of a request: HTTP, tokenising, queue, model; explanations'."""
        seconds = self._seconds
        self.requests = Counter(
            f"{PREFIX}_requests",
            "HTTP requests answered",
            ["route", "status"],
            registry=self.registry,
        )
        self.request_duration = seconds(
            "request_duration_seconds", "HTTP request duration", ("route",)
        )
        self.tokenization_duration = seconds(
            "tokenization_duration_seconds", "Tokenisation time per request"
        )
        self.queue_duration = seconds(
            "queue_duration_seconds", "Time a text waits before its batch runs"
        )
        self.inference_duration = seconds("inference_duration_seconds", "Model time per batch")
        self.explain_queue_duration = seconds(
            "explain_queue_duration_seconds",
            "Time an explanation waits before its first chunk runs",
        )
        self.explain_inference_duration = seconds(
            "explain_inference_duration_seconds",
            "Model time per explanation (its chunks, forward and backward, summed)",
        )

    def _batches(self) -> None:
        """Batches' shapes, and what waits for one."""
        r = self.registry
        self.batch_size = Histogram(
            f"{PREFIX}_batch_size", "Texts per model batch", buckets=_POWERS_OF_TWO, registry=r
        )
        self.batch_tokens = Histogram(
            f"{PREFIX}_batch_tokens",
            "Padded tokens per model batch (texts x longest)",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth",
            "Texts waiting for a batch",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.explain_queue_depth = Gauge(
            f"{PREFIX}_explain_queue_depth",
            "Explanations queued or running",
            registry=r,
            multiprocess_mode="livesum",
        )

    def _counts(self) -> None:
        """Texts, failures by reason, reloads, the served model and its CUDA memory."""
        r = self.registry
        self.inputs = Counter(f"{PREFIX}_inputs", "Texts accepted for inference", registry=r)
        self.inputs_truncated = Counter(
            f"{PREFIX}_inputs_truncated", "Texts cut to the model's max_length", registry=r
        )
        self.failures = Counter(
            f"{PREFIX}_failures",
            "Requests not answered with scores or explanations, by route and reason",
            ["route", "reason"],
            registry=r,
        )
        self.reloads = Counter(
            f"{PREFIX}_model_reloads",
            "Model reloads (SIGHUP or POST /admin/reload), by result: succeeded, failed",
            ["result"],
            registry=r,
        )
        self.model_info = Gauge(
            f"{PREFIX}_model_info",
            "The served model (value is always 1)",
            ["name", "version", "device", "dtype", "runtime"],
            registry=r,
            multiprocess_mode="livemax",
        )
        # Read at each scrape; only a service on CUDA has samples here.
        self.cuda_memory = Gauge(
            f"{PREFIX}_cuda_memory_bytes",
            "CUDA memory of the model's device: allocated and reserved by torch now, and the "
            "peak allocated since start",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )

    def watch_cuda_memory(self, read: Callable[[], dict[str, int] | None]) -> None:
        """Report ``read()``'s allocated, reserved and peak bytes at every scrape. With several
        processes a scrape reads the files, not this process: ``sample_cuda_memory`` then
        writes them, called at every scrape and every few seconds (a process that no scrape
        reaches still reports)."""
        if multiprocess_dir():
            self._read_cuda = read
            return

        def reader(kind: str) -> Callable[[], float]:
            return lambda: float((read() or {}).get(kind, 0))

        for kind in CUDA_MEMORY_KINDS:
            self.cuda_memory.labels(kind).set_function(reader(kind))

    def sample_cuda_memory(self) -> None:
        if self._read_cuda is None:
            return
        memory = self._read_cuda() or {}
        for kind in CUDA_MEMORY_KINDS:
            self.cuda_memory.labels(kind).set(float(memory.get(kind, 0)))

    def exposition_registry(self) -> CollectorRegistry:
        """What a scrape reads: this app's registry, or every process's files."""
        if not multiprocess_dir():
            return self.registry
        self.sample_cuda_memory()
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(_LiveProcesses(multiprocess_dir() or ""))
        return registry

    def process_exited(self) -> None:
        """Drop this process's live gauges from the sums (it has stopped serving)."""
        if multiprocess_dir():
            multiprocess.mark_process_dead(os.getpid())


class _LiveProcesses:
    """``process_*`` of every serving process, labelled by ``pid``: the live ones are those
    whose live-gauge files are in the metrics folder (``process_exited`` removes them)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def collect(self) -> Iterator[Metric]:
        pids = sorted(
            {
                int(match.group(1))
                for path in self.folder.glob("gauge_live*_*.db")
                if (match := re.fullmatch(r"gauge_live\w+_(\d+)\.db", path.name))
            }
        )
        families: dict[str, Metric] = {}
        for pid in pids:
            reader = ProcessCollector(pid=functools.partial(int, pid), registry=None)
            for family in reader.collect():
                merged = families.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    labels = {**sample.labels, "pid": str(pid)}
                    merged.add_sample(sample.name, labels, sample.value)
        yield from families.values()
