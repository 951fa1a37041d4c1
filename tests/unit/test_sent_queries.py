"""What the worker sends of its queries: without comments (pgjobs.queries.compact), and
for the claims numbered as psycopg numbers them (positional), on a raw cursor. psycopg
converts a named query of more than 4,096 characters again on every execute."""

from __future__ import annotations

import pytest
from psycopg._queries import PostgresQuery  # psycopg's converter, to compare with
from psycopg.adapt import Transformer

from pgjobs import db, doorbell
from pgjobs.queries import QUERIES, compact, positional


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


def test_compact_drops_comments_and_keeps_quoted_text() -> None:
    query = (
        "-- a header\n"
        "SELECT '--not a comment' AS a,  -- a comment\n"
        '       "odd--name", $q$ -- kept $q$, (SELECT true /* doorbell */)\n'
        "\n"
        "FROM t -- the end"
    )
    assert compact(query) == (
        "SELECT '--not a comment' AS a,\n"
        '       "odd--name", $q$ -- kept $q$, (SELECT true /* doorbell */)\n'
        "FROM t"
    )
    assert compact(query) is compact(query), "made once per text"


@pytest.mark.parametrize("ring", [False, True])
def test_the_finish_is_sent_short_enough_for_psycopg_to_keep_its_conversion(ring: bool) -> None:
    query = QUERIES["job_finish_many_if_leased"]
    sent = compact(doorbell.ringing(query) if ring else query)
    assert len(sent) <= 4096 < len(doorbell.ringing(query))
    assert "--" not in sent
