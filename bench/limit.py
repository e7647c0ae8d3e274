"""The model's own limit: in-process TorchScript throughput on real IMDb test reviews, no HTTP,
and the CPU levers measured the same way (threads, length grouping, int8 dynamic quantisation).

    python -m bench.limit models/imdb-bigru --batch-sizes 1,16,64,256
    python -m bench.limit models/imdb-bigru --device cuda --dtype float16 --batch-sizes 1,64,1024
    python -m bench.limit models/imdb-bigru --dtype int8 --batch-sizes 1,4,16,64 --thread-lever
    python -m bench.limit models/imdb-bigru --dtype int8 --batch-sizes 1,8,64 --workers-lever
    python -m bench.limit models/imdb-bigru --dtype int8 --batch-sizes 64 --batch-spread
    python -m bench.limit models/imdb-bigru --dtype int8 --threads 1 --batch-sizes 1 --short
    python -m bench.limit models/imdb-bigru --device cuda --batch-sizes 64,512 --cudnn-layout-lever
    python -m bench.limit models/imdb-bigru --dtype int8 --threads 1 --batch-sizes 64 --cost-model
    python -m bench.limit models/imdb-bigru --threads 1 --batch-sizes 1,8,64 --runtime-lever

Reviews keep their real length spread (tokenised and cut by the bundle's own rules). Two orders
are timed per batch size: ``random`` (batches as requests arrive) and ``grouped`` (reviews
sorted by length first: the most a batcher's length grouping could gain).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.workload import short_reviews
from service import bundle
from service.runtime import ModelRuntime
from training.batches import pad_batch, predict_logits
from training.config import default_data_source
from training.data import load_imdb
from training.quantize import eager, quantize

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def load_reviews(
    data: str, count: int, seed: int, cache_dir: Path = Path(".cache")
) -> tuple[list[str], np.ndarray]:
    test = load_imdb(data, cache_dir)["test"]
    pick = np.random.default_rng(seed).choice(len(test), size=count, replace=False)
    return [test.texts[i] for i in pick], test.labels[pick]


def throughput(
    runtime: ModelRuntime,
    seqs: list[np.ndarray],
    batch_size: int,
    min_seconds: float,
    model: Model | None = None,
    device: torch.device | None = None,
) -> float:
    """Reviews per second, cycling through ``seqs`` in batches for at least ``min_seconds``.
    On CUDA each batch is copied from pinned host memory and its logits copied back, as the
    service's runtime does, so the figure includes the transfers and one sync per batch."""
    model = model or runtime.model
    device = device or runtime.device
    batches = [
        pad_batch(seqs[i : i + batch_size], runtime.truncation)
        for i in range(0, len(seqs), batch_size)
    ]
    if device.type == "cuda":
        batches = [(ids.pin_memory(), lengths.pin_memory()) for ids, lengths in batches]
    # Batches in random order, so that a run stopped part-way through a pass still sees a fair
    # sample of lengths (with length-sorted input the first batches are the shortest).
    np.random.default_rng(0).shuffle(batches)

    def run(ids: torch.Tensor, lengths: torch.Tensor) -> None:
        model(ids.to(device, non_blocking=True), lengths.to(device, non_blocking=True)).cpu()

    with torch.no_grad():
        run(*batches[0])  # warm-up
        done, started = 0, time.perf_counter()
        while True:
            for ids, lengths in batches:
                run(ids, lengths)
                done += len(lengths)
                elapsed = time.perf_counter() - started
                if elapsed >= min_seconds:
                    return done / elapsed


def sweep(
    runtime: ModelRuntime,
    seqs: list[np.ndarray],
    batch_sizes: list[int],
    min_seconds: float,
    model: Model | None = None,
) -> list[dict[str, Any]]:
    """Reviews/s per batch size in both orders, of ``model`` (default: the runtime's)."""
    rows = []
    for batch_size in batch_sizes:
        for order in ("random", "grouped"):
            ordered = seqs if order == "random" else sorted(seqs, key=len)
            rate = throughput(runtime, ordered, batch_size, min_seconds, model)
            rows.append({"batch_size": batch_size, "order": order, "reviews_per_s": round(rate, 1)})
            print(f"  limit  batch {batch_size:>4}  {order:<8} {rate:9.1f} reviews/s", flush=True)
    return rows


