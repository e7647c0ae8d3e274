"""The FastAPI app: ``create_app(settings)`` wires settings, runtime, batcher, metrics and routes.

Nothing loads at import time. The lifespan loads and warms the model, starts the batcher (and the
task that hands free memory back to the kernel), and on shutdown stops taking work, finishes
every accepted request and stops the batcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.allocator import can_release, limit_arenas, release_periodically
from service.batcher import DynamicBatcher
from service.config import Settings
from service.errors import STATUS, BundleError, ErrorType, ServiceError
from service.metrics import Metrics
from service.middleware import ApiKeyAuth, BodyGuard, HttpMetrics, error_response
from service.pipeline import Predictor
from service.runtime import ModelRuntime
from service.schemas import (
    BatchSettings,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    PredictRequest,
    PredictResponse,
    TruncationRule,
)

log = logging.getLogger("service")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in sorted(set(STATUS.values()))
}


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.malloc_arena_max:  # before the inference and torch threads exist
            limit_arenas(settings.malloc_arena_max)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        try:
            runtime = ModelRuntime.load(settings.bundle_dir, settings.device)
        except BundleError as exc:
            log.error("cannot serve: %s", exc)
            raise
        batcher = DynamicBatcher(
            runtime.infer,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue_texts,
            metrics=metrics,
        )
        if settings.warmup:
            await batcher.run_in_worker(runtime.warmup, (1, settings.max_batch_size))
        await batcher.start()
        releaser = None
        if settings.malloc_trim_interval_s and can_release():
            releaser = asyncio.create_task(
                release_periodically(settings.malloc_trim_interval_s, batcher.run_in_worker),
                name="malloc-trim",
            )
        predictor = Predictor(runtime, batcher, settings, metrics)
        metrics.model_info.labels(runtime.name, runtime.version, str(runtime.device)).set(1)
        app.state.predictor = predictor
        app.state.ready = True
        log.info("serving %s %s on %s", runtime.name, runtime.version, runtime.device)
        try:
            yield
        finally:
            app.state.ready = False
            if releaser is not None:
                releaser.cancel()
                with suppress(asyncio.CancelledError):
                    await releaser
            await batcher.stop()  # answers everything already queued first
            predictor.close()
            log.info("batcher drained and stopped")

    app = FastAPI(
        title="Sentiment inference service",
        summary="Polarity scores for English text from an RNN trained on IMDb reviews.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.ready = False
    app.state.settings = settings
    app.state.metrics = metrics
    _register_errors(app, metrics)
    _register_routes(app, settings, metrics)
    # Added innermost first: metrics see every answer, CORS answers preflights before auth,
    # and no body is read for a request that auth refuses.
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, paths=frozenset({"/predict"}))
    if settings.api_keys:
        keys = [k.get_secret_value() for k in settings.api_keys]
        app.add_middleware(ApiKeyAuth, keys=keys, exempt=settings.auth_exempt_paths)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    paths = frozenset(getattr(route, "path", "") for route in app.routes)
    app.add_middleware(HttpMetrics, metrics=metrics, paths=paths)  # outermost: sees every answer
    return app


def _register_routes(app: FastAPI, settings: Settings, metrics: Metrics) -> None:
    @app.post(
        "/predict",
        response_model=PredictResponse,
        responses=ERROR_RESPONSES,
        summary="Score the polarity of one text or a list of texts",
    )
    async def predict(body: PredictRequest, request: Request) -> Response:
        predictor = _predictor(request)
        prediction = await predictor.predict(
            body.texts,
            truncate=body.truncate,
            function=body.parameters.function_to_apply,
            top_k=body.parameters.top_k,
            disconnected=lambda: _disconnect(request),
        )
        content = prediction.scores[0] if isinstance(body.inputs, str) else prediction.scores
        total_ms = (prediction.tokenization_s + prediction.queue_s + prediction.inference_s) * 1e3
        return JSONResponse(
            content,
            headers={
                "x-tokenization-time": f"{prediction.tokenization_s * 1e3:.3f}",
                "x-queue-time": f"{prediction.queue_s * 1e3:.3f}",
                "x-inference-time": f"{prediction.inference_s * 1e3:.3f}",
                "x-total-time": f"{total_ms:.3f}",
                "x-compute-tokens": str(prediction.tokens),
            },
        )

    @app.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
    async def health() -> HealthResponse:
        return HealthResponse(status="ok")

    @app.get(
        "/ready",
        response_model=HealthResponse,
        responses={503: {"model": ErrorResponse}},
        summary="Readiness: the model is loaded and warmed, and the service is not draining",
    )
    async def ready(request: Request) -> HealthResponse:
        if not request.app.state.ready or request.app.state.predictor.draining:
            raise ServiceError(ErrorType.UNAVAILABLE, "the model is not ready or is draining")
        return HealthResponse(status="ready")

    @app.get(
        "/info",
        response_model=InfoResponse,
        responses={503: {"model": ErrorResponse}},
        summary="The served model and the batching settings",
    )
    async def info(request: Request) -> InfoResponse:
        described = _predictor(request).runtime.describe()
        return InfoResponse(
            model_name=described["name"],
            model_version=described["version"],
            device=described["device"],
            max_length=described["max_length"],
            truncation=TruncationRule(**described["truncation"]),
            labels=described["labels"],
            temperature=described["temperature"],
            parameters=described["parameters"],
            architecture=described["architecture"],
            metrics=described["metrics"],
            batching=BatchSettings(
                **settings.model_dump(
                    include={
                        "max_batch_size",
                        "max_batch_tokens",
                        "max_wait_ms",
                        "max_queue_texts",
                        "max_inputs_per_request",
                        "request_timeout_s",
                        "auto_truncate",
                    }
                )
            ),
        )

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text exposition format)",
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _predictor(request: Request) -> Predictor:
    if not request.app.state.ready:
        raise ServiceError(ErrorType.UNAVAILABLE, "the model is not ready")
    predictor: Predictor = request.app.state.predictor
    return predictor


async def _disconnect(request: Request) -> None:
    """Returns once the client has gone away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _register_errors(app: FastAPI, metrics: Metrics) -> None:
    def answer(error: ServiceError) -> JSONResponse:
        metrics.failures.labels(error.error_type.value).inc()
        return error_response(error)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return answer(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = problems[0].get("ctx", {}).get("error", "malformed JSON")
            return answer(ServiceError(ErrorType.INVALID_JSON, f"body is not valid JSON: {detail}"))
        return answer(ServiceError(ErrorType.VALIDATION, "; ".join(map(_describe, problems))))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: ErrorType.NOT_FOUND, 405: ErrorType.METHOD_NOT_ALLOWED}
        kind = kinds.get(
            exc.status_code, ErrorType.VALIDATION if exc.status_code < 500 else ErrorType.BACKEND
        )
        response = answer(ServiceError(kind, str(exc.detail)))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(ServiceError(ErrorType.BACKEND, "internal error; see the server log"))


def _describe(problem: dict[str, Any]) -> str:
    loc = [str(p) for p in problem.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
    return message if message.startswith("inputs") else f"{field}: {message}"
