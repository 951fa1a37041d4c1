"""The REST contract: statuses, JSON shapes, pagination, assets, health and the OpenAPI
description, through a real uvicorn server."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from pathlib import Path

import psycopg
import pytest
from gateway_helpers import RunningGateway, serve_gateway, settings
from starlette.routing import Route

from pgjobs.gateway import openapi
from pgjobs.gateway.auth import GATEWAY_QUERIES
from pgjobs.storage import LocalStorage

JOBS = "/api/companies/acme/content-jobs"
JOB_KEYS = {
    "id", "companyId", "jobType", "status", "input", "result", "resultAssetId", "errorMessage",
    "sourceTaskId", "attempts", "maxAttempts", "seq", "progress", "startedAt", "finishedAt",
    "createdAt", "updatedAt",
}  # fmt: skip


async def test_enqueue_is_committed_before_the_202(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        r = await http.post(
            JOBS,
            json={
                "jobType": "render",
                "input": {"title": "hi", "nested": {"a": [1, 2.5, None, True]}},
                "sourceTaskId": "task-1",
                "priority": 5,
                "runAt": "2030-01-01T09:00:00Z",
                "maxAttempts": 7,
            },
        )
        assert r.status_code == 202, r.text
        body = r.json()
        assert set(body) == {"jobId", "status", "createdAt"}
        assert body["status"] == "queued"
        assert r.headers["location"] == f"{JOBS}/{body['jobId']}"
        # Another connection sees it at once: it was committed before the response.
        job = await gateway.state.client.get("acme", body["jobId"])
        assert job.max_attempts == 7
        assert job.priority == 5
        r = await http.get(f"{JOBS}/{body['jobId']}")
        assert r.status_code == 200
        got = r.json()
        # A queued job also says how many live workers claim its type (none here).
        assert set(got) == JOB_KEYS | {"servedBy"}
        assert got["servedBy"] == 0
        assert got["input"] == {"title": "hi", "nested": {"a": [1, 2.5, None, True]}}
        assert got["sourceTaskId"] == "task-1"
        assert got["maxAttempts"] == 7
        assert got["companyId"] == "acme"
        assert got["status"] == "queued"
        assert got["progress"] is None


@pytest.mark.parametrize("body", [{}, {"jobType": ""}, {"jobType": "   "}, {"jobType": None}])
async def test_missing_job_type_is_400(gateway: RunningGateway, body: dict[str, object]) -> None:
    async with gateway.http() as http:
        r = await http.post(JOBS, json=body)
    assert r.status_code == 400
    assert r.json() == {"error": "jobType is required"}


# A fixed id, not uuid4(): make test's two pytest processes must collect the same test ids.
UNKNOWN_JOB_ID = "2ed93efa-4e7e-4c6a-8581-cc195f758583"


@pytest.mark.parametrize("job_id", [UNKNOWN_JOB_ID, "not-a-uuid", "1", "%00", "x" * 300])
async def test_unknown_or_malformed_job_id_is_404(gateway: RunningGateway, job_id: str) -> None:
    async with gateway.http() as http:
        for method, suffix in (("GET", ""), ("POST", "/cancel"), ("POST", "/retry")):
            r = await http.request(method, f"{JOBS}/{job_id}{suffix}")
            assert r.status_code == 404, (method, suffix, r.text)
            assert r.json() == {"error": "Job not found"}


async def test_cancel_and_retry_202_or_409(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        job_id = (await http.post(JOBS, json={"jobType": "echo"})).json()["jobId"]
        r = await http.post(f"{JOBS}/{job_id}/retry")
        assert r.status_code == 409
        assert "queued" in r.json()["error"]
        r = await http.post(f"{JOBS}/{job_id}/cancel")
        assert r.status_code == 202
        assert r.json()["status"] == "cancelled"
        assert set(r.json()) == JOB_KEYS, "servedBy is for queued jobs only"
        r = await http.post(f"{JOBS}/{job_id}/cancel")
        assert r.status_code == 409
        r = await http.post(f"{JOBS}/{job_id}/retry")
        assert r.status_code == 202
        assert r.json()["status"] == "queued"
        assert r.json()["servedBy"] == 0


async def test_queued_jobs_say_how_many_live_workers_serve_their_type(
    gateway: RunningGateway,
) -> None:
    """Issue 14: a worker claims only its registry's types, so a queued job of a type no
    live worker has stays queued; the API shows it as servedBy 0."""
    async with gateway.http() as http:
        render = (await http.post(JOBS, json={"jobType": "render"})).json()["jobId"]
        echo = (await http.post(JOBS, json={"jobType": "echo"})).json()["jobId"]
        async with gateway.state.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO pgjobs.workers (id, hostname, pid, job_types, concurrency)"
                " VALUES ('w1', 'h', 1, '{echo,resize}', 1), ('w2', 'h', 2, '{echo}', 1),"
                " ('gone', 'h', 3, '{render}', 1)"
            )
            await conn.execute(
                "UPDATE pgjobs.workers SET last_heartbeat_at = now() - interval '1 hour'"
                " WHERE id = 'gone'"
            )
        listed = {j["id"]: j["servedBy"] for j in (await http.get(JOBS)).json()}
        assert listed == {render: 0, echo: 2}
        assert (await http.get(f"{JOBS}/{render}")).json()["servedBy"] == 0
        assert (await http.get(f"{JOBS}/{echo}")).json()["servedBy"] == 2


async def test_list_newest_first_with_filter_and_cursor(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        ids = []
        for i in range(5):
            r = await http.post(JOBS, json={"jobType": "echo", "input": {"i": i}})
            ids.append(r.json()["jobId"])
        await http.post(f"{JOBS}/{ids[0]}/cancel")
        # globex's jobs never show up in acme's list.
        async with gateway.http("globex") as other:
            await other.post("/api/companies/globex/content-jobs", json={"jobType": "echo"})

        r = await http.get(JOBS)
        assert [j["id"] for j in r.json()] == ids[::-1]
        assert "x-next-cursor" not in r.headers

        seen: list[str] = []
        cursor = None
        for _ in range(10):
            params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
            r = await http.get(JOBS, params=params)
            assert r.status_code == 200
            assert len(r.json()) <= 2
            seen += [j["id"] for j in r.json()]
            cursor = r.headers.get("x-next-cursor")
            if cursor is None:
                break
        assert seen == ids[::-1]

        r = await http.get(JOBS, params={"status": "cancelled"})
        assert [j["id"] for j in r.json()] == [ids[0]]


async def test_list_filters_by_job_type_and_source_task(gateway: RunningGateway) -> None:
    client = gateway.state.client
    render = await client.enqueue("acme", "render", {}, source_task_id="task-1")
    echo = await client.enqueue("acme", "echo", {}, source_task_id="task-1")
    other = await client.enqueue("acme", "render", {}, source_task_id="task-2")
    await client.cancel("acme", other.id)
    await client.enqueue("globex", "render", {}, source_task_id="task-1")
    async with gateway.http() as http:

        async def ids(**params: str) -> list[str]:
            r = await http.get(JOBS, params=params)
            assert r.status_code == 200, r.text
            return [j["id"] for j in r.json()]

        assert await ids(jobType="render") == [str(other.id), str(render.id)]
        assert await ids(sourceTaskId="task-1") == [str(echo.id), str(render.id)]
        assert await ids(jobType="render", sourceTaskId="task-1") == [str(render.id)]
        assert await ids(jobType="render", status="cancelled") == [str(other.id)]
        assert await ids(jobType="render", status="queued") == [str(render.id)]
        assert await ids(jobType="nosuch") == []


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "501"},
        {"limit": "-1"},
        {"limit": "abc"},
        {"limit": "1e3"},
        {"limit": "99999999999999999999999"},
        {"limit": "٣"},  # a non-ASCII digit
        {"status": "sleeping"},
        {"cursor": "garbage"},
        {"cursor": "x" * 5000},
        {"jobType": "x" * 201},
        {"sourceTaskId": "a\x00b"},
    ],
)
async def test_bad_list_parameters_are_400(gateway: RunningGateway, params: dict[str, str]) -> None:
    async with gateway.http() as http:
        r = await http.get(JOBS, params=params)
    assert r.status_code == 400, r.text
    assert "error" in r.json()


async def test_asset_metadata_and_content(gateway: RunningGateway, storage_dir: Path) -> None:
    data = b"<svg xmlns='http://www.w3.org/2000/svg'/>"
    asset_id = await make_asset(gateway, "acme", data, storage_dir)
    base = f"/api/companies/acme/assets/{asset_id}"
    async with gateway.http() as http:
        r = await http.get(base)
        assert r.status_code == 200
        meta = r.json()
        assert meta["byteSize"] == len(data)
        assert meta["contentType"] == "image/svg+xml"
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()
        r = await http.get(base + "/content")
        assert r.status_code == 200
        assert r.content == data
        assert r.headers["content-type"].startswith("image/svg+xml")
        assert r.headers["content-length"] == str(len(data))
        assert r.headers["etag"] == f'"{meta["sha256"]}"'
        assert r.headers["x-content-type-options"] == "nosniff"
        r = await http.get(base + "/content", headers={"If-None-Match": f'"{meta["sha256"]}"'})
        assert r.status_code == 304
        for path in (f"/api/companies/acme/assets/{uuid.uuid4()}", "/api/companies/acme/assets/x"):
            for suffix in ("", "/content"):
                r = await http.get(path + suffix)
                assert r.status_code == 404
                assert r.json() == {"error": "Asset not found"}


async def make_asset(gateway: RunningGateway, company: str, data: bytes, storage_dir: Path) -> str:
    asset_id = uuid.uuid4()
    key = f"generated/{asset_id.hex[:2]}/{asset_id}"

    async def chunks():  # type: ignore[no-untyped-def]
        yield data

    written = await LocalStorage(storage_dir).write(key, chunks(), max_bytes=10**6)
    async with gateway.state.pool.connection() as conn:
        await conn.execute(
            "INSERT INTO pgjobs.assets (id, company_id, namespace, object_key, content_type,"
            " byte_size, sha256, original_filename) VALUES (%s, %s, 'generated', %s,"
            " 'image/svg+xml', %s, %s, 'card.svg')",
            [asset_id, company, key, written.byte_size, written.sha256],
        )
    return str(asset_id)


async def test_health_and_readiness(gateway: RunningGateway) -> None:
    async with gateway.http(None) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        r = await http.get("/readyz")
        assert r.status_code == 200
        assert r.json()["checks"] == {"database": "ok", "listener": "ok"}


async def test_openapi_describes_exactly_the_served_routes(gateway: RunningGateway) -> None:
    async with gateway.http(None) as http:
        schema = (await http.get("/openapi.json")).json()
    assert schema == openapi.SCHEMA
    served = {
        (route.path, method.lower())
        for route in gateway.app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    described = {
        (path, method)
        for path, item in schema["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert served == described


async def test_pool_exhausted_is_503_with_retry_after(dsn: str, storage_dir: Path) -> None:
    tight = settings(pool_size=1, pool_timeout_seconds=0.3)
    async with serve_gateway(dsn, storage_dir, tight) as gateway, gateway.http() as http:
        # Hold the pool's only connection: the next request cannot get one.
        async with gateway.state.pool.connection():
            r = await http.get(JOBS)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert "error" in r.json()
        # And it recovers as soon as the connection is back.
        assert (await http.get(JOBS)).status_code == 200


async def test_job_type_allowlist_and_live_workers(dsn: str, storage_dir: Path) -> None:
    allow = settings(job_types=("echo", "render"))
    async with serve_gateway(dsn, storage_dir, allow) as gateway, gateway.http() as http:
        assert (await http.post(JOBS, json={"jobType": "echo"})).status_code == 202
        r = await http.post(JOBS, json={"jobType": "rm-rf"})
        assert r.status_code == 422
        assert "jobType" in r.json()["error"]
    live = settings(require_live_worker=True)
    async with serve_gateway(dsn, storage_dir, live) as gateway, gateway.http() as http:
        assert (await http.post(JOBS, json={"jobType": "echo"})).status_code == 422
        async with gateway.state.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO pgjobs.workers (id, hostname, pid, job_types, concurrency)"
                " VALUES ('w1', 'h', 1, '{echo}', 1)"
            )
        assert (await http.post(JOBS, json={"jobType": "echo"})).status_code == 202
        assert (await http.post(JOBS, json={"jobType": "sleep"})).status_code == 422
        async with gateway.state.pool.connection() as conn:
            await conn.execute(
                "UPDATE pgjobs.workers SET last_heartbeat_at = now() - interval '1 hour'"
            )
        assert (await http.post(JOBS, json={"jobType": "echo"})).status_code == 422


async def test_cors_preflight_when_configured(dsn: str, storage_dir: Path) -> None:
    cors = settings(cors_origins=("https://app.example",))
    async with serve_gateway(dsn, storage_dir, cors) as gateway, gateway.http(None) as http:
        r = await http.options(
            JOBS,
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        r = await http.options(
            JOBS,
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in r.headers


async def test_concurrent_enqueues_all_commit(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        responses = await asyncio.gather(
            *(http.post(JOBS, json={"jobType": "echo", "input": {"i": i}}) for i in range(40))
        )
    assert {r.status_code for r in responses} == {202}
    page = await gateway.state.client.list("acme", limit=100)
    assert len(page.jobs) == 40


@pytest.mark.parametrize("name", sorted(GATEWAY_QUERIES))
async def test_every_gateway_query_plans_against_the_schema(shared_dsn: str, name: str) -> None:
    query = GATEWAY_QUERIES[name]
    import re

    params = dict.fromkeys(re.findall(r"%\((\w+)\)[sb]", query))
    async with await psycopg.AsyncConnection.connect(shared_dsn, autocommit=True) as conn:
        await conn.execute("EXPLAIN " + query, params)  # type: ignore[operator]


async def test_a_trailing_slash_is_404_and_never_a_redirect_to_the_host_header(
    gateway: RunningGateway,
) -> None:
    """Issue 19: Starlette redirected `/content-jobs/` to `http://<Host header>/...`."""
    job = await gateway.state.client.enqueue("acme", "echo", {})
    async with gateway.http(follow_redirects=False) as http:
        for method, path in (
            ("GET", JOBS + "/"),
            ("POST", JOBS + "/"),
            ("GET", f"{JOBS}/{job.id}/"),
            ("POST", f"{JOBS}/{job.id}/cancel/"),
            ("GET", "/healthz/"),
        ):
            r = await http.request(method, path, headers={"Host": "evil.example"})
            assert r.status_code == 404, (method, path, r.status_code)
            assert "location" not in r.headers
            assert r.json() == {"error": "Not Found"}
    assert (await gateway.state.client.get("acme", job.id)).status.value == "queued"


async def test_every_json_answer_is_no_store_and_nosniff(gateway: RunningGateway) -> None:
    """Issue 19: JSON answers, successes and errors alike, carry `Cache-Control:
    no-store` and `X-Content-Type-Options: nosniff`."""
    job = await gateway.state.client.enqueue("acme", "echo", {})
    async with gateway.http() as http, gateway.http(None) as anon:
        answers = [
            await http.post(JOBS, json={"jobType": "echo"}),  # 202
            await http.get(JOBS),  # 200 list
            await http.get(f"{JOBS}/{job.id}"),  # 200 job
            await http.post(f"{JOBS}/{job.id}/cancel"),  # 202
            await http.post(f"{JOBS}/{job.id}/cancel"),  # 409
            await http.post("/api/companies/acme/stream-tokens"),  # 201, a token
            await http.get(f"{JOBS}/{uuid.uuid4()}"),  # 404
            await http.get("/api/companies/globex/content-jobs"),  # 403
            await anon.get(JOBS),  # 401
            await http.post(JOBS, content=b"{"),  # 415
            await http.post(JOBS, content=b"{", headers={"Content-Type": "application/json"}),
            await http.delete(JOBS),  # 405
            await http.get("/nowhere"),  # 404
            await anon.get("/healthz"),
            await anon.get("/readyz"),
            await anon.get("/openapi.json"),
        ]
    assert [r.status_code for r in answers] == [
        202, 200, 200, 202, 409, 201, 404, 403, 401, 415, 400, 405, 404, 200, 200, 200,
    ]  # fmt: skip
    for r in answers:
        assert r.headers["content-type"] == "application/json", r.request.url
        assert r.headers["cache-control"] == "no-store", r.request.url
        assert r.headers["x-content-type-options"] == "nosniff", r.request.url
