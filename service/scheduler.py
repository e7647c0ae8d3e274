"""The execution policy, in one place: how many batches run side by side, on how many torch
threads each, where a round of queued texts is cut into batches, whether a batch forks the
GRU's two directions, and how much of the workers' time explanations may take.

``Policy`` holds the levers, each at the value the benchmarks chose (docs/benchmarks.md, "CPU
levers"); benchmarks and tests pass other values in-process (``create_app(policy=...)``,
``python -m bench.serve``). ``Policy.resolve`` turns it into a ``Scheduler`` for one device.
The batcher owns the scheduler and asks it at every launch how the batch or chunk is to run
(``runtime.Execution``); the pipeline tells it how many texts are in the service. Nothing
here calls the model: the batcher passes the answer down to the runtime with the batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from service.bundle import RuntimeChoice
from service.runtime import Execution

# On one thread a step of a batch costs about 3 texts' worth however few it holds:
# `python -m bench.limit --cost-model` (docs/benchmarks.md).
CPU_STEP_TEXTS = 3.0


@dataclass(frozen=True)
class BatchCost:
    """The model's time for a batch, in units of one text's step: ``n`` texts padded to ``T``
    tokens cost ``T * (n + step_texts) + CALL_STEPS * step_texts``. ``step_texts`` is what a
    step costs whatever the batch holds (on a CPU a recurrent step is mostly fixed overhead: on
    one thread a step of 1 text costs what 3 to 6 more texts add; ``python -m bench.limit
    --cost-model`` fits it). ``CALL_STEPS`` is a batch's cost outside its steps: in-process the
    fit puts it anywhere from 0 to 25 steps (four runs, within their noise), in the server each
    batch also pays a thread hop, padding and its answers, and it keeps the cuts from making
    batches of a text or two."""

    step_texts: float

    CALL_STEPS: ClassVar[float] = 16.0

    def __call__(self, texts: int, longest: int) -> float:
        return longest * (texts + self.step_texts) + self.CALL_STEPS * self.step_texts


def full_cuts(spans: Sequence[int]) -> list[int]:
    """Where batches end (exclusive) when texts sorted by length fill each batch as far as
    they may: ``spans[j]`` is how many texts a batch whose longest is text ``j`` may hold."""
    ends: list[int] = []
    for j, span in enumerate(spans):
        start = ends[-1] if ends else 0
        if j > start and j - start + 1 > span:  # text j, the longest yet, would overfill it
            ends.append(j)
    return [*ends, len(spans)] if spans else []


def least_cost_cuts(spans: Sequence[int], lengths: Sequence[int], cost: BatchCost) -> list[int]:
    """Where batches end (exclusive) so that the estimated time of all of them is least, for
    texts sorted by length (``lengths``) under the same bounds as ``full_cuts``: a shortest
    path over the cut points, O(texts x span)."""
    # best[j]: the least time for the first j texts, the last batch starting at cut_at[j]. With
    # its end fixed, a batch's cost is linear in where it starts: hence the vector form.
    best = np.zeros(len(lengths) + 1)
    cut_at = [0] * (len(lengths) + 1)
    starts = np.arange(len(lengths) + 1, dtype=np.float64)
    for j in range(1, len(lengths) + 1):
        longest, lo = lengths[j - 1], max(0, j - spans[j - 1])
        candidates = best[lo:j] - longest * starts[lo:j]
        at = int(candidates.argmin())
        cut_at[j] = lo + at
        best[j] = candidates[at] + cost(j, longest)
    ends: list[int] = []
    j = len(lengths)
    while j > 0:
        ends.append(j)
        j = cut_at[j]
    return ends[::-1]


@dataclass(frozen=True)
class Policy:
    """The levers, at the values the benchmarks kept. None: chosen for the device."""

    # Batches side by side (Triton's model instances). None: on a CPU one per torch thread,
    # each on one thread (beats one batch on every thread); on CUDA one (one stream runs them).
    workers: int | None = None
    # The cost model's fixed cost of a step, in texts. None: CPU_STEP_TEXTS on a CPU, none on
    # CUDA (where a batch's size costs little); 0: none, batches as full as the bounds allow.
    step_texts: float | None = None
    # A batch that has the CPU to itself takes every thread: on TorchScript the GRU's two
    # directions on two threads, on ONNX Runtime a session on all of them.
    fork: bool = True
    # The most of the workers' time explanations take while predictions wait.
    explain_share: float = 0.25
    # Under SENTIMENT_RUNTIME=auto, batches of at most this many texts run on ONNX Runtime
    # where the bundle has model.onnx, larger ones on TorchScript: on one thread ONNX Runtime
    # reads one review 3-4x as fast as int8 TorchScript, 16 about as fast, 64 slower
    # (docs/benchmarks.md, "ONNX Runtime"). 0: TorchScript only.
    onnx_max_texts: int = 16

    def __post_init__(self) -> None:
        if not 0 < self.explain_share <= 1:
            raise ValueError(f"explain_share must be in (0, 1], got {self.explain_share}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if self.step_texts is not None and self.step_texts < 0:
            raise ValueError(f"step_texts must be at least 0, got {self.step_texts}")
        if self.onnx_max_texts < 0:
            raise ValueError(f"onnx_max_texts must be at least 0, got {self.onnx_max_texts}")

    def resolve(
        self,
        on_cpu: bool,
        torch_threads: int,
        max_batch_size: int,
        max_batch_tokens: int,
        runtime: RuntimeChoice = "auto",
    ) -> Scheduler:
        """The scheduler for a model on a CPU (``torch_threads`` intra-op threads) or CUDA,
        under the ``runtime`` choice (``SENTIMENT_RUNTIME``)."""
        workers = self.workers or (torch_threads if on_cpu else 1)
        step_texts = self.step_texts
        if step_texts is None:
            step_texts = CPU_STEP_TEXTS if on_cpu else 0.0
        return Scheduler(
            workers=workers,
            # Side by side, each worker keeps its share of the threads: a batch on more would
            # take cores another worker's batch is using. CUDA: torch's setting, untouched.
            threads=max(1, torch_threads // workers) if on_cpu else None,
            cost=BatchCost(step_texts) if step_texts > 0 else None,
            # Only where a batch on one thread leaves a core for the second direction.
            fork=self.fork and on_cpu and torch_threads > 1,
            explain_share=self.explain_share,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            onnx_max_texts=(
                0
                if not on_cpu or runtime == "torchscript"
                else max_batch_size
                if runtime == "onnx"
                else min(self.onnx_max_texts, max_batch_size)
            ),
        )


class Scheduler:
    """One device's execution policy, and the little state it decides with: the texts in the
    service (pushed by the pipeline) and the explanations' credit. Used from the event loop
    only, so it needs no lock."""

    def __init__(
        self,
        *,
        workers: int,
        threads: int | None,
        cost: BatchCost | None,
        fork: bool,
        explain_share: float,
        max_batch_size: int,
        max_batch_tokens: int,
        onnx_max_texts: int = 0,
    ) -> None:
        self.workers = workers
        self.threads = threads
        self.cost = cost
        self.fork = fork
        self.explain_share = explain_share
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        # Batches of at most this many texts run on ONNX Runtime (where the model has it).
        self.onnx_max_texts = onnx_max_texts
        self._in_service = 0
        self._peak = 0  # the most texts in the service at once since the last batch began
        # Seconds of worker time explanations may take before the next prediction batch.
        self._credit = 0.0

    # -- batches ----------------------------------------------------------------------------
    def cuts(self, lengths: Sequence[int], most: int) -> list[int]:
        """Where texts sorted by ``lengths`` are cut into batches (ends, exclusive) of at most
        ``most`` texts within the token budget: where the cost model's total is least, or as
        full as the bounds allow without one."""
        lengths = [max(length, 1) for length in lengths]
        spans = [max(1, min(most, self.max_batch_tokens // length)) for length in lengths]
        return least_cost_cuts(spans, lengths, self.cost) if self.cost else full_cuts(spans)

    def batch(self, texts: int, running: int) -> Execution:
        """How a batch of ``texts`` launched while ``running`` batches or chunks run is to run:
        on ONNX Runtime if it holds at most ``onnx_max_texts`` texts, else on TorchScript.

        It takes every core (ONNX Runtime on all threads, or TorchScript forked) when it is all
        the work there has been: nothing else runs, it runs on one thread, and since the last
        batch began the service held no more texts than this batch. The second core is idle
        only then: under a closed loop of even a few clients it
        is parsing and tokenising their next requests, and a fork there cost 15% at 16 clients
        (docs/benchmarks.md, "CPU levers")."""
        peak, self._peak = self._peak, self._in_service  # each batch starts a new count
        alone = self.fork and running == 0 and self.threads == 1 and peak <= texts
        return self._on_the_cpu(texts) if alone else Execution(self.threads, onnx=self._onnx(texts))

    def alone(self) -> Execution:
        """How a lone text that has the machine to itself runs (what the warm-up runs)."""
        return self._on_the_cpu(1) if self.fork else Execution(self.threads, onnx=self._onnx(1))

    def warm_ups(self) -> list[tuple[int, Execution]]:
        """Each way a batch can run, with a batch size that runs so: what the warm-up runs."""
        ways = [(1, Execution(self.threads)), (self.max_batch_size, Execution(self.threads))]
        if self.onnx_max_texts:
            ways += [
                (size, Execution(self.threads, onnx=True)) for size in (1, self.onnx_max_texts)
            ]
        if self.fork:
            ways += [(1, self.alone()), (1, Execution(self.threads, forked=True))]
        return list(dict.fromkeys(ways))

    def _onnx(self, texts: int) -> bool:
        return texts <= self.onnx_max_texts

    def _on_the_cpu(self, texts: int) -> Execution:
        """A batch that has every core: ONNX Runtime on all the workers' threads, or the
        TorchScript model forked."""
        if self._onnx(texts):
            return Execution(self.workers * (self.threads or 1), onnx=True)
        return Execution(self.threads, forked=True)

    def chunk(self) -> Execution:
        """How an explanation's chunk runs: on the worker's threads, never forked (the
        gradient goes through ``forward_embedded``)."""
        return Execution(self.threads)

    @contextmanager
    def in_service(self, texts: int) -> Iterator[None]:
        """Counts ``texts`` as admitted and not yet answered while the block runs."""
        self._in_service += texts
        self._peak = max(self._peak, self._in_service)
        try:
            yield
        finally:
            self._in_service -= texts

    # -- explanations' share ----------------------------------------------------------------
    def jobs_turn(self, predictions_busy: bool) -> bool:
        """Whether a waiting explanation may run its next chunk now: always while predictions
        are idle, else while it has credit left."""
        return self.explain_share == 1 or self._credit > 0 or not predictions_busy

    def batch_ran(self, seconds: float) -> None:
        """A prediction batch ran while explanations waited: they earn their share of it."""
        if self.explain_share < 1:
            self._credit += seconds * self.explain_share / (1 - self.explain_share)

    def chunk_ran(self, seconds: float, contended: bool) -> None:
        """A chunk ran; while predictions were busy its time is spent from the credit."""
        if contended:
            self._credit -= seconds

    def jobs_done(self) -> None:
        """No explanation waits: credit is not banked (debt is: it was taken from predictions)."""
        self._credit = min(self._credit, 0.0)

    def runtime(self, has_onnx: bool) -> str:
        """What runs prediction batches, for a model that has ``model.onnx`` loaded or not:
        ``torchscript``, ``onnxruntime``, or ``onnxruntime+torchscript`` (small batches on the
        first, larger ones on the second)."""
        if not has_onnx or self.onnx_max_texts == 0:
            return "torchscript"
        return (
            "onnxruntime"
            if self.onnx_max_texts >= self.max_batch_size
            else "onnxruntime+torchscript"
        )

    def describe(self, can_fork: bool, has_onnx: bool) -> dict[str, Any]:
        """What ``/info`` reports: the policy as resolved, for a model that can fork or not and
        that has ``model.onnx`` loaded or not."""
        return {
            "runtime": self.runtime(has_onnx),
            "onnx_max_texts": self.onnx_max_texts if has_onnx else 0,
            "inference_workers": self.workers,
            "threads_per_batch": self.threads,
            "batch_step_texts": self.cost.step_texts if self.cost else 0.0,
            "fork_directions": self.fork and can_fork,
            "explain_share": self.explain_share,
        }
