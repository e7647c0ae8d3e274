"""Parity with Hugging Face's text-embeddings-inference (TEI) for a classifier: POST / as the
predict route (so ``InferenceClient(model=URL)`` works without /predict), ``raw_scores`` and
``truncation_direction`` with TEI's meaning, and /tokenize; against the shipped model served by
a real uvicorn."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import InferenceClient

from tests.service.conftest import SHIPPED, RunningServer, serve

REVIEW = "The acting was wonderful but the plot was dull."


@pytest.fixture(scope="module")
def shipped() -> Iterator[RunningServer]:
    with serve(SHIPPED, max_batch_size=8) as running:
        yield running


def scores(answer: httpx.Response) -> dict[str, float]:
    assert answer.status_code == 200, answer.text
    (labels,) = answer.json()
    return {entry["label"]: entry["score"] for entry in labels}


def test_the_hugging_face_client_calls_the_server_url_itself(shipped: RunningServer):
    """If this fails, ``InferenceClient(model=URL)`` without /predict gets 405 (TEI answers a
    classifier's predictions at /)."""
    [best, *_] = InferenceClient(model=shipped.url).text_classification(REVIEW)
    expected = scores(httpx.post(f"{shipped.url}/predict", json={"inputs": REVIEW}))
    assert best.score == pytest.approx(expected[best.label], abs=1e-6)
    assert best.label == max(expected, key=expected.__getitem__)


def test_raw_scores_are_the_log_odds(shipped: RunningServer):
    raw = scores(httpx.post(f"{shipped.url}/predict", json={"inputs": REVIEW, "raw_scores": True}))
    none = {"inputs": REVIEW, "parameters": {"function_to_apply": "none"}}
    assert raw == scores(httpx.post(f"{shipped.url}/predict", json=none))
    assert raw["POSITIVE"] == pytest.approx(-raw["NEGATIVE"])
    both = {"inputs": REVIEW, "raw_scores": True, "parameters": {"function_to_apply": "sigmoid"}}
    answer = httpx.post(f"{shipped.url}/predict", json=both)
    assert answer.status_code == 422
    assert "send one of them" in answer.json()["error"]


def test_truncation_direction_keeps_the_start_or_the_end(shipped: RunningServer):
    """If this fails, TEI's truncation_direction is refused (422) or ignored: a review that
    starts warm and ends cold must read POSITIVE cut on the right and NEGATIVE cut on the left."""
    longest = httpx.get(f"{shipped.url}/info").json()["model"]["truncation"]["max_length"]
    warm, cold = "A wonderful, moving film. " * longest, "Dull, boring and awful. " * longest
    text = warm + cold
    read = {}
    for direction in ("Right", "Left"):
        body = {"inputs": text, "truncate": True, "truncation_direction": direction}
        read[direction] = scores(httpx.post(f"{shipped.url}/predict", json=body, timeout=60))
    assert read["Right"]["POSITIVE"] > 0.9
    assert read["Left"]["NEGATIVE"] > 0.9
    wrong = {"inputs": text, "truncate": True, "truncation_direction": "Middle"}
    assert httpx.post(f"{shipped.url}/predict", json=wrong).status_code == 422


def test_tokenize_gives_the_tokens_the_model_reads(shipped: RunningServer):
    answer = httpx.post(f"{shipped.url}/tokenize", json={"inputs": [REVIEW, "Ünïcödé 😀 ok"]})
    assert answer.status_code == 200, answer.text
    first, second = answer.json()
    explained = httpx.post(f"{shipped.url}/explain", json={"inputs": REVIEW}, timeout=60).json()
    assert [(t["text"], t["start"], t["stop"]) for t in first] == [
        (t["text"], t["start"], t["end"]) for t in explained[0]["tokens"]
    ]
    text = "Ünïcödé 😀 ok"
    assert all(text[t["start"] : t["stop"]] == t["text"] for t in second)
    assert all(isinstance(t["id"], int) and t["special"] is False for t in first + second)
    assert httpx.post(f"{shipped.url}/tokenize", json={"inputs": []}).status_code == 422


def test_post_root_takes_the_api_key_as_predict_does(trained_bundle: Path):
    """If this fails, POST / (TEI's predict route) scores texts without a key where /predict
    needs one: the page's GET / is exempt, its POST must not be."""
    with serve(trained_bundle, api_keys="k-one") as running:
        assert httpx.get(f"{running.url}/").status_code == 200
        assert httpx.post(f"{running.url}/", json={"inputs": "a fine film"}).status_code == 401
        keyed = {"authorization": "Bearer k-one"}
        answer = httpx.post(f"{running.url}/", json={"inputs": "a fine film"}, headers=keyed)
        assert answer.status_code == 200
        tokens = httpx.post(f"{running.url}/tokenize", json={"inputs": "a film"}, headers=keyed)
        assert tokens.status_code == 200
        assert httpx.post(f"{running.url}/tokenize", json={"inputs": "a film"}).status_code == 401
