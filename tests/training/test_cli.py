"""The training CLI end to end on the tiny dataset: prepare, train, export, evaluate, errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from service import bundle
from service.bundle import BundleError
from tests.conftest import TINY_MODEL, TINY_TRAIN, prepare_args
from training.cli import main
from training.config import ModelConfig, PrepareConfig, TrainConfig
from training.migrate import migrate
from training.model import SentimentRNN
from training.prepare import load_prepared, prepared_dir


def test_help_documents_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "training", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for config in (PrepareConfig, ModelConfig, TrainConfig):
        for f in dataclasses.fields(config):
            assert "--" + f.name.replace("_", "-") in result.stdout
    for command in ("prepare", "evaluate"):
        out = subprocess.run(
            [sys.executable, "-m", "training", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "--data" in out


def test_bundle_has_the_four_files_and_a_complete_card(trained_bundle: Path):
    assert sorted(p.name for p in trained_bundle.iterdir()) == [
        "card.json",
        "model.onnx",
        "model.pt",
        "tokenizer.json",
    ]
    card = json.loads((trained_bundle / "card.json").read_text())
    for key in (
        "name",
        "version",
        "architecture",
        "hyperparameters",
        "data",
        "vectors",
        "metrics",
        "truncation",
        "labels",
        "parameters",
        "command",
        "calibration",
    ):
        assert key in card, key
    assert card["labels"] == ["NEGATIVE", "POSITIVE"]
    assert card["export"]["torch_version"] == torch.__version__
    assert card["architecture"]["cell"] == "gru"
    assert card["architecture"]["embed_dim"] == 8
    assert card["vectors"]["words_with_vectors"] > 0
    assert set(card["metrics"]) == {"validation", "validation_short", "test"}
    assert card["command"].startswith("python -m training train ")
    epochs = [row for row in card["training"]["history"] if "epoch" in row]
    assert len(epochs) == card["hyperparameters"]["epochs"] == 8
    # --average-top 2: the average of the two best epochs was scored on validation too.
    assert len(card["training"]["history"][-1]["average_of"]) == 2
    entry_points = {"forward", "embed", "forward_embedded", "forward_forked"}
    assert set(card["export"]["max_abs_diff"]) == entry_points
    assert max(card["export"]["max_abs_diff"].values()) <= 1e-5
    assert card["onnx"]["max_abs_diff"] <= 1e-4
    assert card["onnx"]["source_sha256"] == bundle.sha256(trained_bundle / "model.pt")


def test_exported_files_reload_and_score_raw_text(trained_bundle: Path):
    model = torch.jit.load(str(trained_bundle / "model.pt"))
    tokenizer = Tokenizer.from_file(str(trained_bundle / "tokenizer.json"))
    card = json.loads((trained_bundle / "card.json").read_text())
    # The card holds the only truncation rule: the tokenizer returns every token.
    assert tokenizer.truncation is None
    assert card["truncation"] == {"max_length": 32, "head": 12, "tail": 20}
    texts = ["A great, moving film " * 20, "A dull waste.", ""]
    head, tail = card["truncation"]["head"], card["truncation"]["tail"]
    kept = [
        e.ids if len(e.ids) <= 32 else e.ids[:head] + e.ids[-tail:]
        for e in tokenizer.encode_batch(texts)
    ]
    assert len(kept[0]) == card["truncation"]["max_length"]
    width = max(len(k) for k in kept)
    ids = torch.tensor([k + [0] * (width - len(k)) for k in kept])
    lengths = torch.tensor([len(k) for k in kept])
    with torch.no_grad():
        logits = model(ids, lengths)
    assert logits.shape == (3,)
    assert torch.isfinite(logits).all()


def test_evaluate_scores_in_half_precision(
    trained_bundle: Path, imdb_tarball: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    # --dtype reaches the bundle: the tiny model in bfloat16 stays within a point of its card
    # (the shipped model's bar on CUDA is 0.1 points: docs/benchmarks.md, GPU).
    args = ["evaluate", str(trained_bundle), "--data", str(imdb_tarball)]
    args += ["--cache-dir", str(tmp_path), "--device", "cpu", "--dtype", "bfloat16"]
    assert main([*args, "--tolerance", "0.01"]) == 0
    assert ": reproduced" in capsys.readouterr().out


def test_evaluate_reproduces_the_card(trained_bundle: Path, imdb_tarball: Path, tmp_path: Path):
    card = json.loads((trained_bundle / "card.json").read_text())
    assert (
        main(
            [
                "evaluate",
                str(trained_bundle),
                "--data",
                str(imdb_tarball),
                "--cache-dir",
                str(tmp_path),
                "--tolerance",
                "0",
            ]
        )
        == 0
    )
    # A card that claims another accuracy is caught.
    card["metrics"]["test"]["accuracy"] += 0.05
    (trained_bundle.parent / "lying").mkdir()
    for f in ("model.pt", "tokenizer.json"):
        (trained_bundle.parent / "lying" / f).write_bytes((trained_bundle / f).read_bytes())
    (trained_bundle.parent / "lying" / "card.json").write_text(json.dumps(card))
    assert (
        main(
            [
                "evaluate",
                str(trained_bundle.parent / "lying"),
                "--data",
                str(imdb_tarball),
                "--cache-dir",
                str(tmp_path),
            ]
        )
        == 1
    )


def _as_format_2(folder: Path) -> dict[str, object]:
    """Rewrite a bundle's card as format 2 wrote it: ``max_length`` and ``files`` beside the
    truncation rule, one export difference, no validation. (Its model.pt keeps the entry points
    format 3 added; migrate reads only the old file's weights and ``forward``.)"""
    card = json.loads((folder / "card.json").read_text())
    export = card.pop("export")
    card.pop("migrated_from", None)
    card.update(
        format_version=2,
        max_length=card["truncation"]["max_length"],
        files={"model": "model.pt", "tokenizer": "tokenizer.json"},
        export={
            **{k: export[k] for k in ("torch_version", "python_version", "created_at")},
            "torchscript_max_abs_diff": 0.0,
        },
    )
    (folder / "card.json").write_text(json.dumps(card))
    return card


def test_migrate_converts_a_format_2_bundle_with_the_same_weights(
    trained_bundle: Path, tmp_path: Path
):
    folder = tmp_path / "old"
    shutil.copytree(trained_bundle, folder)
    old_card = _as_format_2(folder)
    with pytest.raises(BundleError, match="python -m training migrate"):
        bundle.load(folder, "cpu")  # the service names the command that converts it

    assert main(["migrate", str(folder)]) == 0
    migrated, original = bundle.load(folder, "cpu"), bundle.load(trained_bundle, "cpu")
    assert migrated.card.migrated_from is not None
    assert migrated.card.migrated_from["format_version"] == 2
    assert migrated.card.metrics == original.card.metrics
    assert migrated.card.command == old_card["command"]
    texts = ["A great, moving film " * 12, "A dull waste."]
    seqs = [np.array(e.ids) for e in original.tokenizer.encode_batch(texts)]
    ids, lengths = bundle.pad([original.card.truncation.apply(s) for s in seqs])
    with torch.no_grad():
        torch.testing.assert_close(
            migrated.model(ids, lengths), original.model(ids, lengths), rtol=0, atol=0
        )
    assert main(["migrate", str(folder)]) == 0  # already current: nothing to do
    assert bundle.read_card(folder) == migrated.card


class _BeforeForked(SentimentRNN):
    """The network as exported before ``forward_forked`` existed (2026-11-25)."""

    @torch.jit.ignore
    def forward_forked(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def test_migrate_gives_a_format_3_bundle_the_forked_entry_point(
    quantized_bundle: Path, tmp_path: Path
):
    """Without it, the shipped model (exported before the entry point existed) could not gain
    it with its weights kept, and a stale int8 variant would be left beside a new model.pt."""
    folder = shutil.copytree(quantized_bundle, tmp_path / "before")
    original = bundle.load(folder, "cpu", "float32")
    before = _BeforeForked.from_card(
        original.card.architecture.model_dump(), original.model.state_dict()
    )
    torch.jit.script(before).save(str(folder / bundle.MODEL_FILE))
    assert not hasattr(bundle.load(folder, "cpu", "float32").model, "forward_forked")

    lines: list[str] = []
    migrate(folder, log=lines.append)
    migrated = bundle.load(folder, "cpu", "auto")
    assert hasattr(migrated.model, "forward_forked")
    assert migrated.precision == "float32"  # the int8 variant was of the old file: dropped
    assert migrated.card.int8 is None
    assert not (folder / bundle.INT8_FILE).exists()
    assert "python -m training quantize" in lines[-1]
    assert migrated.card.metrics == original.card.metrics
    assert migrated.card.migrated_from is not None
    assert migrated.card.migrated_from["format_version"] == 3
    ids, lengths = bundle.pad([np.arange(2, 30), np.arange(5, 9)])
    with torch.no_grad():
        want = original.model(ids, lengths)
        torch.testing.assert_close(migrated.model(ids, lengths), want, rtol=0, atol=0)
        torch.testing.assert_close(
            migrated.model.forward_forked(ids, lengths), want, rtol=0, atol=0
        )
    migrate(folder, log=lines.append)  # complete now: nothing to do
    assert "every file" in lines[-1]


def test_training_learns_the_tiny_task(trained_bundle: Path):
    card = json.loads((trained_bundle / "card.json").read_text())
    # Cue words decide every tiny review; chance is 0.5.
    assert card["metrics"]["test"]["accuracy"] >= 0.85


def test_prepare_writes_a_folder_train_can_use_elsewhere(
    imdb_tarball: Path, glove_file: Path, tmp_path: Path
):
    args = prepare_args(imdb_tarball, glove_file, tmp_path / "cache")
    assert main(["prepare", *args]) == 0
    cfg = PrepareConfig(
        data=str(imdb_tarball),
        vectors=str(glove_file),
        cache_dir=tmp_path / "cache",
        vocab_size=200,
        min_count=1,
        val_fraction=0.2,
    )
    folder = prepared_dir(cfg)
    prepared = load_prepared(folder)
    assert {k: len(v) for k, v in prepared.splits.items()} == {"train": 65, "val": 16, "test": 81}
    assert prepared.embeddings.shape == (prepared.tokenizer.get_vocab_size(), 8)
    np.testing.assert_array_equal(prepared.embeddings[0], 0.0)

    moved = tmp_path / "elsewhere"
    folder.rename(moved)  # e.g. carried to a GPU machine without gensim or the raw data
    assert (
        main(
            [
                "train",
                "--prepared",
                str(moved),
                *TINY_MODEL,
                *TINY_TRAIN,
                "--epochs",
                "1",
                "--name",
                "moved",
                "--models-dir",
                str(tmp_path / "models"),
                "--data",
                str(tmp_path / "no-raw-data-here"),
                "--test-limit",
                "30",  # the README's smoke run scores a sample of the test reviews
            ]
        )
        == 0
    )
    assert (tmp_path / "models" / "moved" / "model.pt").is_file()
    card = json.loads((tmp_path / "models" / "moved" / "card.json").read_text())
    assert card["metrics"]["test"]["n"] == 30
    assert card["hyperparameters"]["test_limit"] == 30


def test_short_text_training_reports_sentences_and_evaluate_reproduces_them(
    imdb_tarball: Path, glove_file: Path, tmp_path: Path
):
    """Crops, adversarial steps and selection on both validation splits train and export; the
    card holds the short-text validation and sentence-file accuracies, and `evaluate
    --sentences` reproduces the sentence figure from the bundle alone. If this fails, the
    recipe of the shipped model (docs/model.md) no longer runs or its card lies."""
    sentences = tmp_path / "sentences.txt"
    sentences.write_text(
        "A wonderful, superb film.\t1\nDull and awful.\t0\nBrilliant acting!\t1\n"
        "A terrible waste.\t0\n",
        encoding="utf-8",
    )
    argv = [
        "train",
        *prepare_args(imdb_tarball, glove_file, tmp_path / "cache"),
        *TINY_MODEL,
        *TINY_TRAIN,
        "--epochs",
        "2",
        "--crop-fraction",
        "1.0",
        "--crop-weight",
        "0.5",
        "--adv-epsilon",
        "5",
        "--select-on",
        "both",
        "--sentences",
        str(sentences),
        "--name",
        "short",
        "--models-dir",
        str(tmp_path / "models"),
    ]
    assert main(argv) == 0
    folder = tmp_path / "models" / "short"
    card = json.loads((folder / "card.json").read_text())
    assert set(card["metrics"]) == {"validation", "validation_short", "test", "sentences"}
    assert card["metrics"]["sentences"]["n"] == 4
    assert card["hyperparameters"]["crop_fraction"] == 1.0
    assert card["hyperparameters"]["adv_epsilon"] == 5
    assert all("short_accuracy" in row for row in card["training"]["history"])
    evaluate = ["evaluate", str(folder), "--data", str(imdb_tarball), "--cache-dir"]
    assert main([*evaluate, str(tmp_path), "--sentences", str(sentences), "--tolerance", "0"]) == 0
    card["metrics"]["sentences"]["accuracy"] += 0.25  # a card that overstates it is caught
    (folder / "card.json").write_text(json.dumps(card))
    assert main([*evaluate, str(tmp_path), "--sentences", str(sentences)]) == 1


def test_training_is_deterministic_on_cpu(imdb_tarball: Path, glove_file: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    for name in ("first", "second"):
        assert (
            main(
                [
                    "train",
                    *prepare_args(imdb_tarball, glove_file, cache),
                    *TINY_MODEL,
                    *TINY_TRAIN,
                    "--epochs",
                    "1",
                    "--freeze-embeddings-epochs",
                    "0",
                    "--name",
                    name,
                    "--models-dir",
                    str(tmp_path),
                ]
            )
            == 0
        )
    first = torch.jit.load(str(tmp_path / "first" / "model.pt")).state_dict()
    second = torch.jit.load(str(tmp_path / "second" / "model.pt")).state_dict()
    for key, value in first.items():
        torch.testing.assert_close(second[key], value, rtol=0, atol=0)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "training", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-data", "IMDb data not found at"),
        ("corrupt-tarball", "not a readable aclImdb tar archive"),
        ("wrong-checksum", "checksum mismatch"),
        ("wrong-dimension", "dimension 8, expected 300"),
        ("unknown-cell", "invalid choice: 'transformer'"),
    ],
)
def test_bad_input_exits_non_zero_with_a_clear_message(
    case: str, expected: str, imdb_tarball: Path, glove_file: Path, tmp_path: Path
):
    data, extra = str(imdb_tarball), []
    if case == "missing-data":
        data = str(tmp_path / "aclImdb_v1.tar.gz")
    elif case == "corrupt-tarball":
        data = str(tmp_path / "aclImdb_v1.tar.gz")
        Path(data).write_bytes(b"\x1f\x8b" + b"\x00" * 100)
    elif case == "wrong-checksum":
        extra = ["--data-sha256", "ab" * 32]
    elif case == "wrong-dimension":
        extra = ["--vectors-dim", "300"]
    elif case == "unknown-cell":
        extra = ["--cell", "transformer"]
    command = "train" if case == "unknown-cell" else "prepare"
    result = _run_cli(
        command,
        "--data",
        data,
        "--vectors",
        str(glove_file),
        "--cache-dir",
        str(tmp_path / "cache"),
        *extra,
    )
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "sentiment-train"
    assert script.exists()
    assert (
        "prepare"
        in subprocess.run(
            [str(script), "--help"], capture_output=True, text=True, check=True
        ).stdout
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_on_cuda_with_mixed_precision(
    imdb_tarball: Path, glove_file: Path, tmp_path: Path
):
    assert (
        main(
            [
                "train",
                *prepare_args(imdb_tarball, glove_file, tmp_path / "cache"),
                *TINY_MODEL,
                *TINY_TRAIN,
                "--device",
                "cuda",
                "--amp",
                "--name",
                "gpu",
                "--models-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    card = json.loads((tmp_path / "gpu" / "card.json").read_text())
    assert card["training"]["device"].startswith("cuda")
    assert card["metrics"]["test"]["accuracy"] >= 0.85
    # The export is a CPU TorchScript file whatever the training device.
    torch.jit.load(str(tmp_path / "gpu" / "model.pt"), map_location="cpu")


def test_finetune_writes_a_bundle_that_evaluate_and_behave_reproduce(
    trained_bundle: Path, imdb_tarball: Path, tmp_path: Path
):
    """If this fails, `finetune` exports a bundle whose card does not describe it: figures
    computed with other temperatures, or a model that is not the one chosen."""
    argv = [
        "finetune",
        str(trained_bundle),
        "--data",
        str(imdb_tarball),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--models-dir",
        str(tmp_path / "models"),
        "--name",
        "tuned",
        "--epochs",
        "2",
        "--reviews",
        "40",
        "--crops",
        "40",
        "--negations",
        "40",
        "--concessions",
        "40",
        "--threads",
        "1",
    ]
    assert main(argv) == 0
    folder = tmp_path / "models" / "tuned"
    card = bundle.read_card(folder)
    assert card.version == "3.0.0"
    source = card.training["fine_tuned_from"]
    assert (source["name"], source["version"]) == ("tiny", "1.0.0")
    assert source["model_sha256"] == bundle.sha256(trained_bundle / "model.pt")
    history = card.training["history"]
    assert [row["epoch"] for row in history[:3]] == [0, 1, 2]
    assert all(0 < row["interpolation"] < 1 for row in history[3:])  # mixes with the source
    assert card.hyperparameters["finetune"]["negations"] == 40
    assert card.hyperparameters["finetune"]["adv_epsilon"] == 5  # the default: as 2.0.0 was
    assert card.architecture == bundle.read_card(trained_bundle).architecture
    evaluate = ["evaluate", str(folder), "--data", str(imdb_tarball), "--cache-dir"]
    assert main([*evaluate, str(tmp_path / "cache"), "--tolerance", "0"]) == 0
    assert main(["behave", str(folder), "--check", "--tolerance", "0"]) == 0  # written by it
