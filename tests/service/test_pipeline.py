"""The predictor without HTTP: a real tiny runtime and a real batcher."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from service import bundle
from service.batcher import DynamicBatcher
from service.bundle import Truncation
from service.config import Settings
from service.metrics import Metrics
from service.pipeline import Predictor
from service.runtime import UNSCHEDULED, Encoded, Execution, ModelRuntime
from service.scheduler import Policy


class SlowTokenizer(ModelRuntime):
    """The tiny model, with a tokeniser that takes 0.2 s and counts how many run at once; it
    records how each batch was told to run."""

    def __init__(self, loaded: bundle.Bundle) -> None:
        super().__init__(loaded)
        self._lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0
        self.hows: list[Execution] = []

    def infer(self, seqs: list[np.ndarray], how: Execution = UNSCHEDULED) -> np.ndarray:
        self.hows.append(how)
        return super().infer(seqs, how)

    def preprocess(self, texts: list[str], cut: Truncation | None = None) -> list[Encoded]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.2)
        with self._lock:
            self.running -= 1
        return super().preprocess(texts, cut)


def _batcher(runtime: ModelRuntime) -> DynamicBatcher:
    """A batcher on the default policy for a 2-core CPU, for a runtime on TorchScript alone (as
    these tests load it): two workers of one thread each, a lone batch forked."""
    scheduler = Policy().resolve(
        on_cpu=True,
        torch_threads=2,
        max_batch_size=64,
        max_batch_tokens=32_768,
        runtime="torchscript",
    )
    return DynamicBatcher(runtime.infer, scheduler, max_wait_s=0)


async def _predict_at_once(runtime: ModelRuntime, settings: Settings, requests: int) -> None:
    metrics = Metrics()
    batcher = _batcher(runtime)
    await batcher.start()
    predictor = Predictor(runtime, batcher, settings, metrics)
    try:
        answers = await asyncio.gather(
            *(predictor.predict([f"a fine film, number {i}"]) for i in range(requests))
        )
    finally:
        await batcher.stop()
        predictor.close()
    assert len(answers) == requests
    assert all(len(a.scores) == 1 for a in answers)


@pytest.mark.parametrize("workers", [1, 3])
def test_requests_tokenise_on_as_many_threads_as_configured(trained_bundle: Path, workers: int):
    # SENTIMENT_TOKENIZATION_WORKERS: with one worker, requests queue for the tokeniser; with
    # three, three tokenise at once. If the pool ignored the setting, one of these would fail.
    runtime = SlowTokenizer(bundle.load(trained_bundle, "cpu"))
    settings = Settings(tokenization_workers=workers)
    asyncio.run(_predict_at_once(runtime, settings, requests=4))
    assert runtime.most_at_once == workers


def test_the_scheduler_hears_of_every_request_the_pipeline_admits(trained_bundle: Path):
    """The fork reads the texts in the service, which the pipeline pushes down: if it forgot
    requests that came and went between two batches, a batch would fork while the event loop
    is busy with the next ones; if it never started a new count, a lone request after a burst
    would not fork: the count runs from one batch's start to the next."""
    runtime = SlowTokenizer(bundle.load(trained_bundle, "cpu"))

    async def burst_then_alone() -> None:
        batcher = _batcher(runtime)
        await batcher.start()
        predictor = Predictor(runtime, batcher, Settings(), Metrics())
        try:
            texts = [["a fine film"], ["a dull film"], ["one", "two", "three"]]
            await asyncio.gather(*(predictor.predict(t) for t in texts))
            await predictor.predict(["alone"])
            await predictor.predict(["alone again"])
        finally:
            await batcher.stop()
            predictor.close()

    asyncio.run(burst_then_alone())
    *burst, after, alone = runtime.hows
    assert [how.forked for how in burst] == [False] * len(burst)  # others were in the service
    assert not after.forked  # the burst's last texts were there when the last batch began
    assert alone.forked  # they had left by the time the batch before this one began
