"""What the per-pod queue depth (``sentiment_queue_depth``, the HPA's custom metric) reads at
each load: one server, ``wrk`` at 4..256 clients on real IMDb test reviews, the gauge sampled
from /metrics every 0.5 s, next to the throughput and p99 that load gets.

    python -m bench.queue_depth --out docs/scaling

The HPA's queue target is read off this table (docs/scaling.md): the depth at the highest load
whose p99 is still acceptable.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench import servers
from bench.loadgen import run_wrk
from bench.workload import build
from training.config import default_data_source


def sample_depth(metrics_url: str, stop: threading.Event, into: list[float]) -> None:
    with httpx.Client(timeout=5) as client:
        while not stop.wait(0.5):
            text = client.get(metrics_url).text
            for family in text_string_to_metric_families(text):
                if family.name == "sentiment_queue_depth":
                    into.append(float(family.samples[0].value))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.queue_depth", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--clients", default="4,16,64,128,256")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench/queue_depth"))
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/queue_depth"))
    args = parser.parse_args(argv)

    work = build(args.data, Path(".cache"), args.workdir / "bodies", 2048)
    points: list[dict[str, Any]] = []
    with servers.ours(args.bundle, args.workdir, work.probe()) as server:
        metrics_url = server.url.removesuffix("/predict") + "/metrics"
        run_wrk(server.url, work.single, 16, 4)  # warm-up
        for clients in (int(c) for c in args.clients.split(",")):
            depths: list[float] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample_depth, args=(metrics_url, stop, depths))
            sampler.start()
            result = run_wrk(server.url, work.single, clients, args.seconds)
            stop.set()
            sampler.join()
            point = {
                "clients": clients,
                "requests_per_s": round(result.ok_per_s, 1),
                "p50_ms": round(result.p(50), 1),
                "p99_ms": round(result.p(99), 1),
                "queue_depth_mean": round(statistics.fmean(depths), 1) if depths else None,
                "queue_depth_max": max(depths) if depths else None,
                "statuses": result.statuses,
            }
            points.append(point)
            print(json.dumps(point), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": f"python -m bench.queue_depth {command}", "points": points}
    (args.out / "queue_depth.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
