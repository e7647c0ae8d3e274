"""`python -m service` as a real process: SIGTERM with requests queued loses none of them; an
unusable bundle or bad settings stop it at start with one clear message."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.types import Message

from service.__main__ import BriefBundleFailure
from service.errors import BundleError
from tests.service.conftest import corrupt_model_file, oversize_tokenizer, service_process
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


def _missing(bundle: Path) -> None:
    shutil.rmtree(bundle)


@pytest.mark.parametrize(
    ("break_bundle", "message"),
    [
        (_missing, "cannot serve: model bundle not found"),
        (corrupt_model_file, "is not a loadable TorchScript file"),
        (oversize_tokenizer, "do not match"),
    ],
    ids=["missing", "corrupt", "tokenizer-larger-than-embeddings"],
)
def test_an_unusable_bundle_stops_the_service_with_one_clear_message(
    trained_bundle: Path, tmp_path: Path, break_bundle: Callable[[Path], None], message: str
):
    shutil.copytree(trained_bundle, tmp_path / "models" / "broken")
    break_bundle(tmp_path / "models" / "broken")
    env = {
        **os.environ,
        "SENTIMENT_MODEL_DIR": str(tmp_path / "models"),
        "SENTIMENT_MODEL_NAME": "broken",
        "SENTIMENT_PORT": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr  # uvicorn's code for a failed startup
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 2, result.stderr  # the problem, then uvicorn's "startup failed"
    assert message in errors[0]
    assert "Traceback" not in result.stderr


def _lifespan_app(fault: BaseException) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        raise fault
        yield

    return Starlette(lifespan=lifespan)


@pytest.mark.parametrize(
    ("fault", "traceback_sent"),
    [(BundleError("no bundle"), False), (RuntimeError("a bug"), True)],
    ids=["bundle", "other"],
)
def test_only_a_bundle_failure_reaches_uvicorn_without_its_traceback(
    fault: BaseException, traceback_sent: bool
):
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        sent.append(message)

    app = BriefBundleFailure(_lifespan_app(fault))
    with pytest.raises(type(fault)):
        asyncio.run(app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert ("Traceback" in sent[0]["message"]) is traceback_sent


def test_invalid_settings_are_refused_before_start():
    env = {**os.environ, "SENTIMENT_MAX_BATCH_SIZE": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "SENTIMENT_MAX_BATCH_SIZE" in result.stderr
