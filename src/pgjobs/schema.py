"""Which migrations this pgjobs needs, and whether a database has them all.

The migrations are yoyo's, in the checkout's sql/ (pgjobs/sql in the wheel): each
``NNNN_name.sql`` with its ``NNNN_name.rollback.sql``; ``pgjobs migrate`` applies them and
yoyo records each applied one in ``_yoyo_migration``. A database may be ahead of a pgjobs
process (migrated for a newer version while this one still runs: each migration's deploy
note in the README says whether older workers keep working), not behind it: its
statements use what its migrations create, and on a database without one they failed in
the middle of their work (a claim naming a column a later migration adds) instead of
saying to migrate. Kept apart from pgjobs.migrate, which imports yoyo.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources
from pathlib import Path


def migrations_dir() -> Path:
    """The migrations: inside the installed wheel, else the checkout's top-level sql/."""
    packaged = Path(str(resources.files("pgjobs"))) / "sql"
    if packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[2] / "sql"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError("pgjobs migrations not found (expected pgjobs/sql or ./sql)")


@functools.cache
def required() -> tuple[str, ...]:
    """The ids of the migrations this pgjobs ships (yoyo's: the file names without .sql),
    in the order they apply."""
    return tuple(
        sorted(p.stem for p in migrations_dir().glob("[0-9]*.sql") if ".rollback" not in p.name)
    )


def missing(applied: Iterable[str]) -> list[str]:
    """The migrations this pgjobs needs that are not among ``applied``, in order."""
    done = set(applied)
    return [m for m in required() if m not in done]
