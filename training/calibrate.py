"""Calibration per length band, and the figures a fine-tuned bundle's card reports.

A review of 230 words and a sentence of 8 give logits of different spreads: one temperature
fitted on reviews leaves sentences' scores off (ECE 0.15 on imdb_labelled.txt with 2.0.0). So
texts of at most ``SHORT_MAX_TOKENS`` tokens get their own temperature, fitted on short
validation texts (``SHORT_BAND``), and longer ones the one fitted on the validation reviews; the
bundle's ``Calibration`` applies them, in the service as here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from service import bundle
from training import augment
from training.batches import predict_logits
from training.data import ReviewSet
from training.finetune import EVAL_BATCH, Splits
from training.metrics import classification_metrics, fit_temperature
from training.model import SentimentRNN
from training.prepare import TokenizedSplit
from training.short import SHORT_MAX_TOKENS
from training.tokenizer import encode

METHOD = (
    f"temperature scaling per length band, fitted on validation log-loss: texts of at most "
    f"{SHORT_MAX_TOKENS} tokens on the short-text validation split and as many "
    "counterfactuals made from validation sentences, longer ones on the validation reviews"
)
SEED = 7


def calibrate_and_score(
    model: SentimentRNN,
    source: bundle.Bundle,
    splits: Splits,
    test: ReviewSet,
    sentences: ReviewSet | None,
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The calibration section and the metrics of every set, with the band temperatures."""
    sets = {
        "validation": splits.val,
        "validation_short": splits.short_val,
        "validation_counterfactual": counterfactuals(source, splits, len(splits.short_val)),
        "test": _ids(source, test),
    }
    if sentences is not None:
        sets["sentences"] = _ids(source, sentences)
    sets = {name: split for name, split in sets.items() if len(split)}
    cpu = torch.device("cpu")
    truncation = source.card.truncation
    logits = {
        name: predict_logits(model, split.ids, truncation, EVAL_BATCH, cpu, name)
        for name, split in sets.items()
    }
    short = [name for name in SHORT_BAND if name in sets]
    short_temperature = None
    if short:  # a tiny data set can have no sentence for it
        short_temperature = fit_temperature(
            np.concatenate([sets[name].labels for name in short]),
            np.concatenate([logits[name] for name in short]),
        )
    calibration = bundle.Calibration(
        method=METHOD if short else "temperature scaling fitted on validation log-loss",
        temperature=fit_temperature(splits.val.labels, logits["validation"]),
        short_temperature=short_temperature,
        short_max_tokens=SHORT_MAX_TOKENS if short else None,
    )
    metrics = {
        name: classification_metrics(
            split.labels, logits[name], calibration.temperatures(split.lengths())
        )
        for name, split in sets.items()
    }
    raw_test = classification_metrics(sets["test"].labels, logits["test"])
    calibration.test_ece_before = raw_test["ece"]
    calibration.test_ece_after = metrics["test"]["ece"]
    return calibration.model_dump(), metrics


# The short band's temperature is fitted on both: the short-text validation split alone holds
# only sentences whose own words give their polarity away (the model reads 98% of them right),
# so a temperature fitted on it alone would make every sentence's score near 0 or 1.
SHORT_BAND = ("validation_short", "validation_counterfactual")


def counterfactuals(source: bundle.Bundle, splits: Splits, count: int) -> TokenizedSplit:
    """Negations and concessions made from the validation reviews' sentences, as training
    makes them from the training reviews' (half each): held-out sentences whose label a rule
    gives, harder than the short-text validation split."""
    pools = augment.build_pools(
        splits.val_texts, splits.val.labels, source.tokenizer, splits.ratios
    )
    rng = np.random.default_rng(SEED)
    samples = augment.negations(pools, count // 2, rng)
    samples += augment.concessions(pools, count - count // 2, rng)
    texts = [text for text, _ in samples]
    return TokenizedSplit(
        encode(source.tokenizer, texts), np.array([label for _, label in samples], dtype=np.int64)
    )


def _ids(source: bundle.Bundle, reviews: ReviewSet) -> TokenizedSplit:
    return TokenizedSplit(encode(source.tokenizer, reviews.texts), np.asarray(reviews.labels))
