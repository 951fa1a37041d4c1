"""Scenarios 4 and 5 — the gateway: commit → SSE client latency with 1 … 10,000 clients
on one gateway process and its memory; POST 202 latency under concurrent submissions.

The gateway runs as shipped, as its own process (``python -m pgjobs gateway``, uvicorn,
info logging to a file), with only its stream caps raised (PGJOBS_GATEWAY_MAX_STREAMS and
_MAX_STREAMS_PER_COMPANY) and RLIMIT_NOFILE raised to the hard limit, so its RSS and CPU
are its own. Clients run in another process (bench.http_clients: one asyncio protocol per
connection, uvloop; each event stamped when its bytes arrive), all on 127.0.0.1.

*Job streams* (what a browser watching its job sees): N running jobs, one client on each
job's ``/events`` stream, authorised with a company stream token as a browser would be.
A producer then commits progress transitions (``job_progress_if_leased``, the worker's
own statement, one autocommit transaction each) on jobs taken round-robin in random
order, at a fixed rate; the commit time is ``time.time()`` right after the statement
returns, the receipt time is ``time.time()`` when the client has parsed the event's data
line. So every transition is measured once, at the one client that watches that job,
while N streams are open on the same process.

*Company streams* (a dashboard: every client sees every event of its company): N clients
on ``/api/companies/{c}/events``; the producer enqueues one job at a time; each enqueue
is received by all N clients, and every delivery is a sample.

*Company streams over many companies* (full mode): the same number of company-stream
clients spread evenly over 10, 100 and 1,000 companies, each with its own stream token;
jobs enqueued round-robin over the companies, so each event reaches only its company's
clients and the gateway runs one reader per company.

*POST*: M keep-alive connections, each POSTing jobs one after another with an API token;
latency from writing the request to reading the 202 body; throughput = POSTs / wall time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import queue
import random
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import dict_row

from bench import pg
from bench.context import Ctx
from bench.http_clients import post_load, raise_nofile
from bench.procs import cpu_seconds
from bench.stats import fmt, latency, summary

COMPANY = "bench"
SECRET = "bench-gateway-secret-0123456789abcdef"  # noqa: S105 - a throwaway local secret
# Connections opened at once by the SSE client: below pool_size + pool_max_waiting (10 +
# 50), since each stream's set-up reads the job through the gateway's pool and a burst
# beyond that is told to reconnect later (a 200 with `retry:`; see docs/gateway.md).
CONNECT_CONCURRENCY = 50
COMPANY_RATE = 2.0  # company-stream transitions per second (each costs N table reads)
# Seconds: settle after the clients connect, gateway CPU measured with N streams open and
# no events, wait for the last events. Shorter in tiny mode (the smoke test) and in quick
# mode (which promises under 5 minutes for everything).
PAUSES = {"tiny": (0.2, 0.3, 0.5), "quick": (0.5, 1.0, 1.0)}
DEFAULT_PAUSES = (1.0, 2.0, 2.0)
ROOT = Path(__file__).resolve().parents[2]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_child_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@contextlib.contextmanager
def gateway_process(ctx: Ctx, dsn: str, max_streams: int, tag: str) -> Iterator[tuple[int, int]]:
    """A gateway process on a free port; yields (pid, port); always killed after."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        {
            "PGJOBS_DSN": dsn,
            "PGJOBS_GATEWAY_SECRET": SECRET,
            "PGJOBS_GATEWAY_MAX_STREAMS": str(max_streams),
            "PGJOBS_GATEWAY_MAX_STREAMS_PER_COMPANY": str(max_streams),
        }
    )
    ctx.logs.mkdir(parents=True, exist_ok=True)
    log = (ctx.logs / f"gateway-{tag}.log").open("a")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and package
        [sys.executable, "-m", "pgjobs", "gateway", "--port", str(port)],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        env=env,
        cwd=ROOT,
        preexec_fn=_raise_child_nofile,
    )
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gateway exited with {proc.returncode} (see {ctx.logs})")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("gateway not ready within 60 s")
            time.sleep(0.1)
        yield proc.pid, port
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


