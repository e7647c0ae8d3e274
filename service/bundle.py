"""The model bundle: the one contract between `training`, which writes it, and everything that
reads it (the service, `training evaluate`, the benchmark and the peer servers it runs).

``models/<name>/`` holds three files; nothing else is needed to serve or re-score the model:

- ``model.pt``: TorchScript with three entry points (format 3):
  ``forward(ids int64 [batch, time], lengths int64 [batch]) -> float32 [batch]``, the POSITIVE
  logit, right-padded with id ``PAD_ID``; and its two halves, ``embed(ids) -> float32 [batch,
  time, dim]`` and ``forward_embedded(embedded, lengths) -> logits``, so that gradients can be
  taken with respect to the embeddings (explanations). ``forward(ids, lengths)`` equals
  ``forward_embedded(embed(ids), lengths)``. A bundle may have a fourth, optional,
  ``forward_forked(ids, lengths)``: ``forward``'s logits with each recurrent layer's two
  directions computed at once on two threads (``torch.jit.fork``), which the service uses on a
  CPU for a batch that has the machine to itself; bundles without it are served by ``forward``.
- ``tokenizer.json``: the Hugging Face tokenizer (normaliser, pre-tokenizer, vocabulary). It
  returns every token: its own truncation could not keep a text's tail, so the card's rule is
  the only one.
- ``card.json``: ``Card`` below, validated on write and on read: what the model is, how it
  was made, how well it does, its calibration and its truncation rule.

and may hold two more:

- ``model.onnx``: ``forward`` as an ONNX graph (inputs ``ids`` and ``lengths``, output
  ``logits``; padding and lengths read exactly as ``model.pt`` reads them), for ONNX Runtime
  on a CPU. Written by the export and added to an older bundle by ``python -m training
  migrate``, from the same weights; the card's ``onnx`` section (``OnnxVariant``) records its
  check against the eager network and the SHA-256 of the ``model.pt`` it was made from.
  Explanations still take their gradients from ``model.pt``; a bundle without it serves on
  TorchScript alone.
- ``model.int8.pt``, written by ``python -m training quantize`` after training: the same
  network with its GRU and linear weights quantised to int8 (dynamic quantisation), the same
  entry points, CPU only; the card's ``int8`` section
  (``Int8Variant``) has its own test metrics and the SHA-256 of the ``model.pt`` it was made
  from, so a retrained ``model.pt`` never runs beside a stale variant.

Like nanoGPT's checkpoint, a bundle carries what is needed to use it; like TEI's ``core``
crate, this module is the one place where writer and readers agree. `training` writes bundles
through ``save`` and imports nothing else from `service`; readers go through ``load``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tokenizers import Tokenizer
from torch.backends.cudnn import rnn as cudnn_rnn

MODEL_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "card.json"
INT8_FILE = "model.int8.pt"
ONNX_FILE = "model.onnx"
ONNX_INPUTS = ("ids", "lengths")
ONNX_OUTPUT = "logits"
FILES = (MODEL_FILE, TOKENIZER_FILE, CARD_FILE)
# 2: truncation moved from tokenizer.json to the card (head + tail).
# 3: model.pt exports embed and forward_embedded; the card is validated (Card).
FORMAT_VERSION = 3
ENTRY_POINTS = ("forward", "embed", "forward_embedded")
FORKED_ENTRY_POINT = "forward_forked"  # optional: older exports lack it
PAD_ID = 0  # right padding; the embedding row of id 0 is zero
LABELS = ("NEGATIVE", "POSITIVE")  # the logit is POSITIVE's
# The casts of model.pt a bundle can be served in: its float32 weights, cast once at load. Half
# precision is meant for CUDA (tensor cores); a CPU runs it, but slower than float32.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a bundle can be served as: a cast of model.pt, or the int8 variant (CPU only). ``auto``
# is the int8 variant on a CPU when the bundle has one, else float32.
Precision = Literal["float32", "float16", "bfloat16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("float32", "float16", "bfloat16", "int8")
PrecisionChoice = Literal["auto", "float32", "float16", "bfloat16", "int8"]
# What runs the ``forward`` of prediction batches besides TorchScript: ``onnx`` needs the
# bundle's model.onnx and a CPU; ``auto`` loads it where both hold; ``torchscript`` never does.
RuntimeChoice = Literal["auto", "torchscript", "onnx"]


class BundleError(Exception):
    """The bundle cannot be served: missing, corrupt or inconsistent files."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``. A name torch
    does not know, or CUDA where there is none, is a ``ValueError`` (a settings error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} requested but there are {torch.cuda.device_count()} CUDA devices"
            )
    return device


