"""The behaviour suite: its cases, its pass rules, and `python -m training behave`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import behaviour
from training.behaviour import Case, Test
from training.cli import main


def test_every_test_has_100_cases_per_half_and_the_halves_are_disjoint():
    """If this fails, a test is too small to report a pass rate, or the dev half that choices
    are made on overlaps the reported test half."""
    for test in behaviour.TESTS:
        dev, held_out = behaviour.cases(test, "dev"), behaviour.cases(test, "test")
        assert len(dev) >= 50
        assert len(held_out) >= 50
        assert len(dev) + len(held_out) >= 100
        dev_texts = {tuple(c.texts) for c in dev}
        assert not dev_texts & {tuple(c.texts) for c in held_out}, test.name


def test_cases_are_the_same_every_time():
    """If this fails, the card's figures cannot be reproduced: generation is not seeded."""
    for test in behaviour.TESTS:
        first = [c.texts for c in behaviour.cases(test, "test")]
        assert first == [c.texts for c in behaviour.cases(test, "test")]


BY_NAME = {t.name: t for t in behaviour.TESTS}


def _polar_words(text: str) -> list[int]:
    words = [w.strip(".,;!").lower() for w in text.split()]
    return [
        behaviour.POS if w in behaviour.POS_ADJ else behaviour.NEG
        for w in words
        if w in behaviour.POS_ADJ or w in behaviour.NEG_ADJ
    ]


def test_labels_follow_the_templates():
    """If this fails, a template's expected label is not the one a reader gives it."""
    for case in behaviour.cases(BY_NAME["negated negative"], "dev"):  # negated negative
        assert case.label == behaviour.POS
        assert set(_polar_words(case.texts[0])) == {0}
        assert any(n in case.texts[0] for n in (" not ", "n't", "never", "Not "))
    for case in behaviour.cases(
        BY_NAME["contrast and concession"], "dev"
    ):  # contrast and concession
        text = case.texts[0]
        first, last = _polar_words(text)[0], _polar_words(text)[-1]
        subordinate_first = text.startswith(("Although", "Even though", "Despite"))
        assert first != last
        assert case.label == (last if subordinate_first or ", but " in text else first), text
    names = behaviour.cases(BY_NAME["names"], "dev")[0]
    assert len(names.texts) == 6
    assert len({t.split()[0] for t in names.texts}) == 6


MFT = Test("m", "c", "MFT", "", behaviour.vocab_movies)
INV = Test("i", "c", "INV", "", behaviour.typos)
FAIR = Test("f", "c", "INV", "", behaviour.names, 0.1)
UP = Test("d", "c", "DIR", "", behaviour.intensifiers, 0.1, "down")
HEDGE = Test("h", "c", "DIR", "", behaviour.hedges, 0.1, "up")


@pytest.mark.parametrize(
    ("test", "case", "scores", "passes"),
    [
        (MFT, Case(["x"], 1), [0.7], True),
        (MFT, Case(["x"], 1), [0.3], False),
        (INV, Case(["x", "y"]), [0.2, 0.45], True),  # no flip; the spread is not judged
        (INV, Case(["x", "y"]), [0.45, 0.55], False),
        (FAIR, Case(["x", "y", "z"]), [0.7, 0.75, 0.78], True),
        (FAIR, Case(["x", "y", "z"]), [0.7, 0.75, 0.85], False),  # moved by 0.15
        (UP, Case(["x", "y"], 1), [0.8, 0.75], True),
        (UP, Case(["x", "y"], 1), [0.9, 0.75], False),  # intensified, 0.15 less sure
        (UP, Case(["x", "y"], 0), [0.2, 0.1], True),  # more sure of NEGATIVE
        (HEDGE, Case(["x", "y"], 1), [0.6, 0.65], True),
        (HEDGE, Case(["x", "y"], 1), [0.6, 0.8], False),  # hedged, 0.2 surer
        (HEDGE, Case(["x", "y"], 1), [0.6, 0.4], False),  # hedged into the other label
    ],
)
def test_pass_rules(test: Test, case: Case, scores: list[float], passes: bool):
    assert behaviour.judge(test, case, scores) is passes


def bag_of_words(texts: list[str]) -> np.ndarray:
    """A reader of words, not sentences: positive when a positive adjective or verb occurs."""
    positive = set(behaviour.POS_ADJ) | set(behaviour.POS_VERBS_PAST) | set(behaviour.POS_VERBS)
    return np.array(
        [0.9 if positive & {w.strip(".,!;").lower() for w in t.split()} else 0.1 for t in texts]
    )


def test_a_bag_of_words_reader_passes_vocabulary_and_fails_negation():
    """If this fails, the suite cannot tell a word reader from a sentence reader, which is
    what it exists to do."""
    rates = {o.test.name: o.pass_rate for o in behaviour.run(bag_of_words, "dev")}
    assert rates["movie vocabulary"] == 1.0
    assert rates["very short reviews"] > 0.95
    assert rates["negated positive"] < 0.1
    assert rates["negated negative"] < 0.1
    assert rates["names"] == 1.0  # it never reads names


def test_behave_records_in_the_card_and_checks_against_it(trained_bundle: Path, tmp_path: Path):
    """If this fails, `behave --check` (what CI runs on the shipped model) cannot tell a card
    that matches its model from one that does not."""
    import shutil

    folder = shutil.copytree(trained_bundle, tmp_path / "tiny")
    assert main(["behave", str(folder), "--check"]) == 1  # no figures yet
    assert main(["behave", str(folder), "--write-card"]) == 0
    card = json.loads((folder / "card.json").read_text())
    figures = card["behaviour"]["float32"]
    assert set(figures) == {"dev", "test"}
    assert set(figures["test"]["tests"]) == {t.name for t in behaviour.TESTS}
    assert main(["behave", str(folder), "--check"]) == 0
    figures["test"]["tests"]["negated negative"]["pass_rate"] += 0.05
    (folder / "card.json").write_text(json.dumps(card))
    assert main(["behave", str(folder), "--check", "--half", "test"]) == 1
