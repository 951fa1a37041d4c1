"""A pool's connection attempts are bounded (db.connect_timeout_unless_set); a DSN's own
connect_timeout wins."""

from __future__ import annotations

from pgjobs import db


def test_a_pool_connects_within_its_timeout_unless_the_dsn_says_otherwise() -> None:
    assert db.connect_timeout_unless_set("postgresql://u@h/d", 10.0) == {"connect_timeout": 10}
    assert db.connect_timeout_unless_set("host=h dbname=d", 0.2) == {"connect_timeout": 1}
    assert db.connect_timeout_unless_set("postgresql://u@h/d?connect_timeout=60", 10.0) == {}
    assert db.connect_timeout_unless_set("host=h connect_timeout=3", 10.0) == {}
