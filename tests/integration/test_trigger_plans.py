"""The jobs triggers' pairing of new and old rows is never a nested loop (sql/0017).

PL/pgSQL plans a trigger's statements on their first run in a session and keeps the plan,
sized by the transition tables of that first statement. Before sql/0017, a session whose
first UPDATE of jobs changed one row paired every later batch's rows by a nested loop
over the two transition tables (n x n comparisons). The plans are read with auto_explain
(nested statements, logged to the client as NOTICEs), which the embedded pgserver lacks:
the test starts Debian's PostgreSQL as bench.pgss does, and is skipped where none is
installed (postgresql-15 is on this machine kind, so it runs here and in CI).
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from helpers import DEBIAN_BUILDS as BUILDS

# A transition that moves every row it touches: audit rows, NOTIFY items and queue rows.
CLAIM_LIKE = """
    UPDATE pgjobs.jobs
    SET status = 'running', attempts = attempts + 1, worker_id = 'w',
        lease_token = lease_token + 1, lease_expires_at = now() + interval '1 hour',
        started_at = now(), event_seq = event_seq + 1, last_event = 'content_job.running',
        updated_at = now()
    WHERE id = ANY(%s)
"""


def _explain_nested_statements(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Every statement of this session, the triggers' own included, logged with its plan
    as a NOTICE (auto_explain)."""
    conn.execute("LOAD 'auto_explain'")
    conn.execute("SET auto_explain.log_min_duration = 0")
    conn.execute("SET auto_explain.log_nested_statements = on")
    conn.execute("SET auto_explain.log_level = notice")


def _trigger_plans(conn: psycopg.Connection[tuple[object, ...]], ids: list[uuid.UUID]) -> list[str]:
    """The plans of the statements the triggers ran for one claim-like UPDATE of ids."""
    plans: list[str] = []
    conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
    conn.execute(CLAIM_LIKE, (ids,))
    return [plan for plan in plans if "Named Tuplestore Scan" in plan]


@pytest.mark.skipif(not BUILDS, reason="no PostgreSQL build with auto_explain here")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("first_rows", [0, 1])
def test_a_small_first_update_does_not_leave_a_nested_loop_for_later_batches(
    debian_dsn: str, first_rows: int
) -> None:
    ids = [uuid.uuid4() for _ in range(200)]
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        conn.execute(
            """INSERT INTO pgjobs.jobs (id, company_id, job_type, input, priority, run_at,
                                        max_attempts, created_at, updated_at)
               SELECT i, 'acme', 'render', '{}', 0, now(), 3, now(), now()
               FROM unnest(%s::uuid[]) AS i""",
            (ids,),
        )
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        _explain_nested_statements(conn)
        # The session's first UPDATE of jobs: none or one row (an empty claim, one progress
        # report). The triggers' statements are planned now and kept.
        conn.execute(CLAIM_LIKE, (ids[100 : 100 + first_rows],))
        plans = _trigger_plans(conn, ids[:100])
    # publish_events' pairs (UPDATE) and sync_job_queue's pairs, each of 100 rows.
    joins = [join for plan in plans for join in _pairing_joins(plan)]
    assert len(joins) >= 2, plans
    assert all("Full Join" in join for join in joins), joins


def _pairing_joins(plan: str) -> list[str]:
    """The join nodes above each transition-table scan of an EXPLAIN text (the nearest
    line above it, less indented, naming a join); a nested loop that probes job_queue's
    index for each pair is fine and not among them."""
    lines = plan.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "Named Tuplestore Scan" not in line:
            continue
        depth = len(line) - len(line.lstrip(" ->"))
        for above in reversed(lines[:i]):
            above_depth = len(above) - len(above.lstrip(" ->"))
            if above_depth < depth and ("Join" in above or "Nested Loop" in above):
                found.append(above.strip())
                break
    return found