TruncationDirection = Literal["Left", "Right"]


class Truncation(BaseModel):
    """A longer text keeps its first ``head`` and its last ``tail`` tokens
    (``head + tail == max_length``). Reviewers often state their verdict in the closing lines,
    so a head+tail cut can keep what a head-only cut (``tail == 0``) drops."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_length: int = Field(ge=1, description="tokens the model reads at most")
    head: int = Field(ge=0, description="tokens kept from the start of a longer text")
    tail: int = Field(ge=0, description="tokens kept from the end of a longer text")

    @classmethod
    def keep(cls, max_length: int, head: int) -> Truncation:
        """The rule that keeps ``head`` tokens of the start and the rest of the end."""
        return cls(max_length=max_length, head=head, tail=max_length - head)

    @classmethod
    def toward(cls, max_length: int, direction: TruncationDirection) -> Truncation:
        """TEI's ``truncation_direction``: "Right" cuts on the right (keeps the start), "Left"
        on the left (keeps the end)."""
        return cls.keep(max_length, head=max_length if direction == "Right" else 0)

    @model_validator(mode="after")
    def _adds_up(self) -> Truncation:
        if self.head + self.tail != self.max_length:
            raise ValueError(
                f"truncation head {self.head} + tail {self.tail} != max_length {self.max_length}"
            )
        return self

    def apply(self, ids: np.ndarray) -> np.ndarray:
        if len(ids) <= self.max_length:
            return ids
        return np.concatenate([ids[: self.head], ids[len(ids) - self.tail :]])


class Calibration(BaseModel):
    """Probabilities are ``sigmoid(logit / temperature)``. With a short band, a text of at most
    ``short_max_tokens`` tokens (as tokenised, before truncation) is divided by
    ``short_temperature`` instead: one temperature serves sentences and whole reviews badly."""

    method: str
    temperature: float = Field(gt=0)
    short_temperature: float | None = Field(None, gt=0)
    short_max_tokens: int | None = Field(None, ge=1)
    test_ece_before: float | None = None
    test_ece_after: float | None = None

    @model_validator(mode="after")
    def _band_complete(self) -> Calibration:
        if (self.short_temperature is None) != (self.short_max_tokens is None):
            raise ValueError("short_temperature and short_max_tokens come together")
        return self

    def temperature_for(self, tokens: int) -> float:
        """The temperature for a text of ``tokens`` tokens."""
        if self.short_max_tokens is not None and tokens <= self.short_max_tokens:
            assert self.short_temperature is not None
            return self.short_temperature
        return self.temperature

    def temperatures(self, tokens: np.ndarray) -> np.ndarray:
        """``temperature_for`` of each count in ``tokens``."""
        if self.short_max_tokens is None or self.short_temperature is None:
            return np.full(len(tokens), self.temperature)
        return np.where(tokens <= self.short_max_tokens, self.short_temperature, self.temperature)


class SplitMetrics(BaseModel):
    """Classification metrics of one split, with the calibrated probabilities."""

    model_config = ConfigDict(extra="allow")  # room for more metrics without a new format

    n: int = Field(ge=0)
    accuracy: float
    precision: float
    recall: float
    f1: float
    roc_auc: float | None
    log_loss: float
    ece: float
    confusion_matrix: dict[str, int]


class Architecture(BaseModel):
    """The network's shape; the fields beyond these are the trainer's model options."""

    model_config = ConfigDict(extra="allow")

    type: str
    vocab_size: int = Field(ge=2)
    embed_dim: int = Field(ge=1)


class ExportCheck(BaseModel):
    torch_version: str
    python_version: str
    created_at: str
    max_abs_diff: dict[str, float] = Field(
        description="largest difference from the eager model, per entry point, on the check batch"
    )


class Int8Variant(BaseModel):
    """``model.int8.pt``: ``model.pt``'s network with the GRU and linear weights stored as int8
    and the activations quantised per batch at run time (torch's dynamic quantisation). Its
    kernels are CPU ones (FBGEMM on x86, QNNPACK on ARM), and a quantised GRU has no gradient:
    explanations of an int8 service take their gradients from ``model.pt``."""

    model_config = ConfigDict(extra="forbid")

    method: str
    source_sha256: str = Field(description="SHA-256 of the model.pt it was made from")
    metrics: dict[str, SplitMetrics] = Field(description="its own, as the card's metrics")
    max_abs_diff: float = Field(
        ge=0, description="largest logit difference from model.pt on the check batch"
    )
    torch_version: str
    created_at: str


class OnnxVariant(BaseModel):
    """``model.onnx``: ``model.pt``'s ``forward`` exported to ONNX from the same weights."""

    model_config = ConfigDict(extra="forbid")

    method: str
    opset: int = Field(ge=1)
    source_sha256: str = Field(description="SHA-256 of the model.pt it was made from")
    max_abs_diff: float = Field(
        ge=0,
        description="largest logit difference of ONNX Runtime from the eager network on the "
        "check batch (mixed lengths)",
    )
    onnxruntime_version: str
    created_at: str


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$"


class ModelSummary(BaseModel):
    """What a client of the service may see of the card (``GET /info``): the training run's
    paths, command and history stay out."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    format_version: Literal[3]
    # Both reach HTTP headers, metric labels and log lines: a control character there (a CR
    # or LF) would break every answer while the model itself loads fine.
    name: str = Field(pattern=NAME_PATTERN, description="letters, digits, '.', '_', '+', '-'")
    version: str = Field(pattern=NAME_PATTERN, description="e.g. 3.0.0")
    task: str
    labels: tuple[str, str]
    truncation: Truncation
    calibration: Calibration
    metrics: dict[str, SplitMetrics]
    architecture: Architecture
    parameters: int = Field(ge=1)
    int8: Int8Variant | None = Field(None, description="the int8 CPU variant, if it was made")
    onnx: OnnxVariant | None = Field(None, description="the ONNX export, if the bundle has one")


class Card(ModelSummary):
    """``card.json``."""

    command: str = Field(description="the command that produced the bundle")
    hyperparameters: dict[str, Any]
    data: dict[str, Any]
    vectors: dict[str, Any]
    training: dict[str, Any]
    export: ExportCheck
    migrated_from: dict[str, Any] | None = Field(
        None, description="the export record of the bundle this one was converted from"
    )
    behaviour: dict[str, Any] | None = Field(
        None,
        description="the behaviour suite's pass rates (`python -m training behave`), per "
        "precision and half",
    )

    def summary(self) -> ModelSummary:
        return ModelSummary.model_validate(self.model_dump(include=set(ModelSummary.model_fields)))


class OnnxModel:
    """``model.onnx`` in ONNX Runtime's CPU provider: ``forward``'s logits for padded ids and
    lengths, as numpy arrays. A session fixes its intra-op threads when it is made, so there is
    one per thread count asked for, made at its first use (the warm-up's); a session may be run
    from several threads at once."""

    def __init__(self, path: Path, optimization: str = "all") -> None:
        import onnxruntime  # a serving dependency, but only a bundle with model.onnx needs it

        self._ort = onnxruntime
        self._graph = path.read_bytes()  # sessions made later read what was checked now
        self._optimization = {
            "basic": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL,
            "none": onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL,
        }[optimization]
        self._sessions: dict[int, Any] = {}
        self._lock = threading.Lock()
        session = self.session(1)
        inputs = tuple(i.name for i in session.get_inputs())
        outputs = tuple(o.name for o in session.get_outputs())
        if inputs != ONNX_INPUTS or outputs != (ONNX_OUTPUT,):
            raise BundleError(
                f"{path} takes {inputs} and gives {outputs}; the contract is {ONNX_INPUTS} -> "
                f"{ONNX_OUTPUT}"
            )

    def session(self, threads: int) -> Any:
        with self._lock:
            if threads not in self._sessions:
                options = self._ort.SessionOptions()
                options.intra_op_num_threads = threads
                options.inter_op_num_threads = 1
                # Its pool's threads would spin between calls, taking the core that another
                # worker's batch or the event loop needs.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                # Without its own arena, ONNX Runtime's buffers come from the process's malloc
                # (jemalloc), which gives them back: with the arena the ten-minute soak grew 11%.
                options.enable_cpu_mem_arena = False
                options.graph_optimization_level = self._optimization
                options.log_severity_level = 3  # errors only: its warnings are about itself
                self._sessions[threads] = self._ort.InferenceSession(
                    self._graph, options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[threads]

    def __call__(self, ids: np.ndarray, lengths: np.ndarray, threads: int) -> np.ndarray:
        (logits,) = self.session(threads).run(None, {"ids": ids, "lengths": lengths})
        return np.asarray(logits, dtype=np.float32)


def load_onnx(
    folder: Path, card: Card, device: torch.device, runtime: RuntimeChoice
) -> OnnxModel | None:
    """The bundle's ONNX model where ``runtime`` asks for it (see ``RuntimeChoice``)."""
    if runtime == "torchscript":
        return None
    path = folder / ONNX_FILE
    usable = device.type == "cpu" and card.onnx is not None and path.is_file()
    if runtime == "auto" and not usable:
        return None
    if device.type != "cpu":
        raise BundleError(
            f"the ONNX runtime runs on a CPU here (onnxruntime's CPU provider); on {device} "
            "serve TorchScript (runtime auto or torchscript)"
        )
    _check_made_from_model_pt(folder, card.onnx, ONNX_FILE, "ONNX model", "migrate")
    try:
        return OnnxModel(path)
    except BundleError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types on a bad graph
        raise BundleError(f"{path} is not a loadable ONNX model: {exc}") from exc


@dataclass(frozen=True)
class Bundle:
    folder: Path
    card: Card
    model: torch.jit.ScriptModule  # the one that serves: model.pt (cast) or model.int8.pt
    tokenizer: Tokenizer
    device: torch.device
    precision: Precision
    # The one gradients are taken through (explanations): ``model`` itself, except for int8.
    differentiable: torch.jit.ScriptModule
    onnx: OnnxModel | None = None  # model.onnx, where the runtime choice loaded it

    @property
    def metrics(self) -> dict[str, SplitMetrics]:
        """The card's figures for the model that serves."""
        if self.precision == "int8" and self.card.int8 is not None:
            return self.card.int8.metrics
        return self.card.metrics


def read_card(folder: Path) -> Card:
    path = folder / CARD_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path} is unreadable: {exc}") from exc
    found = raw.get("format_version") if isinstance(raw, dict) else None
    if found == 2:
        raise BundleError(
            f"{folder} is a format-2 bundle; convert it (same weights) with "
            f"`python -m training migrate {folder}`"
        )
    if found != FORMAT_VERSION:
        raise BundleError(f"{path} has format_version {found!r}; this reads {FORMAT_VERSION}")
    try:
        return Card.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'card'}: {e['msg']}" for e in exc.errors()
        )
        raise BundleError(f"{path} is not a valid card: {problems}") from None


