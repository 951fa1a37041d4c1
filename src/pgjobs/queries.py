"""Named SQL queries, loaded once from ``queries.sql``.

Every runtime query lives in that file under a ``-- name: table_verb_guard`` header, so
SQL is reviewed as SQL, and a test EXPLAINs each one against the migrated schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import LiteralString, cast

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> Mapping[str, LiteralString]:
    text = resources.files("pgjobs").joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    queries: dict[str, LiteralString] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise RuntimeError(f"queries.sql defines {name!r} twice")
        # The file ships with the package; its text is as trusted as a literal.
        queries[name] = cast(LiteralString, body.strip().rstrip(";"))
    return queries


QUERIES: Mapping[str, LiteralString] = _load()
