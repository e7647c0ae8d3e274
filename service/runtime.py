"""The model runtime: a loaded bundle, then preprocess, infer and postprocess, as the stages of
TorchServe's base handler. No HTTP and no serving policy here: the batcher, the benchmark's
peers and the tests call it directly, and a batch runs as the caller's ``Execution`` says (the
scheduler's choice of threads and entry point); the runtime never asks the layers above."""

from __future__ import annotations

import math
import unicodedata
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from service import bundle

ScoreFunction = Literal["sigmoid", "softmax", "none"]


@dataclass(frozen=True)
class Encoded:
    """One text as the model will read it."""

    ids: np.ndarray  # int64 token ids, already cut by the bundle's truncation rule
    original_tokens: int  # tokens before truncation


@dataclass(frozen=True)
class Tokens:
    """One text as the tokenizer reads it: all its ids, and the tokens the model reads (after
    truncation) with their places in the original text."""

    ids: np.ndarray  # int64, all of them (before truncation)
    tokens: list[str]  # their vocabulary entries, <unk> for an unknown word
    offsets: list[tuple[int, int]]  # text[start:end] is the token as written


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
    """How the scheduler asks one model call to run: on how many torch intra-op threads (None:
    leave torch's setting as it is) and, on a CPU, through the bundle's ``forward_forked``
    entry point (each GRU layer's two directions on two threads) where it has one."""

    threads: int | None = None
    forked: bool = False


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

    @classmethod
    def load(
        cls,
        folder: Path,
        device: str | torch.device = "auto",
        precision: bundle.PrecisionChoice = "float32",
    ) -> ModelRuntime:
        """``bundle.load`` (a ``BundleError`` for every way it can be unusable), wrapped."""
        return cls(bundle.load(folder, device, precision))

    # -- preprocess -------------------------------------------------------------------------
    def preprocess(self, texts: list[str]) -> list[Encoded]:
        """Tokenise, then cut longer texts by the card's truncation rule."""
        encoded = []
        for enc in self.tokenizer.encode_batch(texts):
            ids = np.asarray(enc.ids, dtype=np.int64)
            encoded.append(Encoded(self.truncation.apply(ids), len(ids)))
        return encoded

    def tokenize(self, text: str) -> Tokens:
        """The tokens the model reads of one text (all of them, or the ones the card's
        truncation keeps), each with its place in ``text``, and the ids of all of them. Only
        the read tokens become Python objects: a 2 MB text has a million tokens."""
        # encode_batch lets go of the GIL while it works (encode does not): a million tokens
        # take about half a second, which the event loop must not wait out.
        (enc,) = self.tokenizer.encode_batch([text])
        ids = np.asarray(enc.ids, dtype=np.int64)
        cut, n = self.truncation, len(ids)
        read = range(n) if n <= cut.max_length else [*range(cut.head), *range(n - cut.tail, n)]
        offsets = []
        for i in read:
            start, end = enc.token_to_chars(i) or (0, 0)
            # NFKC composes a letter and a following combining accent into one character; the
            # tokenizer's alignment then points at the letter alone. Keep the accent with it.
            while end < len(text) and unicodedata.combining(text[end]):
                end += 1
            offsets.append((start, end))
        tokens = [self.tokenizer.id_to_token(int(ids[i])) or "" for i in read]
        return Tokens(ids, tokens, offsets)

    # -- infer ------------------------------------------------------------------------------
    def infer(self, seqs: list[np.ndarray], how: Execution = UNSCHEDULED) -> np.ndarray:
        """POSITIVE logits for one batch of token-id sequences, run as ``how`` says (forked
        only where this model can fork: a bundle without the entry point, or CUDA, cannot)."""
        ids, lengths = bundle.pad(seqs)
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
        self, batch_sizes: tuple[int, ...] = (1, 8, 64), how: Execution = UNSCHEDULED
    ) -> None:
        """Run the model on a few shapes on ``how.threads``, and a lone text as ``how`` says
        (forked or not), so that the first requests do not pay for lazy set-up. torch's
        inter-op threads, which run a fork's second direction, start at the first fork:
        warming the fork up on torch's default threads rather than the batches' left every
        lone review at half its rate (52-70 ms of model time against 22 ms)."""
        rng = np.random.default_rng(0)
        vocab = self.tokenizer.get_vocab_size()
        batches = Execution(how.threads)
        for size in batch_sizes:
            for length in (16, self.truncation.max_length):
                self.infer([rng.integers(2, vocab, size=length) for _ in range(size)], batches)
        if self._forked is not None and how.forked:  # what a lone request runs
            for _ in range(2):
                self.infer([rng.integers(2, vocab, size=16)], how)

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
