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
import sys
import tempfile
from typing import Any

from service import allocator

EXIT_SETTINGS = 2
EXIT_BUNDLE = 3

log = logging.getLogger("service")


def main() -> int:
    # First: it may restart this process on jemalloc, so the first process should not pay for
    # importing torch (the imports below are here, not at the top, for that reason).
    allocator.exec_on_jemalloc()

    import uvicorn
    from pydantic import ValidationError

    from service.app import configure_logging, create_app
    from service.bundle import BundleError, resolve_device
    from service.config import Settings
    from service.runtime import ModelRuntime

    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SENTIMENT_{'_'.join(map(str, e['loc'])).upper()}: "
            + e["msg"].removeprefix("Value error, ")
            for e in exc.errors()
        )
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return EXIT_SETTINGS
    configure_logging(settings)
    allocator.report(settings.allocator)
    several = settings.processes > 1
    try:
        if several:
            # Checked here on the CPU (the precision the processes will serve where that is
            # the CPU too); each process loads the model on its device.
            on_cpu = resolve_device(settings.device).type == "cpu"
            dtype = settings.dtype if on_cpu else "float32"
            runtime = ModelRuntime.load(settings.bundle_dir, "cpu", dtype)
        else:
            runtime = ModelRuntime.load(settings.bundle_dir, settings.device, settings.dtype)
    except BundleError as exc:
        print(f"error: cannot serve: {exc}", file=sys.stderr)
        return EXIT_BUNDLE
    # On SIGTERM uvicorn stops accepting connections and waits for the requests in flight
    # (each bounded by its deadline); then the lifespan stops the batcher, which answers what
    # it holds. One process by default: the batcher can only merge requests it sees.
    longest_deadline_s = max(settings.request_timeout_s, settings.explain_timeout_s)
    serving: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "timeout_graceful_shutdown": int(longest_deadline_s) + 5,
        "timeout_keep_alive": settings.keep_alive_s,
        "http": settings.http,
        "loop": settings.loop,
    }
    if not several:
        uvicorn.run(create_app(settings, runtime), **serving)
        return 0
    del runtime
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
            **serving,
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
