"""The dynamic batcher on its own: no HTTP, a recording model function."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest

from service import batcher as batcher_module
from service.batcher import DynamicBatcher, InferFn
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics
from service.runtime import Execution
from service.scheduler import BatchCost, Scheduler


class RecordingModel:
    """Logit = sum of ids, so every answer can be checked; records each batch it sees."""

    def __init__(self, delay: float = 0.0, fail: bool = False) -> None:
        self.batches: list[list[int]] = []  # lengths per batch
        self.delay = delay
        self.fail = fail
        self.thread_names: set[str] = set()
        self.hows: list[Execution] = []  # how the scheduler said each batch was to run

    def __call__(self, seqs: list[np.ndarray], how: Execution) -> np.ndarray:
        self.thread_names.add(threading.current_thread().name)
        self.batches.append([len(s) for s in seqs])
        self.hows.append(how)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("CUDA error: device-side assert (simulated)")
        return np.array([float(s.sum()) for s in seqs], dtype=np.float32)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def make(
    model: InferFn, max_wait_s: float = 0.05, metrics: Metrics | None = None, **policy: Any
) -> DynamicBatcher:
    """A batcher on a scheduler of one worker, no cost model and no fork, unless ``policy``
    says otherwise (``Scheduler``'s arguments)."""
    options: dict[str, Any] = dict(
        workers=1,
        threads=None,
        cost=None,
        fork=False,
        explain_share=0.25,
        max_batch_size=8,
        max_batch_tokens=10_000,
    )
    options.update(policy)
    return DynamicBatcher(model, Scheduler(**options), max_wait_s=max_wait_s, metrics=metrics)


def seq(length: int, value: int = 1) -> np.ndarray:
    return np.full(length, value, dtype=np.int64)


def test_concurrent_submissions_share_batches_and_keep_their_answers():
    model = RecordingModel()

    async def scenario() -> list[float]:
        batcher = make(model)
        await batcher.start()
        deadline = time.monotonic() + 10
        futures = [f for i in range(20) for f in batcher.submit([seq(3, i)], deadline)]
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return [r.logit for r in results]

    assert run(scenario()) == [3.0 * i for i in range(20)]
    assert sum(map(len, model.batches)) == 20
    assert len(model.batches) == 3  # 8 + 8 + 4, not 20 calls
    assert max(map(len, model.batches)) == 8
    assert model.thread_names == {"inference_0"}  # never on the event loop's thread


def test_batches_group_lengths_and_respect_the_token_budget():
    model = RecordingModel()
    lengths = [50, 2, 49, 3, 48, 1, 51, 4]

    async def scenario() -> None:
        batcher = make(model, max_batch_size=4, max_batch_tokens=120)
        await batcher.start()
        futures = batcher.submit([seq(n) for n in lengths], time.monotonic() + 10)
        results = await asyncio.gather(*futures)
        assert [r.logit for r in results] == [float(n) for n in lengths]  # order kept
        await batcher.stop()

    run(scenario())
    assert model.batches == [[1, 2, 3, 4], [48, 49], [50, 51]]  # 2 x 51 <= 120 < 3 x 50


def test_a_lone_text_waits_max_wait_for_company_and_no_longer():
    # Were the window ignored, the text would run at once (queue time ~0); were it never
    # closed, the wait_for below would time out.
    model = RecordingModel()

    async def scenario() -> float:
        batcher = make(model, max_wait_s=0.2)
        await batcher.start()
        submitted = time.monotonic()
        [future] = batcher.submit([seq(5)], submitted + 10)
        result = await asyncio.wait_for(future, timeout=5)
        waited = time.monotonic() - submitted
        await batcher.stop()
        assert result.logit == 5.0
        assert 0.2 <= result.queue_s <= waited
        return result.queue_s

    run(scenario())
    assert model.batches == [[5]]


def test_a_full_batch_does_not_wait_out_the_window():
    model = RecordingModel()

    async def scenario() -> list[float]:
        batcher = make(model, max_batch_size=4, max_wait_s=30.0)
        await batcher.start()
        futures = batcher.submit([seq(1)] * 4, time.monotonic() + 60)
        results = await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
        await batcher.stop()
        return [r.queue_s for r in results]

    assert max(run(scenario())) < 30.0  # closed by size, not by the 30-s window
    assert model.batches == [[1, 1, 1, 1]]


def test_a_failed_batch_answers_every_waiting_text_and_the_batcher_goes_on():
    model = RecordingModel(fail=True)

    async def scenario() -> None:
        batcher = make(model, metrics=Metrics())
        await batcher.start()
        futures = batcher.submit([seq(2), seq(3), seq(4)], time.monotonic() + 10)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        assert all(isinstance(o, ServiceError) for o in outcomes)
        assert {o.error_type for o in outcomes} == {ErrorType.BACKEND}  # type: ignore[union-attr]
        model.fail = False
        [after] = batcher.submit([seq(6)], time.monotonic() + 10)
        assert (await after).logit == 6.0
        await batcher.stop()

    run(scenario())


def test_texts_whose_deadline_passes_in_the_queue_time_out_without_running():
    model = RecordingModel(delay=0.2)

    async def scenario() -> None:
        batcher = make(model, max_batch_size=1, max_wait_s=0)
        await batcher.start()
        now = time.monotonic()
        first = batcher.submit([seq(1)], now + 10)
        late = batcher.submit([seq(2)], now + 0.05)  # still queued when the first ends
        assert (await first[0]).logit == 1.0
        with pytest.raises(ServiceError) as caught:
            await late[0]
        assert caught.value.error_type is ErrorType.TIMEOUT
        await batcher.stop()

    run(scenario())
    assert model.batches == [[1]]


def test_cancelled_texts_are_not_computed():
    model = RecordingModel()

    async def scenario() -> None:
        batcher = make(model, max_wait_s=0.05)
        await batcher.start()
        gone, kept = batcher.submit([seq(7), seq(9)], time.monotonic() + 10)
        gone.cancel()  # what the pipeline does when a client disconnects
        assert (await kept).logit == 9.0
        await batcher.stop()

    run(scenario())
    assert model.batches == [[9]]


def test_stop_finishes_accepted_work_then_refuses_new_work():
    model = RecordingModel(delay=0.01)

    async def scenario() -> None:
        batcher = make(model, max_batch_size=2, max_wait_s=1.0)
        await batcher.start()
        futures = batcher.submit([seq(i + 1) for i in range(7)], time.monotonic() + 10)
        await batcher.stop()  # does not wait out max_wait: draining closes batches at once
        assert [f.result().logit for f in futures] == [float(i + 1) for i in range(7)]
        with pytest.raises(ServiceError) as caught:
            batcher.submit([seq(1)], time.monotonic() + 10)
        assert caught.value.error_type is ErrorType.UNAVAILABLE

    run(scenario())


# -- jobs (explanations), run in chunks between prediction rounds -----------------------------
class ChunkedJob:
    """A job of ``chunks`` chunks, each sleeping ``delay`` in the inference thread; it records
    when each chunk ran in a timeline shared with the model."""

    def __init__(
        self, timeline: list[str], name: str, chunks: int, delay: float, fail: bool = False
    ) -> None:
        self.timeline, self.name, self.left, self.delay, self.fail = (
            timeline,
            name,
            chunks,
            delay,
            fail,
        )
        self.thread_names: set[str] = set()

    def advance(self, how: Execution) -> bool:
        self.thread_names.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("CUDA error: out of memory (simulated)")
        self.timeline.append(self.name)
        self.left -= 1
        return self.left == 0


class TimelineModel(RecordingModel):
    def __init__(self, timeline: list[str], delay: float) -> None:
        super().__init__(delay=delay)
        self.timeline = timeline

    def __call__(self, seqs: list[np.ndarray], how: Execution) -> np.ndarray:
        self.timeline.append("batch")
        return super().__call__(seqs, how)


def test_a_job_runs_all_its_chunks_in_the_inference_thread_and_reports_its_time():
    timeline: list[str] = []
    job = ChunkedJob(timeline, "job", chunks=3, delay=0.01)

    async def scenario() -> None:
        batcher = make(RecordingModel())
        await batcher.start()
        result = await batcher.submit_job(job, time.monotonic() + 10)
        assert result.chunks == 3
        assert result.inference_s >= 0.03
        assert batcher.jobs == 0
        await batcher.stop()

    run(scenario())
    assert timeline == ["job"] * 3
    assert job.thread_names == {"inference_0"}


@pytest.mark.parametrize("clients", [1, 4])
@pytest.mark.parametrize("share", [0.25, 0.5])
def test_jobs_take_their_share_of_the_thread_while_predictions_are_busy(
    share: float, clients: int, monkeypatch: pytest.MonkeyPatch
):
    """If this fails, a stream of explanations starves /predict (or the share setting lies).
    One client in a closed loop leaves the queue empty between an answer and its next request,
    a moment jobs must not take for free; four keep texts waiting all along. Batches last
    longer than the idle window, as real ones do (0.3 s against 0.1 s)."""
    monkeypatch.setattr(batcher_module, "PREDICTIONS_IDLE_S", 0.01)
    timeline: list[str] = []
    model = TimelineModel(timeline, delay=0.02)
    job = ChunkedJob(timeline, "job", chunks=10, delay=0.02)

    async def scenario() -> None:
        batcher = make(model, max_batch_size=1, max_wait_s=0, explain_share=share)
        await batcher.start()
        deadline = time.monotonic() + 30
        waiting = batcher.submit([seq(1)] * clients, deadline)
        job_done = batcher.submit_job(job, deadline)
        while not job_done.done():
            await waiting.pop(0)
            await asyncio.sleep(0.002)  # the client reads its answer and sends the next text
            waiting += batcher.submit([seq(1)], deadline)
        await batcher.stop()

    run(scenario())
    # Between the job's first and last chunk, batches and chunks alternate in the ratio of the
    # share: 0.25 -> three 20 ms batches per 20 ms chunk, 0.5 -> one per chunk.
    first, last = timeline.index("job"), len(timeline) - 1 - timeline[::-1].index("job")
    window = timeline[first : last + 1]
    batches_per_chunk = window.count("batch") / (window.count("job") - 1)
    assert batches_per_chunk == pytest.approx((1 - share) / share, abs=0.5)


def test_with_no_prediction_waiting_a_job_runs_back_to_back():
    timeline: list[str] = []
    model = TimelineModel(timeline, delay=0.0)

    async def scenario() -> None:
        batcher = make(model, explain_share=0.1)
        await batcher.start()
        await batcher.submit_job(ChunkedJob(timeline, "job", 5, 0.0), time.monotonic() + 10)
        await batcher.stop()

    run(scenario())
    assert timeline == ["job"] * 5


def test_a_failed_job_is_answered_and_the_batcher_goes_on():
    timeline: list[str] = []

    async def scenario() -> None:
        batcher = make(RecordingModel())
        await batcher.start()
        deadline = time.monotonic() + 10
        failing = batcher.submit_job(ChunkedJob(timeline, "bad", 2, 0.0, fail=True), deadline)
        with pytest.raises(ServiceError) as caught:
            await failing
        assert caught.value.error_type is ErrorType.BACKEND
        assert (await batcher.submit([seq(2)], deadline)[0]).logit == 2.0
        assert (await batcher.submit_job(ChunkedJob(timeline, "ok", 1, 0.0), deadline)).chunks == 1
        await batcher.stop()

    run(scenario())


def test_a_job_past_its_deadline_stops_between_chunks_with_a_timeout():
    timeline: list[str] = []

    async def scenario() -> None:
        batcher = make(RecordingModel())
        await batcher.start()
        slow = batcher.submit_job(ChunkedJob(timeline, "slow", 100, 0.02), time.monotonic() + 0.1)
        with pytest.raises(ServiceError) as caught:
            await slow
        assert caught.value.error_type is ErrorType.TIMEOUT
        await batcher.stop()

    run(scenario())
    assert 3 <= len(timeline) <= 7  # stopped soon after 0.1 s, not after 100 chunks


def test_a_cancelled_job_is_dropped():
    timeline: list[str] = []

    async def scenario() -> None:
        batcher = make(RecordingModel())
        deadline = time.monotonic() + 10
        await batcher.start()
        gone = batcher.submit_job(ChunkedJob(timeline, "gone", 3, 0.0), deadline)
        kept = batcher.submit_job(ChunkedJob(timeline, "kept", 1, 0.0), deadline)
        gone.cancel()  # the client went away before it ran
        await kept
        await batcher.stop()

    run(scenario())
    assert timeline == ["kept"]


def test_stop_finishes_accepted_jobs():
    timeline: list[str] = []

    async def scenario() -> None:
        batcher = make(RecordingModel())
        await batcher.start()
        job = batcher.submit_job(ChunkedJob(timeline, "job", 4, 0.01), time.monotonic() + 10)
        await batcher.stop()
        assert job.result().chunks == 4

    run(scenario())


def test_texts_for_two_models_never_share_a_batch():
    """If this fails, a model swap (reload) could score one request with two models."""
    old, new = RecordingModel(), RecordingModel()
    new_logit = lambda seqs, how: new(seqs, how) + 1000  # noqa: E731  (a different model)

    async def scenario() -> list[float]:
        batcher = make(old, max_batch_size=64, max_wait_s=0.05)
        await batcher.start()
        deadline = time.monotonic() + 10
        futures = []
        for i in range(10):  # interleaved submissions, all queued before the first batch
            futures += batcher.submit([seq(2, i)], deadline)
            futures += batcher.submit([seq(3, i)], deadline, infer=new_logit)
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return [r.logit for r in results]

    logits = run(scenario())
    assert logits[0::2] == [2.0 * i for i in range(10)]
    assert logits[1::2] == [3.0 * i + 1000 for i in range(10)]
    assert old.batches == [[2] * 10]
    assert new.batches == [[3] * 10]


# -- several inference workers (batches side by side) -----------------------------------------
class MeetingModel(RecordingModel):
    """Each batch waits until ``parties`` batches are in the model at once: with fewer
    concurrent batches the barrier breaks and the batch fails."""

    def __init__(self, parties: int, fail_on: int | None = None) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=5)
        self.fail_on = fail_on

    def __call__(self, seqs: list[np.ndarray], how: Execution) -> np.ndarray:
        self.barrier.wait()
        if self.fail_on is not None and any(int(s[0]) == self.fail_on for s in seqs):
            raise RuntimeError("a batch failed (simulated)")
        return super().__call__(seqs, how)


