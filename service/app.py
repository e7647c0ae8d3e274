"""The FastAPI app: ``create_app(settings)`` wires settings, runtime, batcher, metrics, routes
and error handlers. Nothing loads at import time.

The lifespan loads the model (unless ``python -m service`` has already loaded and checked it),
resolves the execution policy for its device (``scheduler``), warms it, starts the batcher,
and on shutdown, once uvicorn has answered the requests in flight, stops the batcher, which
answers everything it still holds first.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import reload
from service.allocator import freeze_long_lived
from service.batcher import DynamicBatcher
from service.config import ADMIN_RELOAD, Settings
from service.connections import guarded
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics, multiprocess_dir
from service.middleware import ApiKeyAuth, BodyGuard, HeadAsGet, HttpMetrics, error_response
from service.pipeline import Predictor
from service.reload import Reloader, model_labels
from service.routes import STATIC_DIR, admin_router, router
from service.runtime import ModelRuntime
from service.scheduler import Policy

log = logging.getLogger("service")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s"
    )


def process_app() -> FastAPI:
    """One of ``SENTIMENT_PROCESSES`` processes: uvicorn calls this in each process it starts
    (``python -m service`` has checked the settings and the bundle before starting them); the
    lifespan loads the model."""
    settings = Settings()
    configure_logging(settings)
    guarded(settings.read_timeout_s)
    return create_app(settings)


async def _sample_every(sample: Callable[[], None], seconds: float) -> None:
    while True:
        sample()
        await asyncio.sleep(seconds)


class _Serving:
    """What the lifespan starts and stops: the model, its scheduler and batcher, the predictor
    and the reloader (and, on CUDA with several processes, the memory sampler)."""

    def __init__(self, predictor: Predictor, reloader: Reloader, metrics: Metrics) -> None:
        self.predictor = predictor
        self.reloader = reloader
        self.metrics = metrics
        self._sampler: asyncio.Task[None] | None = None
        # In a process of its own (python -m service) SIGHUP reloads the model and the heap
        # is frozen once loaded: a signal handler can only be set from the main thread, and a
        # test that runs the app in a thread of its own keeps its own garbage collection.
        self._own_process = threading.current_thread() is threading.main_thread()

    @classmethod
    async def start(
        cls, settings: Settings, runtime: ModelRuntime | None, policy: Policy, metrics: Metrics
    ) -> _Serving:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model = runtime or ModelRuntime.load(
            settings.bundle_dir, settings.device, settings.dtype, settings.runtime
        )
        scheduler = policy.resolve(
            on_cpu=model.device.type == "cpu",
            torch_threads=torch.get_num_threads(),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            runtime=settings.runtime,
        )
        if settings.warmup:
            await asyncio.to_thread(model.warmup, scheduler.warm_ups())
        batcher = DynamicBatcher(
            model.infer, scheduler, max_wait_s=settings.max_wait_ms / 1000, metrics=metrics
        )
        await batcher.start()
        predictor = Predictor(model, batcher, settings, metrics)
        serving = cls(predictor, Reloader(predictor, settings, metrics), metrics)
        metrics.model_info.labels(*model_labels(model, scheduler)).set(1)
        if model.device.type == "cuda":
            metrics.watch_cuda_memory(model.cuda_memory)
            if multiprocess_dir():
                sampler = _sample_every(metrics.sample_cuda_memory, 5.0)
                serving._sampler = asyncio.create_task(sampler)
        if serving._own_process:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, serving.reloader.on_signal)
        if reload.take_request_during_start():
            serving.reloader.on_signal()
        if serving._own_process:
            freeze_long_lived()
        card = model.card
        log.info(
            "serving %s %s on %s (%s, %s, %d inference workers)",
            *(card.name, card.version, model.device, model.precision),
            *(scheduler.runtime(model.has_onnx), scheduler.workers),
        )
        return serving

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._own_process:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.predictor.batcher.stop()  # answers everything already queued first
        self.predictor.close()
        self.metrics.process_exited()
        log.info("batcher drained and stopped")


def create_app(
    settings: Settings | None = None,
    runtime: ModelRuntime | None = None,
    policy: Policy | None = None,
) -> FastAPI:
    """The app for ``settings``, serving ``runtime`` (default: loaded from the settings'
    bundle when the lifespan starts) under ``policy`` (default: the levers' measured values;
    benchmarks and tests pass others)."""
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        serving = await _Serving.start(settings, runtime, policy or Policy(), metrics)
        app.state.predictor, app.state.reloader = serving.predictor, serving.reloader
        try:
            yield
        finally:
            app.state.predictor = app.state.reloader = None
            await serving.stop()

    app = FastAPI(
        title="Sentiment inference service",
        summary="Polarity scores for English text from an RNN trained on IMDb reviews.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.predictor = None
    app.state.reloader = None
    app.include_router(router)
    if settings.admin_reload:
        app.include_router(admin_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Route templates for the metrics (FastAPI nests an included router's routes).
    admin_routes = admin_router.routes if settings.admin_reload else []
    routes = (*app.routes, *router.routes, *admin_routes)
    paths = frozenset(getattr(r, "path", "") for r in routes) - {""}
    _register_errors(app, metrics, paths)
    _add_middleware(app, settings, metrics, paths)
    return app


def _add_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, paths: frozenset[str]
) -> None:
    """Added innermost first: metrics see every answer, CORS answers preflights before auth,
    and no body is read for a request that auth refuses."""
    app.add_middleware(HeadAsGet)
    bodies = frozenset({"/predict", "/explain"})
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, paths=bodies, metrics=metrics)
    if settings.api_keys or settings.admin_api_keys:
        # The page and its files hold nothing secret; the API calls it makes carry the key.
        app.add_middleware(
            ApiKeyAuth,
            keys=[k.get_secret_value() for k in settings.api_keys],
            exempt=[*settings.auth_exempt_paths, "/"],
            exempt_prefixes=("/static/",),
            admin_keys=[k.get_secret_value() for k in settings.admin_api_keys],
            admin_paths=[ADMIN_RELOAD],
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HttpMetrics, metrics=metrics, paths=paths)  # outermost: sees every answer


def _register_errors(app: FastAPI, metrics: Metrics, paths: frozenset[str]) -> None:
    """Every error becomes ``{"error", "error_type"}`` with the status of ``errors.STATUS``."""

    def answer(request: Request, error: ServiceError) -> JSONResponse:
        route = request.url.path if request.url.path in paths else "unmatched"
        metrics.failures.labels(route, error.error_type.value).inc()
        return error_response(error)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            detail = problems[0].get("ctx", {}).get("error", "malformed JSON")
            error = ServiceError(ErrorType.INVALID_JSON, f"body is not valid JSON: {detail}")
            return answer(request, error)
        error = ServiceError(ErrorType.VALIDATION, "; ".join(map(_describe, problems)))
        return answer(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: ErrorType.NOT_FOUND, 405: ErrorType.METHOD_NOT_ALLOWED}
        kind = kinds.get(
            exc.status_code, ErrorType.VALIDATION if exc.status_code < 500 else ErrorType.BACKEND
        )
        message = str(exc.detail)
        if exc.status_code == 400:
            # FastAPI's answer to a body its JSON parser gave up on (nested too deep, or a
            # number too long to convert), which json_invalid does not cover.
            kind, message = ErrorType.INVALID_JSON, f"body is not valid JSON: {message.lower()}"
        response = answer(request, ServiceError(kind, message))
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Logged with its traceback here; the client gets no internals.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        error = ServiceError(ErrorType.BACKEND, "internal error; see the server log")
        return answer(request, error)


def _describe(problem: dict[str, Any]) -> str:
    loc = [str(p) for p in problem.get("loc", ()) if p != "body"]
    field = ".".join(loc) or "body"
    message = str(problem.get("msg", "invalid")).removeprefix("Value error, ")
    return message if message.startswith("inputs") else f"{field}: {message}"
