"""The model bundle: the contract between `training` and `service`.

``models/<name>/`` holds three files and nothing else is needed to serve or re-score it:

- ``model.pt``: TorchScript; ``forward(ids int64 [batch, time], lengths int64 [batch])`` returns
  the POSITIVE logit ``float32 [batch]``; id 0 is padding.
- ``tokenizer.json``: the Hugging Face tokenizer (normaliser, pre-tokenizer, vocabulary); it
  does not truncate, because its truncation cannot keep a text's tail.
- ``card.json``: what the model is, how it was made and how well it does; its
  ``calibration.temperature`` divides the logit before the sigmoid and its ``truncation``
  (``service.truncation.Truncation``) says which tokens of a longer text the model reads.

Reading a bundle is the service's job (``service.runtime.ModelRuntime.load``); `evaluate` uses
that same loader, so a card is re-checked through the code that serves it.
"""

from __future__ import annotations

import json
import platform
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from service.truncation import Truncation
from training.batches import pad_batch
from training.errors import ExportError
from training.model import SentimentRNN, count_parameters

MODEL_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "card.json"
FORMAT_VERSION = 2  # 2: truncation moved from tokenizer.json to the card (head + tail)
LABELS = ("NEGATIVE", "POSITIVE")
EXPORT_TOLERANCE = 1e-5


def export_bundle(
    model: SentimentRNN,
    tokenizer: Tokenizer,
    truncation: Truncation,
    folder: Path,
    check_batch: list[np.ndarray],
    card: dict[str, Any],
) -> Path:
    """Script, save and verify the model; write tokenizer and card; move into ``folder``."""
    model = model.cpu().eval()
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    torch.jit.script(model).save(str(partial / MODEL_FILE))
    max_diff = _verify_round_trip(model, partial / MODEL_FILE, check_batch, truncation)

    served = Tokenizer.from_str(tokenizer.to_str())
    served.no_truncation()
    served.save(str(partial / TOKENIZER_FILE))

    card = {
        "format_version": FORMAT_VERSION,
        **card,
        "labels": list(LABELS),
        "max_length": truncation.max_length,
        "truncation": truncation.describe(),
        "parameters": count_parameters(model),
        "files": {"model": MODEL_FILE, "tokenizer": TOKENIZER_FILE},
        "export": {
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torchscript_max_abs_diff": max_diff,
        },
    }
    (partial / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")

    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _verify_round_trip(
    model: SentimentRNN, path: Path, seqs: list[np.ndarray], truncation: Truncation
) -> float:
    """Reload the saved file and compare its logits with the eager model's on real reviews."""
    ids, lengths = pad_batch(seqs, truncation)
    with torch.no_grad():
        eager = model(ids, lengths)
        loaded = torch.jit.load(str(path), map_location="cpu")(ids, lengths)
    max_diff = float((eager - loaded).abs().max())
    if not max_diff <= EXPORT_TOLERANCE:  # also catches NaN
        raise ExportError(
            f"TorchScript export differs from the trained model by {max_diff:.3g} "
            f"(tolerance {EXPORT_TOLERANCE}); {path} is not a faithful copy"
        )
    return max_diff
