"""Dynamic batching: texts from concurrent requests are merged into model batches.

A batch closes when ``max_batch_size`` texts wait or when the oldest waiting text has waited
``max_wait_s`` (measured with ``time.monotonic()``). Each round takes the oldest texts (up to
four batches' worth), sorts them by length and cuts them into batches bounded by both the text
count and the padded-token budget, so short texts are not padded to a long neighbour's length.
Inference runs in one worker thread, never on the event loop. Whatever happens, every waiting
future is answered: with a result, a timeout, or the error that stopped its batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.errors import ErrorType, ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)

InferFn = Callable[[list[np.ndarray]], np.ndarray]
ROUND_BATCHES = 4


@dataclass(frozen=True)
class ItemResult:
    logit: float
    queue_s: float  # from submission to the start of its batch
    inference_s: float  # its batch's model time
    batch_size: int


@dataclass
class _Pending:
    ids: np.ndarray
    future: asyncio.Future[ItemResult]
    enqueued: float
    deadline: float


class DynamicBatcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue: int,
        metrics: Metrics | None = None,
    ) -> None:
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._metrics = metrics or Metrics()
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._accepting = False

    @property
    def depth(self) -> int:
        return len(self._pending)

    async def start(self) -> None:
        self._accepting = True
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Refuse new work, finish everything already accepted, then stop the worker."""
        self._accepting = False
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def submit(self, seqs: list[np.ndarray], deadline: float) -> list[asyncio.Future[ItemResult]]:
        """Queue texts (token ids) for inference; all or none of them are accepted."""
        if not self._accepting:
            raise ServiceError(ErrorType.UNAVAILABLE, "the service is shutting down")
        if len(self._pending) + len(seqs) > self.max_queue:
            raise ServiceError(
                ErrorType.OVERLOADED,
                f"queue full: {len(self._pending)} texts waiting, limit {self.max_queue}",
                retry_after=1,
            )
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        futures: list[asyncio.Future[ItemResult]] = []
        for ids in seqs:
            future: asyncio.Future[ItemResult] = loop.create_future()
            self._pending.append(_Pending(ids, future, now, deadline))
            futures.append(future)
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return futures

    async def _loop(self) -> None:
        try:
            while self._pending or self._accepting:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                await self._wait_for_company()
                for batch in self._next_round():
                    await self._run(batch)
        finally:
            # Only reached with work left if the loop itself failed: answer it anyway.
            for item in self._pending:
                if not item.future.done():
                    item.future.set_exception(
                        ServiceError(ErrorType.UNAVAILABLE, "the batcher stopped")
                    )
            self._pending.clear()

    async def _wait_for_company(self) -> None:
        close_at = self._pending[0].enqueued + self.max_wait_s
        while self._accepting and len(self._pending) < self.max_batch_size:
            remaining = close_at - time.monotonic()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    def _next_round(self) -> list[list[_Pending]]:
        take = min(len(self._pending), self.max_batch_size * ROUND_BATCHES)
        window = [self._pending.popleft() for _ in range(take)]
        self._metrics.queue_depth.set(len(self._pending))
        # A cancelled text's request gave up (client gone, or deadline passed): skip it. The
        # request's own error answer is what gets counted.
        live = [item for item in window if not item.future.cancelled()]
        live.sort(key=lambda item: len(item.ids))
        batches: list[list[_Pending]] = []
        current: list[_Pending] = []
        for item in live:
            longest = max(len(item.ids), 1)  # sorted: the newcomer is the longest
            if current and (
                len(current) == self.max_batch_size
                or (len(current) + 1) * longest > self.max_batch_tokens
            ):
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
        return batches

    async def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        live = []
        for item in batch:
            if item.future.done():
                continue
            if item.deadline <= started:
                item.future.set_exception(
                    ServiceError(ErrorType.TIMEOUT, "request deadline passed while queued")
                )
            else:
                live.append(item)
        if not live:
            return
        loop = asyncio.get_running_loop()
        try:
            logits = await loop.run_in_executor(self._executor, self._infer, [i.ids for i in live])
        except Exception:
            log.exception("inference failed for a batch of %d texts", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(
                        ServiceError(ErrorType.BACKEND, "inference failed; see the server log")
                    )
            return
        elapsed = time.monotonic() - started
        m = self._metrics
        m.batch_size.observe(len(live))
        m.batch_tokens.observe(len(live) * max(1, max(len(i.ids) for i in live)))
        m.inference_duration.observe(elapsed)
        for item, logit in zip(live, logits, strict=True):
            m.queue_duration.observe(started - item.enqueued)
            if not item.future.done():  # cancelled while it ran: the answer has no taker
                item.future.set_result(
                    ItemResult(float(logit), started - item.enqueued, elapsed, len(live))
                )
