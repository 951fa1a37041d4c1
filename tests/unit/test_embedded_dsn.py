"""Which DSNs name the embedded server (so that using one starts the server if needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgjobs.embedded import data_dir_of


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    data = tmp_path / "home" / "pgdata"
    data.mkdir(parents=True)
    (data / "PG_VERSION").write_text("16\n")
    return data


def test_the_dsn_pgjobs_dsn_prints_names_its_data_directory(data_dir: Path) -> None:
    assert data_dir_of(f"postgresql://postgres:@/postgres?host={data_dir}") == data_dir
    assert data_dir_of(f"postgresql://postgres@/mydb?host={data_dir}") == data_dir
    assert data_dir_of(f"host={data_dir} user=postgres dbname=postgres") == data_dir


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://postgres@127.0.0.1:5432/postgres",
        "postgresql://postgres@db.example.com/postgres",
        "dbname=postgres",
        "this is not a dsn",
        "host=relative/pgdata",
    ],
)
def test_other_dsns_do_not(dsn: str) -> None:
    assert data_dir_of(dsn) is None


def test_a_socket_directory_that_is_not_an_embedded_data_directory_does_not(
    data_dir: Path, tmp_path: Path
) -> None:
    (data_dir / "PG_VERSION").unlink()
    assert data_dir_of(f"host={data_dir}") is None, "no PostgreSQL data there"
    other = tmp_path / "sockets"
    other.mkdir()
    (other / "PG_VERSION").write_text("16\n")
    assert data_dir_of(f"host={other}") is None, "not named like pgjobs' data directory"
    assert data_dir_of(f"host={tmp_path}/home/pgdata,{other}") is None, "several hosts"