def onnx_forward(
    runtime: ModelRuntime, path: Path | None = None, level: str = "all"
) -> Model | None:
    """The bundle's model.onnx (or ``path``) in ONNX Runtime as a ``forward`` on torch's thread
    count; None on CUDA or without the file."""
    path = path or runtime.bundle.folder / bundle.ONNX_FILE
    if runtime.device.type != "cpu" or not path.is_file():
        return None
    onnx = bundle.OnnxModel(path, level)
    threads = torch.get_num_threads()
    return lambda ids, lengths: torch.from_numpy(onnx(ids.numpy(), lengths.numpy(), threads))


def thread_lever(
    runtime: ModelRuntime, seqs: list[np.ndarray], batch_sizes: list[int], min_seconds: float
) -> list[dict[str, Any]]:
    """torch intra-op threads: 1 against all cores."""
    default = torch.get_num_threads()
    rows = []
    try:
        for threads in sorted({1, default}):
            torch.set_num_threads(threads)
            for batch_size in batch_sizes:
                rate = throughput(runtime, seqs, batch_size, min_seconds)
                rows.append(
                    {"threads": threads, "batch_size": batch_size, "reviews_per_s": round(rate, 1)}
                )
                print(f"  threads {threads}  batch {batch_size:>4}  {rate:9.1f} reviews/s")
    finally:
        torch.set_num_threads(default)
    return rows


