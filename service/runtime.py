"""The model runtime: load a bundle, then preprocess, infer and postprocess, as the stages of
TorchServe's base handler. No HTTP here: the batcher and the tests call it directly.

The bundle format is defined by ``training/bundle.py``: ``model.pt`` (TorchScript, ids and
lengths in, POSITIVE logits out), ``tokenizer.json`` and ``card.json`` (labels, calibration and
the truncation rule).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tokenizers import Tokenizer

from service.errors import BundleError
from service.truncation import Truncation

SUPPORTED_FORMATS = (2,)
ScoreFunction = Literal["sigmoid", "softmax", "none"]


@dataclass(frozen=True)
class Encoded:
    """One text as the model will read it."""

    ids: np.ndarray  # int64 token ids, already cut by the bundle's truncation rule
    original_tokens: int  # tokens before truncation


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BundleError(f"device {name!r} requested but CUDA is not available")
    return device


class ModelRuntime:
    def __init__(
        self,
        folder: Path,
        model: torch.jit.ScriptModule,
        tokenizer: Tokenizer,
        card: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.folder = folder
        self.model = model
        self.tokenizer = tokenizer
        self.card = card
        self.device = device
        self.name: str = card["name"]
        self.version: str = str(card.get("version", "0"))
        self.truncation = Truncation.from_card(card)
        self.max_length = self.truncation.max_length
        self.negative, self.positive = card["labels"]
        self.temperature = float(card.get("calibration", {}).get("temperature", 1.0))

    # -- load -------------------------------------------------------------------------------
    @classmethod
    def load(cls, folder: Path, device: str = "auto") -> ModelRuntime:
        """Load and check a bundle; every way it can be unusable is one ``BundleError``."""
        if not folder.is_dir():
            raise BundleError(f"model bundle not found: {folder} is not a folder")
        missing = [
            f for f in ("model.pt", "tokenizer.json", "card.json") if not (folder / f).is_file()
        ]
        if missing:
            raise BundleError(f"model bundle {folder} lacks {', '.join(missing)}")
        try:
            card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
            if card.get("format_version") not in SUPPORTED_FORMATS:
                raise BundleError(
                    f"{folder}/card.json has format_version {card.get('format_version')!r}; "
                    f"this service reads {SUPPORTED_FORMATS}"
                )
            labels, name = card["labels"], card["name"]
            Truncation.from_card(card)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{folder}/card.json is unreadable or incomplete: {exc!r}") from exc
        if len(labels) != 2 or not name:
            raise BundleError(f"{folder}/card.json must name two labels and the model")
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises plain Exception
            raise BundleError(f"{folder}/tokenizer.json cannot be loaded: {exc}") from exc
        if tokenizer.truncation is not None:
            raise BundleError(
                f"{folder}/tokenizer.json truncates by itself; the card's truncation rule must "
                "be the only one"
            )
        torch_device = resolve_device(device)
        try:
            model = torch.jit.load(str(folder / "model.pt"), map_location=torch_device).eval()
        except Exception as exc:  # torch raises RuntimeError or worse on a damaged archive
            raise BundleError(
                f"{folder}/model.pt is not a loadable TorchScript file: {exc}"
            ) from exc
        rows = _embedding_rows(model)
        if rows is not None and tokenizer.get_vocab_size() > rows:
            raise BundleError(
                f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} words but the model's "
                f"embedding table has {rows} rows; tokenizer.json and model.pt do not match"
            )
        return cls(folder, model, tokenizer, card, torch_device)

    # -- preprocess -------------------------------------------------------------------------
    def preprocess(self, texts: list[str]) -> list[Encoded]:
        """Tokenise, then cut longer texts by the card's truncation rule."""
        encoded = []
        for enc in self.tokenizer.encode_batch(texts):
            ids = np.asarray(enc.ids, dtype=np.int64)
            encoded.append(Encoded(self.truncation.apply(ids), len(ids)))
        return encoded

    # -- infer ------------------------------------------------------------------------------
    def infer(self, seqs: list[np.ndarray]) -> np.ndarray:
        """POSITIVE logits for one batch of token-id sequences (right-padded here)."""
        width = max(1, max(len(s) for s in seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.from_numpy(seq)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        # TorchScript modules reject inference_mode; no_grad is the equivalent here.
        with torch.no_grad():
            logits = self.model(ids.to(self.device), lengths.to(self.device))
        return logits.float().cpu().numpy()

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run the model on a few shapes so the first requests do not pay for lazy set-up."""
        rng = np.random.default_rng(0)
        vocab = self.tokenizer.get_vocab_size()
        for size in batch_sizes:
            for length in (16, self.max_length):
                self.infer([rng.integers(2, vocab, size=length) for _ in range(size)])

    # -- postprocess ------------------------------------------------------------------------
    def postprocess(
        self, logit: float, function: ScoreFunction = "sigmoid"
    ) -> list[tuple[str, float]]:
        """Labels and scores, best first. The logit is divided by the card's temperature first,
        so 'sigmoid' and 'softmax' (identical for one logit) give calibrated probabilities and
        'none' gives calibrated log-odds (POSITIVE: z, NEGATIVE: -z)."""
        z = logit / self.temperature
        if function == "none":
            scores = {self.positive: z, self.negative: -z}
        else:
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            scores = {self.positive: p, self.negative: 1.0 - p}
        return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "device": str(self.device),
            "max_length": self.max_length,
            "truncation": self.truncation.describe(),
            "labels": [self.negative, self.positive],
            "temperature": self.temperature,
            "parameters": self.card.get("parameters"),
            "architecture": self.card.get("architecture"),
            "metrics": self.card.get("metrics"),
        }


def _embedding_rows(model: torch.jit.ScriptModule) -> int | None:
    for name, tensor in model.state_dict().items():
        if name.endswith("embedding.weight"):
            return int(tensor.shape[0])
    return None
