"""pgjobs' jsonb loader (pgjobs.db.ADAPTERS): what json.loads reads, in fewer steps."""

from __future__ import annotations

import json

import psycopg
import pytest
from psycopg.pq import Format

from pgjobs import db

JSONB = psycopg.adapters.types["jsonb"].oid

# PostgreSQL's own output (one JSON text, nothing around it), and texts it never sends
# (whitespace around the value), which must still read as json.loads reads them.
TEXTS = [
    "{}",
    "[]",
    "null",
    '"é \\u0000 \\"q\\""',
    '{"a": [1, 2.5, -3e+100, true, null], "b": {"c": "x"}}',
    "123456789012345678901234567890",
    "1.5E-7",
    ' {"padded": true} ',
    '{"a": 1}\n',
]


@pytest.mark.parametrize("text", TEXTS)
def test_jsonb_text_reads_as_json_loads_reads_it(text: str) -> None:
    loader = db.ADAPTERS.get_loader(JSONB, Format.TEXT)
    assert loader is not None
    for data in (text.encode(), memoryview(text.encode())):
        assert loader(JSONB).load(data) == json.loads(text)


@pytest.mark.parametrize("text", ['{"a": ', "{} {}", "nope", ""])
def test_what_is_not_json_raises_as_json_loads_does(text: str) -> None:
    loader = db.ADAPTERS.get_loader(JSONB, Format.TEXT)
    assert loader is not None
    with pytest.raises(json.JSONDecodeError):
        loader(JSONB).load(text.encode())
