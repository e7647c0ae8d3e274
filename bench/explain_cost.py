"""What explanations cost /predict: its throughput at 64 clients, alone and while 4 clients
ask for explanations back to back (real IMDb test reviews for both), in interleaved rounds
against one server, so both sides see the same machine state.

    python -m bench.explain_cost --out docs/explanations

The ratio (with / without) should stay near ``1 - explain_share`` or above: explanations take
at most that share of the inference workers' time while predictions wait.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench import servers
from bench.loadgen import run_wrk
from bench.workload import build
from training.config import default_data_source

PREDICT_CLIENTS = 64
EXPLAIN_CLIENTS = 4


class Explainers:
    """``clients`` threads, each posting the next review to /explain as soon as the last one is
    answered, until stopped; they record each answer's status and latency."""

    def __init__(self, url: str, reviews: list[str], clients: int) -> None:
        self.url, self.reviews, self.clients = url, reviews, clients
        self.latencies: list[float] = []
        self.statuses: dict[int, int] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def __enter__(self) -> Explainers:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _run(self, offset: int) -> None:
        with httpx.Client(timeout=180) as client:
            i = offset
            while not self._stop.is_set():
                body = {"inputs": self.reviews[i % len(self.reviews)], "truncate": True}
                started = time.perf_counter()
                status = client.post(self.url, json=body).status_code
                with self._lock:
                    self.statuses[status] = self.statuses.get(status, 0) + 1
                    if status == 200:
                        self.latencies.append(time.perf_counter() - started)
                i += self.clients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain_cost", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--reviews", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(".cache/bench/explain_cost"))
    parser.add_argument("--out", type=Path, default=Path(".cache/bench/explain_cost"))
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="server setting"
    )
    parser.add_argument(
        "--policy", default="", help='the scheduler\'s levers, e.g. "--explain-share 0.1"'
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)

    work = build(args.data, Path(".cache"), args.workdir / "bodies", args.reviews)
    alone: list[dict[str, Any]] = []
    shared: list[dict[str, Any]] = []
    explained: list[dict[str, Any]] = []
    policy = args.policy.split()
    with servers.ours(
        args.bundle, args.workdir, work.probe(), extra_env=env, policy=policy
    ) as server:
        explain_url = server.url.removesuffix("/predict") + "/explain"
        run_wrk(server.url, work.single, 16, 10)  # warm caches and allocators
        for i in range(args.rounds):
            # Alternate which side goes first, so a drift of the machine hits both alike.
            for with_explanations in (False, True) if i % 2 == 0 else (True, False):
                if not with_explanations:
                    result = run_wrk(server.url, work.single, PREDICT_CLIENTS, args.seconds)
                    alone.append(result.summary())
                    print(f"round {i + 1} alone:             {result.ok_per_s:7.1f} req/s")
                    continue
                with Explainers(explain_url, work.reviews, EXPLAIN_CLIENTS) as explainers:
                    time.sleep(2)  # explanations queued and running before the measurement
                    result = run_wrk(server.url, work.single, PREDICT_CLIENTS, args.seconds)
                shared.append(result.summary())
                latencies = sorted(explainers.latencies)
                explained.append(
                    {
                        "statuses": explainers.statuses,
                        "answered": len(latencies),
                        "p50_s": round(statistics.median(latencies), 2) if latencies else None,
                        "max_s": round(latencies[-1], 2) if latencies else None,
                    }
                )
                print(
                    f"round {i + 1} with explanations: {result.ok_per_s:7.1f} req/s, "
                    f"{len(latencies)} explanations answered, statuses {explainers.statuses}"
                )
    per_s_alone = statistics.median(r["requests_per_s"] for r in alone)
    per_s_shared = statistics.median(r["requests_per_s"] for r in shared)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": f"python -m bench.explain_cost {command}",
        "env": env,
        "policy": args.policy,
        "predict_clients": PREDICT_CLIENTS,
        "explain_clients": EXPLAIN_CLIENTS,
        "seconds": args.seconds,
        "alone": alone,
        "with_explanations": shared,
        "explanations": explained,
        "median_requests_per_s": {"alone": per_s_alone, "with_explanations": per_s_shared},
        "ratio": round(per_s_shared / max(per_s_alone, 1e-9), 3),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "explain_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"/predict with {EXPLAIN_CLIENTS} explaining clients / alone: {report['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
