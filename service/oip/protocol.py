"""The Open Inference Protocol's (KServe v2, Triton) model for a text classifier, shared by its
REST routes (``rest``) and its gRPC service (``grpc``): one input, the texts; two outputs, the
probabilities per label and the best label. The wire formats decode into ``InferRequest`` and
encode ``InferOutput``s; the checks and the model's answer are the same on both.

    input  TEXT           BYTES  [-1]     (or [-1, 1]) UTF-8 texts
    output PROBABILITIES  FP32   [-1, 2]  per text, the probability of each label, card order
    output LABEL          BYTES  [-1]     per text, the label with the higher probability
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from service.errors import ErrorType, ServiceError
from service.schemas import PredictRequest

if TYPE_CHECKING:
    from service.pipeline import Predictor

Model = TypeVar("Model", bound="Predictor")

INPUT = "TEXT"
PROBABILITIES = "PROBABILITIES"
LABEL = "LABEL"
OUTPUTS = (PROBABILITIES, LABEL)
# Request parameters: the service's own, and the one tritonclient's HTTP client adds.
PARAMETERS = ("truncate", "binary_data_output")
SERVER_NAME = "sentiment-service"
EXTENSIONS = ("binary_tensor_data",)  # Triton's name for raw tensors in the HTTP body


def find_model(served: Mapping[str, Model], name: str, version: str | None) -> Model:
    """The served model named ``name`` (at ``version``, if one is asked); 404 naming what is
    served."""
    model = served.get(name)
    if model is None or version not in (None, "", model.runtime.card.version):
        asked = name if not version else f"{name} version {version}"
        offered = ", ".join(
            f"{m.runtime.card.name} {m.runtime.card.version}" for m in served.values()
        )
        raise ServiceError(
            ErrorType.NOT_FOUND, f"model {asked} is not served here; these are: {offered}"
        )
    return model


def model_metadata(name: str, versions: Sequence[str], labels: int) -> dict[str, Any]:
    return {
        "name": name,
        "versions": list(versions),
        "platform": "pytorch_libtorch",  # the bundle's contract: a TorchScript model
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, labels]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
    }


@dataclass(frozen=True)
class InputTensor:
    """One input as the client sent it: ``elements`` flat, row-major, as decoded from JSON or
    from raw bytes (``bytes`` for BYTES)."""

    name: str
    datatype: str
    shape: list[int]
    elements: list[Any]


@dataclass(frozen=True)
class InferRequest:
    texts: list[str]
    truncate: bool | None
    outputs: dict[str, bool]  # requested output -> as raw bytes
    id: str


@dataclass(frozen=True)
class InferOutput:
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | list[str]

    def raw(self) -> bytes:
        """The elements as the protocol's raw little-endian bytes."""
        if self.datatype == "FP32":
            return struct.pack(f"<{len(self.data)}f", *self.data)
        return encode_bytes([str(d).encode() for d in self.data])


def invalid(message: str) -> ServiceError:
    return ServiceError(ErrorType.VALIDATION, message)


def infer_request(
    inputs: Sequence[InputTensor],
    outputs: dict[str, bool],
    parameters: dict[str, Any],
    request_id: str,
) -> InferRequest:
    """The request the decoded parts describe, checked as /predict checks its own (the same
    pydantic schema): 4xx ``ServiceError`` naming what is wrong."""
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown:
        raise invalid(f"unknown parameter {unknown[0]!r}; this model takes {list(PARAMETERS)}")
    truncate = parameters.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise invalid("parameter 'truncate' must be a boolean")
    if len(inputs) != 1 or inputs[0].name != INPUT:
        names = [i.name for i in inputs]
        raise invalid(f"inputs {names}: this model takes one input, {INPUT} (BYTES, [-1])")
    tensor = inputs[0]
    if tensor.datatype != "BYTES":
        raise invalid(f"input {INPUT} has datatype {tensor.datatype}; it must be BYTES")
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise invalid(f"input {INPUT} has shape {tensor.shape}; it must be [n] or [n, 1]")
    if math.prod(tensor.shape) != len(tensor.elements):
        raise invalid(f"input {INPUT} has shape {tensor.shape} but {len(tensor.elements)} elements")
    for name in outputs:
        if name not in OUTPUTS:
            raise invalid(f"unknown output {name!r}; this model has {list(OUTPUTS)}")
    texts = [_text(element, i) for i, element in enumerate(tensor.elements)]
    try:
        checked = PredictRequest(inputs=texts, truncate=truncate)
    except ValidationError as exc:
        problem = str(exc.errors()[0]["msg"]).removeprefix("Value error, ")
        raise invalid(f"input {INPUT}: {problem.replace('inputs', 'element')}") from None
    requested = outputs or dict.fromkeys(OUTPUTS, False)
    return InferRequest(checked.texts, truncate, requested, request_id)


def _text(element: Any, index: int) -> str:
    if isinstance(element, bytes):
        try:
            return element.decode("utf-8")
        except UnicodeDecodeError:
            raise invalid(f"input {INPUT} element {index} is not UTF-8 text") from None
    if isinstance(element, str):
        return element
    raise invalid(f"input {INPUT} element {index} is {type(element).__name__}, not a string")


def infer_outputs(
    request: InferRequest, scores: list[list[dict[str, Any]]], labels: Sequence[str]
) -> list[InferOutput]:
    """The requested outputs from /predict's answer (per text, labels and scores, best first)."""
    probabilities: list[float] = []
    for ranked in scores:
        by_label = {entry["label"]: entry["score"] for entry in ranked}
        probabilities.extend(float(by_label[label]) for label in labels)
    made = {
        PROBABILITIES: InferOutput(
            PROBABILITIES, "FP32", [len(scores), len(labels)], probabilities
        ),
        LABEL: InferOutput(LABEL, "BYTES", [len(scores)], [r[0]["label"] for r in scores]),
    }
    return [made[name] for name in request.outputs]


def decode_bytes(raw: bytes, count: int | None = None) -> list[bytes]:
    """BYTES elements from raw bytes: each a 4-byte little-endian length, then its bytes."""
    elements, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise invalid("raw BYTES tensor ends inside an element's length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise invalid("raw BYTES tensor ends inside an element")
        elements.append(raw[at : at + size])
        at += size
    if count is not None and len(elements) != count:
        raise invalid(f"raw BYTES tensor holds {len(elements)} elements, its shape {count}")
    return elements


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)
