"""The bundle's model.onnx: written by the export from the same weights, added to an older bundle
by `migrate`, loaded through the contract only where it belongs, scored by `evaluate`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service import bundle
from service.bundle import BundleError
from training.cli import main
from training.migrate import migrate


def _mixed_batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Padded ids of lengths 1 to 40 (past the tiny model's truncation of 32), and 0."""
    rng = np.random.default_rng(3)
    seqs = [rng.integers(2, vocab, size=n) for n in (1, 5, 17, 32, 40)] + [np.array([], np.int64)]
    ids, lengths = bundle.pad(seqs)
    return ids.numpy(), lengths.numpy()


def test_onnx_runtime_gives_the_torchscript_logits_on_mixed_lengths(trained_bundle: Path):
    """If this fails, a batch served by ONNX Runtime answers other scores than TorchScript would
    (padding or lengths read differently, e.g. an empty text or one past the trace's length)."""
    loaded = bundle.load(trained_bundle, "cpu", "float32", "onnx")
    assert loaded.onnx is not None
    ids, lengths = _mixed_batch(loaded.card.architecture.vocab_size)
    with torch.no_grad():
        want = loaded.model(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    for threads in (1, 2):
        np.testing.assert_allclose(loaded.onnx(ids, lengths, threads), want, rtol=0, atol=1e-4)
    # One row alone, padded only to itself: the batch does not change a row's answer.
    np.testing.assert_allclose(
        loaded.onnx(ids[2:3, :17], lengths[2:3], 1), want[2:3], rtol=0, atol=1e-4
    )


def _without_onnx(folder: Path) -> None:
    (folder / bundle.ONNX_FILE).unlink()
    card = bundle.read_card(folder)
    bundle.write_card(folder, card.model_copy(update={"onnx": None}))


def test_a_bundle_without_onnx_serves_on_torchscript_and_onnx_names_the_fix(
    trained_bundle: Path, tmp_path: Path
):
    folder = shutil.copytree(trained_bundle, tmp_path / "plain")
    _without_onnx(folder)
    assert bundle.load(folder, "cpu", "float32", "auto").onnx is None
    with pytest.raises(BundleError, match="python -m training migrate"):
        bundle.load(folder, "cpu", "float32", "onnx")


def test_an_onnx_file_made_from_another_model_pt_is_refused(trained_bundle: Path, tmp_path: Path):
    """If this fails, a retrained model.pt could be served beside the old network's graph."""
    folder = shutil.copytree(trained_bundle, tmp_path / "stale")
    card = bundle.read_card(folder)
    assert card.onnx is not None
    stale = card.onnx.model_copy(update={"source_sha256": "0" * 64})
    bundle.write_card(folder, card.model_copy(update={"onnx": stale}))
    for runtime in ("onnx", "auto"):
        with pytest.raises(BundleError, match=r"another model\.pt"):
            bundle.load(folder, "cpu", "float32", runtime)  # type: ignore[arg-type]
    (folder / bundle.ONNX_FILE).write_bytes(b"not a graph")
    bundle.write_card(folder, card)
    with pytest.raises(BundleError, match="not a loadable ONNX model"):
        bundle.load(folder, "cpu", "float32", "onnx")


def test_migrate_adds_model_onnx_and_leaves_model_pt_and_int8_as_they_are(
    quantized_bundle: Path, tmp_path: Path
):
    """If this fails, the shipped bundle could not gain model.onnx without a new model.pt (and
    so without losing its int8 variant)."""
    folder = shutil.copytree(quantized_bundle, tmp_path / "older")
    _without_onnx(folder)
    before = {name: bundle.sha256(folder / name) for name in ("model.pt", "model.int8.pt")}
    lines: list[str] = []
    migrate(folder, log=lines.append)
    assert "gains model.onnx" in lines[-1]
    assert {name: bundle.sha256(folder / name) for name in before} == before
    loaded = bundle.load(folder, "cpu", "int8", "onnx")
    assert loaded.card.int8 is not None
    assert loaded.card.onnx is not None
    assert loaded.card.onnx.max_abs_diff <= 1e-4
    migrate(folder, log=lines.append)
    assert "every file" in lines[-1]


def test_evaluate_with_onnx_runtime_reproduces_the_card(
    trained_bundle: Path, imdb_tarball: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    args = ["evaluate", str(trained_bundle), "--data", str(imdb_tarball)]
    args += ["--cache-dir", str(tmp_path), "--device", "cpu", "--runtime", "onnx"]
    assert main([*args, "--tolerance", "0.0005"]) == 0
    assert ": reproduced" in capsys.readouterr().out
    assert main([*args, "--dtype", "int8"]) != 0  # the graph is the float32 network
