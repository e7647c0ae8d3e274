"""The scheduler on its own, and through a batcher with a recording model: the execution policy
each batch and chunk is handed (threads, fork), the cuts, the explanations' share. No HTTP."""

from __future__ import annotations

import asyncio
import itertools
import time

import numpy as np
import pytest

from service import batcher as batcher_module
from service.bundle import RuntimeChoice
from service.runtime import Execution
from service.scheduler import (
    CPU_STEP_TEXTS,
    BatchCost,
    Policy,
    Scheduler,
    full_cuts,
    least_cost_cuts,
)
from tests.service.test_batcher import ChunkedJob, RecordingModel, TimelineModel, make, seq


def cpu_scheduler(
    policy: Policy | None = None, runtime: RuntimeChoice = "torchscript"
) -> Scheduler:
    """What a policy (default: the measured one) resolves to on a 2-core CPU (default: for
    TorchScript, where the fork decides)."""
    return (policy or Policy()).resolve(
        on_cpu=True, torch_threads=2, max_batch_size=64, max_batch_tokens=32_768, runtime=runtime
    )


# -- resolving the policy for a device ------------------------------------------------------------
def test_the_default_policy_on_a_cpu_runs_a_worker_per_thread_with_the_cost_model_and_fork():
    """If this fails, the CPU service lost a measured lever (docs/benchmarks.md, "CPU levers")."""
    scheduler = cpu_scheduler(runtime="auto")
    onnx_max_texts = Policy().onnx_max_texts
    assert scheduler.describe(can_fork=True, has_onnx=True) == {
        "runtime": "onnxruntime" if onnx_max_texts >= 64 else "onnxruntime+torchscript",
        "onnx_max_texts": onnx_max_texts,
        "inference_workers": 2,
        "threads_per_batch": 1,
        "batch_step_texts": CPU_STEP_TEXTS,
        "fork_directions": True,
        "explain_share": 0.25,
    }
    assert scheduler.describe(can_fork=False, has_onnx=True)["fork_directions"] is False
    without = scheduler.describe(can_fork=True, has_onnx=False)  # a bundle without model.onnx
    assert (without["runtime"], without["onnx_max_texts"]) == ("torchscript", 0)


def test_the_runtime_choice_decides_which_batches_run_on_onnx_runtime():
    """If this fails, SENTIMENT_RUNTIME no longer reaches the batches: onnx would leave some
    batches on TorchScript, torchscript would send some to ONNX Runtime, or CUDA would."""
    auto = cpu_scheduler(runtime="auto")
    most = Policy().onnx_max_texts
    assert auto.batch(texts=most, running=1) == Execution(1, forked=False, onnx=True)
    if most < 64:
        assert auto.batch(texts=most + 1, running=1) == Execution(1, forked=False, onnx=False)
    # A batch that has the CPU to itself: ONNX Runtime on both threads, or TorchScript forked.
    assert auto.batch(texts=1, running=0) == Execution(2, onnx=True)
    assert auto.alone() == Execution(2, onnx=True)
    with auto.in_service(most + 1):
        assert auto.batch(texts=most + 1, running=0) == Execution(1, forked=True)
    everything = cpu_scheduler(runtime="onnx")
    assert everything.batch(texts=64, running=0).onnx is True
    assert everything.runtime(has_onnx=True) == "onnxruntime"
    script = cpu_scheduler(runtime="torchscript")
    assert not any(script.batch(texts=n, running=0).onnx for n in (1, 8, 64))
    assert script.runtime(has_onnx=True) == "torchscript"
    mixed = cpu_scheduler(Policy(onnx_max_texts=8), runtime="auto")
    assert [mixed.batch(texts=n, running=1).onnx for n in (8, 9)] == [True, False]
    assert mixed.runtime(has_onnx=True) == "onnxruntime+torchscript"
    cuda = Policy().resolve(False, 16, 64, 32_768, runtime="onnx")  # the bundle load refuses it
    assert cuda.batch(texts=1, running=0).onnx is False


