"""/explain over HTTP: a real uvicorn server, on the shipped model (the issue's example) and on
the tiny exported bundle (truncation, limits, errors, metrics)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest
from pydantic import TypeAdapter

from service import batcher
from service.scheduler import Policy
from service.schemas import ExplainResponse
from tests.service.conftest import RunningServer, serve
from tests.service.test_app import metric
from tests.service.test_int8 import INT8_BATCH_TOLERANCE

EXAMPLE = "The acting was wonderful but the plot was dull."
explanations = TypeAdapter(ExplainResponse)


def test_an_idle_server_starts_an_explanation_at_once(shipped: RunningServer):
    """If this fails, an explanation's own sentence scores count as /predict traffic again and
    every /explain on an idle server sits out the batcher's idle window (0.1 s) first."""
    for _ in range(2):  # the second: the first explanation's own scores were recent activity
        time.sleep(2 * batcher.PREDICTIONS_IDLE_S)  # whatever an earlier test sent is over
        response = httpx.post(f"{shipped.url}/explain", json={"inputs": EXAMPLE}, timeout=60)
        assert response.status_code == 200
        assert float(response.headers["x-queue-time"]) < 1e3 * batcher.PREDICTIONS_IDLE_S / 2


def test_the_shipped_model_explains_the_example(shipped: RunningServer):
    """If this fails, /explain no longer says what a reader sees in the example: praise for
    the acting, a complaint about the plot, and two clauses that disagree."""
    response = httpx.post(f"{shipped.url}/explain", json={"inputs": EXAMPLE}, timeout=60)
    assert response.status_code == 200
    (answer,) = explanations.validate_python(response.json())
    by_text = {t.text: t.attribution for t in answer.tokens}
    assert by_text["wonderful"] > 1
    assert by_text["dull"] < -1
    assert [EXAMPLE[t.start : t.end] for t in answer.tokens] == [t.text for t in answer.tokens]
    assert [(s.label, EXAMPLE[s.start : s.end]) for s in answer.sentences] == [
        ("POSITIVE", "The acting was wonderful"),
        ("NEGATIVE", "but the plot was dull."),
    ]
    assert answer.mixed
    assert answer.dropped_tokens is None
    completeness = answer.completeness
    difference = completeness.logit - completeness.baseline_logit
    assert abs(completeness.gap) <= 0.02 * abs(difference)
    # The label and score are /predict's (the shipped model serves int8 on a CPU, where a
    # score moves a little with the batch it runs in).
    predicted = httpx.post(f"{shipped.url}/predict", json={"inputs": EXAMPLE}).json()[0][0]
    assert (answer.label, answer.score) == (
        predicted["label"],
        pytest.approx(predicted["score"], abs=INT8_BATCH_TOLERANCE),
    )
    assert float(response.headers["x-inference-time"]) > 0


def test_a_truncated_text_is_explained_as_the_model_reads_it(server: RunningServer):
    text = " ".join(["great"] * 10 + ["dull"] * 30 + ["superb"] * 10)  # 50 tokens; 32 read
    refused = httpx.post(f"{server.url}/explain", json={"inputs": text})
    assert refused.status_code == 413
    assert refused.json()["error_type"] == "input_too_long"
    response = httpx.post(f"{server.url}/explain", json={"inputs": text, "truncate": True})
    assert response.status_code == 200
    (answer,) = explanations.validate_python(response.json())
    assert [t.text for t in answer.tokens] == ["great"] * 10 + ["dull"] * 2 + ["dull"] * 10 + [
        "superb"
    ] * 10  # the 32 tokens read: 12 from the start, 20 from the end
    dropped = answer.dropped_tokens
    assert dropped is not None
    assert (dropped.start, dropped.end) == (12, 30)  # tokens, as the tokenizer counts them
    # The characters between the last token read from the start and the first from the end.
    assert text[dropped.text_start : dropped.text_end] == " " + " ".join(["dull"] * 18) + " "
    assert (answer.tokens[11].end, answer.tokens[12].start) == (
        dropped.text_start,
        dropped.text_end,
    )


