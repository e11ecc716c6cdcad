"""The gateway's edge: the one error shape for every status, and bounded request bodies (no torch).

Every answer that is not a success is `{"error": {type, message, retryable}}` (`ErrorResponse`),
whether modelq raised it (a `ModelqError`), Redis failed, or the framework refused the request
(unknown route, wrong method, a body that is not JSON). A job body is read here, never by the
framework: refused with 413 past `Settings.max_body_bytes` before anything is parsed (the rest
of the body read and discarded first, within bounds, so that the client reads the 413), and with
400 when it is not UTF-8 JSON or nests deeper than `MAX_JSON_DEPTH`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from schemas import (
    AccessDenied,
    BrokerUnavailable,
    InvalidJob,
    JobNotFound,
    ModelNotFound,
    ModelqError,
    QuotaExceeded,
    TaskNotFound,
    TimedOut,
)
from tasks.settings import Settings

log = logging.getLogger(__name__)

STATUS: dict[type[ModelqError], int] = {
    InvalidJob: 422, ModelNotFound: 404, JobNotFound: 404, TaskNotFound: 404, AccessDenied: 403,
    QuotaExceeded: 429,
    BrokerUnavailable: 503, TimedOut: 504,
}
DRAIN_BYTES = 64 << 20
"""Bytes of a refused (413) body the gateway reads and discards before it closes (see `drain`)."""
DRAIN_SECONDS = 10.0
"""How long the gateway goes on reading a refused body before it closes (nginx: 30 s at most)."""
MAX_JSON_DEPTH = 64
"""Arrays and objects nest at most this deep in a job body (a job itself nests about 4 deep)."""

# The framework's own refusals, named as modelq names its errors.
_HTTP_TYPES = {400: "BadRequest", 404: "RouteNotFound", 405: "MethodNotAllowed", 413: "BodyTooLarge",
               415: "UnsupportedMediaType"}


class ErrorInfoBody(BaseModel):
    """What went wrong: a stable `type` to branch on, a message that says what to change."""

    type: str = Field(description="The error's class: InvalidJob, JobNotFound, AccessDenied, ...")
    message: str
    retryable: bool = Field(description="Whether the same request may succeed later")


class ErrorResponse(BaseModel):
    """The body of every error the gateway answers, whatever its status."""

    error: ErrorInfoBody


_WHEN = {400: "The body is not JSON: not UTF-8, malformed, or nested too deep",
         401: "No API key, or one that matches no tenant",
         403: "The request names another tenant than the caller's",
         404: "No such job, model, task or route (another tenant's look the same as none)",
         405: "The path does not take this method",
         413: "The body is larger than the gateway's limit (MODELQ_MAX_BODY_BYTES)",
         422: "The body is JSON but not a valid job, or a header or parameter is malformed "
              "(the message says what to fix)",
         429: "The tenant is over its quota of open jobs",
         500: "A fault in the gateway itself",
         503: "Redis or the broker is unreachable: retry later",
         504: "Timed out waiting on Redis"}


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each status it can answer with, in the one error shape."""
    return {status: {"model": ErrorResponse, "description": _WHEN[status]} for status in statuses}


def error_response(status: int, type_: str, message: str, retryable: bool = False,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"type": type_, "message": message, "retryable": retryable}
    return JSONResponse(status_code=status, content={"error": body}, headers=headers)


def modelq_error(status: int, exc: ModelqError, headers: dict[str, str] | None = None) -> JSONResponse:
    return error_response(status, exc.type, exc.message, exc.retryable, headers)


