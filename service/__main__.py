"""``python -m service``: check the settings, load and check the bundle, then serve it with
uvicorn. Anything that stops it before serving is one line on stderr and a non-zero exit:
2 for invalid settings, 3 for a bundle that cannot be served."""

from __future__ import annotations

import logging
import sys

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

    from service.app import create_app
    from service.bundle import BundleError
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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s"
    )
    allocator.report(settings.allocator)
    try:
        runtime = ModelRuntime.load(settings.bundle_dir, settings.device, settings.dtype)
    except BundleError as exc:
        print(f"error: cannot serve: {exc}", file=sys.stderr)
        return EXIT_BUNDLE
    # One worker per process by design: the batcher can only merge requests it sees. On
    # SIGTERM uvicorn stops accepting connections and waits for the requests in flight (each
    # bounded by its deadline); then the lifespan stops the batcher, which answers what it holds.
    longest_deadline_s = max(settings.request_timeout_s, settings.explain_timeout_s)
    uvicorn.run(
        create_app(settings, runtime),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(longest_deadline_s) + 5,
        timeout_keep_alive=settings.keep_alive_s,
        http=settings.http,
        loop=settings.loop,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
