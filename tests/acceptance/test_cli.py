"""The `pgjobs` command as a user types it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from helpers import finish_params
from pgjobs.queries import QUERIES

ROOT = Path(__file__).resolve().parents[2]


def pgjobs(
    *args: str,
    dsn: str | None = None,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "PGJOBS_DSN"}
    if dsn is not None:
        full_env["PGJOBS_DSN"] = dsn
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "pgjobs", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def test_enqueue_list_show_cancel_retry(dsn: str) -> None:
    out = pgjobs(
        "enqueue",
        "acme",
        "render",
        "--input",
        '{"title": "x"}',
        "--source-task-id",
        "t-1",
        "--priority",
        "3",
        "--max-attempts",
        "2",
        dsn=dsn,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    uuid.UUID(job_id)

    listed = pgjobs("jobs", "list", "acme", "--json", dsn=dsn)
    assert listed.returncode == 0, listed.stderr
    (row,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["id"] == job_id
    assert row["status"] == "queued"
    assert row["sourceTaskId"] == "t-1"
    assert row["priority"] == 3

    cancelled = pgjobs("cancel", job_id, dsn=dsn)
    assert cancelled.stdout.strip() == f"{job_id} cancelled"
    again = pgjobs("cancel", job_id, dsn=dsn)
    assert again.returncode == 1
    assert again.stderr.strip() == f"pgjobs: error: cannot cancel job {job_id}: it is cancelled"
    assert pgjobs("retry", job_id, dsn=dsn).stdout.strip() == f"{job_id} queued"

    shown = pgjobs("jobs", "show", job_id, "--json", dsn=dsn)
    timeline = [e["type"] for e in json.loads(shown.stdout)["events"]]
    assert timeline == ["content_job.queued", "content_job.cancelled", "content_job.retrying"]
    human = pgjobs("jobs", "show", job_id, dsn=dsn)
    assert "content_job.cancelled" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["enqueue", "acme", "render", "--input", "[1]"], "--input must be a JSON object"),
        (["enqueue", "acme", "render", "--input", "{"], "--input is not valid JSON"),
        (["enqueue", "acme", "render", "--input", '{"a": NaN}'], "NaN is not valid JSON"),
        (["enqueue", "acme", "render", "--run-at", "tomorrow"], "must be an ISO 8601 time"),
        (["enqueue", "acme", "render", "--run-at", "2030-01-01T00:00"], "needs a timezone"),
        (["enqueue", "acme", "render", "--max-attempts", "0"], "expected a number >= 1"),
        (["enqueue", "acme", " "], "job_type is required"),
        (["jobs", "show", "not-a-uuid"], "job not-a-uuid not found"),
        (["worker", "--handlers", "nowhere"], "must look like package.module:registry"),
    ],
)
def test_bad_input_is_one_clear_line(dsn: str, args: list[str], message: str) -> None:
    out = pgjobs(*args, dsn=dsn)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_unreachable_bad_and_unmigrated_databases(empty_dsn: str) -> None:
    for dsn, message in [
        ("postgresql://nobody@127.0.0.1:1/none", "cannot connect to PostgreSQL at"),
        ("this is not a dsn", "invalid DSN"),
        (empty_dsn, "no pgjobs schema: run `pgjobs migrate` first"),
    ]:
        out = pgjobs("jobs", "list", "acme", dsn=dsn)
        assert out.returncode == 1
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert message in lines[0]
    password = pgjobs("enqueue", "a", "b", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/x")
    assert "hunter2" not in password.stderr


@pytest.mark.parametrize(
    "command", [["worker", "--handlers", "pgjobs.demo:registry"], ["gateway", "--port", "1"]]
)
def test_a_server_command_on_a_database_not_migrated_says_so_in_one_line(
    empty_dsn: str, command: list[str]
) -> None:
    """Started before `pgjobs migrate` (the usual first deploy mistake): the reason and what
    to do, not a traceback (the worker's deregistration failed on the missing table and
    hid it; the gateway's came from uvicorn's lifespan)."""
    out = pgjobs(*command, dsn=empty_dsn)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines() == [
        "pgjobs: error: the database has no pgjobs schema: run `pgjobs migrate` first"
    ], out.stderr


def test_migrate_is_idempotent(empty_dsn: str) -> None:
    first = pgjobs("migrate", dsn=empty_dsn)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "applied 0001_initial" or first.stdout.startswith("applied")
    # yoyo's INFO line per statement is only for -v.
    assert "INFO" not in first.stderr, first.stderr
    assert pgjobs("migrate", dsn=empty_dsn).stdout.strip() == "schema is up to date"


def test_no_dsn_means_embedded_postgres_under_dot_pgjobs(tmp_path: Path) -> None:
    env = {"PYTHONPATH": str(ROOT / "src")}
    migrated = pgjobs("migrate", cwd=tmp_path, env=env, timeout=120)
    assert migrated.returncode == 0, migrated.stderr
    assert (tmp_path / ".pgjobs" / "pgdata" / "PG_VERSION").exists()
    enq = pgjobs("enqueue", "acme", "echo", cwd=tmp_path, env=env, timeout=120)
    assert enq.returncode == 0, enq.stderr
    listed = pgjobs("jobs", "list", "acme", cwd=tmp_path, env=env, timeout=120)
    assert enq.stdout.strip() in listed.stdout
    audit = pgjobs(
        "psql",
        "-At",
        "-c",
        "select type from pgjobs.job_events",
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert audit.stdout.strip() == "content_job.queued"


def _postmaster_pid(home: Path) -> int:
    return int((home / ".pgjobs" / "pgdata" / "postmaster.pid").read_text().split()[0])


def _wait_until_ended(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _no_dsn_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PGJOBS_DSN"}
    env.update(PYTHONPATH=str(ROOT / "src"), PGJOBS_STORAGE_DIR=str(home / "storage"))
    return env


def _serving(command: str, home: Path, **popen: Any) -> subprocess.Popen[str]:
    """`pgjobs COMMAND --port (a free one)` started in ``home`` with no DSN (the embedded
    server under it)."""
    args = [sys.executable, "-m", "pgjobs", command, "--port", str(_free_port())]
    return subprocess.Popen(args, text=True, cwd=home, env=_no_dsn_env(home), **popen)


def test_ctrl_c_on_make_run_stops_the_embedded_postgres(tmp_path: Path) -> None:
    """Ctrl-C in the terminal of `make run` (SIGINT to its whole process group: the demo,
    its workers and its gateway) leaves nothing running, the embedded server included."""
    proc = _serving(
        "demo",
        home=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            if "press Ctrl-C" in line or time.monotonic() > deadline:
                break
        postmaster = _postmaster_pid(tmp_path)
        os.killpg(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert _wait_until_ended(postmaster), "the embedded PostgreSQL is still running"


def test_the_last_process_stops_the_embedded_postgres_after_a_sigterm_or_a_kill(
    tmp_path: Path,
) -> None:
    """A gateway on the embedded server stopped by SIGTERM (uvicorn re-raises it) still
    leaves it, and a user of it that was killed outright does not keep it running."""
    env = _no_dsn_env(tmp_path)
    assert pgjobs("migrate", cwd=tmp_path, env=env, timeout=120).returncode == 0
    gateway = _serving(
        "gateway",
        home=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert gateway.stderr is not None
        for line in gateway.stderr:
            if "Application startup complete" in line:
                break
        # A user of the server that was killed: its pid stays in pgserver's list.
        killed = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        users = tmp_path / ".pgjobs" / "pgdata" / ".handle_pids.json"
        users.write_text(json.dumps([*json.loads(users.read_text()), killed.pid]))
        killed.kill()
        killed.wait()
        postmaster = _postmaster_pid(tmp_path)
        gateway.send_signal(signal.SIGTERM)
        gateway.communicate(timeout=60)
    finally:
        if gateway.poll() is None:
            gateway.kill()
    assert gateway.returncode == 128 + signal.SIGTERM
    assert _wait_until_ended(postmaster), "the embedded PostgreSQL is still running"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_run_demo_end_to_end(dsn: str, tmp_path: Path) -> None:
    """What `make run` runs: workers + gateway, a job over HTTP, the rest in bulk."""
    out = pgjobs(
        "demo",
        "--exit-when-done",
        "--port",
        "0",
        dsn=dsn,
        cwd=tmp_path,
        env={"PGJOBS_STORAGE_DIR": str(tmp_path / "storage")},
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    results = out.stdout.split("results:")[1]
    assert "acme/render(http)  done" in results
    assert results.count(" done ") == 5
    assert "acme/fail          failed  attempts 2  error: RuntimeError: simulated outage" in results
    # Nothing to try against a gateway that is being stopped.
    assert "pgj_" not in out.stdout
    assert "dashboard" not in out.stdout
    assert "curl" not in out.stdout
    assert out.stdout.rstrip().endswith("workers and gateway stopped")


def test_demo_says_its_port_was_busy_and_prints_how_to_try_the_gateway(
    dsn: str, tmp_path: Path
) -> None:
    """Without --exit-when-done the demo keeps running, with a token and curl commands, until
    Ctrl-C; a busy port is named before the one it took."""
    env = {k: v for k, v in os.environ.items() if k != "PGJOBS_DSN"}
    env.update(PGJOBS_DSN=dsn, PGJOBS_STORAGE_DIR=str(tmp_path / "storage"))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgjobs", "demo", "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 180
            for line in proc.stdout:
                lines.append(line)
                if "press Ctrl-C" in line or time.monotonic() > deadline:
                    break
            # The dashboard it names is served there while it runs.
            page = re.search(r"^dashboard  (\S+) ", "".join(lines), re.MULTILINE)
            assert page is not None, lines
            with urllib.request.urlopen(page.group(1), timeout=10) as response:  # noqa: S310
                assert response.headers["Content-Type"].startswith("text/html")
                assert b"API token" in response.read()
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = "".join(lines) + rest
    assert proc.returncode == 0, out
    busy_at = out.index(f"port {port} is busy")
    started = out.index("the gateway at http://127.0.0.1:")
    assert busy_at < started, out
    assert f"http://127.0.0.1:{port}" not in out
    assert "curl -N -H 'Authorization: Bearer pgj_" in out
    # The dashboard's address, with the token to sign in with right below it.
    dashboard = re.search(r"^dashboard  (http://127\.0\.0\.1:\d+/) ", out, re.MULTILINE)
    assert dashboard is not None, out
    token = re.search(r"API token for company acme, shown once: (pgj_\S+)\)", out)
    assert token is not None, out
    assert out.index(dashboard.group(0)) < out.index(token.group(0))
    assert out.rstrip().endswith("workers and gateway stopped")


def test_worker_refuses_a_job_type_its_registry_lacks(dsn: str) -> None:
    out = pgjobs(
        "worker", "--handlers", "pgjobs.demo:registry", "--job-types", "echo,nosuch", dsn=dsn
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "--job-types names 'nosuch'" in lines[0]
    assert "echo" in lines[0]  # says what the registry has


def test_a_queued_job_no_live_worker_serves_is_marked(dsn: str) -> None:
    job_id = pgjobs("enqueue", "acme", "render", dsn=dsn).stdout.strip()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A worker that stopped heartbeating an hour ago does not count as live.
        conn.execute(
            "insert into pgjobs.workers (id, hostname, pid, job_types, concurrency,"
            " last_heartbeat_at) values ('gone', 'h', 1, '{render}', 1, now() - interval '1 hour')"
        )
        listed = pgjobs("jobs", "list", "acme", dsn=dsn)
        assert "(no live worker serves render)" in listed.stdout
        (row,) = [
            json.loads(x)
            for x in pgjobs("jobs", "list", "acme", "--json", dsn=dsn).stdout.splitlines()
        ]
        assert row["servedBy"] == 0
        shown = pgjobs("jobs", "show", job_id, dsn=dsn)
        assert "no live worker serves render" in shown.stdout
        conn.execute(
            "insert into pgjobs.workers (id, hostname, pid, job_types, concurrency)"
            " values ('live', 'h', 2, '{echo,render}', 1)"
        )
        listed = pgjobs("jobs", "list", "acme", dsn=dsn)
        assert "no live worker" not in listed.stdout
        shown = json.loads(pgjobs("jobs", "show", job_id, "--json", dsn=dsn).stdout)
        assert shown["servedBy"] == 1
        assert "no live worker" not in pgjobs("jobs", "show", job_id, dsn=dsn).stdout


def test_jobs_show_aligns_its_timeline_and_prints_the_last_traceback(dsn: str) -> None:
    """Issue 14: the timeline's columns line up whatever their contents, a missing value
    is `-` (never `None`), and the last failed attempt's traceback follows in full."""
    job_id = pgjobs("enqueue", "acme", "render", dsn=dsn).stdout.strip()
    traceback = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in f\nValueError: boom\n'
    )
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        claim = {
            "now": None,
            "limit": 1,
            "lease_seconds": 30.0,
            "job_types": None,
            "after_company": None,
        }
        (first,) = conn.execute(
            QUERIES["job_claim_batch"], {**claim, "worker_id": "host-a:4242:abcdef"}
        ).fetchall()
        params = {**finish_params(first, "error"), "errors": ["ValueError: boom"]}
        conn.execute(QUERIES["job_finish_many_if_leased"], {**params, "tracebacks": [traceback]})
        (second,) = conn.execute(QUERIES["job_claim_batch"], {**claim, "worker_id": "w"}).fetchall()
        conn.execute(
            QUERIES["job_progress_if_leased"],
            {"id": second["id"], "lease_token": second["lease_token"], "now": None}
            | {"fraction": 0.5, "message": "half"},
        )
    out = pgjobs("jobs", "show", job_id, dsn=dsn)
    assert out.returncode == 0, out.stderr
    assert "None" not in out.stdout, out.stdout
    fields = dict(line.strip().split(": ", 1) for line in out.stdout.split("\n\n")[0].splitlines())
    assert fields["resultAssetId"] == "-"
    assert fields["errorMessage"] == "ValueError: boom"

    lines = out.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["seq", "time"])
    header, rows = lines[start], lines[start + 1 : start + 6]
    columns = ["seq", "time", "event", "status", "attempt", "worker", "details"]
    at = [header.index(name) for name in columns]
    assert at == sorted(at)
    for row in rows:
        # Every cell starts at its header's column, after a space.
        cells = [row[a:b].strip() for a, b in zip(at, [*at[1:], None], strict=True)]
        assert all(cells), (row, cells)
        assert all(row[a - 1] == " " for a in at[1:]), row
    assert [row[at[2] :].split()[0] for row in rows] == [
        "content_job.queued",
        "content_job.running",
        "content_job.retrying",
        "content_job.running",
        "content_job.progress",
    ]
    queued, running, retrying = rows[:3]
    assert queued[at[5] :].split() == ["-", "-"]  # no worker, no details
    assert running[at[5] :].split() == ["host-a:4242:abcdef", "-"]
    details = json.loads(retrying[at[6] :])
    assert details["errorMessage"] == "ValueError: boom"
    assert set(details) == {"errorMessage", "runAt"}
    assert "Traceback" not in retrying  # not squeezed into a cell

    tail = out.stdout.split("last traceback (seq 3, attempt 1):\n", 1)[1]
    assert tail == traceback


