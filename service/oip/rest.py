"""The Open Inference Protocol over REST (``/v2``), as KServe and Triton serve it, with
Triton's binary tensor extension (what ``tritonclient.http`` sends by default): the JSON
header, then the tensors' raw bytes, its length in ``Inference-Header-Content-Length``.
Requests go through the same middleware (API keys, body size, metrics) and the same predictor
(admission, batcher, deadlines) as /predict."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from service.errors import ErrorType, ServiceError
from service.oip import protocol
from service.oip.protocol import InferOutput, InputTensor, invalid
from service.pipeline import Predictor
from service.routes import ERROR_RESPONSES, PredictorDep, client_gone

HEADER_LENGTH = "inference-header-content-length"
# The infer routes, whose bodies may be binary: the body guard bounds their size only.
INFER_PATH = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")

Parameter = StrictBool | StrictInt | StrictFloat | StrictStr


class TensorInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    data: list[Any] | None = None


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Parameter] = Field(default_factory=dict)


class InferBody(BaseModel):
    """An inference request's JSON (the header, where tensors travel as binary)."""

    model_config = ConfigDict(extra="forbid")
    id: str = ""
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    inputs: list[TensorInput]
    outputs: list[RequestedOutput] = Field(default_factory=list)


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its local ``$defs`` references replaced by what they name (they do
    not resolve where an OpenAPI document embeds the schema)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return dict(inline(schema))


router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])


async def served_model(
    request: Request, _: PredictorDep, name: str, version: str | None = None
) -> Predictor:
    """The predictor of the served model ``name`` (at ``version``, if given); 404 else."""
    served: dict[str, Predictor] = request.app.state.predictors
    return protocol.find_model(served, name, version)


ModelDep = Annotated[Predictor, Depends(served_model)]


@router.get("", summary="Server metadata")
async def server_metadata() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "name": protocol.SERVER_NAME,
        "version": version("imdb-sentiment"),
        "extensions": list(protocol.EXTENSIONS),
    }


@router.get("/models", responses=ERROR_RESPONSES, summary="The served models")
async def models(request: Request, _: PredictorDep) -> dict[str, Any]:
    served: dict[str, Predictor] = request.app.state.predictors
    return {"models": [_described(p) for p in served.values()]}


@router.post(
    "/repository/index",
    responses=ERROR_RESPONSES,
    summary="The served models, as Triton's repository index",
)
async def repository_index(request: Request, _: PredictorDep) -> list[dict[str, str]]:
    served: dict[str, Predictor] = request.app.state.predictors
    cards = [p.runtime.card for p in served.values()]
    return [{"name": c.name, "version": c.version, "state": "READY"} for c in cards]


def _described(predictor: Predictor) -> dict[str, Any]:
    card = predictor.runtime.card
    return protocol.model_metadata(card.name, [card.version], len(card.labels))


@router.get("/health/live", summary="Liveness: the process answers")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses=ERROR_RESPONSES, summary="Readiness: the model serves")
async def ready(_: PredictorDep) -> dict[str, bool]:
    return {"ready": True}


@router.get("/models/{name}", responses=ERROR_RESPONSES, summary="Model metadata")
@router.get("/models/{name}/versions/{version}", responses=ERROR_RESPONSES, include_in_schema=False)
async def metadata(predictor: ModelDep) -> dict[str, Any]:
    return _described(predictor)


@router.get("/models/{name}/ready", responses=ERROR_RESPONSES, summary="Model readiness")
@router.get(
    "/models/{name}/versions/{version}/ready", responses=ERROR_RESPONSES, include_in_schema=False
)
async def model_ready(predictor: ModelDep) -> dict[str, Any]:
    return {"name": predictor.runtime.card.name, "ready": True}


