"""Can tokenising keep up with a GPU? Reviews tokenised per second by the service's own
preprocess stage (the bundle's tokenizer and truncation rule), on 1..N threads as
``SENTIMENT_TOKENIZATION_WORKERS`` runs it, against the rate a GPU sitting needs.

    python -m bench.tokenize models/imdb-bigru --workers 1,2,4 --json out.json

Each thread takes whole requests, as the service's pool does: single reviews, and 64-review
requests. The GPU target (issue 17: 15,000 reviews/s through the service) is the rate one
process must tokenise at; the ratio says how far these cores are from it.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.limit import load_reviews, machine
from service.runtime import ModelRuntime
from training.config import default_data_source

GPU_TARGET_PER_S = 15_000.0


def reviews_per_s(
    runtime: ModelRuntime, texts: list[str], workers: int, per_request: int, min_seconds: float
) -> float:
    """Reviews tokenised per second by ``workers`` threads, each call one request of
    ``per_request`` reviews, cycling through ``texts`` for at least ``min_seconds``."""
    requests = [texts[i : i + per_request] for i in range(0, len(texts), per_request)]
    runtime.preprocess(requests[0])  # the tokenizer's first call sets itself up
    done, started = 0, time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while time.perf_counter() - started < min_seconds:
            done += sum(len(e) for e in pool.map(runtime.preprocess, requests))
    return done / (time.perf_counter() - started)


def sweep(
    runtime: ModelRuntime, texts: list[str], workers: list[int], min_seconds: float
) -> list[dict[str, Any]]:
    rows = []
    for per_request in (1, 64):
        for n in workers:
            rate = reviews_per_s(runtime, texts, n, per_request, min_seconds)
            rows.append(
                {
                    "workers": n,
                    "reviews_per_request": per_request,
                    "reviews_per_s": round(rate, 1),
                    "x_gpu_target": round(rate / GPU_TARGET_PER_S, 3),
                }
            )
            print(
                f"  {n} worker(s), {per_request:>2} per request: {rate:9.1f} reviews/s "
                f"({rate / GPU_TARGET_PER_S:.2f}x of {GPU_TARGET_PER_S:,.0f})",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--reviews", type=int, default=2048, help="test reviews sampled")
    parser.add_argument("--workers", default="1,2,4", help="thread counts, comma-separated")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="timing per point")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    runtime = ModelRuntime.load(args.bundle, "cpu")
    texts, _ = load_reviews(args.data, args.reviews, seed=0, cache_dir=args.cache_dir)
    workers = [int(w) for w in args.workers.split(",")]
    result = {
        "bundle": str(args.bundle),
        "reviews": len(texts),
        "gpu_target_per_s": GPU_TARGET_PER_S,
        "machine": machine(),
        "results": sweep(runtime, texts, workers, args.min_seconds),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
