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
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import logs, reload, tracing
from service.allocator import freeze_long_lived
from service.batcher import DynamicBatcher
from service.bundle import BundleError
from service.config import ADMIN_RELOAD, Settings
from service.connections import guarded
from service.errors import ErrorType, ServiceError
from service.logs import RequestId
from service.metrics import Metrics, multiprocess_dir
from service.middleware import (
    ApiKeyAuth,
    BodyGuard,
    HeadAsGet,
    HttpMetrics,
    error_response,
    route_label,
)
from service.oip import rest as oip_rest
from service.pipeline import Predictor
from service.reload import Reloader, model_labels
from service.routes import DOCS_ASSETS, STATIC_DIR, admin_router, docs_assets, router
from service.runtime import ModelRuntime
from service.scheduler import Policy

log = logging.getLogger("service")


def configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)


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
    """What the lifespan starts and stops: the models, their scheduler and one batcher (whose
    batches never mix models), a predictor and a reloader per model, the default model's
    first (and, on CUDA with several processes, the memory sampler)."""

    def __init__(
        self, predictors: dict[str, Predictor], reloaders: list[Reloader], metrics: Metrics
    ) -> None:
        self.predictors = predictors  # by card name, the default model's first
        self.reloaders = reloaders
        self.metrics = metrics
        self._sampler: asyncio.Task[None] | None = None
        # In a process of its own (python -m service) SIGHUP reloads the models and the heap
        # is frozen once loaded: a signal handler can only be set from the main thread, and a
        # test that runs the app in a thread of its own keeps its own garbage collection.
        self._own_process = threading.current_thread() is threading.main_thread()

    @property
    def predictor(self) -> Predictor:
        """The default model's (``model_name``): /predict, /explain and the page use it."""
        return next(iter(self.predictors.values()))

    @classmethod
    async def start(
        cls, settings: Settings, runtime: ModelRuntime | None, policy: Policy, metrics: Metrics
    ) -> _Serving:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        folders = settings.bundle_dirs
        model = runtime or _load(folders[0], settings)
        scheduler = policy.resolve(
            on_cpu=model.device.type == "cpu",
            torch_threads=torch.get_num_threads(),
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            runtime=settings.runtime,
        )
        models = [model, *[await asyncio.to_thread(_load, f, settings) for f in folders[1:]]]
        if settings.warmup:
            for each in models:
                await asyncio.to_thread(each.warmup, scheduler.warm_ups())
        batcher = DynamicBatcher(
            model.infer, scheduler, max_wait_s=settings.max_wait_ms / 1000, metrics=metrics
        )
        await batcher.start()
        predictors, reloaders = {}, []
        for folder, each in zip(folders, models, strict=True):
            if each.card.name in predictors:
                await batcher.stop()
                raise BundleError(f"{folder}: another bundle served is named {each.card.name!r}")
            predictor = Predictor(each, batcher, settings, metrics)
            predictors[each.card.name] = predictor
            reloaders.append(Reloader(predictor, folder, settings, metrics))
            metrics.model_info.labels(*model_labels(each, scheduler)).set(1)
            log.info(
                "serving %s %s on %s (%s, %s, %d inference workers)",
                *(each.card.name, each.card.version, each.device, each.precision),
                *(scheduler.runtime(each.has_onnx), scheduler.workers),
            )
        return cls(predictors, reloaders, metrics)._started(model)

    def _started(self, model: ModelRuntime) -> _Serving:
        if model.device.type == "cuda":
            self.metrics.watch_cuda_memory(model.cuda_memory)
            if multiprocess_dir():
                sampler = _sample_every(self.metrics.sample_cuda_memory, 5.0)
                self._sampler = asyncio.create_task(sampler)
        if self._own_process:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_all)
        if reload.take_request_during_start():
            self.reload_all()
        if self._own_process:
            freeze_long_lived()
        return self

    def reload_all(self) -> None:
        """SIGHUP: every model reloads from its bundle."""
        for reloader in self.reloaders:
            reloader.on_signal()

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._own_process:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await self.predictor.batcher.stop()  # answers everything already queued first
        for predictor in self.predictors.values():
            predictor.close()
        self.metrics.process_exited()
        log.info("batcher drained and stopped")


