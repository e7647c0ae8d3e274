"""`finetune`: teach a trained bundle to read sentences, within a CPU's reach.

Starts from a bundle's weights (its tokenizer and truncation unchanged) and trains on short
texts made from the training reviews (`training.augment`: crops, counterfactual negations,
concessions), mixed with whole training reviews so that the long-review reading is kept, each
batch also fitted at an adversarial offset of its word vectors as the source was. Person
names, nationalities and third-person pronouns are tied in the embedding table (names and
nationalities to ``<unk>``, each pronoun group to one row), so a swap of them cannot move a
score. Each epoch is scored on the validation reviews, the short-text validation split and the
behaviour suite's dev half; the best epoch by their mean, or a mix of it with the source's
weights that scores better, is exported through the same path as `train`, calibrated per length
band (docs/model.md, "Reading sentences").
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from service import bundle
from training import augment, behaviour
from training.batches import length_bucketed_batches, pad_batch, predict_logits
from training.config import FinetuneConfig
from training.data import ReviewSet, stratified_split
from training.metrics import fit_temperature, sigmoid
from training.model import SentimentRNN
from training.prepare import TokenizedSplit
from training.short import log_count_ratios, sentence_enders, short_validation
from training.tokenizer import UNK_ID, encode, vocabulary
from training.train import adversarial_loss

EVAL_BATCH = 256


@dataclass
class Splits:
    """The source bundle's training and validation reviews, as text and as ids."""

    train_texts: list[str]
    val_texts: list[str]
    train: TokenizedSplit
    val: TokenizedSplit
    short_val: TokenizedSplit
    ratios: np.ndarray


def load_splits(card: bundle.Card, tokenizer: Any, reviews: ReviewSet) -> Splits:
    """The official train ``reviews`` cut as the source bundle was trained and validated on:
    the validation split is recomputed from its card's split options, so it stays unseen."""
    options = card.data.get("prepare", {})
    train_idx, val_idx = stratified_split(
        reviews.labels, float(options.get("val_fraction", 0.1)), int(options.get("split_seed", 13))
    )
    train, val = reviews.subset(train_idx), reviews.subset(val_idx)
    train_ids = TokenizedSplit(encode(tokenizer, train.texts), train.labels)
    val_ids = TokenizedSplit(encode(tokenizer, val.texts), val.labels)
    vocab = vocabulary(tokenizer)
    ratios = log_count_ratios(train_ids, len(vocab))
    short_val = short_validation(val_ids, ratios, sentence_enders(vocab))
    return Splits(train.texts, val.texts, train_ids, val_ids, short_val, ratios)


def tie(weight: torch.Tensor, groups: dict[str, list[int]], grad: bool = False) -> None:
    """Make each group's rows one: names and nationalities to the ``<unk>`` row, pronoun
    groups to their mean. With ``grad``, the same on the rows' gradients (summed), so that
    AdamW moves tied rows alike and they stay equal."""
    target = weight.grad if grad else weight.data
    if target is None:
        return
    with torch.no_grad():
        for name, ids in groups.items():
            if not ids:
                continue
            if name in ("names", "nationalities"):
                rows = [UNK_ID, *ids]
                value = target[rows].sum(0) if grad else target[UNK_ID].clone()
                target[rows] = value
            else:
                target[ids] = target[ids].sum(0) if grad else target[ids].mean(0)


def finetune(
    source: Path,
    cfg: FinetuneConfig,
    reviews: ReviewSet,
    log: Any = print,
) -> tuple[SentimentRNN, dict[str, Any], Splits, bundle.Bundle]:
    """Fine-tune ``source``'s network; returns the chosen weights (eval mode, CPU), the
    training record for the card, the splits and the loaded source bundle."""
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = bundle.load(source, "cpu", "float32")
    card, tokenizer = loaded.card, loaded.tokenizer
    splits = load_splits(card, tokenizer, reviews)
    pools = augment.build_pools(splits.train_texts, splits.train.labels, tokenizer, splits.ratios)
    groups = augment.tied_groups(vocabulary(tokenizer), splits.train_texts) if cfg.tie_words else {}
    log(
        f"fine-tuning {source} ({card.version}): {len(pools.polar)} polar and "
        f"{len(pools.negated)} negated training sentences; tied: "
        + ", ".join(f"{k} {len(v)}" for k, v in groups.items())
    )

    model = SentimentRNN.from_card(card.architecture.model_dump(), loaded.model.state_dict())
    tie(model.embedding.weight, groups)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def validate() -> dict[str, Any]:
        return score_on_validation(model, splits, loaded)

    started = time.perf_counter()
    history = [{"epoch": 0, **validate()}]
    log(f"source     {history[0]}")
    states = {0: {k: v.clone() for k, v in model.state_dict().items()}}
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        seqs, labels = _epoch_samples(splits, pools, cfg, tokenizer, rng)
        loss = _train_epoch(model, optimizer, seqs, labels, loaded, cfg, groups, rng, epoch)
        row = {"epoch": epoch, "train_loss": loss, "samples": len(seqs), **validate()}
        history.append({**row, "seconds": round(time.perf_counter() - epoch_start, 1)})
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        log(f"epoch {epoch:>2}  {history[-1]}")

    best = _choose(model, states, history, cfg.interpolate, validate, log)
    record = {
        "fine_tuned_from": {
            "name": card.name,
            "version": card.version,
            "model_sha256": bundle.sha256(source / bundle.MODEL_FILE),
        },
        "best_epoch": best["epoch"],
        "interpolation": best.get("interpolation", 1.0),
        "seconds": round(time.perf_counter() - started, 1),
        "history": history,
        "tied_words": {k: len(v) for k, v in groups.items()},
        "device": "cpu",
    }
    return model, record, splits, loaded