def test_two_workers_run_two_batches_side_by_side():
    """If this fails, SENTIMENT_INFERENCE_WORKERS runs batches one after another (the CPU's
    second core idles) or no longer spreads a small round over the free workers."""
    model = MeetingModel(parties=2)

    async def scenario() -> list[float]:
        batcher = make(model, max_wait_s=0, workers=2)
        await batcher.start()
        futures = batcher.submit([seq(2, 1), seq(3, 1)], time.monotonic() + 10)
        results = await asyncio.gather(*futures)
        await batcher.stop()
        return [r.logit for r in results]

    assert run(scenario()) == [2.0, 3.0]
    assert sorted(model.batches) == [[2], [3]]
    assert len(model.thread_names) == 2


def test_a_failed_batch_on_one_worker_leaves_the_other_batch_answered():
    model = MeetingModel(parties=2, fail_on=7)

    async def scenario() -> list[object]:
        batcher = make(model, max_wait_s=0, workers=2)
        await batcher.start()
        futures = batcher.submit([seq(2, 1), seq(3, 7)], time.monotonic() + 10)
        outcomes = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.stop()
        return outcomes

    ok, failed = run(scenario())
    assert getattr(ok, "logit", None) == 2.0
    assert isinstance(failed, ServiceError)
    assert failed.error_type is ErrorType.BACKEND


