"""Export: the trained network -> TorchScript, checked against the eager model entry point by
entry point, and -> ONNX, checked in ONNX Runtime against the eager model; then written as a
bundle through the contract (``service.bundle.save``)."""

from __future__ import annotations

import io
import platform
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from tokenizers import Tokenizer

from service import bundle
from training.batches import pad_batch
from training.errors import ExportError
from training.model import SentimentRNN, count_parameters

TOLERANCE = 1e-5
# ONNX Runtime's kernels sum in another order than torch's: a looser bound than TorchScript's.
ONNX_TOLERANCE = 1e-4
ONNX_OPSET = 17


def export_bundle(
    model: SentimentRNN,
    tokenizer: Tokenizer,
    folder: Path,
    check_batch: list[np.ndarray],
    card: dict[str, Any],
) -> Path:
    """Script and verify ``model``, then save it with ``tokenizer`` and its card into
    ``folder``. ``card`` holds the training run's fields; the export adds the rest."""
    model = model.cpu().eval()
    truncation = bundle.Truncation.model_validate(card["truncation"])
    scripted = torch.jit.script(model)
    diffs = verify_entry_points(model, bundle.round_trip(scripted), check_batch, truncation)
    onnx = export_onnx(model, check_batch, truncation)
    try:
        validated = bundle.Card.model_validate(
            {
                **card,
                "format_version": bundle.FORMAT_VERSION,
                "labels": bundle.LABELS,
                "parameters": count_parameters(model),
                "export": {
                    "torch_version": torch.__version__,
                    "python_version": platform.python_version(),
                    "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "max_abs_diff": diffs,
                },
            }
        )
    except ValidationError as exc:
        raise ExportError(f"the card does not meet the bundle contract: {exc}") from exc
    try:
        return bundle.save(folder, scripted, tokenizer, validated, onnx)
    except bundle.BundleError as exc:
        raise ExportError(f"the written bundle does not load: {exc}") from exc


def verify_entry_points(
    model: SentimentRNN,
    exported: torch.jit.ScriptModule,
    seqs: list[np.ndarray],
    truncation: bundle.Truncation,
) -> dict[str, float]:
    """Compare every entry point of ``exported`` with ``model`` on real reviews: the largest
    absolute difference per entry point. Any above the tolerance is an ``ExportError``."""
    ids, lengths = pad_batch(seqs, truncation)
    with torch.no_grad():
        embedded = model.embed(ids)
        diffs = {
            "forward": _diff(model(ids, lengths), exported(ids, lengths)),
            "embed": _diff(embedded, exported.embed(ids)),
            "forward_embedded": _diff(
                model.forward_embedded(embedded, lengths),
                exported.forward_embedded(embedded, lengths),
            ),
            # Against the eager forward: the forked directions must change nothing.
            bundle.FORKED_ENTRY_POINT: _diff(
                model(ids, lengths), exported.forward_forked(ids, lengths)
            ),
        }
    bad = {name: d for name, d in diffs.items() if not d <= TOLERANCE}  # `not <=` catches NaN
    if bad:
        raise ExportError(
            f"the TorchScript export differs from the model ({bad}, tolerance {TOLERANCE}); "
            "it is not a faithful copy"
        )
    return diffs


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def export_onnx(
    model: SentimentRNN, seqs: list[np.ndarray], truncation: bundle.Truncation
) -> tuple[bytes, bundle.OnnxVariant]:
    """``model``'s ``forward`` as an ONNX graph (batch and time dynamic), and its card section:
    run in ONNX Runtime on ``seqs`` (mixed lengths, padded as the service pads them) and
    compared with the eager network. The source hash is the saver's to fill in."""
    import onnxruntime

    model = model.cpu().eval()
    ids, lengths = pad_batch(seqs, truncation)
    graph = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript-based exporter warns that it is deprecated and that an RNN exported
        # with a batch size may not generalise; the check below runs other batch sizes.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, lengths),
            graph,  # type: ignore[arg-type]  # a file object works, as the docs say
            dynamo=False,
            input_names=list(bundle.ONNX_INPUTS),
            output_names=[bundle.ONNX_OUTPUT],
            dynamic_axes={
                "ids": {0: "batch", 1: "time"},
                "lengths": {0: "batch"},
                bundle.ONNX_OUTPUT: {0: "batch"},
            },
            opset_version=ONNX_OPSET,
        )
    session = onnxruntime.InferenceSession(graph.getvalue(), providers=["CPUExecutionProvider"])
    worst = 0.0
    # The whole batch, then a few rows alone and in pairs, each padded only to its longest:
    # other batch sizes and time lengths than the traced ones, against the eager logits of the
    # rows padded to the whole batch's longest (padding must change nothing).
    with torch.no_grad():
        expected = model(ids, lengths)
    for rows in (range(len(seqs)), range(1), range(1, 3), range(len(seqs) - 2, len(seqs))):
        index = list(rows)
        cut = max(1, int(lengths[index].max()))
        inputs = {"ids": ids[index, :cut].numpy(), "lengths": lengths[index].numpy()}
        (found,) = session.run(None, inputs)
        worst = max(worst, _diff(expected[index], torch.from_numpy(found)))
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(
            f"the ONNX export differs from the model by {worst:.3g} in ONNX Runtime (tolerance "
            f"{ONNX_TOLERANCE}); it is not a faithful copy"
        )
    variant = bundle.OnnxVariant(
        method=f"torch.onnx.export (TorchScript-based exporter), opset {ONNX_OPSET}",
        opset=ONNX_OPSET,
        source_sha256="",
        max_abs_diff=worst,
        onnxruntime_version=onnxruntime.__version__,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    return graph.getvalue(), variant
