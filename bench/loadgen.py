"""The load generator: ``wrk`` (a C tool, so the client costs the 2-core machine little) driving
real request bodies through ``bench/wrk_post.lua``.

Closed loop: ``connections`` callers, each sending its next request when the last is answered.
With ``rate`` set, every connection waits an exponential think time first, which with enough
connections approximates an open loop at ``rate`` requests per second (``offered_per_s`` in
the result says what was actually sent).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).with_name("wrk_post.lua")


class LoadgenError(RuntimeError):
    pass


@dataclass
class LoadResult:
    """What one wrk run measured. Latencies in milliseconds."""

    connections: int
    seconds: float
    texts_per_request: int
    requests: int
    statuses: dict[str, int]
    socket_errors: dict[str, int]
    latency_ms: dict[float, float] = field(default_factory=dict)  # percentile -> ms

    @property
    def answered_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def ok_per_s(self) -> float:
        """Requests answered 200 per second."""
        return self.statuses.get("2xx", 0) / self.seconds

    @property
    def texts_per_s(self) -> float:
        return self.ok_per_s * self.texts_per_request

    def p(self, percentile: float) -> float:
        return self.latency_ms[percentile]

    def summary(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "seconds": round(self.seconds, 2),
            "texts_per_request": self.texts_per_request,
            "requests": self.requests,
            "requests_per_s": round(self.ok_per_s, 1),
            "texts_per_s": round(self.texts_per_s, 1),
            "p50_ms": round(self.p(50), 2),
            "p95_ms": round(self.p(95), 2),
            "p99_ms": round(self.p(99), 2),
            "statuses": self.statuses,
            "socket_errors": self.socket_errors,
            "latency_percentiles_ms": {str(k): round(v, 3) for k, v in self.latency_ms.items()},
        }


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    bodies: Path,
    connections: int,
    seconds: float,
    texts_per_request: int = 1,
    rate: float | None = None,
    threads: int = 2,
) -> LoadResult:
    """Drive ``url`` with the bodies in ``bodies`` (one JSON per line) for ``seconds``."""
    if not wrk_available():
        raise LoadgenError("wrk is not installed (Debian/Ubuntu: apt-get install wrk)")
    threads = max(1, min(threads, connections))
    mean_delay_ms = 1000.0 * connections / rate if rate else 0.0
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "120s",
        "-s",
        str(SCRIPT),
        url,
        "--",
        str(bodies),
        f"{mean_delay_ms:.3f}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 180)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise LoadgenError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    statuses = {
        name.removeprefix("s"): int(raw[name])
        for name in ("s2xx", "s429", "s503", "s504", "s4xx", "s5xx", "sother")
        if raw[name]
    }
    socket_errors = {
        kind: int(raw[f"errors_{kind}"])
        for kind in ("connect", "read", "write", "timeout")
        if raw[f"errors_{kind}"]
    }
    return LoadResult(
        connections=connections,
        seconds=raw["duration_us"] / 1e6,
        texts_per_request=texts_per_request,
        requests=int(raw["requests"]),
        statuses=statuses,
        socket_errors=socket_errors,
        latency_ms={float(p): us / 1000 for p, us in raw["latency_percentiles_us"]},
    )
