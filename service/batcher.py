"""Dynamic batching: texts from concurrent requests are merged into model batches.

A batch closes when ``max_batch_size`` texts wait or when the oldest waiting text has waited
``max_wait_s`` (measured with ``time.monotonic()``). Each round takes the oldest texts (up to
four batches' worth), sorts them by length and cuts them into batches bounded by both the text
count and the padded-token budget, so short texts are not padded to a long neighbour's length.
With a ``BatchCost`` (the model's time as a function of a batch's texts and padded length) the
cuts are the ones that make the round's estimated time least; without one, batches are as full
as the bounds allow. A round is cut into at least as many batches as workers are free, so an
idle worker never watches another run the whole queue. Only as many batches as workers are free
start, the one holding the oldest text first; the rest go back to the head of the queue and are
sorted again with what arrives meanwhile, so long texts wait for long company rather than pad a
batch of short ones. A text goes back once at most: in its next round its batch runs, after
the ones started first, so under a backlog no text waits more than two rounds.
Inference runs in ``workers`` threads, never on the event loop: with more than one, batches run
side by side (Triton's model instances), which on a CPU with one torch thread per worker beats
one batch on all threads (docs/benchmarks.md, "CPU levers"). Whatever happens, every waiting
future is answered: with a result, a timeout, or the error that stopped its batch.

Each text carries the model function that is to score it (the one whose tokenizer read it): a
batch holds texts of one model only, so when the service swaps models (a reload), texts queued
before the swap are scored by the old model and texts after it by the new one, never a mix.

The same threads run long jobs (explanations) in chunks between prediction batches, one chunk at
a time. While predictions are busy, jobs get at most ``job_share`` of the workers' time (a
credit earned by prediction batches, spent by chunks), so a burst of explanations slows
predictions by a bounded fraction and never stops them. "Busy" means texts are waiting, or one
arrived or a batch ended within ``PREDICTIONS_IDLE_S``: under a closed loop of clients the
queue is empty between the end of a batch and the clients' next requests, and jobs must not
take that moment for free.
When predictions are idle, jobs run back to back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from service.errors import ErrorType, ServiceError
from service.metrics import Metrics

log = logging.getLogger(__name__)

InferFn = Callable[[list[np.ndarray]], np.ndarray]
ROUND_BATCHES = 4
PREDICTIONS_IDLE_S = 0.1


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


@dataclass(frozen=True)
class ItemResult:
    logit: float
    queue_s: float  # from submission to the start of its batch
    inference_s: float  # its batch's model time
    batch_size: int


class Job(Protocol):
    """Work done in chunks on an inference worker (``runtime.IntegratedGradients``)."""

    def advance(self) -> bool:
        """Run one chunk; True once the job is complete."""
        ...


@dataclass(frozen=True)
class JobResult:
    queue_s: float  # from submission to its first chunk
    inference_s: float  # its chunks' time, summed
    chunks: int


@dataclass
class _QueuedJob:
    job: Job
    future: asyncio.Future[JobResult]
    enqueued: float
    deadline: float
    started: float | None = None
    inference_s: float = 0.0
    chunks: int = 0


@dataclass
class _Pending:
    ids: np.ndarray
    infer: InferFn
    future: asyncio.Future[ItemResult]
    enqueued: float
    deadline: float
    deferred: bool = False  # went back to the queue once already


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


class DynamicBatcher:
    def __init__(
        self,
        infer: InferFn,
        *,
        max_batch_size: int,
        max_batch_tokens: int,
        max_wait_s: float,
        max_queue: int,
        max_jobs: int = 8,
        job_share: float = 0.25,
        workers: int = 1,
        cost: BatchCost | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if not 0 < job_share <= 1:
            raise ValueError(f"job_share must be in (0, 1], got {job_share}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._infer = infer
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.max_jobs = max_jobs
        self.job_share = job_share
        self.workers = workers
        self.cost = cost
        self._metrics = metrics or Metrics()
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[_QueuedJob] = deque()
        # Seconds of inference-thread time jobs may take before the next prediction round.
        self._job_credit = 0.0
        # Monotonic time of the latest prediction activity: a text arriving, a batch ending.
        self._last_prediction = float("-inf")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()  # batches and chunks on the workers
        self._job_running = False
        self._accepting = False

    @property
    def depth(self) -> int:
        return len(self._pending)

    @property
    def jobs(self) -> int:
        return len(self._jobs)

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

    def submit(
        self, seqs: list[np.ndarray], deadline: float, infer: InferFn | None = None
    ) -> list[asyncio.Future[ItemResult]]:
        """Queue texts (token ids) for inference by ``infer`` (default: the batcher's model
        function); all or none of them are accepted."""
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
        model = infer or self._infer
        self._last_prediction = now
        futures: list[asyncio.Future[ItemResult]] = []
        for ids in seqs:
            future: asyncio.Future[ItemResult] = loop.create_future()
            self._pending.append(_Pending(ids, model, future, now, deadline))
            futures.append(future)
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return futures

    def submit_job(self, job: Job, deadline: float) -> asyncio.Future[JobResult]:
        """Queue a job; its future is answered once its last chunk has run."""
        if not self._accepting:
            raise ServiceError(ErrorType.UNAVAILABLE, "the service is shutting down")
        if len(self._jobs) >= self.max_jobs:
            raise ServiceError(
                ErrorType.OVERLOADED,
                f"explanation queue full: {len(self._jobs)} waiting, limit {self.max_jobs}",
                retry_after=1,
            )
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._jobs.append(_QueuedJob(job, future, time.monotonic(), deadline))
        self._metrics.explain_queue_depth.set(len(self._jobs))
        self._wakeup.set()
        return future

    async def _loop(self) -> None:
        try:
            while self._pending or self._jobs or self._accepting:
                job_ready = bool(self._jobs) and not self._job_running
                if not self._pending and not job_ready:
                    await self._wait_for_wakeup()  # for work, or for a running chunk to end
                elif len(self._running) >= self.workers:
                    await self._wait_for_wakeup()  # a worker frees up
                elif job_ready and self._jobs_turn():
                    self._job_running = True
                    self._launch(self._advance_job(), [self._jobs[0]])
                elif not self._pending:  # jobs wait for credit; predictions may come back soon
                    await self._wait_until(self._last_prediction + PREDICTIONS_IDLE_S)
                else:
                    await self._wait_for_company()
                    for batch in self._next_round():
                        while len(self._running) >= self.workers:
                            await self._wait_for_wakeup()
                        self._launch(self._run(batch), batch)
            while self._running:  # draining: what the workers hold is answered before we stop
                await self._wait_for_wakeup()
        finally:
            # Only reached with work left if the loop itself failed: answer it anyway, and
            # refuse what comes after (a 503 at once, not a wait for a loop that is gone).
            self._accepting = False
            stopped = ServiceError(ErrorType.UNAVAILABLE, "the batcher stopped")
            waiters: list[_Pending | _QueuedJob] = [*self._pending, *self._jobs]
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(stopped)
            self._pending.clear()
            self._jobs.clear()

    async def _wait_for_wakeup(self) -> None:
        self._wakeup.clear()
        await self._wakeup.wait()

    def _launch(
        self, work: Coroutine[Any, Any, None], waiters: Sequence[_Pending | _QueuedJob]
    ) -> None:
        """Run ``work`` (a batch or a chunk) as a task; when it ends the loop is woken, and if
        it failed in a way it did not answer itself, its waiters are answered here."""
        task = asyncio.create_task(work)
        self._running.add(task)

        def finished(task: asyncio.Task[None]) -> None:
            self._running.discard(task)
            self._wakeup.set()
            if task.cancelled() or task.exception() is not None:
                log.error(
                    "an inference task failed",
                    exc_info=None if task.cancelled() else task.exception(),
                )
                error = ServiceError(ErrorType.BACKEND, "inference failed; see the server log")
                for waiter in waiters:
                    if not waiter.future.done():
                        waiter.future.set_exception(error)

        task.add_done_callback(finished)

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
        """This round's batches: one per free worker, then any holding a text that went back
        once already (they wait for workers); the rest of the round goes back to the queue."""
        take = min(len(self._pending), self.max_batch_size * ROUND_BATCHES)
        free_workers = max(1, self.workers - len(self._running))
        window = [self._pending.popleft() for _ in range(take)]
        # A cancelled text's request gave up (client gone, or deadline passed): skip it. The
        # request's own error answer is what gets counted.
        live = [item for item in window if not item.future.cancelled()]
        # Spread a small round over the free workers: on a CPU two half batches side by side
        # finish well before one whole batch (each worker has its own core).
        most = min(self.max_batch_size, max(1, -(-len(live) // free_workers)))
        by_model: dict[InferFn, list[_Pending]] = {}  # a batch never mixes models
        for item in live:
            by_model.setdefault(item.infer, []).append(item)
        batches: list[list[_Pending]] = []
        for items in by_model.values():
            items.sort(key=lambda item: len(item.ids))
            batches.extend(self._cut(items, most))
        batches.sort(key=lambda batch: min(item.enqueued for item in batch))
        start, rest = batches[:free_workers], batches[free_workers:]
        # A text goes back once at most: a batch holding one that already did runs in this
        # round, after those started now, so under a backlog no text waits more than two rounds.
        due = [batch for batch in rest if any(item.deferred for item in batch)]
        back = [item for batch in rest if not any(i.deferred for i in batch) for item in batch]
        for item in back:
            item.deferred = True
        # The oldest first: those going back are all older than anything still queued.
        self._pending.extendleft(sorted(back, key=lambda item: -item.enqueued))
        self._metrics.queue_depth.set(len(self._pending))
        return start + due

    def _cut(self, items: list[_Pending], most: int) -> list[list[_Pending]]:
        """Texts sorted by length cut into batches of at most ``most`` texts within the token
        budget: as full as the bounds allow, or where the cost model's total is least."""
        lengths = [max(len(item.ids), 1) for item in items]
        spans = [max(1, min(most, self.max_batch_tokens // length)) for length in lengths]
        ends = least_cost_cuts(spans, lengths, self.cost) if self.cost else full_cuts(spans)
        return [items[start:end] for start, end in zip([0, *ends], ends, strict=False)]

    def _predictions_busy(self) -> bool:
        recent = time.monotonic() - self._last_prediction < PREDICTIONS_IDLE_S
        return bool(self._pending) or recent

    def _jobs_turn(self) -> bool:
        if not self._jobs:
            return False
        return self.job_share == 1 or self._job_credit > 0 or not self._predictions_busy()

    async def _wait_until(self, when: float) -> None:
        """Until ``when`` (monotonic) or new work, whichever comes first."""
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(0.0, when - time.monotonic()))

    async def _advance_job(self) -> None:
        """One chunk of the oldest job; the job leaves the queue when done, given up or failed."""
        try:
            await self._advance(self._jobs[0])
        finally:
            self._job_running = False

    async def _advance(self, queued: _QueuedJob) -> None:
        started = time.monotonic()
        # Done already: cancelled by its request, or failed in a way _launch answered.
        if queued.future.done() or queued.deadline <= started:
            if not queued.future.done():
                queued.future.set_exception(
                    ServiceError(ErrorType.TIMEOUT, "deadline passed before the explanation ran")
                )
            self._finish_job()
            return
        if queued.started is None:
            queued.started = started
            self._metrics.explain_queue_duration.observe(started - queued.enqueued)
        contended = self._predictions_busy()
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(self._executor, queued.job.advance)
        except Exception:
            log.exception("an explanation failed")
            if not queued.future.done():
                queued.future.set_exception(
                    ServiceError(ErrorType.BACKEND, "explanation failed; see the server log")
                )
            self._finish_job()
            return
        elapsed = time.monotonic() - started
        queued.inference_s += elapsed
        queued.chunks += 1
        if contended:
            self._job_credit -= elapsed
        if done:
            self._metrics.explain_inference_duration.observe(queued.inference_s)
            if not queued.future.done():
                queue_s = queued.started - queued.enqueued
                queued.future.set_result(JobResult(queue_s, queued.inference_s, queued.chunks))
            self._finish_job()

    def _finish_job(self) -> None:
        self._jobs.popleft()
        self._metrics.explain_queue_depth.set(len(self._jobs))
        if not self._jobs:
            # Credit is not banked while no job waits (debt is: it was taken from predictions).
            self._job_credit = min(self._job_credit, 0.0)

    async def _run(self, batch: list[_Pending]) -> None:
        """Run one batch; its time earns jobs their credit."""
        started = time.monotonic()
        try:
            await self._infer_batch(batch, started)
        finally:
            if self._jobs and self.job_share < 1:
                elapsed = time.monotonic() - started
                self._job_credit += elapsed * self.job_share / (1 - self.job_share)

    async def _infer_batch(self, batch: list[_Pending], started: float) -> None:
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
            logits = await loop.run_in_executor(
                self._executor, live[0].infer, [i.ids for i in live]
            )
        except Exception:
            log.exception("inference failed for a batch of %d texts", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(
                        ServiceError(ErrorType.BACKEND, "inference failed; see the server log")
                    )
            return
        self._last_prediction = time.monotonic()
        elapsed = self._last_prediction - started
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
