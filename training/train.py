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
from training.short import (
    log_count_ratios,
    random_crop,
    sentence_enders,
    short_validation,
)
from training.tokenizer import vocabulary

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
    short_val: TokenizedSplit  # the short-text validation split (training.short)
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
    vocab = vocabulary(prepared.tokenizer)
    enders = sentence_enders(vocab)
    ratios = log_count_ratios(prepared.splits["train"], len(vocab))
    short_val = short_validation(val, ratios, enders)
    if not len(short_val) and cfg.select_on == "both":
        raise ConfigError(
            "--select-on both needs a short-text validation split; this data has none"
        )

    model = SentimentRNN(model_cfg, prepared.embeddings).to(device)
    optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    weighted_loss = nn.BCEWithLogitsLoss(reduction="none")
    # The adversarial step's size is in units of the vectors' spread, so that one setting means
    # the same for 50d GloVe and 150d GloVe + word2vec.
    adv_scale = cfg.adv_epsilon * float(np.std(prepared.embeddings))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    log(
        f"training {model_cfg.cell} x{model_cfg.layers} on {device} "
        f"({len(train_split)} reviews + {cfg.crop_fraction:g} crops each, max length "
        f"{cfg.max_len}, head {truncation.head}, adversarial epsilon {cfg.adv_epsilon:g}); "
        f"short-text validation: {len(short_val)} sentences"
    )

    def validate() -> dict[str, float]:  # short_accuracy only when there is a short split
        model.eval()
        logits = predict_logits(model, val.ids, truncation, EVAL_BATCH, device, "validate")
        loss = float(loss_fn(torch.from_numpy(logits), torch.from_numpy(val.labels).float()))
        row = {
            "val_loss": round(loss, 5),
            "val_accuracy": round(float(((sigmoid(logits) >= 0.5) == val.labels).mean()), 5),
        }
        if len(short_val):
            short = predict_logits(model, short_val.ids, truncation, EVAL_BATCH, device, "short")
            row["short_accuracy"] = round(float(((short >= 0) == short_val.labels).mean()), 5)
        return row

    def score(row: dict[str, Any]) -> float:  # higher is better
        if cfg.select_on == "both":
            return (row["val_accuracy"] + row["short_accuracy"]) / 2
        return row["val_accuracy"] if cfg.select_on == "accuracy" else -row["val_loss"]

    def step_loss(
        ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        def fit(embedded: torch.Tensor) -> torch.Tensor:
            logits = model.forward_embedded(model.embed_dropout(embedded), lengths)
            return (weighted_loss(logits, targets) * weights).sum() / weights.sum()

        embedded = model.embedding(ids)
        if not adv_scale:
            return fit(embedded)
        # A zero offset to differentiate against works whether or not the vectors are frozen.
        offset = torch.zeros_like(embedded, requires_grad=True)
        clean = fit(embedded + offset)
        (grad,) = torch.autograd.grad(scaler.scale(clean), offset, retain_graph=True)
        grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
        norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
        return clean + fit(embedded + (adv_scale * grad / norm).to(embedded.dtype))

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
        seqs, labels, weights = _epoch_samples(train_split, cfg, enders, rng)
        lengths_all = np.minimum([len(s) for s in seqs], cfg.max_len)
        batches = length_bucketed_batches(lengths_all, cfg.batch_size, rng)
        total_loss, seen = 0.0, 0
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit=" batches", leave=False)
        for index in bar:
            ids, lengths = pad_batch([seqs[i] for i in index], truncation)
            targets = torch.from_numpy(labels[index]).float().to(device)
            batch_weights = torch.from_numpy(weights[index]).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                loss = step_loss(ids.to(device), lengths.to(device), targets, batch_weights)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            total_loss += loss.item() * len(index)
            seen += len(index)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")

        row = {
            "epoch": epoch,
            "train_loss": round(total_loss / seen, 5),
            **validate(),
            "embeddings": "frozen" if frozen else "trainable",
            "seconds": round(time.perf_counter() - epoch_start, 1),
        }
        history.append(row)
        improved = score(row) > best_score
        log(
            f"epoch {epoch:>2}  train loss {row['train_loss']:.4f}  val loss "
            f"{row['val_loss']:.4f}  val acc {row['val_accuracy']:.4f}  short acc "
            f"{row.get('short_accuracy', float('nan')):.4f}  {row['seconds']:.1f} s"
            f"{'  *best' if improved else ''}"
        )
        states[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if improved:
            best_score, best_epoch = score(row), epoch
            if checkpoint is not None:
                _save_checkpoint(checkpoint, states[epoch], model_cfg, cfg, row)
        elif epoch - best_epoch >= cfg.patience:
            log(f"early stop: no better validation {cfg.select_on} for {cfg.patience} epochs")
            break
        if cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes:
            log(f"stopped after epoch {epoch}: past --max-minutes {cfg.max_minutes:g}")
            break

    model.load_state_dict(states[best_epoch])
    chosen: int | str = best_epoch
    ranked = sorted(history, key=score, reverse=True)
    top = sorted(r["epoch"] for r in ranked[: cfg.average_top])
    if len(top) > 1:
        model.load_state_dict(average_states([states[e] for e in top]))
        averaged = validate()
        better = score(averaged) > best_score
        log(
            f"average of epochs {top}: val loss {averaged['val_loss']:.4f}  val acc "
            f"{averaged['val_accuracy']:.4f}  short acc "
            f"{averaged.get('short_accuracy', float('nan')):.4f}  "
            f"{'kept: better than' if better else 'dropped: not better than'} epoch {best_epoch}"
        )
        history.append({"average_of": top, **averaged})
        if better:
            chosen = "average of epochs " + ", ".join(map(str, top))
        else:
            model.load_state_dict(states[best_epoch])
    model.cpu().eval()
    return TrainResult(
        model=model,
        best_epoch=chosen,
        short_val=short_val,
        history=history,
        seconds=round(time.perf_counter() - started, 1),
        device=str(device),
    )


def _epoch_samples(
    split: TokenizedSplit, cfg: TrainConfig, enders: np.ndarray, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """This epoch's training samples: every whole review, then fresh sentence crops of a random
    ``crop_fraction`` of them (drawn again each epoch, so the model sees many crops of a review
    over a run), each with its review's label and ``crop_weight``."""
    seqs, labels = list(split.ids), split.labels
    weights = np.ones(len(seqs), dtype=np.float32)
    crops = round(cfg.crop_fraction * len(seqs))
    if crops:
        sources = rng.choice(len(seqs), crops, replace=crops > len(seqs))
        seqs += [random_crop(split.ids[i], enders, rng) for i in sources]
        labels = np.concatenate([labels, split.labels[sources]])
        weights = np.concatenate([weights, np.full(crops, cfg.crop_weight, dtype=np.float32)])
    return seqs, labels, weights


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