@pytest.mark.parametrize(
    ("run_at", "message"),
    [
        ("0001-01-01T00:00:00+00:01", "--run-at must lie between"),
        ("9999-12-31T23:59:59-00:01", "--run-at must lie between"),
        ("9999-12-31T23:59:59-23:59", "--run-at has a UTC offset beyond ±14:00"),
        ("2030-01-01T00:00:00+14:01", "--run-at has a UTC offset beyond ±14:00"),
        ("2030-01-01T00:00:00", "--run-at needs a timezone"),
    ],
)
def test_run_at_out_of_range_exits_2_and_stores_nothing(
    dsn: str, run_at: str, message: str
) -> None:
    out = pgjobs("enqueue", "acme", "echo", "--run-at", run_at, dsn=dsn)
    assert out.returncode == 2
    assert message in out.stderr.strip().splitlines()[-1]
    assert "Traceback" not in out.stderr
    assert pgjobs("jobs", "list", "acme", "--json", dsn=dsn).stdout == ""


def test_run_at_with_an_edge_offset_is_stored_in_utc(dsn: str) -> None:
    for run_at in ("2030-01-01T00:00:00+14:00", "2030-01-01T00:00:00-14:00", "2030-01-01T00:00Z"):
        out = pgjobs("enqueue", "acme", "echo", "--run-at", run_at, dsn=dsn)
        assert out.returncode == 0, out.stderr
    lines = pgjobs("jobs", "list", "acme", "--json", dsn=dsn).stdout.splitlines()
    run_ats = sorted(datetime.fromisoformat(json.loads(line)["runAt"]) for line in lines)
    assert run_ats == [
        datetime(2029, 12, 31, 10, tzinfo=UTC),
        datetime(2030, 1, 1, tzinfo=UTC),
        datetime(2030, 1, 1, 14, tzinfo=UTC),
    ]


