"""`python -m service` takes every setting as a flag too (pydantic-settings' command line):
flags over environment, ``--help`` lists them, a bad flag is one line and exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bench.servers import answers, free_port, wait_until_ready
from service.config import Settings
from tests.service.conftest import service_process, start_service


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env={**os.environ, "SENTIMENT_PORT": "0", "SENTIMENT_GRPC_PORT": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_port_flag_wins_over_the_variable(trained_bundle: Path):
    """If this fails, `python -m service --port 19000` ignores its flag (as it did: it served
    on SENTIMENT_PORT or 8000)."""
    flag_port = free_port()
    process, variable_url = start_service(trained_bundle, args=["--port", str(flag_port)])
    try:
        url = f"http://127.0.0.1:{flag_port}"
        wait_until_ready(
            lambda: answers("GET", f"{url}/ready"),
            lambda: process.poll() is None,
            timeout_s=60,
            what="python -m service --port",
        )
        answer = httpx.post(f"{url}/predict", json={"inputs": "a fine film"}, timeout=10)
        assert answer.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{variable_url}/health", timeout=2)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()


def test_help_lists_every_setting_as_a_flag_and_exits_0():
    result = _run("--help")
    assert result.returncode == 0, result.stderr
    for name in Settings.model_fields:
        assert f"--{name.replace('_', '-')}" in result.stdout, name
    assert "--no-warmup" in result.stdout  # booleans as --flag / --no-flag
    assert "SENTIMENT_MAX_BATCH_SIZE" in result.stdout  # says where the variables fit


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--max-bach-size", "3"], "unrecognized arguments: --max-bach-size 3"),
        (["--port", "eighty"], "--port / SENTIMENT_PORT: Input should be a valid integer"),
        (["--max-batch-size", "0"], "--max-batch-size / SENTIMENT_MAX_BATCH_SIZE: Input should"),
        (["--dtype", "float64"], "--dtype / SENTIMENT_DTYPE: Input should be 'auto'"),
    ],
    ids=["unknown", "not-a-number", "out-of-range", "not-a-choice"],
)
def test_a_bad_flag_is_one_line_and_exit_status_2(args: list[str], says: str):
    """If this fails, a mistyped flag is ignored or buried in argparse's usage text."""
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert says in lines[0]


@pytest.mark.slow
def test_flags_reach_every_process(trained_bundle: Path):
    """If this fails, with --processes 2 the processes uvicorn starts (which read their
    settings afresh) serve without the flags: here a limit of one text per request."""
    flags = ["--processes", "2", "--max-inputs-per-request", "1", "--no-warmup"]
    with service_process(trained_bundle, args=flags) as (_, url):
        for _ in range(8):  # new connections: the kernel spreads them over both processes
            with httpx.Client(base_url=url, timeout=10) as client:
                answer = client.post("/predict", json={"inputs": ["one", "two"]})
            assert answer.status_code == 413, answer.text
            assert answer.json()["error_type"] == "too_many_inputs", answer.text