def _load(folder: Path, settings: Settings) -> ModelRuntime:
    return ModelRuntime.load(folder, settings.device, settings.dtype, settings.runtime)


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
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Metrics]]:
        serving = await _Serving.start(settings, runtime, policy or Policy(), metrics)
        app.state.predictor = serving.predictor
        app.state.predictors = serving.predictors
        app.state.reloaders = {r.predictor.runtime.card.name: r for r in serving.reloaders}
        grpc = await _start_grpc(app, settings, metrics) if settings.grpc_port >= 0 else None
        try:
            # The lifespan's state reaches uvicorn's connections too: they count the requests
            # they refuse before any route (431, 408) in the failures by reason.
            yield {"metrics": metrics}
        finally:
            if grpc is not None:  # its calls in flight finish first, as HTTP's have
                await grpc.stop(grace=max(settings.request_timeout_s, 1.0))
            app.state.predictor, app.state.predictors, app.state.reloaders = None, {}, {}
            await serving.stop()
            if traces is not None:
                traces.shutdown()  # sends the spans still batched

    traces = tracing.exporting_to(settings.otlp_endpoint) if settings.otlp_endpoint else None
    app = FastAPI(
        title="Sentiment inference service",
        telemetry=tracing.fastapi_telemetry(traces),  # type: ignore[arg-type]
        summary="Polarity scores for English text from an RNN trained on IMDb reviews.",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served by routes.py with the files from the app, not a CDN
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.predictor = None
    app.state.predictors = {}  # by name, once the lifespan has loaded them
    app.state.reloaders = {}
    paths = _add_routes(app, settings)
    _register_errors(app, metrics, paths)
    _add_middleware(app, settings, metrics, paths)
    return app


def _add_routes(app: FastAPI, settings: Settings) -> frozenset[str]:
    """The routers and static files; returns the route templates (for the metrics' labels)."""
    app.include_router(router)
    app.include_router(oip_rest.router)
    if settings.admin_reload:
        app.include_router(admin_router)
    # Before /static, which would otherwise take its paths.
    app.mount(DOCS_ASSETS, StaticFiles(directory=docs_assets()), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # FastAPI nests an included router's routes.
    admin_routes = admin_router.routes if settings.admin_reload else []
    routes = (*app.routes, *router.routes, *oip_rest.router.routes, *admin_routes)
    return frozenset(getattr(r, "path", "") for r in routes) - {""}


async def _start_grpc(app: FastAPI, settings: Settings, metrics: Metrics) -> Any:
    """The Open Inference Protocol's gRPC service beside the HTTP app, over its predictor;
    ``app.state.grpc_port`` is the port it took. Imported here, not at the top: its messages
    join protobuf's process-wide registry under the protocol's names (package ``inference``),
    which a client's own copy (tritonclient's) in the same process would clash with."""
    from service.oip import grpc_server

    keys = [k.get_secret_value() for k in (*settings.api_keys, *settings.admin_api_keys)]
    service = grpc_server.InferenceService(lambda: app.state.predictors, metrics, keys)
    server, app.state.grpc_port = await grpc_server.start(
        service, settings.host, settings.grpc_port, settings.max_body_bytes
    )
    log.info("Open Inference Protocol over gRPC on %s:%d", settings.host, app.state.grpc_port)
    return server


def _add_middleware(
    app: FastAPI, settings: Settings, metrics: Metrics, paths: frozenset[str]
) -> None:
    """Added innermost first: metrics see every answer, CORS answers preflights before auth,
    and no body is read for a request that auth refuses."""
    app.add_middleware(HeadAsGet)
    bodies = frozenset({"/predict", "/", "/explain", "/tokenize"})
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        paths=bodies,
        raw_paths=oip_rest.INFER_PATH,
        metrics=metrics,
        routes=paths,
    )
    if settings.api_keys or settings.admin_api_keys:
        # The page and its files hold nothing secret; the API calls it makes carry the key.
        app.add_middleware(
            ApiKeyAuth,
            metrics=metrics,
            paths=paths,
            keys=[k.get_secret_value() for k in settings.api_keys],
            exempt=settings.auth_exempt_paths,
            exempt_reads=["/", "/favicon.ico"],  # the page, not POST / (TEI's predictions)
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
    app.add_middleware(HttpMetrics, metrics=metrics, paths=paths)  # sees every answer
    app.add_middleware(RequestId)  # outermost: every answer and log line carries the id


def _register_errors(app: FastAPI, metrics: Metrics, paths: frozenset[str]) -> None:
    """Every error becomes ``{"error", "error_type"}`` with the status of ``errors.STATUS``."""

    def answer(request: Request, error: ServiceError) -> JSONResponse:
        route = route_label(request.url.path, paths)
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
