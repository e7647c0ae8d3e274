"""Logging: every line carries the request id of the request it belongs to (``-`` outside
one), as text or as one JSON object per line (``log_format``, TEI's ``--json-output``), for
the service's loggers and uvicorn's alike. ``RequestId`` takes a client's ``x-request-id`` (or
makes one) and echoes it in the answer."""

from __future__ import annotations

import json
import logging
import logging.config
import time
import uuid
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="-")
HEADER = b"x-request-id"
TEXT_FORMAT = "%(levelname)s:     %(name)s: [%(request_id)s] %(message)s"
_MAX_ID = 128


def request_id(offered: str | None) -> str:
    """The client's id when it is one (1 to 128 printable ASCII characters, no space), else a
    new one: a client cannot put control characters or megabytes into every log line."""
    if offered is None or not 0 < len(offered) <= _MAX_ID:
        return uuid.uuid4().hex
    if offered.isascii() and offered.isprintable() and " " not in offered:
        return offered
    return uuid.uuid4().hex


class RequestId:
    """Sets the request id for everything the request does (its log lines included) and
    answers it in ``x-request-id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == HEADER]
        rid = request_id(offered[0] if len(offered) == 1 else None)
        token = REQUEST_ID.set(rid)
        trace.get_current_span().set_attribute("request.id", rid)  # FastAPI's request span

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (HEADER, rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


class JsonLines(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, request_id, message and,
    for an error with its traceback, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def logging_config(level: str, log_format: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the root logger and uvicorn's: one handler on
    stderr, the request id on every record, text or JSON lines."""
    formatter: dict[str, Any] = (
        {"()": JsonLines} if log_format == "json" else {"format": TEXT_FORMAT}
    )
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": "line",
        "filters": ["request_id"],
    }
    uvicorn = {"handlers": ["line"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": _WithRequestId}},
        "formatters": {"line": formatter},
        "handlers": {"line": handler},
        "root": {"handlers": ["line"], "level": level.upper()},
        "loggers": {
            "uvicorn": uvicorn,
            "uvicorn.error": {"level": level.upper()},
            "uvicorn.access": uvicorn,
        },
    }


def configure(level: str, log_format: str) -> None:
    logging.config.dictConfig(logging_config(level, log_format))
