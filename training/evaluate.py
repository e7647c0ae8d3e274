"""`evaluate`: re-score an exported bundle on the official test set from the bundle alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.batches import predict_logits
from training.bundle import load_bundle
from training.data import load_imdb
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
    """Test-set metrics of the bundle, and its card. Scores go through the bundle's own
    tokenizer and TorchScript file; nothing from the training run or its cache is read."""
    bundle = load_bundle(folder, device)
    test = load_imdb(data, cache_dir, data_sha256)["test"]
    # The bundle's tokenizer already truncates to max_length, as it will in the service.
    ids = encode(bundle.tokenizer, test.texts)
    with torch.no_grad():
        logits = predict_logits(
            bundle.model, ids, bundle.card["max_length"], batch_size, device, "evaluate"
        )
    return classification_metrics(test.labels, logits, bundle.temperature), bundle.card
