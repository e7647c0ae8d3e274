"""The HTTP routes, on one ``APIRouter``. Each validates its input with a schema, hands the work
to the predictor and returns; what they need comes in through dependencies, which a test can
replace (``app.dependency_overrides``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.config import ADMIN_RELOAD, Settings
from service.errors import STATUS, ErrorType, ServiceError
from service.metrics import Metrics
from service.pipeline import Predictor
from service.reload import Reloader
from service.schemas import (
    BatchSettings,
    ErrorResponse,
    ExplainRequest,
    ExplainResponse,
    ExplainSettings,
    HealthResponse,
    InfoResponse,
    PredictRequest,
    PredictResponse,
    ReloadResponse,
    SchedulerPolicy,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in sorted(set(STATUS.values()))
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {503: {"model": ErrorResponse}}
# The web page: static files, no build step, nothing from another origin.
STATIC_DIR = Path(__file__).parent / "static"


# The dependencies are coroutines: FastAPI runs a plain `def` one in its thread pool, a thread
# hop per request that cost 12% of the throughput at saturation (docs/benchmarks.md).
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def get_predictor(request: Request) -> Predictor:
    """The predictor once the lifespan has loaded and warmed the model; 503 before."""
    predictor: Predictor | None = request.app.state.predictor
    if predictor is None:
        raise ServiceError(ErrorType.UNAVAILABLE, "the model is not loaded yet", retry_after=1)
    return predictor


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]


async def get_reloader(request: Request, _: PredictorDep) -> Reloader:
    """The reloader; the lifespan sets it with the predictor, whose dependency answers 503
    before then."""
    reloader: Reloader = request.app.state.reloader
    return reloader


ReloaderDep = Annotated[Reloader, Depends(get_reloader)]

router = APIRouter()
# Included only when settings.admin_reload is on: otherwise the path does not exist (404) and
# the OpenAPI schema does not show it.
admin_router = APIRouter()


@router.post(
    "/predict",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    summary="Score the polarity of one text or a list of texts",
)
async def predict(body: PredictRequest, request: Request, predictor: PredictorDep) -> Response:
    prediction = await predictor.predict(
        body.texts,
        truncate=body.truncate,
        function=body.parameters.function_to_apply,
        top_k=body.parameters.top_k,
        disconnected=lambda: _client_gone(request),
    )
    return JSONResponse(prediction.scores, headers=prediction.timing.headers())


@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses=ERROR_RESPONSES,
    summary="Explain the polarity of one text or a list of texts: token attributions "
    "(integrated gradients) and a score per sentence or clause",
)
async def explain(body: ExplainRequest, request: Request, predictor: PredictorDep) -> Response:
    explained = await predictor.explain(
        body.texts,
        truncate=body.truncate,
        steps=body.parameters.steps,
        disconnected=lambda: _client_gone(request),
    )
    return JSONResponse(explained.explanations, headers=explained.timing.headers())


@admin_router.post(
    ADMIN_RELOAD,
    response_model=ReloadResponse,
    responses=ERROR_RESPONSES,
    summary="Reload the model from its bundle, as SIGHUP does (SENTIMENT_ADMIN_RELOAD)",
)
async def reload_model(reloader: ReloaderDep) -> ReloadResponse:
    reloaded = await reloader.reload()
    return ReloadResponse(
        name=reloaded.name,
        version=reloaded.version,
        previous_version=reloaded.previous_version,
        seconds=reloaded.seconds,
    )


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    """The web page (``static/``): it calls /predict and /explain as any client would."""
    return FileResponse(STATIC_DIR / "index.html")


@router.get("/health", response_model=HealthResponse, summary="Liveness: the process answers")
async def health() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/ready",
    response_model=HealthResponse,
    responses=UNAVAILABLE,
    summary="Readiness: the model is loaded and warmed",
)
async def ready(_: PredictorDep) -> HealthResponse:
    return HealthResponse(status="ready")


@router.get(
    "/info",
    response_model=InfoResponse,
    responses=UNAVAILABLE,
    summary="The served model (its card), the batching settings and how batches run",
)
async def info(predictor: PredictorDep, settings: SettingsDep) -> InfoResponse:
    runtime = predictor.runtime
    return InfoResponse(
        model=runtime.card.summary(),
        device=str(runtime.device),
        dtype=runtime.precision,
        cuda_memory=runtime.cuda_memory(),
        batching=BatchSettings.model_validate(settings, from_attributes=True),
        scheduler=SchedulerPolicy.model_validate(
            predictor.batcher.scheduler.describe(runtime.can_fork, runtime.has_onnx)
        ),
        explanations=ExplainSettings.model_validate(settings, from_attributes=True),
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics (text exposition format)",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def prometheus_metrics(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.exposition_registry()), media_type=CONTENT_TYPE_LATEST)


async def _client_gone(request: Request) -> None:
    """Returns once the client has gone away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
