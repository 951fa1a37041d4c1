"""pgjobs.queries.positional: a named query numbered as psycopg numbers it, for the
worker's claims on a raw cursor (psycopg re-converts a named query of more than 4,096
characters on every execute)."""

from __future__ import annotations

import pytest
from psycopg._queries import PostgresQuery  # psycopg's converter, to compare with
from psycopg.adapt import Transformer

from pgjobs import db, doorbell
from pgjobs.queries import QUERIES, positional


def test_placeholders_are_numbered_in_order_and_a_repeated_name_keeps_its_number() -> None:
    text, names = positional("SELECT %(b)s::int, %(a)s::text, %(b)s::int, 100 %% 7")
    assert text == b"SELECT $1::int, $2::text, $1::int, 100 % 7"
    assert names == ("b", "a")


def test_a_format_placeholder_is_refused() -> None:
    with pytest.raises(ValueError, match=r"%\(ids\)b"):
        positional("SELECT %(ids)b::uuid[]")


@pytest.mark.parametrize("name", ["job_claim_batch", "job_claim_batch_limited"])
@pytest.mark.parametrize("ring", [False, True])
def test_the_claims_are_numbered_as_psycopg_numbers_them(name: str, ring: bool) -> None:
    query = doorbell.ringing(QUERIES[name]) if ring else QUERIES[name]
    text, names = positional(query)
    # psycopg's own conversion of the named query: what an execute with a dict sends.
    pg_query = PostgresQuery(Transformer(db.ADAPTERS))
    pg_query.convert(query, dict.fromkeys(names))
    assert text == pg_query.query
    assert positional(query) is positional(query), "made once per text"
