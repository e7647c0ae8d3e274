"""One request's way through the service: tokenise, check lengths, queue its texts on the
batcher, wait (bounded by the deadline and by the client staying connected), format scores."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from service.batcher import DynamicBatcher, ItemResult
from service.config import Settings
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.runtime import ModelRuntime, ScoreFunction


@dataclass(frozen=True)
class Prediction:
    scores: list[list[dict[str, Any]]]  # per text: labels and scores, best first
    tokens: int
    tokenization_s: float
    queue_s: float  # the longest wait of any of its texts
    inference_s: float  # the longest batch any of its texts ran in

    def headers(self) -> dict[str, str]:
        """Where the time went, in milliseconds, as TEI's response headers say it."""
        total_s = self.tokenization_s + self.queue_s + self.inference_s
        return {
            "x-tokenization-time": f"{self.tokenization_s * 1e3:.3f}",
            "x-queue-time": f"{self.queue_s * 1e3:.3f}",
            "x-inference-time": f"{self.inference_s * 1e3:.3f}",
            "x-total-time": f"{total_s * 1e3:.3f}",
            "x-compute-tokens": str(self.tokens),
        }


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
        self._admitted = 0  # texts between admission and answer: tokenising, queued or running

    def close(self) -> None:
        self._tokenizer_pool.shutdown(wait=True)

    async def predict(
        self,
        texts: list[str],
        truncate: bool | None = None,
        function: ScoreFunction | None = None,
        top_k: int | None = None,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
    ) -> Prediction:
        limit = self.settings.max_inputs_per_request
        if len(texts) > limit:
            raise ServiceError(
                ErrorType.TOO_MANY_INPUTS,
                f"{len(texts)} inputs in one request; the limit is {limit}",
            )
        # Admission control at the door: a backlog must not build up before the batcher's queue
        # (in the tokeniser's queue, say), where no bound would see it.
        capacity = self.settings.max_queue_texts
        if self._admitted + len(texts) > capacity:
            raise ServiceError(
                ErrorType.OVERLOADED,
                f"server busy: {self._admitted} texts in progress, limit {capacity}",
                retry_after=1,
            )
        self._admitted += len(texts)
        try:
            return await self._predict(texts, truncate, function, top_k, disconnected)
        finally:
            self._admitted -= len(texts)

    async def _predict(
        self,
        texts: list[str],
        truncate: bool | None,
        function: ScoreFunction | None,
        top_k: int | None,
        disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> Prediction:
        started = time.monotonic()
        deadline = started + self.settings.request_timeout_s
        loop = asyncio.get_running_loop()
        encoded = await loop.run_in_executor(self._tokenizer_pool, self.runtime.preprocess, texts)
        tokenization_s = time.monotonic() - started
        self.metrics.tokenization_duration.observe(tokenization_s)

        cut = self.runtime.truncation
        max_length = cut.max_length
        too_long = [
            (i, e.original_tokens) for i, e in enumerate(encoded) if e.original_tokens > max_length
        ]
        if too_long and not (self.settings.auto_truncate if truncate is None else truncate):
            i, n = too_long[0]
            where = "inputs" if len(texts) == 1 else f"inputs[{i}]"
            raise ServiceError(
                ErrorType.INPUT_TOO_LONG,
                f"{where} has {n} tokens; the model reads at most {max_length}. "
                f'Send "truncate": true to score its first {cut.head} and last {cut.tail} tokens',
            )

        futures = self.batcher.submit([e.ids for e in encoded], deadline)
        self.metrics.inputs.inc(len(texts))
        self.metrics.inputs_truncated.inc(len(too_long))
        results = await self._wait(futures, deadline, disconnected)

        k = top_k or 2
        return Prediction(
            scores=[
                [
                    {"label": label, "score": score}
                    for label, score in self.runtime.postprocess(r.logit, function or "sigmoid")[:k]
                ]
                for r in results
            ],
            tokens=sum(len(e.ids) for e in encoded),
            tokenization_s=tokenization_s,
            queue_s=max(r.queue_s for r in results),
            inference_s=max(r.inference_s for r in results),
        )

    async def _wait(
        self,
        futures: list[asyncio.Future[ItemResult]],
        deadline: float,
        disconnected: Callable[[], Awaitable[Any]] | None,
    ) -> list[ItemResult]:
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
        raise ServiceError(
            ErrorType.TIMEOUT, f"no answer within {self.settings.request_timeout_s} s"
        )


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