def test_a_list_is_explained_in_order_with_its_own_steps(server: RunningServer):
    texts = ["great superb film", "awful waste", "the plot"]
    response = httpx.post(
        f"{server.url}/explain", json={"inputs": texts, "parameters": {"steps": 8}}
    )
    assert response.status_code == 200
    answers = explanations.validate_python(response.json())
    assert [" ".join(t.text for t in a.tokens) for a in answers] == texts
    assert {a.steps for a in answers} == {8}
    assert int(response.headers["x-compute-tokens"]) == (3 + 2 + 2) * 8
    predicted = httpx.post(f"{server.url}/predict", json={"inputs": texts}).json()
    assert [a.label for a in answers] == [p[0]["label"] for p in predicted]


@pytest.mark.parametrize(
    ("body", "status", "error_type", "words"),
    [
        ({"inputs": " "}, 422, "validation", "inputs is empty"),
        ({"inputs": "good", "parameters": {"steps": 0}}, 422, "validation", "parameters.steps"),
        ({"inputs": "good", "parameters": {"steps": "8"}}, 422, "validation", "integer"),
        ({"inputs": "good", "parameters": {"top_k": 1}}, 422, "validation", "top_k"),
        ({"inputs": ["good"] * 9}, 413, "too_many_inputs", "the limit is 8"),
    ],
)
def test_bad_explain_requests_get_a_named_4xx(
    server: RunningServer, body: dict[str, object], status: int, error_type: str, words: str
):
    response = httpx.post(f"{server.url}/explain", json=body)
    assert response.status_code == status
    assert response.json()["error_type"] == error_type
    assert words in response.json()["error"]


def test_explanations_beyond_their_bound_get_429_while_predictions_go_on(trained_bundle: Path):
    """If this fails, a burst of explanations queues without bound, or takes /predict down."""
    with serve(trained_bundle, explain_max_queue=1, explain_steps=256) as server:

        async def burst() -> tuple[list[httpx.Response], list[httpx.Response]]:
            async with server.async_client() as client:
                explained = [
                    client.post("/explain", json={"inputs": "great " * 30}) for _ in range(6)
                ]
                predicted = [client.post("/predict", json={"inputs": "dull"}) for _ in range(20)]
                answers = await asyncio.gather(*explained, *predicted)
                return answers[:6], answers[6:]

        explained, predicted = asyncio.run(burst())
        assert sorted({a.status_code for a in explained}) == [200, 429]
        refused = next(a for a in explained if a.status_code == 429)
        assert refused.headers["retry-after"] == "1"
        assert "explanations busy" in refused.json()["error"]
        assert {a.status_code for a in predicted} == {200}
        assert metric(server, "sentiment_failures_total", route="/explain", reason="overloaded")
        assert metric(server, "sentiment_requests_total", route="/explain", status="200") >= 1
        assert metric(server, "sentiment_explain_inference_duration_seconds_count") >= 1
        assert metric(server, "sentiment_explain_queue_depth") == 0


def test_an_explanation_past_its_deadline_answers_504(trained_bundle: Path):
    with serve(trained_bundle, explain_timeout_s=0.001) as server:
        response = httpx.post(f"{server.url}/explain", json={"inputs": "great film"})
        assert response.status_code == 504
        assert response.json()["error_type"] == "timeout"
        assert metric(server, "sentiment_failures_total", route="/explain", reason="timeout") == 1


def test_info_reports_the_explanation_settings_and_share(trained_bundle: Path):
    with serve(trained_bundle, Policy(explain_share=0.5), explain_steps=16) as server:
        info = httpx.get(f"{server.url}/info").json()
        assert info["explanations"] == {
            "explain_steps": 16,
            "explain_max_queue": 8,
            "explain_timeout_s": 60.0,
        }
        assert info["scheduler"]["explain_share"] == 0.5
