"""The Open Inference Protocol (KServe v2 / Triton) over REST and gRPC, called with the real
Triton clients (``tritonclient.http``, whose default is the binary tensor extension, and
``tritonclient.grpc``) against the shipped model served by `python -m service` (in a process of
its own: its gRPC messages and tritonclient's share protobuf's names): the answers are
/predict's, and both doors keep the service's limits, keys and metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from bench.servers import free_port
from service.oip.generate import generate
from tests.service.conftest import SHIPPED, service_process
from tests.service.test_app import metric_at

TEXTS = ["A wonderful, moving film.", "Dull and far too long.", "Not bad at all."]
MODEL = "imdb-bigru"
CLIENTS = {"http": triton_http, "grpc": triton_grpc}


class Served:
    def __init__(self, url: str, grpc_port: int) -> None:
        self.url = url
        self.grpc_address = f"127.0.0.1:{grpc_port}"


@contextmanager
def served_process(bundle: Path, *flags: str) -> Iterator[Served]:
    grpc_port = free_port()
    args = ["--grpc-port", str(grpc_port), "--no-warmup", *flags]
    with service_process(bundle, args=args) as (_, url):
        yield Served(url, grpc_port)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    with served_process(SHIPPED, "--max-inputs-per-request", "4") as running:
        yield running


def client(kind: str, running: Served, **kwargs: Any) -> Any:
    address = running.grpc_address if kind == "grpc" else running.url.removeprefix("http://")
    return CLIENTS[kind].InferenceServerClient(address, **kwargs)


def text_input(kind: str, texts: list[str], name: str = "TEXT", **kwargs: Any) -> Any:
    tensor = CLIENTS[kind].InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), **kwargs)
    return tensor


def predicted(running: Served, texts: list[str]) -> tuple[np.ndarray, list[str]]:
    """/predict's probabilities (NEGATIVE, POSITIVE) and labels for ``texts``."""
    answer = httpx.post(f"{running.url}/predict", json={"inputs": texts}, timeout=30).json()
    probabilities = [
        [{s["label"]: s["score"] for s in a}[k] for k in ("NEGATIVE", "POSITIVE")] for a in answer
    ]
    return np.array(probabilities, dtype=np.float32), [a[0]["label"] for a in answer]


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_a_triton_client_gets_the_shipped_models_probabilities(served: Served, kind: str):
    """If this fails, Triton, KServe and MLServer users cannot call the service with the
    clients they have (before: /v2 was 404 and there was no gRPC)."""
    triton = client(kind, served)
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL)
    result = triton.infer(MODEL, [text_input(kind, TEXTS)])
    probabilities, labels = predicted(served, TEXTS)
    np.testing.assert_allclose(result.as_numpy("PROBABILITIES"), probabilities, atol=1e-6)
    assert [label.decode() for label in result.as_numpy("LABEL")] == labels


def test_the_json_form_without_binary_data(served: Served):
    triton = client("http", served)
    requested = [triton_http.InferRequestedOutput("PROBABILITIES", binary_data=False)]
    result = triton.infer(
        MODEL, [text_input("http", TEXTS, binary_data=False)], outputs=requested, request_id="7"
    )
    answer = result.get_response()
    assert answer["id"] == "7"
    assert [o["name"] for o in answer["outputs"]] == ["PROBABILITIES"]
    assert answer["outputs"][0]["shape"] == [3, 2]
    np.testing.assert_allclose(
        np.array(answer["outputs"][0]["data"]).reshape(3, 2), predicted(served, TEXTS)[0], atol=1e-6
    )


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_metadata_describes_the_tensors(served: Served, kind: str):
    metadata = (
        client(kind, served).get_model_metadata(MODEL, as_json=True)
        if kind == "grpc"
        else client(kind, served).get_model_metadata(MODEL)
    )
    assert metadata["name"] == MODEL
    assert metadata["versions"] == ["2.0.0"]
    assert [t["name"] for t in metadata["inputs"]] == ["TEXT"]
    assert [t["name"] for t in metadata["outputs"]] == ["PROBABILITIES", "LABEL"]


