"""The benchmark's requests: real IMDb test reviews with their real length spread, written as
request-body files for the load generator (one JSON body per line)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from training.data import load_imdb

SHORT_WORDS = 40  # "one short review": at most this many words


@dataclass(frozen=True)
class Workload:
    reviews: list[str]
    single: Path  # one review per request
    batched: Path  # ``texts_per_request`` reviews per request
    short: Path  # one short review per request
    texts_per_request: int

    def probe(self) -> bytes:
        return json.dumps({"inputs": self.reviews[0]}).encode()


def short_reviews(texts: list[str], count: int = 200) -> list[str]:
    """The first ``count`` non-empty reviews of at most ``SHORT_WORDS`` words: the short-review
    requests."""
    return [t for t in texts if t.strip() and len(t.split()) <= SHORT_WORDS][:count]


def _write(path: Path, bodies: list[object]) -> Path:
    path.write_text("".join(json.dumps({"inputs": b}) + "\n" for b in bodies), encoding="utf-8")
    return path


def build(
    data: str, cache_dir: Path, folder: Path, count: int, seed: int = 0, texts_per_request: int = 32
) -> Workload:
    """``count`` test reviews drawn at random (the mix of lengths the test set has)."""
    texts = [t for t in load_imdb(data, cache_dir)["test"].texts if t.strip()]
    reviews = random.Random(seed).sample(texts, count)
    short = short_reviews(texts)
    folder.mkdir(parents=True, exist_ok=True)
    n = texts_per_request
    batches = [reviews[i : i + n] for i in range(0, len(reviews) - n + 1, n)]
    return Workload(
        reviews=reviews,
        single=_write(folder / "single.jsonl", list(reviews)),
        batched=_write(folder / f"batch{n}.jsonl", list(batches)),
        short=_write(folder / "short.jsonl", list(short)),
        texts_per_request=n,
    )
