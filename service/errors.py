"""Every error the service answers with, and the one table that maps each to a status code.

Responses carry ``{"error": <message>, "error_type": <ErrorType.value>}``.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    INVALID_JSON = "invalid_json"
    INVALID_ENCODING = "invalid_encoding"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    VALIDATION = "validation"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    HEADERS_TOO_LARGE = "headers_too_large"
    READ_TIMEOUT = "read_timeout"
    TOO_MANY_INPUTS = "too_many_inputs"
    INPUT_TOO_LONG = "input_too_long"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    OVERLOADED = "overloaded"
    CLIENT_CLOSED = "client_disconnected"
    TIMEOUT = "timeout"
    UNAVAILABLE = "unavailable"
    RELOAD_FAILED = "reload_failed"
    BACKEND = "backend"


STATUS: dict[ErrorType, int] = {
    ErrorType.INVALID_JSON: 400,
    ErrorType.INVALID_ENCODING: 400,
    ErrorType.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorType.UNAUTHORIZED: 401,
    ErrorType.FORBIDDEN: 403,
    ErrorType.VALIDATION: 422,
    ErrorType.PAYLOAD_TOO_LARGE: 413,
    ErrorType.HEADERS_TOO_LARGE: 431,  # answered by the connection (service/connections.py)
    ErrorType.READ_TIMEOUT: 408,  # the same: the request was not sent whole in time
    ErrorType.TOO_MANY_INPUTS: 413,
    ErrorType.INPUT_TOO_LONG: 413,
    ErrorType.NOT_FOUND: 404,
    ErrorType.METHOD_NOT_ALLOWED: 405,
    ErrorType.OVERLOADED: 429,
    ErrorType.CLIENT_CLOSED: 499,  # nginx's code: nobody reads it, but logs and metrics do
    ErrorType.TIMEOUT: 504,
    ErrorType.UNAVAILABLE: 503,
    ErrorType.RELOAD_FAILED: 409,  # the bundle on disk cannot be served; the old model serves
    ErrorType.BACKEND: 500,
}


class ServiceError(Exception):
    """An answer other than success; ``error_type`` picks the status from ``STATUS``."""

    def __init__(self, error_type: ErrorType, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.retry_after = retry_after

    @property
    def status(self) -> int:
        return STATUS[self.error_type]
