"""Padding and length-grouped batching of token-id sequences."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from service.bundle import Truncation, pad

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pad_batch(
    seqs: Sequence[np.ndarray], truncation: Truncation
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each sequence by the bundle's truncation rule, then pad as the bundle's ``forward``
    expects (the service applies the same rule to what the exported tokenizer returns)."""
    return pad([truncation.apply(s) for s in seqs])


def length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, rng: np.random.Generator, bucket_batches: int = 50
) -> list[np.ndarray]:
    """Shuffled batches of similar length: a random window of ``bucket_batches`` batches is
    sorted by length before it is cut, so little compute goes to padding while the order of
    batches (and which reviews meet) still changes every epoch."""
    order = rng.permutation(len(lengths))
    window = batch_size * bucket_batches
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


@torch.no_grad()
def predict_logits(
    model: Model,
    seqs: Sequence[np.ndarray],
    truncation: Truncation,
    batch_size: int,
    device: torch.device,
    desc: str = "predict",
) -> np.ndarray:
    """Logits in the order of ``seqs``; batches are formed in length order to save padding."""
    lengths = np.array([min(len(s), truncation.max_length) for s in seqs])
    order = np.argsort(lengths, kind="stable")
    logits = np.empty(len(seqs), dtype=np.float32)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit=" batches", leave=False):
        index = order[start : start + batch_size]
        ids, lens = pad_batch([seqs[i] for i in index], truncation)
        logits[index] = model(ids.to(device), lens).float().cpu().numpy()
    return logits
