"""`migrate`: convert a bundle of an older format to the current one, with the same weights.

Format 2 -> 3: the card is validated by the contract and loses its duplicated fields
(``max_length``, ``files``), and ``model.pt`` gains the ``embed`` and ``forward_embedded``
entry points. A format-3 ``model.pt`` exported before ``forward_forked`` existed gains it.
The network is rebuilt from the card's architecture, loaded with the old file's weights,
checked to give the old file's logits, and exported as training exports it. An int8 variant
was made from the old file, so it is dropped: ``python -m training quantize`` makes it again.
A format-3 bundle with every entry point but no ``model.onnx`` gains that alone: its
``model.pt`` (and so its int8 variant) stays as it is.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from service import bundle
from training.batches import pad_batch
from training.errors import DataError, ExportError
from training.export import TOLERANCE, export_bundle, export_onnx
from training.model import SentimentRNN

CHECK_REVIEWS = 64
# Fields of an older card that the export derives, that format 3 no longer keeps, or (int8)
# that describe a variant made from the old model.pt.
_DROPPED = ("format_version", "max_length", "files", "export", "labels", "parameters", "int8")


def migrate(folder: Path, log: Callable[[str], object] = print) -> Path:
    card_path = folder / bundle.CARD_FILE
    try:
        card: dict[str, Any] = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{card_path} is unreadable: {exc}") from exc
    found = card.get("format_version")
    if found not in (2, bundle.FORMAT_VERSION):
        raise DataError(
            f"{card_path} has format_version {found!r}; migrate converts format 2 and "
            f"completes format {bundle.FORMAT_VERSION}"
        )
    try:
        old = torch.jit.load(str(folder / bundle.MODEL_FILE), map_location="cpu").eval()
        tokenizer = Tokenizer.from_file(str(folder / bundle.TOKENIZER_FILE))
    except Exception as exc:  # torch and tokenizers raise plain exceptions on damaged files
        raise DataError(f"{folder} cannot be read: {exc}") from exc
    model = SentimentRNN.from_card(card["architecture"], old.state_dict())
    truncation = bundle.Truncation.model_validate(card["truncation"])
    check = check_batch(tokenizer.get_vocab_size(), truncation.max_length)
    if found == bundle.FORMAT_VERSION and hasattr(old, bundle.FORKED_ENTRY_POINT):
        if card.get("onnx") is not None and (folder / bundle.ONNX_FILE).is_file():
            log(f"{folder} is already format {bundle.FORMAT_VERSION} with every file")
            return folder
        return _add_onnx(folder, model, check, truncation, log)
    ids, lengths = pad_batch(check, truncation)
    with torch.no_grad():
        diff = float((model(ids, lengths) - old(ids, lengths)).abs().max())
    if not diff <= TOLERANCE:
        raise ExportError(f"the rebuilt network differs from {folder}/model.pt by {diff:.3g}")

    fields = {k: v for k, v in card.items() if k not in _DROPPED}
    fields["migrated_from"] = {"format_version": found, **card.get("export", {})}
    export_bundle(model, tokenizer, folder, check, fields)
    change = f"format {found} -> {bundle.FORMAT_VERSION}"
    if found == bundle.FORMAT_VERSION:
        change = f"gains {bundle.FORKED_ENTRY_POINT}"
    log(
        f"{folder}: {change}, same weights (logits of the old file reproduced within "
        f"{diff:.1g} on {CHECK_REVIEWS} sequences)"
    )
    if "int8" in card:
        log(
            f"{folder}: its int8 variant was made from the old file; make it again with "
            f"`python -m training quantize {folder}`"
        )
    return folder


def _add_onnx(
    folder: Path,
    model: SentimentRNN,
    check: list[np.ndarray],
    truncation: bundle.Truncation,
    log: Callable[[str], object],
) -> Path:
    graph, variant = export_onnx(model, check, truncation)
    source = bundle.sha256(folder / bundle.MODEL_FILE)
    bundle.save_onnx(folder, graph, variant.model_copy(update={"source_sha256": source}))
    log(
        f"{folder}: gains {bundle.ONNX_FILE} from the same weights (ONNX Runtime's logits within "
        f"{variant.max_abs_diff:.1g} of the network's on {CHECK_REVIEWS} sequences)"
    )
    return folder


def check_batch(vocab_size: int, max_length: int) -> list[np.ndarray]:
    """Token sequences of every length from 1 to past ``max_length``: no text is needed to
    compare two networks' arithmetic."""
    rng = np.random.default_rng(0)
    lengths = np.linspace(1, max_length + max_length // 4, CHECK_REVIEWS).astype(int)
    return [rng.integers(2, vocab_size, size=n) for n in lengths]
