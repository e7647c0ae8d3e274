"""The model runtime: a loaded bundle, then preprocess, infer and postprocess, as the stages of
TorchServe's base handler. No HTTP here: the batcher, the benchmark's peers and the tests call
it directly."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from service import bundle

ScoreFunction = Literal["sigmoid", "softmax", "none"]


@dataclass(frozen=True)
class Encoded:
    """One text as the model will read it."""

    ids: np.ndarray  # int64 token ids, already cut by the bundle's truncation rule
    original_tokens: int  # tokens before truncation


class ModelRuntime:
    def __init__(self, loaded: bundle.Bundle) -> None:
        self.bundle = loaded
        self.card = loaded.card
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.dtype = loaded.dtype
        # On CUDA a batch goes to the device from pinned (page-locked) host memory without
        # blocking; the copy of the logits back is the one synchronisation per batch.
        self._pin = loaded.device.type == "cuda"
        self.truncation = loaded.card.truncation
        self.temperature = loaded.card.calibration.temperature
        self.negative, self.positive = loaded.card.labels

    @classmethod
    def load(
        cls, folder: Path, device: str | torch.device = "auto", dtype: bundle.Dtype = "float32"
    ) -> ModelRuntime:
        """``bundle.load`` (a ``BundleError`` for every way it can be unusable), wrapped."""
        return cls(bundle.load(folder, device, dtype))

    @property
    def dtype_name(self) -> str:
        """``float32``, ``float16`` or ``bfloat16``, as ``SENTIMENT_DTYPE`` names it."""
        return str(self.dtype).removeprefix("torch.")

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
        """POSITIVE logits for one batch of token-id sequences."""
        ids, lengths = bundle.pad(seqs)
        if self._pin:
            ids, lengths = ids.pin_memory(), lengths.pin_memory()
        # TorchScript modules reject inference_mode; no_grad is the equivalent here.
        with torch.no_grad():
            logits = self.model(
                ids.to(self.device, non_blocking=True), lengths.to(self.device, non_blocking=True)
            )
        return logits.float().cpu().numpy()

    def cuda_memory(self) -> dict[str, int] | None:
        """Bytes torch holds on the model's CUDA device (None on a CPU): allocated to tensors
        now, reserved by its caching allocator, and the peak allocated since start."""
        if self.device.type != "cuda":
            return None
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
        }

    def warmup(self, batch_sizes: tuple[int, ...] = (1, 8, 64)) -> None:
        """Run the model on a few shapes so the first requests do not pay for lazy set-up."""
        rng = np.random.default_rng(0)
        vocab = self.tokenizer.get_vocab_size()
        for size in batch_sizes:
            for length in (16, self.truncation.max_length):
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