def test_on_cuda_one_worker_leaves_threads_alone_and_neither_cuts_by_cost_nor_forks():
    scheduler = Policy().resolve(
        on_cpu=False, torch_threads=16, max_batch_size=64, max_batch_tokens=32_768
    )
    assert scheduler.workers == 1
    assert scheduler.batch(texts=1, running=0) == Execution(threads=None, forked=False)
    assert scheduler.cost is None


def test_workers_share_the_threads_and_one_thread_never_forks():
    assert cpu_scheduler(Policy(workers=1)).threads == 2
    assert cpu_scheduler(Policy(workers=1)).batch(texts=1, running=0).forked is False  # two threads
    single = Policy().resolve(on_cpu=True, torch_threads=1, max_batch_size=8, max_batch_tokens=99)
    assert single.fork is False  # no second core for the other direction
    with pytest.raises(ValueError, match="explain_share"):
        Policy(explain_share=0)


# -- the fork decision ----------------------------------------------------------------------------
def test_a_batch_forks_only_when_it_is_all_the_work_there_has_been():
    """If this fails, forks take the core that parses the next requests (15% lost at 16
    clients), or a lone request no longer gets the idle core."""
    scheduler = cpu_scheduler()
    with scheduler.in_service(1):
        assert scheduler.batch(texts=1, running=0).forked is True
        assert scheduler.batch(texts=1, running=1).forked is False  # another batch runs
    with scheduler.in_service(1), scheduler.in_service(1):
        assert scheduler.batch(texts=1, running=0).forked is False  # two texts in the service
    # The count starts afresh at each batch: the second pair has left.
    with scheduler.in_service(1):
        scheduler.batch(texts=1, running=0)  # takes the peak of two
        assert scheduler.batch(texts=1, running=0).forked is True
    assert cpu_scheduler(Policy(fork=False)).batch(texts=1, running=0).forked is False


def test_the_batcher_hands_each_batch_the_schedulers_execution():
    """If this fails, the runtime no longer hears how to run a batch: a lone request on an
    idle CPU would not fork, or batches under load would."""
    model = RecordingModel()
    scheduler = Scheduler(
        workers=1,
        threads=1,
        cost=None,
        fork=True,
        explain_share=0.25,
        max_batch_size=8,
        max_batch_tokens=10_000,
    )

    async def scenario() -> None:
        b = batcher_module.DynamicBatcher(model, scheduler, max_wait_s=0)
        await b.start()
        deadline = time.monotonic() + 10
        with scheduler.in_service(1):  # one client, alone
            await b.submit([seq(3)], deadline)[0]
        with scheduler.in_service(3):  # three texts in the service, one batch of one
            await b.submit([seq(3)], deadline)[0]
        await b.stop()

    asyncio.run(scenario())
    assert model.hows == [Execution(1, forked=True), Execution(1, forked=False)]


# -- cuts -----------------------------------------------------------------------------------------
def _batches(ends: list[int]) -> list[tuple[int, int]]:
    return list(zip([0, *ends], ends, strict=False))


