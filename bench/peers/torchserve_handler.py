"""TorchServe handler serving our bundle; TorchServe batches requests before ``handle``.

Packed by ``bench.servers`` with model.pt, tokenizer.json and card.json as the archive's
files (and model.onnx, model.int8.pt where the bundle has them), so the archive's folder is a
bundle that ``ModelRuntime.load`` reads. BENCH_RUNTIME=onnx runs every batch on model.onnx in
ONNX Runtime instead of TorchScript.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, os.environ["BENCH_REPO_ROOT"])
import torch

from service.runtime import Execution, ModelRuntime

_runtime: ModelRuntime | None = None
_how = Execution(onnx=os.environ.get("BENCH_RUNTIME") == "onnx")


def _text(row: dict[str, Any]) -> str:
    """TorchServe hands over the body parsed (JSON content type) or as bytes."""
    body: Any = row.get("body") if row.get("body") is not None else row.get("data")
    if isinstance(body, (bytes, bytearray)):
        body = json.loads(body)
    return str(body["inputs"])


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    global _runtime
    if _runtime is None:
        if os.environ.get("BENCH_TORCH_THREADS"):
            torch.set_num_threads(int(os.environ["BENCH_TORCH_THREADS"]))
        _runtime = ModelRuntime.load(
            Path(context.system_properties["model_dir"]),
            os.environ.get("BENCH_DEVICE", "cpu"),
            os.environ.get("BENCH_DTYPE", "float32"),  # type: ignore[arg-type]
            "onnx" if _how.onnx else "torchscript",
        )
        _runtime.warmup([(1, _how), (64, _how)])
    if data is None:
        return None
    encoded = _runtime.preprocess([_text(row) for row in data])
    logits = _runtime.infer([e.ids for e in encoded], _how)
    return [
        [{"label": k, "score": v} for k, v in _runtime.postprocess(float(z), e.original_tokens)]
        for z, e in zip(logits, encoded, strict=True)
    ]
