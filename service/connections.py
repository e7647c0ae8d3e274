"""The HTTP connection's own bounds, which uvicorn leaves open: how many bytes a request's head
may take, how many header fields it may have, and how long a client may take to send a whole
request once begun (a connection that has sent nothing is idle, closed by the keep-alive
timeout as between requests). uvicorn's httptools protocol with those checks added
(``guarded``); uvicorn's ``limit_concurrency`` bounds the connections, and
``raise_open_file_limit`` makes room for them.

Without them one client can hold the process: an unterminated 16 MB header is buffered whole
(50 of them took 0.9 GB; bounded here to one read of the socket past the limit), and a
connection that never completes its request is kept forever (the keep-alive timer starts only
after an answer), so a thousand of them exhaust the file descriptors and every request fails,
``/health`` included.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.errors import STATUS, ErrorType

log = logging.getLogger(__name__)

# A request's line and headers, in bytes (nginx's default buffers hold 32 KiB; uvicorn's h11
# parser 16 KiB): far above what any client of this API sends.
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
# Descriptors kept free of connections: the model's files, logs, the tokenizer's threads.
RESERVED_FILES = 64


def _answer(kind: ErrorType, message: str) -> bytes:
    """The service's JSON error, written on the connection by hand: no app has the request."""
    status = HTTPStatus(STATUS[kind])
    body = json.dumps({"error": message, "error_type": kind.value}).encode()
    return (
        f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    read_timeout_s = 10.0  # this process's setting (``guarded``)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_bytes = 0
        self._headers = 0
        self._in_head = True
        self._read_timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._requests: list[RequestResponseCycle] = []  # not yet answered, pipelined ones too
        # Until its first byte a connection is idle, as between requests: the keep-alive timeout
        # closes it (a client may well think longer than the read timeout before it asks).
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        # uvicorn tells only the connection's newest request that the client left; one
        # pipelined before it would still write its answer, on uvloop into a closed transport
        # (an error), and be logged as "returned without completing response".
        for cycle in self._requests:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._read_timer is None:
            self._arm()  # a request has begun: it must be whole within the read timeout
        # Counted while the head is incomplete, checked once the chunk is parsed: a chunk that
        # ends the head may carry the start of the body, which is not the head's.
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse(
                ErrorType.HEADERS_TOO_LARGE,
                f"the request line and headers exceed {MAX_HEAD_BYTES} bytes",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes, self._headers, self._in_head = 0, 0, True
        if self._read_timer is None:
            self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers += 1
        if self._headers > MAX_HEADERS:  # uvicorn answers a parser callback's error with 400
            raise ValueError(f"more than {MAX_HEADERS} header fields")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()
        if self.cycle is not None:
            self._requests = [c for c in self._requests if not c.response_complete]
            self._requests.append(self.cycle)
            if self._draining:
                self.cycle.keep_alive = False  # answered with "connection: close", then closed

    def on_message_complete(self) -> None:
        self._disarm()  # the request is in; the answer's time is the deadline's business
        super().on_message_complete()

    def shutdown(self) -> None:
        # uvicorn closes an idle connection at once, and a request a client sends on it just
        # then meets a reset. An idle connection keeps the keep-alive time it was promised
        # instead (its timer runs from connecting or from the last answer, and closes it);
        # a request that comes in that time is answered, with "connection: close".
        self._draining = True
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete and not self._in_head:
            # A body that stopped coming: the app waits on it; tell it the client is gone.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self._refuse(
            ErrorType.READ_TIMEOUT,
            f"the request was not sent whole within {self.read_timeout_s:g} s",
        )

    def _refuse(self, kind: ErrorType, message: str) -> None:
        log.info("closing a connection: %s", message)
        # The app's metrics, which its lifespan put in the state uvicorn hands to connections.
        metrics = self.app_state.get("metrics")
        if metrics is not None:
            metrics.failures.labels("connection", kind.value).inc()
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(_answer(kind, message))
        self.transport.close()


def guarded(read_timeout_s: float) -> type[GuardedHttpToolsProtocol]:
    """uvicorn's ``http`` protocol with the head's bounds and ``read_timeout_s`` to send a
    whole request from its first byte. A class of this module, set for this process: uvicorn
    hands it by name to the processes it starts, where ``service.app.process_app`` sets it
    again from their settings."""
    GuardedHttpToolsProtocol.read_timeout_s = read_timeout_s
    return GuardedHttpToolsProtocol


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (what Go programs do at
    start; container runtimes often leave the soft limit at 1024); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def connection_limit(wanted: int, open_files: int) -> int:
    """``wanted`` connections, or as many as the open-file limit leaves room for."""
    room = max(1, open_files - RESERVED_FILES)
    if wanted > room:
        log.warning(
            "max_connections %d lowered to %d: the open-file limit is %d (raise it: "
            "ulimit -n, or the container's nofile limit)",
            wanted,
            room,
            open_files,
        )
    return min(wanted, room)


def uvicorn_guards(max_connections: int, read_timeout_s: float) -> dict[str, Any]:
    """uvicorn's options for the bounds above."""
    limit = connection_limit(max_connections, raise_open_file_limit())
    return {"http": guarded(read_timeout_s), "limit_concurrency": limit}
