-- depends: 0025_limit_running_bound
-- notify_audit_rows becomes PL/pgSQL with a plan kept for the session, one that looks each
-- audit row up by its key.
--
-- Why: it runs once per transition statement when the doorbell is off (psql writes, the
-- client's cancel and retry, the gateway's, an older worker's), and as a LANGUAGE sql
-- function it was parsed and planned at every call (PostgreSQL keeps no plan of a SQL
-- function between queries): ~0.6 ms, most of it inlining notify_item. A write through
-- pgjobs.jobs is routed row by row, each row a statement of its own, so a psql UPDATE of
-- 1,000 jobs paid it 2,000 times. Measured (pg_stat_xact_user_functions, 1,000 queued
-- jobs changed through pgjobs.jobs in one statement, rolled back): a priority change
-- 1,650 -> 490 ms, a cancel 880 -> 320 ms; 30 jobs' 30,000 progress transitions through
-- the view, a commit per 30: 31 -> 13 s (notify_audit_rows 19.3 -> 2.4 s of it); the
-- client's cancel and retry about half the PostgreSQL CPU (2.2 -> 1.2 and 2.45 -> 1.3 ms;
-- one database, the two definitions swapped in 10 times, medians).
--
-- The plan: generic (a custom plan, with the arrays folded in, always looks cheaper, so
-- PostgreSQL would plan each call), and made with sequential scans, hash and merge joins
-- priced out: a session that first ran it while the audit log held a few rows planned a
-- hash join over a scan of the whole log, and kept it while the log grew (the 30,000
-- transitions above: ~4 s per 6,000 at first, ~19 s by the end). With those settings the
-- plan is a nested loop of index lookups by (job_id, seq), right for any size of log:
-- one per transition of the statement. The settings apply while the function runs and
-- are restored after it (a few µs per call). Body unchanged (sql/0023).
--
-- Deploying: no stop; one function replaced; sessions plan it anew; workers and gateways
-- of either version keep working.

CREATE OR REPLACE FUNCTION pgjobs.notify_audit_rows(job_ids uuid[], seqs int[]) RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off SET enable_hashjoin = off SET enable_mergejoin = off
AS $$
DECLARE
    sent bigint;
BEGIN
    WITH items AS (
        SELECT e.id, pgjobs.notify_item(e.id, e.job_id, e.company_id, e.seq, e.type, e.status,
                                        e.attempt, e.payload) AS item
        FROM unnest(job_ids, seqs) AS k(job_id, seq)
        JOIN pgjobs.job_events e ON e.job_id = k.job_id AND e.seq = k.seq
    ), chunks AS (
        SELECT id, item,
               sum(octet_length(item) + 1) OVER (ORDER BY id)
               / (7980 - max(octet_length(item)) OVER ()) AS chunk
        FROM items
    ), notified AS (
        SELECT pg_notify('pgjobs_events', '{"events":[' || string_agg(item, ',' ORDER BY id) || ']}') AS n
        FROM chunks GROUP BY chunk
    )
    SELECT count(n) INTO sent FROM notified;
    RETURN sent;
END;
$$;
