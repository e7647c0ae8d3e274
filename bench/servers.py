"""Start the servers under test as child processes on 127.0.0.1 and stop them again: ours
(batched or not) and the peers, LitServe and TorchServe, each from its own virtual environment.

A server counts as ready when it answers a real prediction request with 200. ``free_port`` and
``wait_until_ready`` are also the tests' helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import yaml

from service.bundle import CARD_FILE, INT8_FILE, MODEL_FILE, ONNX_FILE, TOKENIZER_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(__file__).with_name("peers")
# What the peer server needs, and what ``service.runtime`` (bundle reading included) needs.
RUNTIME_PACKAGES = ["numpy", "tokenizers", "pydantic", "onnxruntime"]
PEER_PACKAGES = {
    "litserve": ["litserve", *RUNTIME_PACKAGES],
    "torchserve": ["torchserve", "torch-model-archiver", *RUNTIME_PACKAGES],
}


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    name: str
    url: str  # the prediction endpoint
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (TorchServe's work happens in them)."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return total


def maps_jemalloc(pid: int) -> bool:
    """Whether the process runs on jemalloc (the service does where it is installed)."""
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def _children(pid: int) -> list[int]:
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids] + [g for k in kids for g in _children(int(k))]


def wait_until_ready(
    ready: Callable[[], bool], alive: Callable[[], bool], timeout_s: float, what: str
) -> None:
    """Poll ``ready`` until it holds; ``ServerError`` once ``alive`` does not, or after
    ``timeout_s``. The one readiness wait of the benchmark and the tests."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not alive():
            raise ServerError(f"{what} stopped before it was ready")
        if time.monotonic() > deadline:
            raise ServerError(f"{what} not ready after {timeout_s:.0f} s")
        time.sleep(0.1)


def answers(method: str, url: str, statuses: tuple[int, ...] = (200,), **kwargs: Any) -> bool:
    """True if ``url`` answers with one of ``statuses``; False otherwise or if it does not."""
    try:
        return httpx.request(method, url, timeout=5, **kwargs).status_code in statuses
    except httpx.TransportError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with contextlib.suppress(ProcessLookupError):  # children (TorchServe's workers)
        os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def _serve(
    name: str, command: list[str], url: str, env: dict[str, str], workdir: Path, probe: bytes
) -> Iterator[Server]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command,
            env={**os.environ, **env},
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # one process group, stopped as a whole
        )
    server = Server(name, url, process, log)
    try:
        headers = {"content-type": "application/json"}
        wait_until_ready(
            lambda: answers("POST", url, content=probe, headers=headers),
            lambda: process.poll() is None,
            timeout_s=240,
            what=f"{name} (log: {log})",
        )
        yield server
    finally:
        _stop(process)


@contextmanager
def ours(
    bundle: Path,
    workdir: Path,
    probe: bytes,
    max_batch_size: int = 64,
    threads: int | None = None,
    name: str = "ours",
    extra_env: dict[str, str] | None = None,
    source: Path | None = None,
    policy: Sequence[str] = (),
) -> Iterator[Server]:
    """``python -m service`` as its users start it. ``source``: another checkout whose
    ``service`` package to run (it goes first on the import path). ``policy``: the
    scheduler's levers as ``python -m bench.serve`` takes them (that runs instead)."""
    port = free_port()
    env = {
        "SENTIMENT_MODEL_DIR": str(bundle.parent.resolve()),
        "SENTIMENT_MODEL_NAME": bundle.name,
        "SENTIMENT_PORT": str(port),
        "SENTIMENT_LOG_LEVEL": "warning",
        "SENTIMENT_AUTO_TRUNCATE": "true",  # real reviews run past max_length
        "SENTIMENT_MAX_BATCH_SIZE": str(max_batch_size),
    }
    # The benchmarks speak HTTP: a gRPC port held elsewhere must not stop a sitting (an older
    # checkout, compared against, has no such setting and refuses the variable).
    if "grpc_port" in ((source or REPO_ROOT) / "service" / "config.py").read_text():
        env["SENTIMENT_GRPC_PORT"] = "-1"
    if threads:
        env["SENTIMENT_TORCH_THREADS"] = str(threads)
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    env.update(extra_env or {})
    command = (
        [sys.executable, "-m", "bench.serve", *policy]
        if policy
        else [sys.executable, "-m", "service"]
    )
    with _serve(name, command, f"http://127.0.0.1:{port}/predict", env, workdir, probe) as s:
        yield s


def gpu_compose_env() -> dict[str, str]:
    """The service settings ``docker-compose.gpu.yml`` gives the api container (batch and token
    budget, queue, tokenising threads, processes): a GPU sitting serves ours with exactly these,
    so its figures are the deployment's."""
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.gpu.yml").read_text())
    environment = compose["services"]["api"]["environment"]
    return {k: str(v) for k, v in environment.items() if k != "SENTIMENT_DEVICE"}


