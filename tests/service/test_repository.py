"""A model repository: every bundle ``models`` names served at once beside the default one,
each under its card's name through the Open Inference Protocol, reloaded on its own, in one
batcher whose batches never mix models. Real uvicorn, real bundles (the tiny one and a copy
that answers the opposite)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import RunningServer, serve
from tests.service.test_reload import TEXTS, expected_scores, flipped_copy

ADMIN = {"authorization": "Bearer admin-key"}


def renamed(folder: Path, name: str) -> Path:
    card = json.loads((folder / "card.json").read_text())
    card["name"] = name
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def repository(trained_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("repository")
    shutil.copytree(trained_bundle, models / "tiny")
    renamed(flipped_copy(trained_bundle, models / "tiny-b", "9.0.0"), "tiny-b")
    return models


@pytest.fixture(scope="module")
def served(repository: Path) -> Iterator[RunningServer]:
    with serve(
        repository / "tiny",
        models=["*"],
        admin_reload=True,
        admin_api_keys="admin-key",
        max_batch_size=8,
    ) as running:
        yield running


def infer(url: str, model: str, texts: list[str]) -> list[float]:
    body = {"inputs": [{"name": "TEXT", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    answer = httpx.post(f"{url}/v2/models/{model}/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    probabilities = answer.json()["outputs"][0]["data"]
    return probabilities[1::2]  # POSITIVE of each text


def test_every_bundle_is_served_under_its_name(served: RunningServer, repository: Path):
    """If this fails, a second model needs a second deployment (as before: one per process),
    or a request reaches the wrong model."""
    listed = httpx.get(f"{served.url}/v2/models").json()["models"]
    assert [(m["name"], m["versions"]) for m in listed] == [
        ("tiny", ["1.0.0"]),
        ("tiny-b", ["9.0.0"]),
    ]
    index = httpx.post(f"{served.url}/v2/repository/index").json()
    assert {(m["name"], m["state"]) for m in index} == {("tiny", "READY"), ("tiny-b", "READY")}
    for name in ("tiny", "tiny-b"):
        assert infer(served.url, name, TEXTS) == pytest.approx(
            expected_scores(repository / name), abs=1e-5
        )
    default = httpx.post(f"{served.url}/predict", json={"inputs": TEXTS}).json()
    scores = [{s["label"]: s["score"] for s in t}["POSITIVE"] for t in default]
    assert scores == pytest.approx(expected_scores(repository / "tiny"), abs=1e-5)
    answer = httpx.get(f"{served.url}/v2/models/tiny-b/versions/1.0.0")
    assert answer.status_code == 404
    assert "these are: tiny 1.0.0, tiny-b 9.0.0" in answer.json()["error"]


def test_batches_never_mix_models(served: RunningServer, repository: Path):
    """If this fails, texts of two models ran in one batch through one model's weights."""

    async def both() -> list[list[float]]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(model: str) -> list[float]:
                body = {
                    "inputs": [
                        {"name": "TEXT", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}
                    ]
                }
                answer = await client.post(f"{served.url}/v2/models/{model}/infer", json=body)
                return answer.json()["outputs"][0]["data"][1::2]

            return await asyncio.gather(*(one(m) for _ in range(20) for m in ("tiny", "tiny-b")))

    answers = asyncio.run(both())
    for model, answer in zip(["tiny", "tiny-b"] * 20, answers, strict=True):
        assert answer == pytest.approx(expected_scores(repository / model), abs=1e-5), model


def test_each_model_reloads_on_its_own(served: RunningServer, repository: Path, tmp_path: Path):
    renamed(flipped_copy(repository / "tiny", tmp_path / "next", "9.1.0"), "tiny-b")
    shutil.rmtree(repository / "tiny-b")
    shutil.copytree(tmp_path / "next", repository / "tiny-b")
    answer = httpx.post(f"{served.url}/admin/reload?model=tiny-b", headers=ADMIN, timeout=60)
    assert answer.status_code == 200, answer.text
    assert (answer.json()["previous_version"], answer.json()["version"]) == ("9.0.0", "9.1.0")
    listed = httpx.get(f"{served.url}/v2/models").json()["models"]
    assert [m["versions"] for m in listed] == [["1.0.0"], ["9.1.0"]]  # tiny untouched
    unknown = httpx.post(f"{served.url}/admin/reload?model=nope", headers=ADMIN)
    assert unknown.status_code == 404
    assert "these are: ['tiny', 'tiny-b']" in unknown.json()["error"]


def test_two_bundles_of_one_name_stop_the_service_with_one_line(repository: Path, tmp_path: Path):
    """If this fails, a second bundle whose card repeats a served name would shadow it (the
    name is its address) or stop the service with a traceback after loading."""
    models = tmp_path / "models"
    shutil.copytree(repository / "tiny", models / "tiny")
    shutil.copytree(repository / "tiny", models / "tiny-copy")
    env = {"SENTIMENT_MODEL_DIR": str(models), "SENTIMENT_MODEL_NAME": "tiny"}
    result = subprocess.run(
        [sys.executable, "-m", "service", "--models", "*", "--port", "0", "--grpc-port", "-1"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot serve: ")
    assert "are all named 'tiny'" in last
