"""Assets end to end on each storage backend: a worker's handler produces the file, the
gateway serves it, with the same bytes and the same headers whether it lives on a local
disk or in an S3-compatible bucket (moto's server on loopback)."""

from __future__ import annotations

import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from gateway_helpers import serve_gateway

from helpers import fast_settings, running_worker, wait_until
from pgjobs import demo
from pgjobs.config import WorkerSettings
from pgjobs.gateway.app import create_app
from pgjobs.s3storage import S3Storage
from pgjobs.storage import LocalStorage, from_settings
from s3_helpers import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, moto_server

# What a download answers besides the body, whatever the backend.
EXPECTED_HEADERS = {
    "content-type": "image/svg+xml",
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; sandbox",
    "cache-control": "private, max-age=31536000, immutable",
}


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    # The factory leaves credentials to botocore's chain, which reads these.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


@pytest.fixture(params=["local", "s3"])
def worker_settings(
    request: pytest.FixtureRequest, storage_dir: Path, s3_server: MotoServer, s3_credentials: None
) -> WorkerSettings:
    if request.param == "local":
        return fast_settings(storage_dir)
    bucket: str = request.getfixturevalue("s3_bucket")
    return fast_settings(
        storage_dir,
        storage_url=f"s3://{bucket}/pgjobs",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region=REGION,
    )


async def test_worker_asset_is_downloaded_through_the_gateway(
    dsn: str, storage_dir: Path, worker_settings: WorkerSettings, s3_server: MotoServer
) -> None:
    # Both sides built by the factory from the same settings, as `pgjobs worker` and
    # `pgjobs gateway` build theirs from the environment.
    storage = from_settings(worker_settings)
    async with (
        serve_gateway(dsn, storage_dir, storage=storage) as gateway,
        running_worker(dsn, demo.registry, worker_settings),
        gateway.http() as http,
    ):
        r = await http.post(
            "/api/companies/acme/content-jobs",
            json={"jobType": "render", "input": {"title": "S3", "step_seconds": 0.01}},
        )
        assert r.status_code == 202, r.text
        job_url = r.headers["location"]

        async def done() -> bool:
            return bool((await http.get(job_url)).json()["status"] == "done")

        await wait_until(done, within=60, message="render done")
        asset_id = (await http.get(job_url)).json()["resultAssetId"]
        meta = (await http.get(f"/api/companies/acme/assets/{asset_id}")).json()
        r = await http.get(f"/api/companies/acme/assets/{asset_id}/content")

    assert r.status_code == 200
    assert r.content.startswith(b"<svg")
    assert hashlib.sha256(r.content).hexdigest() == meta["sha256"]
    assert len(r.content) == meta["byteSize"]
    served = {k: v for k, v in r.headers.items() if k not in {"date", "server"}}
    assert served == {
        **EXPECTED_HEADERS,
        "content-length": str(meta["byteSize"]),
        "etag": f'"{meta["sha256"]}"',
    }
    files = _files(storage_dir)
    if isinstance(storage, S3Storage):
        assert files == [], "nothing on the local disk"
        keys = await s3_server.keys(storage.bucket)
        assert len(keys) == 1
        assert keys[0].startswith("pgjobs/generated/")
    else:
        assert isinstance(storage, LocalStorage)
        assert len(files) == 1


async def test_storage_failure_is_503_with_the_reason_logged(
    dsn: str, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with moto_server(require_auth=True) as strict:
        storage = strict.storage("pgjobs-assets")
        async with serve_gateway(dsn, storage_dir, storage=storage) as gateway:
            asset_id = uuid.uuid4()
            async with gateway.state.pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO pgjobs.assets (id, company_id, namespace, object_key,"
                    " content_type, byte_size, sha256, original_filename) VALUES (%s, 'acme',"
                    " 'generated', 'generated/00/x', 'text/plain', 1, %s, 'x.txt')",
                    [asset_id, "0" * 64],
                )
            with caplog.at_level(logging.WARNING, logger="pgjobs.gateway.responses"):
                async with gateway.http() as http:
                    r = await http.get(f"/api/companies/acme/assets/{asset_id}/content")
    assert r.status_code == 503
    assert r.json() == {"error": "asset storage unavailable, retry shortly"}
    assert r.headers["retry-after"] == "5"
    assert "access denied" in caplog.text


def test_gateway_and_worker_pick_the_backend_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGJOBS_STORAGE_DIR", str(tmp_path))
    for name in ("PGJOBS_STORAGE_URL", "PGJOBS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    local = from_settings(WorkerSettings.from_env())
    assert isinstance(local, LocalStorage)
    assert local.root == tmp_path.resolve()

    monkeypatch.setenv("PGJOBS_STORAGE_URL", "s3://media/pgjobs/assets")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    settings = WorkerSettings.from_env()
    assert (settings.storage_url, settings.s3_endpoint_url, settings.s3_region) == (
        "s3://media/pgjobs/assets",
        "http://127.0.0.1:9",
        "eu-west-3",
    )
    monkeypatch.setenv("PGJOBS_S3_ENDPOINT_URL", "http://127.0.0.1:10")
    for storage in (
        from_settings(WorkerSettings.from_env()),
        _gateway_storage(create_app("postgresql://unused")),
    ):
        assert isinstance(storage, S3Storage)
        assert (storage.bucket, storage.prefix) == ("media", "pgjobs/assets/")
        assert storage.endpoint_url == "http://127.0.0.1:10", "the pgjobs variable wins"


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def _gateway_storage(app: Any) -> Any:
    return app.state.gateway.storage
