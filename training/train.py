"""The optimisation loop: AdamW on BCE-with-logits, early-stopped on a validation metric."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service import bundle
from training.batches import length_bucketed_batches, pad_batch, predict_logits
from training.config import ModelConfig, TrainConfig, to_jsonable
from training.errors import ConfigError
from training.metrics import sigmoid
from training.model import SentimentRNN
from training.prepare import Prepared, TokenizedSplit

EVAL_BATCH = 256


def set_seed(seed: int) -> None:
    """Seed every generator training draws from; on CPU a run is then reproducible exactly."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(name: str) -> torch.device:
    """The bundle contract's device names (auto, cpu, cuda, cuda:N), as a training error."""
    try:
        return bundle.resolve_device(name)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


@dataclass
class TrainResult:
    model: SentimentRNN  # the chosen weights, on the CPU, in eval mode
    best_epoch: int | str  # the chosen epoch, or which epochs were averaged
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"


def train(
    prepared: Prepared,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    log: Any = print,
) -> TrainResult:
    set_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    train_split = prepared.splits["train"]
    if cfg.train_limit and cfg.train_limit < len(train_split):
        keep = np.sort(rng.choice(len(train_split), cfg.train_limit, replace=False))
        train_split = TokenizedSplit([train_split.ids[i] for i in keep], train_split.labels[keep])
    val = prepared.splits["val"]
    truncation = cfg.truncation
    train_lengths = np.minimum(train_split.lengths(), cfg.max_len)

    model = SentimentRNN(model_cfg, prepared.embeddings).to(device)
    optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log(
        f"training {model_cfg.cell} x{model_cfg.layers} on {device} "
        f"({len(train_split)} reviews, max length {cfg.max_len}, head {truncation.head})"
    )

    def validate() -> tuple[float, float]:
        model.eval()
        logits = predict_logits(model, val.ids, truncation, EVAL_BATCH, device, "validate")
        loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(val.labels).float()))
        return loss, float(((sigmoid(logits) >= 0.5) == val.labels).mean())

    def score(loss: float, accuracy: float) -> float:  # higher is better
        return accuracy if cfg.select_on == "accuracy" else -loss

    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    # Every epoch's weights stay on the CPU (20 MB each for the default model) so that the k
    # best can be averaged at the end.
    states: dict[int, dict[str, torch.Tensor]] = {}
    best_score, best_epoch = float("-inf"), 0
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        # Fine-tuning 50d vectors from the first step lets the random head's gradients wreck
        # them; a frozen warm-up epoch lets the RNN fit the vectors first.
        frozen = cfg.freeze_embeddings_epochs == -1 or epoch <= cfg.freeze_embeddings_epochs
        model.embedding.weight.requires_grad_(not frozen)

        model.train()
        batches = length_bucketed_batches(train_lengths, cfg.batch_size, rng)
        total_loss, seen = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit=" batches", leave=False)
        for index in bar:
            ids, lengths = pad_batch([train_split.ids[i] for i in index], truncation)
            targets = torch.from_numpy(train_split.labels[index]).float().to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(model(ids.to(device), lengths), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")

        val_loss, val_acc = validate()
        row = {
            "epoch": epoch,
            "train_loss": round(total_loss / seen, 5),
            "val_loss": round(val_loss, 5),
            "val_accuracy": round(val_acc, 5),
            "embeddings": "frozen" if frozen else "trainable",
            "seconds": round(time.perf_counter() - epoch_start, 1),
        }
        history.append(row)
        improved = score(val_loss, val_acc) > best_score
        log(
            f"epoch {epoch:>2}  train loss {row['train_loss']:.4f}  val loss {val_loss:.4f}  "
            f"val acc {val_acc:.4f}  {row['seconds']:.1f} s{'  *best' if improved else ''}"
        )
        states[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if improved:
            best_score, best_epoch = score(val_loss, val_acc), epoch
            if checkpoint is not None:
                _save_checkpoint(checkpoint, states[epoch], model_cfg, cfg, row)
        elif epoch - best_epoch >= cfg.patience:
            log(f"early stop: no better validation {cfg.select_on} for {cfg.patience} epochs")
            break

    model.load_state_dict(states[best_epoch])
    chosen: int | str = best_epoch
    ranked = sorted(history, key=lambda r: score(r["val_loss"], r["val_accuracy"]), reverse=True)
    top = sorted(r["epoch"] for r in ranked[: cfg.average_top])
    if len(top) > 1:
        model.load_state_dict(average_states([states[e] for e in top]))
        avg_loss, avg_acc = validate()
        better = score(avg_loss, avg_acc) > best_score
        log(
            f"average of epochs {top}: val loss {avg_loss:.4f}  val acc {avg_acc:.4f}  "
            f"{'kept: better than' if better else 'dropped: not better than'} epoch {best_epoch}"
        )
        history.append(
            {"average_of": top, "val_loss": round(avg_loss, 5), "val_accuracy": round(avg_acc, 5)}
        )
        if better:
            chosen = "average of epochs " + ", ".join(map(str, top))
        else:
            model.load_state_dict(states[best_epoch])
    model.cpu().eval()
    return TrainResult(
        model=model,
        best_epoch=chosen,
        history=history,
        seconds=round(time.perf_counter() - started, 1),
        device=str(device),
    )


def average_states(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of floating-point weights (integer buffers come from the first)."""
    return {
        name: (
            torch.stack([s[name] for s in states]).mean(dim=0)
            if tensor.is_floating_point()
            else tensor
        )
        for name, tensor in states[0].items()
    }


def _save_checkpoint(
    path: Path,
    state: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    row: dict[str, Any],
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "state_dict": state,
        "model": to_jsonable(model_cfg),
        "train": to_jsonable(cfg),
        "epoch": row,
    }
    torch.save(payload, path)
