"""Fixtures of the integration tests that need Debian's PostgreSQL (helpers.DEBIAN_BUILDS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import DEBIAN_BUILDS


@pytest.fixture(scope="module")
def debian_server() -> Iterator[str]:
    """A private server of Debian's newest build, as bench.pgss starts one
    (pg_stat_statements preloaded, the benchmark's durability settings)."""
    from bench.pgss import private_server

    with private_server(DEBIAN_BUILDS[-1].parents[1] / "bin") as server:
        yield server


@pytest.fixture(scope="module")
def debian_dsn(debian_server: str) -> Iterator[str]:
    """A fresh database on it, pgjobs' schema applied."""
    from bench import pg

    with pg.database(debian_server) as dsn:
        yield dsn
