"""Request ids and log lines, from a real `python -m service`: a client's ``x-request-id`` is
echoed (or one is made), every log line of the request carries it, as text or JSON lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from pathlib import Path

import grpc
import httpx

from bench.servers import free_port
from tests.service.conftest import service_process


def stop(process: subprocess.Popen[str]) -> str:
    """Its whole output, once it has stopped on SIGTERM."""
    os.killpg(process.pid, signal.SIGTERM)
    return process.communicate(timeout=60)[0]


def test_request_ids_are_echoed_and_in_every_json_log_line(trained_bundle: Path):
    """If this fails, a request cannot be followed from the client into the logs (TEI and
    Triton users correlate by x-request-id), or JSON logs are not one object per line."""
    grpc_port = free_port()
    flags = ["--log-format", "json", "--grpc-port", str(grpc_port), "--no-warmup"]
    with service_process(trained_bundle, args=flags) as (process, url):
        given = httpx.post(f"{url}/predict", json={"inputs": "x"}, headers={"x-request-id": "r-1"})
        assert given.headers["x-request-id"] == "r-1"
        made = httpx.post(f"{url}/nowhere", json={})
        assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
        hostile = httpx.get(f"{url}/health", headers={"x-request-id": "a b" + "c" * 300})
        assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])  # not echoed
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            live = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerLive",
                request_serializer=lambda _: b"",
                response_deserializer=lambda raw: raw,
            )
            _, call = live.with_call(None, metadata=(("x-request-id", "g-7"),), timeout=10)
            assert ("x-request-id", "g-7") in call.initial_metadata()
            # Two ids are none, over gRPC as over HTTP: neither is taken for the other's.
            two = (("x-request-id", "g-1"), ("x-request-id", "g-2"))
            _, call = live.with_call(None, metadata=two, timeout=10)
            answered = dict(call.initial_metadata())["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", answered), answered
        both = httpx.get(
            f"{url}/health", headers=[("x-request-id", "h-1"), ("x-request-id", "h-2")]
        )
        assert re.fullmatch(r"[0-9a-f]{32}", both.headers["x-request-id"])
        output = stop(process)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(lines) >= 5
    assert all({"time", "level", "logger", "request_id", "message"} <= set(e) for e in lines)
    by_id = {e["request_id"]: e["message"] for e in lines if e["logger"] == "uvicorn.access"}
    assert "POST /predict" in by_id["r-1"]
    assert "POST /nowhere" in by_id[made.headers["x-request-id"]]
    assert "GET /health" in by_id[hostile.headers["x-request-id"]]


def test_text_log_lines_carry_the_request_id(trained_bundle: Path):
    with service_process(trained_bundle, args=["--no-warmup"]) as (process, url):
        httpx.get(f"{url}/health", headers={"x-request-id": "t-42"})
        output = stop(process)
    assert re.search(r'INFO: +uvicorn\.access: \[t-42\] .*"GET /health', output), output
