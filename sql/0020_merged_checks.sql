-- depends: 0019_doorbell
-- Fewer CHECKs on the job row, one per concern (issue 16).
--
-- PostgreSQL evaluates every CHECK of a table on every insert and on every update of a
-- row, whatever the update changes: a job's claim and its finish each re-checked the 22
-- rules of pgjobs.jobs, and the claim the 2 of pgjobs.job_queue. They are now three on
-- pgjobs.jobs and one on pgjobs.job_queue, which refuse exactly the rows the 24 refused
-- (tests/integration/test_migrations.py compares the two over a grid of rows):
--
--   jobs_times_in_range     the six times within 1970-01-01 .. 9999-12-31 UTC (0005)
--   jobs_sizes_in_range     texts' lengths, the progress fraction, max_attempts
--   jobs_state_consistent   attempts, and what each status requires of the lease, worker,
--                           started_at/finished_at, error and last event
--   job_queue_times_in_range  the queue row's run_at and lease_expires_at (0005)
--
-- Measured as one backend's CPU on copies of pgjobs.jobs (100,000 rows, 11 interleaved
-- rounds): the rules cost ~0.85 us per insert and ~0.65 per update as 22 CHECKs, ~0.45
-- and ~0.4 as these three (docs/benchmarks.md, "The job row's CHECKs (sql/0020)").
--
-- Each is cheap: plain comparisons and NULL tests, a CASE on status instead of a status
-- comparison per rule, and no SQL-function call per row: pgjobs.time_in_range is a plain
-- SQL expression, which PostgreSQL inlines into the CHECK (pg_stat_user_functions counts
-- no call of it; tests/integration/test_schema.py checks that).
--
-- A violation names the concern in the constraint's name; a CHECK cannot carry its own
-- message, so which rule of it broke is read from its definition (`\d pgjobs.jobs`) and
-- the error's DETAIL (the failing row), and COMMENT ON CONSTRAINT below says in words what
-- each requires (`\dd pgjobs.jobs_*`).
--
-- Validated when added, in the same ALTER TABLE as the drops: one scan of pgjobs.jobs
-- checks all three, under the ACCESS EXCLUSIVE lock that dropping constraints takes anyway
-- (NOT VALID + VALIDATE would only shorten that lock if VALIDATE ran in a later
-- transaction; yoyo runs a migration in one, and VALIDATE scans once per constraint).
-- On 100,000 jobs in every state (a 34 MB table) that ALTER TABLE takes ~48 ms and the
-- whole migration through yoyo ~0.3 s; the scan is linear, so ~5 s per 10 million jobs,
-- during which every write to pgjobs.jobs waits. A database whose range CHECKs were
-- dropped or re-added NOT VALID by hand and that holds a time out of range fails this
-- migration on jobs_times_in_range: fail or clamp those jobs first (as 0005 did).
--
-- Deploying: no stop needed. Workers, gateways and clients of either version read and
-- write the same columns; nothing in pgjobs looks up a constraint by name.

