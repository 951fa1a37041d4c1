-- Back to 0001's append-only trigger function: no DELETE at all.
DROP FUNCTION pgjobs.prune_events(timestamptz, bigint, integer);
CREATE OR REPLACE FUNCTION pgjobs.forbid_event_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'pgjobs.job_events is append-only' USING ERRCODE = 'insufficient_privilege';
END;
$$;
DROP TABLE pgjobs.asset_deletions;
DROP TABLE pgjobs.retention;
DROP TABLE pgjobs.job_events_pruned;
