"""Short inputs: sentence crops of training reviews, and a short-text validation split.

Users send sentences, not 230-word reviews, and a model trained on whole reviews only learns to
read sentences by accident. Both helpers work on token ids, so they see exactly the words the
model sees: a sentence ends at a token made only of ``.``, ``!`` or ``?`` (the tokenizer keeps
runs of punctuation together, so ``...`` and ``?!`` are single tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.prepare import TokenizedSplit

SHORT_MIN_TOKENS = 4
SHORT_MAX_TOKENS = 40


def sentence_enders(vocab: list[str]) -> np.ndarray:
    """Ids of the tokens that end a sentence."""
    return np.array(
        [i for i, word in enumerate(vocab) if word and set(word) <= set(".!?")], dtype=np.int32
    )


def sentences(ids: np.ndarray, enders: np.ndarray) -> list[np.ndarray]:
    """``ids`` cut after each sentence-ending token; a trailing fragment is a sentence too."""
    ends = np.flatnonzero(np.isin(ids, enders)) + 1
    return [s for s in np.split(ids, ends) if len(s)]


def random_crop(
    ids: np.ndarray, enders: np.ndarray, rng: np.random.Generator, max_sentences: int = 3
) -> np.ndarray:
    """One to ``max_sentences`` consecutive sentences of a review, drawn at random; a review
    without sentence ends gives a random window of 5 to 40 tokens instead."""
    parts = sentences(ids, enders)
    if len(parts) > 1:
        count = int(rng.integers(1, min(max_sentences, len(parts)) + 1))
        start = int(rng.integers(0, len(parts) - count + 1))
        return np.concatenate(parts[start : start + count])
    width = int(rng.integers(5, SHORT_MAX_TOKENS + 1))
    if len(ids) <= width:
        return ids
    start = int(rng.integers(0, len(ids) - width + 1))
    return ids[start : start + width]


def log_count_ratios(split: TokenizedSplit, vocab_size: int, alpha: float = 1.0) -> np.ndarray:
    """Per token id, log P(word | positive) / P(word | negative) over binarised review bags
    (Wang & Manning's NBSVM ratio), from the training reviews only."""
    counts = np.full((2, vocab_size), alpha)
    for ids, label in zip(split.ids, split.labels, strict=True):
        counts[int(label), np.unique(ids)] += 1.0
    return np.log(counts[1] / counts[1].sum()) - np.log(counts[0] / counts[0].sum())


@dataclass(frozen=True)
class ShortSplitRule:
    """Which sentences of the validation reviews form the short-text validation split."""

    min_tokens: int = SHORT_MIN_TOKENS
    max_tokens: int = SHORT_MAX_TOKENS
    # A sentence keeps its review's label only when its own words say so clearly: the summed
    # log-count ratio of its distinct words agrees with the label by at least this much (e^2.5:
    # odds of about 12 to 1 under the training reviews' bag-of-words model).
    min_evidence: float = 2.5
    per_review: int = 2  # the most polar sentences of each review, so long reviews don't dominate


def short_validation(
    val: TokenizedSplit,
    ratios: np.ndarray,
    enders: np.ndarray,
    rule: ShortSplitRule = ShortSplitRule(),
) -> TokenizedSplit:
    """Single sentences of the validation reviews that carry their review's polarity.

    A review's label is a noisy label for any one of its sentences (plot summaries, asides,
    "the first half was awful, but..."). Keeping only sentences whose words lean clearly the
    review's way (judged by a bag-of-words model of the training reviews, which never saw the
    validation reviews) gives sentence labels one can defend without labelling by hand. Its
    bias is stated in docs/model.md: it keeps lexical sentences and drops most negations, which
    the phrase table of tests/training/test_short.py covers instead. Classes are balanced.
    """
    chosen: list[tuple[np.ndarray, int]] = []
    for ids, label in zip(val.ids, val.labels, strict=True):
        sign = 1.0 if label == 1 else -1.0
        scored = []
        for sentence in sentences(ids, enders):
            words = sentence[~np.isin(sentence, enders)]
            if not rule.min_tokens <= len(words) <= rule.max_tokens:
                continue
            evidence = sign * float(ratios[np.unique(words)].sum())
            if evidence >= rule.min_evidence:
                scored.append((evidence, sentence))
        scored.sort(key=lambda pair: -pair[0])
        chosen.extend((sentence, int(label)) for _, sentence in scored[: rule.per_review])
    by_label = [[s for s, y in chosen if y == label] for label in (0, 1)]
    keep = min(map(len, by_label))
    ids_out = by_label[0][:keep] + by_label[1][:keep]
    labels = np.array([0] * keep + [1] * keep, dtype=np.int64)
    return TokenizedSplit(ids_out, labels)
