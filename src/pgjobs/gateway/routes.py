"""The HTTP API: every route, its authorisation and its JSON (see docs/gateway.md).

Authorisation is the same three steps everywhere: a verified token (401 without one), the
token's company equal to the path's company (403 otherwise), then every read and write
scoped by that company in SQL, so another company's job or asset id is simply not found
(404), exactly like an id that never existed.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import Any
from urllib.parse import quote

import psycopg
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from pgjobs import db, metrics
from pgjobs.client import MAX_PAGE_SIZE
from pgjobs.errors import InvalidJobError
from pgjobs.gateway import auth, companystream, idempotency, openapi, payloads, sse
from pgjobs.gateway.auth import GATEWAY_QUERIES, Principal
from pgjobs.gateway.eventstream import EventStream
from pgjobs.gateway.limits import ApiError, bad_request, query_int, query_text, read_json_object
from pgjobs.gateway.responses import ApiJSONResponse, asset_json, error
from pgjobs.gateway.state import LISTEN_ADVICE, GatewayState
from pgjobs.types import Job, JobStatus, iso

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
STATS_WINDOW_SECONDS = 3600  # "done / failed in the last hour"
TIMELINE_PAGE = 500  # audit rows per page of a job's timeline
MAX_BULK_RETRY = 1000  # failed jobs one bulk retry may queue again
MAX_CURSOR_LENGTH = 200
STATUSES = frozenset(s.value for s in JobStatus)


class Api:
    def __init__(self, state: GatewayState) -> None:
        self.state = state

    # -- authorisation ----------------------------------------------------------------

    async def authorize(
        self, request: Request, *, stream_job: uuid.UUID | None = None, stream: bool = False
    ) -> Principal:
        """The caller, allowed to act for the path's company, or 401/403.

        ``stream`` routes also accept ``?streamToken=`` (EventSource cannot send headers);
        ``stream_job`` is the job whose events are asked for (None: the company stream).
        A stream token is good only while its parent API token is active: one primary-key
        read, a stream set-up read (it takes its turn for the pool, see sse.setup_read).
        A database it cannot reach raises psycopg.OperationalError or TimeoutError: a
        503 on most routes, a reconnect hint on the stream routes (_authorize_stream).
        """
        company_id: str = request.path_params["companyId"]
        principal: Principal | None = None
        header = request.headers.get("authorization")
        stream_token = request.query_params.get("streamToken") if stream else None
        if header is not None:
            principal = await self._api_token(header)
        elif stream_token:
            principal = auth.verify_stream_token(self.state.settings.secret, stream_token)
            if principal is not None:
                parent = await sse.setup_read(
                    self.state,
                    "token_get_active_by_id",
                    {"id": principal.token_id, "company_id": principal.company_id},
                )
                if not parent:
                    principal = None  # its API token was revoked
        if principal is None:
            raise ApiError(401, "missing or invalid token", {"WWW-Authenticate": "Bearer"})
        if principal.operator:
            return dataclasses.replace(principal, company_id=company_id)
        if principal.company_id != company_id:
            raise ApiError(403, "this token does not grant access to this company")
        if principal.job_scope is not None and (not stream or principal.job_scope != stream_job):
            raise ApiError(403, "this stream token is for another job")
        return principal

    async def _api_token(self, header: str) -> Principal | None:
        """The caller named by an ``Authorization: Bearer`` header, if its token is valid."""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        async with self.state.pool.connection() as conn:
            return await auth.verify_api_token(conn, token.strip())

    async def bearer(self, request: Request) -> Principal:
        """The caller of a route without a company in its path, by its API token (401
        without a valid one)."""
        principal = await self._api_token(request.headers.get("authorization") or "")
        if principal is None:
            raise ApiError(401, "missing or invalid token", {"WWW-Authenticate": "Bearer"})
        return principal

    # -- service ----------------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        return ApiJSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        checks: dict[str, str] = {}
        try:
            async with self.state.pool.connection(timeout=2.0) as conn:
                await conn.execute(GATEWAY_QUERIES["gateway_check_ready"])
            checks["database"] = "ok"
        except Exception as exc:  # any failure means "not ready", and says why
            checks["database"] = f"unavailable: {type(exc).__name__}"
        listener = self.state.listener
        if listener.connected.is_set():
            checks["listener"] = "ok"
        elif listener.unavailable is not None:
            # Not a passing outage: streams stay silent until the operator fixes the DSN.
            checks["listener"] = f"unavailable: {listener.unavailable}; {LISTEN_ADVICE}"
        else:
            checks["listener"] = "reconnecting"
        ready = all(v == "ok" for v in checks.values())
        return ApiJSONResponse(
            {"status": "ready" if ready else "unavailable", "checks": checks},
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "1"},
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus metrics (pgjobs.metrics). Unauthenticated like /healthz: no family
        carries a company id; restrict the path at the proxy if job types are private."""
        return Response(
            await self.state.render_metrics(),
            media_type=metrics.CONTENT_TYPE,
            headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
        )

    async def openapi(self, request: Request) -> Response:
        return ApiJSONResponse(openapi.SCHEMA)

    async def whoami(self, request: Request) -> Response:
        """Which company an API token acts for: how the dashboard, given only a token,
        learns the company its paths name (none for an operator, who picks one)."""
        principal = await self.bearer(request)
        return ApiJSONResponse(
            {"companyId": principal.company_id or None, "operator": principal.operator}
        )

    # -- jobs -------------------------------------------------------------------------

    async def enqueue(self, request: Request) -> Response:
        principal = await self.authorize(request)
        settings = self.state.settings
        key = idempotency.parse_key(request.headers.get(idempotency.HEADER))
        body = await read_json_object(request, settings.max_body_bytes)
        spec = payloads.parse_enqueue(body, principal.company_id, settings.max_input_bytes)
        await self._check_job_type(spec.job_type)
        headers: dict[str, str] = {}
        if key is None:
            (job,) = await self.state.client.enqueue_many([spec])
            answer = idempotency.accepted_body(job)
        else:
            async with self.state.pool.connection() as conn:
                outcome = await idempotency.enqueue_once(
                    conn,
                    self.state.client,
                    spec,
                    key=key,
                    request_hash=idempotency.fingerprint(body),
                    ttl_seconds=settings.idempotency_seconds,
                    wait_seconds=settings.idempotency_wait_seconds,
                )
            answer = outcome.body
            if outcome.replayed:
                headers["Idempotent-Replayed"] = "true"
        company = quote(spec.company_id, safe="")
        headers["Location"] = f"/api/companies/{company}/content-jobs/{answer['jobId']}"
        return ApiJSONResponse(answer, status_code=202, headers=headers)

    async def _check_job_type(self, job_type: str) -> None:
        settings = self.state.settings
        if settings.job_types is not None and job_type not in settings.job_types:
            raise ApiError(422, "jobType is not accepted by this gateway")
        if settings.require_live_worker:
            async with self.state.pool.connection() as conn:
                cur = await conn.execute(
                    GATEWAY_QUERIES["worker_job_type_live"],
                    {
                        "job_type": job_type,
                        "within_seconds": settings.live_worker_seconds,
                        "now": None,
                    },
                )
                row = await cur.fetchone()
            if not row or not row["live"]:
                raise ApiError(422, "no live worker handles this jobType")

    async def list_jobs(self, request: Request) -> Response:
        principal = await self.authorize(request)
        status = request.query_params.get("status") or None
        if status is not None and status not in STATUSES:
            bad_request(f"status must be one of {', '.join(sorted(STATUSES))}")
        limit = query_int(request, "limit", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        cursor = request.query_params.get("cursor") or None
        if cursor is not None and len(cursor) > MAX_CURSOR_LENGTH:
            bad_request("cursor is malformed; pass back an X-Next-Cursor value unchanged")
        try:
            page = await self.state.client.list(
                principal.company_id,
                status=status,
                limit=limit,
                cursor=cursor,
                job_type=query_text(request, "jobType"),
                source_task_id=query_text(request, "sourceTaskId"),
            )
        except InvalidJobError:
            bad_request("cursor is malformed; pass back an X-Next-Cursor value unchanged")
        headers = {"X-Next-Cursor": page.next_cursor} if page.next_cursor else None
        return ApiJSONResponse(await self._jobs_json(page.jobs), headers=headers)

    async def get_job(self, request: Request) -> Response:
        principal = await self.authorize(request)
        job = await self.state.client.get(principal.company_id, request.path_params["jobId"])
        return ApiJSONResponse((await self._jobs_json([job]))[0])

    async def job_timeline(self, request: Request) -> Response:
        """A page of the job's audit log: every transition with its time, worker and
        payload, oldest first; ``X-Next-Cursor`` (a seq, passed back as ``after``) while
        more remain. A failed attempt's traceback only for an operator's token: it shows
        server internals."""
        principal = await self.authorize(request)
        job = await self.state.client.get(principal.company_id, request.path_params["jobId"])
        after = query_int(request, "after", 0, 0, 2**31 - 1)
        limit = query_int(request, "limit", TIMELINE_PAGE, 1, TIMELINE_PAGE)
        params = {
            "job_id": job.id,
            "company_id": principal.company_id,
            "after_seq": after,
            "limit": limit + 1,  # one more tells whether another page exists
        }
        async with self.state.pool.connection() as conn:
            cur = await conn.execute(GATEWAY_QUERIES["job_events_page_for_company"], params)
            rows = await cur.fetchall()
        events = []
        for row in rows[:limit]:
            payload = dict(row["payload"])
            traceback = payload.pop("traceback", None)
            event = {
                "seq": row["seq"],
                "type": row["type"],
                "status": row["status"],
                "attempt": row["attempt"],
                "workerId": row["worker_id"],
                "createdAt": iso(row["created_at"]),
                "payload": payload,
            }
            if principal.operator and traceback is not None:
                event["traceback"] = traceback
            events.append(event)
        headers = {"X-Next-Cursor": str(events[-1]["seq"])} if len(rows) > limit else None
        return ApiJSONResponse(events, headers=headers)

    async def retry_failed(self, request: Request) -> Response:
        """Operators: queue the company's failed jobs again (optionally one job type's, one
        source task's), at most ``limit`` (1 to 1,000) in one audited statement. With
        ``dryRun`` only count them, so the count can be confirmed first."""
        principal = await self.authorize(request)
        if not principal.operator:
            raise ApiError(403, "only an operator token may retry failed jobs in bulk")
        body = await read_json_object(request, 16 * 1024, optional=True) or {}
        req = payloads.parse_retry_failed(body, MAX_BULK_RETRY)
        params = {
            "company_id": principal.company_id,
            "job_type": req.job_type,
            "source_task_id": req.source_task_id,
            "limit": req.limit,
            "now": None,
        }
        async with self.state.pool.connection() as conn:
            if req.dry_run:
                cur = await conn.execute(GATEWAY_QUERIES["job_count_failed_matching"], params)
                row = await cur.fetchone()
                assert row is not None  # count(*): always one row
                return ApiJSONResponse({"failed": row["n"], "limit": req.limit})
            cur = await conn.execute(GATEWAY_QUERIES["job_retry_failed_matching"], params)
            ids = [str(row["id"]) for row in await cur.fetchall()]
        log.info("%d failed job(s) of %s queued again in bulk", len(ids), principal.company_id)
        return ApiJSONResponse({"retried": len(ids), "jobIds": ids}, status_code=202)

    async def job_types(self, request: Request) -> Response:
        """The job types some live worker serves: what a job can be submitted as and run."""
        await self.authorize(request)
        params = {"within_seconds": self.state.settings.live_worker_seconds, "now": None}
        async with self.state.pool.connection() as conn:
            cur = await conn.execute(GATEWAY_QUERIES["worker_job_types_live"], params)
            types = [row["job_type"] for row in await cur.fetchall()]
        return ApiJSONResponse({"jobTypes": types})

    async def workers(self, request: Request) -> Response:
        """The live workers (host, pid, concurrency, job types, heartbeat, jobs held):
        shared infrastructure, so for operator tokens only."""
        principal = await self.bearer(request)
        if not principal.operator:
            raise ApiError(403, "only an operator token may list the workers")
        params = {"within_seconds": self.state.settings.live_worker_seconds, "now": None}
        async with self.state.pool.connection() as conn:
            cur = await conn.execute(GATEWAY_QUERIES["worker_list_live"], params)
            rows = await cur.fetchall()
        return ApiJSONResponse(
            [
                {
                    "id": row["id"],
                    "hostname": row["hostname"],
                    "pid": row["pid"],
                    "jobTypes": list(row["job_types"]),
                    "concurrency": row["concurrency"],
                    "running": row["running"],
                    "startedAt": iso(row["started_at"]),
                    "lastHeartbeatAt": iso(row["last_heartbeat_at"]),
                }
                for row in rows
            ]
        )

    async def _jobs_json(self, jobs: list[Job]) -> list[dict[str, Any]]:
        """Jobs as JSON; a queued one also gets ``servedBy``, the number of live workers
        that claim its type (0: it stays queued until a worker with its handler runs)."""
        queued = [j.job_type for j in jobs if j.status is JobStatus.QUEUED]
        served_by = await self.state.client.live_workers(
            queued, within_seconds=self.state.settings.live_worker_seconds
        )
        out = []
        for job in jobs:
            data = job.to_json()
            if job.status is JobStatus.QUEUED:
                data["servedBy"] = served_by.get(job.job_type, 0)
            out.append(data)
        return out

    async def cancel(self, request: Request) -> Response:
        principal = await self.authorize(request)
        job = await self.state.client.cancel(principal.company_id, request.path_params["jobId"])
        return ApiJSONResponse(job.to_json(), status_code=202)

    async def retry(self, request: Request) -> Response:
        principal = await self.authorize(request)
        job = await self.state.client.retry(principal.company_id, request.path_params["jobId"])
        return ApiJSONResponse((await self._jobs_json([job]))[0], status_code=202)

    async def stats(self, request: Request) -> Response:
        """The company's jobs per type: queued (due), scheduled, running, and done and
        failed in the last hour (the query says what each costs)."""
        principal = await self.authorize(request)
        params: dict[str, Any] = {
            "company_id": principal.company_id,
            "window_seconds": STATS_WINDOW_SECONDS,
            "now": None,
        }
        async with self.state.pool.connection() as conn:
            cur = await conn.execute(GATEWAY_QUERIES["job_events_window_start_xid"], params)
            start = await cur.fetchone()
            assert start is not None  # coalesce(...): always one row
            params["since_xid"] = start["xid"]
            cur = await conn.execute(GATEWAY_QUERIES["job_stats_by_company"], params)
            rows = await cur.fetchall()
            cur = await conn.execute(GATEWAY_QUERIES["job_completions_per_minute"], params)
            per_minute = _per_minute(await cur.fetchall())
        return ApiJSONResponse(
            {
                "windowSeconds": STATS_WINDOW_SECONDS,
                **_stats_json(rows),
                # Done jobs per minute over the window, oldest minute first.
                "completionsPerMinute": per_minute,
            }
        )

    async def all_stats(self, request: Request) -> Response:
        """Operators: the company stats of every company that has a job, per company and
        job type, with the same figures summed per job type and over all."""
        principal = await self.bearer(request)
        if not principal.operator:
            raise ApiError(403, "only an operator token may see every company")
        params: dict[str, Any] = {"window_seconds": STATS_WINDOW_SECONDS, "now": None}
        async with self.state.pool.connection() as conn:
            cur = await conn.execute(GATEWAY_QUERIES["job_list_companies"])
            companies = [row["company_id"] for row in await cur.fetchall()]
            cur = await conn.execute(GATEWAY_QUERIES["job_stats_all_companies"], params)
            rows = await cur.fetchall()
            cur = await conn.execute(
                GATEWAY_QUERIES["job_completions_per_minute_all_companies"], params
            )
            per_minute = _per_minute(await cur.fetchall())
        by_company: dict[str, list[dict[str, Any]]] = {c: [] for c in companies}
        by_type: dict[str, dict[str, Any]] = {}
        for row in rows:
            # A company whose first job committed after the list was read: listed too.
            by_company.setdefault(row["company_id"], []).append(row)
            merged = by_type.setdefault(
                row["job_type"], {"job_type": row["job_type"], "oldest_queued_at": None}
            )
            for name in _COUNTS:
                merged[name] = merged.get(name, 0) + row[name]
            oldest = row["oldest_queued_at"]
            if oldest is not None and (
                merged["oldest_queued_at"] is None or oldest < merged["oldest_queued_at"]
            ):
                merged["oldest_queued_at"] = oldest
        return ApiJSONResponse(
            {
                "windowSeconds": STATS_WINDOW_SECONDS,
                "companies": [
                    {"companyId": company, **_stats_json(company_rows)}
                    for company, company_rows in sorted(by_company.items())
                ],
                **_stats_json([by_type[t] for t in sorted(by_type)]),
                "completionsPerMinute": per_minute,
            }
        )

    # -- event streams ----------------------------------------------------------------

    def _stream(
        self,
        frames: AsyncGenerator[bytes, None],
        release: Callable[[], None] | None = None,
        principal: Principal | None = None,
    ) -> EventStream:
        # The stream slot and the fan-out subscription are taken before the response
        # starts (an over-cap client gets a real 429; the subscription exists before the
        # job is read) and given back by the response however it ends. A stream that
        # follows events is tracked by its principal's API token, so that revoking the
        # token ends it (pgjobs.gateway.revocation).
        settings = self.state.settings
        if principal is None:
            done = release
        else:
            revocations, token_id = self.state.revocations, principal.token_id

            def done() -> None:
                revocations.untrack(token_id, stream)
                if release is not None:
                    release()

        stream = EventStream(
            frames,
            done,
            ping_seconds=settings.ping_seconds,
            send_timeout=settings.send_timeout_seconds,
        )
        if principal is not None:
            revocations.track(token_id, stream)
        return stream

    async def _authorize_stream(
        self, request: Request, stream_job: uuid.UUID | None = None
    ) -> Principal | Response:
        """authorize() for a stream route: a database it cannot reach to check a token
        gets a 200 stream that asks the client to reconnect later, as the streams' own
        reads do (EventSource never comes back after a 503)."""
        try:
            return await self.authorize(request, stream=True, stream_job=stream_job)
        except (psycopg.OperationalError, TimeoutError) as exc:  # PoolTimeout included
            log.warning("event stream could not check its token: %s", db.describe_error(exc))
            return self._stream(sse.only(sse.reconnect_frame()))

    async def job_events(self, request: Request) -> Response:
        try:
            job_id: uuid.UUID | None = uuid.UUID(request.path_params["jobId"])
        except ValueError:
            job_id = None
        principal = await self._authorize_stream(request, job_id)
        if isinstance(principal, Response):
            return principal
        if job_id is None:
            return self._stream(sse.only(sse.NOT_FOUND_FRAME))
        try:
            last = sse.parse_job_cursor(request.headers.get("last-event-id"))
        except ValueError as exc:
            bad_request(str(exc))
        company_id = principal.company_id
        fanout, slots = self.state.fanout, self.state.slots
        slots.acquire(company_id)
        # Subscribe first, read second: an event committed after the read still reaches us.
        sub = fanout.subscribe_job(company_id, job_id)

        def release() -> None:
            fanout.unsubscribe(sub)
            slots.release(company_id)

        try:
            try:
                job = await sse.load_job(self.state, company_id, job_id)
            except (psycopg.OperationalError, TimeoutError) as exc:  # pool busy, database down
                log.warning("job stream %s could not start: %s", job_id, db.describe_error(exc))
                release()
                return self._stream(sse.only(sse.reconnect_frame()))
            if job is None:
                release()
                return self._stream(sse.only(sse.NOT_FOUND_FRAME))
            if last is not None and last > job["event_seq"]:
                last = None  # not an id this job has issued: start from its current state
            if last == job["event_seq"] and job["status"] in sse.TERMINAL:
                # The client has the final event; 204 tells EventSource not to reconnect.
                release()
                return Response(status_code=204)
            return self._stream(sse.job_stream(self.state, sub, job, last), release, principal)
        except BaseException:
            release()
            raise

    async def company_events(self, request: Request) -> Response:
        principal = await self._authorize_stream(request)
        if isinstance(principal, Response):
            return principal
        try:
            cursor = companystream.parse_company_cursor(request.headers.get("last-event-id"))
        except ValueError as exc:
            bad_request(str(exc))
        company_id = principal.company_id
        fanout, slots, feeds = self.state.fanout, self.state.slots, self.state.company_feeds
        slots.acquire(company_id)
        sub = fanout.subscribe_company(company_id)
        try:
            # Join the company's feed before the response starts: a page that reads its
            # jobs once the stream is open then misses no event committed in between.
            feed, client, feed_cursor = await feeds.attach(company_id)
        except psycopg.OperationalError as exc:  # PoolTimeout included
            fanout.unsubscribe(sub)
            slots.release(company_id)
            log.warning("company stream could not start: %s", db.describe_error(exc))
            return self._stream(sse.only(sse.reconnect_frame()))
        except BaseException:
            fanout.unsubscribe(sub)
            slots.release(company_id)
            raise

        def release() -> None:
            feeds.detach(feed, client)
            fanout.unsubscribe(sub)
            slots.release(company_id)

        try:
            frames = companystream.company_stream(self.state, sub, cursor, client, feed_cursor)
            response = self._stream(frames, release, principal)
            # The feed writes to the stream itself while it waits (companystream).
            client.push = response.push
            return response
        except BaseException:
            release()
            raise

    async def stream_token(self, request: Request) -> Response:
        principal = await self.authorize(request)
        settings = self.state.settings
        body = await read_json_object(request, 16 * 1024, optional=True)
        req = payloads.parse_stream_token_request(body, settings.stream_token_max_seconds)
        if req.job_id is not None:
            # Only for a job the caller can see: a token for another company's job id
            # would be useless, but issuing it would confirm nothing either way.
            await self.state.client.get(principal.company_id, req.job_id)
        token, expires = auth.mint_stream_token(
            settings.secret,
            principal.company_id,
            req.job_id,
            req.ttl_seconds,
            parent=principal.token_id,
        )
        return ApiJSONResponse({"token": token, "expiresAt": expires.isoformat()}, status_code=201)

    # -- assets -----------------------------------------------------------------------

    async def _asset(self, request: Request) -> Any:
        principal = await self.authorize(request)
        asset = await self.state.client.get_asset(
            principal.company_id, request.path_params["assetId"]
        )
        if asset is None:
            raise ApiError(404, "Asset not found")
        return asset

    async def get_asset(self, request: Request) -> Response:
        return ApiJSONResponse(asset_json(await self._asset(request)))

    async def get_asset_content(self, request: Request) -> Response:
        asset = await self._asset(request)
        etag = f'"{asset.sha256}"'
        headers = {
            "ETag": etag,
            "Content-Length": str(asset.byte_size),
            # Generated files (SVG!) could carry script; never let them run or be sniffed
            # as something else on the API's origin.
            "X-Content-Type-Options": "nosniff",
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "private, max-age=31536000, immutable",
        }
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers={"ETag": etag})
        if not await self.state.storage.exists(asset.object_key):
            return error(404, "Asset content not found")
        return StreamingResponse(
            self.state.storage.read(asset.object_key),
            media_type=asset.content_type,
            headers=headers,
        )


