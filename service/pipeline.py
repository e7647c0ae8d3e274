"""One request's way through the service: tokenise, check lengths, queue its texts on the
batcher, wait (bounded by the deadline and by the client staying connected), format scores.

An explanation takes the same way with more work: its text is tokenised with offsets and cut
into sentences and clauses (``segments``); the segments are scored as predictions and the text
is explained by integrated gradients, a job the batcher runs in chunks between prediction
rounds. Explanations have their own admission bound and deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from service import segments
from service.batcher import DynamicBatcher, ItemResult, JobResult
from service.bundle import Truncation, TruncationDirection
from service.config import Settings
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.runtime import Attribution, Encoded, ModelRuntime, ScoreFunction, Tokens
from service.segments import MIXED_CONFIDENCE
from service.tracing import Stages

# Interpolated tokens per explanation chunk. A chunk is a forward and a backward pass: 4,096
# tokens take about 0.5 s on two CPU cores, close to a prediction batch of 64 reviews (0.43 s,
# 15k tokens forward only), so a prediction waits at most about that behind a chunk.
EXPLAIN_CHUNK_TOKENS = 4096


@dataclass(frozen=True)
class Timing:
    model_version: str  # the card's version of the model that answered
    tokens: int
    tokenization_s: float
    queue_s: float  # the longest wait of any of its texts
    inference_s: float  # the longest batch any of its texts ran in (an explanation's chunks)

    def headers(self) -> dict[str, str]:
        """Where the time went, in milliseconds, as TEI's response headers say it."""
        total_s = self.tokenization_s + self.queue_s + self.inference_s
        return {
            "x-model-version": self.model_version,
            "x-tokenization-time": f"{self.tokenization_s * 1e3:.3f}",
            "x-queue-time": f"{self.queue_s * 1e3:.3f}",
            "x-inference-time": f"{self.inference_s * 1e3:.3f}",
            "x-total-time": f"{total_s * 1e3:.3f}",
            "x-compute-tokens": str(self.tokens),
        }


@dataclass(frozen=True)
class Prediction:
    scores: list[list[dict[str, Any]]]  # per text: labels and scores, best first
    timing: Timing


@dataclass(frozen=True)
class Explanations:
    explanations: list[dict[str, Any]]  # per text, as schemas.Explanation
    timing: Timing


@dataclass(frozen=True)
class _Dropped:
    """The tokens truncation dropped: ``start`` to ``end`` (token indices, end exclusive), in
    the characters ``text_start`` to ``text_end`` (from the end of the last token read from
    the start to the first read from the end)."""

    start: int
    end: int
    text_start: int
    text_end: int


@dataclass(frozen=True)
class _ToExplain:
    """One text prepared for explanation."""

    tokens: list[str]  # the tokens the model reads
    offsets: list[tuple[int, int]]  # each one's place in the text
    encoded: Encoded  # its ids as the model reads them (truncated)
    dropped: _Dropped | None
    spans: list[segments.Span]  # the sentences and clauses that hold text the model reads
    segments: list[Encoded]


class _Admission:
    """The door, where every admission limit is checked: at most ``per_request`` texts in one
    request, and never more than ``limit`` (413), and at most ``limit`` texts between admission
    and answer (tokenising, queued or running; beyond it, 429 at once)."""

    def __init__(self, limit: int, per_request: int, request: str, busy: str) -> None:
        self.limit = limit
        self.per_request = per_request
        self.request = request  # what the 413 calls a request
        self.busy = busy  # the 429's message, "{}" the count in progress
        self.count = 0

    @contextmanager
    def admit(self, texts: int) -> Iterator[None]:
        most = min(self.per_request, self.limit)  # more could never be admitted: not a 429
        if texts > most:
            raise ServiceError(
                ErrorType.TOO_MANY_INPUTS,
                f"{texts} inputs in one {self.request}; the limit is {most}",
            )
        if self.count + texts > self.limit:
            raise ServiceError(
                ErrorType.OVERLOADED,
                f"{self.busy.format(self.count)} in progress, limit {self.limit}",
                retry_after=1,
            )
        self.count += texts
        try:
            yield
        finally:
            self.count -= texts


