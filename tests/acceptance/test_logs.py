"""`pgjobs worker` log lines (JSON and text) and its metrics port, as an operator runs it."""

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest

from pgjobs import logs
from pgjobs.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[2]


def _enqueue(dsn: str, job_type: str, max_attempts: int = 1) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pgjobs", "enqueue", "acme", job_type, "--max-attempts",
         str(max_attempts)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PGJOBS_DSN": dsn},
        timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def _status(dsn: str, job_id: str) -> str:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT status FROM pgjobs.jobs WHERE id = %s", [job_id]).fetchone()
    assert row is not None
    return str(row[0])


def _poll(condition: Callable[[], object], what: str, within: float = 30.0) -> object:
    deadline = time.monotonic() + within
    while True:
        if value := condition():
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        time.sleep(0.05)


@contextmanager
def _run(
    dsn: str, log_path: Path, *args: str, env: dict[str, str], exits: tuple[int, ...] = (0,)
) -> Iterator[None]:
    """A pgjobs command with its output in ``log_path``, stopped by SIGTERM."""
    full_env = {**os.environ, "PGJOBS_DSN": dsn, **env}
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgjobs", *args],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode in exits, log_path.read_text()


def test_json_log_lines_and_the_metrics_port(dsn: str, tmp_path: Path) -> None:
    """PGJOBS_LOG_FORMAT=json: every line the worker writes is one JSON object, and the
    failing job's lines carry its id, company, type, attempt and worker. And
    PGJOBS_METRICS_PORT=0 serves /readyz and /metrics on a free port, which it logs."""
    failing = _enqueue(dsn, "fail")
    log_path = tmp_path / "worker.log"
    argv = ("worker", "--handlers", "pgjobs.demo:registry", "--worker-id", "w-json")
    env = {"PGJOBS_LOG_FORMAT": "json", "PGJOBS_METRICS_PORT": "0"}
    with _run(dsn, log_path, *argv, env=env):
        _poll(lambda: _status(dsn, failing) == "failed", "the job failed")
        found = _poll(
            lambda: re.search(r"metrics and health on (http://[\d.]+:\d+)", log_path.read_text()),
            "the metrics port in the log",
        )
        assert isinstance(found, re.Match)
        base = found.group(1)
        with urllib.request.urlopen(f"{base}/readyz", timeout=10) as r:  # noqa: S310 - http
            assert json.loads(r.read())["status"] == "ready"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:  # noqa: S310 - http
            text = r.read().decode()
        assert 'pgjobs_transitions_total{event="failed",job_type="fail"} 1.0' in text
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line: one JSON object
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record), record
    about_job = [r for r in records if r.get("job_id") == failing]
    assert about_job, lines
    failed = [r for r in about_job if r["level"] == "ERROR"]
    assert len(failed) == 1, about_job
    assert failed[0]["company_id"] == "acme"
    assert failed[0]["job_type"] == "fail"
    assert failed[0]["attempt"] == 1
    assert failed[0]["worker_id"] == "w-json"
    assert "this job always fails" in failed[0]["message"]
    assert "RuntimeError: this job always fails" in failed[0]["traceback"]
    assert any(r.get("worker_id") == "w-json" and "started" in r["message"] for r in records)


def test_text_lines_show_the_job_and_attempt(dsn: str, tmp_path: Path) -> None:
    """--log-format text wins over PGJOBS_LOG_FORMAT; a job's lines end with its id and
    attempt."""
    failing = _enqueue(dsn, "fail")
    log_path = tmp_path / "worker.log"
    argv = ("worker", "--handlers", "pgjobs.demo:registry", "--log-format", "text")
    with _run(dsn, log_path, *argv, env={"PGJOBS_LOG_FORMAT": "json"}):
        _poll(lambda: _status(dsn, failing) == "failed", "the job failed")
    text = log_path.read_text()
    (line,) = [line for line in text.splitlines() if " ERROR " in line]
    assert line.endswith(f"[job {failing} attempt 1]")
    assert not text.lstrip().startswith("{")


def test_log_format_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PGJOBS_LOG_FORMAT", "JSON")
    assert logs.resolve_format(None) == "json"
    assert logs.resolve_format("text") == "text"
    monkeypatch.setenv("PGJOBS_LOG_FORMAT", "yaml")
    with pytest.raises(ConfigurationError, match="text or json"):
        logs.resolve_format(None)
    monkeypatch.delenv("PGJOBS_LOG_FORMAT")
    assert logs.resolve_format(None) == "text"


def test_gateway_json_log_lines(dsn: str, tmp_path: Path) -> None:
    """uvicorn's own lines (startup, requests) are JSON too, not uvicorn's text."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "gateway.log"
    argv = ("--log-format", "json", "gateway", "--port", str(port))
    # uvicorn raises SIGTERM again once it has shut down: -15 is its clean exit.
    with _run(dsn, log_path, *argv, env={}, exits=(0, -signal.SIGTERM)):

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5):
                    return True
            except OSError:
                return False

        _poll(healthy, "the gateway up")
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert any(r["logger"].startswith("uvicorn") for r in records), records
    assert any("/healthz" in r["message"] for r in records), records


def test_a_metrics_port_in_use_is_one_line_and_exit_2(dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "pgjobs", "worker", "--handlers", "pgjobs.demo:registry",
             "--metrics-port", str(port)],
            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PGJOBS_DSN": dsn},
            timeout=60, check=False,
        )  # fmt: skip
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("pgjobs: error:")]
    assert errors == [
        f"pgjobs: error: cannot serve metrics on 127.0.0.1:{port} (Address already in use); "
        "choose another --metrics-port or --metrics-host"
    ], out.stderr
    assert "Traceback" not in out.stderr