def test_a_job_chunk_and_a_batch_share_two_workers():
    """If this fails, an explanation holds every worker while /predict waits."""
    barrier = threading.Barrier(2, timeout=5)

    class MeetingJob(ChunkedJob):
        def advance(self, how: Execution) -> bool:
            barrier.wait()
            return super().advance(how)

    timeline: list[str] = []
    model = TimelineModel(timeline, delay=0)
    model_call = model.__call__

    def meeting_model(seqs: list[np.ndarray], how: Execution) -> np.ndarray:
        barrier.wait()
        return model_call(seqs, how)

    async def scenario() -> None:
        batcher = make(meeting_model, max_wait_s=0, workers=2)
        await batcher.start()
        job = batcher.submit_job(MeetingJob(timeline, "job", 1, 0), time.monotonic() + 10)
        await asyncio.sleep(0.05)  # the chunk is on a worker, waiting at the barrier
        [text] = batcher.submit([seq(4)], time.monotonic() + 10)
        assert (await text).logit == 4.0
        assert (await job).chunks == 1
        await batcher.stop()

    run(scenario())
    assert sorted(timeline) == ["batch", "job"]


def test_stop_with_two_workers_answers_every_batch_in_flight():
    model = RecordingModel(delay=0.02)

    async def scenario() -> list[float]:
        batcher = make(model, max_batch_size=2, max_wait_s=0, workers=2)
        await batcher.start()
        futures = batcher.submit([seq(i + 1) for i in range(9)], time.monotonic() + 10)
        await batcher.stop()
        return [f.result().logit for f in futures]

    assert run(scenario()) == [float(i + 1) for i in range(9)]
    assert sorted(n for batch in model.batches for n in batch) == list(range(1, 10))