def _choose(
    model: SentimentRNN,
    states: dict[int, dict[str, torch.Tensor]],
    history: list[dict[str, Any]],
    shares: tuple[float, ...],
    validate: Any,
    log: Any,
) -> dict[str, Any]:
    """Load the best epoch's weights, or a mix of them with the source's (epoch 0) that scores
    better, into ``model``; the chosen row of ``history`` (mixes are added to it)."""
    best = max(history, key=lambda r: r["score"])
    chosen = states[best["epoch"]]
    # Weight-space interpolation with the source (WiSE-FT, Wortsman et al., CVPR 2022): the
    # fine-tuned weights drift from what whole reviews taught; part of the way back can keep
    # most of the new reading and more of the old.
    for share in shares if best["epoch"] else ():
        mixed = {k: (1 - share) * states[0][k] + share * v for k, v in chosen.items()}
        model.load_state_dict(mixed)
        row = {"epoch": best["epoch"], "interpolation": share, **validate()}
        log(f"mixed      {row}")
        history.append(row)
        if row["score"] > best["score"]:
            best, chosen = row, mixed
    model.load_state_dict(chosen)
    model.eval()
    return best


def score_on_validation(
    model: SentimentRNN, splits: Splits, source: bundle.Bundle
) -> dict[str, Any]:
    """What chooses between epochs and mixes: accuracy on the validation reviews and on the
    short-text validation split, the suite's dev half (scored with a temperature fitted on the
    validation reviews), and their mean."""
    model.eval()
    cpu, truncation = torch.device("cpu"), source.card.truncation
    val = predict_logits(model, splits.val.ids, truncation, EVAL_BATCH, cpu)
    short = predict_logits(model, splits.short_val.ids, truncation, EVAL_BATCH, cpu)
    temperature = fit_temperature(splits.val.labels, val)

    def probabilities(texts: list[str]) -> np.ndarray:
        ids = encode(source.tokenizer, texts)
        return sigmoid(predict_logits(model, ids, truncation, EVAL_BATCH, cpu) / temperature)

    row = {
        "val_accuracy": round(float(((val >= 0) == splits.val.labels).mean()), 5),
        "short_accuracy": round(float(((short >= 0) == splits.short_val.labels).mean()), 5),
        "suite_dev": behaviour.summary(behaviour.run(probabilities, "dev"))["mean_pass_rate"],
    }
    row["score"] = round((row["val_accuracy"] + row["short_accuracy"] + row["suite_dev"]) / 3, 5)
    return row


def _train_epoch(
    model: SentimentRNN,
    optimizer: torch.optim.Optimizer,
    seqs: list[np.ndarray],
    labels: np.ndarray,
    source: bundle.Bundle,
    cfg: FinetuneConfig,
    groups: dict[str, list[int]],
    rng: np.random.Generator,
    epoch: int,
) -> float:
    """One pass over ``seqs`` in length-bucketed batches; the mean training loss."""
    model.train()
    truncation = source.card.truncation
    adv_scale = cfg.adv_epsilon * float(model.embedding.weight.detach().std())
    lengths = np.minimum([len(s) for s in seqs], truncation.max_length)
    total, seen = 0.0, 0
    batches = length_bucketed_batches(lengths, cfg.batch_size, rng)
    bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit=" batches", leave=False)
    for index in bar:
        ids, lens = pad_batch([seqs[i] for i in index], truncation)
        if cfg.unk_rate:
            noise = (torch.rand(ids.shape) < cfg.unk_rate) & (ids != bundle.PAD_ID)
            ids = ids.masked_fill(noise, UNK_ID)
        loss = _loss(model, ids, lens, torch.from_numpy(labels[index]).float(), adv_scale)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        tie(model.embedding.weight, groups, grad=True)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
        optimizer.step()
        tie(model.embedding.weight, groups)
        total += loss.item() * len(index)
        seen += len(index)
        bar.set_postfix(loss=f"{total / seen:.4f}")
    return round(total / seen, 5)


def _loss(
    model: SentimentRNN,
    ids: torch.Tensor,
    lengths: torch.Tensor,
    targets: torch.Tensor,
    adv_scale: float,
) -> torch.Tensor:
    """The batch's BCE-with-logits, plus its adversarial term where ``adv_scale`` is set."""

    def fit(embedded: torch.Tensor) -> torch.Tensor:
        logits = model.forward_embedded(model.embed_dropout(embedded), lengths)
        return nn.functional.binary_cross_entropy_with_logits(logits, targets)

    embedded = model.embedding(ids)
    return adversarial_loss(fit, embedded, adv_scale) if adv_scale else fit(embedded)


def _epoch_samples(
    splits: Splits,
    pools: augment.Pools,
    cfg: FinetuneConfig,
    tokenizer: Any,
    rng: np.random.Generator,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Fresh short texts from every generator, and a random subset of whole reviews."""
    texts: list[str] = []
    labels: list[int] = []
    for name, count in (
        ("crops", cfg.crops),
        ("negations", cfg.negations),
        ("concessions", cfg.concessions),
    ):
        for text, label in augment.GENERATORS[name](pools, count, rng):
            texts.append(text)
            labels.append(label)
    seqs = encode(tokenizer, texts)
    pick = rng.choice(len(splits.train), min(cfg.reviews, len(splits.train)), replace=False)
    seqs += [splits.train.ids[i] for i in pick]
    all_labels = np.concatenate([np.array(labels, dtype=np.int64), splits.train.labels[pick]])
    return seqs, all_labels
