"""The tokenizer: defined here once, saved as ``tokenizer.json``, used unchanged by the service.

Hugging Face ``tokenizers`` serialises the whole pipeline (normaliser, pre-tokenizer and
vocabulary) into one file, so the service needs no copy of these rules.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer

from service.bundle import PAD_ID

PAD, UNK = "<pad>", "<unk>"
UNK_ID = 1  # PAD_ID, 0, is the bundle's padding id


def new_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Sequence(
        [
            normalizers.NFKC(),
            normalizers.Lowercase(),  # GloVe 6B is uncased
            # IMDb keeps the site's HTML line breaks; they separate words, they are not words.
            normalizers.Replace(Regex(r"<br\s*/?>"), " "),
        ]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # runs of word chars or punctuation
    return tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_count: int) -> Tokenizer:
    """A word-level vocabulary of the ``vocab_size`` most frequent words of ``texts``."""
    tokenizer = new_tokenizer()
    trainer = WordLevelTrainer(
        vocab_size=vocab_size,
        min_frequency=min_count,
        special_tokens=[PAD, UNK],  # ids 0 and 1, in this order
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    assert tokenizer.token_to_id(PAD) == PAD_ID
    assert tokenizer.token_to_id(UNK) == UNK_ID
    return tokenizer


def encode(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text (int32), in parallel over the tokenizer's Rust threads."""
    return [np.asarray(e.ids, dtype=np.int32) for e in tokenizer.encode_batch(texts)]


def vocabulary(tokenizer: Tokenizer) -> list[str]:
    """Words in id order."""
    by_id = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    return [word for word, _ in by_id]
