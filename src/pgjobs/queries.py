"""Named SQL queries, loaded once from ``.sql`` files shipped in the package.

Every runtime query lives in a ``.sql`` file under a ``-- name: table_verb_guard`` header
(``pgjobs/queries.sql`` for the queue, ``pgjobs/limits.sql`` for its concurrency and
rate limits, ``pgjobs/gateway/queries.sql`` for the HTTP gateway), so SQL is reviewed
as SQL, and a test EXPLAINs each one against the migrated schema.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from importlib import resources
from typing import LiteralString, cast

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load(package: str, filename: str = "queries.sql") -> Mapping[str, LiteralString]:
    """Parse ``filename`` inside ``package`` into {name: query}."""
    text = resources.files(package).joinpath(filename).read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    queries: dict[str, LiteralString] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise RuntimeError(f"{package}/{filename} defines {name!r} twice")
        # The file ships with the package; its text is as trusted as a literal.
        queries[name] = cast(LiteralString, body.strip().rstrip(";"))
    return queries


def _merged(*files: Mapping[str, LiteralString]) -> Mapping[str, LiteralString]:
    merged: dict[str, LiteralString] = {}
    for queries in files:
        if twice := merged.keys() & queries.keys():
            raise RuntimeError(f"queries defined twice: {', '.join(sorted(twice))}")
        merged.update(queries)
    return merged


_RING_ON: LiteralString = "WHERE true /* ring */"
# NOT true rather than false, and a first line of its own: pg_stat_statements, which reads
# true and false as constants like any other, and pg_stat_activity, which shows a query's
# start, then tell the two claims apart (bench.pgss, bench.waits).
_RING_OFF: LiteralString = "WHERE NOT true /* ring */"
_OLDEST_FIRST: LiteralString = "/* oldest first: the claim with its ring switched off */\n"


def oldest_first(claim: LiteralString) -> LiteralString:
    """``claim`` (job_claim_batch or job_claim_batch_limited) without its sharing between
    companies: its ring of companies switched off, so it has no heads and no fair share
    and its fill takes the oldest due jobs (priority, then run_at, job_id:
    job_queue_claim_idx's order) in one SKIP LOCKED walk; everything else (what it
    writes, the limits' cuts, what it returns) is the claim's own. The worker sends it
    only while its last fair claim came back full of one company's jobs: then the two take
    the same jobs, and this one costs PostgreSQL ~5 µs less per job with claims beside it
    (computing the ring, docs/benchmarks.md "What fairness costs one company"). The ring
    is switched off by a constant (NOT true): its anchor is planned as empty, so none of
    its probes, nor the heads' walks from it, ever run (EXPLAIN ANALYZE: "never
    executed"; a claim of 200 on 20,000 queued jobs 8.2 against 12.9 ms)."""
    if claim.count(_RING_ON) != 1:
        raise ValueError("oldest_first: the claim has no ring switch")
    return _OLDEST_FIRST + claim.replace(_RING_ON, _RING_OFF)


def _with_oldest_first(queries: Mapping[str, LiteralString]) -> Mapping[str, LiteralString]:
    derived = {
        "job_claim_batch_oldest": oldest_first(queries["job_claim_batch"]),
        "job_claim_batch_limited_oldest": oldest_first(queries["job_claim_batch_limited"]),
    }
    return _merged(queries, derived)


# limits.sql: the concurrency and rate limits' queries (sql/0014_limits.sql).
QUERIES: Mapping[str, LiteralString] = _with_oldest_first(
    _merged(load("pgjobs"), load("pgjobs", "limits.sql"))
)

# What compact keeps whole (quoted text, whose "--" is no comment) or drops (a comment).
_LEXEMES = re.compile(r"""'(?:[^']|'')*'|"(?:[^"]|"")*"|\$(\w*)\$.*?\$\1\$|(--[^\n]*)""", re.DOTALL)
_compact: dict[str, LiteralString] = {}


def compact(query: LiteralString) -> LiteralString:
    """``query`` without its ``--`` comments and the lines they leave blank, what the
    worker sends for its finish batches, progress and claims: psycopg converts a named
    query's placeholders on every execute, caching the result only for a text of at
    most 4,096 characters, and job_finish_many_if_leased is ~5,500 with its comments
    (~35 µs per batch converted, ~3 without). Quoted text ('…', "…", $tag$…$tag$) is kept whole;
    ``/* */`` comments are kept (the doorbell's mark is one). Made once per text."""
    known = _compact.get(query)
    if known is None:
        stripped = _LEXEMES.sub(lambda m: "" if m.group(2) else m.group(0), query)
        lines = (line.rstrip() for line in stripped.splitlines())
        # The query's own text less its comments: as trusted as the query (a literal).
        known = _compact[query] = "\n".join(line for line in lines if line)
    return known


# %%, or a named placeholder in any format (only %(name)s is taken by positional).
_PLACEHOLDER = re.compile(r"%%|%\((\w+)\)([sbt])")
_positional: dict[str, tuple[bytes, tuple[str, ...]]] = {}


def positional(query: LiteralString) -> tuple[bytes, tuple[str, ...]]:
    """``query`` as PostgreSQL takes it, its ``%(name)s`` placeholders numbered ($1, $2,
    ... a name used twice keeps its number) and ``%%`` made ``%``, with the names in
    number order: for a raw cursor (``psycopg.AsyncRawCursor``), which sends the text as
    it is and the values in that order, each in the format psycopg picks for its type,
    as ``%s`` would. What psycopg's own cursor does on every execute of a named query, and
    caches only for a text of at most 4,096 characters: the claim is ~13,000 with its
    comments, so converting it cost the worker ~70 µs per claim. Made once per text.
    ValueError for a ``%(name)b`` or ``%(name)t`` placeholder (a format a raw cursor
    cannot ask for)."""
    known = _positional.get(query)
    if known is not None:
        return known
    names: dict[str, int] = {}

    def number(match: re.Match[str]) -> str:
        name, fmt = match.group(1), match.group(2)
        if name is None:
            return "%"
        if fmt != "s":
            raise ValueError(f"positional: %({name}){fmt} asks for a format; only %(name)s")
        return f"${names.setdefault(name, len(names) + 1)}"

    known = _PLACEHOLDER.sub(number, query).encode(), tuple(names)
    _positional[query] = known
    return known
