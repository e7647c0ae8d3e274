"""`quantize`: add an int8 CPU variant to a trained bundle.

The network is rebuilt from the card and ``model.pt``'s weights, its GRU and linear layers are
quantised dynamically (int8 weights; activations quantised per batch at run time), and the
result is scripted with the same entry points. It is scored on the 25k official test reviews
(and a sentence file, if given) and written only if its test accuracy is within ``max_drop``
of ``model.pt``'s card figure.

Why ``torch.ao.quantization.quantize_dynamic`` though torch deprecates it: torchao, its
successor, quantises linear layers only (through tensor subclasses that TorchScript cannot
hold), and a review's time is spent in the GRUs. The API still works in torch 2.13; the day it
goes, this module is the one place to change.
"""

from __future__ import annotations

import dataclasses
import platform
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service import bundle
from training.batches import pad_batch
from training.config import MAX_INT8_DROP
from training.errors import DataError, ExportError
from training.evaluate import load_sets, score_texts
from training.migrate import check_batch
from training.model import SentimentRNN

METHOD = (
    "torch.ao.quantization.quantize_dynamic: GRU and Linear weights int8 (qint8), activations "
    "quantised per batch; embedding float32"
)


def eager(loaded: bundle.Bundle) -> SentimentRNN:
    """The bundle's network as an eager module: quantisation works on eager modules only."""
    architecture = loaded.card.architecture.model_dump()
    return SentimentRNN.from_card(architecture, loaded.differentiable.state_dict()).eval()


def quantize(model: SentimentRNN) -> torch.jit.ScriptModule:
    """``model`` with dynamically quantised GRU/LSTM and linear layers, scripted and saved and
    loaded once (as a server will see it)."""
    with warnings.catch_warnings():  # the deprecation of torch.ao (see the module's docstring)
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            model, {nn.GRU, nn.LSTM, nn.Linear}, dtype=torch.qint8
        )
        return bundle.round_trip(torch.jit.script(quantized))


def quantize_bundle(
    folder: Path,
    data: str,
    cache_dir: Path,
    sentences: Path | None = None,
    data_sha256: str | None = None,
    max_drop: float = MAX_INT8_DROP,
    log: Callable[[str], object] = print,
) -> dict[str, dict[str, Any]]:
    """Make, score and add the int8 variant of the bundle in ``folder``; its metrics."""
    try:
        loaded = bundle.load(folder, "cpu")
    except bundle.BundleError as exc:
        raise DataError(str(exc)) from exc
    int8 = quantize(eager(loaded))

    check = check_batch(loaded.tokenizer.get_vocab_size(), loaded.card.truncation.max_length)
    ids, lengths = pad_batch(check, loaded.card.truncation)
    with torch.no_grad():
        diff = float((int8(ids, lengths) - loaded.model(ids, lengths)).abs().max())

    as_int8 = dataclasses.replace(loaded, model=int8, precision="int8")
    sets = load_sets(data, cache_dir, data_sha256, sentences)
    metrics = {name: score_texts(as_int8, texts, 256, name) for name, texts in sets.items()}
    drop = loaded.card.metrics["test"].accuracy - metrics["test"]["accuracy"]
    log(
        f"int8 test accuracy {metrics['test']['accuracy']:.4f} against float32 "
        f"{loaded.card.metrics['test'].accuracy:.4f} (drop {drop:+.4f}); largest logit "
        f"difference on the check batch {diff:.4f}"
    )
    if drop > max_drop:
        raise ExportError(
            f"the int8 variant loses {drop:.4f} of test accuracy, more than {max_drop}; "
            "nothing written"
        )
    variant = bundle.Int8Variant(
        method=METHOD,
        source_sha256=bundle.sha256(folder / bundle.MODEL_FILE),
        metrics=metrics,  # validated into SplitMetrics
        max_abs_diff=diff,
        torch_version=f"{torch.__version__} (python {platform.python_version()})",
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    bundle.save_int8(folder, int8, variant)
    return metrics
