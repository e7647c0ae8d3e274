"""The model runtime: a loaded bundle, then preprocess, infer and postprocess, as the stages of
TorchServe's base handler. No HTTP and no serving policy here: the batcher, the benchmark's
peers and the tests call it directly, and a batch runs as the caller's ``Execution`` says (the
scheduler's choice of threads and entry point); the runtime never asks the layers above."""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer

from service import bundle
from service.bundle import Truncation

ScoreFunction = Literal["sigmoid", "softmax", "none"]


# A text longer than this is tokenised a piece at a time, each piece cut at a space that no
# normalisation or token spans: the same tokens as the whole text's, with one piece's encoding
# in memory at a time, and only the read tokens' ids made Python objects (eight 2 MB texts
# explained at once took the server to 0.9 GB encoded whole, 0.55 GB in pieces).
PIECE_CHARS = 1 << 16
# Such a space follows an ASCII character other than a space or "r": NFKC and lower-casing
# leave ASCII alone, and the "<br />" rule spans a space only after "<br". Each tokenizer is
# checked against this at load (``_cuts_keep_tokens``).
_CUT = re.compile(r"(?<=[\x21-\x51\x53-\x71\x73-\x7e])[ \t\n]")
_CUT_PROBE = (
    "A <br />b<BR >c  \uff26\uff55\uff4c\uff4c caf\u00e9 cafe\u0301 don't -- stop.\n"
    "or R 10% x<br\n/>y \uff1cBR \uff1ez "
)


