"""Augmentations that teach reading, and the words read as one (training.augment, finetune)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training import augment
from training.finetune import tie
from training.tokenizer import UNK_ID


@pytest.mark.parametrize(
    ("sentence", "negated"),
    [
        (
            "The plot was dull.",
            {"The plot was not dull.", "The plot wasn't dull.", "The plot was never dull."},
        ),
        (
            "Its songs are lovely and sad.",
            {
                "Its songs are not lovely and sad.",
                "Its songs aren't lovely and sad.",
                "Its songs are never lovely and sad.",
            },
        ),
    ],
)
def test_negation_is_inserted_after_the_copula(sentence: str, negated: set[str]):
    """If this fails, the counterfactual negations train on texts that say something else."""
    rng = np.random.default_rng(0)
    assert {augment.insert_negation(sentence, rng) for _ in range(40)} == negated
    assert augment.insert_negation("Loved every minute of it.", rng) is None


@pytest.mark.parametrize(
    ("sentence", "plain"),
    [
        ("It was not bad at all.", "It was bad at all."),
        ("The ending wasn't boring.", "The ending was boring."),
        ("I didn't like the cast.", "I did like the cast."),
        ("We do not regret it.", "We do regret it."),
        ("Nothing was not good here.", None),  # a second negation: removing one flips nothing
        ("A film without heart.", None),
    ],
)
def test_negation_is_removed_only_where_the_rest_stays_plain(sentence: str, plain: str | None):
    assert augment.remove_negation(sentence) == plain


def pools() -> augment.Pools:
    polar = [
        ("The acting was superb.", 1),
        ("The music is wonderful.", 1),
        ("The script was dreadful.", 0),
        ("The pacing is awful.", 0),
    ]
    negated = [("It was not bad at all.", 1)]
    reviews = [["The acting was superb.", "I smiled."], ["The script was dreadful."]]
    return augment.Pools(reviews, np.array([1, 0]), polar, polar, polar, negated)


def test_negations_flip_the_label_of_what_they_negate():
    """If this fails, a negated sentence keeps its source's label: the model would learn that
    negation changes nothing."""
    source = dict(pools().polar) | dict(pools().negated)
    for text, label in augment.negations(pools(), 300, np.random.default_rng(1)):
        if text in source:
            assert label == source[text]
            continue
        origin = next(s for s in source if _core(s) in text.replace("n't", " not"))
        assert label == 1 - source[origin], text


def _core(sentence: str) -> str:
    """The sentence's subject, which every rewrite keeps."""
    return sentence.split()[1]


def test_concessions_take_the_label_of_the_clause_that_decides():
    polar = dict(pools().polar)
    for text, label in augment.concessions(pools(), 200, np.random.default_rng(2)):
        clauses = [s for s in polar if augment._clause(s) in text.lower() + " "]
        labels = {polar[s] for s in clauses}
        assert labels == {0, 1}, text  # one clause of each polarity
        deciding = next(s for s in clauses if polar[s] == label)
        other = next(s for s in clauses if polar[s] != label)
        low = text.lower()
        position = low.index(augment._clause(deciding)), low.index(augment._clause(other))
        main_first = low.startswith(augment._clause(deciding)[:10]) and (
            "although" in low or "even though" in low
        )
        assert main_first or position[0] > position[1], text


def test_generators_give_nothing_rather_than_loop_on_empty_pools():
    """If this fails, a fine-tune on data with no polar sentence hangs."""
    empty = augment.Pools([[]], np.array([1]), [])
    rng = np.random.default_rng(0)
    for generate in augment.GENERATORS.values():
        assert generate(empty, 10, rng) == []


def test_tied_groups_take_names_only_where_the_reviews_write_them_as_names():
    vocab = ["<pad>", "<unk>", "olga", "raj", "will", "grace", "french", "he", "she", "film"]
    texts = [
        "I saw it. Then Olga and Raj said Will was fine. The grace of it, the will to go on.",
        "We said Olga will come. It has grace. A French film, he and she said.",
    ]
    groups = augment.tied_groups(vocab, texts)
    assert groups["names"] == [2, 3]  # "will" and "grace" are mostly written as words here
    assert groups["nationalities"] == [6]
    assert groups["he/she/they"] == [7, 8]


def test_tie_makes_rows_one_and_keeps_them_one_under_adamw():
    """If this fails, a name swap can move a score after fine-tuning."""
    weight = torch.nn.Parameter(torch.randn(10, 4))
    groups = {"names": [2, 3], "he/she": [7, 8]}
    tie(weight, groups)
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    for step in range(3):
        loss = (weight[[1, 2, 3, 7, 8]] * torch.randn(5, 4)).sum()
        optimizer.zero_grad()
        loss.backward()
        tie(weight, groups, grad=True)
        optimizer.step()
        tie(weight, groups)
        assert torch.equal(weight[2], weight[UNK_ID])
        assert torch.equal(weight[3], weight[UNK_ID])
        assert torch.equal(weight[7], weight[8]), step


def test_pools_sort_sentences_by_where_their_polarity_sits():
    """If this fails, negations are inserted where they do not reach the polar words (the
    flipped label is then wrong), or real negations are missed."""
    from training.tokenizer import train_tokenizer, vocabulary

    texts = [
        "The plot was dull. Dull, dull and dull, said everyone who saw the plot.",
        "It was not dull at all. The cast was superb and superb.",
    ]
    tokenizer = train_tokenizer(texts, 100, 1)
    vocab = vocabulary(tokenizer)
    ratios = np.zeros(len(vocab))
    ratios[vocab.index("dull")], ratios[vocab.index("superb")] = -2.0, 2.0
    pools = augment.build_pools(texts, np.array([0, 1]), tokenizer, ratios, min_evidence=1.5)
    assert ("The plot was dull.", 0) in pools.negatable
    assert ("The cast was superb and superb.", 1) in pools.negatable
    said = "Dull, dull and dull, said everyone who saw the plot."
    assert (said, 0) in pools.polar
    assert (said, 0) not in pools.negatable  # no copula
    assert pools.negated == [("It was not dull at all.", 1)]
