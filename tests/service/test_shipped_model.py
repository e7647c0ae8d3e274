"""The shipped model on short inputs, over HTTP as a user sends them (issue 20).

The phrase table was written before the shipped model was scored on it: negations and short
verdicts a new user tries first. If a row fails, the default model reads that phrase the wrong
way round; retrain or pick another model rather than edit the row.

The rows marked MISSED are read the wrong way by the shipped model 2.0.0 (11 of 16 right; the
model before it, 1.0.0, read all 16 as NEGATIVE, 8 right): negated negatives are the gap that
docs/model.md reports. They are strict expected failures, so a model that reads them right
makes them fail until the mark is removed.
"""

from __future__ import annotations

import httpx
import pytest

from tests.service.conftest import RunningServer

# (text, label, read right by the shipped model)
PHRASES = [
    ("not bad at all", "POSITIVE", False),
    ("Not bad at all!", "POSITIVE", False),
    ("not bad", "POSITIVE", True),
    ("It wasn't bad at all.", "POSITIVE", False),
    ("not a bad movie", "POSITIVE", False),
    ("never boring", "POSITIVE", True),
    ("I was not disappointed.", "POSITIVE", True),
    ("no complaints", "POSITIVE", False),
    ("not good", "NEGATIVE", True),
    ("not good at all", "NEGATIVE", True),
    ("It was not great.", "NEGATIVE", True),
    ("I didn't like it.", "NEGATIVE", True),
    ("not worth watching", "NEGATIVE", True),
    ("not funny", "NEGATIVE", True),
    ("nothing special", "NEGATIVE", True),
    ("I did not enjoy this movie.", "NEGATIVE", True),
]
MISSED = pytest.mark.xfail(strict=True, reason="read the wrong way by model 2.0.0: docs/model.md")


@pytest.fixture(scope="module")
def answers(shipped: RunningServer) -> dict[str, str]:
    texts = [text for text, _, _ in PHRASES]
    response = httpx.post(f"{shipped.url}/predict", json={"inputs": texts}, timeout=30)
    assert response.status_code == 200
    return {
        text: max(one, key=lambda g: g["score"])["label"]
        for text, one in zip(texts, response.json(), strict=True)
    }


@pytest.mark.parametrize(
    ("text", "label"),
    [pytest.param(text, label, marks=() if right else MISSED) for text, label, right in PHRASES],
)
def test_short_verdicts_and_negations_read_the_right_way(
    answers: dict[str, str], text: str, label: str
):
    assert answers[text] == label
