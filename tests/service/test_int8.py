"""A service on a bundle with an int8 variant, over HTTP: a CPU serves the variant by default
(SENTIMENT_DTYPE=auto) and says so, float32 stays one setting away, and /explain still works
(its gradients come from model.pt) with /predict's label and score. If these fail, the default
CPU service answers with another model than /info names, or loses its explanations."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pydantic import TypeAdapter

from service.config import Settings
from service.runtime import ModelRuntime
from service.schemas import ExplainResponse
from tests.service.conftest import serve

# How far an int8 score may move with its batch's company (measured: docs/benchmarks.md).
INT8_BATCH_TOLERANCE = 0.03  # 0.0199 at most over 128 test reviews, alone vs in 64s
TEXTS = ["a wonderful film, great acting", "dull and boring, a waste", "it was fine I guess"]


def scores(url: str) -> list[float]:
    response = httpx.post(f"{url}/predict", json={"inputs": TEXTS}, timeout=30)
    assert response.status_code == 200
    return [next(g["score"] for g in one if g["label"] == "POSITIVE") for one in response.json()]


def expected(runtime: ModelRuntime) -> list[float]:
    encoded = runtime.preprocess(TEXTS)
    logits = runtime.infer([e.ids for e in encoded])
    return [
        dict(runtime.postprocess(float(z), e.original_tokens))["POSITIVE"]
        for z, e in zip(logits, encoded, strict=True)
    ]


@pytest.mark.parametrize("dtype", ["auto", "int8", "float32"])
def test_the_precision_served_is_the_one_info_names(quantized_bundle: Path, dtype: str):
    served = "float32" if dtype == "float32" else "int8"
    runtime = ModelRuntime.load(quantized_bundle, "cpu", served)  # type: ignore[arg-type]
    # On TorchScript alone: by default a batch this small would run on model.onnx (float32;
    # tests/service/test_onnx.py), larger ones in the dtype named here.
    with serve(quantized_bundle, dtype=dtype, runtime="torchscript") as server:
        info = httpx.get(f"{server.url}/info").json()
        assert info["dtype"] == served
        assert info["model"]["int8"]["metrics"]["test"]["n"] > 0  # the variant's own figures
        assert np.allclose(scores(server.url), expected(runtime), rtol=0, atol=1e-6)


def test_an_int8_service_explains_with_model_pt_and_predicts_with_int8(quantized_bundle: Path):
    float32 = ModelRuntime.load(quantized_bundle, "cpu", "float32")
    text = TEXTS[0]
    with serve(quantized_bundle, runtime="torchscript") as server:
        response = httpx.post(f"{server.url}/explain", json={"inputs": text}, timeout=60)
        assert response.status_code == 200
        (answer,) = TypeAdapter(ExplainResponse).validate_python(response.json())
        predicted = httpx.post(f"{server.url}/predict", json={"inputs": text}).json()[0][0]
    # The same model, in another batch: int8 activations are quantised with a scale per batch,
    # so a text's score moves a little with the batch it runs in (docs/benchmarks.md, int8).
    assert (answer.label, answer.score) == (
        predicted["label"],
        pytest.approx(predicted["score"], abs=INT8_BATCH_TOLERANCE),
    )
    float_logit = float(float32.infer([float32.preprocess([text])[0].ids])[0])
    assert answer.completeness.logit == pytest.approx(float_logit, abs=1e-5)
    assert abs(answer.completeness.gap) <= 0.05 * abs(
        answer.completeness.logit - answer.completeness.baseline_logit
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_on_cuda_is_a_settings_error():
    with pytest.raises(ValueError, match="dtype int8 is CPU only"):
        Settings(dtype="int8", device="cuda")
