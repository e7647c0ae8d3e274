"""A real uvicorn server on 127.0.0.1 serving the tiny bundle that the training CLI exports:
in a thread of the test process, or as its own `python -m service` process."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from bench.servers import ServerError, answers, free_port, wait_until_ready
from service.app import create_app
from service.config import Settings
from service.connections import guarded
from service.scheduler import Policy
from training.tokenizer import train_tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "imdb-bigru"


class RunningServer:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, settings: Settings):
        self.server = server
        self.thread = thread
        self.settings = settings
        self.url = f"http://127.0.0.1:{settings.port}"

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def async_client(self, **kwargs: Any) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        return httpx.AsyncClient(base_url=self.url, timeout=60, limits=limits, **kwargs)


@contextmanager
def serve(bundle: Path, policy: Policy | None = None, **overrides: Any) -> Iterator[RunningServer]:
    """``create_app`` under a real uvicorn in a thread of the test process, once ready, with
    the settings' ``overrides`` and the scheduler's ``policy`` (default: the service's)."""
    # No gRPC in the test process: its messages would clash with tritonclient's there
    # (service/app.py, _start_grpc); tests/service/test_oip.py calls it in a served process.
    overrides.setdefault("grpc_port", -1)
    settings = Settings(
        model_dir=bundle.parent, model_name=bundle.name, port=free_port(), **overrides
    )
    config = uvicorn.Config(
        create_app(settings, policy=policy),
        host="127.0.0.1",
        port=settings.port,
        log_level="warning",
        http=guarded(settings.read_timeout_s),  # the connection bounds python -m service has
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    running = RunningServer(server, thread, settings)
    try:
        # uvicorn listens once the lifespan has loaded and warmed the model: any answer means
        # ready, 401 included (a test may guard every path with an API key).
        wait_until_ready(
            lambda: answers("GET", f"{running.url}/ready", statuses=(200, 401)),
            thread.is_alive,
            timeout_s=60,
            what="the test server",
        )
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def corrupt_model_file(bundle: Path) -> None:
    (bundle / "model.pt").write_bytes(b"PK\x03\x04 not really a zip")


def oversize_tokenizer(bundle: Path) -> None:
    """A tokenizer with more ids than the bundle's embedding table has rows."""
    words = " ".join(f"word{i}" for i in range(5000))
    train_tokenizer([words], vocab_size=10_000, min_count=1).save(str(bundle / "tokenizer.json"))


def start_service(
    bundle: Path, open_files: int | None = None, args: Sequence[str] = (), **env: str
) -> tuple[subprocess.Popen[str], str]:
    """`python -m service` started on a free port with extra environment (not yet ready): the
    process (its output merged into stdout) and its URL. ``open_files``: the soft limit on
    open files it starts with (the hard one stays); ``args``: its command-line flags."""

    def limit_files() -> None:
        if open_files is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    port = free_port()
    env = {
        **os.environ,
        "SENTIMENT_MODEL_DIR": str(bundle.parent),
        "SENTIMENT_MODEL_NAME": bundle.name,
        "SENTIMENT_PORT": str(port),
        "SENTIMENT_GRPC_PORT": "0",  # a free port: never a clash with another test's
        **env,
    }
    process = LoggedProcess(
        [sys.executable, "-m", "service", *args],
        env=env,
        start_new_session=True,  # its own process group: what it started goes with it
        preexec_fn=limit_files,
    )
    return process, f"http://127.0.0.1:{port}"


class LoggedProcess(subprocess.Popen[str]):
    """A process whose output (stdout and stderr) goes to a file, which ``communicate`` reads
    once it has exited. Not a pipe: one nobody reads while a test runs fills up (64 KiB of
    access log), and the server's next log line, and with it every request, blocks."""

    def __init__(self, command: list[str], **kwargs: Any) -> None:
        handle, name = tempfile.mkstemp(prefix="service-", suffix=".log")
        os.close(handle)
        self._log = Path(name)
        with self._log.open("ab") as log:  # the child keeps its own descriptor
            super().__init__(command, stdout=log, stderr=subprocess.STDOUT, text=True, **kwargs)

    def communicate(
        self, input: str | None = None, timeout: float | None = None
    ) -> tuple[str, str]:
        self.wait(timeout)
        output = self._log.read_text(errors="replace") if self._log.exists() else ""
        self._log.unlink(missing_ok=True)
        return output, ""


@contextmanager
def service_process(
    bundle: Path, open_files: int | None = None, args: Sequence[str] = (), **env: str
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`python -m service` (``start_service``), once it is ready. Killed on exit if still
    running."""
    process, url = start_service(bundle, open_files, args, **env)
    try:
        try:
            wait_until_ready(
                lambda: answers("GET", f"{url}/ready"),
                lambda: process.poll() is None,
                timeout_s=60,
                what="python -m service",
            )
        except ServerError as exc:
            output = process.communicate(timeout=10)[0] if process.poll() is not None else ""
            raise ServerError(f"{exc}\n{output}") from None
        yield process, url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()


@pytest.fixture(scope="module")
def server(trained_bundle: Path) -> Iterator[RunningServer]:
    with serve(trained_bundle) as running:
        yield running


@pytest.fixture(scope="module")
def shipped() -> Iterator[RunningServer]:
    """The shipped model served in-process (small batches: these tests send a few texts)."""
    with serve(SHIPPED, max_batch_size=8) as running:
        yield running
