"""Overload and soak checks against a real server on 127.0.0.1 (bounded in time and count).

    python -m bench.reliability overload --seconds 60        # 3x saturation
    python -m bench.reliability soak --seconds 600           # 80% of saturation

The script starts ``python -m service`` itself (so it can read the server's resident memory),
measures saturation with a closed loop of clients, then offers open-loop load at a multiple of
it with real IMDb test reviews. It prints and optionally writes (``--json``) the figures:

- overload: only 200/429/504 allowed, never 5xx; afterwards p50 latency of single requests
  must return to within 1.5x of the idle p50 within 5 s;
- soak: no error at all, and resident memory growth under 10% from start to end.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from training.config import default_data_source
from training.data import load_imdb

MAX_OUTSTANDING = 4000  # open-loop requests in flight at most; beyond it the client sheds load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_server(bundle: Path, port: int, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "SENTIMENT_MODEL_DIR": str(bundle.parent),
        "SENTIMENT_MODEL_NAME": bundle.name,
        "SENTIMENT_PORT": str(port),
        "SENTIMENT_LOG_LEVEL": "warning",
        "SENTIMENT_AUTO_TRUNCATE": "true",
        **extra_env,
    }
    process = subprocess.Popen([sys.executable, "-m", "service"], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server did not become ready")


async def closed_loop(
    client: httpx.AsyncClient, texts: list[str], clients: int, seconds: float
) -> float:
    """Requests per second with ``clients`` callers each sending back to back."""
    done = 0
    stop = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal done
        k = i
        while time.monotonic() < stop:
            response = await client.post("/predict", json={"inputs": texts[k % len(texts)]})
            response.raise_for_status()
            done += 1
            k += clients

    started = time.monotonic()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    return done / (time.monotonic() - started)


async def open_loop(
    client: httpx.AsyncClient, texts: list[str], rate: float, seconds: float
) -> dict[str, Any]:
    """Send at ``rate`` per second regardless of answers; count statuses and latencies."""
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    outstanding: set[asyncio.Task[None]] = set()

    async def one(text: str) -> None:
        started = time.monotonic()
        try:
            response = await client.post("/predict", json={"inputs": text})
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                latencies.append(time.monotonic() - started)
        except httpx.HTTPError as exc:
            statuses[type(exc).__name__] += 1

    started = time.monotonic()
    sent = shed = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(elapsed * rate) - sent - shed
        for _ in range(due):
            if len(outstanding) >= MAX_OUTSTANDING:
                shed += 1
                continue
            task = asyncio.create_task(one(texts[(sent + shed) % len(texts)]))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
            sent += 1
        await asyncio.sleep(0.002)
    await asyncio.gather(*outstanding)
    return {
        "offered_per_s": round(rate, 1),
        "sent": sent,
        "shed_by_client": shed,
        "answered": sum(statuses.values()),
        "statuses": dict(statuses),
        "p50_ms": _pct(latencies, 50),
        "p99_ms": _pct(latencies, 99),
    }


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 1) if values else None


async def single_latency_ms(client: httpx.AsyncClient, text: str, n: int) -> float:
    samples = []
    for _ in range(n):
        started = time.monotonic()
        (await client.post("/predict", json={"inputs": text})).raise_for_status()
        samples.append(time.monotonic() - started)
    return statistics.median(samples) * 1e3


async def run(args: argparse.Namespace) -> dict[str, Any]:
    test = load_imdb(args.data, Path(".cache"))["test"]
    rng = np.random.default_rng(0)
    texts = [test.texts[i] for i in rng.choice(len(test), size=2000, replace=False)]
    port = _free_port()
    server = start_server(args.bundle, port, {})
    limits = httpx.Limits(max_connections=MAX_OUTSTANDING, max_keepalive_connections=512)
    result: dict[str, Any] = {"mode": args.mode, "bundle": str(args.bundle)}
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=60, limits=limits
        ) as client:
            idle_p50 = await single_latency_ms(client, texts[0], 20)
            saturation = await closed_loop(client, texts, clients=64, seconds=args.calibrate)
            result.update(idle_p50_ms=round(idle_p50, 1), saturation_per_s=round(saturation, 1))
            print(f"idle p50 {idle_p50:.1f} ms, saturation {saturation:.1f} requests/s", flush=True)
            rss_start = _rss_mb(server.pid)
            factor = 3.0 if args.mode == "overload" else 0.8
            load = await open_loop(client, texts, factor * saturation, args.seconds)
            rss_end = _rss_mb(server.pid)
            result.update(load=load, rss_start_mb=round(rss_start, 1), rss_end_mb=round(rss_end, 1))
            print(json.dumps(load), flush=True)
            if args.mode == "overload":
                recovered_after = None
                started = time.monotonic()
                while time.monotonic() - started < 30:
                    p50 = await single_latency_ms(client, texts[0], 5)
                    if p50 <= 1.5 * idle_p50:
                        recovered_after = round(time.monotonic() - started, 2)
                        break
                result["recovered_after_s"] = recovered_after
                ok_statuses = set(load["statuses"]) <= {"200", "429", "504"}
                result["passed"] = (
                    ok_statuses and recovered_after is not None and recovered_after <= 5
                )
            else:
                growth = (rss_end - rss_start) / rss_start
                result["rss_growth"] = round(growth, 4)
                result["passed"] = set(load["statuses"]) == {"200"} and growth < 0.10
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("overload", "soak"))
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of the load")
    parser.add_argument("--calibrate", type=float, default=10.0, help="seconds of closed loop")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
