"""The sentiment RNN: embeddings -> stacked (bi)directional RNN -> pooling -> one logit.

Written to compile with ``torch.jit.script``: the exported ``model.pt`` takes padded token ids
``[batch, time]`` (0 = <pad>) and their lengths ``[batch]`` and returns the POSITIVE logit per
review. Padding never changes a review's answer: sequences are packed, and pooling reads only
each review's own time steps.
"""

# No `from __future__ import annotations` here: TorchScript must see `Final` as a type.
from typing import Final

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from training.config import ModelConfig
from training.tokenizer import PAD_ID

_CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class SentimentRNN(nn.Module):
    bidirectional: Final[bool]
    concat_pooling: Final[bool]

    def __init__(self, cfg: ModelConfig, embeddings: np.ndarray) -> None:
        super().__init__()
        vocab_size, embed_dim = embeddings.shape
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID)
        self.embedding.weight.data.copy_(torch.from_numpy(embeddings))
        self.embed_dropout = nn.Dropout(cfg.embed_dropout)
        self.rnn = _CELLS[cfg.cell](
            embed_dim,
            cfg.hidden,
            num_layers=cfg.layers,
            batch_first=True,
            bidirectional=cfg.bidirectional,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        self.bidirectional = cfg.bidirectional
        self.concat_pooling = cfg.pooling == "concat"
        features = cfg.hidden * (2 if cfg.bidirectional else 1) * (3 if self.concat_pooling else 1)
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(features, 1))

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # A review with no tokens is read as one <pad> step: packing needs length >= 1.
        lengths = lengths.clamp(min=1)
        x = self.embed_dropout(self.embedding(ids))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True)  # [batch, max length, features]
        lengths = lengths.to(out.device)
        rows = torch.arange(out.size(0), device=out.device)
        # The last state is read off the output sequence rather than the cell's hidden state,
        # which has a different type for LSTM and GRU: one forward serves every cell.
        last = out[rows, lengths - 1]
        if self.bidirectional:
            half = out.size(2) // 2
            last = torch.cat([last[:, :half], out[:, 0, half:]], dim=1)
        features = last
        if self.concat_pooling:
            steps = torch.arange(out.size(1), device=out.device)
            valid = (steps[None, :] < lengths[:, None]).unsqueeze(2)
            max_pool = out.masked_fill(~valid, float("-inf")).amax(dim=1)
            mean_pool = (out * valid).sum(dim=1) / lengths[:, None].to(out.dtype)
            features = torch.cat([last, max_pool, mean_pool], dim=1)
        return self.head(features).squeeze(1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
