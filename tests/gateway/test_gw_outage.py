"""/readyz during a database outage, and a job stream that spans it without a gap."""

from __future__ import annotations

from pathlib import Path

from gateway_helpers import serve_gateway

from helpers import fast_settings, running_worker, wait_until
from pgjobs import demo
from proxy import proxied


async def test_readyz_reports_the_outage_and_the_stream_resumes(
    dsn: str, storage_dir: Path
) -> None:
    async with (
        proxied(dsn) as proxy,
        serve_gateway(proxy.dsn, storage_dir) as gw,
        gw.http(None) as http,
    ):

        async def ready() -> bool:
            return (await http.get("/readyz")).status_code == 200

        async def not_ready() -> bool:
            r = await http.get("/readyz")
            return r.status_code == 503 and r.json()["checks"]["listener"] != "ok"

        await wait_until(ready, within=10, message="ready")
        proxy.cut()
        await wait_until(not_ready, within=10, message="/readyz reports the outage")
        assert (await http.get("/healthz")).status_code == 200, "alive, just not ready"
        # While the gateway is cut off, a job runs to the end (the worker talks to the
        # database directly): every event of it is committed and NOTIFYed unseen.
        async with gw.http() as api:
            job_id = await _enqueue_directly(dsn)
            async with running_worker(dsn, demo.registry, fast_settings(storage_dir)):
                await wait_until(lambda: _done(dsn, job_id), within=20, message="done")
            proxy.restore()
            await wait_until(ready, within=15, message="ready again")
            # A browser resuming from the first event gets the rest, from the table.
            r = await api.get(
                f"/api/companies/acme/content-jobs/{job_id}/events",
                headers={"Last-Event-ID": "1"},
            )
    seqs = [int(line[4:]) for line in r.text.splitlines() if line.startswith("id: ")]
    assert seqs == list(range(2, seqs[-1] + 1)), "every event after 1, once, in order"
    assert '"status":"done"' in r.text


async def _enqueue_directly(dsn: str) -> str:
    from pgjobs.client import Client

    client = await Client.connect(dsn)
    try:
        job = await client.enqueue("acme", "sleep", {"seconds": 0.3})
    finally:
        await client.close()
    return str(job.id)


async def _done(dsn: str, job_id: str) -> bool:
    from helpers import job_status

    return await job_status(dsn, job_id) == "done"