_COUNTS = ("queued", "scheduled", "running", "done", "failed")


def _stats_json(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Stats rows (one per job type) as the API shows them: per type, and the totals."""
    return {
        "jobTypes": [
            {
                "jobType": row["job_type"],
                **{name: row[name] for name in _COUNTS},
                "oldestQueuedAt": iso(row["oldest_queued_at"]),
            }
            for row in rows
        ],
        "totals": {name: sum(row[name] for row in rows) for name in _COUNTS},
    }


def _per_minute(rows: list[dict[str, Any]]) -> list[int]:
    """Completions per minute over the stats window, oldest minute first, from rows of
    (minutes_ago, completed)."""
    per_minute = [0] * (STATS_WINDOW_SECONDS // 60)
    for minute in rows:
        if 0 <= minute["minutes_ago"] < len(per_minute):
            per_minute[-1 - minute["minutes_ago"]] = minute["completed"]
    return per_minute


def routes(api: Api) -> list[BaseRoute]:
    company = "/api/companies/{companyId}"
    job = company + "/content-jobs/{jobId}"
    return [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
        Route("/api/whoami", api.whoami, methods=["GET"]),
        Route("/api/workers", api.workers, methods=["GET"]),
        Route(company + "/job-types", api.job_types, methods=["GET"]),
        Route(company + "/retry-failed", api.retry_failed, methods=["POST"]),
        Route(company + "/content-jobs", api.enqueue, methods=["POST"]),
        Route(company + "/content-jobs", api.list_jobs, methods=["GET"]),
        Route(job, api.get_job, methods=["GET"]),
        Route(job + "/cancel", api.cancel, methods=["POST"]),
        Route(job + "/retry", api.retry, methods=["POST"]),
        Route(job + "/events", api.job_events, methods=["GET"]),
        Route(job + "/timeline", api.job_timeline, methods=["GET"]),
        Route(company + "/events", api.company_events, methods=["GET"]),
        Route(company + "/stats", api.stats, methods=["GET"]),
        Route("/api/stats", api.all_stats, methods=["GET"]),
        Route(company + "/stream-tokens", api.stream_token, methods=["POST"]),
        Route(company + "/assets/{assetId}", api.get_asset, methods=["GET"]),
        Route(company + "/assets/{assetId}/content", api.get_asset_content, methods=["GET"]),
    ]
