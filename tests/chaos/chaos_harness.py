"""The chaos run (issue 17): jobs through real worker and gateway processes while a
controller breaks what production breaks, then a checker reads what was recorded.

It lives under ``tests/`` (not in the package): it is a test of the whole system, it
reuses the tests' TCP proxy (``tests/proxy.py``), and nothing in it is for users to
import. ``make chaos`` runs it as a script (50,000 jobs, a 5-minute outage); the reduced
run is ``tests/chaos/test_chaos.py`` in ``make test``.

*Runner.* A private embedded PostgreSQL (pgserver, so it can be restarted and stopped
without disturbing other tests), ``pgjobs worker`` processes with the demo handlers
(short ``echo`` jobs, ``sleep`` jobs that report progress, ``fail`` jobs that retry once
and then fail), one ``pgjobs gateway`` process, a producer that enqueues in batches, and
SSE subscribers: one company stream per company, and job-stream followers that follow
one job at a time, as browsers do (first frame the job's state, then reconnect with
Last-Event-ID whenever the stream ends, until the terminal event or a 204).

*Controller.* Keyed to progress (how many jobs finished), never to wall-clock: SIGKILLs
and restarts random workers all along; at 15% restarts PostgreSQL (``pg_ctl restart -m
fast``); at 30% terminates the gateway's LISTEN backend; at 45% freezes the proxied
worker's connections (half-open: no FIN, no RST); at 60% stops PostgreSQL for
``outage_seconds`` and starts it again. Nothing but the controller's own kills restarts
a process: a worker or the gateway that exits on its own is a finding.

*Checker.* From ``pgjobs.job_events`` and the subscribers' logs: every job reached one
terminal state (else lost), none has two terminal events (duplicates), every attempt
after the first follows a ``content_job.retrying`` event (a rescue or a retry), and
every followed job's events reached each subscriber complete, in order, and as the
database has them (same seq, type and status: never ahead of it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import ssl
import sys
import tempfile
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row

from pgjobs import migrate
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from proxy import Proxy

ROOT = Path(__file__).resolve().parents[2]
COMPANIES = ("acme", "globex")
TERMINAL_TYPES = ("content_job.done", "content_job.failed", "content_job.cancelled")
TERMINAL_STATUSES = frozenset({"done", "failed", "cancelled"})
# httpx parses the CA bundle into a new SSL context for every client, even for http://
# (20-130 ms of CPU each; the job followers make one per job they follow): one for all.
TLS = ssl.create_default_context()


@dataclass(frozen=True)
class ChaosConfig:
    jobs: int
    # Longer than every timeout configured for the run (see WORKER_ENV, GATEWAY_ENV and
    # db.open_pool: connect 10 s, pool checkout 2-5 s, connection use 5 s, lease 3 s,
    # LISTEN heartbeat at most 5 s, a round of pool reconnection attempts 5 s).
    outage_seconds: float
    workers: int = 4
    concurrency: int = 8
    job_followers: int = 6
    kill_every: tuple[float, float] = (1.0, 3.0)
    batch: int = 100
    in_flight: int = 400  # the producer keeps at most this many jobs unfinished
    deadline_seconds: float = 600.0  # a phase that does not progress fails the run
    faults: bool = True  # False: no kills or outages (the checker's own test)


WORKER_ENV = {
    "PGJOBS_LEASE_SECONDS": "3",
    "PGJOBS_HEARTBEAT_SECONDS": "0.75",
    "PGJOBS_RESCUE_INTERVAL_SECONDS": "0.5",
    "PGJOBS_POLL_INTERVAL_SECONDS": "0.5",
    "PGJOBS_RETRY_BASE_SECONDS": "0.2",
    "PGJOBS_RETRY_MAX_SECONDS": "1",
    "PGJOBS_SHUTDOWN_GRACE_SECONDS": "2",
    "PGJOBS_DB_USE_TIMEOUT_SECONDS": "5",
    # Short rounds of reconnection attempts (30 s by default), so that an outage of a few
    # rounds, where pools give up and start again, fits a reduced run.
    "PGJOBS_DB_RECONNECT_SECONDS": "5",
}
GATEWAY_ENV = {
    "PGJOBS_GATEWAY_POOL_TIMEOUT_SECONDS": "2",
    # Fewer waiters than the default 50, so that the requests that time out during a
    # short outage, after the pool gave its connections up, fill the queue: the case
    # where a pool that did not reconnect by itself would refuse every request for good
    # (db.GuardedPool), which the reduced run then catches.
    "PGJOBS_GATEWAY_POOL_MAX_WAITING": "10",
}


def _spec(n: int) -> JobSpec:
    company = COMPANIES[n % len(COMPANIES)]
    roll = n % 20
    if roll == 0:  # a retry, then failed: an extra attempt explained by a retry
        return JobSpec(company, "fail", {"message": "chaos"}, max_attempts=2)
    if roll < 4:  # progress events
        return JobSpec(company, "sleep", {"seconds": 0.2}, max_attempts=25)
    # Many attempts: a job may be rescued from several killed workers in a row.
    return JobSpec(company, "echo", {"n": n}, max_attempts=25)


# -- the database ----------------------------------------------------------------------


class Postgres:
    """A private embedded server that the controller may restart and stop."""

    def __init__(self, root: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver

            self.server = pgserver.get_server(root, cleanup_mode="delete")
        self.dsn: str = self.server.get_uri()
        self.socket_dir = str(conninfo_to_dict(self.dsn).get("host"))

    def _pg_ctl(self, args: list[str]) -> None:
        from pgserver._commands import pg_ctl

        pg_ctl(args, pgdata=self.server.pgdata, user=self.server.system_user, timeout=120)

    def restart(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "restart"])

    def stop(self) -> None:
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        # The options pgserver starts it with: Unix socket only, no TCP.
        opts = f"-h '' -k {self.socket_dir}"
        self._pg_ctl(["-w", "-o", opts, "-l", str(self.server.log), "start"])

    def cleanup(self) -> None:
        # Stopped here first: after pg_ctl restarted it, the postmaster is not the process
        # pgserver started, and pgserver's cleanup alone left it running after the test.
        with contextlib.suppress(Exception):
            self._pg_ctl(["-w", "-m", "immediate", "stop"])
        with contextlib.suppress(Exception):
            self.server.cleanup()


class SafeProxy(Proxy):
    """tests/proxy.py, closing the client's socket when PostgreSQL is down (the client
    then sees a refused connection, as it would without the proxy)."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await super()._accept(reader, writer)
        except OSError:
            writer.close()


