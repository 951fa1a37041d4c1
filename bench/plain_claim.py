"""The claim without fairness, to price the fair one (scenario 9, "one company").

``use_plain_claim`` makes a bench worker process claim every batch with
``job_claim_batch_oldest`` (queries.oldest_first: the fair claim's statement choosing the oldest
due jobs whatever their company, as pgjobs claimed before sql/0008), where pgjobs' own
worker sends it only while its last fair claim came back full of one company's jobs. Used
by ``python -m bench.worker pgjobs --claim plain``; never by pgjobs itself."""

from __future__ import annotations

from typing import LiteralString, cast

from pgjobs.queries import QUERIES


def use_plain_claim() -> None:
    """This process's workers claim as job_claim_batch_oldest does (QUERIES is a dict
    underneath)."""
    queries = cast(dict[str, LiteralString], QUERIES)
    queries["job_claim_batch"] = QUERIES["job_claim_batch_oldest"]