def test_jobs_list_and_show_read_a_time_python_cannot_represent(dsn: str) -> None:
    job_id = "00000000-0000-0000-0000-00000000000b"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE pgjobs.job_rows DROP CONSTRAINT jobs_times_in_range")
        conn.execute("ALTER TABLE pgjobs.job_queue DROP CONSTRAINT job_queue_times_in_range")
        conn.execute(
            "INSERT INTO pgjobs.jobs (id, company_id, job_type, run_at)"
            " VALUES (%s, 'acme', 'echo', '10000-01-01 00:00:00+00')",
            (job_id,),
        )
    listed = pgjobs("jobs", "list", "acme", "--json", dsn=dsn)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["runAt"] == "10000-01-01 00:00:00+00"
    shown = pgjobs("jobs", "show", job_id, dsn=dsn)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr


def test_help_is_plain_text() -> None:
    """--help is read in a terminal: no reST markup from docstrings."""
    for args in (["--help"], ["worker", "--help"], ["demo", "--help"], ["jobs", "show", "--help"]):
        out = pgjobs(*args)
        assert out.returncode == 0, out.stderr
        assert "`" not in out.stdout, out.stdout


def test_enqueue_with_a_unique_key_prints_the_holder(dsn: str) -> None:
    first = pgjobs("enqueue", "acme", "render", "--unique-key", "video-7", dsn=dsn)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    again = pgjobs(
        "enqueue", "acme", "render", "--unique-key", "video-7", "--unique-for", "60", dsn=dsn
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout
    assert f"job {first.stdout.strip()} (queued) holds unique key 'video-7'" in again.stderr
    listed = pgjobs("jobs", "list", "acme", "--json", dsn=dsn)
    assert len(listed.stdout.splitlines()) == 1
    bad = pgjobs("enqueue", "acme", "render", "--unique-key", "k", "--unique-while", "x", dsn=dsn)
    assert bad.returncode != 0
    assert "unique_while must name" in bad.stderr