def _cuts(text: str, size: int) -> list[int]:
    """Where pieces of at least ``size / 2`` characters start and end: each cut at the first
    space past that (a text with no such space stays one piece)."""
    bounds = [0]
    while len(text) - bounds[-1] > size:
        found = _CUT.search(text, bounds[-1] + size // 2)
        if found is None:
            break
        bounds.append(found.start())
    bounds.append(len(text))
    return bounds


def _cuts_keep_tokens(tokenizer: Tokenizer) -> bool:
    """Whether cutting a text at every such space gives the tokens of the whole text."""
    whole = tokenizer.encode(_CUT_PROBE)
    pieces = [
        tokenizer.encode(_CUT_PROBE[a:b]) for a, b in itertools.pairwise(_cuts(_CUT_PROBE, 2))
    ]
    return [t for e in pieces for t in e.tokens] == whole.tokens and len(pieces) > 5


@dataclass(frozen=True)
class Encoded:
    """One text as the model will read it."""

    ids: np.ndarray  # int64 token ids, already cut by the bundle's truncation rule
    original_tokens: int  # tokens before truncation


@dataclass(frozen=True)
class Tokens:
    """One text as the tokenizer reads it: how many tokens it has, and the tokens the model
    reads (after truncation) with their ids and their places in the original text."""

    count: int  # all of them, before truncation
    ids: np.ndarray  # int64, the ones read
    tokens: list[str]  # their vocabulary entries, <unk> for an unknown word
    offsets: list[tuple[int, int]]  # text[start:end] is the token as written


@dataclass(frozen=True)
class _Piece:
    """A piece of a text that holds tokens the model reads: where it starts in the text (its
    first token, its first character), its encoding and its ids."""

    first_token: int
    first_char: int
    encoding: Encoding
    ids: list[int]


@dataclass(frozen=True)
class Attribution:
    """Integrated gradients of the POSITIVE logit with respect to each token's embedding,
    from the all-padding input (zero vectors) to the text, summed over the embedding."""

    tokens: np.ndarray  # float64, one per token read
    logit: float  # the text's POSITIVE logit
    baseline_logit: float  # the logit of as many padding embeddings
    steps: int

    @property
    def gap(self) -> float:
        """Completeness: the attributions should add up to ``logit - baseline_logit``; what is
        left is the error of the integral's quadrature (shrinks with more steps)."""
        return float(self.tokens.sum()) - (self.logit - self.baseline_logit)


class IntegratedGradients:
    """One explanation (Sundararajan et al. 2017, as Captum's ``LayerIntegratedGradients``
    over the embedding layer computes it), worked in chunks of interpolation steps so that the
    batcher can run prediction batches between two chunks.

    The integral over the path from the baseline to the embedded text is taken with
    Gauss-Legendre quadrature (Captum's default): ``steps`` nodes on [0, 1], weighted. Each
    chunk is one forward and backward pass of ``forward_embedded`` over a batch of
    interpolated inputs of at most ``chunk_tokens`` tokens in all.
    """

    def __init__(
        self, runtime: ModelRuntime, ids: np.ndarray, steps: int, chunk_tokens: int
    ) -> None:
        self.runtime = runtime
        self.steps = steps
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        self._alphas = (nodes + 1) / 2  # from [-1, 1] to [0, 1]
        self._weights = weights / 2
        # A text with no tokens is read as one padding step, as /predict reads it; its one
        # attribution (a zero vector's) is dropped from the result.
        self._tokens = len(ids)
        read = ids if len(ids) else np.array([bundle.PAD_ID], dtype=np.int64)
        self._ids = torch.from_numpy(np.ascontiguousarray(read))[None]
        self._chunk = max(1, chunk_tokens // len(read))
        self._next = 0
        self._embedded: torch.Tensor | None = None
        self._gradient_sum: torch.Tensor | None = None
        self._logits: tuple[float, float] | None = None

    @property
    def done(self) -> bool:
        return self._next >= self.steps

    def advance(self, how: Execution) -> bool:
        """Run the next chunk (on ``how.threads``); True once the explanation is complete."""
        rt = self.runtime
        # The served model, or model.pt where that is int8 (a quantised GRU has no gradient).
        model, device = rt.differentiable, rt.device
        length = torch.tensor([self._ids.shape[1]], device=device)
        # cuDNN computes an RNN's backward pass only in training mode; its native kernels do
        # it in evaluation mode (dropout off), which is what an explanation needs.
        cudnn_off = torch.backends.cudnn.flags(enabled=False) if device.type == "cuda" else None
        with cudnn_off or nullcontext():
            if self._embedded is None:
                with torch.no_grad():
                    self._embedded = model.embed(self._ids.to(device))
                    both = torch.cat([self._embedded, torch.zeros_like(self._embedded)])
                    logits = model.forward_embedded(both, length.expand(2)).float().cpu()
                self._logits = (float(logits[0]), float(logits[1]))
                self._gradient_sum = torch.zeros(self._embedded.shape[1:], device=device)
            take = slice(self._next, min(self._next + self._chunk, self.steps))
            dtype = self._embedded.dtype
            alphas = torch.tensor(self._alphas[take], dtype=dtype, device=device)
            weights = torch.tensor(self._weights[take], dtype=torch.float32, device=device)
            _use_threads(how.threads)
            with torch.enable_grad():
                path = (alphas[:, None, None] * self._embedded).requires_grad_(True)
                out = model.forward_embedded(path, length.expand(len(alphas)))
                (gradients,) = torch.autograd.grad(out.float().sum(), path)
            assert self._gradient_sum is not None
            self._gradient_sum += (weights[:, None, None] * gradients.float()).sum(0)
        self._next = take.stop
        return self.done

    def result(self) -> Attribution:
        if not self.done or self._embedded is None or self._logits is None:
            raise RuntimeError("the explanation has not run all its steps")
        assert self._gradient_sum is not None
        # Baseline zero: (x - baseline) * average gradient, summed over the embedding dims.
        per_token = (self._gradient_sum * self._embedded[0].float()).sum(-1)[: self._tokens]
        return Attribution(
            per_token.double().cpu().numpy(), self._logits[0], self._logits[1], self.steps
        )


@dataclass(frozen=True)
class Execution:
    """How the scheduler asks one model call to run: on how many intra-op threads (None:
    torch's setting as it is), on ONNX Runtime where the runtime has the bundle's
    ``model.onnx``, else on TorchScript, and there, on a CPU, through the bundle's
    ``forward_forked`` entry point (each GRU layer's two directions on two threads) where it
    has one."""

    threads: int | None = None
    forked: bool = False
    onnx: bool = False


# A call from outside the scheduler (warm-up, benchmarks, tests): torch's threads, no fork.
UNSCHEDULED = Execution()


class ModelRuntime:
    def __init__(self, loaded: bundle.Bundle) -> None:
        self.bundle = loaded
        self.card = loaded.card
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.differentiable = loaded.differentiable
        self.precision = loaded.precision
        # On CUDA a batch goes to the device from pinned (page-locked) host memory without
        # blocking; the copy of the logits back is the one synchronisation per batch.
        self._pin = loaded.device.type == "cuda"
        self.truncation = loaded.card.truncation
        self.calibration = loaded.card.calibration
        self.negative, self.positive = loaded.card.labels
        forked = getattr(loaded.model, bundle.FORKED_ENTRY_POINT, None)
        self._forked = forked if loaded.device.type == "cpu" else None
        self.onnx = loaded.onnx
        self._piece_chars: float = PIECE_CHARS if _cuts_keep_tokens(loaded.tokenizer) else math.inf

    @classmethod
    def load(
        cls,
        folder: Path,
        device: str | torch.device = "auto",
        precision: bundle.PrecisionChoice = "float32",
        runtime: bundle.RuntimeChoice = "torchscript",
    ) -> ModelRuntime:
        """``bundle.load`` (a ``BundleError`` for every way it can be unusable), wrapped."""
        return cls(bundle.load(folder, device, precision, runtime))

    # -- preprocess -------------------------------------------------------------------------
    def preprocess(self, texts: list[str], cut: Truncation | None = None) -> list[Encoded]:
        """Tokenise, then cut longer texts by ``cut`` (default: the card's truncation rule)."""
        cut = cut or self.truncation
        short = iter(self.tokenizer.encode_batch([t for t in texts if not self._long(t)]))
        encoded = []
        for text in texts:
            if self._long(text):
                n, pieces = self._read_pieces(text, cut)
                read = self._read(n, pieces, cut)
                encoded.append(Encoded(np.asarray([p.ids[i] for i, p in read], np.int64), n))
            else:
                ids = np.asarray(next(short).ids, dtype=np.int64)
                encoded.append(Encoded(cut.apply(ids), len(ids)))
        return encoded

    def tokenize(self, text: str, cut: Truncation | None = None) -> Tokens:
        """The tokens the model reads of one text (all of them, or the ones ``cut``, by
        default the card's truncation, keeps), each with its id and its place in ``text``. Of
        a long text only the pieces that hold read tokens stay encoded, and only read tokens
        become Python objects: a 2 MB text has a million tokens."""
        cut = cut or self.truncation
        n, pieces = self._read_pieces(text, cut)
        ids, offsets = [], []
        for i, piece in self._read(n, pieces, cut):
            ids.append(piece.ids[i])
            a, b = piece.encoding.token_to_chars(i) or (0, 0)
            a, b = piece.first_char + a, piece.first_char + b
            # NFKC composes a letter and a following combining accent into one character; the
            # tokenizer's alignment then points at the letter alone. Keep the accent with it.
            while b < len(text) and unicodedata.combining(text[b]):
                b += 1
            offsets.append((a, b))
        tokens = [self.tokenizer.id_to_token(i) or "" for i in ids]
        return Tokens(n, np.asarray(ids, dtype=np.int64), tokens, offsets)

    def _read_pieces(self, text: str, cut: Truncation) -> tuple[int, list[_Piece]]:
        """The text's number of tokens, and its pieces that hold the tokens the model reads
        (the first ``head``, and at least the last ``tail``); the others are only counted."""
        kept: dict[int, tuple[int, int, Encoding]] = {}  # piece: first token, first char, it
        recent: deque[int] = deque()  # the last pieces, holding at least cut.tail tokens
        n = 0
        for k, (start, enc) in enumerate(self._pieces(text)):
            kept[k] = (n, start, enc)
            recent.append(k)
            n += len(enc)
            while len(recent) > 1 and n - kept[recent[1]][0] >= cut.tail:
                if kept[old := recent.popleft()][0] >= cut.head:
                    del kept[old]  # holds none of the head's tokens, nor of the tail's
        return n, [_Piece(*kept[k], kept[k][2].ids) for k in sorted(kept)]

    def _read(self, n: int, pieces: list[_Piece], cut: Truncation) -> Iterator[tuple[int, _Piece]]:
        """Each token the model reads of a text of ``n`` tokens: its index in its piece."""
        read = range(n) if n <= cut.max_length else [*range(cut.head), *range(n - cut.tail, n)]
        ordered = iter(pieces)
        piece = next(ordered)
        for i in read:
            while i - piece.first_token >= len(piece.ids):
                piece = next(ordered)
            yield i - piece.first_token, piece

    def _long(self, text: str) -> bool:
        return len(text) > self._piece_chars

    def _pieces(self, text: str) -> Iterator[tuple[int, Encoding]]:
        """Each piece's first character and its encoding, one piece encoded at a time."""
        bounds = _cuts(text, int(self._piece_chars)) if self._long(text) else [0, len(text)]
        for a, b in itertools.pairwise(bounds):
            # encode_batch lets go of the GIL while it works (encode does not): a million
            # tokens take about half a second, which the event loop must not wait out.
            (enc,) = self.tokenizer.encode_batch([text[a:b]])
            yield a, enc

    # -- infer ------------------------------------------------------------------------------
    def infer(self, seqs: list[np.ndarray], how: Execution = UNSCHEDULED) -> np.ndarray:
        """POSITIVE logits for one batch of token-id sequences, run as ``how`` says (on ONNX
        Runtime only where this runtime loaded ``model.onnx``; forked only where this model
        can fork: a bundle without the entry point, or CUDA, cannot)."""
        ids, lengths = bundle.pad(seqs)
        if how.onnx and self.onnx is not None:
            return self.onnx(ids.numpy(), lengths.numpy(), how.threads or torch.get_num_threads())
        _use_threads(how.threads)
        if self._pin:
            ids, lengths = ids.pin_memory(), lengths.pin_memory()
        run = self._forked if how.forked and self._forked is not None else self.model
        # TorchScript modules reject inference_mode; no_grad is the equivalent here.
        with torch.no_grad():
            logits = run(
                ids.to(self.device, non_blocking=True), lengths.to(self.device, non_blocking=True)
            )
        return logits.float().cpu().numpy()

    @property
    def has_onnx(self) -> bool:
        """Whether batches can run on ONNX Runtime (the bundle's ``model.onnx`` was loaded)."""
        return self.onnx is not None

    @property
    def can_fork(self) -> bool:
        """Whether the served model has the forked entry point and runs on a CPU."""
        return self._forked is not None

    def explanation(self, ids: np.ndarray, steps: int, chunk_tokens: int) -> IntegratedGradients:
        """An explanation of the logit of ``ids`` (already truncated), to be advanced in chunks
        of ``chunk_tokens`` interpolated tokens (``IntegratedGradients.advance``)."""
        return IntegratedGradients(self, ids, steps, chunk_tokens)

    def cuda_memory(self) -> dict[str, int] | None:
        """Bytes torch holds on the model's CUDA device (None on a CPU): allocated to tensors
        now, reserved by its caching allocator, and the peak allocated since start."""
        if self.device.type != "cuda":
            return None
        return {
            "allocated": torch.cuda.memory_allocated(self.device),
            "reserved": torch.cuda.memory_reserved(self.device),
            "peak": torch.cuda.max_memory_allocated(self.device),
        }

    def warmup(
        self, ways: Sequence[tuple[int, Execution]] = ((1, UNSCHEDULED), (64, UNSCHEDULED))
    ) -> None:
        """Run batches of each ``(size, how)`` of ``ways`` (short texts, then long ones), so
        that the first requests do not pay for lazy set-up: an ONNX Runtime session per thread
        count, torch's inter-op threads. Each must run as batches will (the scheduler's
        ``warm_ups``): torch's inter-op threads, which run a fork's second direction, start at
        the first fork, and warming the fork up on torch's default threads rather than the
        batches' left every lone review at half its rate (52-70 ms of model time against 22)."""
        rng = np.random.default_rng(0)
        vocab = self.tokenizer.get_vocab_size()
        for (size, how), length in itertools.product(ways, (16, self.truncation.max_length)):
            self.infer([rng.integers(2, vocab, size=length) for _ in range(size)], how)

    # -- postprocess ------------------------------------------------------------------------
    def postprocess(
        self, logit: float, tokens: int, function: ScoreFunction = "sigmoid"
    ) -> list[tuple[str, float]]:
        """Labels and scores, best first, for a text of ``tokens`` tokens. The logit is divided
        by the card's temperature for that length first, so 'sigmoid' and 'softmax' (identical
        for one logit) give calibrated probabilities and 'none' gives calibrated log-odds
        (POSITIVE: z, NEGATIVE: -z)."""
        z = logit / self.calibration.temperature_for(tokens)
        if function == "none":
            scores = {self.positive: z, self.negative: -z}
        else:
            p = 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
            scores = {self.positive: p, self.negative: 1.0 - p}
        return sorted(scores.items(), key=lambda kv: kv[1], reverse=True)


def _use_threads(threads: int | None) -> None:
    """torch's intra-op threads for the calling thread's next model call: torch keeps the count
    per calling thread, so each inference worker sets its own."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