def test_least_cost_cuts_find_the_cheapest_way_to_cut_a_sorted_round():
    """If this fails, the cost model's cuts are not the cheapest (the batcher pads more than it
    needs to) or break the bounds: every partition of small rounds is tried by brute force."""
    rng = np.random.default_rng(0)
    cost = BatchCost(step_texts=3.0)
    for _ in range(200):
        lengths = sorted(int(n) for n in rng.integers(1, 400, size=int(rng.integers(1, 9))))
        spans = [max(1, min(4, 1200 // n)) for n in lengths]
        every = [
            [*(i + 1 for i in range(len(lengths) - 1) if mask >> i & 1), len(lengths)]
            for mask in range(2 ** (len(lengths) - 1))
        ]
        allowed = [e for e in every if all(b - a <= spans[b - 1] for a, b in _batches(e))]
        totals = [sum(cost(b - a, lengths[b - 1]) for a, b in _batches(e)) for e in allowed]
        ends = least_cost_cuts(spans, lengths, cost)
        assert ends in allowed
        assert totals[allowed.index(ends)] == pytest.approx(min(totals))
        assert full_cuts(spans) in allowed


def test_the_scheduler_cuts_within_the_token_budget():
    scheduler = Policy(step_texts=0).resolve(
        on_cpu=True, torch_threads=2, max_batch_size=64, max_batch_tokens=1000
    )
    # 300-token texts: three fit the budget; the 10s fill a batch of at most 4.
    assert scheduler.cuts([10, 10, 10, 10, 10, 300, 300, 300, 300], most=4) == [4, 7, 9]


# -- explanations' share --------------------------------------------------------------------------
def test_an_explanations_own_sentence_scores_do_not_hold_it_back(
    monkeypatch: pytest.MonkeyPatch,
):
    """If this fails, every /explain on an idle server sits out the idle window (~0.1 s) behind
    its own sentences' scores, which counted as /predict traffic."""
    monkeypatch.setattr(batcher_module, "PREDICTIONS_IDLE_S", 5.0)  # a wait no test sits out
    timeline: list[str] = []
    model = TimelineModel(timeline, delay=0)

    async def scenario() -> float:
        b = make(model, max_wait_s=0)
        await b.start()
        deadline = time.monotonic() + 10
        own = b.submit([seq(2), seq(3)], deadline, background=True)
        job = b.submit_job(ChunkedJob(timeline, "job", 1, 0), deadline)
        result = await job
        await asyncio.gather(*own)
        await b.stop()
        return result.queue_s

    queue_s = asyncio.run(scenario())
    assert timeline[0] == "job"  # not after its own sentences and then the idle window
    assert queue_s < 1.0


def test_predictions_from_clients_still_hold_an_explanation_to_its_share(
    monkeypatch: pytest.MonkeyPatch,
):
    """The other side of the test above: a /predict text waiting goes first."""
    monkeypatch.setattr(batcher_module, "PREDICTIONS_IDLE_S", 0.05)
    timeline: list[str] = []
    model = TimelineModel(timeline, delay=0)

    async def scenario() -> None:
        b = make(model, max_wait_s=0)
        deadline = time.monotonic() + 10
        await b.start()
        texts = b.submit([seq(2)], deadline)
        job = b.submit_job(ChunkedJob(timeline, "job", 1, 0), deadline)
        await asyncio.gather(*texts, job)
        await b.stop()

    asyncio.run(scenario())
    assert timeline == ["batch", "job"]


def test_credit_is_earned_by_batches_spent_by_contended_chunks_and_not_banked():
    scheduler = cpu_scheduler(Policy(explain_share=0.5))
    assert scheduler.jobs_turn(predictions_busy=False)
    assert not scheduler.jobs_turn(predictions_busy=True)
    scheduler.batch_ran(0.2)  # share 0.5: a second of batches earns a second of chunks
    assert scheduler.jobs_turn(predictions_busy=True)
    scheduler.chunk_ran(0.3, contended=True)
    assert not scheduler.jobs_turn(predictions_busy=True)  # 0.1 s in debt
    scheduler.chunk_ran(5.0, contended=False)  # predictions idle: free
    scheduler.batch_ran(0.05)
    assert not scheduler.jobs_turn(predictions_busy=True)  # the debt is paid off first
    scheduler.batch_ran(1.0)
    scheduler.jobs_done()  # no job waits: the credit is dropped
    assert not scheduler.jobs_turn(predictions_busy=True)


def test_the_warm_up_covers_every_way_a_batch_can_run():
    """If this fails, a first request pays for lazy set-up (an ONNX Runtime session for a thread
    count, torch's inter-op threads for the fork) that the warm-up skipped."""
    auto = cpu_scheduler(runtime="auto")
    ways = auto.warm_ups()
    seen = set()
    for texts, running in itertools.product((1, 8, 16, 17, 64), (0, 1)):
        with auto.in_service(texts):
            seen.add(auto.batch(texts=texts, running=running))
    assert len(seen) == 4  # alone or not, on ONNX Runtime or TorchScript
    assert seen <= {how for _, how in ways}
    assert max(size for size, how in ways if how.onnx) == auto.onnx_max_texts
    assert (64, Execution(1)) in ways