def load(
    folder: Path,
    device: str | torch.device = "auto",
    precision: PrecisionChoice = "float32",
    runtime: RuntimeChoice = "torchscript",
) -> Bundle:
    """Load and check a bundle; every way it can be unusable is one ``BundleError``. With a
    half ``precision`` the weights are cast after the checks (the entry points take the same
    ids and lengths; their outputs come in that dtype). ``int8`` serves ``model.int8.pt`` on a
    CPU and keeps ``model.pt`` for gradients; ``auto`` is int8 where it can be, else float32.
    ``runtime`` says whether ``model.onnx`` is loaded too (``RuntimeChoice``)."""
    if not folder.is_dir():
        raise BundleError(f"model bundle not found: {folder} is not a folder")
    missing = [f for f in FILES if not (folder / f).is_file()]
    if missing:
        raise BundleError(f"model bundle {folder} lacks {', '.join(missing)}")
    card = read_card(folder)
    if tuple(card.labels) != LABELS:
        raise BundleError(f"{folder}/{CARD_FILE} labels {card.labels} are not {LABELS}")
    tokenizer = _load_tokenizer(folder)
    try:
        torch_device = device if isinstance(device, torch.device) else resolve_device(device)
    except ValueError as exc:
        raise BundleError(str(exc)) from exc
    if precision == "int8" and torch_device.type != "cpu":
        raise BundleError(
            f"int8 is a CPU-only variant (torch has no CUDA kernels for dynamically quantised "
            f"GRUs); on {torch_device} serve float32 or float16"
        )
    model = _load_model(folder, torch_device)
    _check_vocabulary(folder, card, tokenizer, model)
    if precision == "auto":
        precision = "int8" if torch_device.type == "cpu" and card.int8 is not None else "float32"
    onnx = load_onnx(folder, card, torch_device, runtime)
    if precision == "int8":
        served = _load_int8(folder, card, torch_device)
        return Bundle(folder, card, served, tokenizer, torch_device, precision, model, onnx)
    if precision != "float32":
        model = model.to(dtype=DTYPES[precision])
    if torch_device.type == "cuda":
        flatten_rnn_weights(model)
    return Bundle(folder, card, model, tokenizer, torch_device, precision, model, onnx)


