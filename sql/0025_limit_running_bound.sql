-- depends: 0024_queue_vacuum
-- An upper bound on each concurrency limit's running jobs, kept by the limited claims
-- (issue 18: limits that do not bind cost the claim a count of the leased rows).
--
-- job_claim_batch_limited (src/pgjobs/limits.sql) counted a limit's running jobs from
-- job_queue's leased rows on every claim. Only a claim holding the limit's advisory lock
-- can add running jobs the limit covers: every claim that began after the limit was
-- committed takes the limited path and locks it, and creating a limit waits for the
-- claims already running (set_limit locks pgjobs.limits first: limits.sql,
-- limit_lock_table_for_upsert). Finishes, cancels, retries and rescues only take running
-- jobs away. (A job made running by a direct write to pgjobs.jobs is not counted until
-- the next exact count.) So the lock's holder keeps here the running count
-- it last counted plus every job claimed under the lock since: never less than the jobs
-- running. While bound + the batch is within max_running the limit cannot bind the batch
-- and the claim does not count; otherwise it counts exactly and writes the count back.
-- A limit without a row here is counted exactly (its first claim writes the row).

CREATE TABLE pgjobs.limit_running (
    limit_id bigint PRIMARY KEY REFERENCES pgjobs.limits (id) ON DELETE CASCADE,
    bound    int NOT NULL CHECK (bound >= 0)
);

COMMENT ON TABLE pgjobs.limit_running IS
    'Per concurrency limit: at least its running jobs (its last exact count plus the jobs claimed under its lock since), written only under the limit''s advisory lock by job_claim_batch_limited.';
