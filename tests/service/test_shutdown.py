"""`python -m service` as a real process: SIGTERM with requests queued loses none of them; bad
settings or an unusable bundle stop it before it serves, with one line and no traceback."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import torch

from tests.service.conftest import corrupt_model_file, oversize_tokenizer, service_process
from tests.service.test_app import metric_at

QUEUED = 40


def test_sigterm_answers_every_accepted_request(trained_bundle: Path):
    # A long batching window: the requests are still queued when SIGTERM arrives.
    with service_process(
        trained_bundle, SENTIMENT_MAX_WAIT_MS="1000", SENTIMENT_MAX_BATCH_SIZE="64"
    ) as (process, url):

        async def scenario() -> tuple[list[int], type[Exception] | None]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                pending = [
                    asyncio.ensure_future(client.post("/predict", json={"inputs": f"great {i}"}))
                    for i in range(QUEUED)
                ]
                while await asyncio.to_thread(metric_at, url, "sentiment_queue_depth") < QUEUED:
                    await asyncio.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                # uvicorn has stopped accepting: a new connection is refused, not half-served.
                refused = None
                try:
                    await client.post("/predict", json={"inputs": "too late"})
                except httpx.ConnectError as exc:
                    refused = type(exc)
                answers = await asyncio.gather(*pending)
            return [a.status_code for a in answers], refused

        answered, refused = asyncio.run(scenario())
        assert answered == [200] * QUEUED
        assert refused is httpx.ConnectError
        output, _ = process.communicate(timeout=30)
        # uvicorn shuts down cleanly, then re-raises the signal it caught.
        assert process.returncode in (0, -signal.SIGTERM), output
        assert "Waiting for connections to close" in output
        assert "batcher drained and stopped" in output


def _start(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service"],
        env={**os.environ, "SENTIMENT_PORT": "0", "SENTIMENT_GRPC_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().endswith(errors[0])  # the last thing it says
    return errors[0]


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
def test_an_unusable_bundle_stops_the_service_with_one_clear_line(
    trained_bundle: Path, tmp_path: Path, break_bundle: Callable[[Path], None], message: str
):
    shutil.copytree(trained_bundle, tmp_path / "models" / "broken")
    break_bundle(tmp_path / "models" / "broken")
    result = _start(
        {"SENTIMENT_MODEL_DIR": str(tmp_path / "models"), "SENTIMENT_MODEL_NAME": "broken"}
    )
    assert result.returncode == 3, result.stderr
    assert message in _one_error_line(result.stderr)
    assert "Uvicorn running" not in result.stderr  # refused before uvicorn started


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"SENTIMENT_MAX_BATCH_SIZE": "0"}, "SENTIMENT_MAX_BATCH_SIZE", "greater than or equal"),
        ({"SENTIMENT_DEVICE": "gpu"}, "SENTIMENT_DEVICE", "unknown device 'gpu'"),
        ({"SENTIMENT_DEVICE": "cuda"}, "SENTIMENT_DEVICE", "CUDA is not available"),
        ({"SENTIMENT_DTYPE": "float64"}, "SENTIMENT_DTYPE", "'bfloat16' or 'int8'"),
        ({"SENTIMENT_TOKENIZATION_WORKERS": "0"}, "SENTIMENT_TOKENIZATION_WORKERS", "greater"),
    ],
    ids=["batch-size", "device-name", "device-absent", "dtype", "tokenization-workers"],
)
def test_invalid_settings_are_one_line_naming_the_variable(
    env: dict[str, str], variable: str, says: str
):
    if env.get("SENTIMENT_DEVICE") == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    result = _start(env)
    assert result.returncode == 2, result.stderr
    line = _one_error_line(result.stderr)
    assert variable in line
    assert says in line
