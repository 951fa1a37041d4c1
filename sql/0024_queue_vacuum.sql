-- depends: 0023_ringing_triggers
-- The workers vacuum pgjobs.job_queue themselves (issue 16; pgjobs.queue_vacuum).
--
-- Each claim leaves the old version of every queue row it takes in the claim's partial
-- indexes until VACUUM, and autovacuum comes at most every autovacuum_naptime (60 s by
-- default, server-wide). pgjobs.queue_vacuum (one row) records the workers' vacuums of the
-- queue: a worker vacuums only after claiming the interval by a guarded update of
-- last_run_at (query queue_vacuum_claim_run), so however many workers run, one of them
-- vacuums per interval. A row and not an advisory lock: VACUUM cannot run inside a
-- transaction, so a transaction lock cannot cover it, and a session lock would outlive
-- its session's transaction on a server connection PgBouncer (transaction mode) hands to
-- another client.

CREATE TABLE pgjobs.queue_vacuum (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    last_run_at  timestamptz,
    runs         bigint      NOT NULL DEFAULT 0
);
INSERT INTO pgjobs.queue_vacuum DEFAULT VALUES;

COMMENT ON TABLE pgjobs.queue_vacuum IS
    'The workers'' own vacuums of pgjobs.job_queue: the last one''s start and how many (one worker per interval claims it; pgjobs.queue_vacuum).';