@router.post(
    "/models/{name}/infer",
    responses=ERROR_RESPONSES,
    summary="Inference: TEXT (BYTES) in; PROBABILITIES (FP32) and LABEL (BYTES) out",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {
                    "schema": _inlined(InferBody.model_json_schema()),
                    "example": {
                        "inputs": [
                            {
                                "name": "TEXT",
                                "datatype": "BYTES",
                                "shape": [1],
                                "data": ["A wonderful, moving film."],
                            }
                        ]
                    },
                }
            },
            "required": True,
        }
    },
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    responses=ERROR_RESPONSES,
    include_in_schema=False,
)
async def infer(request: Request, predictor: ModelDep) -> Response:
    body, raw = _split(await request.body(), request.headers.get(HEADER_LENGTH))
    asked = _parse(body)
    inputs = [_input(tensor, raw) for tensor in asked.inputs]
    if raw:
        raise invalid(f"{len(raw)} bytes of binary data follow the inputs that no input claims")
    everything_raw = asked.parameters.get("binary_data_output") is True
    outputs = {
        o.name: bool(o.parameters.get("binary_data", everything_raw)) for o in asked.outputs
    } or dict.fromkeys(protocol.OUTPUTS, everything_raw)
    checked = protocol.infer_request(inputs, outputs, asked.parameters, asked.id)
    prediction = await predictor.predict(
        checked.texts, truncate=checked.truncate, disconnected=lambda: client_gone(request)
    )
    card = predictor.runtime.card
    made = protocol.infer_outputs(checked, prediction.scores, card.labels)
    header: dict[str, Any] = {"model_name": card.name, "model_version": card.version}
    if checked.id:
        header["id"] = checked.id
    header["outputs"], binary = _encode(made, checked.outputs)
    headers = prediction.timing.headers()
    if not binary:
        return JSONResponse(header, headers=headers)
    text = json.dumps(header, separators=(",", ":")).encode()
    headers[HEADER_LENGTH] = str(len(text))
    return Response(text + binary, media_type="application/octet-stream", headers=headers)


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytearray]:
    """The JSON header and the binary data after it (consumed by ``_input``)."""
    if header_length is None:
        return body, bytearray()
    if not header_length.isdigit() or int(header_length) > len(body):
        raise invalid(
            f"Inference-Header-Content-Length {header_length!r} is not a length within the "
            f"body ({len(body)} bytes)"
        )
    return body[: int(header_length)], bytearray(body[int(header_length) :])


def _parse(body: bytes) -> InferBody:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServiceError(ErrorType.INVALID_JSON, f"body is not valid JSON: {exc}") from None
    try:
        return InferBody.model_validate(document)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "body"
        raise invalid(f"{where}: {problem['msg']}") from None


def _input(tensor: TensorInput, raw: bytearray) -> InputTensor:
    """The tensor's elements, from its JSON data or from the binary data after the header
    (``binary_data_size`` bytes, consumed from ``raw`` in the inputs' order)."""
    size = tensor.parameters.get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise invalid(f"input {tensor.name} has neither data nor binary_data_size")
        return InputTensor(tensor.name, tensor.datatype, tensor.shape, _flat(tensor.data))
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= len(raw):
        raise invalid(f"input {tensor.name}: binary_data_size {size!r} exceeds the binary data")
    if tensor.datatype != "BYTES":
        raise invalid(f"input {tensor.name} has datatype {tensor.datatype}; it must be BYTES")
    chunk = bytes(raw[:size])
    del raw[:size]
    elements = protocol.decode_bytes(chunk)
    return InputTensor(tensor.name, tensor.datatype, tensor.shape, elements)


def _flat(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    for element in data:
        flat.extend(_flat(element) if isinstance(element, list) else [element])
    return flat


def _encode(made: list[InferOutput], raw: dict[str, bool]) -> tuple[list[dict[str, Any]], bytes]:
    """The outputs' JSON, and the binary data of those asked for raw."""
    entries, binary = [], b""
    for output in made:
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": output.shape,
        }
        if raw[output.name]:
            data = output.raw()
            entry["parameters"] = {"binary_data_size": len(data)}
            binary += data
        else:
            entry["data"] = output.data
        entries.append(entry)
    return entries, binary