def workers_lever(
    runtime: ModelRuntime, seqs: list[np.ndarray], batch_sizes: list[int], min_seconds: float
) -> list[dict[str, Any]]:
    """Batches side by side, as ``SENTIMENT_INFERENCE_WORKERS`` runs them: one Python thread per
    torch thread, each timing its own batches on one torch thread, all at once (a TorchScript
    call releases the GIL). Reviews/s are summed over the threads; the one-worker row is the
    same batches one at a time on every thread."""
    default = torch.get_num_threads()
    rows = []
    try:
        for workers in sorted({1, default}):
            threads_each = max(1, default // workers)
            for batch_size in batch_sizes:
                rate = _side_by_side(runtime, seqs, batch_size, min_seconds, workers, threads_each)
                rows.append(
                    {
                        "workers": workers,
                        "threads_each": threads_each,
                        "batch_size": batch_size,
                        "reviews_per_s": round(rate, 1),
                    }
                )
                print(f"  workers {workers}  batch {batch_size:>4}  {rate:9.1f} reviews/s")
    finally:
        torch.set_num_threads(default)
    return rows


def _side_by_side(
    runtime: ModelRuntime,
    seqs: list[np.ndarray],
    batch_size: int,
    min_seconds: float,
    workers: int,
    threads_each: int,
) -> float:
    rates: list[float] = []

    def work() -> None:
        torch.set_num_threads(threads_each)  # torch's thread count is kept per calling thread
        rates.append(throughput(runtime, seqs, batch_size, min_seconds))

    pool = [threading.Thread(target=work) for _ in range(workers)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(rates)


def int8_lever(
    runtime: ModelRuntime,
    seqs: list[np.ndarray],
    labels: np.ndarray,
    batch_sizes: list[int],
    min_seconds: float,
) -> dict[str, Any]:
    """Dynamic int8 quantisation of the recurrent and linear layers, as `python -m training
    quantize` makes it: speed next to the float32 TorchScript file and accuracy on the same
    reviews."""
    float32: Model = runtime.differentiable  # model.pt, whatever precision the runtime serves
    scripted: Model = quantize(eager(runtime.bundle))
    cpu = torch.device("cpu")
    accuracy = {}
    for name, model in (("float32", float32), ("int8", scripted)):
        logits = predict_logits(model, seqs, runtime.truncation, 256, cpu, name)
        accuracy[name] = float(((logits >= 0) == labels).mean())
    rows = []
    for batch_size in batch_sizes:
        for name, model in (("float32", float32), ("int8", scripted)):
            rate = throughput(runtime, seqs, batch_size, min_seconds, model, cpu)
            rows.append({"model": name, "batch_size": batch_size, "reviews_per_s": round(rate, 1)})
            print(f"  {name:<7} batch {batch_size:>4}  {rate:9.1f} reviews/s")
    print(
        f"  accuracy on {len(seqs)} test reviews: float32 {accuracy['float32']:.4f}, "
        f"int8 {accuracy['int8']:.4f}"
    )
    return {"reviews": len(seqs), "accuracy": accuracy, "throughput": rows}


def runtime_lever(
    runtime: ModelRuntime,
    seqs: list[np.ndarray],
    labels: np.ndarray | None,
    batch_sizes: list[int],
    min_seconds: float,
) -> dict[str, Any]:
    """What runs the model on a CPU, on the calling thread's torch threads: model.pt and the
    int8 variant in TorchScript, the bundle's model.onnx in ONNX Runtime at each graph
    optimisation level, and ONNX Runtime's own dynamic int8 quantisation of it. Speed per batch
    size (arrival order) and accuracy on the same reviews (where they are labelled)."""
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = runtime.bundle.folder
    if onnx_forward(runtime) is None:
        raise SystemExit(f"{folder} has no {bundle.ONNX_FILE}: python -m training migrate {folder}")
    threads = torch.get_num_threads()

    def onnx_model(path: Path, level: str) -> Model:
        found = onnx_forward(runtime, path, level)
        assert found is not None
        return found

    models: dict[str, Model] = {"torchscript float32": runtime.differentiable}
    if runtime.card.int8 is not None:
        models["torchscript int8"] = bundle.load(folder, "cpu", "int8").model
    for level in ("basic", "extended", "all"):
        models[f"onnxruntime float32 ({level})"] = onnx_model(folder / bundle.ONNX_FILE, level)
    with tempfile.TemporaryDirectory() as tmp:
        quantised = Path(tmp) / "model.int8.onnx"
        quantize_dynamic(folder / bundle.ONNX_FILE, quantised, weight_type=QuantType.QInt8)
        models["onnxruntime int8 (all)"] = onnx_model(quantised, "all")
    cpu = torch.device("cpu")
    accuracy = {}
    if labels is not None:
        for name, model in models.items():
            logits = predict_logits(model, seqs, runtime.truncation, 64, cpu, name)
            accuracy[name] = float(((logits >= 0) == labels).mean())
            print(f"\n  accuracy  {name:<30} {accuracy[name]:.4f}")
    rows = []
    # Both orders: batches as requests arrive, and of similar lengths (as the batcher cuts a
    # round sorted by length).
    for batch_size, order in itertools.product(batch_sizes, ("random", "grouped")):
        ordered = seqs if order == "random" else sorted(seqs, key=len)
        for name, model in models.items():
            rate = throughput(runtime, ordered, batch_size, min_seconds, model, cpu)
            rows.append(
                {
                    "model": name,
                    "batch_size": batch_size,
                    "order": order,
                    "reviews_per_s": round(rate, 1),
                }
            )
            print(
                f"  {name:<30} batch {batch_size:>4} {order:<8} {rate:8.1f} reviews/s", flush=True
            )
    return {"threads": threads, "accuracy": accuracy, "throughput": rows}


def cudnn_layout_lever(
    runtime: ModelRuntime, seqs: list[np.ndarray], batch_sizes: list[int], min_seconds: float
) -> list[dict[str, Any]]:
    """On CUDA: the served model (recurrent weights flattened at load, ``bundle.
    flatten_rnn_weights``) against ``model.pt`` as ``torch.jit.load`` leaves it, whose weights
    cuDNN copies together at every call (pytorch/pytorch#19053). Arrival order."""
    as_loaded = torch.jit.load(str(runtime.bundle.folder / bundle.MODEL_FILE), runtime.device)
    as_loaded = as_loaded.eval().to(dtype=bundle.DTYPES[runtime.precision])
    rows = []
    for batch_size in batch_sizes:
        for layout, model in (("flattened", runtime.model), ("as-loaded", as_loaded)):
            rate = throughput(runtime, seqs, batch_size, min_seconds, model)
            rows.append(
                {"layout": layout, "batch_size": batch_size, "reviews_per_s": round(rate, 1)}
            )
            print(f"  {layout:<9} batch {batch_size:>4}  {rate:9.1f} reviews/s", flush=True)
    return rows


def cost_model(
    runtime: ModelRuntime,
    seqs: list[np.ndarray],
    batch_sizes: list[int],
    min_seconds: float,
) -> dict[str, Any]:
    """The batcher's cost model (``service.scheduler.BatchCost``) fitted to this machine:
    batches of ``n`` reviews all cut to ``T`` tokens, timed, then ``time = a*T + b*T*n + c`` by
    least squares (``fit_cost``). ``step_texts = a / b`` is the scheduler's
    ``Policy.step_texts``; ``c / a`` is a call's cost outside its steps, in steps
    (``BatchCost.CALL_STEPS`` also covers the server's work per batch, which this does not
    see)."""
    sizes = sorted({1, 2, 4, 8, 16, 32, *batch_sizes})
    longest = runtime.truncation.max_length  # 400 for the shipped model: 50, 200 and 400
    rows = []
    for length in sorted({max(1, longest // 8), max(1, longest // 2), longest}):
        long_enough = [s[:length] for s in seqs if len(s) >= length] or [np.ones(length, np.int64)]
        for size in sizes:
            batch = [long_enough[i % len(long_enough)] for i in range(size)]
            seconds = size / throughput(runtime, batch, size, min_seconds)  # one batch, repeated
            rows.append({"tokens": length, "texts": size, "ms": round(seconds * 1e3, 3)})
            print(f"  cost  {size:>4} texts x {length:>4} tokens  {seconds * 1e3:9.2f} ms")
    fit = fit_cost(rows)
    print(f"  cost model: step_texts {fit['step_texts']}, call_steps {fit['call_steps']} ({fit})")
    return {"batches": rows, "fit": fit}


def fit_cost(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``time = a*T + b*T*n + c`` fitted to timed batches (``tokens`` T, ``texts`` n, ``ms``) by
    least squares of the relative error: else the largest batches alone would set the fit."""
    timed = np.array([r["ms"] for r in rows], dtype=np.float64) / 1e3
    design = np.array([[r["tokens"], r["tokens"] * r["texts"], 1.0] for r in rows])
    ones = np.ones(len(rows), dtype=np.float64)
    (a, b, c), *_ = np.linalg.lstsq(design / timed[:, None], ones, rcond=None)
    return {
        "step_us": round(float(a) * 1e6, 2),
        "text_step_us": round(float(b) * 1e6, 2),
        "call_ms": round(float(c) * 1e3, 3),
        "step_texts": round(float(a / b), 2),
        "call_steps": round(float(c / a), 1),
    }


def add_dtype_option(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """``--dtype``: the precisions ``SENTIMENT_DTYPE`` takes."""
    parser.add_argument("--dtype", choices=("auto", *bundle.PRECISIONS), default=default, help=help)


def batch_spread(
    runtime: ModelRuntime, seqs: list[np.ndarray], count: int = 128, batch_size: int = 64
) -> dict[str, Any]:
    """How far a text's calibrated probability moves between being scored alone and in a batch
    of ``batch_size`` (arrival order): about 1e-7 for float32, more for int8, whose activations
    are quantised with a scale per batch."""
    alone = np.array([runtime.infer([s])[0] for s in seqs[:count]])
    batched = np.concatenate(
        [runtime.infer(seqs[i : i + batch_size]) for i in range(0, count, batch_size)]
    )[:count]

    def probability(z: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-z / runtime.calibration.temperature))

    moved = np.abs(probability(alone) - probability(batched))
    spread = {
        "texts": len(moved),
        "mean": round(float(moved.mean()), 5),
        "max": round(float(moved.max()), 5),
        "labels_changed": int(((alone >= 0) != (batched >= 0)).sum()),
    }
    print(f"  batch spread ({runtime.precision}, alone vs batches of {batch_size}): {spread}")
    return spread


def machine() -> dict[str, Any]:
    """Where a measurement ran: CPU, cores, versions, commit."""
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "commit": commit or "?",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--reviews", type=int, default=1024, help="test reviews sampled")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="timing per measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    add_dtype_option(parser, "float32", "as SENTIMENT_DTYPE")
    parser.add_argument(
        "--thread-lever",
        action="store_true",
        help="also time each batch size on 1 torch thread and on all cores (arrival order)",
    )
    parser.add_argument(
        "--workers-lever",
        action="store_true",
        help="also time each batch size as one worker on all cores and as one worker per core "
        "side by side (arrival order)",
    )
    parser.add_argument(
        "--batch-spread",
        action="store_true",
        help="also report how far 128 reviews' probabilities move between alone and in batches "
        "of 64",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="time the benchmark's short reviews (the short-review requests' texts) instead",
    )
    parser.add_argument(
        "--cudnn-layout-lever",
        action="store_true",
        help="on CUDA, also time each batch size with the recurrent weights as loaded (not "
        "flattened for cuDNN)",
    )
    parser.add_argument(
        "--cost-model",
        action="store_true",
        help="also fit the batcher's cost model (SENTIMENT_BATCH_STEP_TEXTS) to batches of equal "
        "lengths up to the largest batch size; run with --threads 1 for a CPU worker's view",
    )
    parser.add_argument(
        "--runtime-lever",
        action="store_true",
        help="also time each batch size (and score the reviews) on TorchScript float32 and "
        "int8, ONNX Runtime float32 at each graph optimisation level and ONNX Runtime int8",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = ModelRuntime.load(args.bundle, args.device, args.dtype)
    on_gpu = runtime.device.type == "cuda"
    labels = None
    if args.short:
        texts = short_reviews(load_imdb(args.data, args.cache_dir)["test"].texts)
    else:
        texts, labels = load_reviews(args.data, args.reviews, seed=0, cache_dir=args.cache_dir)
    seqs = [e.ids for e in runtime.preprocess(texts)]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = sweep(runtime, seqs, batch_sizes, args.min_seconds)
    threads = (
        thread_lever(runtime, seqs, batch_sizes, args.min_seconds) if args.thread_lever else None
    )
    lengths = np.array([len(s) for s in seqs])
    result = {
        "bundle": str(args.bundle),
        "device": str(runtime.device),
        "gpu": torch.cuda.get_device_name(runtime.device) if on_gpu else None,
        "dtype": runtime.precision,
        "reviews": len(texts),
        "short": args.short,
        "tokens_mean": round(float(lengths.mean()), 1),
        "tokens_p50_p90_max": [int(np.percentile(lengths, p)) for p in (50, 90, 100)],
        "machine": machine(),
        "results": rows,
        "threads": threads,
        "workers": (
            workers_lever(runtime, seqs, batch_sizes, args.min_seconds)
            if args.workers_lever
            else None
        ),
        "batch_spread": batch_spread(runtime, seqs) if args.batch_spread else None,
        "cudnn_layout": (
            cudnn_layout_lever(runtime, seqs, batch_sizes, args.min_seconds)
            if args.cudnn_layout_lever and on_gpu
            else None
        ),
        "cost_model": (
            cost_model(runtime, seqs, batch_sizes, min(args.min_seconds, 1.0))
            if args.cost_model
            else None
        ),
        "runtimes": (
            runtime_lever(runtime, seqs, labels, batch_sizes, args.min_seconds)
            if args.runtime_lever
            else None
        ),
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
