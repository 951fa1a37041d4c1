"""The Python API's DSN rule is the command line's: an explicit DSN, else PGJOBS_DSN, else
the embedded server under $PGJOBS_HOME (./.pgjobs), started if needed (issue 14).

Each scenario runs in its own process with a temporary PGJOBS_HOME, as a user's program
would: the embedded server it starts stops when that process exits, and ./.pgjobs is
never touched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgjobs.client import Client
from pgjobs.errors import DatabaseUnavailableError
from pgjobs.sync import SyncClient

ROOT = Path(__file__).resolve().parents[2]


def run(
    args: list[str], cwd: Path, home: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PGJOBS_DSN"}
    env["PGJOBS_HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
        check=False,
    )


def migrated_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    out = run(["-m", "pgjobs", "migrate"], tmp_path, home)
    assert out.returncode == 0, out.stderr
    return home


def test_client_sync_client_and_run_queued_with_no_dsn_use_the_embedded_server(
    tmp_path: Path,
) -> None:
    home = migrated_home(tmp_path)
    script = textwrap.dedent(
        """
        import asyncio

        from pgjobs.client import Client
        from pgjobs.registry import Registry
        from pgjobs.sync import SyncClient
        from pgjobs.testing import assert_enqueued, run_queued

        registry = Registry()

        @registry.handler("echo")
        async def echo(ctx):
            return {"echo": ctx.input}

        async def main():
            async with await Client.connect() as client:
                job = await client.enqueue("acme", "echo", {"n": 1})
            with SyncClient() as sync_client:
                assert sync_client.get("acme", job.id).status.value == "queued"
            assert (await assert_enqueued(None, "acme", "echo", input={"n": 1})).id == job.id
            [ran] = await run_queued(registry)
            print(ran.id == job.id, ran.status.value, ran.result)

        asyncio.run(main())
        """
    )
    out = run(["-c", script], tmp_path, home)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True done {'echo': {'n': 1}}"
    assert (home / "pgdata" / "PG_VERSION").is_file()


@pytest.mark.parametrize("flavour", ["SyncClient", "Client"])
def test_the_dsn_pgjobs_dsn_printed_starts_the_stopped_embedded_server(
    tmp_path: Path, flavour: str
) -> None:
    home = migrated_home(tmp_path)
    printed = run(["-m", "pgjobs", "dsn"], tmp_path, home)
    assert printed.returncode == 0, printed.stderr
    dsn = printed.stdout.strip()
    # `pgjobs dsn` was the server's last user: it stopped the server when it exited.
    assert not (home / "pgdata" / "postmaster.pid").exists()
    script = {
        "SyncClient": "from pgjobs.sync import SyncClient\n"
        "import sys\n"
        "print(SyncClient(sys.argv[1]).list('acme').jobs)",
        "Client": "import asyncio, sys\n"
        "from pgjobs.client import Client\n"
        "async def main():\n"
        "    async with await Client.connect(sys.argv[1]) as client:\n"
        "        print((await client.list('acme')).jobs)\n"
        "asyncio.run(main())",
    }[flavour]
    # From another directory, with another PGJOBS_HOME: the DSN alone names the server.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(["-c", script, dsn], elsewhere, elsewhere / "home")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert not (elsewhere / "home").exists()


async def test_a_dsn_naming_no_server_fails_at_once_with_what_to_do(tmp_path: Path) -> None:
    dsn = f"postgresql://postgres@/postgres?host={tmp_path}"
    with pytest.raises(DatabaseUnavailableError) as sync_error:
        SyncClient(dsn)
    with pytest.raises(DatabaseUnavailableError) as async_error:
        await Client.connect(dsn)
    for error in (sync_error, async_error):
        message = str(error.value)
        assert message.startswith(f"cannot connect to PostgreSQL at {dsn}: ")
        assert "No such file or directory" in message
        assert "Start that server or fix the DSN (--dsn, PGJOBS_DSN)" in message
        assert "\n" not in message