async def query(dsn: str, sql: Any, params: Any = None) -> list[dict[str, Any]]:
    async with await psycopg.AsyncConnection.connect(
        dsn, autocommit=True, row_factory=dict_row, connect_timeout=5
    ) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


async def try_query(dsn: str, sql: Any, params: Any = None) -> list[dict[str, Any]] | None:
    """The rows, or None while the database cannot answer (it is down on purpose)."""
    try:
        return await asyncio.wait_for(query(dsn, sql, params), timeout=15)
    except (psycopg.Error, OSError, TimeoutError):
        return None


# -- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None
    generation: int = 0

    async def start(self) -> None:
        self.generation += 1
        argv = [a.replace("{gen}", str(self.generation)) for a in self.argv]
        with self.log.open("ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *argv, env=self.env, stdout=out, stderr=out, cwd=ROOT
            )

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# -- subscribers -----------------------------------------------------------------------


@dataclass
class Seen:
    job_id: str
    seq: int
    type: str
    status: str


async def sse_events(response: httpx.Response) -> Any:
    """(id, data) of each event of a text/event-stream response."""
    event_id, data = None, []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event_id, json.loads("\n".join(data))
            event_id, data = None, []
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


@dataclass
class Recorder:
    company_seen: dict[str, list[Seen]] = field(default_factory=dict)
    # one entry per followed job: its events in the order received, the first one the
    # job's state when the stream opened
    follows: list[tuple[str, list[Seen]]] = field(default_factory=list)
    reconnects: int = 0
    odd_answers: list[str] = field(default_factory=list)