def _load_tokenizer(folder: Path) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
    except Exception as exc:  # the Rust side raises plain Exception
        raise BundleError(f"{folder}/{TOKENIZER_FILE} cannot be loaded: {exc}") from exc
    if tokenizer.truncation is not None:
        raise BundleError(
            f"{folder}/{TOKENIZER_FILE} truncates by itself; the card's truncation rule must be "
            "the only one"
        )
    return tokenizer


def _load_model(folder: Path, device: torch.device) -> torch.jit.ScriptModule:
    try:
        model = torch.jit.load(str(folder / MODEL_FILE), map_location=device).eval()
    except Exception as exc:  # torch raises RuntimeError or worse on a damaged archive
        raise BundleError(
            f"{folder}/{MODEL_FILE} is not a loadable TorchScript file: {exc}"
        ) from exc
    absent = [name for name in ENTRY_POINTS if not hasattr(model, name)]
    if absent:
        raise BundleError(f"{folder}/{MODEL_FILE} lacks the entry points {', '.join(absent)}")
    return model


def _check_vocabulary(
    folder: Path, card: Card, tokenizer: Tokenizer, model: torch.jit.ScriptModule
) -> None:
    """The card, the tokenizer and the model's embedding table agree on the vocabulary."""
    rows = _embedding_rows(model)
    if rows != card.architecture.vocab_size:
        raise BundleError(
            f"{folder}: the card says {card.architecture.vocab_size} words but the model's "
            f"embedding table has {rows} rows"
        )
    if tokenizer.get_vocab_size() > rows:
        raise BundleError(
            f"{folder}: the tokenizer has {tokenizer.get_vocab_size()} words but the model's "
            f"embedding table has {rows} rows; {TOKENIZER_FILE} and {MODEL_FILE} do not match"
        )


