"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, Triton's and
KServe's), on its own port (``grpc_port``), in the event loop of the HTTP app: the same
predictor (admission, batcher, deadlines), API keys (``authorization: Bearer <key>``
metadata), message size bound (``max_body_bytes``) and metrics. Errors carry the gRPC status
that ``STATUS_CODES`` gives their ``ErrorType``."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib.metadata import version
from typing import Any, TypeVar

import grpc
from grpc import aio
from opentelemetry import propagate
from opentelemetry.trace import SpanKind

from service.errors import ErrorType, ServiceError
from service.logs import REQUEST_ID, request_id
from service.metrics import Metrics
from service.middleware import bearer_token, key_matches
from service.oip import predict_v2_pb2 as pb
from service.oip import predict_v2_pb2_grpc as pb_grpc
from service.oip import protocol
from service.pipeline import Predictor
from service.tracing import tracer

log = logging.getLogger("service.grpc")

STATUS_CODES: dict[ErrorType, grpc.StatusCode] = {
    ErrorType.INVALID_JSON: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.INVALID_ENCODING: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorType.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    ErrorType.VALIDATION: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorType.HEADERS_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorType.READ_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorType.TOO_MANY_INPUTS: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.INPUT_TOO_LONG: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorType.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorType.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorType.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorType.CLIENT_CLOSED: grpc.StatusCode.CANCELLED,
    ErrorType.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorType.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorType.RELOAD_FAILED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorType.BACKEND: grpc.StatusCode.INTERNAL,
}
SERVICE = "/inference.GRPCInferenceService/"

