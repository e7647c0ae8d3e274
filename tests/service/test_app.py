"""The service over HTTP: a real uvicorn server on 127.0.0.1 and the tiny exported bundle."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service import bundle
from service.app import create_app
from service.config import Settings
from service.routes import get_settings
from service.runtime import ModelRuntime
from service.scheduler import CPU_STEP_TEXTS, Policy
from tests.service.conftest import RunningServer, serve

WORDS = ["great", "dull", "moving", "waste", "the", "film", "plot", "superb", "awful", "a"]


def review(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(1, 30))))  # the tiny model reads 32


def metric(server: RunningServer, name: str, /, **labels: str) -> float:
    return metric_at(server.url, name, **labels)


def metric_at(url: str, name: str, /, **labels: str) -> float:
    """A sample's value from the service's /metrics, parsed as Prometheus would."""
    text = httpx.get(f"{url}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_single_text_in_the_hugging_face_format(server: RunningServer, trained_bundle: Path):
    response = httpx.post(f"{server.url}/predict", json={"inputs": "A great, moving film."})
    assert response.status_code == 200
    [body] = response.json()  # one list of labels per text, for a single text too
    assert [item["label"] for item in body] in (["POSITIVE", "NEGATIVE"], ["NEGATIVE", "POSITIVE"])
    assert body[0]["score"] >= body[1]["score"]
    assert body[0]["score"] + body[1]["score"] == pytest.approx(1.0)
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    [encoded] = runtime.preprocess(["A great, moving film."])
    expected = runtime.postprocess(float(runtime.infer([encoded.ids])[0]), encoded.original_tokens)
    assert [(b["label"], b["score"]) for b in body] == [
        (label, pytest.approx(score, abs=1e-6)) for label, score in expected
    ]
    for header in ("x-total-time", "x-tokenization-time", "x-queue-time", "x-inference-time"):
        assert float(response.headers[header]) >= 0


def test_list_of_64_equals_64_concurrent_requests_equals_the_model(
    server: RunningServer, trained_bundle: Path
):
    texts = [review(i) for i in range(64)]
    as_list = httpx.post(f"{server.url}/predict", json={"inputs": texts}, timeout=30).json()

    async def one_by_one() -> list[Any]:
        async with server.async_client() as client:
            answers = await asyncio.gather(
                *(client.post("/predict", json={"inputs": t}) for t in texts)
            )
        return [a.json()[0] for a in answers]

    concurrent = asyncio.run(one_by_one())
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    encoded = runtime.preprocess(texts)
    direct = [float(runtime.infer([e.ids])[0]) for e in encoded]  # one at a time, no batching
    for i, text_answer in enumerate(as_list):
        want = dict(runtime.postprocess(direct[i], encoded[i].original_tokens))
        for got in (text_answer, concurrent[i]):
            assert {g["label"]: g["score"] for g in got} == {
                k: pytest.approx(v, abs=1e-5) for k, v in want.items()
            }, texts[i]


def test_concurrent_requests_are_merged_into_few_batches(trained_bundle: Path):
    with serve(trained_bundle, max_wait_ms=20) as server:
        before = metric(server, "sentiment_batch_size_count")

        async def flood() -> list[int]:
            async with server.async_client() as client:
                answers = await asyncio.gather(
                    *(client.post("/predict", json={"inputs": review(i)}) for i in range(200))
                )
            return [a.status_code for a in answers]

        assert asyncio.run(flood()) == [200] * 200
        batches = metric(server, "sentiment_batch_size_count") - before
        texts = metric(server, "sentiment_batch_size_sum")
        assert texts == 200
        assert batches <= 50, f"200 requests took {batches} model batches"


def test_top_k_and_function_to_apply(server: RunningServer):
    url = f"{server.url}/predict"
    [top] = httpx.post(url, json={"inputs": "great", "parameters": {"top_k": 1}}).json()
    assert len(top) == 1
    raw = httpx.post(url, json={"inputs": "great", "parameters": {"function_to_apply": "none"}})
    scores = {b["label"]: b["score"] for b in raw.json()[0]}
    assert scores["POSITIVE"] == pytest.approx(-scores["NEGATIVE"])
    many = httpx.post(url, json={"inputs": ["great", "awful"], "parameters": {"top_k": 5}}).json()
    assert [len(m) for m in many] == [2, 2]


def test_truncate_scores_a_cut_of_max_length_tokens(server: RunningServer):
    long = "great film " * 100
    response = httpx.post(f"{server.url}/predict", json={"inputs": long, "truncate": True})
    assert response.status_code == 200
    assert int(response.headers["x-compute-tokens"]) == 32
    assert metric(server, "sentiment_inputs_truncated_total") >= 1


@pytest.mark.parametrize(
    ("content", "headers", "status", "error_type", "says"),
    [
        (b"", {}, 400, "invalid_json", "body is empty"),
        (b"{bad", {}, 400, "invalid_json", "not valid JSON"),
        (b'{"inputs": "\xff\xfe"}', {}, 400, "invalid_encoding", "not valid UTF-8"),
        (b'"just a string"', {}, 422, "validation", "body"),
        (b"{}", {}, 422, "validation", "inputs: Field required"),
        (b'{"inputs": null}', {}, 422, "validation", "string or a list of strings"),
        (b'{"inputs": 7}', {}, 422, "validation", "string or a list of strings"),
        (b'{"inputs": [["nested"]]}', {}, 422, "validation", "string or a list of strings"),
        (b'{"inputs": []}', {}, 422, "validation", "empty list"),
        (b'{"inputs": ""}', {}, 422, "validation", "inputs is empty"),
        (b'{"inputs": ["ok", " \\n\\t "]}', {}, 422, "validation", "inputs[1] is empty"),
        (b'{"inputs": "a\\ud800b"}', {}, 422, "validation", "lone surrogate"),
        (b'{"inputs": "x", "stream": true}', {}, 422, "validation", "stream: Extra inputs"),
        (b'{"inputs": "x", "parameters": {"top_k": -1}}', {}, 422, "validation", "top_k"),
        (b'{"inputs": "x", "parameters": {"top_k": "2"}}', {}, 422, "validation", "top_k"),
        (b'{"inputs": "x", "truncate": "yes"}', {}, 422, "validation", "truncate"),
        (
            b'{"inputs": "x"}',
            {"content-type": "text/plain"},
            415,
            "unsupported_media_type",
            "text/plain",
        ),
        (
            json.dumps({"inputs": "great " * 100}).encode(),
            {},
            413,
            "input_too_long",
            '"truncate": true',
        ),
        (json.dumps({"inputs": ["x"] * 257}).encode(), {}, 413, "too_many_inputs", "257 inputs"),
        (json.dumps({"inputs": ["x"] * 10_000}).encode(), {}, 413, "too_many_inputs", "10000"),
        (
            json.dumps({"inputs": "word " * 1_000_000}).encode(),
            {},
            413,
            "payload_too_large",
            "exceeds",
        ),  # a 5 MB text
        (b'{"inputs": "' + b"a" * 2_100_000 + b'"}', {}, 413, "payload_too_large", "exceeds"),
    ],
)
def test_bad_requests_get_a_named_4xx(
    server: RunningServer,
    content: bytes,
    headers: dict[str, str],
    status: int,
    error_type: str,
    says: str,
):
    response = httpx.post(f"{server.url}/predict", content=content, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error_type"] == error_type
    assert says in response.json()["error"]
    # and the service keeps serving
    assert httpx.post(f"{server.url}/predict", json={"inputs": "fine"}).status_code == 200


@pytest.mark.parametrize(
    "text",
    [
        "nul\x00inside",
        "😀😀 great",
        "مراجعة رائعة",  # right-to-left script
        "<br /><br />",  # only markup: no tokens after normalisation, still answered
        "x" * 5000,  # one long token
    ],
)
def test_unusual_but_valid_text_is_scored(server: RunningServer, text: str):
    response = httpx.post(f"{server.url}/predict", json={"inputs": text, "truncate": True})
    assert response.status_code == 200, response.text
    assert sum(item["score"] for item in response.json()[0]) == pytest.approx(1.0)


def test_curl_style_form_content_type_is_read_as_json(server: RunningServer):
    response = httpx.post(
        f"{server.url}/predict",
        content=b'{"inputs": "A wonderful, moving film."}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200
    assert len(response.json()[0]) == 2


def test_unknown_route_and_method(server: RunningServer):
    assert httpx.get(f"{server.url}/nope").json()["error_type"] == "not_found"
    response = httpx.get(f"{server.url}/predict")
    assert response.status_code == 405
    assert response.json()["error_type"] == "method_not_allowed"


def test_full_queue_answers_429_with_retry_after_at_once(trained_bundle: Path):
    with serve(trained_bundle, max_queue_texts=4, max_wait_ms=300) as server:

        async def burst() -> list[httpx.Response]:
            async with server.async_client() as client:
                return await asyncio.gather(
                    *(client.post("/predict", json={"inputs": review(i)}) for i in range(30))
                )

        answers = asyncio.run(burst())
        statuses = sorted({a.status_code for a in answers})
        assert statuses == [200, 429]
        refused = next(a for a in answers if a.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error_type"] == "overloaded"
        assert metric(server, "sentiment_failures_total", reason="overloaded") >= 1


def test_deadline_counts_queue_time_and_answers_504(trained_bundle: Path):
    with serve(trained_bundle, request_timeout_s=0.05, max_wait_ms=500) as server:
        response = httpx.post(f"{server.url}/predict", json={"inputs": "great film"})
        assert response.status_code == 504
        assert response.json()["error_type"] == "timeout"


def test_health_ready_info_and_docs(server: RunningServer, trained_bundle: Path):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    info = httpx.get(f"{server.url}/info").json()
    # The model part is the card's public summary, as the bundle contract reads it.
    summary = bundle.read_card(trained_bundle).summary()
    assert info["model"] == json.loads(summary.model_dump_json())
    assert info["model"]["truncation"] == {"max_length": 32, "head": 12, "tail": 20}
    assert info["device"] == "cpu"
    assert info["dtype"] == "float32"
    assert info["cuda_memory"] is None  # a CPU service has no CUDA memory to report
    assert info["batching"]["max_batch_size"] == 64
    # How batches run is the scheduler's policy, resolved for this CPU: the same as the
    # scheduler the default policy makes here.
    threads = torch.get_num_threads()
    scheduler = Policy().resolve(True, threads, 64, info["batching"]["max_batch_tokens"])
    assert info["scheduler"] == scheduler.describe(can_fork=True, has_onnx=True)
    assert info["scheduler"]["inference_workers"] == threads  # batches side by side
    assert info["scheduler"]["batch_step_texts"] == CPU_STEP_TEXTS
    assert httpx.get(f"{server.url}/docs").status_code == 200
    spec = httpx.get(f"{server.url}/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["$ref"].endswith("/PredictRequest")


def test_three_inference_workers_answer_a_flood_as_the_model_does(trained_bundle: Path):
    """If this fails, batches run side by side (the policy's workers) mix up answers or the
    policy is not applied."""
    texts = [review(i) for i in range(120)]
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    encoded = runtime.preprocess(texts)
    want = runtime.infer([e.ids for e in encoded])
    with serve(trained_bundle, Policy(workers=3), max_batch_size=4) as server:
        assert httpx.get(f"{server.url}/info").json()["scheduler"]["inference_workers"] == 3

        async def flood() -> list[Any]:
            async with server.async_client() as client:
                answers = await asyncio.gather(
                    *(client.post("/predict", json={"inputs": t}) for t in texts)
                )
            return [a.json()[0] for a in answers]

        answers = asyncio.run(flood())
    for text, logit, e, answer in zip(texts, want, encoded, answers, strict=True):
        expected = dict(runtime.postprocess(float(logit), e.original_tokens))
        got = {a["label"]: a["score"] for a in answer}
        assert got == {k: pytest.approx(v, abs=1e-5) for k, v in expected.items()}, text


def test_before_the_model_is_loaded_every_model_route_answers_503(trained_bundle: Path):
    # The app without its lifespan: no predictor yet, as while a model loads.
    app = create_app(Settings(model_dir=trained_bundle.parent, model_name=trained_bundle.name))

    async def ask() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return [
                await client.get("/ready"),
                await client.get("/info"),
                await client.post("/predict", json={"inputs": "great"}),
                await client.get("/health"),
            ]

    ready, info, predict, health = asyncio.run(ask())
    for answer in (ready, info, predict):
        assert answer.status_code == 503
        assert answer.json()["error_type"] == "unavailable"
        assert answer.headers["retry-after"] == "1"
    assert health.status_code == 200  # alive while loading


def test_route_dependencies_can_be_replaced(trained_bundle: Path):
    # What the routes read comes through Depends: /info reports the settings it is given.
    with serve(trained_bundle) as server:
        app = server.server.config.app
        app.dependency_overrides[get_settings] = lambda: Settings(max_batch_size=7)
        assert httpx.get(f"{server.url}/info").json()["batching"]["max_batch_size"] == 7
        app.dependency_overrides.clear()
        assert httpx.get(f"{server.url}/info").json()["batching"]["max_batch_size"] == 64


def test_metrics_parse_and_cover_the_service(server: RunningServer):
    httpx.post(f"{server.url}/predict", json={"inputs": ["great", "awful"]})
    httpx.post(f"{server.url}/predict", json={"inputs": ""})
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "sentiment_requests",
        "sentiment_request_duration_seconds",
        "sentiment_tokenization_duration_seconds",
        "sentiment_queue_duration_seconds",
        "sentiment_inference_duration_seconds",
        "sentiment_batch_size",
        "sentiment_batch_tokens",
        "sentiment_queue_depth",
        "sentiment_failures",
        "sentiment_inputs_truncated",
        "sentiment_model_info",
        "sentiment_inputs",
        "sentiment_explain_queue_duration_seconds",
        "sentiment_explain_inference_duration_seconds",
        "sentiment_explain_queue_depth",
    ):
        assert name in families, name
    # One prefix for the service's own; prometheus_client's process_* beside them.
    assert all(n.startswith(("sentiment_", "process_")) for n in families)
    assert metric(server, "sentiment_requests_total", route="/predict", status="422") >= 1
    assert metric(server, "sentiment_failures_total", route="/predict", reason="validation") >= 1
    runtime = Policy().resolve(True, 2, 64, 32_768).runtime(has_onnx=True)
    labels = {"name": "tiny", "device": "cpu", "dtype": "float32", "runtime": runtime}
    assert metric(server, "sentiment_model_info", **labels) == 1
    # The CUDA memory family exists on every service; only one on CUDA has samples.
    assert "sentiment_cuda_memory_bytes" in families
    assert not families["sentiment_cuda_memory_bytes"].samples
    buckets = [
        s.labels["le"]
        for s in families["sentiment_batch_size"].samples
        if s.name.endswith("_bucket")
    ]
    assert buckets[:4] == ["1.0", "2.0", "4.0", "8.0"]


def test_hugging_face_inference_client_gets_every_label(server: RunningServer):
    from huggingface_hub import InferenceClient

    text = "A wonderful, moving film."
    [ours] = httpx.post(f"{server.url}/predict", json={"inputs": text}).json()
    client = InferenceClient(model=f"{server.url}/predict")
    # The client reads [[{label, score}, ...]] and returns the inner list: both labels.
    theirs = client.text_classification(text)
    assert [(t.label, t.score) for t in theirs] == [
        (o["label"], pytest.approx(o["score"])) for o in ours
    ]
    [best] = client.text_classification(text, top_k=1)
    assert best.label == ours[0]["label"]
    logits = client.text_classification(text, function_to_apply="none")
    assert {t.label: t.score for t in logits}["POSITIVE"] == pytest.approx(
        -{t.label: t.score for t in logits}["NEGATIVE"]
    )
    # The client takes one text; a list goes over plain HTTP: one list of labels per text.
    many = httpx.post(f"{server.url}/predict", json={"inputs": [text, "Dull and clumsy."]})
    assert [len(labels) for labels in many.json()] == [2, 2]
    assert [(m["label"], m["score"]) for m in many.json()[0]] == [
        (o["label"], pytest.approx(o["score"], abs=1e-5)) for o in ours
    ]


def test_a_request_split_across_batches_is_reassembled_in_order(trained_bundle: Path):
    texts = [review(1000 + i) for i in range(30)]
    with serve(trained_bundle, max_batch_size=8) as server:
        answer = httpx.post(f"{server.url}/predict", json={"inputs": texts}).json()
        assert metric(server, "sentiment_batch_size_count") >= 4  # 30 texts, 8 per batch
    runtime = ModelRuntime.load(trained_bundle, "cpu")
    for text, got in zip(texts, answer, strict=True):
        [encoded] = runtime.preprocess([text])
        logit = float(runtime.infer([encoded.ids])[0])
        want = dict(runtime.postprocess(logit, encoded.original_tokens))
        assert {g["label"]: g["score"] for g in got} == {
            k: pytest.approx(v, abs=1e-5) for k, v in want.items()
        }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_service_on_cuda_answers_as_on_the_cpu(trained_bundle: Path):
    texts = ["A great, moving film.", "Dull and clumsy, a waste.", "fine " * 40]
    body = {"inputs": texts, "parameters": {"function_to_apply": "none"}, "truncate": True}
    answers = {}
    # float32 on CUDA: cuDNN's summation order, 3.3e-4 on a logit of 5.5 on an H100 (2026-11-24).
    runs = (("cpu", "float32", 0.0), ("cuda", "float32", 1e-3), ("cuda", "float16", 1e-2))
    for device, dtype, atol in runs:
        with serve(trained_bundle, device=device, dtype=dtype) as server:
            got = httpx.post(f"{server.url}/predict", json=body, timeout=30).json()
            answers[device, dtype] = [{g["label"]: g["score"] for g in one} for one in got]
            if device == "cuda":
                info = httpx.get(f"{server.url}/info").json()
                assert info["device"].startswith("cuda")
                assert info["dtype"] == dtype
                assert info["cuda_memory"]["allocated"] > 0
                assert metric(server, "sentiment_cuda_memory_bytes", kind="peak") > 0
        for ours, cpu in zip(answers[device, dtype], answers["cpu", "float32"], strict=True):
            assert ours == {k: pytest.approx(v, abs=atol) for k, v in cpu.items()}


def test_a_card_with_a_short_band_scores_short_texts_with_its_temperature(
    trained_bundle: Path, tmp_path: Path
):
    """If this fails, the service scores a sentence with the reviews' temperature (or a review
    with the sentences'): the calibration the card reports is not the one served."""
    import shutil

    folder = shutil.copytree(trained_bundle, tmp_path / "banded")
    card = bundle.read_card(folder)
    calibration = card.calibration.model_copy(
        update={"temperature": 3.0, "short_temperature": 0.5, "short_max_tokens": 6}
    )
    bundle.write_card(folder, card.model_copy(update={"calibration": calibration}))
    short, long = "A great film.", "The film was great and the plot was moving and superb."
    runtime = ModelRuntime.load(folder, "cpu")
    encoded = runtime.preprocess([short, long])
    assert [e.original_tokens for e in encoded] == [4, 12]
    logits = runtime.infer([e.ids for e in encoded])
    with serve(folder) as server:
        answer = httpx.post(f"{server.url}/predict", json={"inputs": [short, long]}).json()
    got = [next(g["score"] for g in one if g["label"] == "POSITIVE") for one in answer]
    want = [1 / (1 + np.exp(-logits[0] / 0.5)), 1 / (1 + np.exp(-logits[1] / 3.0))]
    assert got == [pytest.approx(float(w), abs=1e-6) for w in want]
