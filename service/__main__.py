"""``python -m service``: serve the bundle named by the SENTIMENT_* settings with uvicorn."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from types import FrameType

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.app import create_app
from service.config import Settings
from service.errors import BundleError

log = logging.getLogger("service")


class BriefBundleFailure:
    """Starlette reports a failed startup to uvicorn with the whole traceback. A bundle that
    cannot be served is the operator's to fix, and the lifespan has already named the problem
    in one line, so uvicorn hears only that startup failed. Any other failure keeps its
    traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        held: list[Message] = []

        async def hold_startup_failure(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                held.append(message)  # sent once the exception behind it is known
            else:
                await send(message)

        try:
            await self.app(scope, receive, hold_startup_failure)
        except BaseException as exc:
            for message in held:
                if isinstance(exc, BundleError):
                    message = {**message, "message": ""}
                await send(message)
            raise


class DrainingServer(uvicorn.Server):
    """The first SIGTERM or SIGINT starts a drain: the socket stays open, new requests and
    /ready get 503, and every request already admitted is answered; then uvicorn stops. A
    second signal stops at once."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self._drain_task: asyncio.Task[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        predictor = getattr(self.app.state, "predictor", None)
        if self._drain_task is not None or predictor is None:
            super().handle_exit(sig, frame)
            return
        log.info("signal %s: draining", signal.Signals(sig).name)
        loop = asyncio.get_event_loop()
        self._drain_task = loop.create_task(self._drain(sig, frame))

    async def _drain(self, sig: int, frame: FrameType | None) -> None:
        await self.app.state.predictor.drain()
        log.info("drained: every admitted request answered")
        super().handle_exit(sig, frame)


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = "; ".join(
            f"SENTIMENT_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        )
        print(f"error: invalid configuration: {problems}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s"
    )
    app = create_app(settings)
    # One worker per process by design: the batcher can only merge requests it sees.
    config = uvicorn.Config(
        BriefBundleFailure(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
        timeout_keep_alive=settings.keep_alive_s,
    )
    DrainingServer(config, app).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
