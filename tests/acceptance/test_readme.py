"""Every example in README.md runs, so none can rot (issue 14).

README.md is read when the tests are collected, never copied: each fenced block is one
test, named by its position and first line. What runs and how:

- ``python``: in a fresh interpreter (``python -c``) with top-level ``await`` allowed,
  ``PGJOBS_DSN`` set to a fresh migrated test database and the worktree's ``src`` first on
  the path. A block must define what it uses; one that raises fails its test.
- ``sh`` / ``bash``: ``bash`` with ``set -eo pipefail``, the virtualenv's ``bin`` (the
  ``pgjobs`` console script) on ``PATH``, ``PGJOBS_DSN`` set, in a scratch directory whose
  ``.venv`` is this virtualenv (the README's ``.venv/bin/pgjobs``).
- ``sql``: through ``pgjobs psql`` with ``ON_ERROR_STOP``, on a database where jobs ran,
  ``-v job_id=`` one of them.
- ``text``: diagrams, not run.

An HTML comment right before a fence changes that (and is visible in the README source):

- ``<!-- readme-test: skip (why) -->``: not run, reported as skipped with the reason.
- ``<!-- readme-test: gateway (...) -->``: a shell block run against ``pgjobs gateway`` and
  ``pgjobs worker --handlers pgjobs.demo:registry`` started by the test, with ``TOKEN``,
  ``API``, ``JOB`` (a finished render job of acme) and ``ASSET`` (its asset) set.
- ``<!-- readme-test: gateway-stream (...) -->``: the same, for a command that streams until
  Ctrl-C: it passes once it has printed an SSE event (jobs are enqueued until it does).
- ``<!-- readme-test: run-handlers {JSON input} -->``: a python block that defines
  ``registry``; then one job of each of its types, with that input, must run to done.

A block in any other language, an unlabelled fence, or an unknown marker fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import wait_until
from pgjobs import demo
from pgjobs.client import Client
from pgjobs.jobspec import JobSpec
from pgjobs.testing import run_queued
from pgjobs.types import JobStatus

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = Path(sys.executable).parent
PGJOBS = [sys.executable, "-m", "pgjobs"]

FENCE = re.compile(r"^```(.*)$")
MARKER = re.compile(r"^<!--\s*readme-test:\s*([a-z-]+)\s*(.*?)\s*-->$")
KNOWN_MARKERS = {"skip", "gateway", "gateway-stream", "run-handlers"}


@dataclass(frozen=True)
class Block:
    number: int
    line: int
    lang: str
    code: str
    marker: str | None
    marker_arg: str

    @property
    def test_id(self) -> str:
        first = next((ln for ln in self.code.splitlines() if ln.strip()), "")
        slug = re.sub(r"[^a-zA-Z0-9]+", "-", first).strip("-")[:40]
        return f"{self.number:02d}-{self.lang or 'unlabelled'}-{slug}"


def readme_blocks(text: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of ``text`` and any problems found (a marker that no fence follows)."""
    blocks: list[Block] = []
    problems: list[str] = []
    lines = text.splitlines()
    pending: tuple[int, str, str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            if pending:
                problems.append(f"README.md:{pending[0]}: marker not followed by a fenced block")
            pending = (i + 1, marker.group(1), marker.group(2))
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"README.md:{i + 1}: fence never closed")
                break
            blocks.append(
                Block(
                    number=len(blocks) + 1,
                    line=i + 1,
                    lang=fence.group(1).strip(),
                    code="\n".join(lines[i + 1 : end]) + "\n",
                    marker=pending[1] if pending else None,
                    marker_arg=pending[2] if pending else "",
                )
            )
            pending = None
            i = end
        elif line.strip() and pending:
            problems.append(f"README.md:{pending[0]}: marker not followed by a fenced block")
            pending = None
        i += 1
    if pending:
        problems.append(f"README.md:{pending[0]}: marker not followed by a fenced block")
    return blocks, problems


BLOCKS, PROBLEMS = readme_blocks(README.read_text())
RUNNABLE = [b for b in BLOCKS if b.lang != "text"]


# --- how each kind of block runs ---------------------------------------------------------

PYTHON_RUNNER = """
import ast, asyncio, json, sys

source, run_handlers = sys.argv[1], sys.argv[2]
code = compile(source, "<README.md block>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
namespace = {"__name__": "__readme__"}

async def main():
    result = eval(code, namespace)
    if result is not None:
        await result
    if run_handlers:
        from pgjobs.client import Client
        from pgjobs.jobspec import JobSpec
        from pgjobs.testing import run_queued

        registry = namespace["registry"]
        types = sorted(registry.job_types)
        async with await Client.connect() as client:
            await client.enqueue_many(JobSpec("acme", t, json.loads(run_handlers)) for t in types)
        ran = await run_queued(registry)
        outcome = sorted((j.job_type, j.status.value, j.error_message) for j in ran)
        assert outcome == [(t, "done", None) for t in types], outcome

asyncio.run(main())
"""


