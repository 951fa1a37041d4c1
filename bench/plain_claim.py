"""The claim without fairness, to price the fair one (scenario 9, "one company").

``plain_claim`` is the worker's ``job_claim_batch`` with everything before its UPDATE (the
ring of companies, the heads, the cut, the fair order and the fill) replaced by one SKIP
LOCKED walk of ``job_queue_claim_idx`` in the global claim order (priority, then run_at),
which is how pgjobs claimed before sql/0008. The UPDATE, the audit rows its trigger writes,
the limits check and what the statement returns are the fair claim's own text, so that
the two differ only in how they choose the jobs. Used by ``python -m bench.worker pgjobs
--claim plain``; never by pgjobs itself."""

from __future__ import annotations

from typing import LiteralString, cast

from pgjobs.queries import QUERIES

# Where the fair claim's choosing ends and its UPDATE begins.
_UPDATE = "), claimed AS ("

# The CTEs the fair claim's UPDATE and final SELECT read: scope (limits), fair and fill
# (the rows to claim, by ctid), ring (the rotation cursor's fallback): fair and ring empty.
_CHOOSE = """WITH scope AS (
    SELECT EXISTS (SELECT 1 FROM pgjobs.limits l
                   WHERE pgjobs.limit_scope(l.job_type, %(job_types)s::text[])) AS limited
), ring AS (
    SELECT NULL::text AS company_id, 1 AS n WHERE false
), fair AS (
    SELECT NULL::uuid AS job_id, NULL::text AS company_id, NULL::tid AS ctid, 1 AS n WHERE false
), fill AS (
    SELECT q.job_id, q.ctid FROM pgjobs.job_queue q
    WHERE q.lease_expires_at IS NULL
      AND q.run_at <= coalesce(%(now)s::timestamptz, now())
      AND (%(job_types)s::text[] IS NULL OR q.job_type = ANY(%(job_types)s::text[]))
    ORDER BY q.priority DESC, q.run_at, q.job_id
    LIMIT %(limit)s::int
    FOR UPDATE OF q SKIP LOCKED
"""


def plain_claim(fair: str) -> LiteralString:
    """``fair`` (job_claim_batch's text) choosing its jobs as _CHOOSE does; ValueError if
    its UPDATE cannot be found once."""
    if fair.count(_UPDATE) != 1:
        raise ValueError(f"job_claim_batch has {fair.count(_UPDATE)} {_UPDATE!r}, not one")
    return cast(LiteralString, _CHOOSE + _UPDATE + fair.partition(_UPDATE)[2])


def use_plain_claim() -> None:
    """Make this process's workers claim with plain_claim (QUERIES is a dict underneath)."""
    queries = cast(dict[str, LiteralString], QUERIES)
    queries["job_claim_batch"] = plain_claim(QUERIES["job_claim_batch"])
