"""`python -m service` as a real process: SIGTERM with requests queued loses none of them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.service.conftest import service_process
from tests.service.test_app import metric_at

QUEUED = 40


def test_sigterm_answers_every_accepted_request(trained_bundle: Path):
    # A long batching window: the requests are still queued when SIGTERM arrives.
    with service_process(
        trained_bundle, SENTIMENT_MAX_WAIT_MS="1000", SENTIMENT_MAX_BATCH_SIZE="64"
    ) as (process, url):

        async def scenario() -> tuple[list[object], list[int]]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                pending = [
                    asyncio.ensure_future(client.post("/predict", json={"inputs": f"great {i}"}))
                    for i in range(QUEUED)
                ]
                while await asyncio.to_thread(metric_at, url, "sentiment_queue_depth") < QUEUED:
                    await asyncio.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                # Still listening while draining: new work and readiness get 503.
                late = await client.post("/predict", json={"inputs": "too late"})
                ready = await client.get("/ready")
                answers = await asyncio.gather(*pending)
            return [late.status_code, ready.status_code, late.json()["error_type"]], [
                a.status_code for a in answers
            ]

        refused, answered = asyncio.run(scenario())
        assert refused == [503, 503, "unavailable"]
        assert answered == [200] * QUEUED
        output, _ = process.communicate(timeout=30)
        # uvicorn shuts down cleanly, then re-raises the signal it caught.
        assert process.returncode in (0, -signal.SIGTERM), output
        assert "draining" in output
        assert "batcher drained and stopped" in output


def test_an_unusable_bundle_stops_the_service_with_a_clear_message(tmp_path: Path):
    env = {**os.environ, "SENTIMENT_MODEL_DIR": str(tmp_path), "SENTIMENT_PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert "cannot serve: model bundle not found" in result.stderr


def test_invalid_settings_are_refused_before_start():
    env = {**os.environ, "SENTIMENT_MAX_BATCH_SIZE": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "SENTIMENT_MAX_BATCH_SIZE" in result.stderr
