"""Pure ASGI middleware: request metrics, and the checks a body must pass before FastAPI parses
it (size, content type, UTF-8), each answered with the service's JSON error."""

from __future__ import annotations

import hmac
import time
from collections.abc import Iterable
from email.message import Message as MimeHeader

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ErrorType, ServiceError
from service.metrics import Metrics

# curl -d sends form-urlencoded by default; its body is still the JSON the user typed.
_ACCEPTED_TYPES = {"application/json", "application/x-www-form-urlencoded"}


def error_response(error: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else {}
    if error.error_type is ErrorType.UNAUTHORIZED:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        {"error": error.message, "error_type": error.error_type.value},
        status_code=error.status,
        headers=headers,
    )


class ApiKeyAuth:
    """``Authorization: Bearer <key>`` on every path but the exempt ones."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Iterable[str],
        exempt: Iterable[str],
        exempt_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.exempt = frozenset(exempt)
        self.exempt_prefixes = exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if (
            scope["type"] != "http"
            or path in self.exempt
            or path.startswith(self.exempt_prefixes)
            or self._authorized(scope)
        ):
            await self.app(scope, receive, send)
            return
        error = ServiceError(
            ErrorType.UNAUTHORIZED, "missing or invalid API key: send 'Authorization: Bearer <key>'"
        )
        await error_response(error)(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        # Compared with every key, each in constant time: no early exit reveals which matched.
        matches = [hmac.compare_digest(token.strip(), key) for key in self.keys]
        return any(matches)


class BodyGuard:
    """Reads the body of a request to ``paths`` once, bounded by ``max_bytes``, checks it and
    hands it on. Other requests go straight to the router (which answers 404 or 405)."""

    def __init__(self, app: ASGIApp, max_bytes: int, paths: frozenset[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            self._check_content_type(headers.get("content-type"))
            declared = headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
                raise self._too_large()
            body = await self._read(receive)
            if not body.strip():
                raise ServiceError(
                    ErrorType.INVALID_JSON,
                    'request body is empty; send JSON such as {"inputs": "some text"}',
                )
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ServiceError(
                    ErrorType.INVALID_ENCODING,
                    f"request body is not valid UTF-8 (byte {body[exc.start]:#04x} at offset "
                    f"{exc.start})",
                ) from None
        except ServiceError as error:
            await error_response(error)(scope, receive, send)
            return

        # FastAPI parses JSON only under a JSON content type; the body was checked above.
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"] + [
            (b"content-type", b"application/json")
        ]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notices

        await self.app(scope, replay, send)

    def _check_content_type(self, value: str | None) -> None:
        if value is None:
            return
        header = MimeHeader()
        header["content-type"] = value
        kind = header.get_content_type()
        if kind in _ACCEPTED_TYPES or kind.endswith("+json"):
            return
        raise ServiceError(
            ErrorType.UNSUPPORTED_MEDIA_TYPE,
            f"content type {kind} is not accepted; send JSON (application/json)",
        )

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> ServiceError:
        return ServiceError(
            ErrorType.PAYLOAD_TOO_LARGE, f"request body exceeds {self.max_bytes} bytes"
        )


class HttpMetrics:
    """Counts requests by route template and status, and times them."""

    def __init__(self, app: ASGIApp, metrics: Metrics, paths: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        # The app's route templates. None has path parameters, so a request's path is its
        # template; anything else shares one label, so no client can grow the label set.
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope["path"]
            if path in self.paths:
                route = path
            elif path.startswith("/static/"):
                route = "/static"  # the page's files, one label
            else:
                route = "unmatched"
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - started)
