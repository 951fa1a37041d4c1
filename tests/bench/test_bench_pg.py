"""bench.pg on a server the user runs (``--server-dsn``): what a run creates there, it drops."""

from __future__ import annotations

import psycopg

from bench import pg


def _databases(server_dsn: str) -> set[str]:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        return {r[0] for r in conn.execute("SELECT datname FROM pg_database")}


def test_an_existing_server_keeps_no_database_of_the_run(pg_server_dsn: str) -> None:
    before = _databases(pg_server_dsn)
    with pg.server(pg_server_dsn) as server_dsn:
        with pg.database(server_dsn) as dsn:
            with psycopg.connect(dsn) as conn:
                assert conn.execute("SELECT count(*) FROM pgjobs.jobs").fetchone() == (0,)
            during = _databases(server_dsn)
        with pg.database(server_dsn):
            pass
    # the run's databases and the migrated template they were cloned from existed, and
    # are gone
    assert len(during - before) == 2, during - before
    assert _databases(pg_server_dsn) == before
