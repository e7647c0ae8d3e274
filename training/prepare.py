"""`prepare`: raw IMDb + word vectors -> a cache folder that `train` reads on its own.

The folder holds everything training needs and nothing it must recompute: the tokenizer, the
token ids of the train/validation/test splits and the embedding matrix. It can be copied to a
machine that has neither gensim nor the raw data (a GPU box) and trained from there.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from service.bundle import sha256
from training.config import PrepareConfig, to_jsonable
from training.data import load_imdb, stratified_split
from training.errors import DataError
from training.tokenizer import encode, train_tokenizer, vocabulary
from training.vectors import embedding_matrix, load_vectors, train_word2vec

TOKENIZER_FILE = "tokenizer.json"
SPLITS_FILE = "splits.npz"
EMBEDDINGS_FILE = "embeddings.npy"
META_FILE = "prepare.json"
SPLIT_NAMES = ("train", "val", "test")
# Part of the cache key: bump it whenever prepare's output changes for the same options, so that
# no stale folder is reused.
PREPARE_VERSION = 2


@dataclass
class TokenizedSplit:
    ids: list[np.ndarray]  # int32 token ids of each review, untruncated
    labels: np.ndarray  # int64, 1 = positive

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)

    def sample(self, count: int | None, rng: np.random.Generator) -> TokenizedSplit:
        """``count`` of its reviews drawn at random (in their order), or all of them."""
        if not count or count >= len(self):
            return self
        keep = np.sort(rng.choice(len(self), count, replace=False))
        return TokenizedSplit([self.ids[i] for i in keep], self.labels[keep])


@dataclass
class Prepared:
    folder: Path
    tokenizer: Tokenizer
    embeddings: np.ndarray  # float32 [vocab, dim]
    splits: dict[str, TokenizedSplit]
    meta: dict[str, Any]


def prepared_dir(cfg: PrepareConfig) -> Path:
    """Cache folder for this configuration: a change of any option gets a folder of its own."""
    options = {k: v for k, v in to_jsonable(cfg).items() if k != "cache_dir"}
    options["prepare_version"] = PREPARE_VERSION
    key = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]
    return cfg.cache_dir / f"prepared-{key}"


def prepare(cfg: PrepareConfig, log: Any = print) -> Path:
    started = time.perf_counter()
    reviews = load_imdb(cfg.data, cfg.cache_dir, cfg.data_sha256)
    train_idx, val_idx = stratified_split(reviews["train"].labels, cfg.val_fraction, cfg.split_seed)
    sets = {
        "train": reviews["train"].subset(train_idx),
        "val": reviews["train"].subset(val_idx),
        "test": reviews["test"],
    }
    log(f"reviews: train {len(sets['train'])}, val {len(sets['val'])}, test {len(sets['test'])}")

    # Vocabulary from the training part only: validation and test words stay unseen.
    tokenizer = train_tokenizer(sets["train"].texts, cfg.vocab_size, cfg.min_count)
    splits = {
        name: TokenizedSplit(encode(tokenizer, s.texts), s.labels) for name, s in sets.items()
    }
    vocab = vocabulary(tokenizer)
    counts = np.bincount(np.concatenate(splits["train"].ids), minlength=len(vocab))

    kv = load_vectors(cfg.vectors, cfg.vectors_dim)
    embeddings, coverage = embedding_matrix(vocab, kv, cfg.split_seed, counts)
    log(
        f"vectors {cfg.vectors} ({kv.vector_size}d): {coverage['words_with_vectors']:,} of "
        f"{len(vocab):,} words found ({coverage['type_coverage']:.1%}), covering "
        f"{coverage['token_coverage']:.1%} of training tokens"
    )

    vectors_meta: dict[str, Any] = {"source": cfg.vectors, "dim": kv.vector_size, **coverage}
    if cfg.w2v_dim:
        sentences = [[vocab[i] for i in ids] for ids in splits["train"].ids]
        w2v = train_word2vec(sentences, cfg.w2v_dim, cfg.w2v_epochs, cfg.split_seed)
        own, _ = embedding_matrix(vocab, w2v, cfg.split_seed)
        embeddings = np.concatenate([embeddings, own], axis=1)
        vectors_meta["word2vec"] = {
            "dim": cfg.w2v_dim,
            "epochs": cfg.w2v_epochs,
            "trained_on": f"{len(sentences)} training reviews",
        }
        log(
            f"word2vec {cfg.w2v_dim}d trained on the training reviews; embeddings "
            f"{embeddings.shape[1]}d"
        )

    source = Path(cfg.data)
    meta = {
        "config": to_jsonable(cfg),
        "data": {
            "source": cfg.data,
            "sha256": sha256(source) if source.is_file() else None,
            "reviews": {name: len(s) for name, s in splits.items()},
        },
        "vectors": vectors_meta,
        "vocab_size": len(vocab),
        "seconds": round(time.perf_counter() - started, 1),
    }
    folder = prepared_dir(cfg)
    _write(folder, tokenizer, splits, embeddings, meta)
    log(f"prepared {folder} in {meta['seconds']} s")
    return folder


def _write(
    folder: Path,
    tokenizer: Tokenizer,
    splits: dict[str, TokenizedSplit],
    embeddings: np.ndarray,
    meta: dict[str, Any],
) -> None:
    # Written beside the target and renamed, so an interrupted run never leaves a folder that
    # `train` would take for complete.
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tokenizer.save(str(partial / TOKENIZER_FILE))
    np.save(partial / EMBEDDINGS_FILE, embeddings)
    arrays: dict[str, np.ndarray] = {}
    for name, split in splits.items():
        arrays[f"{name}_ids"] = np.concatenate(split.ids) if split.ids else np.empty(0, np.int32)
        arrays[f"{name}_offsets"] = np.cumsum([0, *map(len, split.ids)], dtype=np.int64)
        arrays[f"{name}_labels"] = split.labels
    np.savez_compressed(partial / SPLITS_FILE, **arrays)  # type: ignore[arg-type]
    (partial / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


def load_prepared(folder: Path) -> Prepared:
    missing = [
        f
        for f in (TOKENIZER_FILE, SPLITS_FILE, EMBEDDINGS_FILE, META_FILE)
        if not (folder / f).is_file()
    ]
    if missing:
        raise DataError(f"{folder} is not a prepared folder (missing {', '.join(missing)})")
    arrays = np.load(folder / SPLITS_FILE)
    splits = {}
    for name in SPLIT_NAMES:
        ids, offsets = arrays[f"{name}_ids"], arrays[f"{name}_offsets"]
        splits[name] = TokenizedSplit(
            [ids[a:b] for a, b in itertools.pairwise(offsets)],
            arrays[f"{name}_labels"],
        )
    return Prepared(
        folder=folder,
        tokenizer=Tokenizer.from_file(str(folder / TOKENIZER_FILE)),
        embeddings=np.load(folder / EMBEDDINGS_FILE),
        splits=splits,
        meta=json.loads((folder / META_FILE).read_text()),
    )
