"""OpenTelemetry traces, exported over OTLP/HTTP when ``otlp_endpoint`` is set (TEI's
``--otlp-endpoint``): FastAPI's own server span per HTTP request (it continues a W3C
``traceparent`` the client sent), with a child span per stage of a prediction (tokenise,
queue, inference) timed as the ``x-*-time`` headers are. Without the setting FastAPI's
telemetry is off and the stage spans are the OpenTelemetry API's no-ops."""

from __future__ import annotations

import os
import time
from typing import Any

from opentelemetry import context, trace

tracer = trace.get_tracer("service")


def exporting_to(endpoint: str) -> Any:
    """A tracer provider that batches spans to ``endpoint``'s /v1/traces, made this process's
    (``shutdown()`` sends what is left). Service name: ``OTEL_SERVICE_NAME`` or
    sentiment-service."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME", "sentiment-service")
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: name}))
    exporter = OTLPSpanExporter(endpoint=f"{endpoint.rstrip('/')}/v1/traces")
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    return provider


def fastapi_telemetry(provider: Any) -> dict[str, Any]:
    """FastAPI's ``telemetry`` setting: its request spans on ``provider`` (none: off); its
    metrics and logs stay off (the service has its own), and so do its spans per dependency
    and serialisation."""
    telemetry: dict[str, Any] = {"metrics": False, "logs": False, "operation_spans": False}
    if provider is None:
        telemetry["tracing"] = False
    else:
        telemetry["tracer_provider"] = provider
    return telemetry


class Stages:
    """Child spans of the current span for a request's stages, placed on the wall clock from
    ``time.monotonic()`` readings taken as the stages ran."""

    def __init__(self) -> None:
        # Without tracing (or for a request not sampled) the request's span does not record:
        # then nothing here costs more than this check, on every request.
        self._recording = trace.get_current_span().is_recording()
        self._parent = context.get_current()
        self._wall_ns = time.time_ns()
        self._monotonic = time.monotonic()

    def add(self, name: str, start: float, seconds: float, **attributes: Any) -> None:
        """A span ``name`` from ``start`` (a ``time.monotonic()`` reading) lasting ``seconds``."""
        if not self._recording:
            return
        begin = self._wall_ns + int((start - self._monotonic) * 1e9)
        span = tracer.start_span(name, context=self._parent, start_time=begin)
        span.set_attributes(attributes)
        span.end(end_time=begin + int(seconds * 1e9))
