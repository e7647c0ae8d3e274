"""How a text longer than the model's length is cut: one rule, read from the bundle's card and
applied by both the service and the training code that produced the bundle."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Truncation:
    """Keep the first ``head`` and the last ``max_length - head`` tokens of a longer sequence.

    Reviewers often state their verdict in the closing lines, so a head+tail cut can keep what
    a head-only cut (``head == max_length``) drops.
    """

    max_length: int
    head: int

    def __post_init__(self) -> None:
        if self.max_length < 1 or not 0 <= self.head <= self.max_length:
            raise ValueError(
                f"truncation needs 1 <= max_length and 0 <= head <= max_length, "
                f"got max_length={self.max_length}, head={self.head}"
            )

    @property
    def tail(self) -> int:
        return self.max_length - self.head

    def apply(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) <= self.max_length:
            return ids
        return np.concatenate([ids[: self.head], ids[len(ids) - self.tail :]])

    def describe(self) -> dict[str, Any]:
        """The card's record of the rule."""
        return {"max_length": self.max_length, "head": self.head, "tail": self.tail}

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Truncation:
        rule = card["truncation"]
        return cls(int(rule["max_length"]), int(rule["head"]))
