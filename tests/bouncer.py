"""PgBouncer in transaction pooling mode in front of the test server.

Debian's ``pgbouncer`` (``make pgbouncer`` installs it), started on a free loopback port
with ``auth_type = trust`` and a wildcard database entry, so the DSN of any test
database can be pointed at it. Transaction pooling is the mode that breaks what a
session would assume: each transaction may run on a different server connection, so
LISTEN registers on a server connection the client no longer holds, and a statement
prepared in one transaction is missing in the next.

Without the binary the tests skip, except under ``CI=true``, where they fail: a CI run
must not pass by skipping what it was meant to test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

PGBOUNCER = Path("/usr/sbin/pgbouncer")


def require_pgbouncer() -> Path:
    """The binary, or a skip (a failure under CI=true) saying how to get it."""
    if PGBOUNCER.exists():
        return PGBOUNCER
    reason = f"{PGBOUNCER} is missing: `make pgbouncer` installs Debian's pgbouncer package"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: a missing pgbouncer fails instead of skipping)")
    pytest.skip(reason)


@dataclass(frozen=True)
class Bouncer:
    port: int
    log: Path

    def dsn(self, direct_dsn: str) -> str:
        """``direct_dsn`` (a database on the test server) through this PgBouncer."""
        params = conninfo_to_dict(direct_dsn)
        return make_conninfo(
            host="127.0.0.1",
            port=str(self.port),
            dbname=str(params.get("dbname", "postgres")),
            user=str(params.get("user", "postgres")),
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def run_pgbouncer(server_dsn: str, workdir: Path) -> Iterator[Bouncer]:
    """PgBouncer in transaction mode forwarding every database of the server at
    ``server_dsn``; stopped (SIGTERM, then SIGKILL) on exit."""
    binary = require_pgbouncer()
    server = conninfo_to_dict(server_dsn)
    host = str(server.get("host") or "127.0.0.1")
    user = str(server.get("user") or "postgres")
    target = [f"host={host}", f"port={server.get('port') or 5432}", f"user={user}"]
    if server.get("password"):
        target.append(f"password={server['password']}")
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{user}" ""\n')  # trust: the user must only be listed
    port = _free_port()
    lines = [
        "[databases]",
        # The wildcard entry: a client's dbname is forwarded as the same dbname.
        f"* = {' '.join(target)}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {userlist}",
        "pool_mode = transaction",
        "max_client_conn = 500",
        "default_pool_size = 20",
        # psycopg sends no startup parameters PgBouncer cannot track, but a user's
        # driver might; this is what the README tells operators to set as well.
        "ignore_startup_parameters = extra_float_digits",
        "server_reset_query =",
    ]
    if os.geteuid() == 0:
        # PgBouncer refuses to run as root; it drops to this user, who must reach the
        # server's Unix socket (the embedded server's directory is private to its owner).
        owner = Path(host).stat().st_uid if host.startswith("/") else None
        name = pwd.getpwuid(owner).pw_name if owner else "nobody"
        lines.append(f"user = {name}")
    config = workdir / "pgbouncer.ini"
    config.write_text("\n".join(lines) + "\n")
    for path in (userlist, config):
        path.chmod(0o644)
    log = workdir / "pgbouncer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(binary), str(config)], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while not _answers(port):
            if proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {proc.returncode}: {log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not listen within 30 s: {log.read_text()}")
            time.sleep(0.05)
        yield Bouncer(port, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
