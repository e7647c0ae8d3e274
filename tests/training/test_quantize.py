"""`python -m training quantize`: the int8 CPU variant is made from model.pt, scored on the test
reviews, written through the bundle contract only when it keeps its accuracy, and refused when
the model.pt beside it is not the one it was made from. If these fail, the model a CPU service
serves by default is unverified or stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service import bundle
from service.bundle import BundleError
from training.cli import main


def evaluate_args(folder: Path, imdb_tarball: Path, cache: Path) -> list[str]:
    return ["evaluate", str(folder), "--data", str(imdb_tarball), "--cache-dir", str(cache)]


def test_the_variant_is_quantised_scored_and_reproduced_by_evaluate(
    quantized_bundle: Path, imdb_tarball: Path, tmp_path: Path
):
    card = bundle.read_card(quantized_bundle)
    assert card.int8 is not None
    assert card.int8.source_sha256 == bundle.sha256(quantized_bundle / bundle.MODEL_FILE)
    assert card.int8.metrics["test"].n == card.metrics["test"].n
    int8 = bundle.load(quantized_bundle, "cpu", "int8")
    graph = str(int8.model.inlined_graph)
    assert "quantized_gru" in graph
    assert "quantized::linear_dynamic" in graph
    assert int8.differentiable is not int8.model  # gradients come from model.pt
    assert int8.metrics == card.int8.metrics

    # Its own card figures, reproduced from the files alone; float32's still are float32's.
    args = evaluate_args(quantized_bundle, imdb_tarball, tmp_path)
    assert main([*args, "--device", "cpu", "--dtype", "int8", "--tolerance", "0"]) == 0
    assert main([*args, "--device", "cpu", "--tolerance", "0"]) == 0


def test_int8_logits_stay_close_to_float32(quantized_bundle: Path):
    float32 = bundle.load(quantized_bundle, "cpu", "float32")
    int8 = bundle.load(quantized_bundle, "cpu", "int8")
    rng = np.random.default_rng(0)
    vocab = float32.tokenizer.get_vocab_size()
    ids, lengths = bundle.pad([rng.integers(2, vocab, size=n) for n in (1, 5, 30, 60)])
    with torch.no_grad():
        a, b = float32.model(ids, lengths), int8.model(ids, lengths)
    assert not torch.equal(a, b)  # really another model
    assert float((a - b).abs().max()) <= 0.05 * float(a.abs().max()) + 1e-3


def test_auto_is_int8_on_a_cpu_where_there_is_a_variant_else_float32(
    quantized_bundle: Path, trained_bundle: Path
):
    assert bundle.load(quantized_bundle, "cpu", "auto").precision == "int8"
    assert bundle.load(trained_bundle, "cpu", "auto").precision == "float32"
    with pytest.raises(BundleError, match=r"has no int8 variant.*training quantize"):
        bundle.load(trained_bundle, "cpu", "int8")


def test_int8_is_refused_on_cuda_before_anything_is_loaded(quantized_bundle: Path):
    with pytest.raises(BundleError, match="int8 is a CPU-only variant"):
        bundle.load(quantized_bundle, torch.device("cuda"), "int8")


def test_a_variant_made_from_another_model_pt_is_refused(quantized_bundle: Path, tmp_path: Path):
    folder = shutil.copytree(quantized_bundle, tmp_path / "retrained")
    # Saved again, the same weights make another file: as a retrained model.pt would.
    torch.jit.load(str(folder / bundle.MODEL_FILE)).save(str(folder / bundle.MODEL_FILE))
    for precision in ("int8", "auto"):
        with pytest.raises(BundleError, match=r"made from another model\.pt.*training quantize"):
            bundle.load(folder, "cpu", precision)  # type: ignore[arg-type]
    assert bundle.load(folder, "cpu", "float32").precision == "float32"


def test_a_variant_that_loses_accuracy_is_not_written(
    trained_bundle: Path, imdb_tarball: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    folder = shutil.copytree(trained_bundle, tmp_path / "tiny")
    card_before = (folder / bundle.CARD_FILE).read_text()
    # A negative bound asks the variant to gain accuracy: it cannot, so nothing is written.
    args = ["quantize", str(folder), "--data", str(imdb_tarball), "--cache-dir", str(tmp_path)]
    assert main([*args, "--max-drop", "-0.5"]) == 1
    assert "nothing written" in capsys.readouterr().err
    assert not (folder / bundle.INT8_FILE).exists()
    assert (folder / bundle.CARD_FILE).read_text() == card_before
    assert json.loads(card_before).get("int8") is None
