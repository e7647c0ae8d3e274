"""Traces: `python -m service --otlp-endpoint URL` sends its spans over OTLP/HTTP to a real
receiver in this test (an HTTP server decoding the protobuf export requests): one server
span per request (FastAPI's) continuing the client's W3C traceparent, with tokenise, queue and
inference children."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench.servers import free_port
from tests.service.conftest import service_process

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
GRPC_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[Any]]]:
    """An OTLP/HTTP endpoint on a free port and the spans it has received."""
    spans: list[Any] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            if self.path == "/v1/traces":
                request = ExportTraceServiceRequest.FromString(body)
                for resource in request.resource_spans:
                    for scope in resource.scope_spans:
                        spans.extend(scope.spans)
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", spans
    finally:
        server.shutdown()


def test_a_request_span_continues_the_callers_trace_with_its_stages(trained_bundle: Path):
    """If this fails, a prediction cannot be followed in a tracing backend: no spans reach the
    collector, the client's trace is not continued, or the stages are missing."""
    with otlp_receiver() as (endpoint, spans):
        grpc_port = free_port()
        flags = ["--otlp-endpoint", endpoint, "--no-warmup", "--grpc-port", str(grpc_port)]
        with service_process(trained_bundle, args=flags) as (process, url):
            traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
            answer = httpx.post(
                f"{url}/predict",
                json={"inputs": ["a fine film", "dull"]},
                headers={"traceparent": traceparent, "x-request-id": "trace-me"},
            )
            assert answer.status_code == 200
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                live = channel.unary_unary(
                    "/inference.GRPCInferenceService/ServerLive",
                    request_serializer=lambda _: b"",
                    response_deserializer=lambda raw: raw,
                )
                grpc_parent = f"00-{GRPC_TRACE_ID}-{CLIENT_SPAN}-01"
                live(None, metadata=(("traceparent", grpc_parent),), timeout=10)
            os.killpg(process.pid, signal.SIGTERM)  # its lifespan flushes the spans
            process.communicate(timeout=60)
    [request] = [s for s in spans if s.name == "POST /predict"]
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == CLIENT_SPAN
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["request.id"].string_value == "trace-me"
    children = {s.name: s for s in spans if s.parent_span_id == request.span_id}
    assert set(children) == {"tokenize", "queue", "inference"}
    assert all(s.trace_id == request.trace_id for s in children.values())
    tokenize, queue, inference = (children[n] for n in ("tokenize", "queue", "inference"))
    assert request.start_time_unix_nano <= tokenize.start_time_unix_nano
    assert tokenize.end_time_unix_nano <= queue.start_time_unix_nano + 1_000
    assert queue.end_time_unix_nano <= inference.start_time_unix_nano + 1_000
    assert inference.end_time_unix_nano <= request.end_time_unix_nano
    [call] = [s for s in spans if s.name == "/inference.GRPCInferenceService/ServerLive"]
    assert call.trace_id.hex() == GRPC_TRACE_ID  # gRPC calls continue their caller's too
    assert call.parent_span_id.hex() == CLIENT_SPAN