class ClientProcess:
    """bench.http_clients sse in its own process; killed on exit whatever happens."""

    def __init__(
        self,
        ctx: Ctx,
        port: int,
        token: str,
        paths: list[str],
        tag: str,
        company: bool,
        *,
        concurrency: int = CONNECT_CONCURRENCY,
        reconnect: bool = False,
        last_event_id: str | None = None,
    ):
        self.dir = ctx.logs
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path_file = self.dir / f"paths-{tag}.json"
        self.path_file.write_text(json.dumps(paths))
        self.out = self.dir / f"events-{tag}.json"
        cmd = [sys.executable, "-m", "bench.http_clients", "sse", "--port", str(port)]
        cmd += ["--token", token, "--path-file", str(self.path_file), "--out", str(self.out)]
        cmd += ["--concurrency", str(concurrency), "--deadline", "600"]
        if company:
            cmd.append("--company")
        if reconnect:
            cmd.append("--reconnect")
        if last_event_id:
            cmd += ["--last-event-id", last_event_id]
        log = (self.dir / f"clients-{tag}.log").open("a")
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=ROOT,
            preexec_fn=_raise_child_nofile,
        )
        log.close()
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("exited")

    def expect(self, word: str, timeout: float) -> list[str]:
        line = self.lines.get(timeout=timeout)
        if not line.startswith(word):
            raise RuntimeError(f"SSE clients said {line!r}, expected {word!r} (see {self.dir})")
        return line.split()[1:]

    def stop(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.expect("done", timeout)
        self.proc.wait(timeout=timeout)
        data: dict[str, Any] = json.loads(self.out.read_text())
        self.out.unlink()
        return data

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


def _stream_tokens(dsn: str, companies: list[str]) -> dict[str, str]:
    """A company stream token per company, each minted from a new API token of that
    company (a stream token works only while its parent API token is active)."""
    return asyncio.run(_mint_stream_tokens(dsn, companies))


def _stream_token(dsn: str, company: str = COMPANY) -> str:
    return _stream_tokens(dsn, [company])[company]


async def _mint_stream_tokens(dsn: str, companies: list[str]) -> dict[str, str]:
    from pgjobs import db
    from pgjobs.gateway import auth

    tokens = {}
    async with await db.connect(dsn) as conn:
        for company in companies:
            principal = await auth.verify_api_token(
                conn, await auth.create_token(conn, company, "bench")
            )
            assert principal is not None
            tokens[company], _ = auth.mint_stream_token(
                SECRET.encode(), company, None, 3600, parent=principal.token_id
            )
    return tokens


async def _api_token(dsn: str) -> str:
    from pgjobs import db
    from pgjobs.gateway import auth

    async with await db.connect(dsn) as conn:
        return await auth.create_token(conn, COMPANY, "bench")


async def _running_jobs(dsn: str, n: int) -> list[tuple[str, int]]:
    """n jobs of COMPANY, claimed by a fake worker: [(id, lease_token)]."""
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec
    from pgjobs.queries import QUERIES

    async with await Client.connect(dsn, max_size=2) as client:
        for start in range(0, n, 5_000):
            specs = [JobSpec(COMPANY, "bench.sse") for _ in range(min(5_000, n - start))]
            await client.enqueue_many(specs)
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row
    ) as conn:
        cur = await conn.execute(
            QUERIES["job_claim_batch"],
            {
                "now": None,
                "limit": n,
                "worker_id": "bench-producer",
                "lease_seconds": 3600.0,
                "job_types": ["bench.sse"],
                "after_company": None,
            },
        )
        rows = await cur.fetchall()
    assert len(rows) == n, (len(rows), n)
    return [(str(r["id"]), int(r["lease_token"])) for r in rows]