# A cancel written by hand through pgjobs.jobs: its trigger sends the NOTIFY items
# (notify_audit_rows reads the audit rows just written back by their key).
CANCEL_BY_HAND = """
    UPDATE pgjobs.jobs SET status = 'cancelled', finished_at = now(), event_seq = event_seq + 1,
           last_event = 'content_job.cancelled', updated_at = now()
    WHERE id = %s
"""


@pytest.mark.skipif(not BUILDS, reason="no PostgreSQL build with auto_explain here")
@pytest.mark.timeout(120)
def test_the_items_read_the_audit_log_by_its_key_however_small_it_was_when_planned(
    debian_dsn: str,
) -> None:
    """notify_audit_rows keeps one plan per session (sql/0026). Planned while the audit
    log held a handful of rows, a generic plan may scan the whole log, and kept while it
    grows every cancel reads it all (30,000 hand-written progress transitions: from ~4 to
    ~19 s per 6,000 as the log grew). Its plan looks each row up by (job_id, seq)."""
    company = f"plans-{uuid.uuid4().hex[:8]}"
    insert = """INSERT INTO pgjobs.jobs (id, company_id, job_type)
                SELECT gen_random_uuid(), %s, 'render' FROM generate_series(1, %s)
                RETURNING id"""
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        first, *_ = [r[0] for r in conn.execute(insert, (company, 3)).fetchall()]
    with psycopg.connect(debian_dsn, autocommit=True) as conn:
        _explain_nested_statements(conn)
        conn.execute(CANCEL_BY_HAND, (first,))  # planned now, the log nearly empty
        with psycopg.connect(debian_dsn, autocommit=True) as other:
            later = other.execute(insert, (company, 20_000)).fetchall()[-1][0]
        plans: list[str] = []
        conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
        conn.execute(CANCEL_BY_HAND, (later,))
    (lookup,) = [p for p in plans if "Function Scan on k" in p]
    assert "Index Scan using job_events_pkey on job_events e" in lookup, lookup
    assert "Seq Scan" not in lookup, lookup


@pytest.mark.skipif(not BUILDS, reason="no PostgreSQL build with auto_explain here")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("transition", ["claim", "cancel"])
def test_the_order_key_reads_the_previous_audit_row_by_its_key_however_small_the_log_was(
    debian_server: str, transition: str
) -> None:
    """A transition's audit row takes its order key from the job's previous row (sql/0027),
    looked up by (job_id, seq) in plans the triggers keep for the session (here after a
    younger transaction ended, as in the inversion the key is for): planned in a new
    database whose log held three rows (analysed), it still probes the key once the log
    holds 20,000 (a scan of the log per transition would grow with it)."""
    from bench import pg

    insert = """INSERT INTO pgjobs.jobs (id, company_id, job_type)
                SELECT gen_random_uuid(), 'acme', 'render' FROM generate_series(1, %s)
                RETURNING id"""
    update = CLAIM_LIKE if transition == "claim" else CANCEL_BY_HAND.replace("= %s", "= ANY(%s)")
    with pg.database(debian_server) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            first = [r[0] for r in conn.execute(insert, (3,)).fetchall()]
            conn.execute("ANALYZE pgjobs.job_events")  # as autovacuum would: one page
        with psycopg.connect(dsn, autocommit=True) as conn:
            _explain_nested_statements(conn)
            conn.execute(update, (first[:1],))  # planned now, the log nearly empty
            plans: list[str] = []
            conn.add_notice_handler(lambda diag: plans.append(diag.message_primary or ""))
            with conn.transaction():
                conn.execute("SELECT pg_current_xact_id()")  # this transaction's xid first
                with psycopg.connect(dsn, autocommit=True) as other:  # a younger one ends
                    later = [r[0] for r in other.execute(insert, (20_000,)).fetchall()]
                conn.execute(update, (later[:100],))
    inserts = [p for p in plans if "Insert on job_events" in p]
    assert inserts
    assert all("Index Scan using job_events_pkey on job_events p" in p for p in inserts), inserts
    assert not any("Seq Scan on job_events" in p for p in inserts), inserts
