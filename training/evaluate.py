"""`evaluate`: re-score an exported bundle on the official test set from the bundle alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from service.errors import BundleError
from service.runtime import ModelRuntime
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
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test-set metrics of the bundle, and its card. The bundle is loaded by the service's own
    loader and scored through its tokenizer and TorchScript file; nothing from the training run
    or its cache is read."""
    try:
        runtime = ModelRuntime.load(folder, str(device))
    except BundleError as exc:
        raise DataError(str(exc)) from exc
    test = load_imdb(data, cache_dir, data_sha256)["test"]
    ids = encode(runtime.tokenizer, test.texts)
    logits = predict_logits(runtime.model, ids, runtime.truncation, batch_size, device, "evaluate")
    return classification_metrics(test.labels, logits, runtime.temperature), runtime.card