async def _progress_producer(
    dsn: str, jobs: list[tuple[str, int]], events: int, rate: float, *, ring: bool = False
) -> dict[tuple[str, int], float]:
    """``events`` progress transitions at ``rate``/s; {(jobId, seq): commit time}.

    ``ring``: each transition is committed with the doorbell on (no NOTIFY item) and rung
    after its commit on the same connection (``pgjobs.doorbell``), as a ringing worker
    writes; the commit time is still taken when the commit returns, so the latency
    includes the ring's round trip and the gateway's read of the event."""
    from pgjobs import doorbell
    from pgjobs.queries import QUERIES

    order = jobs[:]
    random.shuffle(order)
    commits: dict[tuple[str, int], float] = {}
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        t0 = time.monotonic()
        for k in range(events):
            job_id, lease = order[k % len(order)]
            params = {
                "id": job_id,
                "lease_token": lease,
                "fraction": (k % 100) / 100,
                "message": f"step {k}",
                "now": None,
            }
            if ring:
                async with conn.transaction():
                    await doorbell.doorbell_on(conn)
                    cur = await conn.execute(QUERIES["job_progress_if_leased"], params)
                    row = await cur.fetchone()
                commits[(job_id, int(row[1]))] = time.time()  # type: ignore[index]
                await doorbell.ring(conn, [(COMPANY, uuid.UUID(job_id))])
            else:
                cur = await conn.execute(QUERIES["job_progress_if_leased"], params)
                row = await cur.fetchone()
                commits[(job_id, int(row[1]))] = time.time()  # type: ignore[index]
            delay = t0 + (k + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    return commits


async def _enqueue_producer(
    dsn: str, events: int, rate: float, companies: list[str]
) -> dict[str, tuple[str, float]]:
    """``events`` single-job enqueues at ``rate``/s, round-robin over ``companies``;
    {jobId: (company, commit time)}."""
    from pgjobs.client import Client

    commits: dict[str, tuple[str, float]] = {}
    async with await Client.connect(dsn, max_size=1) as client:
        t0 = time.monotonic()
        for k in range(events):
            company = companies[k % len(companies)]
            job = await client.enqueue(company, "bench.company")
            commits[str(job.id)] = (company, time.time())
            delay = t0 + (k + 1) / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
    return commits


def _one_step(
    ctx: Ctx,
    dsn: str,
    pid: int,
    port: int,
    n: int,
    companies: int,
    events: int,
    rate: float,
    *,
    ring: bool = False,
) -> dict[str, Any]:
    """One measurement on a running gateway: n job streams (``companies`` 0), or n company
    streams spread evenly over ``companies`` companies (1: all on one). ``ring``: the job
    streams' producer commits with the doorbell on and rings (see _progress_producer)."""
    company = companies > 0
    tag = f"{'company' if company else 'job'}-{n}-{os.getpid()}-{time.monotonic_ns()}"
    names = [COMPANY] if companies == 1 else [f"{COMPANY}-{i}" for i in range(companies)]
    if company:
        # Each company's streams carry that company's token (a browser's EventSource
        # sends it as ?streamToken=).
        tokens = _stream_tokens(dsn, names)
        paths = [
            f"/api/companies/{c}/events?streamToken={tokens[c]}"
            for c in (names[i % companies] for i in range(n))
        ]
        jobs: list[tuple[str, int]] = []
    else:
        jobs = asyncio.run(_running_jobs(dsn, n))
        paths = [f"/api/companies/{COMPANY}/content-jobs/{j}/events" for j, _ in jobs]
    settle, idle_s, grace = PAUSES.get(ctx.mode, DEFAULT_PAUSES)
    rss_before = _rss_kib(pid)
    clients = ClientProcess(ctx, port, _stream_token(dsn), paths, tag, company)
    try:
        opened, failed, connect_s = clients.expect("ready", 300)
        time.sleep(settle)
        rss_open = _rss_kib(pid)
        cpu0 = cpu_seconds(pid)
        time.sleep(idle_s)
        idle_cpu = (cpu_seconds(pid) - cpu0) / idle_s
        cpu0, t0 = cpu_seconds(pid), time.monotonic()
        if company:
            commits_c = asyncio.run(_enqueue_producer(dsn, events, rate, names))
        else:
            commits_j = asyncio.run(_progress_producer(dsn, jobs, events, rate, ring=ring))
        busy_s = time.monotonic() - t0
        busy_cpu = (cpu_seconds(pid) - cpu0) / busy_s
        # Every company stream receives every event: give the last fan-out longer.
        time.sleep(grace * 3 if company else grace)
        client_rss = _rss_kib(clients.proc.pid)
        data = clients.stop(60)
    finally:
        clients.kill()
        clients.path_file.unlink(missing_ok=True)
    samples: list[float] = []
    if company:
        for job_id, _seq, t in data["events"]:
            if job_id in commits_c:
                samples.append((t - commits_c[job_id][1]) * 1000)
        # Every open stream of an event's company receives it (streams are spread evenly,
        # so a share of them told to reconnect later lowers each company's count alike).
        per_company = collections.Counter(names[i % companies] for i in range(n))
        expected = round(
            sum(per_company[c] for c, _ in commits_c.values()) * int(opened) / max(n, 1)
        )
    else:
        for job_id, seq, t in data["events"]:
            c = commits_j.get((job_id, seq))
            if c is not None:
                samples.append((t - c) * 1000)
        expected = len(commits_j)
    return {
        "clients": n,
        "companies": companies,
        "opened": int(opened),
        "failed": int(failed),
        "connect_seconds": float(connect_s),
        "client_errors": data["errors"],
        "client_nofile": data["nofile"],
        "transitions": events,
        "rate_per_s": rate,
        "deliveries_expected": expected,
        "deliveries_measured": len(samples),
        "latency_ms": latency(samples),
        "gateway_rss_mib_before": rss_before / 1024,
        "gateway_rss_mib_open": rss_open / 1024,
        "gateway_rss_mib_after_close": _rss_kib(pid) / 1024,
        "gateway_cpu_idle": idle_cpu,
        "gateway_cpu_busy": busy_cpu,
        "busy_seconds": busy_s,
        "client_rss_mib": client_rss / 1024,
        "samples_ms": sorted(samples) if len(samples) <= 20_000 else None,
    }


def _storm_step(ctx: Ctx, dsn: str, port: int, n: int, kind: str = "job") -> dict[str, Any]:
    """n browsers open their streams at the same instant (a gateway restart), each
    reconnecting as EventSource does when told to; how long until every one has its
    first event, and how many were told to come back later.

    kind "job": each watches its own running job (its set-up reads the job). kind
    "job_resume": the same, but each comes back RESUME_BEHIND progress events behind
    (Last-Event-ID: the claim's event), so its set-up also reads those from the table.
    kind "company": n dashboards of one company resume with the Last-Event-ID of the
    event before the company's last RESUME_BEHIND, so each catches up from the table."""
    last_event_id = None
    if kind in ("job", "job_resume"):
        jobs = asyncio.run(_running_jobs(dsn, n))
        paths = [f"/api/companies/{COMPANY}/content-jobs/{j}/events" for j, _ in jobs]
        if kind == "job_resume":
            last_event_id = asyncio.run(_progress_behind(dsn, jobs, RESUME_BEHIND))
    else:
        last_event_id = asyncio.run(_company_cursor_behind(dsn, RESUME_BEHIND))
        paths = [f"/api/companies/{COMPANY}/events"] * n
    tag = f"storm-{kind}-{n}-{os.getpid()}-{time.monotonic_ns()}"
    clients = ClientProcess(
        ctx,
        port,
        _stream_token(dsn),
        paths,
        tag,
        False,
        concurrency=n,
        reconnect=True,
        last_event_id=last_event_id,
    )
    try:
        opened, failed, connect_s = clients.expect("ready", 300)
        data = clients.stop(60)
    finally:
        clients.kill()
        clients.path_file.unlink(missing_ok=True)
    return {
        "clients": n,
        "opened": int(opened),
        "failed": int(failed),
        "connect_seconds": float(connect_s),
        "reconnects": int(data["reconnects"]),
        "client_errors": data["errors"],
    }


# A resuming browser of a storm is this many events behind.
RESUME_BEHIND = 5
# The storms of step 4d: result key, _storm_step's kind, what the streams are.
STORMS = (
    ("storm", "job", "job streams"),
    ("job_resume_storm", "job_resume", "resuming job streams"),
    ("company_storm", "company", "resuming company streams"),
)


async def _progress_behind(dsn: str, jobs: list[tuple[str, int]], behind: int) -> str:
    """``behind`` progress transitions on each of the running ``jobs``, written as the
    worker's job_progress_if_leased writes them but one statement per round for all the
    jobs; returns the job streams' Last-Event-ID from before them (the claim's seq, the
    same for every job)."""
    ids = [j for j, _ in jobs]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT DISTINCT event_seq FROM pgjobs.jobs WHERE id = ANY(%s::uuid[])", (ids,)
        )
        seqs = [row[0] for row in await cur.fetchall()]
        assert len(seqs) == 1, seqs
        for i in range(behind):
            await conn.execute(
                "UPDATE pgjobs.jobs SET progress_fraction = %s, event_seq = event_seq + 1,"
                " last_event = 'content_job.progress', updated_at = now()"
                " WHERE id = ANY(%s::uuid[]) AND status = 'running'",
                ((i + 1) / behind, ids),
            )
    return str(seqs[0])


