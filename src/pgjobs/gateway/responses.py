"""The JSON the gateway speaks: camelCase records and ``{"error": ...}`` for every failure.

The exception handlers here are the only place errors become HTTP statuses, so the
mapping can be read in one screen: bad input 400/413/415/422, unknown 404, wrong state
409, too many streams 429, database or asset storage busy or down 503 with Retry-After, anything
unexpected 500 with a generic message (the details go to the log, not to the client). A
client that leaves while sending its body is not an error of the server's: one INFO line.

Every JSON answer, errors included, is an ``ApiJSONResponse``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Final

import psycopg
from psycopg_pool import PoolTimeout, TooManyRequests
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from pgjobs import db
from pgjobs.errors import (
    DatabaseUnavailableError,
    InvalidJobError,
    InvalidTransitionError,
    JobNotFoundError,
    StorageError,
)
from pgjobs.types import Asset, iso

log = logging.getLogger(__name__)

# jobspec names fields as the Python API does; the HTTP API names them in camelCase.
_FIELD_NAMES = {
    "job_type": "jobType",
    "source_task_id": "sourceTaskId",
    "max_attempts": "maxAttempts",
    "run_at": "runAt",
    "company_id": "companyId",
}
_FIELD_RE = re.compile(r"\b(" + "|".join(_FIELD_NAMES) + r")\b")


JSON_HEADERS: Final = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class ApiJSONResponse(JSONResponse):
    """A JSON answer of the API. Never stored by a cache on the way (it is one company's
    data, or a stream token, fetched with a token) and never sniffed by a browser as
    anything but JSON."""

    def __init__(
        self, content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(content, status_code, {**JSON_HEADERS, **(headers or {})})


def camel_message(message: str) -> str:
    return _FIELD_RE.sub(lambda m: _FIELD_NAMES[m.group(1)], message)


def asset_json(asset: Asset) -> dict[str, Any]:
    return {
        "id": str(asset.id),
        "companyId": asset.company_id,
        "contentType": asset.content_type,
        "byteSize": asset.byte_size,
        "sha256": asset.sha256,
        "originalFilename": asset.original_filename,
        "sourceTaskId": asset.source_task_id,
        "sourceJobId": str(asset.source_job_id) if asset.source_job_id else None,
        "createdAt": iso(asset.created_at),
    }


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return ApiJSONResponse({"error": message}, status_code=status, headers=headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 304:
        return Response(status_code=304, headers=exc.headers)
    return error(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def on_invalid_job(request: Request, exc: Exception) -> Response:
    return error(422, camel_message(str(exc)))


async def on_job_not_found(request: Request, exc: Exception) -> Response:
    return error(404, "Job not found")


async def on_invalid_transition(request: Request, exc: Exception) -> Response:
    return error(409, str(exc))


async def on_database_busy(request: Request, exc: Exception) -> Response:
    # The pool is exhausted, or the database is unreachable, restarting or read-only
    # (failover): the request may well succeed in a moment.
    log.warning(
        "database unavailable for %s %s: %s",
        request.method,
        request.url.path,
        db.describe_error(exc),
    )
    return error(503, "database unavailable, retry shortly", {"Retry-After": "1"})


async def on_storage_unavailable(request: Request, exc: Exception) -> Response:
    # The asset backend failed (an S3 bucket missing, credentials refused, the endpoint
    # down): the operator's fix is in the log line, the client may retry later.
    log.warning("asset storage unavailable for %s %s: %s", request.method, request.url.path, exc)
    return error(503, "asset storage unavailable, retry shortly", {"Retry-After": "5"})


async def on_client_disconnect(request: Request, exc: Exception) -> Response:
    # Starlette raises ClientDisconnect when the client closed the connection before its
    # request body was complete. Nobody is left to read an answer (uvicorn discards it).
    log.info("client left during %s %s before its body arrived", request.method, request.url.path)
    return error(400, "the request body was incomplete")


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error(500, "internal error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: on_http_exception,
    InvalidJobError: on_invalid_job,
    JobNotFoundError: on_job_not_found,
    InvalidTransitionError: on_invalid_transition,
    PoolTimeout: on_database_busy,
    TooManyRequests: on_database_busy,
    DatabaseUnavailableError: on_database_busy,
    psycopg.OperationalError: on_database_busy,
    # SQLSTATE 25006: a failover left us on a read-only server.
    psycopg.errors.ReadOnlySqlTransaction: on_database_busy,
    StorageError: on_storage_unavailable,
    ClientDisconnect: on_client_disconnect,
    Exception: on_unexpected,
}
