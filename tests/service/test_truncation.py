"""The truncation rule that the card records and both the service and training apply."""

from __future__ import annotations

import numpy as np
import pytest

from service.truncation import Truncation

IDS = np.arange(10)


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (4, [0, 1, 2, 3]),  # head only: the first max_length tokens
        (0, [6, 7, 8, 9]),  # tail only
        (1, [0, 7, 8, 9]),
        (3, [0, 1, 2, 9]),
    ],
)
def test_a_longer_sequence_keeps_its_head_and_tail(head: int, kept: list[int]):
    cut = Truncation(max_length=4, head=head)
    assert cut.apply(IDS).tolist() == kept
    assert cut.head + cut.tail == 4


def test_sequences_that_fit_are_unchanged():
    cut = Truncation(max_length=10, head=2)
    assert cut.apply(IDS) is IDS
    assert cut.apply(IDS[:0]).tolist() == []


def test_the_card_round_trips_and_bad_rules_are_refused():
    cut = Truncation(400, 128)
    assert cut.describe() == {"max_length": 400, "head": 128, "tail": 272}
    assert Truncation.from_card({"truncation": cut.describe()}) == cut
    for max_length, head in ((0, 0), (4, 5), (4, -1)):
        with pytest.raises(ValueError, match="truncation needs"):
            Truncation(max_length, head)
