"""Dynamic batching: texts from concurrent requests are merged into model batches.

A batch closes when ``max_batch_size`` texts wait or when the oldest waiting text has waited
``max_wait_s`` (measured with ``time.monotonic()``). Each round takes the oldest texts (up to
four batches' worth), sorts them by length and cuts them into batches bounded by both the text
count and the padded-token budget, so short texts are not padded to a long neighbour's length.
Where a round is cut is the scheduler's (``scheduler.Scheduler.cuts``: where a cost model's
estimated time is least). A round is cut into at least as many batches as workers are free, so
an idle worker never watches another run the whole queue. Only as many batches as workers are free
start, the one holding the oldest text first; the rest go back to the head of the queue and are
sorted again with what arrives meanwhile, so long texts wait for long company rather than pad a
batch of short ones. A text goes back once at most: in its next round its batch runs, after
the ones started first, so under a backlog no text waits more than two rounds.
Inference runs in the scheduler's ``workers`` threads, never on the event loop: with more than
one, batches run side by side (Triton's model instances). Each batch and chunk is handed to the
model with the scheduler's ``Execution`` (threads, fork). Whatever happens, every waiting future
is answered: with a result, a timeout, or the error that stopped its batch. Admission bounds
are the pipeline's: what reaches the batcher has been admitted, so it queues everything.

Each text carries the model function that is to score it (the one whose tokenizer read it): a
batch holds texts of one model only, so when the service swaps models (a reload), texts queued
before the swap are scored by the old model and texts after it by the new one, never a mix.

The same threads run long jobs (explanations) in chunks between prediction batches, one chunk at
a time. While predictions are busy, jobs get at most the scheduler's ``explain_share`` of the
workers' time (a credit earned by prediction batches, spent by chunks), so a burst of
explanations slows predictions by a bounded fraction and never stops them. "Busy" means texts
are waiting, or one arrived or a batch ended within ``PREDICTIONS_IDLE_S``: under a closed loop
of clients the queue is empty between the end of a batch and the clients' next requests, and
jobs must not take that moment for free. Texts a job's own request queued (an explanation's
sentences, submitted as ``background``) are not predictions' traffic: they never hold a job
back. When predictions are idle, jobs run back to back.
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
from typing import Any, Protocol

import numpy as np

from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.runtime import Execution
from service.scheduler import Scheduler

log = logging.getLogger(__name__)

InferFn = Callable[[list[np.ndarray], Execution], np.ndarray]
ROUND_BATCHES = 4
PREDICTIONS_IDLE_S = 0.1


@dataclass(frozen=True)
class ItemResult:
    logit: float
    queue_s: float  # from submission to the start of its batch
    inference_s: float  # its batch's model time
    batch_size: int


class Job(Protocol):
    """Work done in chunks on an inference worker (``runtime.IntegratedGradients``)."""

    def advance(self, how: Execution) -> bool:
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
    background: bool  # queued for a job's request: not predictions' traffic
    deferred: bool = False  # went back to the queue once already


class DynamicBatcher:
    def __init__(
        self,
        infer: InferFn,
        scheduler: Scheduler,
        *,
        max_wait_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._infer = infer
        self.scheduler = scheduler
        self.max_wait_s = max_wait_s
        self._metrics = metrics or Metrics()
        self._pending: deque[_Pending] = deque()
        self._jobs: deque[_QueuedJob] = deque()
        # Monotonic time of predictions' latest activity: a text arriving, a batch ending.
        self._last_prediction = float("-inf")
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=scheduler.workers, thread_name_prefix="inference"
        )
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
        """Refuse new work, finish everything already accepted, then stop the workers."""
        self._accepting = False
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def submit(
        self,
        seqs: list[np.ndarray],
        deadline: float,
        infer: InferFn | None = None,
        background: bool = False,
    ) -> list[asyncio.Future[ItemResult]]:
        """Queue texts (token ids) for inference by ``infer`` (default: the batcher's model
        function). ``background``: queued for a job's request (see the module's docstring)."""
        self._check_accepting()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        model = infer or self._infer
        if not background:
            self._last_prediction = now
        futures: list[asyncio.Future[ItemResult]] = []
        for ids in seqs:
            future: asyncio.Future[ItemResult] = loop.create_future()
            self._pending.append(_Pending(ids, model, future, now, deadline, background))
            futures.append(future)
        self._metrics.queue_depth.set(len(self._pending))
        self._wakeup.set()
        return futures

    def submit_job(self, job: Job, deadline: float) -> asyncio.Future[JobResult]:
        """Queue a job; its future is answered once its last chunk has run."""
        self._check_accepting()
        future: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
        self._jobs.append(_QueuedJob(job, future, time.monotonic(), deadline))
        self._metrics.explain_queue_depth.set(len(self._jobs))
        self._wakeup.set()
        return future

    def _check_accepting(self) -> None:
        if not self._accepting:
            raise ServiceError(ErrorType.UNAVAILABLE, "the service is shutting down")

    async def _loop(self) -> None:
        try:
            while self._pending or self._jobs or self._accepting:
                job_ready = bool(self._jobs) and not self._job_running
                if not self._pending and not job_ready:
                    await self._wait_for_wakeup()  # for work, or for a running chunk to end
                elif len(self._running) >= self.scheduler.workers:
                    await self._wait_for_wakeup()  # a worker frees up
                elif job_ready and self.scheduler.jobs_turn(self._predictions_busy()):
                    self._job_running = True
                    self._launch(self._advance_job(), [self._jobs[0]])
                elif not self._pending:  # jobs wait for credit; predictions may come back soon
                    await self._wait_until(self._last_prediction + PREDICTIONS_IDLE_S)
                else:
                    await self._wait_for_company()
                    for batch in self._next_round():
                        while len(self._running) >= self.scheduler.workers:
                            await self._wait_for_wakeup()
                        how = self.scheduler.batch(len(batch), running=len(self._running))
                        self._launch(self._run(batch, how), batch)
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
        while self._accepting and len(self._pending) < self.scheduler.max_batch_size:
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
        most_texts = self.scheduler.max_batch_size
        take = min(len(self._pending), most_texts * ROUND_BATCHES)
        free_workers = max(1, self.scheduler.workers - len(self._running))
        window = [self._pending.popleft() for _ in range(take)]
        # A cancelled text's request gave up (client gone, or deadline passed): skip it. The
        # request's own error answer is what gets counted.
        live = [item for item in window if not item.future.cancelled()]
        # Spread a small round over the free workers: on a CPU two half batches side by side
        # finish well before one whole batch (each worker has its own core).
        most = min(most_texts, max(1, -(-len(live) // free_workers)))
        by_model: dict[InferFn, list[_Pending]] = {}  # a batch never mixes models
        for item in live:
            by_model.setdefault(item.infer, []).append(item)
        batches: list[list[_Pending]] = []
        for items in by_model.values():
            items.sort(key=lambda item: len(item.ids))
            ends = self.scheduler.cuts([len(item.ids) for item in items], most)
            batches.extend(items[a:b] for a, b in zip([0, *ends], ends, strict=False))
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

    def _predictions_busy(self) -> bool:
        if time.monotonic() - self._last_prediction < PREDICTIONS_IDLE_S:
            return True
        return any(not item.background for item in self._pending)

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
        how = self.scheduler.chunk()
        try:
            done = await loop.run_in_executor(self._executor, queued.job.advance, how)
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
        self.scheduler.chunk_ran(elapsed, contended)
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
            self.scheduler.jobs_done()

    async def _run(self, batch: list[_Pending], how: Execution) -> None:
        """Run one batch; while jobs wait, its time earns them their credit."""
        started = time.monotonic()
        try:
            await self._infer_batch(batch, how, started)
        finally:
            if self._jobs:
                self.scheduler.batch_ran(time.monotonic() - started)

    async def _infer_batch(self, batch: list[_Pending], how: Execution, started: float) -> None:
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
                self._executor, live[0].infer, [i.ids for i in live], how
            )
        except Exception:
            log.exception("inference failed for a batch of %d texts", len(live))
            for item in live:
                if not item.future.done():
                    item.future.set_exception(
                        ServiceError(ErrorType.BACKEND, "inference failed; see the server log")
                    )
            return
        finished = time.monotonic()
        if not all(item.background for item in live):
            self._last_prediction = finished
        self._observe(live, started, finished)
        for item, logit in zip(live, logits, strict=True):
            if not item.future.done():  # cancelled while it ran: the answer has no taker
                item.future.set_result(
                    ItemResult(float(logit), started - item.enqueued, finished - started, len(live))
                )

    def _observe(self, live: list[_Pending], started: float, finished: float) -> None:
        m = self._metrics
        m.batch_size.observe(len(live))
        m.batch_tokens.observe(len(live) * max(1, max(len(i.ids) for i in live)))
        m.inference_duration.observe(finished - started)
        for item in live:
            m.queue_duration.observe(started - item.enqueued)