class Subscribers:
    def __init__(self, base: str, tokens: dict[str, str], recorder: Recorder) -> None:
        self.base = base
        self.tokens = tokens
        self.rec = recorder
        self.stopping = asyncio.Event()

    def _http(self, company: str) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[company]}"}
        timeout = httpx.Timeout(10.0, read=60.0)
        return httpx.AsyncClient(base_url=self.base, headers=headers, timeout=timeout, verify=TLS)

    async def company(self, company: str) -> None:
        """A company stream, reconnecting with Last-Event-ID until told to stop."""
        seen = self.rec.company_seen.setdefault(company, [])
        last: str | None = None
        async with self._http(company) as http:
            while not self.stopping.is_set():
                headers = {"Last-Event-ID": last} if last else {}
                with contextlib.suppress(httpx.HTTPError, OSError):
                    async with http.stream(
                        "GET", f"/api/companies/{company}/events", headers=headers
                    ) as response:
                        if response.status_code != 200:
                            self.rec.odd_answers.append(f"company {response.status_code}")
                        else:
                            async for event_id, data in sse_events(response):
                                if self.stopping.is_set():
                                    return
                                last = event_id or last
                                seen.append(_seen(data))
                self.rec.reconnects += 1
                await self._pause()

    async def follow(self, job_id: str, company: str) -> None:
        """One job's stream, as a browser follows it, until its terminal event."""
        seen: list[Seen] = []
        self.rec.follows.append((job_id, seen))
        last: str | None = None
        async with self._http(company) as http:
            while not self.stopping.is_set():
                headers = {"Last-Event-ID": last} if last else {}
                with contextlib.suppress(httpx.HTTPError, OSError):
                    async with http.stream(
                        "GET",
                        f"/api/companies/{company}/content-jobs/{job_id}/events",
                        headers=headers,
                    ) as response:
                        if response.status_code == 204:
                            return  # it has the terminal event already
                        if response.status_code != 200:
                            self.rec.odd_answers.append(f"job {response.status_code}")
                        else:
                            async for event_id, data in sse_events(response):
                                if "jobId" not in data:  # {"error": "Job not found"}
                                    self.rec.odd_answers.append(f"job {job_id}: {data}")
                                    return
                                last = event_id or last
                                seen.append(_seen(data))
                                if data["status"] in TERMINAL_STATUSES:
                                    return
                self.rec.reconnects += 1
                await self._pause()

    async def _pause(self) -> None:
        # The reconnect delay a browser waits (the gateway's retry hint is 1-5 s).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=random.uniform(0.3, 1.0))


def _seen(data: dict[str, Any]) -> Seen:
    return Seen(str(data["jobId"]), int(data["seq"]), str(data["type"]), str(data["status"]))


