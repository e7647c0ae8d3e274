"""How faithful /explain's attributions are: deletion curves (AOPC) on IMDb test reviews.

For each review the model is explained as the service explains it (``ModelRuntime.explanation``,
integrated gradients, the service's default steps), and by leave-one-out (each token's
attribution is the logit lost when that token alone is deleted: n extra forward passes, the
brute-force reference). Then, for k = 1..20, the k tokens that most support the predicted label
(by each method, or k at random) are deleted from the token sequence, and the predicted label's
calibrated probability is read again. A faithful method's curve drops faster than random's;
the area over it (AOPC, the mean drop over k) summarises it. Deleting the k tokens that most
oppose the prediction should raise the probability instead.

    python -m bench.faithfulness --reviews 1000 --out docs/explanations

writes ``faithfulness.json`` (curves, AOPC, completeness gaps, timings) and ``faithfulness.png``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from service.config import Settings
from service.pipeline import EXPLAIN_CHUNK_TOKENS
from service.runtime import UNSCHEDULED, ModelRuntime
from training.config import default_data_source
from training.data import load_imdb

MAX_K = 20
METHODS = ("integrated_gradients", "leave_one_out", "random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faithfulness", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("models/imdb-bigru"))
    parser.add_argument("--data", default=default_data_source())
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"))
    parser.add_argument("--reviews", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=Settings.model_fields["explain_steps"].default)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(".cache/faithfulness"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    runtime = ModelRuntime.load(args.bundle, "cpu")
    test = load_imdb(args.data, args.cache_dir)["test"]
    rng = random.Random(args.seed)
    # Half positive, half negative reviews, drawn at random from the official test split.
    picked = [
        i
        for label in (0, 1)
        for i in rng.sample(
            [j for j, y in enumerate(test.labels) if y == label and test.texts[j].strip()],
            args.reviews // 2,
        )
    ]
    curves = {m: {"support": np.zeros(MAX_K), "oppose": np.zeros(MAX_K)} for m in METHODS}
    gaps, relative_gaps, ig_seconds, loo_seconds, lengths = [], [], [], [], []
    started = time.monotonic()
    for n, index in enumerate(picked, 1):
        ids = runtime.preprocess([test.texts[index]])[0].ids
        lengths.append(len(ids))
        t0 = time.perf_counter()
        job = runtime.explanation(ids, args.steps, EXPLAIN_CHUNK_TOKENS)
        while not job.advance(UNSCHEDULED):
            pass
        attribution = job.result()
        ig_seconds.append(time.perf_counter() - t0)
        gaps.append(abs(attribution.gap))
        relative_gaps.append(
            abs(attribution.gap) / max(abs(attribution.logit - attribution.baseline_logit), 1e-6)
        )
        t0 = time.perf_counter()
        loo = attribution.logit - _logits(runtime, [np.delete(ids, i) for i in range(len(ids))])
        loo_seconds.append(time.perf_counter() - t0)
        sign = 1.0 if attribution.logit >= 0 else -1.0  # towards the predicted label
        shuffled = np.random.default_rng([args.seed, index]).permutation(len(ids))
        rankings = {  # token positions, the first to delete first
            ("integrated_gradients", "support"): np.argsort(-sign * attribution.tokens),
            ("integrated_gradients", "oppose"): np.argsort(sign * attribution.tokens),
            ("leave_one_out", "support"): np.argsort(-sign * loo),
            ("leave_one_out", "oppose"): np.argsort(sign * loo),
            ("random", "support"): shuffled,
            ("random", "oppose"): shuffled,
        }
        p_full = _predicted_probability(runtime, np.array([attribution.logit]), sign)[0]
        for (method, direction), ranking in rankings.items():
            # At least one token stays: a review shorter than MAX_K keeps its last one.
            cut = [np.delete(ids, ranking[: min(k, len(ids) - 1)]) for k in range(1, MAX_K + 1)]
            p = _predicted_probability(runtime, _logits(runtime, cut), sign)
            curves[method][direction] += (p_full - p) if direction == "support" else (p - p_full)
        if n % 50 == 0:
            elapsed = time.monotonic() - started
            print(f"{n}/{len(picked)} reviews, {elapsed:.0f} s", file=sys.stderr, flush=True)

    count = len(picked)
    results = {
        "command": "python -m bench.faithfulness " + " ".join(argv or sys.argv[1:]),
        "bundle": runtime.card.name + " " + runtime.card.version,
        "reviews": count,
        "steps": args.steps,
        "tokens": {"mean": float(np.mean(lengths)), "max": int(np.max(lengths))},
        "k": list(range(1, MAX_K + 1)),
        # Mean change of the predicted label's calibrated probability after deleting the k
        # most supporting (drop) or most opposing (rise) tokens.
        "curves": {
            m: {d: (v / count).round(5).tolist() for d, v in curve.items()}
            for m, curve in curves.items()
        },
        "aopc": {
            m: {d: round(float(v.mean() / count), 5) for d, v in curve.items()}
            for m, curve in curves.items()
        },
        "completeness_gap": _summary(gaps),
        "relative_completeness_gap": _summary(relative_gaps),
        "seconds_per_review": {
            "integrated_gradients": _summary(ig_seconds),
            "leave_one_out": _summary(loo_seconds),
        },
        "threads": torch.get_num_threads(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faithfulness.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, args.out / "faithfulness.png")
    print(json.dumps(results["aopc"], indent=2))
    return 0


def _logits(runtime: ModelRuntime, seqs: list[np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return runtime.infer(seqs).astype(np.float64)


def _predicted_probability(runtime: ModelRuntime, logits: np.ndarray, sign: float) -> np.ndarray:
    """Calibrated probability of the label the full text was given."""
    return 1.0 / (1.0 + np.exp(-sign * logits / runtime.calibration.temperature))


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {
        "median": round(float(np.median(a)), 5),
        "p95": round(float(np.percentile(a, 95)), 5),
        "p99": round(float(np.percentile(a, 99)), 5),
        "max": round(float(a.max()), 5),
    }


def _plot(results: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = results["curves"]
    assert isinstance(curves, dict)
    k = results["k"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    styles = {"integrated_gradients": "-", "leave_one_out": "--", "random": ":"}
    for ax, direction, title in (
        (axes[0], "support", "deleting the k most supporting tokens"),
        (axes[1], "oppose", "deleting the k most opposing tokens"),
    ):
        for method, style in styles.items():
            ax.plot(k, curves[method][direction], style, label=method.replace("_", " "))
        ax.set_title(title)
        ax.set_xlabel("k tokens deleted")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("drop of the predicted label's probability")
    axes[1].set_ylabel("rise of the predicted label's probability")
    axes[0].legend()
    fig.suptitle(f"Faithfulness on {results['reviews']} IMDb test reviews")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
