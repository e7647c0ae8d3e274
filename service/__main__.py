"""``python -m service``: check the settings, load and check the bundle, then serve it with
uvicorn. Anything that stops it before serving is one line on stderr and a non-zero exit:
2 for invalid settings, 3 for a bundle that cannot be served.

With ``SENTIMENT_PROCESSES`` > 1 this process becomes uvicorn's supervisor: it checks the bundle
(on the CPU: the processes hold the device), then starts that many processes on one socket,
each loading the model itself (``service.app:process_app``), restarts one that dies, replaces
them one by one on SIGHUP (each new one serving before the old one leaves: the model reload of
this mode), and on SIGTERM lets each drain as a single process does."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from typing import TYPE_CHECKING, Any

from service import allocator

if TYPE_CHECKING:
    from service.config import Settings
    from service.runtime import ModelRuntime
    from service.scheduler import Policy

EXIT_SETTINGS = 2
EXIT_BUNDLE = 3

log = logging.getLogger("service")


def main(policy: Policy | None = None) -> int:
    """Serve under ``policy`` (a ``scheduler.Policy``; default: the measured levers).
    ``python -m bench.serve`` passes others."""
    # SIGHUP's default action ends the process, and a rollout may send it to one still
    # starting: ignored from here (across the exec below too) until it is noted, then
    # handled by the lifespan as a reload.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Next: it may restart this process on jemalloc, so the first process should not pay for
    # importing torch (the imports below are here, not at the top, for that reason).
    allocator.exec_on_jemalloc()

    from service import reload
    from service.app import configure_logging

    settings = _settings()
    if settings is None:
        return EXIT_SETTINGS
    configure_logging(settings)
    signal.signal(signal.SIGHUP, lambda signum, frame: reload.request_during_start())
    allocator.report(settings.allocator)
    runtime = _checked_bundle(settings)
    if runtime is None:
        return EXIT_BUNDLE
    if settings.processes == 1:
        import uvicorn

        from service.app import create_app

        uvicorn.run(create_app(settings, runtime, policy), **uvicorn_options(settings))
        return 0
    if policy is not None:
        print("error: a benchmark's policy reaches one process only", file=sys.stderr)
        return EXIT_SETTINGS
    del runtime
    _serve_processes(settings)
    return 0


def _settings() -> Settings | None:
    """The settings, or None with the reason on stderr."""
    from pydantic import ValidationError

    from service.config import Settings

    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(map(_problem, exc.errors()))
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return None


def _problem(error: Any) -> str:
    """One validation error as the operator reads it: the variable, then what is wrong."""
    message = str(error["msg"]).removeprefix("Value error, ")
    if not error["loc"]:
        return message  # a check across settings names its variables itself
    return f"SENTIMENT_{'_'.join(map(str, error['loc'])).upper()}: {message}"


def _checked_bundle(settings: Settings) -> ModelRuntime | None:
    """The bundle loaded as it will serve, or None with the reason on stderr. With several
    processes it is checked here on the CPU (the precision the processes will serve where that
    is the CPU too); each process then loads the model on its device."""
    from service.bundle import BundleError, resolve_device
    from service.runtime import ModelRuntime

    try:
        if settings.processes > 1:
            on_cpu = resolve_device(settings.device).type == "cpu"
            dtype = settings.dtype if on_cpu else "float32"
            runtime = settings.runtime if on_cpu else "torchscript"
            return ModelRuntime.load(settings.bundle_dir, "cpu", dtype, runtime)
        return ModelRuntime.load(
            settings.bundle_dir, settings.device, settings.dtype, settings.runtime
        )
    except BundleError as exc:
        print(f"error: cannot serve: {exc}", file=sys.stderr)
        return None


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the settings, with the connections' bounds (``connections``). On
    SIGTERM uvicorn stops accepting connections and waits for the requests in flight (each
    bounded by its deadline); then the lifespan stops the batcher, which answers what it
    holds."""
    from service.connections import uvicorn_guards

    longest_deadline_s = max(settings.request_timeout_s, settings.explain_timeout_s)
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(longest_deadline_s) + 5,
        "timeout_keep_alive": settings.keep_alive_s,
        **uvicorn_guards(settings.max_connections, settings.read_timeout_s),
    }


def _serve_processes(settings: Settings) -> None:
    """uvicorn as the supervisor of ``settings.processes`` processes on one socket. One
    process is the default: the batcher can only merge requests it sees."""
    import uvicorn

    metrics_dir = tempfile.mkdtemp(prefix="sentiment-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by the processes' imports
    try:
        uvicorn.run(
            "service.app:process_app",
            factory=True,
            workers=settings.processes,
            # A process answers uvicorn's health pings from a thread; loading a model onto a
            # GPU can hold it off for seconds, which must not count as hung.
            timeout_worker_healthcheck=120,
            **uvicorn_options(settings),
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