async def _company_cursor_behind(dsn: str, behind: int) -> str:
    """Enqueue ``behind`` jobs of COMPANY and return the company stream cursor (Last-Event-ID)
    of the company's event just before their events."""
    from pgjobs.client import Client
    from pgjobs.jobspec import JobSpec

    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT xid, id FROM pgjobs.job_events WHERE company_id = %s"
            " ORDER BY xid DESC, id DESC LIMIT 1",
            (COMPANY,),
        )
        row = await cur.fetchone()
    assert row is not None, "the company has events from the steps before"
    async with await Client.connect(dsn, max_size=1) as client:
        await client.enqueue_many([JobSpec(COMPANY, "bench.sse") for _ in range(behind)])
    return f"{row[0]}-{row[1]}"


def run(ctx: Ctx) -> dict[str, Any]:
    if "pgjobs" not in ctx.systems:
        return {"skipped": "pgjobs not selected"}
    s = ctx.sizes
    nofile = raise_nofile()
    max_streams = max((*s.sse_clients, *s.company_clients, s.spread_clients, *s.storm_clients))
    max_streams += 100
    runs = []
    for r in range(ctx.repeat):
        with pg.database(ctx.server_dsn) as dsn:
            api_token = asyncio.run(_api_token(dsn))
            with gateway_process(ctx, dsn, max_streams, f"run{r}") as (pid, port):
                one: dict[str, Any] = {"baseline_rss_mib": _rss_kib(pid) / 1024}
                one["job"] = []
                for n in s.sse_clients:
                    step = _one_step(ctx, dsn, pid, port, n, 0, s.sse_events, s.sse_rate)
                    one["job"].append(step)
                    ctx.log(
                        f"gateway job streams, {n:,} clients ({step['opened']:,} open): p50 "
                        f"{step['latency_ms']['p50']:.1f} ms, p99 "
                        f"{step['latency_ms']['p99']:.1f} ms, RSS "
                        f"{step['gateway_rss_mib_open']:.0f} MiB, "
                        f"{step['deliveries_measured']}/{step['deliveries_expected']} events"
                    )
                one["company"] = []
                for n in s.company_clients:
                    step = _one_step(ctx, dsn, pid, port, n, 1, s.company_events, COMPANY_RATE)
                    one["company"].append(step)
                    ctx.log(
                        f"gateway company streams, {n:,} clients: p50 "
                        f"{step['latency_ms']['p50']:.1f} ms, p99 "
                        f"{step['latency_ms']['p99']:.1f} ms, idle CPU "
                        f"{step['gateway_cpu_idle']:.0%}, "
                        f"{step['deliveries_measured']}/{step['deliveries_expected']} deliveries"
                    )
                one["spread"] = []
                for k in s.spread_companies:
                    step = _one_step(
                        ctx, dsn, pid, port, s.spread_clients, k, s.spread_events, s.spread_rate
                    )
                    one["spread"].append(step)
                    ctx.log(
                        f"gateway company streams over {k:,} companies, {s.spread_clients:,} "
                        f"clients: p50 {step['latency_ms']['p50']:.1f} ms, p99 "
                        f"{step['latency_ms']['p99']:.1f} ms, idle CPU "
                        f"{step['gateway_cpu_idle']:.0%}, "
                        f"{step['deliveries_measured']}/{step['deliveries_expected']} deliveries"
                    )
                for key, kind, what in STORMS:
                    one[key] = []
                    for n in s.storm_clients:
                        step = _storm_step(ctx, dsn, port, n, kind)
                        one[key].append(step)
                        ctx.log(
                            f"gateway reconnect storm, {n:,} {what} at once: all first events "
                            f"in {step['connect_seconds']:.1f} s, {step['reconnects']:,} told "
                            f"to reconnect, {step['failed']} failed"
                        )
                one["post"] = []
                for m in s.post_submitters:
                    cpu0 = cpu_seconds(pid)
                    res = asyncio.run(post_load(port, api_token, COMPANY, m, s.posts_each))
                    lat = res.pop("latencies_ms")
                    step = {
                        "submitters": m,
                        "posts": len(lat),
                        "latency_ms": latency(lat),
                        "posts_per_s": len(lat) / res["seconds"],
                        "gateway_cpu": (cpu_seconds(pid) - cpu0) / res["seconds"],
                        **res,
                    }
                    one["post"].append(step)
                    ctx.log(
                        f"gateway POST, {m} submitters: p50 {step['latency_ms']['p50']:.1f} ms, "
                        f"p99 {step['latency_ms']['p99']:.1f} ms, "
                        f"{step['posts_per_s']:,.0f} POST/s, statuses {res['statuses']}"
                    )
                one["final_rss_mib"] = _rss_kib(pid) / 1024
        runs.append(one)
    return {
        "nofile_limit": nofile,
        "connect_concurrency": CONNECT_CONCURRENCY,
        "job": _aggregate([r["job"] for r in runs], "clients"),
        "company": _aggregate([r["company"] for r in runs], "clients"),
        "spread": _aggregate([r["spread"] for r in runs], "companies"),
        "spread_clients": s.spread_clients,
        "storm": _aggregate([r["storm"] for r in runs], "clients"),
        "job_resume_storm": _aggregate([r.get("job_resume_storm", []) for r in runs], "clients"),
        "company_storm": _aggregate([r.get("company_storm", []) for r in runs], "clients"),
        "resume_behind": RESUME_BEHIND,
        "spread_rate": s.spread_rate,
        "post": _aggregate([r["post"] for r in runs], "submitters"),
        "baseline_rss_mib": summary([r["baseline_rss_mib"] for r in runs]),
        "runs": runs,
    }