def status_of(exc: ModelqError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


class Unauthenticated(Exception):
    """`authenticate` refused the caller: 401, not 403."""

    def __init__(self, error: ModelqError) -> None:
        super().__init__(error.message)
        self.error = error


class BadBody(Exception):
    """The body cannot be read as JSON at all: 400 (a JSON body that is no valid job is 422)."""

    def __init__(self, error: InvalidJob) -> None:
        super().__init__(error.message)
        self.error = error


class BodyTooLarge(Exception):
    """The body is over `Settings.max_body_bytes`: 413, refused before it is parsed."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the gateway's limit of {limit} bytes: send a "
                         "smaller job (pass large run inputs as a file path), or raise "
                         "MODELQ_MAX_BODY_BYTES on the gateway")


async def read_json_body(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object, read chunk by chunk and refused as soon as it passes `limit`
    (the rest drained first, see `drain`)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        if request.headers.get("expect", "").lower() != "100-continue":  # else: never sent
            await drain(request.stream())
        raise BodyTooLarge(limit)
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            await drain(stream)
            raise BodyTooLarge(limit)
        chunks.append(chunk)
    try:
        value = json.loads(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadBody(InvalidJob(f"the body is not UTF-8 (byte {exc.start}): send the job as "
                                 "UTF-8 JSON")) from None
    except RecursionError:
        raise BadBody(_too_deep()) from None
    except ValueError as exc:
        raise BadBody(InvalidJob(f"the body is not JSON: {exc}")) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BadBody(_too_deep())
    if not isinstance(value, dict):
        raise InvalidJob(f"a job is a JSON object, not {type(value).__name__}: send "
                         '{"kind": ..., ...} as `modelq schema` describes it')
    return value


async def drain(chunks: AsyncIterator[bytes]) -> None:
    """Read and discard the rest of a refused body, up to DRAIN_BYTES and DRAIN_SECONDS.

    The server closes the connection after a 413; closing a socket with unread bytes in it
    sends a reset, and a client still sending (urllib, requests: they read only once the body
    is sent) then sees `Connection reset by peer` instead of the 413. Reading the rest first,
    bounded as nginx bounds its lingering close, lets the answer through; past either bound
    the connection is closed as before.
    """
    drained = 0
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in chunks:
                drained += len(chunk)
                if drained > DRAIN_BYTES:
                    return
    except (TimeoutError, ClientDisconnect):
        return


def _too_deep() -> InvalidJob:
    return InvalidJob(f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH} levels")


def _depth(value: Any) -> int:
    """How deep arrays and objects nest in `value` (walked without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level > MAX_JSON_DEPTH:
            return level
        stack.extend((child, level + 1) for child in children)
    return deepest


def install_errors(app: FastAPI, settings: Settings) -> None:
    """Every error in the one shape: modelq's, Redis's, and the framework's own refusals."""
    handlers: dict[type[Exception], Any] = {
        ModelqError: lambda exc: modelq_error(status_of(exc), exc),
        Unauthenticated: lambda exc: modelq_error(401, exc.error, {"WWW-Authenticate": "Bearer"}),
        BadBody: lambda exc: modelq_error(400, exc.error),
        BodyTooLarge: lambda exc: error_response(413, "BodyTooLarge", str(exc), headers={
            "Connection": "close"}),
        redis.RedisError: lambda exc: modelq_error(503, unreachable(settings, exc)),
        RequestValidationError: lambda exc: error_response(422, "InvalidRequest", "; ".join(
            f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors())),
        HTTPException: _http_error,
        Exception: _fault,
    }
    for cls, handle in handlers.items():
        app.add_exception_handler(cls, _adapt(handle))


def unreachable(settings: Settings, exc: Exception) -> BrokerUnavailable:
    if isinstance(exc, redis.exceptions.MaxConnectionsError):
        return BrokerUnavailable("the gateway has all its Redis connections in use (each event-stream "
                                 "follower holds one): retry later, or spread followers over gateways")
    where = settings.redis_url.rsplit("@", 1)[-1]  # never show a password
    return BrokerUnavailable(f"Redis at {where} is unreachable ({type(exc).__name__}); "
                             "try again when it is back")


def _adapt(handle: Any) -> Any:
    async def handler(_request: Request, exc: Exception) -> JSONResponse:
        response: JSONResponse = handle(exc)
        return response
    return handler


def _http_error(exc: HTTPException) -> JSONResponse:
    """Starlette's refusals (unknown route, wrong method, ...) in the one shape, headers kept."""
    type_ = _HTTP_TYPES.get(exc.status_code, "HTTPError")
    message = {404: "no such route: see /docs for the gateway's API",
               405: "this path does not take that method: see /docs"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, type_, message, exc.status_code >= 500,
                          dict(exc.headers or {}))


def _fault(exc: Exception) -> JSONResponse:
    log.error("gateway fault: %s: %s", type(exc).__name__, exc, exc_info=exc)
    return error_response(500, "InternalError", f"the gateway failed ({type(exc).__name__}); "
                          "this is a bug: report it with the gateway's log", retryable=True)
