"""The FastAPI app: ``create_app(settings)`` wires settings, runtime, batcher, metrics, routes
and error handlers. Nothing loads at import time.

The lifespan loads the model (unless ``python -m service`` has already loaded and checked it),
warms it, starts the batcher, and on shutdown, once uvicorn has answered the requests in flight,
stops the batcher, which answers everything it still holds first.
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

from service.batcher import BatchCost, DynamicBatcher
from service.config import Settings
from service.errors import ErrorType, ServiceError
from service.metrics import Metrics, multiprocess_dir
from service.middleware import ApiKeyAuth, BodyGuard, HttpMetrics, error_response
from service.pipeline import Predictor
from service.reload import Reloader, model_labels
from service.routes import STATIC_DIR, admin_router, router
from service.runtime import ForkWhenAlone, ModelRuntime, TorchThreads

# The default cost model on a CPU: `python -m bench.limit --cost-model` (docs/benchmarks.md).
CPU_STEP_TEXTS = 3.0

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
    return create_app(settings)


async def _sample_every(sample: Callable[[], None], seconds: float) -> None:
    while True:
        sample()
        await asyncio.sleep(seconds)


def create_app(settings: Settings | None = None, runtime: ModelRuntime | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model = runtime or ModelRuntime.load(settings.bundle_dir, settings.device, settings.dtype)
        workers = inference_workers(settings, model)
        if model.device.type == "cpu":
            # Side by side, each worker keeps its share of the threads (a batch on more would
            # take cores another worker's batch is using); a lone worker may take one thread
            # for a small batch and all for a large one.
            share = max(1, torch.get_num_threads() // workers)
            small = settings.small_batch_texts if workers == 1 else 0
            model.threads = TorchThreads(share, small)
        if settings.warmup:
            await asyncio.to_thread(model.warmup, (1, settings.max_batch_size))
        batcher = DynamicBatcher(
            model.infer,
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_s=settings.max_wait_ms / 1000,
            max_queue=settings.max_queue_texts,
            max_jobs=settings.explain_max_queue,
            job_share=settings.explain_share,
            workers=workers,
            cost=batch_cost(settings, model),
            metrics=metrics,
        )
        await batcher.start()
        predictor = Predictor(model, batcher, settings, metrics)
        # Only where a batch on one thread leaves a core for the fork.
        if model.device.type == "cpu" and settings.fork_directions and torch.get_num_threads() > 1:
            model.fork = ForkWhenAlone(predictor.peak_texts_in_progress)
        metrics.model_info.labels(*model_labels(model)).set(1)
        sampler = None
        if model.device.type == "cuda":
            metrics.watch_cuda_memory(model.cuda_memory)
            if multiprocess_dir():
                sampler = asyncio.create_task(_sample_every(metrics.sample_cuda_memory, 5.0))
        reloader = Reloader(predictor, settings, metrics)
        # SIGHUP reloads the model; a signal handler can only be set from the main thread
        # (python -m service), not where a test runs the app in a thread of its own.
        loop = asyncio.get_running_loop()
        on_sighup = threading.current_thread() is threading.main_thread()
        if on_sighup:
            loop.add_signal_handler(signal.SIGHUP, reloader.on_signal)
        app.state.predictor = predictor
        app.state.reloader = reloader
        log.info(
            "serving %s %s on %s (%s, %d inference workers)",
            model.card.name,
            model.card.version,
            model.device,
            model.precision,
            workers,
        )
        try:
            yield
        finally:
            if sampler is not None:
                sampler.cancel()
            if on_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            app.state.predictor = None
            app.state.reloader = None
            await batcher.stop()  # answers everything already queued first
            predictor.close()
            metrics.process_exited()
            log.info("batcher drained and stopped")

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
    # Added innermost first: metrics see every answer, CORS answers preflights before auth,
    # and no body is read for a request that auth refuses.
    bodies = frozenset({"/predict", "/explain"})
    app.add_middleware(BodyGuard, max_bytes=settings.max_body_bytes, paths=bodies)
    if settings.api_keys:
        keys = [k.get_secret_value() for k in settings.api_keys]
        # The page and its files hold nothing secret; the API calls it makes carry the key.
        exempt = [*settings.auth_exempt_paths, "/"]
        app.add_middleware(ApiKeyAuth, keys=keys, exempt=exempt, exempt_prefixes=("/static/",))
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(HttpMetrics, metrics=metrics, paths=paths)  # outermost: sees every answer
    return app


def inference_workers(settings: Settings, model: ModelRuntime) -> int:
    """The setting, else one worker per torch thread on a CPU (batches side by side, each on
    one core: docs/benchmarks.md, "CPU levers") and one on CUDA (one stream runs them)."""
    if settings.inference_workers:
        return settings.inference_workers
    return torch.get_num_threads() if model.device.type == "cpu" else 1


def batch_cost(settings: Settings, model: ModelRuntime) -> BatchCost | None:
    """The setting (0: no cost model), else 3 texts a step on a CPU (measured: on one thread
    a step costs about 3 texts' worth however few the batch holds) and none on CUDA."""
    step_texts = settings.batch_step_texts
    if step_texts is None:
        step_texts = CPU_STEP_TEXTS if model.device.type == "cpu" else 0
    return BatchCost(step_texts) if step_texts > 0 else None


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
        response = answer(request, ServiceError(kind, str(exc.detail)))
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
