"""Malloc settings compared on the same stream of batches: model time and resident memory.

    python -m bench.allocator --batches 400 --json docs/reliability/allocator.json
    python -m bench.allocator --rounds 3 --only "2 arenas, trim every 5 s (service default)" \
        --only "jemalloc, oversize_threshold:0"     # two settings, interleaved, medians

Each setting runs in a child process of its own (glibc reads its environment at start), which
serves batches as the service does: the bundle loaded and warmed on the inference thread, then
the model run from that thread on batches of 1 to 64 real IMDb test reviews (tokenised and cut
by the bundle's rules), the same seeded sequence for every setting. Resident memory is read
every 25 batches.
The settings: glibc's default (an arena per thread, up to 8 per core); two arenas, as
``service.allocator`` sets them; two arenas with free pages handed back every 5 s (the
service's default under glibc: ``malloc_trim`` on the inference thread, between batches, its
time counted as model time); a fixed 1 MB mmap threshold (every larger tensor goes back to the
kernel when freed); and jemalloc preloaded, at its default settings and with
``oversize_threshold:0`` (no dedicated arena for large allocations: they share the per-thread
arenas and their cached pages). The jemalloc settings are skipped where
it is not installed (Debian: libjemalloc2).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.limit import load_reviews
from bench.servers import rss_mb
from service.allocator import limit_arenas, release_free_memory
from service.runtime import ModelRuntime
from training.config import default_data_source

SETTINGS: dict[str, tuple[list[str], dict[str, str]]] = {
    "glibc default": ([], {}),
    "2 arenas": (["--arenas", "2"], {}),
    "2 arenas, trim every 5 s (service default)": (["--arenas", "2", "--trim-every-s", "5"], {}),
    "mmap threshold 1 MB": ([], {"MALLOC_MMAP_THRESHOLD_": str(2**20)}),
}
JEMALLOC = ctypes.util.find_library("jemalloc")  # a soname: the loader finds it, as LD_PRELOAD may
if JEMALLOC:
    SETTINGS["jemalloc (its defaults)"] = ([], {"LD_PRELOAD": JEMALLOC})
    SETTINGS["jemalloc, oversize_threshold:0"] = (
        [],
        {"LD_PRELOAD": JEMALLOC, "MALLOC_CONF": "oversize_threshold:0"},
    )
SAMPLE_EVERY = 25
MAX_BATCH = 64  # the service's default max_batch_size


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting, in this process: model seconds and resident memory along the stream."""
    if args.arenas:
        limit_arenas(args.arenas)
    runtime = ModelRuntime.load(args.bundle, "cpu")
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
    worker.submit(runtime.warmup, (1, MAX_BATCH)).result()
    texts, _ = load_reviews(args.data, args.reviews, seed=0, cache_dir=args.cache_dir)
    seqs = [e.ids for e in runtime.preprocess(texts)]
    rng = np.random.default_rng(1)
    largest = min(MAX_BATCH, len(seqs))
    batches = [
        [seqs[i] for i in rng.choice(len(seqs), int(rng.integers(1, largest + 1)), replace=False)]
        for _ in range(args.batches)
    ]
    rss = [rss_mb(os.getpid())]
    model_s = trim_s = 0.0
    trimmed = -float("inf")
    for i, batch in enumerate(batches, start=1):
        started = time.perf_counter()
        if args.trim_every_s and time.monotonic() - trimmed >= args.trim_every_s:
            worker.submit(release_free_memory).result()
            trimmed = time.monotonic()
            trim_s += time.perf_counter() - started
        worker.submit(runtime.infer, batch).result()
        model_s += time.perf_counter() - started
        if i % SAMPLE_EVERY == 0:
            rss.append(rss_mb(os.getpid()))
    return {
        "model_s": round(model_s, 2),
        "trim_s": round(trim_s, 2),
        "rss_mb": [round(r, 1) for r in rss],
    }


def run_child(name: str, args: argparse.Namespace) -> dict[str, Any]:
    flags, env = SETTINGS[name]
    # Malloc settings of the caller's own would blur the comparison.
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"
    }
    command = [sys.executable, "-m", "bench.allocator", "--child", *flags]
    command += ["--batches", str(args.batches), "--bundle", str(args.bundle)]
    command += ["--data", args.data, "--reviews", str(args.reviews)]
    command += ["--cache-dir", str(args.cache_dir)]
    print(f"{name} ...", flush=True)
    done = subprocess.run(command, env={**inherited, **env}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: the child failed:\n{done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def compare(args: argparse.Namespace) -> dict[str, Any]:
    names = args.only or list(SETTINGS)
    # Rounds interleave the settings, so a slow spell of the machine hits them all alike.
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            runs[name].append(run_child(name, args))
    results: dict[str, Any] = {}
    for name, done in runs.items():
        rss = done[0]["rss_mb"][1:]  # the first round's; its first reading is before any batch
        quarter = max(1, len(rss) // 4)
        results[name] = {
            "model_s": round(statistics.median(r["model_s"] for r in done), 2),
            "model_s_rounds": [r["model_s"] for r in done],
            "trim_s": round(statistics.median(r["trim_s"] for r in done), 2),
            "rss_mb": done[0]["rss_mb"],
            "rss_first_quarter_median_mb": statistics.median(rss[:quarter]),
            "rss_last_quarter_median_mb": statistics.median(rss[-quarter:]),
        }
    baseline = names[0]
    for result in results.values():
        result["model_time_vs_baseline"] = round(
            result["model_s"] / results[baseline]["model_s"], 2
        )
    return {
        "batches": args.batches,
        "rounds": args.rounds,
        "baseline": baseline,
        "settings": results,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"| setting | model time (median of {report['rounds']}) | of which trim "
        f"| vs {report['baseline']} | RSS after warm-up | first quarter | last quarter | peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in report["settings"].items():
        lines.append(
            f"| {name} | {run['model_s']:.1f} s | {run['trim_s']:.2f} s "
            f"| {run['model_time_vs_baseline']:.2f}x "
            f"| {run['rss_mb'][0]:.0f} MB | {run['rss_first_quarter_median_mb']:.0f} MB "
            f"| {run['rss_last_quarter_median_mb']:.0f} MB | {max(run['rss_mb']):.0f} MB |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--reviews", type=int, default=4000, help="test reviews to draw from")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument(
        "--only",
        action="append",
        choices=list(SETTINGS),
        help="a setting to run (repeatable; default: all); the first is the baseline",
    )
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting (medians)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arenas", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trim-every-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    report = compare(args)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