def peer_python(venv_root: Path, peer: str, torch_pip_args: list[str]) -> Path:
    """The peer's own virtual environment, created on first use with the same torch version
    as ours (``torch_pip_args`` say where pip finds a CPU build)."""
    venv = venv_root / peer
    marker = venv / ".bench-installed"
    python = venv / "bin" / "python"
    torch_spec = "torch==" + torch.__version__.split("+")[0]
    wanted = " ".join([torch_spec, *PEER_PACKAGES[peer]]) + "\n"
    if marker.exists() and marker.read_text() == wanted:
        return python
    shutil.rmtree(venv, ignore_errors=True)
    print(f"creating {venv} (pip install {' '.join(PEER_PACKAGES[peer])})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, torch_spec, *torch_pip_args], check=True)
    subprocess.run([*pip, *PEER_PACKAGES[peer]], check=True)
    marker.write_text(wanted)
    return python


def _peer_env(
    bundle: Path,
    threads: int | None,
    device: str,
    dtype: str,
    workers: int = 1,
    runtime: str = "torchscript",
) -> dict[str, str]:
    env = {"BENCH_REPO_ROOT": str(REPO_ROOT), "BENCH_BUNDLE": str(bundle.resolve())}
    env["BENCH_WORKERS"] = str(workers)
    env |= {"BENCH_DEVICE": device, "BENCH_DTYPE": dtype, "BENCH_RUNTIME": runtime}
    if threads:
        env["BENCH_TORCH_THREADS"] = str(threads)
    return env


@contextmanager
def litserve(
    python: Path,
    bundle: Path,
    workdir: Path,
    probe: bytes,
    max_batch_size: int,
    wait_s: float,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    workers: int = 1,
    runtime: str = "torchscript",
) -> Iterator[Server]:
    """LitServe with ``workers`` inference processes (``workers_per_device``), running the
    model on ``runtime`` (torchscript or onnx)."""
    port = free_port()
    script = str(PEERS / "litserve_server.py")
    command = [str(python.absolute()), script, str(port), str(max_batch_size), str(wait_s)]
    url = f"http://127.0.0.1:{port}/predict"
    env = _peer_env(bundle, threads, device, dtype, workers, runtime)
    with _serve("litserve", command, url, env, workdir, probe) as server:
        yield server


@contextmanager
def torchserve(
    python: Path,
    bundle: Path,
    workdir: Path,
    probe: bytes,
    max_batch_size: int,
    wait_ms: int,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    workers: int = 1,
    runtime: str = "torchscript",
) -> Iterator[Server]:
    """TorchServe with ``workers`` Python backend workers for the model, running it on
    ``runtime`` (torchscript or onnx)."""
    # Absolute paths: TorchServe runs in workdir. (absolute(), not resolve(): the venv's python
    # is a symlink that must stay inside the venv.)
    bin_dir, workdir, bundle = python.absolute().parent, workdir.absolute(), bundle.absolute()
    store = workdir / "model-store"
    store.mkdir(parents=True, exist_ok=True)
    (workdir / "model-config.yaml").write_text(
        f"minWorkers: {workers}\nmaxWorkers: {workers}\nbatchSize: {max_batch_size}\n"
        f"maxBatchDelay: {wait_ms}\nresponseTimeout: 120\n"
    )
    # The archive's folder is the bundle again: the int8 variant and the ONNX graph travel with
    # it, if made.
    extras = [
        f for f in (TOKENIZER_FILE, CARD_FILE, INT8_FILE, ONNX_FILE) if (bundle / f).is_file()
    ]
    subprocess.run(
        [
            str(bin_dir / "torch-model-archiver"),
            "--model-name=sentiment",
            "--version=1.0",
            f"--serialized-file={bundle / MODEL_FILE}",
            f"--handler={PEERS / 'torchserve_handler.py'}",
            "--extra-files=" + ",".join(str(bundle / f) for f in extras),
            f"--config-file={workdir / 'model-config.yaml'}",
            f"--export-path={store}",
            "--force",
        ],
        check=True,
    )
    port, management, metrics = free_port(), free_port(), free_port()
    config = {
        "inference_address": f"http://127.0.0.1:{port}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "disable_token_authorization": "true",
        "default_workers_per_model": str(workers),
        "job_queue_size": "1000",
        "install_py_dep_per_model": "false",
        "load_models": "sentiment.mar",
        "model_store": str(store),
        "vmargs": "-Xmx1g -XX:+UseContainerSupport",
    }
    (workdir / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in config.items()))
    command = [
        str(bin_dir / "torchserve"),
        "--start",
        "--foreground",
        "--ncs",
        f"--ts-config={workdir / 'config.properties'}",
        "--disable-token-auth",
    ]
    env = {
        **_peer_env(bundle, threads, device, dtype, workers, runtime),
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
    }
    url = f"http://127.0.0.1:{port}/predictions/sentiment"
    with _serve("torchserve", command, url, env, workdir, probe) as server:
        yield server


def describe_peer(python: Path, package: str) -> str:
    version = subprocess.run(
        [str(python), "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True,
        text=True,
    )
    return f"{package} {version.stdout.strip() or '?'}"
