"""The optimisation loop: AdamW on BCE-with-logits, early-stopped on a validation metric."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
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


@dataclass(frozen=True)
class _TrainingData:
    train: TokenizedSplit  # the reviews trained on (``train_limit`` of them, if set)
    val: TokenizedSplit
    short_val: TokenizedSplit  # short texts cut from the validation reviews (training.short)
    enders: np.ndarray  # the vocabulary's sentence-ending ids, where crops may start and end

    @classmethod
    def of(cls, prepared: Prepared, cfg: TrainConfig, rng: np.random.Generator) -> _TrainingData:
        val = prepared.splits["val"]
        train_split = prepared.splits["train"].sample(cfg.train_limit, rng)
        vocab = vocabulary(prepared.tokenizer)
        enders = sentence_enders(vocab)
        ratios = log_count_ratios(prepared.splits["train"], len(vocab))
        short_val = short_validation(val, ratios, enders)
        if not len(short_val) and cfg.select_on == "both":
            raise ConfigError(
                "--select-on both needs a short-text validation split; this data has none"
            )
        return cls(train_split, val, short_val, enders)


class _Validation:
    """The validation figures of a model and the score epochs are chosen by (higher: better)."""

    def __init__(self, data: _TrainingData, cfg: TrainConfig, device: torch.device) -> None:
        self.val, self.short_val = data.val, data.short_val
        self.truncation, self.select_on, self.device = cfg.truncation, cfg.select_on, device

    def __call__(self, model: SentimentRNN) -> dict[str, float]:
        """Loss and accuracy on the validation reviews; short_accuracy where there are short
        texts."""
        model.eval()
        val, cut = self.val, self.truncation
        logits = predict_logits(model, val.ids, cut, EVAL_BATCH, self.device, "validate")
        targets = torch.from_numpy(val.labels).float()
        loss = float(
            nn.functional.binary_cross_entropy_with_logits(torch.from_numpy(logits), targets)
        )
        row = {
            "val_loss": round(loss, 5),
            "val_accuracy": round(float(((sigmoid(logits) >= 0.5) == val.labels).mean()), 5),
        }
        if len(self.short_val):
            ids, labels = self.short_val.ids, self.short_val.labels
            short = predict_logits(model, ids, cut, EVAL_BATCH, self.device, "short")
            row["short_accuracy"] = round(float(((short >= 0) == labels).mean()), 5)
        return row

    def score(self, row: dict[str, Any]) -> float:
        if self.select_on == "both":
            return (row["val_accuracy"] + row["short_accuracy"]) / 2
        return row["val_accuracy"] if self.select_on == "accuracy" else -row["val_loss"]


class _Step:
    """One optimisation step on a batch: weighted BCE-with-logits, plus the loss at an
    adversarial offset of the word vectors where ``adv_epsilon`` is set (Miyato et al. 2017),
    mixed precision on CUDA where ``amp`` is set, gradients clipped."""

    def __init__(
        self, model: SentimentRNN, cfg: TrainConfig, embeddings: np.ndarray, device: torch.device
    ) -> None:
        self.model, self.cfg, self.device = model, cfg, device
        optimizer_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        self.optimizer = optimizer_cls(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.loss = nn.BCEWithLogitsLoss(reduction="none")
        # The adversarial step's size is in units of the vectors' spread, so that one setting
        # means the same for 50d GloVe and 150d GloVe + word2vec.
        self.adv_scale = cfg.adv_epsilon * float(np.std(embeddings))
        self.amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

    def __call__(
        self, ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> float:
        """Take the step; the batch's loss."""
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            loss = self._loss(ids, lengths, targets, weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.item())

    def _loss(
        self, ids: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        model = self.model

        def fit(embedded: torch.Tensor) -> torch.Tensor:
            logits = model.forward_embedded(model.embed_dropout(embedded), lengths)
            return (self.loss(logits, targets) * weights).sum() / weights.sum()

        embedded = model.embedding(ids)
        if not self.adv_scale:
            return fit(embedded)
        return adversarial_loss(fit, embedded, self.adv_scale, self.scaler.scale)


def adversarial_loss(
    fit: Callable[[torch.Tensor], torch.Tensor],
    embedded: torch.Tensor,
    scale: float,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
) -> torch.Tensor:
    """``fit``'s loss at the word vectors ``embedded`` plus its loss with each text's vectors
    moved by an L2 norm of ``scale`` along the loss gradient (Miyato et al., ICLR 2017).
    ``scale_loss`` is the mixed-precision scaler's, so that small gradients survive float16."""
    # A zero offset to differentiate against works whether or not the vectors are frozen.
    offset = torch.zeros_like(embedded, requires_grad=True)
    clean = fit(embedded + offset)
    (grad,) = torch.autograd.grad(scale_loss(clean), offset, retain_graph=True)
    grad = torch.nan_to_num(grad.float(), nan=0.0, posinf=0.0, neginf=0.0)
    norm = grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
    return clean + fit(embedded + (scale * grad / norm).to(embedded.dtype))


def train(
    prepared: Prepared,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    log: Any = print,
) -> TrainResult:
    """Fit a model to ``prepared``'s training split, choosing epochs on its validation split;
    each best epoch's weights go to ``checkpoint`` as they come."""
    set_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    data = _TrainingData.of(prepared, cfg, rng)
    model = SentimentRNN(model_cfg, prepared.embeddings).to(device)
    step = _Step(model, cfg, prepared.embeddings, device)
    validate = _Validation(data, cfg, device)
    log(_run_line(model_cfg, cfg, data, device))

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
        train_loss = _train_epoch(model, step, data, cfg, rng, f"epoch {epoch}/{cfg.epochs}")
        row = {
            "epoch": epoch,
            "train_loss": round(train_loss, 5),
            **validate(model),
            "embeddings": "frozen" if frozen else "trainable",
            "seconds": round(time.perf_counter() - epoch_start, 1),
        }
        history.append(row)
        improved = validate.score(row) > best_score
        log(_epoch_line(row) + ("  *best" if improved else ""))
        states[epoch] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if improved:
            best_score, best_epoch = validate.score(row), epoch
            if checkpoint is not None:
                _save_checkpoint(checkpoint, states[epoch], model_cfg, cfg, row)
        elif epoch - best_epoch >= cfg.patience:
            log(f"early stop: no better validation {cfg.select_on} for {cfg.patience} epochs")
            break
        if cfg.max_minutes is not None and time.perf_counter() - started > 60 * cfg.max_minutes:
            log(f"stopped after epoch {epoch}: past --max-minutes {cfg.max_minutes:g}")
            break

    chosen = _choose(model, states, history, best_epoch, validate, cfg.average_top, log)
    seconds = round(time.perf_counter() - started, 1)
    return TrainResult(model.cpu().eval(), chosen, data.short_val, history, seconds, str(device))


def _train_epoch(
    model: SentimentRNN,
    step: _Step,
    data: _TrainingData,
    cfg: TrainConfig,
    rng: np.random.Generator,
    title: str,
) -> float:
    """One pass over this epoch's samples in length-bucketed batches; the mean loss."""
    model.train()
    seqs, labels, weights = _epoch_samples(data.train, cfg, data.enders, rng)
    batches = length_bucketed_batches(
        np.minimum([len(s) for s in seqs], cfg.max_len), cfg.batch_size, rng
    )
    total_loss, seen = 0.0, 0
    bar = tqdm(batches, desc=title, unit=" batches", leave=False)
    for index in bar:
        ids, lengths = pad_batch([seqs[i] for i in index], cfg.truncation)
        targets = torch.from_numpy(labels[index]).float().to(step.device)
        batch_weights = torch.from_numpy(weights[index]).to(step.device)
        loss = step(ids.to(step.device), lengths.to(step.device), targets, batch_weights)
        total_loss += loss * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}")
    return total_loss / seen


