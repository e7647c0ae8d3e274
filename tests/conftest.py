"""Tiny real artefacts shared by the tests: an aclImdb tree in the official layout, its
tarball, a GloVe-format vectors file, a prepared folder and an exported bundle."""

from __future__ import annotations

import random
import shutil
import tarfile
from pathlib import Path

import pytest

POSITIVE = ["great", "wonderful", "moving", "brilliant", "superb", "loved", "charming"]
NEGATIVE = ["awful", "boring", "terrible", "waste", "dull", "hated", "clumsy"]
FILLER = ["the", "film", "movie", "plot", "actor", "story", "was", "and", "a", "of", "it"]
ODD = ["naïve", "Amélie", "café", "ﬁlm", "😀"]  # non-ASCII; 'ﬁ' is a ligature NFKC unfolds
REVIEWS_PER_FOLDER = 40


def _review(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(4, 40))]
    cue = POSITIVE if positive else NEGATIVE
    for _ in range(rng.randint(2, 4)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(cue))
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words) + 1), rng.choice(ODD))
    text = " ".join(words).capitalize() + "."
    if rng.random() < 0.3:
        text = text.replace(" ", "<br /><br />", 1)  # the site's HTML line breaks
    return text


def write_imdb_tree(root: Path, seed: int = 0) -> Path:
    """aclImdb/{train,test}/{neg,pos}/<id>_<rating>.txt plus the files the loader must skip."""
    rng = random.Random(seed)
    base = root / "aclImdb"
    for split in ("train", "test"):
        for label in ("neg", "pos"):
            folder = base / split / label
            folder.mkdir(parents=True)
            for i in range(REVIEWS_PER_FOLDER):
                rating = rng.randint(7, 10) if label == "pos" else rng.randint(1, 4)
                text = _review(rng, label == "pos")
                (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    # An empty review, as real data can hold one; it must be read and scored like any other.
    (base / "train" / "pos" / f"{REVIEWS_PER_FOLDER}_9.txt").write_text("")
    (base / "test" / "neg" / f"{REVIEWS_PER_FOLDER}_2.txt").write_text("")
    (base / "train" / "unsup").mkdir()
    (base / "train" / "unsup" / "0_0.txt").write_text("unlabelled, to be skipped")
    (base / "train" / "labeledBow.feat").write_text("0 0:1\n")
    (base / "README").write_text("Large Movie Review Dataset v1.0 (test copy)\n")
    (base / "imdb.vocab").write_text("\n".join(FILLER) + "\n")
    return root


def write_glove(path: Path, dim: int = 8, seed: int = 1) -> Path:
    """A GloVe text file (no header) for the fixture words, some vocabulary left uncovered."""
    rng = random.Random(seed)
    words = FILLER + POSITIVE[:-1] + NEGATIVE[:-1] + [".", "naïve", "unused", "words"]
    lines = [" ".join([w, *(f"{rng.uniform(-1, 1):.5f}" for _ in range(dim))]) for w in words]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def imdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_imdb_tree(tmp_path_factory.mktemp("imdb"))


@pytest.fixture(scope="session")
def imdb_tarball(imdb_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tarball") / "aclImdb_v1.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.add(imdb_dir / "aclImdb", arcname="aclImdb")
    return path


@pytest.fixture(scope="session")
def glove_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_glove(tmp_path_factory.mktemp("vectors") / "glove.tiny.8d.txt")


# Head+tail truncation (12 + 20 of 32 tokens) so that the rule travels through every test.
TINY_MODEL = [
    "--cell",
    "gru",
    "--layers",
    "2",
    "--hidden",
    "8",
    "--max-len",
    "32",
    "--head-len",
    "12",
]
TINY_TRAIN = [
    "--epochs",
    "8",
    "--average-top",
    "2",
    "--patience",
    "8",
    "--batch-size",
    "8",
    "--lr",
    "0.01",
    "--dropout",
    "0",
    "--embed-dropout",
    "0",
    "--freeze-embeddings-epochs",
    "0",
    "--threads",
    "1",
]


def prepare_args(data: Path, vectors: Path, cache: Path) -> list[str]:
    return [
        "--data",
        str(data),
        "--vectors",
        str(vectors),
        "--cache-dir",
        str(cache),
        "--vocab-size",
        "200",
        "--min-count",
        "1",
        "--val-fraction",
        "0.2",
    ]


@pytest.fixture(scope="session")
def trained_bundle(
    imdb_tarball: Path, glove_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A bundle exported by the real CLI: `train` runs `prepare` itself on first use."""
    from training.cli import main

    root = tmp_path_factory.mktemp("train")
    argv = [
        "train",
        *prepare_args(imdb_tarball, glove_file, root / "cache"),
        *TINY_MODEL,
        *TINY_TRAIN,
        "--name",
        "tiny",
        "--models-dir",
        str(root / "models"),
    ]
    assert main(argv) == 0
    return root / "models" / "tiny"


@pytest.fixture(scope="session")
def quantized_bundle(
    trained_bundle: Path, imdb_tarball: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A copy of the tiny bundle with the int8 variant the real CLI adds (`quantize`)."""
    from training.cli import main

    root = tmp_path_factory.mktemp("quantized")
    folder = shutil.copytree(trained_bundle, root / "tiny")
    argv = ["quantize", str(folder), "--data", str(imdb_tarball), "--cache-dir", str(root)]
    # One review of the fixture's few test reviews is worth points: allow a flip or two here
    # (test_quantize checks that the bound is enforced).
    assert main([*argv, "--max-drop", "0.1"]) == 0
    return folder
