"""A client that goes away before its batch runs is dropped and counted, not computed."""

from __future__ import annotations

import gc
import json
import logging
import socket
import time
from pathlib import Path

import pytest

from tests.service.conftest import serve
from tests.service.test_app import metric


def test_disconnected_client_is_dropped_and_counted(
    trained_bundle: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.ERROR, logger="asyncio")
    with serve(trained_bundle, max_wait_ms=800) as server:
        port = int(server.url.rsplit(":", 1)[1])
        body = json.dumps({"inputs": "a great film"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(
                b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            deadline = time.monotonic() + 10
            while metric(server, "sentiment_queue_depth") < 1:  # queued, waiting for company
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # The socket is closed while the text waits out the 800 ms batching window.
        deadline = time.monotonic() + 10
        while metric(server, "sentiment_failures_total", reason="client_disconnected") < 1:
            assert time.monotonic() < deadline, "the disconnect was not counted"
            time.sleep(0.05)
        time.sleep(1.0)  # past the window: had it run, a batch would be recorded
        assert metric(server, "sentiment_batch_size_count") == 0
    gc.collect()
    # The dropped request's futures are settled quietly: no asyncio error in the server log.
    assert "never retrieved" not in caplog.text