def _run_line(
    model_cfg: ModelConfig, cfg: TrainConfig, data: _TrainingData, device: torch.device
) -> str:
    return (
        f"training {model_cfg.cell} x{model_cfg.layers} on {device} ({len(data.train)} reviews "
        f"+ {cfg.crop_fraction:g} crops each, max length {cfg.max_len}, head "
        f"{cfg.truncation.head}, adversarial epsilon {cfg.adv_epsilon:g}); short-text "
        f"validation: {len(data.short_val)} sentences"
    )


def _epoch_line(row: dict[str, Any]) -> str:
    return (
        f"epoch {row['epoch']:>2}  train loss {row['train_loss']:.4f}  val loss "
        f"{row['val_loss']:.4f}  val acc {row['val_accuracy']:.4f}  short acc "
        f"{row.get('short_accuracy', float('nan')):.4f}  {row['seconds']:.1f} s"
    )


def _choose(
    model: SentimentRNN,
    states: dict[int, dict[str, torch.Tensor]],
    history: list[dict[str, Any]],
    best_epoch: int,
    validate: _Validation,
    average_top: int,
    log: Any,
) -> int | str:
    """Load the best epoch's weights, or the average of the ``average_top`` best epochs' where
    that validates better; which was chosen."""
    model.load_state_dict(states[best_epoch])
    epochs = [row for row in history if "epoch" in row]
    ranked = sorted(epochs, key=validate.score, reverse=True)
    top = sorted(r["epoch"] for r in ranked[:average_top])
    if len(top) <= 1:
        return best_epoch
    model.load_state_dict(average_states([states[e] for e in top]))
    averaged = validate(model)
    best = next(r for r in epochs if r["epoch"] == best_epoch)
    better = validate.score(averaged) > validate.score(best)
    log(
        f"average of epochs {top}: val loss {averaged['val_loss']:.4f}  val acc "
        f"{averaged['val_accuracy']:.4f}  short acc "
        f"{averaged.get('short_accuracy', float('nan')):.4f}  "
        f"{'kept: better than' if better else 'dropped: not better than'} epoch {best_epoch}"
    )
    history.append({"average_of": top, **averaged})
    if better:
        return "average of epochs " + ", ".join(map(str, top))
    model.load_state_dict(states[best_epoch])
    return best_epoch


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
