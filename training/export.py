"""Export: the trained network -> TorchScript, checked against the eager model entry point by
entry point, then written as a bundle through the contract (``service.bundle.save``)."""

from __future__ import annotations

import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from service import bundle
from training.batches import pad_batch
from training.errors import ExportError
from training.model import SentimentRNN, count_parameters

TOLERANCE = 1e-5


def export_bundle(
    model: SentimentRNN,
    tokenizer: Tokenizer,
    folder: Path,
    check_batch: list[np.ndarray],
    card: dict[str, Any],
) -> Path:
    """Script and verify ``model``, then save it with ``tokenizer`` and its card into
    ``folder``. ``card`` holds the training run's fields; the export adds the rest."""
    model = model.cpu().eval()
    truncation = bundle.Truncation.model_validate(card["truncation"])
    scripted = torch.jit.script(model)
    diffs = verify_entry_points(model, bundle.round_trip(scripted), check_batch, truncation)
    try:
        validated = bundle.Card.model_validate(
            {
                **card,
                "format_version": bundle.FORMAT_VERSION,
                "labels": bundle.LABELS,
                "parameters": count_parameters(model),
                "export": {
                    "torch_version": torch.__version__,
                    "python_version": platform.python_version(),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "max_abs_diff": diffs,
                },
            }
        )
    except ValidationError as exc:
        raise ExportError(f"the card does not meet the bundle contract: {exc}") from exc
    try:
        return bundle.save(folder, scripted, tokenizer, validated)
    except bundle.BundleError as exc:
        raise ExportError(f"the written bundle does not load: {exc}") from exc


def verify_entry_points(
    model: SentimentRNN,
    exported: torch.jit.ScriptModule,
    seqs: list[np.ndarray],
    truncation: bundle.Truncation,
) -> dict[str, float]:
    """Compare every entry point of ``exported`` with ``model`` on real reviews: the largest
    absolute difference per entry point. Any above the tolerance is an ``ExportError``."""
    ids, lengths = pad_batch(seqs, truncation)
    with torch.no_grad():
        embedded = model.embed(ids)
        diffs = {
            "forward": _diff(model(ids, lengths), exported(ids, lengths)),
            "embed": _diff(embedded, exported.embed(ids)),
            "forward_embedded": _diff(
                model.forward_embedded(embedded, lengths),
                exported.forward_embedded(embedded, lengths),
            ),
            # Against the eager forward: the forked directions must change nothing.
            bundle.FORKED_ENTRY_POINT: _diff(
                model(ids, lengths), exported.forward_forked(ids, lengths)
            ),
        }
    bad = {name: d for name, d in diffs.items() if not d <= TOLERANCE}  # `not <=` catches NaN
    if bad:
        raise ExportError(
            f"the TorchScript export differs from the model ({bad}, tolerance {TOLERANCE}); "
            "it is not a faithful copy"
        )
    return diffs


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())
