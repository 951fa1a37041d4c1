"""The PgBouncer fixture's rule (tests/bouncer.py): without the binary it skips, except
under CI=true, where the PgBouncer tests must fail rather than pass by skipping."""

from __future__ import annotations

from pathlib import Path

import pytest

import bouncer


def test_missing_pgbouncer_skips_outside_ci(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bouncer, "PGBOUNCER", tmp_path / "no-pgbouncer")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="make pgbouncer"):
        bouncer.require_pgbouncer()


def test_missing_pgbouncer_fails_under_ci(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bouncer, "PGBOUNCER", tmp_path / "no-pgbouncer")
    monkeypatch.setenv("CI", "true")
    # Caught as BaseException: a skip (also an outcome exception) must fail this test too.
    with pytest.raises(BaseException, match="CI=true") as caught:
        bouncer.require_pgbouncer()
    assert caught.type is pytest.fail.Exception
