"""Request bodies: the camelCase JSON the API accepts, checked field by field.

Shape errors (a missing or empty jobType, a field of the wrong JSON type, an unknown
field, a malformed time, a time outside ``pgjobs.jobspec``'s range or with an offset beyond
±14:00) are 400 with the field's name. What the shape allows but
PostgreSQL or the queue would refuse (NUL characters, unpaired surrogates, nesting deeper
than 64, numbers out of range) is checked by ``pgjobs.jobspec``, the same code every
producer goes through, and surfaces as 422.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgjobs.errors import InvalidJobError
from pgjobs.gateway.limits import ApiError, bad_request
from pgjobs.jobspec import DEFAULT_MAX_ATTEMPTS, JobSpec, parse_time

ENQUEUE_FIELDS = frozenset({"jobType", "input", "sourceTaskId", "priority", "runAt", "maxAttempts"})
STREAM_TOKEN_FIELDS = frozenset({"jobId", "ttlSeconds"})


def _reject_unknown(body: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        shown = json.dumps(unknown[0])[:80]
        bad_request(f"unknown field {shown}; allowed: {', '.join(sorted(allowed))}")


def _optional_int(body: dict[str, Any], name: str, default: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        bad_request(f"{name} must be an integer")
    return value


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        bad_request(f"{name} must be a string")
    return value


def parse_enqueue(body: dict[str, Any], company_id: str, max_input_bytes: int) -> JobSpec:
    _reject_unknown(body, ENQUEUE_FIELDS)
    job_type = body.get("jobType")
    if job_type is None or (isinstance(job_type, str) and not job_type.strip()):
        bad_request("jobType is required")
    if not isinstance(job_type, str):
        bad_request("jobType must be a string")
    job_input = body.get("input")
    if job_input is None:
        job_input = {}
    if not isinstance(job_input, dict):
        bad_request("input must be a JSON object")
    run_at: datetime | None = None
    raw_run_at = _optional_str(body, "runAt")
    if raw_run_at is not None:
        # A time out of range is a malformed field here (400), like an unparseable one.
        try:
            run_at = parse_time(raw_run_at, "runAt")
        except InvalidJobError as exc:
            bad_request(str(exc))
    # JobSpec checks everything jsonb and the schema would refuse (raises InvalidJobError,
    # answered with 422).
    spec = JobSpec(
        company_id=company_id,
        job_type=job_type,
        input=job_input,
        source_task_id=_optional_str(body, "sourceTaskId"),
        priority=_optional_int(body, "priority", 0),
        run_at=run_at,
        max_attempts=_optional_int(body, "maxAttempts", DEFAULT_MAX_ATTEMPTS),
    )
    if len(spec.input_json().encode()) > max_input_bytes:
        raise ApiError(413, f"input is larger than {max_input_bytes} bytes")
    return spec


@dataclass(frozen=True, slots=True)
class StreamTokenRequest:
    job_id: uuid.UUID | None
    ttl_seconds: int


def parse_stream_token_request(body: dict[str, Any], max_ttl: int) -> StreamTokenRequest:
    _reject_unknown(body, STREAM_TOKEN_FIELDS)
    raw_job = _optional_str(body, "jobId")
    job_id: uuid.UUID | None = None
    if raw_job is not None:
        try:
            job_id = uuid.UUID(raw_job)
        except ValueError:
            raise ApiError(404, "Job not found") from None
    ttl = _optional_int(body, "ttlSeconds", max_ttl)
    if not 1 <= ttl <= max_ttl:
        bad_request(f"ttlSeconds must be between 1 and {max_ttl}")
    return StreamTokenRequest(job_id, ttl)


RETRY_FAILED_FIELDS = frozenset({"jobType", "sourceTaskId", "limit", "dryRun"})


@dataclass(frozen=True, slots=True)
class RetryFailedRequest:
    job_type: str | None
    source_task_id: str | None
    limit: int
    dry_run: bool


def parse_retry_failed(body: dict[str, Any], max_limit: int) -> RetryFailedRequest:
    _reject_unknown(body, RETRY_FAILED_FIELDS)
    filters = {name: _optional_str(body, name) for name in ("jobType", "sourceTaskId")}
    for name, value in filters.items():
        if value is not None and (not value or len(value) > 200 or "\x00" in value):
            bad_request(f"{name} must be 1 to 200 characters, with no NUL")
    limit = _optional_int(body, "limit", max_limit)
    if not 1 <= limit <= max_limit:
        bad_request(f"limit must be between 1 and {max_limit}")
    dry_run = body.get("dryRun", False)
    if not isinstance(dry_run, bool):
        bad_request("dryRun must be true or false")
    return RetryFailedRequest(filters["jobType"], filters["sourceTaskId"], limit, dry_run)
