"""The embedded PostgreSQL used when no DSN is configured.

A newcomer needs no database server: the first pgjobs process started in a directory
starts a private PostgreSQL (from the ``pgserver`` package) with its data under
``.pgjobs/pgdata`` and a Unix socket only; every later pgjobs process started there
shares it, and the last one to exit stops it. Production deployments set PGJOBS_DSN.

The DSN it prints (``pgjobs dsn``) names the data directory as its socket directory, so a
process given that DSN explicitly is recognised (``data_dir_of``) and starts or joins the
server as well, instead of failing once the process that printed it has stopped it.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

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
    dsn: str = server.get_uri()
    log.debug("embedded PostgreSQL at %s", dsn)
    return dsn


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
