"""`evaluate`: re-score an exported bundle on the official test set (and, given one, a labelled
sentence file) from the bundle alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from service import bundle
from training import behaviour
from training.batches import Model, predict_logits
from training.data import ReviewSet, load_imdb, load_sentences
from training.errors import DataError
from training.metrics import classification_metrics, sigmoid
from training.tokenizer import encode


def evaluate_bundle(
    folder: Path,
    data: str,
    cache_dir: Path,
    device: torch.device,
    data_sha256: str | None = None,
    batch_size: int = 256,
    precision: bundle.Precision = "float32",
    sentences: Path | None = None,
    runtime: Literal["torchscript", "onnx"] = "torchscript",
) -> tuple[dict[str, dict[str, Any]], dict[str, bundle.SplitMetrics]]:
    """Metrics of the bundle per set (``test``, and ``sentences`` when a sentence file is
    given), and those its card claims for that precision (int8: the variant's own). The
    bundle is read through the contract the service reads it with, and scored through its
    tokenizer and its TorchScript file (``runtime`` onnx: its ONNX file, float32); nothing
    from the training run or its cache is read."""
    if runtime == "onnx" and precision != "float32":
        raise DataError(f"model.onnx is the float32 network: score it as float32, not {precision}")
    try:
        loaded = bundle.load(folder, device, precision, runtime)
    except bundle.BundleError as exc:
        raise DataError(str(exc)) from exc
    sets = load_sets(data, cache_dir, data_sha256, sentences)
    metrics = {
        name: score_texts(loaded, reviews, batch_size, name) for name, reviews in sets.items()
    }
    return metrics, loaded.metrics


def load_sets(
    data: str, cache_dir: Path, data_sha256: str | None, sentences: Path | None
) -> dict[str, ReviewSet]:
    """The official test reviews as ``test``, and the sentence file as ``sentences``."""
    sets = {"test": load_imdb(data, cache_dir, data_sha256)["test"]}
    if sentences is not None:
        sets["sentences"] = load_sentences(sentences)
    return sets


def logits_and_temperatures(
    loaded: bundle.Bundle, texts: list[str], batch_size: int = 256, desc: str = "score"
) -> tuple[np.ndarray, np.ndarray]:
    """The logit of each text, tokenised and cut as the service does, and the temperature the
    card's calibration gives a text of its length."""
    ids = encode(loaded.tokenizer, texts)
    logits = predict_logits(
        _forward(loaded), ids, loaded.card.truncation, batch_size, loaded.device, desc
    )
    return logits, loaded.card.calibration.temperatures(np.array([len(i) for i in ids]))


def _forward(loaded: bundle.Bundle) -> Model:
    """The loaded model's ``forward``: ONNX Runtime's where the bundle was loaded with it."""
    onnx = loaded.onnx
    if onnx is None:
        return loaded.model

    def run(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        assert onnx is not None
        return torch.from_numpy(onnx(ids.numpy(), lengths.numpy(), torch.get_num_threads()))

    return run


def probabilities(loaded: bundle.Bundle, texts: list[str]) -> np.ndarray:
    """Calibrated P(POSITIVE) of each text, as the service answers it."""
    logits, temperatures = logits_and_temperatures(loaded, texts)
    return sigmoid(logits / temperatures)


def score_texts(
    loaded: bundle.Bundle, reviews: ReviewSet, batch_size: int, desc: str
) -> dict[str, Any]:
    """Calibrated metrics of a loaded bundle on raw texts, tokenised and cut as the service
    does."""
    logits, temperatures = logits_and_temperatures(loaded, reviews.texts, batch_size, desc)
    return classification_metrics(reviews.labels, logits, temperatures)


def behaviour_figures(
    folder: Path, precision: bundle.Precision, halves: tuple[str, ...]
) -> tuple[dict[str, Any], dict[str, list[behaviour.Outcome]], bundle.Card]:
    """The behaviour suite's figures and outcomes per half for a bundle, and its card."""
    try:
        loaded = bundle.load(folder, "cpu", precision)
    except bundle.BundleError as exc:
        raise DataError(str(exc)) from exc
    outcomes = {
        half: behaviour.run(lambda texts: probabilities(loaded, texts), half) for half in halves
    }
    figures = {half: behaviour.summary(found) for half, found in outcomes.items()}
    return figures, outcomes, loaded.card


def record_behaviour(folder: Path, precision: str, figures: dict[str, Any]) -> None:
    """Keep the suite's figures in the card, under the precision they were measured in."""
    card = bundle.read_card(folder)
    measured = dict(card.behaviour or {})
    measured[precision] = figures
    bundle.write_card(folder, card.model_copy(update={"behaviour": measured}))
