"""Short inputs in training: sentence cuts, crops, the short-text validation split, the
sentence-file reader and the sweep's pick rule, on hand-built token ids (no model needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from training.data import load_sentences
from training.errors import DataError
from training.prepare import TokenizedSplit
from training.short import (
    ShortSplitRule,
    log_count_ratios,
    random_crop,
    sentence_enders,
    sentences,
    short_validation,
)
from training.sweep import pick

VOCAB = ["<pad>", "<unk>", ".", "!", "...", "great", "awful", "film", "the", "plot", "a", "!?"]
ID = {w: i for i, w in enumerate(VOCAB)}


def ids(text: str) -> np.ndarray:
    return np.array([ID[w] for w in text.split()], dtype=np.int32)


def words(seq: np.ndarray) -> str:
    return " ".join(VOCAB[i] for i in seq)


def test_sentence_enders_are_punctuation_runs_only():
    assert [VOCAB[i] for i in sentence_enders(VOCAB)] == [".", "!", "...", "!?"]


def test_sentences_cut_after_each_end_and_keep_a_trailing_fragment():
    """If this fails, crops and the short split would join or split sentences wrongly."""
    enders = sentence_enders(VOCAB)
    cut = sentences(ids("the film . great ! awful plot ... the plot"), enders)
    assert [words(s) for s in cut] == ["the film .", "great !", "awful plot ...", "the plot"]
    assert sentences(ids("the film"), enders)[0].tolist() == ids("the film").tolist()
    assert sentences(np.array([], dtype=np.int32), enders) == []


def test_random_crop_is_whole_consecutive_sentences_or_a_window():
    enders = sentence_enders(VOCAB)
    review = ids("the film . great ! awful plot ... the plot . a film !")
    parts = [words(s) for s in sentences(review, enders)]
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        crop = words(random_crop(review, enders, rng))
        seen.add(crop)
        # 1 to 3 consecutive sentences, never a cut inside one
        assert any(crop == " ".join(parts[i : i + n]) for n in (1, 2, 3) for i in range(len(parts)))
    assert len(seen) > 5  # crops vary
    no_ends = ids(" ".join(["film"] * 100))
    for _ in range(50):
        window = random_crop(no_ends, enders, rng)
        assert 5 <= len(window) <= 40


def _split() -> TokenizedSplit:
    reviews = [
        ("great film . the plot . great great film !", 1),
        ("a great plot . the film . great film", 1),
        ("awful film . the plot . awful awful plot !", 0),
        ("the awful plot . a film ... awful film", 0),
    ]
    return TokenizedSplit([ids(t) for t, _ in reviews], np.array([y for _, y in reviews]))


def test_log_count_ratios_lean_the_way_of_the_labels():
    ratios = log_count_ratios(_split(), len(VOCAB))
    assert ratios[ID["great"]] > 1 > -1 > ratios[ID["awful"]]
    assert abs(ratios[ID["the"]]) < 0.1  # in every review


def test_short_split_keeps_sentences_whose_words_carry_the_label_and_balances():
    """If this fails, model selection sees neutral sentences labelled with their review's
    polarity (plot summaries as 'positive'), or one class more than the other."""
    train = _split()
    ratios = log_count_ratios(train, len(VOCAB))
    val = TokenizedSplit(
        [
            ids("great great film plot ! the film plot a . great film ."),
            ids("awful awful plot film ! the plot film a ."),
            ids("awful awful plot film a . the film ."),
        ],
        np.array([1, 0, 0]),
    )
    # Four reviews of training data give weak evidence: a lower bar than the default 2.5.
    rule = ShortSplitRule(min_evidence=0.9)
    assert -ratios[[ID["awful"], ID["plot"], ID["film"], ID["a"]]].sum() > rule.min_evidence
    short = short_validation(val, ratios, sentence_enders(VOCAB), rule)
    texts = [words(s) for s in short.ids]
    assert "the film plot a ." not in texts  # neutral: no evidence either way
    assert "great film ." not in texts  # under four words
    assert short.labels.tolist() == [0, 1]  # balanced: one of each, though two negatives pass
    assert texts == ["awful awful plot film !", "great great film plot !"]


def test_sentence_file_is_read_by_newline_only(tmp_path: Path):
    """imdb_labelled.txt holds U+0085 inside a sentence; str.splitlines would cut there."""
    path = tmp_path / "s.txt"
    path.write_text("The script is\x85was there a script?  \t0\nLoved it.\t1\n\n", "utf-8")
    got = load_sentences(path)
    assert got.texts == ["The script is\x85was there a script?", "Loved it."]
    assert got.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("fine\t1\nno label here\n", "s.txt:2"),
        ("fine\t2\nbad\t0\n", "s.txt:1"),
        ("\t1\nbad\t0\n", "s.txt:1"),
        ("good\t1\nfine\t1\n", "both labels"),
    ],
)
def test_malformed_sentence_files_are_refused_by_line(tmp_path: Path, content: str, message: str):
    path = tmp_path / "s.txt"
    path.write_text(content, "utf-8")
    with pytest.raises(DataError, match=message):
        load_sentences(path)


def test_sweep_picks_short_text_accuracy_within_the_review_slack():
    rows = [
        {
            "name": "a",
            "finished": True,
            "validation_accuracy": 0.940,
            "validation_short_accuracy": 0.95,
        },
        {
            "name": "b",
            "finished": True,
            "validation_accuracy": 0.938,
            "validation_short_accuracy": 0.98,
        },
        {
            "name": "c",
            "finished": True,
            "validation_accuracy": 0.930,
            "validation_short_accuracy": 0.99,
        },
        {"name": "d", "finished": False},
    ]
    assert pick(rows, 0.003) == "b"  # c reads short texts best but loses 1 point on reviews
    assert pick(rows, 0.02) == "c"
    assert pick([rows[3]], 0.003) is None