def test_a_cost_model_batches_long_texts_apart_from_short_ones_oldest_first():
    """If this fails, SENTIMENT_BATCH_STEP_TEXTS no longer keeps short texts from being padded
    to a long neighbour's length, or the batch holding the oldest text no longer goes first."""

    async def scenario(cost: BatchCost | None) -> list[list[int]]:
        model = RecordingModel()
        batcher = make(model, max_wait_s=0, cost=cost)
        await batcher.start()
        deadline = time.monotonic() + 10
        futures = batcher.submit([seq(400)] * 4, deadline) + batcher.submit([seq(10)] * 4, deadline)
        results = await asyncio.gather(*futures)
        await batcher.stop()
        assert [r.logit for r in results] == [400.0] * 4 + [10.0] * 4
        return model.batches

    assert run(scenario(BatchCost(3.0))) == [[400] * 4, [10] * 4]
    assert run(scenario(None)) == [[10] * 4 + [400] * 4]  # no cost model: as full as allowed


class SteppedModel(RecordingModel):
    """Each batch says it has started (``started``) and then holds until the test lets it go
    (``go``): the test decides what arrives while a batch runs."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def __call__(self, seqs: list[np.ndarray], how: Execution) -> np.ndarray:
        self.started.release()
        self.go.acquire(timeout=10)
        return super().__call__(seqs, how)


def test_texts_left_for_a_later_batch_are_sorted_again_with_newcomers():
    """If this fails, the batches of a round that find no free worker run as they were cut,
    and long texts cannot wait for long company that arrives while the worker is busy."""
    model = SteppedModel()

    async def scenario() -> None:
        batcher = make(model, max_wait_s=0, cost=BatchCost(3.0))
        await batcher.start()
        deadline = time.monotonic() + 10
        first = batcher.submit([seq(10)] * 4 + [seq(400)] * 2, deadline)
        await asyncio.to_thread(model.started.acquire, timeout=10)  # the short ones run
        assert batcher.depth == 2  # the two long ones went back to the queue
        later = batcher.submit([seq(400, 2)] * 2, deadline)
        model.go.release(2)
        results = await asyncio.gather(*first, *later)
        await batcher.stop()
        assert [r.logit for r in results] == [10.0] * 4 + [400.0] * 2 + [800.0] * 2

    run(scenario())
    assert model.batches == [[10] * 4, [400] * 4]  # not [400, 400] twice


def test_a_batcher_whose_loop_fails_answers_and_refuses_rather_than_hanging(
    monkeypatch: pytest.MonkeyPatch,
):
    """If this fails, a bug in the batcher's loop leaves requests waiting out their deadline
    for a loop that is gone, instead of a 503 at once."""

    def broken_round(self: DynamicBatcher) -> list[Any]:
        raise RuntimeError("a bug in the batching loop (simulated)")

    monkeypatch.setattr(DynamicBatcher, "_next_round", broken_round)

    async def scenario() -> None:
        batcher = make(RecordingModel(), max_wait_s=0)
        await batcher.start()
        [future] = batcher.submit([seq(3)], time.monotonic() + 10)
        with pytest.raises(ServiceError) as waited:
            await asyncio.wait_for(future, timeout=5)
        assert waited.value.error_type is ErrorType.UNAVAILABLE
        with pytest.raises(ServiceError) as refused:
            batcher.submit([seq(3)], time.monotonic() + 10)
        assert refused.value.error_type is ErrorType.UNAVAILABLE
        with pytest.raises(RuntimeError, match="simulated"):
            await batcher.stop()

    run(scenario())


def test_a_text_goes_back_to_the_queue_once_at_most():
    """If this fails, texts left for a later batch can be passed over round after round by
    newcomers of a better length: under a backlog their wait, the latency tail, has no bound."""
    model = SteppedModel()

    async def scenario() -> None:
        batcher = make(model, max_wait_s=0, cost=BatchCost(3.0))
        await batcher.start()
        deadline = time.monotonic() + 10
        futures = []
        for length in (10, 100, 400):  # three batches by the cost model; the 10s are oldest
            futures += batcher.submit([seq(length)] * 4, deadline)
        await asyncio.to_thread(model.started.acquire, timeout=10)  # the 10s run
        futures += batcher.submit([seq(100)] * 4, deadline)  # company for the waiting 100s
        model.go.release()
        await asyncio.to_thread(model.started.acquire, timeout=10)  # the eight 100s run
        futures += batcher.submit([seq(400)] * 4, deadline)  # company the 400s must not wait for
        for _ in range(3):
            model.go.release()
        results = await asyncio.gather(*futures)
        await batcher.stop()
        expected = [10.0] * 4 + [100.0] * 4 + [400.0] * 4 + [100.0] * 4 + [400.0] * 4
        assert [r.logit for r in results] == expected

    run(scenario())
    assert model.batches == [[10] * 4, [100] * 8, [400] * 4, [400] * 4]