def _aggregate(per_run: list[list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    """Per step: median (min–max) over runs of each headline number."""
    out = []
    for steps in zip(*per_run, strict=True):
        row: dict[str, Any] = {key: steps[0][key]}
        for name in ("p50", "p99", "max") if "latency_ms" in steps[0] else ():
            row[f"{name}_ms"] = summary([st["latency_ms"][name] or 0 for st in steps])
        for name in (
            "opened",
            "deliveries_measured",
            "deliveries_expected",
            "connect_seconds",
            "gateway_rss_mib_open",
            "gateway_rss_mib_after_close",
            "gateway_cpu_idle",
            "gateway_cpu_busy",
            "posts_per_s",
            "gateway_cpu",
            "reconnects",
            "failed",
        ):
            if name in steps[0]:
                row[name] = summary([st[name] for st in steps])
        out.append(row)
    return out


def _ms(s: dict[str, Any]) -> str:
    return fmt(s, digits=1)


def markdown(res: dict[str, Any]) -> str:
    lines = [
        "One gateway process (`python -m pgjobs gateway`, as shipped; stream caps raised), "
        "clients in one other process (an asyncio protocol per connection), all on 127.0.0.1; "
        "RLIMIT_NOFILE "
        f"{res['nofile_limit']:,}. Baseline gateway RSS {fmt(res['baseline_rss_mib'])} MiB.",
        "",
        "**4a. Job streams** — one client per running job; progress transitions committed "
        "one per transaction at a fixed rate on jobs taken in random order; latency from "
        "the producer's COMMIT returning to the event's bytes reaching the client (each transition "
        "is received by exactly one client). A negative latency means the event reached "
        "the client before the producer's COMMIT round trip returned to it (PostgreSQL "
        "sends the NOTIFY at commit): the commit instant lies between the statement's "
        "start and its return, so p50 near 0 is exact to about one round trip.",
        "",
        "| clients | open | events received | p50 (ms) | p99 (ms) | max (ms) "
        "| gateway RSS open (MiB) | RSS after close (MiB) | gateway CPU idle / busy "
        "| connect time (s) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["job"]:
        lines.append(
            f"| {r['clients']:,} | {fmt(r['opened'])} | {fmt(r['deliveries_measured'])}/"
            f"{r['deliveries_expected']['median']:,.0f} | {_ms(r['p50_ms'])} | "
            f"{_ms(r['p99_ms'])} | {_ms(r['max_ms'])} | {fmt(r['gateway_rss_mib_open'])} | "
            f"{fmt(r['gateway_rss_mib_after_close'])} | "
            f"{r['gateway_cpu_idle']['median']:.0%} / {r['gateway_cpu_busy']['median']:.0%} | "
            f"{fmt(r['connect_seconds'], digits=1)} |"
        )
    lines += [
        "",
        "**4b. Company streams** — N clients on the company stream; one job enqueued at a "
        f"time, {COMPANY_RATE:g} per second; every client receives every event (samples = "
        "deliveries; deliveries not received within the wait after the last transition "
        "are counted as missing, not in the percentiles). Streams read "
        "`pgjobs.job_events` through the gateway's pool (10 connections, 50 waiters), so "
        "an open that cannot get a connection is told to reconnect later (no event).",
        "",
        "| clients | open | deliveries | p50 (ms) | p99 (ms) | max (ms) "
        "| gateway RSS open (MiB) | gateway CPU idle / busy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in res["company"]:
        lines.append(
            f"| {r['clients']:,} | {fmt(r['opened'])} | {fmt(r['deliveries_measured'])}/"
            f"{r['deliveries_expected']['median']:,.0f} | {_ms(r['p50_ms'])} | "
            f"{_ms(r['p99_ms'])} | {_ms(r['max_ms'])} | {fmt(r['gateway_rss_mib_open'])} | "
            f"{r['gateway_cpu_idle']['median']:.0%} / {r['gateway_cpu_busy']['median']:.0%} |"
        )
    if res.get("spread"):
        lines += [
            "",
            f"**4c. Company streams over many companies** — {res['spread_clients']:,} "
            "company-stream clients spread evenly over K companies (each company's feed "
            "reads `pgjobs.job_events` for its own streams); jobs enqueued one at a time, "
            f"{res['spread_rate']:g} per second, round-robin over the companies; each "
            "event is received by its company's clients only.",
            "",
            "| companies | clients each | open | deliveries | p50 (ms) | p99 (ms) "
            "| max (ms) | gateway RSS open (MiB) | gateway CPU idle / busy |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in res["spread"]:
            each = res["spread_clients"] / r["companies"]
            lines.append(
                f"| {r['companies']:,} | {each:,.0f} | {fmt(r['opened'])} | "
                f"{fmt(r['deliveries_measured'])}/{r['deliveries_expected']['median']:,.0f} | "
                f"{_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {_ms(r['max_ms'])} | "
                f"{fmt(r['gateway_rss_mib_open'])} | {r['gateway_cpu_idle']['median']:.0%} / "
                f"{r['gateway_cpu_busy']['median']:.0%} |"
            )
    if res.get("storm"):
        lines += [
            "",
            "**4d. Reconnect storm** — N browsers open their streams at the same instant "
            "(as after a gateway restart; no limit on connections being set up), each "
            "reconnecting after the gateway's `retry:` when told the database is busy, as "
            "EventSource does; time from the first connection until every stream has its "
            "first event. Job streams: each browser watches its own running job (the "
            "set-up reads it). Resuming job streams: the same, each "
            f"{res.get('resume_behind', 5)} progress events behind its job (the set-up "
            "also reads those). Resuming company streams: N dashboards of one company come "
            "back with the Last-Event-ID of the event before the company's last "
            f"{res.get('resume_behind', 5)}, so each catches those up from the table.",
            "",
            "| streams | all first events after (s) | told to reconnect | failed |",
            "| --- | ---: | ---: | ---: |",
        ]
        rows = [("job streams", r) for r in res["storm"]]
        rows += [("resuming job streams", r) for r in res.get("job_resume_storm", [])]
        rows += [("resuming company streams", r) for r in res.get("company_storm", [])]
        for kind, r in rows:
            lines.append(
                f"| {r['clients']:,} {kind} | {fmt(r['connect_seconds'], digits=1)} | "
                f"{fmt(r['reconnects'])} | {fmt(r['failed'])} |"
            )
    lines += [
        "",
        "**5. POST 202** — M keep-alive connections each POSTing jobs back to back with an "
        "API token (each POST verifies the token in the database, then inserts the job).",
        "",
        "| submitters | POSTs per run | p50 (ms) | p99 (ms) | max (ms) | POST/s | gateway CPU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, first in zip(res["post"], res["runs"][0]["post"], strict=True):
        lines.append(
            f"| {r['submitters']} | {first['posts']:,} | {_ms(r['p50_ms'])} | "
            f"{_ms(r['p99_ms'])} | {_ms(r['max_ms'])} | {fmt(r['posts_per_s'])} | "
            f"{r['gateway_cpu']['median']:.0%} |"
        )
    return "\n".join(lines)


def _step(rows: list[dict[str, Any]], key: str, n: int) -> dict[str, Any] | None:
    return next((r for r in rows if r[key] == n), None)


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    if res.get("skipped"):
        return [
            {"target": t, "measured": "—", "met": None, "why": res["skipped"]}
            for t in (
                "SSE commit → client p99 < 50 ms at 1,000 clients",
                "10,000 concurrent SSE clients held by one process",
                "POST 202 p99 < 200 ms",
            )
        ]
    rows = []
    r = _step(res["job"], "clients", 1_000)
    if r:
        p99 = r["p99_ms"]["median"]
        rows.append(
            {
                "target": "SSE commit → client p99 < 50 ms at 1,000 clients",
                "measured": f"job streams: p99 {p99:.1f} ms (p50 {r['p50_ms']['median']:.1f})",
                "met": p99 < 50,
                "why": "" if p99 < 50 else f"{p99 - 50:.0f} ms over; see docs/benchmarks.md",
            }
        )
    c = _step(res["company"], "clients", 1_000)
    if c:
        p99 = c["p99_ms"]["median"]
        opened, got = c["opened"]["median"], c["deliveries_measured"]["median"]
        expected = c["deliveries_expected"]["median"]
        ok = p99 < 50 and opened == 1_000 and got == expected
        rows.append(
            {
                "target": "SSE p99 < 50 ms at 1,000 clients, company stream (all see all)",
                "measured": f"p99 {p99:,.0f} ms of the deliveries received (p50 "
                f"{c['p50_ms']['median']:,.0f}); {opened:,.0f} of 1,000 streams opened, "
                f"{got:,.0f} of {expected:,.0f} deliveries within the wait",
                "met": ok,
                "why": ""
                if ok
                else (
                    "every stream opened and every event arrived, but late: fan-out "
                    "time in the one gateway process, see docs/benchmarks.md"
                    if opened == 1_000 and got == expected
                    else "streams not opened or events missing: see docs/benchmarks.md"
                ),
            }
        )
    big = _step(res["job"], "clients", 10_000)
    if big:
        held = big["opened"]["min"] == 10_000
        got = big["deliveries_measured"]["min"] == big["deliveries_expected"]["min"]
        rows.append(
            {
                "target": "10,000 concurrent SSE clients held by one process",
                "measured": f"{big['opened']['min']:,.0f} open, RSS "
                f"{big['gateway_rss_mib_open']['median']:,.0f} MiB, p99 "
                f"{big['p99_ms']['median']:.1f} ms",
                "met": held and got,
                "why": "" if held and got else "see docs/benchmarks.md",
            }
        )
    for p in res["post"]:
        p99 = p["p99_ms"]["median"]
        rows.append(
            {
                "target": f"POST 202 p99 < 200 ms ({p['submitters']} concurrent submitters)",
                "measured": f"p99 {p99:.1f} ms, {p['posts_per_s']['median']:,.0f} POST/s",
                "met": p99 < 200,
                "why": "" if p99 < 200 else f"{p99 - 200:.0f} ms over; see docs/benchmarks.md",
            }
        )
    return rows


def plot(res: dict[str, Any], out: Path, plt: Any) -> list[str]:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for rows, label, marker in ((res["job"], "job streams", "o"), (res["company"], "company", "s")):
        if not rows:
            continue
        xs = [r["clients"] for r in rows]
        for name, style in (("p50", "-"), ("p99", "--")):
            mids = [r[f"{name}_ms"]["median"] for r in rows]
            lo = [m - r[f"{name}_ms"]["min"] for m, r in zip(mids, rows, strict=True)]
            hi = [r[f"{name}_ms"]["max"] - m for m, r in zip(mids, rows, strict=True)]
            ax1.errorbar(
                xs, mids, yerr=[lo, hi], marker=marker, linestyle=style, capsize=3,
                label=f"{label} {name}",
            )  # fmt: skip
    ax1.axhline(50, color="grey", linestyle=":", linewidth=1)
    ax1.set_xscale("log")
    ax1.set_yscale("log")
    ax1.set_xlabel("concurrent SSE clients on one gateway process")
    ax1.set_ylabel("commit → client (ms, log)")
    ax1.set_title("Commit → SSE client latency")
    ax1.legend(fontsize=8)
    xs = [r["clients"] for r in res["job"]]
    ax2.plot(xs, [r["gateway_rss_mib_open"]["median"] for r in res["job"]], marker="o")
    ax2.axhline(res["baseline_rss_mib"]["median"], color="grey", linestyle=":", linewidth=1)
    ax2.set_xscale("log")
    ax2.set_xlabel("open job streams")
    ax2.set_ylabel("gateway RSS (MiB)")
    ax2.set_title("Gateway memory (dotted: baseline)")
    fig.tight_layout()
    fig.savefig(out / "gateway_sse.png", dpi=110)
    return ["gateway_sse.png"]