@pytest.mark.parametrize("kind", ["http", "grpc"])
@pytest.mark.parametrize(
    ("call", "says"),
    [
        (
            lambda t, k: t.infer(MODEL, [text_input(k, ["x"], name="WORDS")]),
            "takes one input, TEXT",
        ),
        (lambda t, k: t.infer("other", [text_input(k, ["x"])]), "model other is not served here"),
        (
            lambda t, k: t.infer(MODEL, [text_input(k, ["x"])], model_version="9"),
            "version 9 is not served",
        ),
        (
            lambda t, k: t.infer(MODEL, [text_input(k, ["a", "b", "c", "d", "e"])]),
            "5 inputs in one request; the limit is 4",
        ),
        (lambda t, k: t.infer(MODEL, [text_input(k, ["  "])]), "empty or only white space"),
    ],
    ids=["input-name", "model", "version", "too-many", "blank"],
)
def test_bad_requests_are_refused_naming_the_problem(
    served: Served, kind: str, call: Any, says: str
):
    """If this fails, a client error over the protocol is a 500, or a message that does not
    say what to change; /predict's limits would not hold at the second door."""
    with pytest.raises(InferenceServerException, match=says):
        call(client(kind, served), kind)


def test_a_body_over_the_limit_is_413_before_it_is_read(served: Served):
    body = (
        b'{"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [1], "data": ["'
        + b"a" * 2_100_000
        + b'"]}]}'
    )
    answer = httpx.post(f"{served.url}/v2/models/{MODEL}/infer", content=body, timeout=30)
    assert answer.status_code == 413
    assert answer.json()["error_type"] == "payload_too_large"


def test_binary_data_that_does_not_add_up_is_refused(served: Served):
    tensor = {"name": "TEXT", "datatype": "BYTES", "shape": [1]}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 40}}]}).encode()
    answer = httpx.post(
        f"{served.url}/v2/models/{MODEL}/infer",
        content=header + b"\x05\x00\x00\x00short",
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert answer.status_code == 422
    assert "binary_data_size 40 exceeds the binary data" in answer.json()["error"]


@pytest.mark.parametrize("kind", ["http", "grpc"])
def test_infer_is_counted_under_its_route(served: Served, kind: str):
    route = (
        "/v2/models/{name}/infer"
        if kind == "http"
        else "/inference.GRPCInferenceService/ModelInfer"
    )
    status = "200" if kind == "http" else "OK"
    before = metric_at(served.url, "sentiment_requests_total", route=route, status=status)
    client(kind, served).infer(MODEL, [text_input(kind, TEXTS[:1])])
    after = metric_at(served.url, "sentiment_requests_total", route=route, status=status)
    assert after == before + 1


def test_both_doors_take_the_api_key(trained_bundle: Path):
    """If this fails, the protocol's routes or its gRPC service answer without a key where
    the service requires one."""
    with served_process(trained_bundle, "--api-keys", "k-one") as running:
        for kind in CLIENTS:
            with pytest.raises(InferenceServerException, match="missing or invalid API key"):
                client(kind, running).infer(MODEL, [text_input(kind, ["x"])])
        assert client("http", running).is_server_ready()  # the health routes are exempt
        bundle = trained_bundle.name
        for kind in CLIENTS:
            headers = {"authorization": "Bearer k-one"}
            result = client(kind, running).infer(
                bundle, [text_input(kind, ["a fine film"])], headers=headers
            )
            assert result.as_numpy("PROBABILITIES").shape == (1, 2)


def test_the_generated_grpc_code_is_the_protos(tmp_path: Path):
    """If this fails, predict_v2.proto was edited without ``python -m service.oip.generate``."""
    root = Path(__file__).resolve().parents[2]
    for path in generate(tmp_path):
        committed = root / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), committed


def test_a_taken_grpc_port_stops_the_service_with_one_line(trained_bundle: Path):
    """If this fails, a gRPC port another program holds ends start-up in a lifespan
    traceback after the model has loaded, or the service serves HTTP without its gRPC door."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "service", "--grpc-port", str(port), "--port", "0"],
            env={
                **os.environ,
                "SENTIMENT_MODEL_DIR": str(trained_bundle.parent),
                "SENTIMENT_MODEL_NAME": trained_bundle.name,
            },
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot serve gRPC on 127.0.0.1:{port}: Address already in use "
        "(--grpc-port / SENTIMENT_GRPC_PORT; -1: no gRPC)"
    )
