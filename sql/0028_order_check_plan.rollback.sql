-- Rolls back 0028_order_check_plan: younger_transaction_ended as sql/0027 wrote it (a SQL
-- function, planned at each call).
CREATE OR REPLACE FUNCTION pgjobs.younger_transaction_ended() RETURNS boolean
LANGUAGE sql VOLATILE AS $$
    SELECT (SELECT count(*) FROM pg_snapshot_xip(s) AS x WHERE x > me)
           < pg_snapshot_xmax(s)::text::numeric - me::text::numeric - 1
    FROM pg_current_snapshot() AS s, pg_current_xact_id() AS me
$$;