class Predictor:
    def __init__(
        self, runtime: ModelRuntime, batcher: DynamicBatcher, settings: Settings, metrics: Metrics
    ) -> None:
        self.runtime = runtime
        self.batcher = batcher
        self.settings = settings
        self.metrics = metrics
        # Tokenising in its own threads keeps the event loop free and does not queue behind
        # inference, which has the batcher's thread. The tokenizer releases the GIL, so
        # several requests tokenise at once where there are cores for it.
        self._tokenizer_pool = ThreadPoolExecutor(
            max_workers=settings.tokenization_workers, thread_name_prefix="tokenize"
        )
        # Admission control at the door: a backlog must not build up before the batcher's queue
        # (in the tokeniser's queue, say), where no bound would see it.
        self._predictions = _Admission(
            settings.max_queue_texts,
            settings.max_inputs_per_request,
            "request",
            "server busy: {} texts",
        )
        # One bound for both: an explanation request's texts are each a long job.
        self._explanations = _Admission(
            settings.explain_max_queue,
            settings.explain_max_queue,
            "explanation request",
            "explanations busy: {}",
        )

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=True)

    async def predict(
        self,
        texts: list[str],
        truncate: bool | None = None,
        function: ScoreFunction | None = None,
        top_k: int | None = None,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        direction: TruncationDirection | None = None,
    ) -> Prediction:
        """Scores for ``texts``; a longer text cut as the card says, or (``direction``, TEI's
        truncation_direction) keeping its start ("Right": cut on the right) or its end."""
        # The scheduler decides with the texts in the service (tokenising, queued or running).
        with self._predictions.admit(len(texts)), self.batcher.scheduler.in_service(len(texts)):
            return await self._predict(texts, truncate, function, top_k, disconnected, direction)

    async def tokenize(self, texts: list[str]) -> list[Tokens]:
        """The tokens the model reads of each text, in the tokenising pool; admitted as
        predictions are (the same bounds)."""
        with self._predictions.admit(len(texts)):
            runtime = self.runtime
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._tokenizer_pool, lambda: [runtime.tokenize(t) for t in texts]
            )

    async def _predict(
        self,
        texts: list[str],
        truncate: bool | None,
        function: ScoreFunction | None,
        top_k: int | None,
        disconnected: Callable[[], Awaitable[Any]] | None,
        direction: TruncationDirection | None,
    ) -> Prediction:
        started = time.monotonic()
        stages = Stages()  # children of the request's span, where traces are on
        deadline = started + self.settings.request_timeout_s
        runtime = self.runtime  # this request's model, to the end, whatever a reload does
        longest = runtime.truncation.max_length
        cut = None if direction is None else Truncation.toward(longest, direction)
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self._tokenizer_pool, runtime.preprocess, texts, cut)
        tokenization_s = time.monotonic() - started
        self.metrics.tokenization_duration.observe(tokenization_s)

        truncated = self._check_lengths(runtime, encoded, truncate)
        submitted = time.monotonic()
        futures = self.batcher.submit([e.ids for e in encoded], deadline, runtime.infer)
        self.metrics.inputs.inc(len(texts))
        self.metrics.inputs_truncated.inc(truncated)
        results: list[ItemResult] = await self._wait(
            futures, deadline, self.settings.request_timeout_s, disconnected
        )

        queue_s = max(r.queue_s for r in results)
        inference_s = max(r.inference_s for r in results)
        tokens = sum(len(e.ids) for e in encoded)
        stages.add("tokenize", started, tokenization_s, texts=len(texts), tokens=tokens)
        last = max(results, key=lambda r: r.queue_s + r.inference_s)  # the text answered last
        stages.add("queue", submitted, last.queue_s)
        stages.add("inference", submitted + last.queue_s, last.inference_s)
        k = top_k or 2
        return Prediction(
            scores=[
                [
                    {"label": label, "score": score}
                    for label, score in runtime.postprocess(
                        r.logit, e.original_tokens, function or "sigmoid"
                    )[:k]
                ]
                for r, e in zip(results, encoded, strict=True)
            ],
            timing=Timing(
                model_version=runtime.card.version,
                tokens=tokens,
                tokenization_s=tokenization_s,
                queue_s=queue_s,
                inference_s=inference_s,
            ),
        )

    def _check_lengths(
        self, runtime: ModelRuntime, encoded: list[Encoded], truncate: bool | None
    ) -> int:
        """413 for a text longer than the model reads unless truncation is asked for (or on by
        default); else the number of texts that will be truncated."""
        cut = runtime.truncation
        too_long = [
            (i, e.original_tokens)
            for i, e in enumerate(encoded)
            if e.original_tokens > cut.max_length
        ]
        if too_long and not (self.settings.auto_truncate if truncate is None else truncate):
            i, n = too_long[0]
            where = "inputs" if len(encoded) == 1 else f"inputs[{i}]"
            raise ServiceError(
                ErrorType.INPUT_TOO_LONG,
                f"{where} has {n} tokens; the model reads at most {cut.max_length}. "
                f'Send "truncate": true to score its first {cut.head} and last {cut.tail} tokens',
            )
        return len(too_long)

    # -- explanations -----------------------------------------------------------------------
    async def explain(
        self,
        texts: list[str],
        truncate: bool | None = None,
        steps: int | None = None,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> Explanations:
        with self._explanations.admit(len(texts)):
            steps = steps or self.settings.explain_steps
            return await self._explain(texts, truncate, steps, disconnected)

    async def _explain(
        self,
        texts: list[str],
        truncate: bool | None,
        steps: int,
        disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> Explanations:
        started = time.monotonic()
        deadline = started + self.settings.explain_timeout_s
        runtime = self.runtime  # this request's model, to the end, whatever a reload does
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._tokenizer_pool, _prepare, runtime, texts)
        tokenization_s = time.monotonic() - started
        self.metrics.tokenization_duration.observe(tokenization_s)
        self._check_lengths(runtime, [p.encoded for p in prepared], truncate)

        # The texts and their segments are scored as predictions, queued as the explanations'
        # own (they do not hold the jobs back), then one job per text. Each text's label and
        # score are /predict's, from the served model; the attributions may come from model.pt
        # (an int8 service: see runtime).
        scored_ids = [p.encoded.ids for p in prepared]
        scored_ids += [s.ids for p in prepared for s in p.segments]
        scored = self.batcher.submit(scored_ids, deadline, runtime.infer, background=True)
        jobs: list[asyncio.Future[JobResult]] = []
        attributions = []
        try:
            for p in prepared:
                job = runtime.explanation(p.encoded.ids, steps, EXPLAIN_CHUNK_TOKENS)
                jobs.append(self.batcher.submit_job(job, deadline))
                attributions.append(job)
        except ServiceError:
            for future in scored:
                future.cancel()
            for job_future in jobs:
                job_future.cancel()
            raise
        results = await self._wait(
            [*jobs, *scored], deadline, self.settings.explain_timeout_s, disconnected
        )
        timings: list[JobResult] = results[: len(jobs)]
        logits = [r.logit for r in results[len(jobs) :]]
        text_logits, segment_logits = logits[: len(texts)], iter(logits[len(texts) :])
        explanations = [
            _explanation(
                runtime, text, p, job.result(), logit, [next(segment_logits) for _ in p.spans]
            )
            for text, p, job, logit in zip(texts, prepared, attributions, text_logits, strict=True)
        ]
        return Explanations(
            explanations,
            Timing(
                model_version=runtime.card.version,
                tokens=sum(len(p.encoded.ids) for p in prepared) * steps,
                tokenization_s=tokenization_s,
                queue_s=max(t.queue_s for t in timings),
                inference_s=max(t.inference_s for t in timings),
            ),
        )

    async def _wait(
        self,
        futures: list[asyncio.Future[Any]],
        deadline: float,
        limit_s: float,
        disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> list[Any]:
        everything = asyncio.gather(*futures)
        waiters: set[asyncio.Future[Any]] = {everything}
        watcher = asyncio.ensure_future(disconnected()) if disconnected is not None else None
        if watcher is not None:
            waiters.add(watcher)
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if watcher is not None:
                watcher.cancel()
            if not everything.done():  # given up: disconnect, deadline, or this task cancelled
                everything.cancel()  # its texts that have not run yet will be skipped
                # A cancelled gather settles with a CancelledError that nobody awaits; retrieve
                # it, or asyncio logs "exception was never retrieved" for every dropped request.
                everything.add_done_callback(_retrieve)
        if everything in done:
            return list(everything.result())  # raises the error of a failed text, if any
        if watcher is not None and watcher in done:
            raise ServiceError(ErrorType.CLIENT_CLOSED, "the client disconnected")
        raise ServiceError(ErrorType.TIMEOUT, f"no answer within {limit_s} s")


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _prepare(runtime: ModelRuntime, texts: list[str]) -> list[_ToExplain]:
    """For each text: the tokens the model reads, with their offsets; the ids it reads; the
    tokens truncation drops, as a range; and the sentences and clauses of the text it reads (a
    sentence that truncation cuts is scored on its part read). Nothing here grows with the
    text beyond its tokenisation: a 2 MB text's answer lists ``max_length`` tokens, not a
    million."""
    cut = runtime.truncation
    prepared = []
    for text in texts:
        tokens = runtime.tokenize(text)
        n = tokens.count
        dropped = None
        if n > cut.max_length:  # the first token dropped follows the head, the last precedes
            first = tokens.offsets[cut.head - 1][1] if cut.head else 0
            last = tokens.offsets[cut.head][0] if cut.tail else len(text)
            dropped = _Dropped(cut.head, n - cut.tail, first, last)
        if dropped is None:
            spans = segments.split(text)
        else:  # the read parts only: splitting 2 MB into sentences holds the GIL for 0.5 s
            tail = dropped.text_end
            spans = segments.split(text[: dropped.text_start])
            spans += [(tail + a, tail + b) for a, b in segments.split(text[tail:])]
        parts = runtime.preprocess([text[a:b] for a, b in spans]) if spans else []
        prepared.append(
            _ToExplain(
                tokens.tokens,
                tokens.offsets,
                Encoded(tokens.ids, n),
                dropped,
                spans,
                parts,
            )
        )
    return prepared


def _explanation(
    runtime: ModelRuntime,
    text: str,
    p: _ToExplain,
    attribution: Attribution,
    logit: float,
    segment_logits: list[float],
) -> dict[str, Any]:
    """The answer for one text, as ``schemas.Explanation``."""
    n = p.encoded.original_tokens
    label, score = runtime.postprocess(logit, n)[0]
    verdicts = [
        runtime.postprocess(z, part.original_tokens)[0]
        for z, part in zip(segment_logits, p.segments, strict=True)
    ]
    sentences = [
        {"start": start, "end": end, "label": s_label, "score": s_score}
        for (start, end), (s_label, s_score) in zip(p.spans, verdicts, strict=True)
    ]
    confident = {s_label for s_label, s_score in verdicts if s_score >= MIXED_CONFIDENCE}
    return {
        "label": label,
        "score": score,
        "tokens": [
            {"token": token, "text": text[a:b], "start": a, "end": b, "attribution": float(z)}
            for token, (a, b), z in zip(p.tokens, p.offsets, attribution.tokens, strict=True)
        ],
        "dropped_tokens": None if p.dropped is None else dataclasses.asdict(p.dropped),
        "sentences": sentences,
        "mixed": len(confident) > 1,
        "completeness": {
            "attribution_sum": float(attribution.tokens.sum()),
            "logit": attribution.logit,
            "baseline_logit": attribution.baseline_logit,
            "gap": attribution.gap,
        },
        "steps": attribution.steps,
    }
