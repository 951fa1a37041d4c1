"""The OpenAPI 3.1 description served at /openapi.json, written by hand.

A test compares its paths and methods with the app's routes, both ways, and the fuzz
tests draw requests from it, so it cannot silently drift from what the gateway serves.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_NULLABLE_STR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_NULLABLE_TIME = {"type": ["string", "null"], "format": "date-time"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed request (bad JSON, wrong field type, out-of-range parameter)",
        401: "Missing or invalid token",
        403: "The token belongs to another company (or another job, for a stream token)",
        404: "Not found in this company",
        409: "The job's status does not allow this",
        413: "Request body or input too large",
        415: "A body whose Content-Type is not application/json (a UTF-8 charset is fine)",
        422: "Input PostgreSQL cannot store, or a value out of range",
        429: "Too many open event streams",
        503: "Database busy or unavailable; see Retry-After",
    }
    return {str(code): _json(_ERROR, text[code]) for code in codes}


_COMPANY = {"name": "companyId", "in": "path", "required": True, "schema": {"type": "string"}}
_JOB = {"name": "jobId", "in": "path", "required": True, "schema": {"type": "string"}}
_ASSET = {"name": "assetId", "in": "path", "required": True, "schema": {"type": "string"}}
_LAST_EVENT_ID = {
    "name": "Last-Event-ID",
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "Resume after this event id (sent by EventSource on reconnect)",
}
_STREAM_TOKEN = {
    "name": "streamToken",
    "in": "query",
    "required": False,
    "schema": {"type": "string"},
    "description": "A token from POST .../stream-tokens, for clients that cannot send headers",
}
_SSE_EVENTS = (
    "text/event-stream. Every event is `event: status` with data {jobId, status, type, "
    "attempt, seq, progress?, resultAssetId?, errorMessage?, runAt?}; `type` is the "
    "transition (content_job.queued, content_job.progress, ...)"
)
_SSE = {
    "description": _SSE_EVENTS,
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}
_AUTH_ERRORS = (401, 403, 503)
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": '^"?[!#-\\[\\]-~]{1,255}"?$'},
    "description": (
        "Makes a retried POST safe (IETF httpapi Idempotency-Key draft): within "
        "PGJOBS_GATEWAY_IDEMPOTENCY_SECONDS (24 h) of the key's first use, a POST with the "
        "same key and the same body (compared as canonical JSON) gets the first response "
        "again (202, same jobId and createdAt, Idempotent-Replayed: true) and creates "
        "nothing. 1 to 255 printable ASCII characters without spaces, quotes or "
        'backslashes, bare or as a quoted string ("...").'
    ),
}
_IDEMPOTENCY_ERRORS = {
    "400": _json(_ERROR, "Malformed request, or a malformed Idempotency-Key"),
    "409": _json(
        _ERROR,
        "A request with this Idempotency-Key is still being processed (it held the key "
        "longer than PGJOBS_GATEWAY_IDEMPOTENCY_WAIT_SECONDS); retry later",
    ),
    "422": _json(
        _ERROR,
        "Input PostgreSQL cannot store, a value out of range, or an Idempotency-Key "
        "already used with a different request body",
    ),
}

SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "pgjobs gateway",
        "version": "1",
        "description": "Submit content jobs and watch them live over Server-Sent Events.",
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "EnqueueRequest": {
                "type": "object",
                "required": ["jobType"],
                "additionalProperties": False,
                "properties": {
                    "jobType": {"type": "string", "minLength": 1, "maxLength": 200},
                    "input": {"type": ["object", "null"]},
                    "sourceTaskId": {"type": ["string", "null"], "maxLength": 200},
                    "priority": {"type": ["integer", "null"]},
                    "runAt": {"type": ["string", "null"], "format": "date-time"},
                    "maxAttempts": {"type": ["integer", "null"], "minimum": 1, "maximum": 1000},
                },
            },
            "Enqueued": {
                "type": "object",
                "required": ["jobId", "status", "createdAt"],
                "properties": {
                    "jobId": {"type": "string", "format": "uuid"},
                    "status": {"const": "queued"},
                    "createdAt": _TIME,
                },
            },
            "Stats": {
                "type": "object",
                "required": ["windowSeconds", "jobTypes", "totals", "completionsPerMinute"],
                "properties": {
                    "windowSeconds": {"type": "integer"},
                    "completionsPerMinute": {
                        "type": "array",
                        "items": {"type": "integer"},
                        "description": "Done jobs in each minute of the window, oldest first",
                    },
                    "jobTypes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": [
                                "jobType",
                                "queued",
                                "scheduled",
                                "running",
                                "done",
                                "failed",
                                "oldestQueuedAt",
                            ],
                            "properties": {
                                "jobType": {"type": "string"},
                                "queued": {"type": "integer"},
                                "scheduled": {"type": "integer"},
                                "running": {"type": "integer"},
                                "done": {"type": "integer"},
                                "failed": {"type": "integer"},
                                "oldestQueuedAt": _NULLABLE_TIME,
                            },
                        },
                    },
                    "totals": {"type": "object"},
                },
            },
            "Job": {
                "type": "object",
                "required": [
                    "id",
                    "companyId",
                    "jobType",
                    "status",
                    "input",
                    "result",
                    "resultAssetId",
                    "errorMessage",
                    "sourceTaskId",
                    "attempts",
                    "maxAttempts",
                    "seq",
                    "progress",
                    "startedAt",
                    "finishedAt",
                    "createdAt",
                    "updatedAt",
                ],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "companyId": {"type": "string"},
                    "jobType": {"type": "string"},
                    "status": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                    "input": {"type": "object"},
                    "result": {},
                    "resultAssetId": {"type": ["string", "null"], "format": "uuid"},
                    "errorMessage": _NULLABLE_STR,
                    "sourceTaskId": _NULLABLE_STR,
                    "attempts": {"type": "integer"},
                    "maxAttempts": {"type": "integer"},
                    "seq": {
                        "type": "integer",
                        "description": "The seq of the last event this state reflects",
                    },
                    "progress": {
                        "type": ["object", "null"],
                        "properties": {
                            "fraction": {"type": ["number", "null"]},
                            "message": _NULLABLE_STR,
                        },
                    },
                    "startedAt": _NULLABLE_TIME,
                    "finishedAt": _NULLABLE_TIME,
                    "createdAt": _TIME,
                    "updatedAt": _TIME,
                    "servedBy": {
                        "type": "integer",
                        "minimum": 0,
                        "description": "Queued jobs only: live workers that claim this "
                        "jobType. 0: no worker has its handler, and the job stays queued "
                        "until one starts.",
                    },
                },
            },
            "Asset": {
                "type": "object",
                "required": [
                    "id",
                    "companyId",
                    "contentType",
                    "byteSize",
                    "sha256",
                    "originalFilename",
                    "sourceTaskId",
                    "sourceJobId",
                    "createdAt",
                ],
                "properties": {
                    "id": {"type": "string", "format": "uuid"},
                    "companyId": {"type": "string"},
                    "contentType": {"type": "string"},
                    "byteSize": {"type": "integer"},
                    "sha256": {"type": "string"},
                    "originalFilename": _NULLABLE_STR,
                    "sourceTaskId": _NULLABLE_STR,
                    "sourceJobId": {"type": ["string", "null"], "format": "uuid"},
                    "createdAt": _TIME,
                },
            },
            "StreamTokenRequest": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "jobId": {"type": ["string", "null"], "format": "uuid"},
                    "ttlSeconds": {"type": ["integer", "null"], "minimum": 1, "maximum": 300},
                },
            },
            "StreamToken": {
                "type": "object",
                "required": ["token", "expiresAt"],
                "properties": {"token": {"type": "string"}, "expiresAt": _TIME},
            },
        },
    },
    "security": [{"bearer": []}],
    "paths": {
        "/": {
            "get": {
                "summary": "The dashboard (an HTML page; its files are under /static/)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "text/html",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/api/whoami": {
            "get": {
                "summary": "The company this API token acts for",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["companyId", "operator"],
                            "properties": {
                                "companyId": {"type": ["string", "null"]},
                                "operator": {"type": "boolean"},
                            },
                        },
                        "The token's company (null for an operator's token, which acts "
                        "for every company)",
                    ),
                    **_errors(401, 503),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness: the process answers",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "Alive")},
            }
        },
        "/readyz": {
            "get": {
                "summary": (
                    "Readiness: the database answers and the LISTEN connection is up "
                    "(checks.listener says 'unavailable: ...' and what to set when LISTEN "
                    "cannot deliver, as through PgBouncer's transaction mode)"
                ),
                "security": [],
                "responses": {
                    "200": _json({"type": "object"}, "Ready"),
                    "503": _json({"type": "object"}, "Not ready; see checks"),
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format); no family carries a company id",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format 0.0.4",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1")},
            }
        },
        "/api/companies/{companyId}/content-jobs": {
            "parameters": [_COMPANY],
            "post": {
                "summary": "Enqueue a job (committed before the response)",
                "parameters": [_IDEMPOTENCY_KEY],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/EnqueueRequest"}
                        }
                    },
                },
                "responses": {
                    "202": {
                        **_json(
                            {"$ref": "#/components/schemas/Enqueued"},
                            "Queued, or (with an Idempotency-Key used before with the same "
                            "body) the first response again, nothing created",
                        ),
                        "headers": {
                            "Location": {
                                "description": "The job's URL",
                                "schema": {"type": "string"},
                            },
                            "Idempotent-Replayed": {
                                "description": "true when this is a replayed response",
                                "schema": {"type": "string", "enum": ["true"]},
                            },
                        },
                    },
                    **_errors(401, 403, 413, 415, 503),
                    **_IDEMPOTENCY_ERRORS,
                },
            },
            "get": {
                "summary": "The company's jobs, newest first",
                "parameters": [
                    {
                        "name": "status",
                        "in": "query",
                        "schema": {"enum": ["queued", "running", "done", "failed", "cancelled"]},
                    },
                    {"name": "jobType", "in": "query", "schema": {"type": "string"}},
                    {"name": "sourceTaskId", "in": "query", "schema": {"type": "string"}},
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
                    },
                    {
                        "name": "cursor",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "The X-Next-Cursor header of the previous page",
                    },
                ],
                "responses": {
                    "200": {
                        **_json(
                            {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                            "A page of jobs",
                        ),
                        "headers": {
                            "X-Next-Cursor": {
                                "description": "Present when an older page exists",
                                "schema": {"type": "string"},
                            }
                        },
                    },
                    **_errors(400, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/content-jobs/{jobId}": {
            "parameters": [_COMPANY, _JOB],
            "get": {
                "summary": "One job",
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Job"}, "The job"),
                    **_errors(404, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/content-jobs/{jobId}/cancel": {
            "parameters": [_COMPANY, _JOB],
            "post": {
                "summary": "Cancel a queued or running job",
                "responses": {
                    "202": _json({"$ref": "#/components/schemas/Job"}, "Cancelled"),
                    **_errors(404, 409, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/content-jobs/{jobId}/retry": {
            "parameters": [_COMPANY, _JOB],
            "post": {
                "summary": "Queue a failed or cancelled job again",
                "responses": {
                    "202": _json({"$ref": "#/components/schemas/Job"}, "Queued again"),
                    **_errors(404, 409, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/content-jobs/{jobId}/events": {
            "parameters": [_COMPANY, _JOB],
            "get": {
                "summary": "The job's events, live (SSE). id = the job's event seq; ends after a "
                "terminal status",
                "parameters": [_LAST_EVENT_ID, _STREAM_TOKEN],
                "responses": {
                    "200": {
                        **_SSE,
                        "description": _SSE_EVENTS + ". An unknown job (or another "
                        'company\'s) gets one `event: error` with {"error": "Job not found"} '
                        "and a one-day `retry:`, then the end.",
                    },
                    "204": {"description": "Resumed after the job's last event: nothing more"},
                    **_errors(400, 429, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/content-jobs/{jobId}/timeline": {
            "parameters": [_COMPANY, _JOB],
            "get": {
                "summary": "A page of the job's audit log, oldest first: each transition's "
                "seq, type, status, attempt, workerId, createdAt and payload (a failed "
                "attempt's traceback for operator tokens only). X-Next-Cursor: pass as "
                "`after` for the next page",
                "parameters": [
                    {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                ],
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}, "Events"),
                    **_errors(400, 404, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/job-types": {
            "parameters": [_COMPANY],
            "get": {
                "summary": "The job types some live worker serves",
                "responses": {
                    "200": _json({"type": "object"}, '{"jobTypes": [...]}'),
                    **_errors(*_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/retry-failed": {
            "parameters": [_COMPANY],
            "post": {
                "summary": "Operator tokens: queue the company's failed jobs again (optionally "
                "of one jobType and sourceTaskId), at most `limit` (default and most 1,000) in "
                "one audited statement; with dryRun, only count them",
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": _json({"type": "object"}, '{"failed": n, "limit": n} (dryRun)'),
                    "202": _json({"type": "object"}, '{"retried": n, "jobIds": [...]}'),
                    **_errors(400, 413, 415, *_AUTH_ERRORS),
                },
            },
        },
        "/api/workers": {
            "get": {
                "summary": "The live workers: host, pid, concurrency, job types, heartbeat, "
                "jobs running (operator tokens only)",
                "responses": {
                    "200": _json({"type": "array", "items": {"type": "object"}}, "Workers"),
                    **_errors(401, 403, 503),
                },
            },
        },
        "/api/stats": {
            "get": {
                "summary": "Every company's stats, per company and job type, and summed per "
                "job type (operator tokens only)",
                "responses": {
                    "200": _json({"type": "object"}, "Counts per company and over all"),
                    **_errors(401, 403, 503),
                },
            },
        },
        "/api/companies/{companyId}/events": {
            "parameters": [_COMPANY],
            "get": {
                "summary": "All the company's job events, live (SSE), never ending. "
                "id = '<xid>-<eventId>'",
                "parameters": [_LAST_EVENT_ID, _STREAM_TOKEN],
                "responses": {"200": _SSE, **_errors(400, 429, *_AUTH_ERRORS)},
            },
        },
        "/api/companies/{companyId}/stats": {
            "parameters": [_COMPANY],
            "get": {
                "summary": "The company's jobs per type: queued (due), scheduled, running, "
                "and done and failed in the last hour",
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Stats"}, "Counts"),
                    **_errors(*_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/stream-tokens": {
            "parameters": [_COMPANY],
            "post": {
                "summary": "A short-lived token for ?streamToken= on the event routes",
                "requestBody": {
                    "required": False,
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/StreamTokenRequest"}
                        }
                    },
                },
                "responses": {
                    "201": _json({"$ref": "#/components/schemas/StreamToken"}, "Issued"),
                    **_errors(400, 404, 413, 415, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/assets/{assetId}": {
            "parameters": [_COMPANY, _ASSET],
            "get": {
                "summary": "An asset's metadata",
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Asset"}, "The asset"),
                    **_errors(404, *_AUTH_ERRORS),
                },
            },
        },
        "/api/companies/{companyId}/assets/{assetId}/content": {
            "parameters": [_COMPANY, _ASSET],
            "get": {
                "summary": "An asset's bytes, with its content type, Content-Length and "
                "ETag (its sha256)",
                "parameters": [
                    {"name": "If-None-Match", "in": "header", "schema": {"type": "string"}}
                ],
                "responses": {
                    "200": {
                        "description": "The bytes",
                        "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    "304": {"description": "Not modified"},
                    **_errors(404, *_AUTH_ERRORS),
                },
            },
        },
    },
}
