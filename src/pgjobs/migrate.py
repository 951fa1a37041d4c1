"""Schema migrations, applied with yoyo-migrations from the ``sql/`` directory."""

from __future__ import annotations

from typing import Any

import psycopg
from yoyo import read_migrations
from yoyo.backends.core.postgresql import PostgresqlPsycopgBackend
from yoyo.connections import parse_uri

from pgjobs.errors import DatabaseUnavailableError
from pgjobs.schema import migrations_dir

__all__ = ["apply", "migrations_dir"]


def _backend(dsn: str) -> Any:
    """yoyo's psycopg 3 backend, connected from a libpq DSN instead of yoyo's URI form
    (so Unix-socket and key=value DSNs work as they do everywhere else in pgjobs)."""

    class Backend(PostgresqlPsycopgBackend):  # type: ignore[misc]  # yoyo is untyped
        def connect(self, dburi: Any) -> psycopg.Connection[Any]:
            return psycopg.connect(dsn, autocommit=True)

    backend = Backend(parse_uri("postgresql+psycopg:///pgjobs"), "_yoyo_migration")
    backend.init_database()
    return backend


def apply(dsn: str) -> list[str]:
    """Apply pending migrations; returns the ids applied (empty when up to date)."""
    try:
        backend = _backend(dsn)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc
    try:
        migrations = read_migrations(str(migrations_dir()))
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()
