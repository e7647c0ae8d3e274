"""The HTTP routes, on one ``APIRouter``. Each validates its input with a schema, hands the work
to the predictor and returns; what they need comes in through dependencies, which a test can
replace (``app.dependency_overrides``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
)
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
    SimpleToken,
    TokenizeRequest,
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


async def get_reloader(
    request: Request, predictor: PredictorDep, model: str | None = None
) -> Reloader:
    """The reloader of the served model named ``model`` (default: the default model); the
    lifespan sets them with the predictors, whose dependency answers 503 before then."""
    reloaders: dict[str, Reloader] = request.app.state.reloaders
    name = model or predictor.runtime.card.name
    if name not in reloaders:
        raise ServiceError(
            ErrorType.NOT_FOUND, f"no model {name!r} is served here; these are: {sorted(reloaders)}"
        )
    return reloaders[name]


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
# TEI answers its classifier's predictions at / too (InferenceClient(model=URL) posts there).
@router.post(
    "/", response_model=PredictResponse, responses=ERROR_RESPONSES, include_in_schema=False
)
async def predict(body: PredictRequest, request: Request, predictor: PredictorDep) -> Response:
    prediction = await predictor.predict(
        body.texts,
        truncate=body.truncate,
        function=body.function,
        top_k=body.parameters.top_k,
        disconnected=lambda: client_gone(request),
        direction=body.truncation_direction,
    )
    return JSONResponse(prediction.scores, headers=prediction.timing.headers())


@router.post(
    "/tokenize",
    response_model=list[list[SimpleToken]],
    responses=ERROR_RESPONSES,
    summary="The tokens the model reads of each text (TEI's /tokenize)",
)
async def tokenize(body: TokenizeRequest, predictor: PredictorDep) -> list[list[SimpleToken]]:
    tokenized = await predictor.tokenize(body.texts)
    return [
        [
            SimpleToken(id=int(i), text=text[a:b], special=False, start=a, stop=b)
            for i, (a, b) in zip(tokens.ids, tokens.offsets, strict=True)
        ]
        for text, tokens in zip(body.texts, tokenized, strict=True)
    ]


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
        disconnected=lambda: client_gone(request),
    )
    return JSONResponse(explained.explanations, headers=explained.timing.headers())


@admin_router.post(
    ADMIN_RELOAD,
    response_model=ReloadResponse,
    responses=ERROR_RESPONSES,
    summary="Reload a model from its bundle (?model=NAME; default: the default model), as "
    "SIGHUP does for every model (SENTIMENT_ADMIN_RELOAD)",
)
async def reload_model(reloader: ReloaderDep) -> ReloadResponse:
    reloaded = await reloader.reload()
    return ReloadResponse(
        name=reloaded.name,
        version=reloaded.version,
        previous_version=reloaded.previous_version,
        seconds=reloaded.seconds,
    )


# API docs pages with their files from the app (/static/docs/), never a CDN: they render on a
# host without internet. FastAPI's own pages are switched off in create_app.
DOCS_ASSETS = "/static/docs"


@router.get("/docs", include_in_schema=False)
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=str(request.app.openapi_url),
        title=f"{request.app.title}: API docs",
        oauth2_redirect_url="/docs/oauth2-redirect",
        swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
        swagger_favicon_url="/static/favicon.svg",
    )


@router.get("/docs/oauth2-redirect", include_in_schema=False)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get("/redoc", include_in_schema=False)
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=str(request.app.openapi_url),
        title=f"{request.app.title}: API reference",
        redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
        redoc_favicon_url="/static/favicon.svg",
        with_google_fonts=False,
    )


def docs_assets() -> Path:
    """The folder of Swagger UI's and ReDoc's files (the fastapi-offline package's)."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        raise RuntimeError("fastapi-offline is not installed: the API docs have no files")
    return Path(spec.origin).parent / "static"


@router.get("/favicon.ico", include_in_schema=False)
async def favicon() -> FileResponse:
    """The icon browsers ask for at this path whatever the page says (an SVG: every current
    browser takes it here)."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


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


async def client_gone(request: Request) -> None:
    """Returns once the client has gone away (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
