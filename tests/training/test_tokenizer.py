from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from service.bundle import PAD_ID
from training.tokenizer import UNK_ID, encode, train_tokenizer, vocabulary

TEXTS = ["A <br />great<BR/>film, truly great!", "The ﬁlm was dull.", "Naïve but great."]


def test_normalisation_and_special_ids():
    tok = train_tokenizer(TEXTS, vocab_size=100, min_count=1)
    assert tok.token_to_id("<pad>") == PAD_ID
    assert tok.token_to_id("<unk>") == UNK_ID
    words = tok.encode(TEXTS[0]).tokens
    assert words == ["a", "great", "film", ",", "truly", "great", "!"]  # <br /> is a space
    assert tok.encode("The ﬁlm").tokens == ["the", "film"]  # NFKC unfolds the ligature
    assert "naïve" in vocabulary(tok)
    assert tok.encode("great zebra").ids[1] == UNK_ID
    assert tok.encode("").ids == []


def test_vocabulary_keeps_the_most_frequent_words():
    tok = train_tokenizer(TEXTS, vocab_size=4, min_count=1)
    assert vocabulary(tok) == ["<pad>", "<unk>", "great", "."]
    assert train_tokenizer(TEXTS, vocab_size=100, min_count=3).get_vocab_size() == 3


def test_saved_tokenizer_round_trips(tmp_path: Path):
    tok = train_tokenizer(TEXTS, vocab_size=100, min_count=1)
    full = encode(tok, TEXTS)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text, ids in zip(TEXTS, full, strict=True):
        np.testing.assert_array_equal(loaded.encode(text).ids, ids)