def block_env(dsn: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGJOBS_")}
    env.update(
        PGJOBS_DSN=dsn,
        PGJOBS_HOME=str(home),
        PATH=os.pathsep.join([str(VENV_BIN), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def scratch_dir(tmp_path: Path) -> Path:
    """A working directory like a checkout's: ``.venv`` is the virtualenv running the tests."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (work / ".venv").symlink_to(Path(sys.prefix))
    return work


def check(out: subprocess.CompletedProcess[str], what: str) -> None:
    if out.returncode != 0:
        raise AssertionError(
            f"{what} exited {out.returncode}\n--- stdout\n{out.stdout}\n--- stderr\n{out.stderr}"
        )


def run_python(code: str, dsn: str, tmp_path: Path, run_handlers: str = "") -> None:
    out = subprocess.run(
        [sys.executable, "-c", PYTHON_RUNNER, code, run_handlers],
        capture_output=True,
        text=True,
        cwd=scratch_dir(tmp_path),
        env=block_env(dsn, tmp_path / "home"),
        timeout=180,
        check=False,
    )
    check(out, "the python block")


def run_shell(code: str, dsn: str, tmp_path: Path, **extra: str) -> None:
    out = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + code],
        capture_output=True,
        text=True,
        cwd=scratch_dir(tmp_path),
        env=block_env(dsn, tmp_path / "home", **extra),
        timeout=120,
        check=False,
    )
    check(out, "the shell block")


def run_sql(code: str, dsn: str, tmp_path: Path, job_id: str) -> None:
    script = tmp_path / "block.sql"
    script.write_text(code)
    psql_args = ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"job_id={job_id}", "-f", str(script)]
    out = subprocess.run(
        [*PGJOBS, "psql", *psql_args],
        capture_output=True,
        text=True,
        cwd=scratch_dir(tmp_path),
        env=block_env(dsn, tmp_path / "home"),
        timeout=120,
        check=False,
    )
    check(out, "the sql block")


# --- a gateway and a worker, as a user starts them ---------------------------------------


@dataclass
class Served:
    env: dict[str, str]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def processes(*commands: list[str], env: dict[str, str], cwd: Path) -> Iterator[None]:
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for command in commands
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.asynccontextmanager
async def served(dsn: str, tmp_path: Path) -> AsyncIterator[Served]:
    port = free_port()
    env = block_env(dsn, tmp_path / "home", PGJOBS_STORAGE_DIR=str(tmp_path / "storage"))
    with processes(
        [*PGJOBS, "gateway", "--port", str(port)],
        [*PGJOBS, "worker", "--handlers", "pgjobs.demo:registry", "--concurrency", "4"],
        env=env,
        cwd=scratch_dir(tmp_path),
    ):
        base = f"http://127.0.0.1:{port}"

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as http:
                    return (await http.get(f"{base}/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_until(ready, within=60, interval=0.2, message="the gateway to answer")
        created = await asyncio.create_subprocess_exec(
            *PGJOBS, "token", "create", "acme", env=env, stdout=asyncio.subprocess.PIPE
        )
        token = (await created.communicate())[0].decode().strip()
        assert created.returncode == 0
        assert token.startswith("pgj_"), token
        async with await Client.connect(dsn) as client:
            job = await client.enqueue("acme", "render", {"title": "README", "step_seconds": 0})

            async def finished() -> bool:
                return (await client.get("acme", job.id)).status.is_terminal

            await wait_until(finished, within=60, message="the render job to finish")
            done = await client.get("acme", job.id)
        assert done.status is JobStatus.DONE, done
        yield Served(
            {
                **env,
                "TOKEN": token,
                "API": f"{base}/api/companies/acme",
                "JOB": str(done.id),
                "ASSET": str(done.result_asset_id),
            }
        )


async def run_until_an_event(code: str, dsn: str, tmp_path: Path, env: dict[str, str]) -> None:
    """Run a command that streams until Ctrl-C; pass once it has printed an SSE event."""
    out_path = tmp_path / "stream.out"
    with out_path.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            "set -eo pipefail\n" + code,
            cwd=scratch_dir(tmp_path),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with await Client.connect(dsn) as client:
            deadline = time.monotonic() + 30
            while b"data:" not in out_path.read_bytes():
                if proc.returncode is not None:
                    raise AssertionError(
                        f"the stream ended (exit {proc.returncode}): {out_path.read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise AssertionError(f"no event within 30 s: {out_path.read_text()!r}")
                # Something for the stream to carry, until it shows it carried something.
                await client.enqueue_many([JobSpec("acme", "echo", {"readme": True})])
                await asyncio.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)


async def some_finished_jobs(dsn: str) -> str:
    """Jobs for the audit queries to find; returns the id of one that ran."""
    async with await Client.connect(dsn) as client:
        jobs = await client.enqueue_many(JobSpec("acme", "echo", {"n": n}) for n in range(3))
    await run_queued(dsn, demo.registry)
    return str(jobs[0].id)


# --- the tests ----------------------------------------------------------------------------


def test_the_readme_has_examples_and_well_placed_markers() -> None:
    assert PROBLEMS == []
    assert {b.lang for b in RUNNABLE} >= {"python", "sh", "sql"}
    assert all(b.marker in KNOWN_MARKERS for b in BLOCKS if b.marker)


@pytest.mark.parametrize("block", RUNNABLE, ids=[b.test_id for b in RUNNABLE])
async def test_readme_block_runs(
    block: Block, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    where = f"README.md line {block.line}"
    if block.marker == "skip":
        pytest.skip(f"{where}: marked skip {block.marker_arg}")
    if block.marker is not None and block.marker not in KNOWN_MARKERS:
        pytest.fail(f"{where}: unknown marker readme-test: {block.marker}")
    dsn: str = request.getfixturevalue("dsn")
    if block.lang == "python" and block.marker in (None, "run-handlers"):
        run_handlers = block.marker_arg if block.marker == "run-handlers" else ""
        if block.marker == "run-handlers":
            json.loads(run_handlers)  # the marker's input must be JSON
        run_python(block.code, dsn, tmp_path, run_handlers)
    elif block.lang in ("sh", "bash") and block.marker is None:
        run_shell(block.code, dsn, tmp_path)
    elif block.lang in ("sh", "bash") and block.marker in ("gateway", "gateway-stream"):
        async with served(dsn, tmp_path) as gateway:
            if block.marker == "gateway":
                run_shell(block.code, dsn, tmp_path, **gateway.env)
                # What the block downloads (curl -o FILE) arrived.
                for name in re.findall(r"\s-o\s+(\S+)", block.code):
                    assert (scratch_dir(tmp_path) / name).stat().st_size > 0, name
            else:
                await run_until_an_event(block.code, dsn, tmp_path, gateway.env)
    elif block.lang == "sql" and block.marker is None:
        run_sql(block.code, dsn, tmp_path, await some_finished_jobs(dsn))
    else:
        pytest.fail(
            f"{where}: cannot run a {block.lang or 'unlabelled'!r} block"
            f"{f' marked {block.marker}' if block.marker else ''}: label diagrams `text`, "
            "or mark the block <!-- readme-test: skip (why) --> if it cannot run in a test"
        )


# The harness itself: a broken example must fail its test.


def test_the_parser_reads_markers_languages_and_problems() -> None:
    text = (
        "intro\n<!-- readme-test: skip (a server) -->\n```sh\nmake run\n```\n\n"
        "```python\nx = 1\n```\n<!-- readme-test: skip (orphan) -->\nprose\n```\nart\n```\n"
    )
    blocks, problems = readme_blocks(text)
    assert [(b.lang, b.marker, b.marker_arg, b.code) for b in blocks] == [
        ("sh", "skip", "(a server)", "make run\n"),
        ("python", None, "", "x = 1\n"),
        ("", None, "", "art\n"),
    ]
    assert problems == ["README.md:10: marker not followed by a fenced block"]


async def test_a_broken_example_fails(dsn: str, tmp_path: Path) -> None:
    with pytest.raises(AssertionError, match="RuntimeError: rotted"):
        run_python(
            "import asyncio\nawait asyncio.sleep(0)\nraise RuntimeError('rotted')\n", dsn, tmp_path
        )
    with pytest.raises(AssertionError, match="NameError: name 'dsn' is not defined"):
        run_python("print(dsn)\n", dsn, tmp_path)
    with pytest.raises(AssertionError, match="the shell block exited 2"):
        run_shell("pgjobs jobs list acme --limit 0\necho never\n", dsn, tmp_path)
    with pytest.raises(AssertionError, match="the sql block exited"):
        run_sql("select no_such_column from pgjobs.jobs;\n", dsn, tmp_path, "x")
    with pytest.raises(AssertionError, match=r"\[\('echo', 'queued', 'ValueError: no'\)\]"):
        run_python(
            "from pgjobs.registry import Registry\nregistry = Registry()\n"
            "@registry.handler('echo')\ndef echo(ctx):\n    raise ValueError('no')\n",
            dsn,
            tmp_path,
            "{}",
        )
