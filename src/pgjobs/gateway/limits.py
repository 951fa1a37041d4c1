"""What one client may cost: request bodies, JSON, query parameters, concurrent streams.

Everything a client sends is bounded before it is trusted. A body must say it is JSON
(anything else would be parsed as JSON all the same, or ignored: 415); it is counted while
it streams in (a small or missing Content-Length proves nothing); JSON is parsed strictly
(no NaN/Infinity, no duplicate keys, no recursion blow-up); numbers in query strings must
be in range. Each failure is a 4xx with ``{"error": ...}``, never a 500.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any, NoReturn

from starlette.exceptions import HTTPException
from starlette.requests import Request


class ApiError(HTTPException):
    """A client error with a JSON body ``{"error": detail}``."""

    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(status_code, detail, headers)


def bad_request(detail: str) -> NoReturn:
    raise ApiError(400, detail)


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or 413 as soon as more than max_bytes have arrived."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            bad_request("Content-Length is not a number")
        if int(declared) > max_bytes:
            raise ApiError(413, f"request body is larger than {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise ApiError(413, f"request body is larger than {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


JSON_MEDIA_TYPE = "application/json"
_NOT_JSON = f"Content-Type must be {JSON_MEDIA_TYPE}"


def is_json_content_type(value: str) -> bool:
    """``application/json``, in any case, with any parameters but a charset other than
    UTF-8 (JSON is UTF-8; the body is decoded as such)."""
    media_type, *params = value.split(";")
    if media_type.strip().lower() != JSON_MEDIA_TYPE:
        return False
    for param in params:
        name, _, raw = param.partition("=")
        if name.strip().lower() == "charset" and raw.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


async def read_json_object(
    request: Request, max_bytes: int, *, optional: bool = False
) -> dict[str, Any]:
    """The request's body as a JSON object: 415 unless its Content-Type is JSON, 413 past
    ``max_bytes``, 400 if it is not one JSON object. An ``optional`` body may be left out
    altogether (no body, no Content-Type): it is then an empty object."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json_content_type(content_type):
        raise ApiError(415, _NOT_JSON)
    if content_type is None and not optional:
        raise ApiError(415, _NOT_JSON)
    body = await read_body(request, max_bytes)
    if content_type is None and body.strip():
        raise ApiError(415, _NOT_JSON)  # a body with no type is not taken for JSON
    return parse_json_object(body, empty_ok=optional)


def _reject_constant(name: str) -> NoReturn:
    # Python's json accepts NaN, Infinity and -Infinity; JSON and jsonb do not.
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > 1:
        counts = Counter(key for key, _ in pairs)
        duplicate = next((key for key, n in counts.items() if n > 1), None)
        if duplicate is not None:
            raise ValueError(f"duplicate key {duplicate!r}")
    return dict(pairs)


def parse_json_object(body: bytes, *, empty_ok: bool = False) -> dict[str, Any]:
    """The body as a JSON object, or 400 saying what is wrong with it."""
    if not body.strip() and empty_ok:
        return {}
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        bad_request("request body is not valid UTF-8")
    try:
        value = json.loads(
            text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys
        )
    except RecursionError:
        bad_request("request body is nested too deeply")
    except ValueError as exc:
        bad_request(f"request body is not valid JSON: {exc}")
    if not isinstance(value, dict):
        bad_request("request body must be a JSON object")
    return value


def query_text(request: Request, name: str, max_length: int = 200) -> str | None:
    """An optional text filter: None when absent or empty; 400 when too long or holding a
    character PostgreSQL cannot store."""
    raw = request.query_params.get(name)
    if not raw:
        return None
    if len(raw) > max_length or "\x00" in raw:
        bad_request(f"{name} must be at most {max_length} characters, with no NUL")
    return raw


def query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9 or not minimum <= int(raw) <= maximum:
        bad_request(f"{name} must be a whole number between {minimum} and {maximum}")
    return int(raw)


class StreamSlots:
    """Caps on concurrent event streams, per company and in total.

    Checked and taken before a stream's response starts, so the client gets a real 429
    instead of a stream that ends at once; given back when the response ends however it
    ends (see ``eventstream.EventStream``).
    """

    def __init__(self, max_total: int, max_per_company: int) -> None:
        self.max_total = max_total
        self.max_per_company = max_per_company
        self.total = 0
        self.by_company: Counter[str] = Counter()

    def acquire(self, company_id: str) -> None:
        if self.total >= self.max_total:
            raise ApiError(429, "too many open event streams on this server", {"Retry-After": "5"})
        if self.by_company[company_id] >= self.max_per_company:
            raise ApiError(
                429, "too many open event streams for this company", {"Retry-After": "5"}
            )
        self.total += 1
        self.by_company[company_id] += 1

    def release(self, company_id: str) -> None:
        self.total -= 1
        self.by_company[company_id] -= 1
        if self.by_company[company_id] <= 0:
            del self.by_company[company_id]
