-- depends: 0027_event_order
-- pgjobs.younger_transaction_ended (sql/0027) becomes PL/pgSQL, its plan kept for the
-- session; body unchanged.
--
-- Why: both transition triggers call it once per statement, and as a LANGUAGE sql function
-- it was parsed and planned at every call (PostgreSQL keeps no plan of a SQL function
-- between queries; sql/0026 did the same for notify_audit_rows). Measured
-- (pg_stat_user_functions, track_functions = all, 2-process 100,000-job drains on
-- PostgreSQL 15, 3 pairs): 259 / 270 / 397 ms per drain as SQL, 90 / 99 / 108 ms as
-- PL/pgSQL, ~820 calls each: ~320 -> ~115 µs per call, 1.7-2.9 µs per drained job. perf
-- of the backends had fmgr_sql (the SQL function's parse and plan) at 2.2% of their CPU.
--
-- Deploying: no stop; one function replaced; sessions plan it anew; workers and gateways
-- of either version keep working.

CREATE OR REPLACE FUNCTION pgjobs.younger_transaction_ended() RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RETURN (SELECT (SELECT count(*) FROM pg_snapshot_xip(s) AS x WHERE x > me)
                   < pg_snapshot_xmax(s)::text::numeric - me::text::numeric - 1
            FROM pg_current_snapshot() AS s, pg_current_xact_id() AS me);
END;
$$;