Reply = TypeVar("Reply")


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's calls over the predictors ``predictors()`` gives, by model name (none
    until the models serve)."""

    def __init__(
        self,
        predictors: Callable[[], Mapping[str, Predictor]],
        metrics: Metrics,
        keys: list[str],
    ) -> None:
        self._predictors = predictors
        self._metrics = metrics
        self._keys = [k.encode() for k in keys]

    # The methods are named by the protocol (N802).
    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def live() -> Any:
            return pb.ServerLiveResponse(live=True)

        return await self._answer("ServerLive", context, live)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def ready() -> Any:
            return pb.ServerReadyResponse(ready=bool(self._predictors()))

        return await self._answer("ServerReady", context, ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def ready() -> Any:
            self._served(request.name, request.version)
            return pb.ModelReadyResponse(ready=True)

        return await self._answer("ModelReady", context, ready)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def metadata() -> Any:
            return pb.ServerMetadataResponse(
                name=protocol.SERVER_NAME,
                version=version("imdb-sentiment"),
                extensions=[],
            )

        return await self._answer("ServerMetadata", context, metadata)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def metadata() -> Any:
            card = self._served(request.name, request.version).runtime.card
            described = protocol.model_metadata(card.name, [card.version], len(card.labels))
            return pb.ModelMetadataResponse(
                name=described["name"],
                versions=described["versions"],
                platform=described["platform"],
                inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["inputs"]],
                outputs=[
                    pb.ModelMetadataResponse.TensorMetadata(**t) for t in described["outputs"]
                ],
            )

        return await self._answer("ModelMetadata", context, metadata)

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        async def infer() -> Any:
            predictor = self._served(request.model_name, request.model_version)
            checked = protocol.infer_request(
                _inputs(request),
                {o.name: True for o in request.outputs},
                {k: _parameter(v) for k, v in request.parameters.items()},
                request.id,
            )
            prediction = await predictor.predict(checked.texts, truncate=checked.truncate)
            card = predictor.runtime.card
            made = protocol.infer_outputs(checked, prediction.scores, card.labels)
            context.set_trailing_metadata(tuple(prediction.timing.headers().items()))
            return pb.ModelInferResponse(
                model_name=card.name,
                model_version=card.version,
                id=checked.id,
                outputs=[
                    pb.ModelInferResponse.InferOutputTensor(
                        name=o.name, datatype=o.datatype, shape=o.shape
                    )
                    for o in made
                ],
                raw_output_contents=[o.raw() for o in made],
            )

        return await self._answer("ModelInfer", context, infer)

    def _served(self, name: str, model_version: str) -> Predictor:
        served = self._predictors()
        if not served:
            raise ServiceError(ErrorType.UNAVAILABLE, "the model is not loaded yet")
        return protocol.find_model(served, name, model_version)

    async def _answer(
        self, method: str, context: Any, call: Callable[[], Awaitable[Reply]]
    ) -> Reply:
        """``call``'s reply, or its error as a gRPC status; counted and timed as HTTP routes
        are (route: the method's path, status: the gRPC code's name), with the request id
        (``x-request-id`` metadata) and a server span (continuing a ``traceparent``) as an
        HTTP request has."""
        started = time.perf_counter()
        route, code = SERVICE + method, grpc.StatusCode.OK
        metadata = tuple(context.invocation_metadata())
        rid = REQUEST_ID.set(request_id(_only(metadata, "x-request-id")))
        parent = propagate.extract(dict(metadata))
        with tracer.start_as_current_span(route, context=parent, kind=SpanKind.SERVER) as span:
            span.set_attributes({"rpc.system": "grpc", "request.id": REQUEST_ID.get()})
            try:
                await context.send_initial_metadata((("x-request-id", REQUEST_ID.get()),))
                self._authorise(metadata)
                return await call()
            except ServiceError as error:
                code = STATUS_CODES[error.error_type]
                self._metrics.failures.labels(route, error.error_type.value).inc()
                await context.abort(code, error.message)
                raise  # abort raises; this is never reached
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error on %s", route)
                self._metrics.failures.labels(route, ErrorType.BACKEND.value).inc()
                await context.abort(code, "internal error; see the server log")
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                REQUEST_ID.reset(rid)
                self._metrics.requests.labels(route, code.name).inc()
                elapsed = time.perf_counter() - started
                self._metrics.request_duration.labels(route).observe(elapsed)

    def _authorise(self, metadata: tuple[tuple[str, str], ...]) -> None:
        if not self._keys:
            return
        value = _only(metadata, "authorization")
        token = bearer_token(value.encode("latin-1")) if value is not None else None
        if token is None or not key_matches(token, self._keys):
            raise ServiceError(
                ErrorType.UNAUTHORIZED,
                "missing or invalid API key: send metadata 'authorization: Bearer <key>'",
            )


def _only(metadata: tuple[tuple[str, str], ...], key: str) -> str | None:
    """The value of ``key`` when the call sent it once, as HTTP's headers are read: a call
    that sends it several times gets none (a fresh request id; no key)."""
    values = [v for k, v in metadata if k == key]
    return values[0] if len(values) == 1 else None


def _parameter(parameter: Any) -> Any:
    choice = parameter.WhichOneof("parameter_choice")
    return None if choice is None else getattr(parameter, choice)


def _inputs(request: Any) -> list[protocol.InputTensor]:
    """The inputs' elements, from ``raw_input_contents`` (what tritonclient sends) or from
    each input's ``contents``."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise protocol.invalid(f"{len(raw)} raw input contents for {len(request.inputs)} inputs")
    tensors = []
    for i, tensor in enumerate(request.inputs):
        if raw:
            elements: list[Any] = (
                protocol.decode_bytes(raw[i]) if tensor.datatype == "BYTES" else [raw[i]]
            )
        else:
            elements = list(tensor.contents.bytes_contents)
        shape = list(tensor.shape)
        tensors.append(protocol.InputTensor(tensor.name, tensor.datatype, shape, elements))
    return tensors


async def start(
    service: InferenceService, host: str, port: int, max_message_bytes: int
) -> tuple[aio.Server, int]:
    """The gRPC server, started on ``host:port`` (0: any free port), and the port it took."""
    server = aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.so_reuseport", 1),  # several service processes share the port
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
