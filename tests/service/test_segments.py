"""Sentences and clauses: what /explain scores one by one and judges 'mixed' from."""

from __future__ import annotations

import pytest

from service.segments import split


def pieces(text: str) -> list[str]:
    return [text[a:b] for a, b in split(text)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "The acting was wonderful but the plot was dull.",
            ["The acting was wonderful", "but the plot was dull."],
        ),
        (
            "Great film! I loved it. Would watch again?",
            ["Great film!", "I loved it.", "Would watch again?"],
        ),
        ("One.<br /><br />Two lines here", ["One.", "Two lines here"]),
        ("First line\nsecond line", ["First line", "second line"]),
        ('He said "Wow." Then he left.', ['He said "Wow."', "Then he left."]),
        ("Mr. Smith was great. Dr. No was not.", ["Mr. Smith was great.", "Dr. No was not."]),
        (
            "A fine score; awful dialogue throughout.",
            ["A fine score", "awful dialogue throughout."],
        ),
        ("It was good, though.", ["It was good, though."]),  # a short clause joins its neighbour
        ("Slow, yet strangely moving.", ["Slow, yet strangely moving."]),
        ("A slow start, yet a gripping finale.", ["A slow start,", "yet a gripping finale."]),
        ("   ", []),
        ("... !!!", []),  # no words, nothing to score
    ],
)
def test_split_into_sentences_and_clauses(text: str, expected: list[str]):
    assert pieces(text) == expected


def test_spans_are_trimmed_and_in_order():
    text = "  Good.   Bad!  "
    spans = split(text)
    assert spans == [(2, 7), (10, 14)]
