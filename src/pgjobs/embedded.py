"""The embedded PostgreSQL used when no DSN is configured.

A newcomer needs no database server: the first pgjobs process started in a directory
starts a private PostgreSQL (from the ``pgserver`` package) with its data under
``.pgjobs/pgdata`` and a Unix socket only; every later pgjobs process started there
shares it, and the last one to exit stops it. Production deployments set PGJOBS_DSN.

The DSN it prints (``pgjobs dsn``) names the data directory as its socket directory, so a
process given that DSN explicitly is recognised (``data_dir_of``) and starts or joins the
server as well, instead of failing once the process that printed it has stopped it.

"The last one to exit" is counted by pgserver: each process adds its pid to a list in the
data directory and removes it in an ``atexit`` handler, and the one that finds only itself
left stops the server. Two things would leave the server running for good (every later
process then joins it and none is ever last): a process ended by SIGTERM's default action,
which skips ``atexit`` (uvicorn re-raises the SIGTERM it handled, so a gateway stopped by
``make run``'s Ctrl-C ended so), and a process killed outright. So a process that joins
turns SIGTERM's default action into a normal exit, and on exit drops from the list the
pids of processes that no longer exist before pgserver counts.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgjobs.config import state_dir
from pgjobs.errors import DatabaseUnavailableError

log = logging.getLogger(__name__)


DATA_DIR_NAME = "pgdata"


def start(root: Path | None = None) -> str:
    """Start (or join) the embedded server under ``root`` (default: PGJOBS_HOME, else
    ./.pgjobs) and return its DSN. It runs at least as long as this process does."""
    data = (root or state_dir()) / DATA_DIR_NAME
    data.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset; it falls back correctly.
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError as exc:  # pragma: no cover - it is a declared dependency
            raise DatabaseUnavailableError(
                "no DSN is set and the embedded server is unavailable: set PGJOBS_DSN or pass --dsn"
            ) from exc
        try:
            server = pgserver.get_server(data, cleanup_mode="stop")  # type: ignore[attr-defined]
        except Exception as exc:
            raise DatabaseUnavailableError(
                f"could not start the embedded PostgreSQL in {data}: {exc}; "
                f"see {data / 'log'} or set PGJOBS_DSN to use your own server"
            ) from exc
    _leave_when_done(server)
    dsn: str = server.get_uri()
    log.debug("embedded PostgreSQL at %s", dsn)
    return dsn


_leaving: set[Path] = set()


def _leave_when_done(server: Any) -> None:
    """Make this process leave the server's list of users on every normal way out (see the
    module's docstring). Once per data directory and process; pgserver's own handler is
    registered before this one, so ``atexit`` runs this one first."""
    if server.pgdata in _leaving:
        return
    _leaving.add(server.pgdata)
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    atexit.register(_forget_ended_processes, server)


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    # SystemExit unwinds the program (finally blocks, then atexit) where SIG_DFL would end
    # it at once; 128 + the signal's number is the status a shell reports for it.
    sys.exit(128 + signum)


def _forget_ended_processes(server: Any) -> None:
    """Remove from pgserver's list the pids of processes that have ended without removing
    themselves, so that the last live user still stops the server. Under pgserver's own
    lock: a process joining meanwhile is alive, so it is never removed."""
    try:
        with server._lock:
            users = server.global_process_id_list
            for pid in users.get():
                if pid != os.getpid() and not _alive(pid):
                    users.get_and_remove(pid)
    except Exception:  # leaving must never fail the process's exit
        log.warning("could not tidy the embedded server's list of users", exc_info=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def data_dir_of(dsn: str) -> Path | None:
    """The data directory of the embedded server ``dsn`` points at, or None for any other
    DSN. The embedded server listens only on a Unix socket in its data directory
    (``<PGJOBS_HOME>/pgdata``), so its DSN's host is that directory."""
    try:
        host = conninfo_to_dict(dsn).get("host")
    except psycopg.ProgrammingError:
        return None
    if not isinstance(host, str) or not host.startswith("/") or "," in host:
        return None
    path = Path(host)
    if path.name == DATA_DIR_NAME and (path / "PG_VERSION").is_file():
        return path
    return None


def psql_path() -> str | None:
    """The psql binary bundled with pgserver, if present."""
    try:
        from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        return None
    path = Path(POSTGRES_BIN_PATH) / "psql"
    return str(path) if path.is_file() else None
