"""The predictor without HTTP: a real tiny runtime and a real batcher."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from service import bundle
from service.batcher import DynamicBatcher
from service.config import Settings
from service.metrics import Metrics
from service.pipeline import Predictor
from service.runtime import Encoded, ModelRuntime


class SlowTokenizer(ModelRuntime):
    """The tiny model, with a tokeniser that takes 0.2 s and counts how many run at once."""

    def __init__(self, loaded: bundle.Bundle) -> None:
        super().__init__(loaded)
        self._lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def preprocess(self, texts: list[str]) -> list[Encoded]:
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.2)
        with self._lock:
            self.running -= 1
        return super().preprocess(texts)


async def _predict_at_once(runtime: ModelRuntime, settings: Settings, requests: int) -> None:
    metrics = Metrics()
    batcher = DynamicBatcher(
        runtime.infer, max_batch_size=64, max_batch_tokens=32_768, max_wait_s=0, max_queue=512
    )
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


def test_the_peak_of_texts_in_progress_counts_requests_that_came_and_went(trained_bundle: Path):
    """The fork policy (``runtime.ForkWhenAlone``) reads this peak: if it forgot requests that
    were answered before it asked, a batch would fork while the event loop is busy with the
    next ones; if it never started a new count, a lone request after a burst would not fork."""
    runtime = SlowTokenizer(bundle.load(trained_bundle, "cpu"))

    async def burst() -> list[int]:
        batcher = DynamicBatcher(
            runtime.infer, max_batch_size=64, max_batch_tokens=32_768, max_wait_s=0, max_queue=64
        )
        await batcher.start()
        predictor = Predictor(runtime, batcher, Settings(), Metrics())
        try:
            peaks = [predictor.peak_texts_in_progress()]
            texts = [["a fine film"], ["a dull film"], ["one", "two", "three"]]
            await asyncio.gather(*(predictor.predict(t) for t in texts))
            peaks += [predictor.peak_texts_in_progress(), predictor.peak_texts_in_progress()]
            await predictor.predict(["alone"])
            peaks.append(predictor.peak_texts_in_progress())
            return peaks
        finally:
            await batcher.stop()
            predictor.close()

    assert asyncio.run(burst()) == [0, 5, 0, 1]