ALTER TABLE pgjobs.jobs
    DROP CONSTRAINT jobs_attempts_in_range,
    DROP CONSTRAINT jobs_company_id_check,
    DROP CONSTRAINT jobs_created_at_in_range,
    DROP CONSTRAINT jobs_done_has_no_error,
    DROP CONSTRAINT jobs_ended_has_its_event,
    DROP CONSTRAINT jobs_failed_has_error,
    DROP CONSTRAINT jobs_finished_at_in_range,
    DROP CONSTRAINT jobs_finished_iff_terminal,
    DROP CONSTRAINT jobs_job_type_check,
    DROP CONSTRAINT jobs_last_event_known,
    DROP CONSTRAINT jobs_lease_expires_at_in_range,
    DROP CONSTRAINT jobs_lease_only_while_running,
    DROP CONSTRAINT jobs_max_attempts_check,
    DROP CONSTRAINT jobs_progress_fraction_check,
    DROP CONSTRAINT jobs_progress_message_check,
    DROP CONSTRAINT jobs_queued_has_attempt_left,
    DROP CONSTRAINT jobs_run_at_in_range,
    DROP CONSTRAINT jobs_running_has_lease,
    DROP CONSTRAINT jobs_started_at_in_range,
    DROP CONSTRAINT jobs_status_check,
    DROP CONSTRAINT jobs_traceback_bounded,
    DROP CONSTRAINT jobs_updated_at_in_range,
    -- A NULL time (started_at before the first claim, ...) makes its term NULL, which a
    -- CHECK accepts, as the six separate CHECKs did: the AND is false only when a term is.
    ADD CONSTRAINT jobs_times_in_range CHECK (
        pgjobs.time_in_range(run_at) AND pgjobs.time_in_range(created_at)
        AND pgjobs.time_in_range(updated_at) AND pgjobs.time_in_range(started_at)
        AND pgjobs.time_in_range(finished_at) AND pgjobs.time_in_range(lease_expires_at)),
    -- NULL progress and traceback likewise pass.
    ADD CONSTRAINT jobs_sizes_in_range CHECK (
        length(company_id) BETWEEN 1 AND 200 AND length(job_type) BETWEEN 1 AND 200
        AND length(progress_message) <= 1000 AND octet_length(error_traceback) <= 16384
        AND progress_fraction BETWEEN 0 AND 1 AND max_attempts BETWEEN 1 AND 1000),
    -- Every term here is true or false, never NULL. Branches in the order the hot path
    -- writes them (enqueue, claim, finish). A failed or cancelled job's last event says so
    -- (company listings by status rely on it, sql/0004); the other statuses' last event is
    -- any other known one.
    ADD CONSTRAINT jobs_state_consistent CHECK (
        attempts BETWEEN 0 AND max_attempts
        AND CASE status
            WHEN 'queued' THEN
                attempts < max_attempts  -- an attempt left (manual retry raises max_attempts)
                AND finished_at IS NULL AND lease_expires_at IS NULL
                AND last_event IN ('content_job.queued', 'content_job.running',
                                   'content_job.progress', 'content_job.retrying',
                                   'content_job.done')
            WHEN 'running' THEN
                worker_id IS NOT NULL AND lease_expires_at IS NOT NULL
                AND started_at IS NOT NULL AND finished_at IS NULL
                AND last_event IN ('content_job.queued', 'content_job.running',
                                   'content_job.progress', 'content_job.retrying',
                                   'content_job.done')
            WHEN 'done' THEN
                finished_at IS NOT NULL AND lease_expires_at IS NULL AND error_message IS NULL
                AND last_event IN ('content_job.queued', 'content_job.running',
                                   'content_job.progress', 'content_job.retrying',
                                   'content_job.done')
            WHEN 'failed' THEN
                finished_at IS NOT NULL AND lease_expires_at IS NULL
                AND error_message IS NOT NULL AND last_event = 'content_job.failed'
            WHEN 'cancelled' THEN
                finished_at IS NOT NULL AND lease_expires_at IS NULL
                AND last_event = 'content_job.cancelled'
            ELSE false  -- no other status
        END);

ALTER TABLE pgjobs.job_queue
    DROP CONSTRAINT job_queue_run_at_in_range,
    DROP CONSTRAINT job_queue_lease_expires_at_in_range,
    ADD CONSTRAINT job_queue_times_in_range CHECK (
        pgjobs.time_in_range(run_at) AND pgjobs.time_in_range(lease_expires_at));

COMMENT ON CONSTRAINT jobs_times_in_range ON pgjobs.jobs IS
    'run_at, created_at, updated_at, started_at, finished_at and lease_expires_at within '
    '1970-01-01 .. 9999-12-31 UTC (pgjobs.time_in_range: times Python can read) where set';
COMMENT ON CONSTRAINT jobs_sizes_in_range ON pgjobs.jobs IS
    'company_id and job_type 1 to 200 characters, progress_message at most 1000, '
    'error_traceback at most 16384 bytes, progress_fraction 0 to 1, max_attempts 1 to 1000';
COMMENT ON CONSTRAINT jobs_state_consistent ON pgjobs.jobs IS
    'attempts 0 to max_attempts; status one of: queued (an attempt left, finished_at and '
    'lease_expires_at NULL), running (worker_id, lease_expires_at and started_at set, '
    'finished_at NULL), done (finished_at set, lease_expires_at and error_message NULL), '
    'failed (finished_at and error_message set, lease_expires_at NULL), cancelled '
    '(finished_at set, lease_expires_at NULL); last_event a content_job event, '
    'content_job.failed exactly when failed and content_job.cancelled exactly when cancelled';
COMMENT ON CONSTRAINT job_queue_times_in_range ON pgjobs.job_queue IS
    'run_at and lease_expires_at within 1970-01-01 .. 9999-12-31 UTC where set, as on pgjobs.jobs';
