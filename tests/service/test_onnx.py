"""ONNX Runtime behind the scheduler (SENTIMENT_RUNTIME): the same answers as TorchScript from a
real server, /info and model_info naming what runs the batches, explanations still through
TorchScript, and a bundle that cannot serve the choice refused at start."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from service import bundle
from service.runtime import Execution, ModelRuntime
from tests.service.conftest import serve
from tests.service.test_app import metric

TEXTS = [
    "A great, moving film with a wonderful cast.",
    "A dull, lifeless waste of two hours. " * 30,  # past the tiny model's truncation
    "ok",
    "\u00bfQu\u00e9?",  # every word unknown
]


def _scores(url: str) -> list[float]:
    body = {"inputs": TEXTS, "truncate": True}
    answer = httpx.post(f"{url}/predict", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    return [next(s["score"] for s in row if s["label"] == "POSITIVE") for row in answer.json()]


def test_a_server_on_onnx_runtime_answers_as_the_torchscript_one(trained_bundle: Path):
    """If this fails, SENTIMENT_RUNTIME=onnx serves other scores than the model's (or does not
    reach the batches), or /info and model_info do not say what runs them."""
    with serve(trained_bundle, runtime="torchscript") as server:
        assert httpx.get(f"{server.url}/info").json()["scheduler"]["runtime"] == "torchscript"
        want = _scores(server.url)
    with serve(trained_bundle, runtime="onnx") as server:
        scheduler = httpx.get(f"{server.url}/info").json()["scheduler"]
        assert (scheduler["runtime"], scheduler["onnx_max_texts"]) == ("onnxruntime", 64)
        assert metric(server, "sentiment_model_info", runtime="onnxruntime") == 1
        np.testing.assert_allclose(_scores(server.url), want, rtol=0, atol=1e-4)
        # Explanations take their gradients through TorchScript whatever runs the batches.
        explained = httpx.post(f"{server.url}/explain", json={"inputs": TEXTS[0]}, timeout=30)
        assert explained.status_code == 200, explained.text
        found = explained.json()
        found = found[0] if isinstance(found, list) else found
        positive = found["score"] if found["label"] == "POSITIVE" else 1 - found["score"]
        assert abs(positive - want[0]) < 1e-4
        assert found["tokens"]


class Recording:
    """The runtime's ONNX model, noting the size of each batch it runs."""

    def __init__(self, inner: bundle.OnnxModel) -> None:
        self.inner = inner
        self.batches: list[int] = []

    def __call__(self, ids: np.ndarray, lengths: np.ndarray, threads: int) -> np.ndarray:
        self.batches.append(len(ids))
        return self.inner(ids, lengths, threads)


def test_the_runtime_runs_a_batch_where_the_execution_says(trained_bundle: Path):
    """If this fails, the scheduler's choice is ignored by the runtime (every batch on one
    engine), or a runtime without model.onnx fails a batch the scheduler sent to it."""
    with_onnx = ModelRuntime.load(trained_bundle, "cpu", "float32", "onnx")
    assert with_onnx.onnx is not None
    recording = Recording(with_onnx.onnx)
    with_onnx.onnx = recording  # type: ignore[assignment]
    seqs = [e.ids for e in with_onnx.preprocess(TEXTS)]
    on_onnx = with_onnx.infer(seqs, Execution(1, onnx=True))
    on_torchscript = with_onnx.infer(seqs, Execution(1, onnx=False))
    assert recording.batches == [len(TEXTS)]
    np.testing.assert_allclose(on_onnx, on_torchscript, rtol=0, atol=1e-4)
    plain = ModelRuntime.load(trained_bundle, "cpu", "float32", "torchscript")
    assert plain.onnx is None
    np.testing.assert_array_equal(plain.infer(seqs, Execution(1, onnx=True)), on_torchscript)


def test_onnx_runtime_on_a_bundle_without_model_onnx_stops_the_service_with_one_line(
    trained_bundle: Path, tmp_path: Path
):
    folder = shutil.copytree(trained_bundle, tmp_path / "models" / "plain")
    (folder / bundle.ONNX_FILE).unlink()
    env = {
        **os.environ,
        "SENTIMENT_PORT": "0",
        "SENTIMENT_GRPC_PORT": "0",
        "SENTIMENT_MODEL_DIR": str(folder.parent),
        "SENTIMENT_MODEL_NAME": "plain",
        "SENTIMENT_RUNTIME": "onnx",
    }
    result = subprocess.run(
        [sys.executable, "-m", "service"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr
    assert "has no ONNX model" in result.stderr.splitlines()[-1]
    assert "python -m training migrate" in result.stderr.splitlines()[-1]
    # The default (auto) serves it on TorchScript: a bundle without model.onnx still serves.
    with serve(folder, runtime="auto") as server:
        assert httpx.get(f"{server.url}/info").json()["scheduler"]["runtime"] == "torchscript"
        assert len(_scores(server.url)) == len(TEXTS)