RNN_MODULES = ("RNN", "LSTM", "GRU")


def flatten_rnn_weights(model: torch.jit.ScriptModule) -> int:
    """Put each recurrent layer's weights into one contiguous CUDA buffer, as cuDNN wants them;
    returns how many layers were flattened. ``torch.jit.load`` leaves every weight in its own
    tensor, and cuDNN then copies them into a scratch buffer at every call, warning "RNN module
    weights are not part of single contiguous chunk of memory" (pytorch/pytorch#19053). A
    scripted RNN has no ``flatten_parameters``, so this does what it does, on the tensors the
    scripted forward reads (``_flat_weights``): the op allocates the buffer and re-points each
    tensor at its slice in place."""
    flattened = 0
    with torch.no_grad():
        for module in model.modules():
            rnn: Any = module  # a scripted module: its attributes are known at run time only
            if getattr(rnn, "original_name", None) not in RNN_MODULES:
                continue
            weights = list(rnn._flat_weights)
            first = weights[0]
            if not (first.is_cuda and torch.backends.cudnn.is_acceptable(first)):
                continue
            if len({w.data_ptr() for w in weights}) != len(weights):
                continue  # aliased weights: cuDNN's copying path is the only correct one
            per_layer = (4 if rnn.bias else 2) + (1 if rnn.proj_size > 0 else 0)
            torch._cudnn_rnn_flatten_weight(
                weights,
                per_layer,
                rnn.input_size,
                cudnn_rnn.get_cudnn_mode(rnn.mode),
                rnn.hidden_size,
                rnn.proj_size,
                rnn.num_layers,
                rnn.batch_first,
                bool(rnn.bidirectional),
            )
            flattened += 1
    return flattened


def _check_made_from_model_pt(
    folder: Path,
    variant: Int8Variant | OnnxVariant | None,
    name: str,
    what: str,
    command: str,
) -> None:
    """An optional file made from ``model.pt`` is there with its card section, and was made
    from the ``model.pt`` beside it; otherwise a ``BundleError`` naming the command that
    makes it."""
    if variant is None or not (folder / name).is_file():
        raise BundleError(
            f"{folder} has no {what} (its card section and {name}); make one with "
            f"`python -m training {command} {folder}`"
        )
    if sha256(folder / MODEL_FILE) != variant.source_sha256:
        raise BundleError(
            f"{folder / name} was made from another {MODEL_FILE} than the one in {folder}; "
            f"make it again with `python -m training {command} {folder}`"
        )


