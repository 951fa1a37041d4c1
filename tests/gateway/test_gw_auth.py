"""Who may do what (reliability.md G1): tokens, revocation, and the two-company matrix
on every route."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from gateway_helpers import RunningGateway
from test_gw_rest import make_asset

from helpers import ROOT
from pgjobs import db
from pgjobs.gateway import auth


async def test_requests_without_a_valid_token_are_401(gateway: RunningGateway) -> None:
    url = "/api/companies/acme/content-jobs"
    async with gateway.http(None) as http:
        for headers in (
            {},
            {"Authorization": "Bearer"},
            {"Authorization": f"Basic {gateway.tokens['acme']}"},
            {"Authorization": "Bearer pgj_" + "x" * 43},
            {"Authorization": "Bearer " + gateway.tokens["acme"] + "x"},
            {"Authorization": "Bearer " + "pgj_" + "x" * 5000},
            {"Authorization": "Bearer " + gateway.tokens["acme"][4:]},
        ):
            r = await http.get(url, headers=headers)
            assert r.status_code == 401, headers
            assert r.json() == {"error": "missing or invalid token"}
            assert r.headers["www-authenticate"] == "Bearer"


async def test_a_revoked_token_stops_working_at_once(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        assert (await http.get("/api/companies/acme/content-jobs")).status_code == 200
        async with await db.connect(gateway.state.dsn) as conn:
            assert await auth.revoke_token(conn, gateway.tokens["acme"]) is not None
            assert await auth.revoke_token(conn, gateway.tokens["acme"]) is None
        assert (await http.get("/api/companies/acme/content-jobs")).status_code == 401


async def test_only_the_hash_is_stored(gateway: RunningGateway) -> None:
    async with gateway.state.pool.connection() as conn:
        rows = await (await conn.execute("SELECT * FROM pgjobs.api_tokens")).fetchall()
    stored = " ".join(str(v) for row in rows for v in row.values())
    for token in gateway.tokens.values():
        assert token not in stored
        assert auth.hash_token(token) in stored


async def test_two_company_matrix_on_every_route(
    gateway: RunningGateway, storage_dir: Path
) -> None:
    """acme's token on globex's path is 403; globex's ids under acme's path are 404 (the
    same answer as an id that never existed); globex's token on its own path works."""
    async with gateway.http("globex") as globex:
        r = await globex.post("/api/companies/globex/content-jobs", json={"jobType": "echo"})
        b_job = r.json()["jobId"]
    b_asset = await make_asset(gateway, "globex", b"globex's secret", storage_dir)
    # Also a cancelled job, so retry is allowed for the owner.
    async with gateway.http("globex") as globex:
        r = await globex.post("/api/companies/globex/content-jobs", json={"jobType": "echo"})
        b_cancelled = r.json()["jobId"]
        await globex.post(f"/api/companies/globex/content-jobs/{b_cancelled}/cancel")

    routes = [
        ("POST", "/api/companies/{c}/content-jobs", {"jobType": "echo"}, 202),
        ("GET", "/api/companies/{c}/content-jobs", None, 200),
        ("GET", "/api/companies/{c}/content-jobs/" + b_job, None, 200),
        ("POST", "/api/companies/{c}/content-jobs/" + b_cancelled + "/retry", None, 202),
        ("POST", "/api/companies/{c}/content-jobs/" + b_job + "/cancel", None, 202),
        ("GET", "/api/companies/{c}/assets/" + b_asset, None, 200),
        ("GET", "/api/companies/{c}/assets/" + b_asset + "/content", None, 200),
    ]
    id_routes = [r for r in routes if b_job in r[1] or b_asset in r[1] or b_cancelled in r[1]]
    async with gateway.http("acme") as acme:
        for method, path, body, _ in routes:
            r = await acme.request(method, path.format(c="globex"), json=body)
            assert r.status_code == 403, (method, path, r.text)
            assert r.json() == {"error": "this token does not grant access to this company"}
        for method, path, body, _ in id_routes:
            r = await acme.request(method, path.format(c="acme"), json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert set(r.json()) == {"error"}
    # The event streams: acme's token on globex's paths is 403; globex's job under acme's
    # path gets exactly what a job that never existed gets.
    async with gateway.http("acme") as acme:
        for path in (
            f"/api/companies/globex/content-jobs/{b_job}/events",
            "/api/companies/globex/events",
        ):
            r = await acme.get(path)
            assert r.status_code == 403, path
        foreign = await acme.get(f"/api/companies/acme/content-jobs/{b_job}/events")
        missing = await acme.get(f"/api/companies/acme/content-jobs/{uuid.uuid4()}/events")
        assert foreign.status_code == missing.status_code == 200
        assert foreign.text == missing.text
        assert "event: error" in foreign.text
    # Nothing acme did touched globex's jobs.
    assert (await gateway.state.client.get("globex", b_job)).status.value == "queued"
    async with gateway.http("globex") as globex:
        for method, path, body, expected in routes:
            r = await globex.request(method, path.format(c="globex"), json=body)
            assert r.status_code == expected, (method, path, r.text)


async def test_company_in_body_or_header_is_ignored(gateway: RunningGateway) -> None:
    async with gateway.http() as http:
        r = await http.post(
            "/api/companies/acme/content-jobs",
            json={"jobType": "echo", "input": {"companyId": "globex"}},
            headers={"X-Company-Id": "globex", "Host": "globex.example"},
        )
    assert r.status_code == 202
    assert (await gateway.state.client.get("acme", r.json()["jobId"])).company_id == "acme"


@pytest.mark.parametrize("company", ["acme/../globex", "ACME", "acme ", "%00"])
async def test_lookalike_company_paths_are_refused(gateway: RunningGateway, company: str) -> None:
    async with gateway.http() as http:
        r = await http.get(f"/api/companies/{company}/content-jobs")
    assert r.status_code in (403, 404), r.text


def test_cli_token_create_and_revoke(dsn: str) -> None:
    env = {**os.environ, "PGJOBS_DSN": dsn}

    def pgjobs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pgjobs", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    created = pgjobs("token", "create", "acme", "--label", "ci")
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("pgj_")
    assert len(token) > 40
    revoked = pgjobs("token", "revoke", token)
    assert revoked.returncode == 0, revoked.stderr
    again = pgjobs("token", "revoke", token)
    assert again.returncode == 1
    assert pgjobs("token", "revoke", str(uuid.uuid4())).returncode == 1
    assert pgjobs("token", "create", "").returncode == 2
    operator = pgjobs("token", "create", "--operator", "--label", "on call")
    assert operator.returncode == 0, operator.stderr
    assert operator.stdout.strip().startswith("pgj_")
    for args in (["token", "create"], ["token", "create", "acme", "--operator"]):
        refused = pgjobs(*args)
        assert refused.returncode == 2
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


async def test_an_operator_token_acts_for_every_company_until_revoked(
    gateway: RunningGateway,
) -> None:
    """`pgjobs token create --operator`: every company's paths (each request still names
    its company), stream tokens minted for that company; revoked → 401 everywhere."""
    async with await db.connect(gateway.state.dsn) as c:
        operator = await auth.create_token(c, None, "ops", operator=True)
    ops = {"Authorization": f"Bearer {operator}"}
    async with httpx.AsyncClient(base_url=gateway.url, headers=ops, timeout=20.0) as http:
        assert (await http.get("/api/whoami")).json() == {"companyId": None, "operator": True}
        for company in ("acme", "globex"):
            r = await http.post(f"/api/companies/{company}/content-jobs", json={"jobType": "echo"})
            assert r.status_code == 202, r.text
            job_id = r.json()["jobId"]
            got = await http.get(f"/api/companies/{company}/content-jobs/{job_id}")
            assert got.json()["companyId"] == company
            listed = await http.get(f"/api/companies/{company}/content-jobs")
            assert [j["id"] for j in listed.json()] == [job_id]
            cancelled = await http.post(f"/api/companies/{company}/content-jobs/{job_id}/cancel")
            assert cancelled.status_code == 202
            minted = await http.post(f"/api/companies/{company}/stream-tokens", json={})
            assert minted.status_code == 201, minted.text
            stream_token = minted.json()["token"]
            # The stream token is that company's alone.
            other = "globex" if company == "acme" else "acme"
            async with gateway.http(None) as anonymous:
                own = await anonymous.get(
                    f"/api/companies/{company}/content-jobs/{job_id}/events",
                    params={"streamToken": stream_token},
                )
                assert own.status_code == 200
                assert '"status":"cancelled"' in own.text
                foreign = await anonymous.get(
                    f"/api/companies/{other}/events", params={"streamToken": stream_token}
                )
                assert foreign.status_code == 403
        # A company's own token still cannot reach another company.
    async with gateway.http("acme") as acme:
        assert (await acme.get("/api/companies/globex/content-jobs")).status_code == 403
        assert (await acme.get("/api/whoami")).json() == {"companyId": "acme", "operator": False}
    async with await db.connect(gateway.state.dsn) as c:
        assert await auth.revoke_token(c, operator) is not None
    async with httpx.AsyncClient(base_url=gateway.url, headers=ops, timeout=20.0) as http:
        for path in ("/api/whoami", "/api/companies/acme/content-jobs"):
            assert (await http.get(path)).status_code == 401