# -- the run ---------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the checker found. ``kills``: workers SIGKILLed; ``restarts``: processes the
    controller started again after a kill, plus PostgreSQL's restart and its start after
    the outage; ``stream_gaps``: followed jobs whose events a subscriber did not get
    complete and in order. ``problems`` lists every finding, these and the rest
    (unexplained attempts, events the database does not have, processes that exited)."""

    jobs: int
    kills: int
    restarts: int
    lost: int
    duplicates: int
    stream_gaps: int
    problems: list[str]

    @property
    def summary(self) -> str:
        return (
            f"jobs {self.jobs}, kills {self.kills}, restarts {self.restarts}, lost {self.lost}, "
            f"duplicates {self.duplicates}, stream gaps {self.stream_gaps}"
        )

    @property
    def ok(self) -> bool:
        return not self.problems


class ChaosRun:
    def __init__(self, config: ChaosConfig, workdir: Path, log: Callable[[str], None]) -> None:
        self.cfg = config
        self.dir = workdir
        self.say = log
        self.produced: dict[str, str] = {}  # job id -> company
        self.committed: list[str] = []  # the produced jobs known to be enqueued
        self.finished = 0
        self.kills = 0
        self.restarts = 0
        self.problems: list[str] = []
        self.rec = Recorder()
        self.fault_lock = asyncio.Lock()  # one fault or worker restart at a time
        self.done = asyncio.Event()
        self.after_run: Callable[[str], Awaitable[None]] | None = None  # tests inject faults

    async def _progress(self, dsn: str) -> None:
        rows = await try_query(
            dsn,
            "SELECT count(*) AS n FROM pgjobs.jobs WHERE status IN ('done','failed','cancelled')",
        )
        if rows is not None:
            self.finished = int(rows[0]["n"])

    async def _wait_for(
        self, what: str, ready: Callable[[], Awaitable[bool]], within: float | None = None
    ) -> None:
        within = within or self.cfg.deadline_seconds
        deadline = time.monotonic() + within
        while not await ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"chaos run stuck: no {what} within {within:g}s")
            await asyncio.sleep(0.2)

    async def run(self) -> Outcome:
        # Not named pgdata: a DSN naming a "pgdata" socket directory is taken by pgjobs
        # processes for the embedded server, which they would start again themselves.
        pg = Postgres(self.dir / "db")
        try:
            return await self._run(pg)
        finally:
            pg.cleanup()

    async def _run(self, pg: Postgres) -> Outcome:
        cfg, dsn = self.cfg, pg.dsn
        migrate.apply(dsn)
        from pgjobs.gateway import auth

        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            tokens = {c: await auth.create_token(conn, c, "chaos") for c in COMPANIES}
        proxy = SafeProxy(dsn)
        await proxy.start()
        env = {
            **os.environ,
            **WORKER_ENV,
            **GATEWAY_ENV,
            "PYTHONPATH": str(ROOT / "src"),
            "PGJOBS_STORAGE_DIR": str(self.dir / "storage"),
            "PGJOBS_DSN": dsn,
        }
        py = [sys.executable, "-m", "pgjobs"]
        workers = [
            Proc(
                f"w{n}",
                [
                    *py,
                    "worker",
                    "--handlers",
                    "pgjobs.demo:registry",
                    "--concurrency",
                    str(cfg.concurrency),
                    "--worker-id",
                    f"chaos-w{n}-{{gen}}",
                    *(["--dsn", proxy.dsn] if n == 0 else []),
                ],
                env,
                self.dir / f"worker{n}.log",
            )
            for n in range(cfg.workers)
        ]
        port = _free_port()
        gateway = Proc("gateway", [*py, "gateway", "--port", str(port)], env, self.dir / "gw.log")
        procs = [*workers, gateway]
        base = f"http://127.0.0.1:{port}"
        subs = Subscribers(base, tokens, self.rec)
        tasks: list[asyncio.Task[Any]] = []
        try:
            for proc in procs:
                await proc.start()
            await self._wait_for("gateway", lambda: _ready(base), within=60)
            tasks += [asyncio.create_task(subs.company(c)) for c in COMPANIES]
            await self._wait_for("company streams", lambda: _streams_open(base), within=60)
            producer = asyncio.create_task(self._produce(dsn))
            tasks.append(producer)
            tasks += [asyncio.create_task(self._follow(subs)) for _ in range(cfg.job_followers)]
            tasks.append(asyncio.create_task(self._watch_exits(procs)))
            if cfg.faults:
                tasks.append(asyncio.create_task(self._kill_loop(dsn, workers)))
                await self._faults(pg, dsn, proxy, workers[0].log)
            await self._wait_for("production", lambda: _done(producer))
            producer.result()
            await self._wait_for("all jobs finished", lambda: self._all_finished(dsn))
            self.done.set()
            await self._wait_for("subscribers", lambda: self._streams_complete(dsn), within=120)
        finally:
            self.done.set()
            subs.stopping.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for proc in procs:
                if proc.alive:
                    assert proc.process is not None
                    proc.process.send_signal(signal.SIGTERM)
            for proc in procs:
                if proc.process is not None:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.process.wait(), timeout=30)
                    if proc.alive:
                        proc.process.kill()
            await proxy.stop()
        if self.after_run is not None:
            await self.after_run(dsn)
        return await check(dsn, self)

    async def _all_finished(self, dsn: str) -> bool:
        await self._progress(dsn)
        return self.finished >= self.cfg.jobs

    async def _produce(self, dsn: str) -> None:
        """Enqueue every job in batches, keeping a bounded number unfinished; a batch
        that fails (database down) is retried for the jobs that did not commit."""
        client = await Client.connect(dsn, max_size=2)
        try:
            n = 0
            while n < self.cfg.jobs:
                await self._wait_for("room to produce", lambda: self._room(dsn))
                batch = [_spec(i) for i in range(n, min(n + self.cfg.batch, self.cfg.jobs))]
                n += len(batch)
                for spec in batch:
                    self.produced[str(spec.id)] = spec.company_id
                pending = batch
                while pending:
                    try:
                        await client.enqueue_many(pending)
                        break
                    except (psycopg.Error, OSError, TimeoutError):
                        # The commit may have happened before the error: keep what did.
                        await asyncio.sleep(0.5)
                        rows = await try_query(
                            dsn,
                            "SELECT id::text FROM pgjobs.jobs WHERE id = ANY(%s::uuid[])",
                            ([str(s.id) for s in pending],),
                        )
                        if rows is not None:
                            stored = {r["id"] for r in rows}
                            pending = [s for s in pending if str(s.id) not in stored]
                self.committed.extend(str(spec.id) for spec in batch)
        finally:
            await client.close()

    async def _room(self, dsn: str) -> bool:
        await self._progress(dsn)
        return len(self.produced) - self.finished < self.cfg.in_flight

    async def _follow(self, subs: Subscribers) -> None:
        """Follow random jobs, one after another, until every job finished."""
        while not self.done.is_set():
            if not self.committed:
                await asyncio.sleep(0.2)
                continue
            job_id = random.choice(self.committed)
            await subs.follow(job_id, self.produced[job_id])

    async def _kill_loop(self, dsn: str, workers: list[Proc]) -> None:
        """SIGKILL a random worker and start it again, over and over. Not the proxied
        worker, whose half-open connections must heal without a restart. A restart
        holds the fault lock until the new process registered: a worker that starts while
        the database is down exits at once (as it should: its supervisor retries), and
        restarting processes is the controller's job only here."""
        victims = workers[1:]
        while not self.done.is_set():
            await asyncio.sleep(random.uniform(*self.cfg.kill_every))
            async with self.fault_lock:
                if self.done.is_set():
                    return
                proc = random.choice(victims)
                if not proc.alive:
                    continue
                assert proc.process is not None
                proc.process.kill()
                await proc.process.wait()
                self.kills += 1
                await proc.start()
                self.restarts += 1
                name = f"chaos-{proc.name}-{proc.generation}"

                async def registered(name: str = name) -> bool:
                    rows = await try_query(
                        dsn, "SELECT 1 FROM pgjobs.workers WHERE id = %s", (name,)
                    )
                    return bool(rows)

                await self._wait_for(f"{name} registered", registered, within=120)

    async def _watch_exits(self, procs: list[Proc]) -> None:
        """A process that exits without being killed did not ride out a fault."""
        reported: set[tuple[str, int]] = set()
        while not self.done.is_set():
            for proc in procs:
                key = (proc.name, proc.generation)
                code = None if proc.process is None else proc.process.returncode
                if code is not None and code != -signal.SIGKILL and key not in reported:
                    reported.add(key)
                    self.problems.append(f"{proc.name} exited by itself with {code} ({proc.log})")
            await asyncio.sleep(0.5)

    async def _at(self, dsn: str, fraction: float) -> None:
        target = int(self.cfg.jobs * fraction)

        async def reached() -> bool:
            await self._progress(dsn)
            return self.finished >= target

        await self._wait_for(f"{fraction:.0%} of jobs finished", reached)

    async def _faults(self, pg: Postgres, dsn: str, proxy: Proxy, w0_log: Path) -> None:
        await self._at(dsn, 0.15)
        self.say(f"restart PostgreSQL at {self.finished} finished")
        async with self.fault_lock:
            await asyncio.to_thread(pg.restart)
            self.restarts += 1

        await self._at(dsn, 0.30)
        self.say(f"terminate the gateway's LISTEN backend at {self.finished} finished")
        listener = (
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgjobs-gateway-listener'"
        )
        before = await query(dsn, listener)
        await query(
            dsn,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pgjobs-gateway-listener'",
        )

        async def relistening() -> bool:
            rows = await try_query(dsn, listener) or []
            return bool({r["pid"] for r in rows} - {r["pid"] for r in before})

        await self._wait_for("new gateway LISTEN connection", relistening, within=120)

        await self._at(dsn, 0.45)
        self.say(f"half-open: freeze worker w0's connections at {self.finished} finished")
        frozen_at = (await query(dsn, "SELECT clock_timestamp() AS t"))[0]["t"]
        proxy.freeze_existing()

        async def w0_working() -> bool:
            # A job it finished, or (none left for it) a heartbeat written well after its
            # connections froze: the same process is working again.
            rows = await try_query(
                dsn,
                "SELECT 1 FROM pgjobs.job_events WHERE worker_id LIKE 'chaos-w0-%%'"
                " AND type = 'content_job.done' AND created_at > %(t)s"
                " UNION ALL SELECT 1 FROM pgjobs.workers WHERE id LIKE 'chaos-w0-%%'"
                " AND last_heartbeat_at > %(t)s + interval '10 seconds'",
                {"t": frozen_at},
            )
            return bool(rows)

        w0_back = asyncio.create_task(
            self._wait_for("w0 working after the half-open cut", w0_working, within=300)
        )

        await self._at(dsn, 0.60)
        self.say(f"stop PostgreSQL for {self.cfg.outage_seconds:g}s at {self.finished} finished")
        async with self.fault_lock:
            await asyncio.to_thread(pg.stop)
            await asyncio.sleep(self.cfg.outage_seconds)
            await asyncio.to_thread(pg.start)
            self.restarts += 1
        self.say("PostgreSQL is back; no process is restarted")
        try:
            await w0_back
        except RuntimeError as exc:
            # What w0 last said, to tell where it waits (CI keeps no log files).
            said = (await asyncio.to_thread(w0_log.read_text, errors="replace")).splitlines()
            warned = [line for line in said if " WARNING " in line or " ERROR " in line]
            self.problems.append(str(exc))
            self.problems += [f"w0: {line[:300]}" for line in warned[-15:]]

    async def _streams_complete(self, dsn: str) -> bool:
        """Every company stream has every job's terminal event, every follow ended."""
        for company in COMPANIES:
            ids = {j for j, c in self.produced.items() if c == company}
            seen = {
                s.job_id
                for s in self.rec.company_seen.get(company, [])
                if s.status in TERMINAL_STATUSES
            }
            if not ids <= seen:
                return False
        return True


