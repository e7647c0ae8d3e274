"""The sentiment RNN: embeddings -> stacked (bi)directional RNN -> pooling -> one logit.

Written to compile with ``torch.jit.script``: the exported ``model.pt`` takes right-padded token
ids ``[batch, time]`` (0 = <pad>) and their lengths ``[batch]`` and returns the POSITIVE logit per
review; ``embed`` and ``forward_embedded`` are its two halves, and ``forward_forked`` gives the
same logits with each layer's two directions on two threads (``service.bundle`` format 3).

Padding never changes a review's answer, without packed sequences: the forward direction reads
each review from its start, so trailing padding comes after every state that is used; the
backward direction reads a copy of each review reversed within its own length, so its padding
also comes last. Pooling reads only the valid steps. (Packed sequences give the same result, but
their backward pass on the CPU is about 8x slower than this.)
"""

# No `from __future__ import annotations` here: TorchScript must see `Final` as a type.
import dataclasses
from typing import Any, Final

import numpy as np
import torch
from torch import nn

from service.bundle import PAD_ID
from training.config import ModelConfig

_CELLS: dict[str, type[nn.RNN | nn.LSTM | nn.GRU]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


def reverse_within_lengths(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Reorder time steps of ``x [batch, time, features]`` by ``index [batch, time]``."""
    return x.gather(1, index.unsqueeze(2).expand(-1, -1, x.size(2)))


class RecurrentLayer(nn.Module):
    """One layer: a forward RNN and, if bidirectional, a backward one on reversed reviews."""

    def __init__(self, cell: str, input_size: int, hidden: int, bidirectional: bool) -> None:
        super().__init__()
        self.directions = nn.ModuleList(
            _CELLS[cell](input_size, hidden, batch_first=True)
            for _ in range(2 if bidirectional else 1)
        )

    def forward(
        self, x: torch.Tensor, reverse_index: torch.Tensor, fork: bool = False
    ) -> torch.Tensor:
        """With ``fork``, the backward direction runs on torch's inter-op thread pool while
        the forward one runs here: the same arithmetic, on a second core where one is idle."""
        if fork and len(self.directions) == 2:
            backward = torch.jit.fork(self._backward, x, reverse_index)
            return torch.cat([self._forward(x), torch.jit.wait(backward)], dim=2)
        outputs = [self._forward(x)]
        if len(self.directions) == 2:
            outputs.append(self._backward(x, reverse_index))
        return torch.cat(outputs, dim=2)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for direction, rnn in enumerate(self.directions):  # TorchScript indexes no ModuleList
            if direction == 0:
                out, _ = rnn(x)
        return out

    def _backward(self, x: torch.Tensor, reverse_index: torch.Tensor) -> torch.Tensor:
        out = x
        for direction, rnn in enumerate(self.directions):
            if direction == 1:
                out, _ = rnn(reverse_within_lengths(x, reverse_index))
                # The reordering is its own inverse.
                out = reverse_within_lengths(out, reverse_index)
        return out


class SentimentRNN(nn.Module):
    bidirectional: Final[bool]
    concat_pooling: Final[bool]

    def __init__(self, cfg: ModelConfig, embeddings: np.ndarray) -> None:
        super().__init__()
        vocab_size, embed_dim = embeddings.shape
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.embedding.weight.data.copy_(torch.from_numpy(embeddings))
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        width = cfg.hidden * (2 if cfg.bidirectional else 1)
        self.layers = nn.ModuleList(
            RecurrentLayer(cfg.cell, embed_dim if i == 0 else width, cfg.hidden, cfg.bidirectional)
            for i in range(cfg.layers)
        )
        self.layer_dropout = nn.Dropout(cfg.dropout)
        self.bidirectional = cfg.bidirectional
        self.concat_pooling = cfg.pooling == "concat"
        features = width * (3 if self.concat_pooling else 1)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(features, 1))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.forward_embedded(self.embed_dropout(self.embedding(ids)), lengths)

    @torch.jit.export
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """The word vectors of ``ids [batch, time]``: ``[batch, time, dim]`` (no dropout)."""
        return self.embedding(ids)

    @torch.jit.export
    def forward_forked(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``forward``'s logits with each layer's two directions computed at once, on two
        threads: for a batch that has the CPU to itself (docs/benchmarks.md, "CPU levers")."""
        return self._logits(self.embed_dropout(self.embedding(ids)), lengths, True)

    @torch.jit.export
    def forward_embedded(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The logits from word vectors, so gradients can be taken with respect to them."""
        return self._logits(embedded, lengths, False)

    def _logits(self, embedded: torch.Tensor, lengths: torch.Tensor, fork: bool) -> torch.Tensor:
        # A review with no tokens is read as one <pad> step, so every review has a last state.
        lengths = lengths.to(embedded.device).clamp(min=1, max=embedded.size(1))
        steps = torch.arange(embedded.size(1), device=embedded.device)
        valid = steps[None, :] < lengths[:, None]
        reverse_index = torch.where(valid, lengths[:, None] - 1 - steps[None, :], steps[None, :])

        x = embedded
        for depth, layer in enumerate(self.layers):
            if depth > 0:
                x = self.layer_dropout(x)
            x = layer(x, reverse_index, fork)

        rows = torch.arange(x.size(0), device=x.device)
        last = x[rows, lengths - 1]
        if self.bidirectional:
            # The backward direction ends on the review's first token.
            half = x.size(2) // 2
            last = torch.cat([last[:, :half], x[:, 0, half:]], dim=1)
        features = last
        if self.concat_pooling:
            mask = valid.unsqueeze(2)
            max_pool = x.masked_fill(~mask, float("-inf")).amax(dim=1)
            mean_pool = (x * mask).sum(dim=1) / lengths[:, None].to(x.dtype)
            features = torch.cat([last, max_pool, mean_pool], dim=1)
        return self.head(features).squeeze(1)

    @classmethod
    def from_card(
        cls, architecture: dict[str, Any], state_dict: dict[str, torch.Tensor]
    ) -> "SentimentRNN":
        """The eager network of a bundle (its card's architecture, its model.pt's weights), e.g.
        to convert or quantise it: eager modules are what those tools take."""
        cfg = ModelConfig(**{f.name: architecture[f.name] for f in dataclasses.fields(ModelConfig)})
        shape = (int(architecture["vocab_size"]), int(architecture["embed_dim"]))
        model = cls(cfg, np.zeros(shape, dtype=np.float32))
        model.load_state_dict(state_dict)
        return model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
