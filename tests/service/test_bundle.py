"""The bundle contract on its own: the truncation rule, device names, padding, the card, and
``save``/``load`` on the tiny bundle the training CLI exports. If these fail, training and
serving no longer agree on what a bundle is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from service import bundle
from service.bundle import BundleError, Truncation

IDS = np.arange(10)


@pytest.mark.parametrize(
    ("head", "kept"),
    [
        (4, [0, 1, 2, 3]),  # head only: the first max_length tokens
        (0, [6, 7, 8, 9]),  # tail only
        (1, [0, 7, 8, 9]),
        (3, [0, 1, 2, 9]),
    ],
)
def test_a_longer_sequence_keeps_its_head_and_tail(head: int, kept: list[int]):
    cut = Truncation.keep(4, head)
    assert cut.apply(IDS).tolist() == kept
    assert cut.head + cut.tail == 4


def test_sequences_that_fit_are_unchanged():
    cut = Truncation.keep(10, 2)
    assert cut.apply(IDS) is IDS
    assert cut.apply(IDS[:0]).tolist() == []


def test_a_rule_that_does_not_add_up_is_refused():
    assert Truncation.keep(400, 128).model_dump() == {"max_length": 400, "head": 128, "tail": 272}
    with pytest.raises(ValueError, match=r"head 5 \+ tail 0 != max_length 4"):
        Truncation(max_length=4, head=5, tail=0)
    for max_length, head in ((0, 0), (4, -1)):
        with pytest.raises(ValueError, match="greater than or equal"):
            Truncation.keep(max_length, head)


def test_pad_right_pads_with_the_pad_id_and_keeps_lengths():
    ids, lengths = bundle.pad([np.array([5, 6, 7]), np.array([9]), np.array([], np.int64)])
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[5, 6, 7], [9, 0, 0], [0, 0, 0]]
    assert lengths.tolist() == [3, 1, 0]
    assert bundle.pad([np.array([], np.int64)])[0].shape == (1, 1)  # never zero-width


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gpu", "unknown device 'gpu'"),
        ("meta", "unsupported device 'meta'"),
        ("cuda:7", "cuda:7"),
    ],
)
def test_device_names_are_checked(name: str, message: str):
    if name == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has eight CUDA devices")
    with pytest.raises(ValueError, match=message):
        bundle.resolve_device(name)
    assert bundle.resolve_device("cpu") == torch.device("cpu")
    assert bundle.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_load_gives_the_card_as_a_validated_model(trained_bundle: Path):
    loaded = bundle.load(trained_bundle, "cpu")
    assert loaded.card.format_version == bundle.FORMAT_VERSION
    assert loaded.card.truncation == Truncation.keep(32, 12)
    assert loaded.card.labels == bundle.LABELS
    assert loaded.card.calibration.temperature > 0
    assert set(loaded.card.export.max_abs_diff) == {*bundle.ENTRY_POINTS, bundle.FORKED_ENTRY_POINT}
    assert all(d <= 1e-5 for d in loaded.card.export.max_abs_diff.values())
    summary = loaded.card.summary().model_dump()
    assert "command" not in summary
    assert "hyperparameters" not in summary
    assert summary["metrics"]["test"]["n"] == loaded.card.metrics["test"].n


def test_every_entry_point_of_the_exported_file_agrees(trained_bundle: Path):
    model = bundle.load(trained_bundle, "cpu").model
    ids, lengths = bundle.pad([np.array([5, 6, 7, 8]), np.array([9, 10])])
    with torch.no_grad():
        embedded = model.embed(ids)
        assert embedded.shape == (2, 4, 8)  # the tiny bundle's 8d vectors
        torch.testing.assert_close(
            model.forward_embedded(embedded, lengths), model(ids, lengths), rtol=0, atol=0
        )
    # Gradients reach the embeddings: what explanations need.
    embedded = model.embed(ids).detach().requires_grad_(True)
    model.forward_embedded(embedded, lengths).sum().backward()
    assert embedded.grad is not None
    assert embedded.grad.abs().sum() > 0


def _copy(trained_bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(trained_bundle, target)
    return target


def _edit_card(folder: Path, **changes: object) -> None:
    card = json.loads((folder / bundle.CARD_FILE).read_text())
    card.update(changes)
    (folder / bundle.CARD_FILE).write_text(json.dumps(card))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format_version": 2}, "python -m training migrate"),
        ({"format_version": 99}, "format_version 99; this reads 3"),
        ({"labels": ["BAD", "GOOD"]}, "are not"),
        ({"truncation": {"max_length": 32, "head": 12, "tail": 5}}, "!= max_length 32"),
        ({"calibration": {"method": "x", "temperature": 0}}, "calibration.temperature"),
        ({"name": ""}, "name"),
        ({"surprise": 1}, "surprise: Extra inputs are not permitted"),
    ],
    ids=["format-2", "unknown-format", "labels", "truncation", "temperature", "name", "extra"],
)
def test_an_invalid_card_is_refused_with_its_problem_named(
    trained_bundle: Path, tmp_path: Path, changes: dict[str, object], message: str
):
    folder = _copy(trained_bundle, tmp_path)
    _edit_card(folder, **changes)
    with pytest.raises(BundleError, match=message):
        bundle.load(folder, "cpu")


class ForwardOnly(torch.nn.Module):
    """A TorchScript file with ``forward`` alone, as format 2 wrote them."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(rows, dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).sum(dim=(1, 2))


def test_a_model_without_the_format_3_entry_points_is_refused(trained_bundle: Path, tmp_path: Path):
    folder = _copy(trained_bundle, tmp_path)
    architecture = bundle.read_card(folder).architecture
    torch.jit.script(ForwardOnly(architecture.vocab_size, architecture.embed_dim)).save(
        str(folder / bundle.MODEL_FILE)
    )
    with pytest.raises(BundleError, match="lacks the entry points embed, forward_embedded"):
        bundle.load(folder, "cpu")


def test_save_writes_only_a_bundle_that_loads(trained_bundle: Path, tmp_path: Path):
    loaded = bundle.load(trained_bundle, "cpu")
    target = tmp_path / "saved"
    assert bundle.save(target, loaded.model, loaded.tokenizer, loaded.card) == target
    assert sorted(p.name for p in target.iterdir()) == sorted(bundle.FILES)
    assert bundle.read_card(target) == loaded.card
    # A card that disagrees with the model is not moved into place, and the old bundle stays.
    wrong = loaded.card.model_copy(
        update={"architecture": loaded.card.architecture.model_copy(update={"vocab_size": 3})}
    )
    with pytest.raises(BundleError, match="embedding table"):
        bundle.save(target, loaded.model, loaded.tokenizer, wrong)
    assert bundle.read_card(target) == loaded.card