def _load_int8(folder: Path, card: Card, device: torch.device) -> torch.jit.ScriptModule:
    path = folder / INT8_FILE
    _check_made_from_model_pt(folder, card.int8, INT8_FILE, "int8 variant", "quantize")
    try:
        model = torch.jit.load(str(path), map_location=device).eval()
    except Exception as exc:
        raise BundleError(f"{path} is not a loadable TorchScript file: {exc}") from exc
    absent = [name for name in ENTRY_POINTS if not hasattr(model, name)]
    if absent:
        raise BundleError(f"{path} lacks the entry points {', '.join(absent)}")
    return model


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save(
    folder: Path,
    model: torch.jit.ScriptModule,
    tokenizer: Tokenizer,
    card: Card,
    onnx: tuple[bytes, OnnxVariant] | None = None,
) -> Path:
    """Write the three files (and ``model.onnx`` with its card section, its source hash filled
    in here), and only once they load as a bundle put them in ``folder``."""

    def write(partial: Path) -> None:
        model.save(str(partial / MODEL_FILE))
        served = Tokenizer.from_str(tokenizer.to_str())
        served.no_truncation()
        served.save(str(partial / TOKENIZER_FILE))
        written = card
        if onnx is not None:
            graph, variant = onnx
            (partial / ONNX_FILE).write_bytes(graph)
            source = sha256(partial / MODEL_FILE)
            written = card.model_copy(
                update={"onnx": variant.model_copy(update={"source_sha256": source})}
            )
        _write_card(partial, written)

    return _replace(folder, write, "float32", "onnx" if onnx is not None else "torchscript")


def save_onnx(folder: Path, graph: bytes, variant: OnnxVariant) -> Path:
    """Add ``graph`` as the ``model.onnx`` of the bundle in ``folder``: its other files are
    copied as they are, the card gains ``variant``, and the result must load with it."""
    card = read_card(folder)

    def write(partial: Path) -> None:
        _copy_files(folder, partial)
        (partial / ONNX_FILE).write_bytes(graph)
        _write_card(partial, card.model_copy(update={"onnx": variant}))

    return _replace(folder, write, "float32", "onnx")


def save_int8(folder: Path, model: torch.jit.ScriptModule, variant: Int8Variant) -> Path:
    """Add ``model`` as the int8 variant of the bundle in ``folder``: its other files are copied
    as they are, the card gains ``variant``, and the result must load as int8 before it
    replaces the folder."""
    card = read_card(folder)

    def write(partial: Path) -> None:
        _copy_files(folder, partial)
        model.save(str(partial / INT8_FILE))
        _write_card(partial, card.model_copy(update={"int8": variant}))

    return _replace(folder, write, "int8", "onnx" if card.onnx is not None else "torchscript")


def _copy_files(folder: Path, partial: Path) -> None:
    """The bundle's files, as they are (the optional ones where it has them)."""
    for name in (*FILES, INT8_FILE, ONNX_FILE):
        if (folder / name).is_file():
            shutil.copy2(folder / name, partial / name)


def _replace(
    folder: Path,
    write: Callable[[Path], None],
    check: Precision,
    runtime: RuntimeChoice = "torchscript",
) -> Path:
    """``write`` the files beside ``folder``, read them back through ``load`` (as ``check``,
    with ``runtime``) and only then move them into place, so a failed or interrupted save never
    leaves a half bundle."""
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    load(partial, "cpu", check, runtime)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def write_card(folder: Path, card: Card) -> None:
    """Replace the card of the bundle in ``folder`` (figures measured after the export); its
    model files are unchanged, so it is written in place and read back."""
    _write_card(folder, card)
    read_card(folder)


def _write_card(folder: Path, card: Card) -> None:
    (folder / CARD_FILE).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")


def round_trip(model: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """The module as ``load`` will see it: saved and loaded again, in memory."""
    buffer = io.BytesIO()
    torch.jit.save(model, buffer)
    buffer.seek(0)
    return torch.jit.load(buffer, map_location="cpu")


def pad(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward``'s inputs for already-truncated sequences: ids right-padded with ``PAD_ID``
    to the longest (at least 1), and the lengths."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    ids = np.full((len(seqs), max(1, int(lengths.max(initial=0)))), PAD_ID, dtype=np.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = seq
    return torch.from_numpy(ids), torch.from_numpy(lengths)


def _embedding_rows(model: torch.jit.ScriptModule) -> int | None:
    for name, tensor in model.state_dict().items():
        if name.endswith("embedding.weight"):
            return int(tensor.shape[0])
    return None
