"""Pure ASGI middleware: request metrics, API keys, HEAD as GET, and the checks a body must pass
before FastAPI parses it (size, content type, UTF-8), each answered with the service's JSON
error."""

from __future__ import annotations

import functools
import hmac
import re
import time
from collections.abc import Iterable
from email.message import Message as MimeHeader

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import STATUS, ErrorType, ServiceError
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


class HeadAsGet:
    """HEAD answers as GET does, headers only (RFC 9110): load balancers and uptime checks
    probe with HEAD, and FastAPI routes a GET route's HEAD to 405. The app sees a copy of the
    request as GET; uvicorn, which keeps its own, drops the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


class ApiKeyAuth:
    """``Authorization: Bearer <key>``: on the admin paths an admin key (a client key gets
    403), on every other path but the exempt ones a client or admin key where client keys are
    set. More than one Authorization header is refused, whichever would match."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        paths: frozenset[str],
        keys: Iterable[str],
        exempt: Iterable[str],
        exempt_reads: Iterable[str] = (),
        exempt_prefixes: tuple[str, ...] = (),
        admin_keys: Iterable[str] = (),
        admin_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.paths = paths  # route templates, for the failures' labels
        self.keys = [k.encode() for k in keys]
        self.admin_keys = [k.encode() for k in admin_keys]
        self.exempt = frozenset(exempt)
        self.exempt_reads = frozenset(exempt_reads)  # for GET (and HEAD) only
        self.exempt_prefixes = exempt_prefixes
        self.admin_paths = frozenset(admin_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        admin = path in self.admin_paths
        read = scope.get("method") in ("GET", "HEAD") and path in self.exempt_reads
        if scope["type"] != "http" or (
            not admin and (path in self.exempt or read or path.startswith(self.exempt_prefixes))
        ):
            await self.app(scope, receive, send)
            return
        error = self._refusal(scope, admin)
        if error is None:
            await self.app(scope, receive, send)
        else:
            route = route_label(path, self.paths)
            self.metrics.failures.labels(route, error.error_type.value).inc()
            await error_response(error)(scope, receive, send)

    def _refusal(self, scope: Scope, admin: bool) -> ServiceError | None:
        """None if the request may pass, else why not."""
        headers = [v for k, v in scope["headers"] if k.lower() == b"authorization"]
        if len(headers) > 1:
            return ServiceError(
                ErrorType.UNAUTHORIZED, "send one Authorization header, not several"
            )
        token = bearer_token(headers[0]) if headers else None
        if admin:
            if token is not None and key_matches(token, self.admin_keys):
                return None
            if token is not None and key_matches(token, self.keys):
                return ServiceError(ErrorType.FORBIDDEN, "this key may not call admin routes")
        elif not self.keys or (
            token is not None and key_matches(token, self.keys + self.admin_keys)
        ):
            return None
        return ServiceError(
            ErrorType.UNAUTHORIZED, "missing or invalid API key: send 'Authorization: Bearer <key>'"
        )


def bearer_token(header: bytes) -> bytes | None:
    scheme, _, token = header.partition(b" ")
    token = token.strip()
    return token if scheme.lower() == b"bearer" and token else None


def key_matches(token: bytes, keys: list[bytes]) -> bool:
    # Compared with every key, each in constant time: no early exit reveals which matched.
    matches = [hmac.compare_digest(token, key) for key in keys]
    return any(matches)


class BodyGuard:
    """Reads the body of a request to ``paths`` once, bounded by ``max_bytes``, checks it is
    JSON text and hands it on; for ``raw_paths`` (bodies that may hold binary tensors) only
    the size and that there is a body. A refusal is counted in the failures by reason. Other
    requests go straight to the router (which answers 404 or 405)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        paths: frozenset[str],
        raw_paths: re.Pattern[str],
        metrics: Metrics,
        routes: frozenset[str],
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.paths = paths
        self.raw_paths = raw_paths
        self.metrics = metrics
        self.routes = routes  # the app's route templates, for the failures' labels

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        raw = self.raw_paths.fullmatch(scope["path"]) is not None
        if not raw and scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            if not raw:
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
                if not raw:
                    body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ServiceError(
                    ErrorType.INVALID_ENCODING,
                    f"request body is not valid UTF-8 (byte {body[exc.start]:#04x} at offset "
                    f"{exc.start})",
                ) from None
        except ServiceError as error:
            route = route_label(scope["path"], self.routes)
            self.metrics.failures.labels(route, error.error_type.value).inc()
            await error_response(error)(scope, receive, send)
            return

        # FastAPI parses JSON only under a JSON content type; the body was checked above.
        scope = dict(scope)
        if not raw:
            scope["headers"] = [
                (k, v) for k, v in scope["headers"] if k.lower() != b"content-type"
            ] + [(b"content-type", b"application/json")]
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
            if message["type"] == "http.disconnect":  # not the client's JSON's fault
                raise ServiceError(
                    ErrorType.CLIENT_CLOSED, "the client disconnected before the body ended"
                )
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
        self.paths = paths  # the app's route templates

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        gone = False

        async def send_and_record(message: Message) -> None:
            nonlocal status, gone
            if gone:
                return
            if message["type"] == "http.response.start":
                status = int(message["status"])
            try:
                await send(message)
            except (OSError, RuntimeError) as exc:
                # The connection closed under the answer (a client that pipelined requests and
                # left; uvloop raises where asyncio would drop the write): nothing can reach
                # the client, and it is not the service's failure. Anything else is a bug.
                if isinstance(exc, RuntimeError) and "closed" not in str(exc):
                    raise
                gone = True

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = route_label(scope["path"], self.paths)
            if gone:
                status = STATUS[ErrorType.CLIENT_CLOSED]
                self.metrics.failures.labels(route, ErrorType.CLIENT_CLOSED.value).inc()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - started)


def route_label(path: str, templates: frozenset[str]) -> str:
    """The route template ``path`` matches, as a metric label: any other path shares one
    label, so no client can grow the label set."""
    if path in templates:
        return path
    if path.startswith("/static/"):
        return "/static"  # the page's files, one label
    for template in templates:
        if "{" in template and _template_pattern(template).fullmatch(path):
            return template
    return "unmatched"


@functools.cache
def _template_pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)))