async def _done(task: asyncio.Task[Any]) -> bool:
    return task.done()


async def _ready(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, OSError):
        async with httpx.AsyncClient(timeout=5) as http:
            return (await http.get(f"{base}/readyz")).status_code == 200
    return False


async def _streams_open(base: str) -> bool:
    with contextlib.suppress(httpx.HTTPError, OSError):
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(f"{base}/metrics")).text
            for line in text.splitlines():
                if line.startswith('pgjobs_sse_subscribers{kind="company"}'):
                    return float(line.rsplit(" ", 1)[1]) >= len(COMPANIES)
    return False


# -- the checker -----------------------------------------------------------------------


async def check(dsn: str, run: ChaosRun) -> Outcome:
    """Read the audit log and the subscribers' logs; count what went wrong."""
    problems = list(run.problems)
    # A stream answers 200 (a reconnect hint while the database is away) or 204 (the
    # client has the terminal event); anything else would stop a browser's EventSource.
    problems += [f"unexpected stream answer: {answer}" for answer in run.rec.odd_answers]
    rows = await query(
        dsn,
        "SELECT job_id::text, seq, type, status, attempt FROM pgjobs.job_events"
        " ORDER BY job_id, seq",
    )
    history: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        history.setdefault(row["job_id"], []).append(row)
    status = {
        r["id"]: r["status"] for r in await query(dsn, "SELECT id::text, status FROM pgjobs.jobs")
    }
    lost = duplicates = gaps = 0
    for job_id in run.produced:
        events = history.get(job_id, [])
        terminal = [e for e in events if e["type"] in TERMINAL_TYPES]
        if status.get(job_id) not in TERMINAL_STATUSES or not terminal:
            lost += 1
            problems.append(f"lost: {job_id} is {status.get(job_id)} after {len(events)} events")
        if len(terminal) > 1:
            duplicates += 1
            problems.append(f"duplicate: {job_id} has {len(terminal)} terminal events")
        retried = True  # the first attempt needs no explanation
        for event in events:
            if event["type"] == "content_job.retrying":
                retried = True
            elif event["type"] == "content_job.running":
                if not retried:
                    problems.append(f"unexplained attempt: {job_id} attempt {event['attempt']}")
                retried = False
            elif event["type"] == "content_job.queued" and event["seq"] > 1:
                retried = True  # released at a graceful shutdown: the attempt was given back
    in_db = {(r["job_id"], r["seq"]): (r["type"], r["status"]) for r in rows}

    def ahead(s: Seen, where: str) -> None:
        if in_db.get((s.job_id, s.seq)) != (s.type, s.status):
            problems.append(
                f"ahead of the database: {where} got {s} ({in_db.get((s.job_id, s.seq))})"
            )

    for company, seen in run.rec.company_seen.items():
        by_job: dict[str, list[int]] = {}
        for s in seen:
            ahead(s, f"{company} stream")
            by_job.setdefault(s.job_id, []).append(s.seq)
        for job_id, c in run.produced.items():
            if c != company:
                continue
            want = [e["seq"] for e in history.get(job_id, [])]
            if by_job.get(job_id, []) != want:
                gaps += 1
                problems.append(
                    f"stream gap: {company} stream got {job_id} seqs {by_job.get(job_id)}, "
                    f"the database has {want}"
                )
    for job_id, seen in run.rec.follows:
        for s in seen:
            ahead(s, "job stream")
        if not seen:
            continue  # stopped before the stream opened
        first = seen[0].seq
        want = [e["seq"] for e in history.get(job_id, []) if e["seq"] >= first]
        got = [s.seq for s in seen]
        ended = seen[-1].status in TERMINAL_STATUSES
        if got != (want if ended else want[: len(got)]):
            gaps += 1
            problems.append(f"stream gap: job stream of {job_id} got {got}, database {want}")
    return Outcome(len(run.produced), run.kills, run.restarts, lost, duplicates, gaps, problems)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="pgjobs chaos run (make chaos)")
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--outage", type=float, default=300.0, help="seconds PostgreSQL is down")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    config = ChaosConfig(
        jobs=args.jobs,
        outage_seconds=args.outage,
        workers=args.workers,
        deadline_seconds=max(900.0, args.outage * 3),
    )
    workdir = Path(tempfile.mkdtemp(prefix="pgjobs-chaos-"))
    print(f"chaos run in {workdir}: {config}", flush=True)
    run = ChaosRun(config, workdir, lambda text: print(text, flush=True))
    outcome = asyncio.run(run.run())
    print(outcome.summary, flush=True)
    for problem in outcome.problems[:50]:
        print("  " + problem)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
