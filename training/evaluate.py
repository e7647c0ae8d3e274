"""`evaluate`: re-score an exported bundle on the official test set from the bundle alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service import bundle
from training.batches import predict_logits
from training.data import load_imdb
from training.errors import DataError
from training.metrics import classification_metrics
from training.tokenizer import encode


def evaluate_bundle(
    folder: Path,
    data: str,
    cache_dir: Path,
    device: torch.device,
    data_sha256: str | None = None,
    batch_size: int = 256,
    dtype: bundle.Dtype = "float32",
) -> tuple[dict[str, Any], bundle.Card]:
    """Test-set metrics of the bundle, and its card. The bundle is read through the contract
    the service reads it with, and scored through its tokenizer and TorchScript file; nothing
    from the training run or its cache is read."""
    try:
        loaded = bundle.load(folder, device, dtype)
    except bundle.BundleError as exc:
        raise DataError(str(exc)) from exc
    test = load_imdb(data, cache_dir, data_sha256)["test"]
    ids = encode(loaded.tokenizer, test.texts)
    truncation = loaded.card.truncation
    logits = predict_logits(loaded.model, ids, truncation, batch_size, device, "evaluate")
    metrics = classification_metrics(test.labels, logits, loaded.card.calibration.temperature)
    return metrics, loaded.card
