"""The model's own limit: in-process TorchScript throughput on real IMDb test reviews, no HTTP.

    python -m bench.limit models/imdb-bigru --batch-sizes 1,16,64,256

Reviews keep their real length spread (tokenised and truncated by the bundle's own tokenizer).
Two orders are timed per batch size: ``random`` (batches as they come) and ``grouped``
(reviews sorted by length first, as the service's batcher does).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.runtime import ModelRuntime
from training.batches import pad_batch
from training.config import default_data_source
from training.data import load_imdb


def load_reviews(data: str, count: int, seed: int) -> list[str]:
    test = load_imdb(data, Path(".cache"))["test"]
    pick = np.random.default_rng(seed).choice(len(test), size=count, replace=False)
    return [test.texts[i] for i in pick]


def throughput(
    runtime: ModelRuntime, seqs: list[np.ndarray], batch_size: int, min_seconds: float
) -> float:
    """Reviews per second over whole passes through ``seqs``, at least ``min_seconds`` long."""
    model = runtime.model
    batches = [
        pad_batch(seqs[i : i + batch_size], runtime.truncation)
        for i in range(0, len(seqs), batch_size)
    ]
    with torch.no_grad():
        model(*batches[0])  # warm-up
        done, started = 0, time.perf_counter()
        while True:
            for ids, lengths in batches:
                model(ids, lengths)
            done += len(seqs)
            elapsed = time.perf_counter() - started
            if elapsed >= min_seconds:
                return done / elapsed


def run(
    bundle: Path, data: str, batch_sizes: list[int], count: int, min_seconds: float
) -> dict[str, Any]:
    runtime = ModelRuntime.load(bundle, "cpu")
    seqs = [e.ids for e in runtime.preprocess(load_reviews(data, count, seed=0))]
    lengths = np.array([len(s) for s in seqs])
    rows = []
    for batch_size in batch_sizes:
        for order in ("random", "grouped"):
            ordered = seqs if order == "random" else sorted(seqs, key=len)
            rate = throughput(runtime, ordered, batch_size, min_seconds)
            rows.append({"batch_size": batch_size, "order": order, "reviews_per_s": round(rate, 1)})
            print(f"batch {batch_size:>4}  {order:<8} {rate:9.1f} reviews/s", flush=True)
    return {
        "bundle": str(bundle),
        "reviews": count,
        "tokens_mean": round(float(lengths.mean()), 1),
        "tokens_p50_p90_max": [int(np.percentile(lengths, p)) for p in (50, 90, 100)],
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "results": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--reviews", type=int, default=1024, help="test reviews sampled")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(
        args.bundle,
        args.data,
        [int(b) for b in args.batch_sizes.split(",")],
        args.reviews,
        args.min_seconds,
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
