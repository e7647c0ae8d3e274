"""Live model reload: SIGHUP to a real `python -m service` under load, and POST /admin/reload.

The second bundle is the first with its output layer negated (every score flips) and another
version in its card, so each answer shows which model scored it."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from pathlib import Path

import httpx
import pytest
import torch

from service.runtime import ModelRuntime
from tests.service.conftest import corrupt_model_file, serve, service_process
from tests.service.test_app import metric_at

TEXTS = ["a great and moving film", "dull, a waste of time"]


def flipped_copy(bundle: Path, folder: Path, version: str) -> Path:
    """``bundle`` with its head negated (the opposite scores) and ``version`` in its card, without
    the ONNX graph of the old weights (which the service would refuse as stale)."""
    shutil.copytree(bundle, folder)
    (folder / "model.onnx").unlink()
    model = torch.jit.load(str(folder / "model.pt"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.startswith("head."):
                parameter.neg_()
    torch.jit.save(model, str(folder / "model.pt"))
    card = json.loads((folder / "card.json").read_text())
    card["version"] = version
    card.pop("onnx")
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def swap_in(source: Path, served: Path) -> None:
    """Put ``source`` where the service reads its bundle (what a deploy step does)."""
    shutil.rmtree(served)
    shutil.copytree(source, served)


def expected_scores(bundle: Path) -> list[float]:
    runtime = ModelRuntime.load(bundle, "cpu")
    encoded = runtime.preprocess(TEXTS)
    logits = runtime.infer([e.ids for e in encoded])
    return [
        dict(runtime.postprocess(float(z), e.original_tokens))["POSITIVE"]
        for z, e in zip(logits, encoded, strict=True)
    ]


def test_sighup_under_load_swaps_models_without_losing_or_mixing_answers(
    trained_bundle: Path, tmp_path: Path
):
    """If this fails, a rollout drops requests, or answers one with two models' scores."""
    served = tmp_path / "models" / "tiny"
    shutil.copytree(trained_bundle, served)
    old_version = json.loads((served / "card.json").read_text())["version"]
    new = flipped_copy(trained_bundle, tmp_path / "v2", "2.0.0-test")
    expected = {old_version: expected_scores(served), "2.0.0-test": expected_scores(new)}
    assert expected[old_version][0] > 0.5 > expected["2.0.0-test"][0]

    with service_process(served) as (process, url):
        reloaded_at = float("inf")

        async def load(stop: asyncio.Event) -> list[tuple[float, httpx.Response]]:
            answers: list[tuple[float, httpx.Response]] = []
            limits = httpx.Limits(max_connections=64)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

                async def caller() -> None:
                    while not stop.is_set():
                        sent = time.monotonic()
                        answer = await client.post("/predict", json={"inputs": TEXTS})
                        answers.append((sent, answer))

                await asyncio.gather(*(caller() for _ in range(32)))
            return answers

        async def scenario() -> list[tuple[float, httpx.Response]]:
            nonlocal reloaded_at
            stop = asyncio.Event()
            running = asyncio.create_task(load(stop))
            await asyncio.sleep(1.0)
            swap_in(new, served)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 60
            while metric_at(url, "sentiment_model_reloads_total", result="succeeded") < 1:
                assert time.monotonic() < deadline, "the reload never finished"
                await asyncio.sleep(0.1)
            reloaded_at = time.monotonic()
            await asyncio.sleep(1.0)
            stop.set()
            return await running

        sent = asyncio.run(scenario())
        assert {a.status_code for _, a in sent} == {200}
        assert {a.headers["x-model-version"] for _, a in sent} == {old_version, "2.0.0-test"}
        for _, answer in sent:
            version = answer.headers["x-model-version"]
            scores = [dict((s["label"], s["score"]) for s in t)["POSITIVE"] for t in answer.json()]
            assert scores == pytest.approx(expected[version], abs=1e-5), version
        after = [a.headers["x-model-version"] for at, a in sent if at > reloaded_at]
        assert after
        assert set(after) == {"2.0.0-test"}
        info = httpx.get(f"{url}/info").json()
        assert info["model"]["version"] == "2.0.0-test"
        assert metric_at(url, "sentiment_model_info", version="2.0.0-test") == 1
        assert metric_at(url, "sentiment_model_info", version=old_version) == 0

        # A broken bundle is refused; the model that serves goes on serving.
        corrupt_model_file(served)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while metric_at(url, "sentiment_model_reloads_total", result="failed") < 1:
            assert time.monotonic() < deadline, "the failed reload was not counted"
            time.sleep(0.1)
        answer = httpx.post(f"{url}/predict", json={"inputs": TEXTS})
        assert answer.status_code == 200
        assert answer.headers["x-model-version"] == "2.0.0-test"
        assert process.poll() is None


def test_admin_reload_is_off_by_default_and_behind_an_admin_key(
    trained_bundle: Path, tmp_path: Path
):
    """If this fails, any client key may reload the model (or none may)."""
    served = tmp_path / "models" / "tiny"
    shutil.copytree(trained_bundle, served)
    with serve(served) as server:
        assert httpx.post(f"{server.url}/admin/reload").status_code == 404
    with serve(served, admin_reload=True, api_keys=["k"], admin_api_keys=["a"]) as server:
        assert httpx.post(f"{server.url}/admin/reload").status_code == 401
        key, admin = {"Authorization": "Bearer k"}, {"Authorization": "Bearer a"}
        refused = httpx.post(f"{server.url}/admin/reload", headers=key)
        assert refused.status_code == 403
        assert refused.json()["error_type"] == "forbidden"
        swap_in(flipped_copy(trained_bundle, tmp_path / "v2", "2.0.0-test"), served)
        answer = httpx.post(f"{server.url}/admin/reload", headers=admin, timeout=60)
        assert answer.status_code == 200
        assert answer.json()["version"] == "2.0.0-test"
        predicted = httpx.post(f"{server.url}/predict", headers=key, json={"inputs": "great"})
        assert predicted.headers["x-model-version"] == "2.0.0-test"
        corrupt_model_file(served)
        refused = httpx.post(f"{server.url}/admin/reload", headers=admin, timeout=60)
        assert refused.status_code == 409
        assert refused.json()["error_type"] == "reload_failed"
        assert "previous model keeps serving" in refused.json()["error"]
        again = httpx.post(f"{server.url}/predict", headers=key, json={"inputs": "great"})
        assert again.status_code == 200


def test_admin_reload_without_admin_keys_is_a_configuration_error(trained_bundle: Path):
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="only behind admin keys"):
        Settings(admin_reload=True)
    with pytest.raises(ValidationError, match="only behind admin keys"):
        Settings(admin_reload=True, api_keys="k")  # client keys are not admin keys
    with pytest.raises(ValidationError, match="only behind admin keys"):
        Settings(admin_reload=True, admin_api_keys="a", auth_exempt_paths="/admin/reload")
